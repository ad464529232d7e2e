"""A step's statistics between the device and the host: what waits for the one transfer, and that transfer.

:class:`StepMeta` is what the caller knows on the host (never transferred); :class:`PendingStats` is what
:meth:`~lightning_gradhealth.stats.engine.GradStatsEngine.compute` or ``guard`` launched on the device.
:func:`outgoing` is the tensor that crosses; :func:`transfer` copies it (or takes a copy made earlier) and reads it
by name (:class:`~lightning_gradhealth.stats.pack.PackValues`); :func:`first_micro_batch_anywhere` agrees across
ranks on the micro-batch that went non-finite first.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lightning_gradhealth.model.distributed import Reduction, min_valid_over
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.stats.pack import PackSchema, PackValues

__all__ = ["PendingStats", "StepMeta", "first_micro_batch_anywhere", "outgoing", "transfer"]


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


def outgoing(pending: PendingStats) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The device tensor that goes to the host: the packed values with the extras appended (and their names)."""
    names = tuple(pending.extras)
    packed = pending.packed
    if names:
        extra = torch.stack([pending.extras[k].detach().to(packed.dtype).reshape(()) for k in names])
        packed = torch.cat([packed, extra])
    return packed, names


def transfer(pending: PendingStats, values: list[float] | None = None) -> tuple[PackValues, dict[str, float]]:
    """The one device-to-host copy (``values``: already copied), read back by name: ``(values, extras)``."""
    names = tuple(pending.extras)
    if values is None:
        values = outgoing(pending)[0].tolist()
    extras = dict(zip(names, values[len(values) - len(names) :], strict=True))
    return PackValues(pending.schema, values), extras


def first_micro_batch_anywhere(micro: float | None, pending: PendingStats) -> float | None:
    """The first micro-batch that went non-finite on any rank (each rank saw its own gradient or shard go bad)."""
    device = pending.packed.device
    value = None if micro is None else int(micro)
    for group in (pending.reduction.shard_group, pending.reduction.replica_group):
        if group is not None:
            value = min_valid_over(value, group, device)
    return value
