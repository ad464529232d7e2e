"""A step's statistics between the device and the host: where it happened, and what waits for the one transfer.

:class:`StepMeta` is what the caller knows on the host (never transferred); :class:`PendingStats` is what
:meth:`~lightning_gradhealth.stats.engine.GradStatsEngine.compute` or ``guard`` launched on the device, read back
by :mod:`~lightning_gradhealth.stats.readback`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_gradhealth.model.distributed import Reduction
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.stats.pack import PackSchema

__all__ = ["PendingStats", "StepMeta"]


@dataclass(frozen=True)
class StepMeta:
    """Where in training a step happened (host values known to the caller, never transferred)."""

    step: int = 0
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    optimizer_idx: int = 0


@dataclass
class PendingStats:
    """Device-side results of one step, waiting for the single transfer.

    Attributes:
        layout: The layout the statistics were computed for.
        present: Indices (into the layout) of the parameters that had a gradient.
        packed: The packed device tensor.
        grads: The gradients the statistics were computed from (references, not copies), kept so that exact
            NaN/Inf counts can be taken if the step turns out non-finite.
        grad_scale: Loss scale still contained in ``grads`` (fused optimizers under a GradScaler), else None.
        extras: Optional device scalars appended at transfer time, by name.
        reduction: The process groups the statistics were combined over.
        schema: Where each named value lies in ``packed`` (read back by :class:`PackValues`).
        host_extras: The extras as read back by :meth:`GradStatsEngine.finish`, by name.
    """

    layout: ParamLayout
    present: tuple[int, ...]
    packed: torch.Tensor
    grads: list[torch.Tensor]
    grad_scale: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    reduction: Reduction = field(default_factory=Reduction)
    schema: PackSchema = ()
    host_extras: dict[str, float] = field(default_factory=dict)
