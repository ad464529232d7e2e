"""Between backward passes: the micro-batch after which the accumulated gradient went non-finite (on the device)."""

from __future__ import annotations

import torch

from lightning_gradhealth.model.distributed import local
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.stats.kernels import foreach_norms, stat_grads

__all__ = ["NonFiniteTracker"]


class NonFiniteTracker:
    """Remember, on the device, the first micro-batch after which the accumulated gradient went non-finite.

    Accumulated gradients are running sums, so once non-finite they stay non-finite: the first micro-batch
    whose running gradient is non-finite is the one that introduced the NaN/Inf. Each observation is one
    foreach norm and a few scalar kernels, with no host synchronisation. Each rank watches its own gradient (or
    shards); a failing step takes the earliest micro-batch over the ranks
    (:meth:`~lightning_gradhealth.stats.engine.GradStatsEngine.finish`).
    """

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None
        self.micro_batches = 0

    def reset(self) -> None:
        """Forget the current optimizer step."""
        self.first_bad = None
        self.micro_batches = 0

    @torch.no_grad()
    def observe(self, layout: ParamLayout) -> None:
        """Look at the running gradients of ``layout``'s parameters after one more backward pass."""
        present = layout.with_grad()
        grads = [local(g) for g in stat_grads(layout, present)]  # sharded: this rank's shards
        idx = self.micro_batches
        self.micro_batches += 1
        if not grads:
            return
        norms = foreach_norms(grads, 2.0)
        bad = ~torch.isfinite(norms).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=norms.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), idx, self.first_bad)
