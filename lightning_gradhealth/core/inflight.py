"""The steps in flight: launched on the device, read back at once (synchronous) or one step late (deferred).

:class:`StepsInFlight` is the plumbing of the one decision path: it launches a step's statistics (computed
steps) or guard (other steps) with what rides along (loss, loss scale, the micro-batch that went bad), queues it,
reads it back, describes a failing step in full, and holds the records the framework clips after the hook. It
decides nothing: :class:`~lightning_gradhealth.core.health.GradientHealth` hands what it reads to the guard.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch.optim import Optimizer

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.core.context import StepContext
from lightning_gradhealth.guard.birth import fold_loss
from lightning_gradhealth.guard.deferred import DeferredGuard, DeferredStep, LiveStep, device_skip_supported
from lightning_gradhealth.model.distributed import Reduction
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.schema.record import StepStats
from lightning_gradhealth.stats.engine import GradStatsEngine, PendingStats, StepMeta, stat_grads

__all__ = ["StepsInFlight", "add_extras"]


def add_extras(
    pending: PendingStats,
    scale: torch.Tensor | None,
    loss: torch.Tensor | float | None,
    first_bad: torch.Tensor | None,
) -> None:
    """Add the device scalars that ride with a step's values: loss scale, loss, first non-finite micro-batch."""
    if scale is not None:
        pending.extras["amp_scale"] = scale
    if loss is not None:
        value = torch.as_tensor(loss).detach().reshape(())
        device = pending.packed.device
        pending.extras["loss"] = value if value.device == device else value.to(device)  # (a plain float)
    if first_bad is not None:
        pending.extras["first_nonfinite_micro_batch"] = first_bad
    # else: a single micro-batch; the engine reports micro-batch 0 for a non-finite step


class StepsInFlight:
    """One queue of launched steps, and the records waiting for the framework's clipping.

    Args:
        engine: The statistics engine.
        options: The validated options (``guard_mode``, ``on_nonfinite``).
    """

    def __init__(self, engine: GradStatsEngine, options: HealthOptions) -> None:
        self.engine = engine
        self.options = options
        self.queue = DeferredGuard(engine)
        self.awaiting_clip: dict[int, tuple[DeferredStep, ParamLayout]] = {}

    def defers(
        self, optimizer: Optimizer, ctx: StepContext, layout: ParamLayout, clipping: bool
    ) -> tuple[bool, str | None]:
        """Whether the step is read one step late (``guard_mode``), and why not, said once per reason."""
        return self.queue.wants(optimizer, self.options, layout, clipping, ctx.scaler)

    def launch(
        self,
        optimizer: Optimizer,
        ctx: StepContext,
        layout: ParamLayout,
        *,
        deferred: bool,
        reduction: Reduction,
        first_bad: torch.Tensor | None,
        extras: dict[str, torch.Tensor],
    ) -> DeferredStep | None:
        """Launch the step's statistics (due) or guard and queue them; ``None``: no watched gradient.

        Args:
            optimizer: The optimizer about to step.
            ctx: The step.
            layout: The optimizer's watched layout.
            deferred: Read one step late (no host sync) rather than at once.
            reduction: The process groups to combine over.
            first_bad: The first micro-batch that made the gradient non-finite (device scalar), if tracked.
            extras: More device scalars to carry (the noise scale's, on due steps).
        """
        scale = getattr(ctx.scaler, "_scale", None) if ctx.scaler is not None else None
        grad_scale = scale if ctx.grads_scaled else None
        tensor_norms = False
        if ctx.due:
            pending = self.engine.compute(layout, grad_scale, reduction)
        elif deferred:
            pending, tensor_norms = self.queue.guard(layout, grad_scale, reduction)
        else:
            pending = self.engine.guard(layout, grad_scale, reduction)
        if pending is None:
            return None
        add_extras(pending, scale, ctx.loss if ctx.due else None, first_bad)
        fold_loss(pending, ctx.loss)  # (a non-finite loss fails the step: birth.py)
        pending.extras |= extras
        meta = StepMeta(ctx.step, ctx.global_step, ctx.epoch, ctx.batch_idx, ctx.optimizer_idx)
        on_nonfinite = self.options.on_nonfinite
        arm = deferred and ctx.scaler is None and on_nonfinite in ("raise", "skip") and device_skip_supported(optimizer)
        live = None if deferred else LiveStep(layout, grad_scale, scale, ctx.loss, reduction, first_bad)
        entry = self.queue.launch(
            optimizer, pending, meta=meta, due=ctx.due, tensor_norms=tensor_norms, arm=arm, live=live,
            several=ctx.several, micro_batches=ctx.micro_batches, amp=ctx.scaler is not None, batches=ctx.batches,
        )  # fmt: skip
        if ctx.due and ctx.defer_publish:
            # The framework clips right after the hook; the clipped gradients stay on the parameters until the
            # next zero_grad, so the post-clip norm is taken at end_batch (:meth:`flush`) and the record waits.
            self.awaiting_clip[id(optimizer)] = (entry, layout)
        return entry

    def take(self) -> list[DeferredStep]:
        """Every deferred step still in flight, oldest first."""
        return self.queue.take()

    def read(self, entry: DeferredStep) -> tuple[float, StepStats | None, list[float]]:
        """``(total_norm, record, values)`` of a launched step.

        A step whose norm is non-finite comes with its full record (:meth:`failure_record`).
        """
        total, record, values = self.queue.read(entry)
        if record is None and not math.isfinite(total):
            record = self.failure_record(entry, values)
        return total, record, values

    def failure_record(self, entry: DeferredStep, values: list[float]) -> StepStats:
        """The full record of a guarded step that fails (rare).

        Exact counts while its gradients are still there, else its layers named from the per-tensor norms that were
        copied with it.
        """
        live = entry.live
        if live is None:
            return self.queue.failure_record(entry, values)
        full = self.engine.compute(live.layout, live.grad_scale, live.reduction)
        assert full is not None
        add_extras(full, live.scale, live.loss, live.first_bad)
        return self.engine.finish(full, entry.meta)

    def holds(self, entry: DeferredStep) -> bool:
        """Whether ``entry``'s record waits for the framework's clipping (published by :meth:`flush`)."""
        return any(waiting is entry for waiting, _ in self.awaiting_clip.values())

    def flush(self, reduction: Reduction, collectives: bool = True) -> list[tuple[StepStats, bool]]:
        """Take the post-clip norm of the steps the framework clipped; return the decided records to publish.

        The norm goes to the host with a deferred step (no sync); a step decided at once is returned now, as
        ``(record, several)``.
        """
        out: list[tuple[StepStats, bool]] = []
        while self.awaiting_clip:
            _, (entry, layout) = self.awaiting_clip.popitem()
            norm = self._post_clip_norm(layout, reduction) if collectives else None
            if entry.decided is None:  # deferred: the norm goes to the host with the step, no sync
                if norm is not None:
                    self.queue.post_clip(entry, norm)
                continue
            record = entry.decided  # decided at once: the clipped step's second transfer, now
            out.append((record if norm is None else replace(record, post_clip_norm=norm.item()), entry.several))
        return out

    def _post_clip_norm(self, layout: ParamLayout, reduction: Reduction) -> torch.Tensor | None:
        present = layout.with_grad()
        grads = stat_grads(layout, present)
        if not grads:
            return None
        params = [layout.params[i] for i in present]
        return self.engine.global_norm(grads, reduction, params=params)  # type: ignore[arg-type]

    def close(self) -> None:
        """Take back the device-skip flags."""
        self.queue.close()
