"""The product's core: gradient health for any training loop, in plain torch.

:class:`GradientHealth` does everything that happens at an optimizer step: statistics on due steps
(:mod:`~lightning_gradhealth.stats.engine`), the guard's decisions (:mod:`~lightning_gradhealth.guard.step`), the
watched set (:mod:`~lightning_gradhealth.model.watch`), alerts, the loggers and the history that the report is made from
(:mod:`~lightning_gradhealth.output.pipeline`). Front-ends only decide *when* and map their framework's state to a
:class:`StepContext`: ``GradientHealthMonitor`` for the Lightning ``Trainer``, and :meth:`GradientHealth.step` itself
for plain PyTorch and Lightning Fabric loops.
"""

from __future__ import annotations

import itertools
import statistics
import weakref
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.config.thresholds import Severity
from lightning_gradhealth.core.context import (
    DEFAULT_LOG_EVERY_N_STEPS,
    StepContext,
    check_step_call,
    checked_options,
    due,
    still_scaled,
)
from lightning_gradhealth.diagnosis.rules import EARLY, Finding
from lightning_gradhealth.diagnosis.safety import format_nonfinite_message
from lightning_gradhealth.guard.birth import Replay, Replays, fold_loss
from lightning_gradhealth.guard.deferred import DeferredGuard, DeferredStep, device_skip_supported, failure_note
from lightning_gradhealth.guard.step import Failure, StepGuard, StepOutcome
from lightning_gradhealth.model.distributed import Reduction, fsdp1_reduction
from lightning_gradhealth.model.frozen import training_facts
from lightning_gradhealth.model.inventory import ModelInventory, take_inventory, watch_feature_maps
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.model.watch import WatchChange, WatchedSet, some
from lightning_gradhealth.output.alerts import Alert, AlertManager
from lightning_gradhealth.output.pipeline import Frontend, Output
from lightning_gradhealth.schema import metrics
from lightning_gradhealth.schema.errors import TrainingHealthError
from lightning_gradhealth.schema.record import StepStats
from lightning_gradhealth.stats.activations import ActivationStats
from lightning_gradhealth.stats.engine import GradStatsEngine, NonFiniteTracker, PendingStats, StepMeta, stat_grads
from lightning_gradhealth.stats.loss import LossTracker
from lightning_gradhealth.stats.noise import batch_size_of
from lightning_gradhealth.stats.updates import Measures

__all__ = ["DEFAULT_LOG_EVERY_N_STEPS", "Frontend", "GradientHealth", "StepContext", "due"]

class GradientHealth:
    r"""Gradient health for a plain PyTorch or Lightning Fabric loop: the core of every front-end.

    Call :meth:`step` after the backward pass(es) and before ``optimizer.step()``, once per optimizer step. It takes
    the statistics on due steps (every ``log_every_n_steps``, 50 by default) with one device-to-host transfer, runs
    the guard on every step (non-finite gradients, spikes, threshold alerts, clipping), writes to the loggers and
    keeps the history that :meth:`close` turns into the report.

    Example::

        health = GradientHealth(model, loggers="runs/exp1", log_every_n_steps=10)
        for i, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            loss.backward()
            if health.step(optimizer, step=i):
                optimizer.step()
            optimizer.zero_grad()
        health.close()  # writes gradient_health_report.md/.json

    Logged metrics: the same keys as :class:`~lightning_gradhealth.frontends.lightning.GradientHealthMonitor`.

    Args:
        model: The model (a ``DistributedDataParallel`` or Fabric-wrapped model is unwrapped for names; DDP
            decisions are then agreed across ranks).
        loggers: Where the metrics go: a Lightning/Fabric logger (``TensorBoardLogger``, ``CSVLogger``, ...), a
            list of them, or a TensorBoard log directory path. ``None``: nowhere (read :attr:`last_record`).
        scaler: The ``torch.amp.GradScaler`` in use: its scale is divided out of gradients that are not unscaled
            yet, and its overflow steps are counted, not alarmed.
        options: A :class:`~lightning_gradhealth.config.options.HealthOptions` (instead of keyword arguments).
        **kwargs: The options, as for ``GradientHealthMonitor`` (``log_every_n_steps``, ``clip``, ...).

    Raises:
        TrainingHealthError: From :meth:`step`, when the run must stop (after logging the step, flushing the
            loggers and writing the report).
    """

    def __init__(
        self,
        model: nn.Module | None,
        *,
        loggers: Any = None,
        scaler: Any = None,
        options: HealthOptions | None = None,
        **kwargs: Any,
    ) -> None:
        self.options = checked_options(model, scaler, options, kwargs)
        self.guard = StepGuard(self.options)
        self.watched = WatchedSet(self.options)
        self.alerts = AlertManager(
            window=self.options.alert_window, on_alert=self.options.on_alert, verbose=self.options.verbose
        )
        self.engine = GradStatsEngine(
            norm_type=self.options.norm_type, stats=self.options.stats, per_layer=self.options.per_layer
        )
        self.output = Output(self.options)
        self.last_record: StepStats | None = None
        """The most recent record (on every rank), or ``None`` before the first computed step."""
        self._tracker = NonFiniteTracker()
        self._loss = LossTracker()  # every step's loss, summed up on the device (stats/loss.py)
        self._measures = Measures(self.options)  # update size, gradient cosine, noise scale (updates.py, noise.py)
        # where a failing step's NaN was born (birth.py); a deferred guard fails a step or two late: keep three
        self._replays = Replays(self.options.replay_nonfinite, keep=1 if self.options.guard_mode == "sync" else 3)
        self._deferred = DeferredGuard(self.engine)  # steps whose verdict is read one step late (guard_mode)
        self._clip_pending: dict[int, tuple[DeferredStep, ParamLayout]] = {}
        self._now = 0
        self.activations: ActivationStats | None = None
        """The activation statistics' hooks (``activation_stats_every_n_steps``), or ``None``."""
        self._awaiting_clip: dict[int, tuple[StepStats, ParamLayout, bool]] = {}
        self._optimizers: list[weakref.ReferenceType[Optimizer]] = []
        self._scaler = scaler
        self._steps = itertools.count()
        self._fsdp1_done = False
        self._run_steps = self._due_steps = 0  # optimizer steps of this run, and the computed ones
        self._closed = False
        self.model: nn.Module | None = None
        self.inventory: ModelInventory | None = None
        """What the model is made of (layer kinds, activations, norms, residual connections): rules and fixes read
        it. Taken when a run starts."""
        self._unwatch_maps: Callable[[], None] = lambda: None
        if model is not None:
            every = self.options.log_every_n_steps
            self.attach(Frontend.for_model(model, loggers, amp=scaler is not None, every=every), ddp=model)
            self.start()
            self.before_batch(0)
            self._replays.mark()  # (the RNG state the first step's replay restores; then after each step())

    # ------------------------------------------------------------------ public
    @property
    def findings(self) -> list[Finding]:
        """The findings of the last report (filled by :meth:`close`, or when failing fast)."""
        return self.output.findings

    @property
    def history(self) -> Any:
        """The run's :class:`~lightning_gradhealth.diagnosis.history.History`."""
        return self.output.history

    def attach(self, frontend: Frontend, optimizers: Sequence[Optimizer] = (), ddp: nn.Module | None = None) -> None:
        """Start a run on ``frontend.model`` (front-ends call this; ``GradientHealth(model, ...)`` does it itself).

        Per-run state is reset; counters, running statistics and the watched names survive (a resumed run compares
        against them). ``ddp``: the model's DDP wrapper, where the noise scale's communication hook goes (noise.py).

        Raises:
            ValueError: Nothing can be watched.
            UnsupportedSetupError: The model cannot be watched as set up.
        """
        names_model = self.model = frontend.model
        self.output.begin(frontend)
        self._measures.noise.watch_ddp(ddp, self.output.info)  # (DDP without accumulation: a communication hook)
        self.guard.rank, self.guard.frontend = frontend.rank, frontend.name
        self._loss.reset()
        self._awaiting_clip.clear()
        self._tracker.reset()
        self._fsdp1_done = self._closed = False
        self._run_steps = self._due_steps = 0
        self.watched.start(names_model, optimizers, resumed=self.guard.steps_seen > 0)
        self.inventory = take_inventory(names_model, self.options.group_by)
        self._unwatch_maps()
        self._unwatch_maps = watch_feature_maps(self.inventory, names_model)  # (one-shot hooks: the next forward)
        if self.watched.waiting:
            self.output.warn(
                f"{frontend.name} watches nothing yet: the parameters `include`/`exclude` select are all frozen "
                f"({some(self.watched.waiting)}); they are watched once they are unfrozen."
            )
        if self.options.activation_stats_every_n_steps is not None:
            self.activations = ActivationStats(names_model)

    def start(self) -> None:
        """When training starts: the model's inventory next to the logs, TensorBoard's layout (front-ends call it)."""
        self.output.start(self.inventory)

    def after_backward(self) -> None:
        """Under accumulation, call after each backward pass.

        Notes on the device, with no sync, whether this micro-batch made the gradient non-finite, so that a failing
        step names it.
        """
        if self.model is None:
            return
        self._tracker.observe(self.watched.model_layout)
        self._measures.after_backward(self.watched.model_layout, self._tracker.micro_batches)

    def step(
        self,
        optimizer: Optimizer,
        *,
        step: int | None = None,
        loss: torch.Tensor | float | None = None,
        epoch: int = 0,
        batch: Any = None,
        replay: Replay | None = None,
    ) -> bool:
        """Check, measure, decide and clip, on this optimizer step's gradient. Call before ``optimizer.step()``.

        Args:
            optimizer: The optimizer about to step.
            step: The loggers' x-axis value; default: the count of calls so far (from 0).
            loss: The step's training loss (unscaled; under accumulation the mean over micro-batches). Read on
                computed steps, in the statistics' one transfer (no extra sync), for the divergence diagnosis.
            epoch: The epoch, for messages and the record.
            batch: The step's batch, saved with a spike when ``spike_dir`` is set; its first tensor's first dimension is
                the micro-batch size that the noise scale needs (unless ``micro_batch_size`` is given).
            replay: Recomputes this step's loss (``lambda: loss_fn(model(x), y)``), called only if the step fails, to
                find where its NaN was born; the RNG state of the step's start is restored first. Under accumulation,
                a list of ``(callable, lightning_gradhealth.guard.birth.rng_state())``, one per micro-batch.

        Returns:
            ``True`` to go ahead with ``optimizer.step()``; ``False`` when the update was skipped (the gradients
            were set to ``None``, so ``optimizer.step()`` leaves the weights alone).

        Raises:
            TrainingHealthError: The run must stop.
        """
        check_step_call(self.model, optimizer, step)
        count = next(self._steps)
        step = count if step is None else step
        known = [opt for ref in self._optimizers if (opt := ref()) is not None]
        if all(opt is not optimizer for opt in known):
            self._optimizers.append(weakref.ref(optimizer))
            known.append(optimizer)
            if self.watched.names is not None and count < len(known) + 1:
                self.watched.rebuild(known)  # a loop's optimizers show up one by one at the start: not a change
        scaler = self._scaler if self._scaler is not None and self._scaler.is_enabled() else None
        is_due = due(step, self.output.frontend.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS)
        ctx = StepContext(
            step=step,
            due=is_due,
            global_step=count,
            epoch=epoch,
            batch_idx=step,
            optimizer_idx=next(i for i, opt in enumerate(known) if opt is optimizer),
            several=len(known) > 1,
            scaler=scaler,
            grads_scaled=scaler is not None and still_scaled(scaler, optimizer),
            micro_batches=self._tracker.micro_batches > 1,
            batches=() if batch is None else (batch,),
            loss=loss,
            replay=replay,
            micro_batch_size=batch_size_of(batch) if self.options.noise_scale and is_due else None,
        )
        go = self.on_step(optimizer, ctx, known) if self.before_step(ctx.step, ctx.due, loss) else True
        self.end_batch()
        self._replays.mark()  # the next step's forward comes next (a front-end's replays carry their own states)
        if self.activations is not None and due(step + 1, self.options.activation_stats_every_n_steps):
            self.activations.attach()  # for the next step's forward pass
        return go

    def close(self) -> None:
        """Write anything still buffered, then the report (on rank zero). Idempotent per run."""
        if self._closed:
            return
        self._closed = True
        self._unwatch_maps()  # (feature-map hooks of a model that never ran forward)
        self._flush_pending()
        try:
            self._drain()  # the last steps' verdicts (may raise TrainingHealthError: the run's last step failed)
        finally:
            self._deferred.close()
        self.guard.resolve_clip_count()
        self.output.emit()
        if self.output.history.records_seen:
            self._facts()
            self.output.write_report(self.watched.sparse_layers, self.inventory)
        else:
            self.output.no_report(self._due_steps, self._run_steps)
        self.output.flush()  # a loop's loggers buffer (CSV) or queue (TensorBoard): on disk once closed

    def abort(self) -> None:
        """On an exception: write what was computed before it, so that nothing already measured is lost."""
        if self.activations is not None:
            self.activations.detach()
        try:
            # sharded: no collective here (the other ranks may not be failing), so no post-clip norm either
            self._flush_pending(collectives=not self.output.frontend.sharded)
            self._drain(act=False)  # what was measured is logged; the run is ending on its own exception
        finally:
            self._deferred.close()
            self.output.emit()

    def __enter__(self) -> GradientHealth:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        elif not isinstance(exc, TrainingHealthError):  # (that one already logged, flushed and reported)
            self.abort()
            self.output.flush()  # the exception may end the process: what was measured must be on disk

    # ------------------------------------------------------------------ front-end hooks
    def before_batch(self, step: int) -> None:
        """Before a batch's forward pass: attach the activation hooks when that step is sampled."""
        if self.activations is not None and due(step, self.options.activation_stats_every_n_steps):
            self.activations.attach()

    def end_batch(self) -> None:
        """After the optimizer step: publish deferred records (post-clip norm) and write the loggers."""
        self._flush_pending()
        self.output.emit()

    def check_watched(self, optimizers: Sequence[Optimizer], step: int) -> None:
        """Look for parameters frozen, unfrozen or replaced anywhere in the model (one pass over them)."""
        self._changed(self.watched.check(optimizers), step)

    def before_step(self, step: int, due: bool, loss: torch.Tensor | float | None = None) -> bool:
        """The start of every optimizer step; returns whether anything is to be done at it.

        ``loss``: the step's training loss (unscaled), kept in a device-side running summary (one copy, no sync).
        A step that is not due, with no guard, clipping or spike detection, stops here: it runs no other torch
        operation.
        """
        self._loss.observe(loss)
        self._run_steps += 1
        self._due_steps += bool(due)
        self._now = step
        self._before_update(step)
        self._flush_pending()
        self._drain()  # the previous step's verdict, read without blocking: it finished long ago on the device
        if self.activations is not None and self.activations.attached:
            self._read_activations(step)
        if due or self.options.guards_every_step:
            return True
        self._end_step(True)
        return False

    def on_step(self, optimizer: Optimizer, ctx: StepContext, optimizers: Sequence[Optimizer]) -> bool:
        """The optimizer step described by ``ctx``, once :meth:`before_step` said there is something to do.

        What :meth:`step` and the callback's hook both run.

        Returns:
            Whether the update goes ahead.
        """
        if ctx.due:
            self.check_watched(optimizers, ctx.step)
            self._loss.note_lr(ctx.step, optimizer)
        layout, change = self.watched.layout_for(optimizer, optimizers)
        self._changed(change, ctx.step)
        scale = getattr(ctx.scaler, "_scale", None) if ctx.scaler is not None else None
        grad_scale = scale if ctx.grads_scaled else None
        red = self._reduction()
        self._before_decide(ctx, layout)
        if self._defers(optimizer, ctx, layout):
            return self._deferred_step(optimizer, ctx, layout, grad_scale, scale, red)
        pending = (
            self.engine.compute(layout, grad_scale, red) if ctx.due else self.engine.guard(layout, grad_scale, red)
        )
        if pending is None:
            self._nothing_to_watch(layout)
            return self._end_step(True)
        meta = self._launched(pending, scale, ctx)
        record = self.engine.finish(pending, meta) if ctx.due else None
        self._measures.landed(ctx.step, ctx.optimizer_idx, pending.host_extras)
        record = self._with_loss(record, pending.host_extras)
        total = record.total_norm if record is not None else self.engine.read_guard(pending)[0]
        self.output.visuals(layout, grad_scale, meta.step, record, red)

        def full_record() -> StepStats:
            # a guarded step that fails gets the full statistics with exact counts (rare: extra transfers)
            if record is not None:
                return record
            full = self.engine.compute(layout, grad_scale, red)
            assert full is not None
            self._add_extras(full, scale, ctx.loss)
            return self.engine.finish(full, meta)

        outcome = self.guard.decide(
            total,
            meta,
            record,
            full_record,
            amp=ctx.scaler is not None,
            sparse_layers=self.watched.sparse_layers,
            inventory=self.inventory,
            batches=ctx.batches,
            clip=lambda: self.guard.clip(layout, grad_scale, total, ctx.due, red),
        )
        self._act_on(outcome, optimizer, ctx, layout)
        return self._end_step(outcome.go_ahead)

    # ------------------------------------------------------------------ the sync-free guard (deferred.py)
    def _defers(self, optimizer: Optimizer, ctx: StepContext, layout: ParamLayout) -> bool:
        """Whether this step's verdict is read one step late, without a host sync (``guard_mode``)."""
        clipping = self.guard.clipper is not None
        deferred, why = self._deferred.wants(optimizer, self.options, layout, clipping, ctx.scaler)
        if why is not None:
            self.output.info(f"{self.output.frontend.name}: guard_mode='deferred' checks synchronously here: {why}.")
        return deferred

    def _deferred_step(
        self,
        optimizer: Optimizer,
        ctx: StepContext,
        layout: ParamLayout,
        grad_scale: torch.Tensor | None,
        scale: torch.Tensor | None,
        red: Reduction,
    ) -> bool:
        """Launch the step's statistics (or guard) and their non-blocking copy; the verdict is read next step."""
        tensor_norms = False
        if ctx.due:
            pending = self.engine.compute(layout, grad_scale, red)
        else:
            pending, tensor_norms = self._deferred.guard(layout, grad_scale, red)
        if pending is None:
            self._nothing_to_watch(layout)
            return self._end_step(True)
        meta = self._launched(pending, scale, ctx)
        self.output.visuals(layout, grad_scale, meta.step, None, red)  # (histograms: pre-update)
        arm = ctx.scaler is None and self.options.on_nonfinite in ("raise", "skip") and device_skip_supported(optimizer)
        entry = self._deferred.launch(
            optimizer, pending, meta=meta, due=ctx.due, tensor_norms=tensor_norms, arm=arm, several=ctx.several,
            micro_batches=ctx.micro_batches, amp=ctx.scaler is not None, batches=ctx.batches,
        )  # fmt: skip
        if ctx.due and ctx.defer_publish:
            self._clip_pending[id(optimizer)] = (entry, layout)
        return self._end_step(True)

    def _drain(self, act: bool = True) -> None:
        """Read the steps in flight and decide on them, oldest first (every rank at the same step: no collective)."""
        for entry in self._deferred.take():
            total, record, values = self._deferred.read(entry)
            self._measures.landed(entry.meta.step, entry.meta.optimizer_idx, entry.pending.host_extras)
            record = self._with_loss(record, entry.pending.host_extras)
            outcome = self.guard.decide(
                total,
                entry.meta,
                record,
                lambda r=record, e=entry, v=values: r or self._deferred.failure_record(e, v),  # type: ignore[misc]
                amp=entry.amp,
                sparse_layers=self.watched.sparse_layers,
                inventory=self.inventory,
                batches=entry.batches,
            )
            note = failure_note(entry, self._now) if act else None  # (no raise: the run ends on its own exception)
            self._announce(outcome, entry.meta.step, entry.micro_batches, entry.several, note)
            if record is not None:
                self.output.figure(record)
            if outcome.record is not None:
                self._publish(outcome.record, entry.several)

    # ------------------------------------------------------------------ update size, noise scale, NaN birthplace
    def _before_update(self, step: int) -> None:
        """Every step's start: snapshots for update size and gradient cosine when the next step is due."""
        every = self.output.frontend.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS
        self._measures.before(step, self.watched.model_layout, due(step + 1, every))

    def _before_decide(self, ctx: StepContext, layout: ParamLayout) -> None:
        """Before the guard decides (and clips): keep the step's replay; on due steps launch the extra measures."""
        self._replays.add(ctx.step, ctx.replay)
        if ctx.due:
            self._measures.launch(layout, ctx, self.output.frontend, self._tracker.micro_batches)

    # ------------------------------------------------------------------ internals
    def _announce(
        self, outcome: StepOutcome, step: int, micro_batches: bool, several: bool, note: str | None = ""
    ) -> None:
        """A decided step's spike, alerts and failure (raises unless ``note is None``), decided now or a step late."""
        if outcome.spike is not None:
            self.output.history.add_spike(step, outcome.spike)
        self.alerts.emit_step(outcome.alerts, rank_zero=self.output.frontend.rank_zero)
        if outcome.failure is not None and note is not None:
            assert outcome.record is not None
            self._fail(outcome.record, outcome.failure, micro_batches, several, note)

    def _act_on(self, outcome: StepOutcome, optimizer: Optimizer, ctx: StepContext, layout: ParamLayout) -> None:
        self._announce(outcome, ctx.step, ctx.micro_batches, ctx.several)
        if outcome.skip:
            for group in optimizer.param_groups:  # all of the optimizer's parameters, watched or not
                for p in group["params"]:
                    p.grad = None
        if outcome.record is not None:
            if ctx.defer_publish:
                # The framework clips right after this call; the clipped gradients stay on the parameters until
                # the next zero_grad, so the post-clip norm is read at end_batch.
                self._awaiting_clip[id(optimizer)] = (outcome.record, layout, ctx.several)
            else:
                self._publish(outcome.record, ctx.several)

    def _changed(self, change: WatchChange | None, step: int) -> None:
        """Announce a change of the watched set; restart what depended on the old set."""
        if change is None:
            return
        restarted = self.guard.reset()
        name = self.output.frontend.name
        self.output.info(change.announcement(name, step, restarted))
        warning = change.ddp_warning(name) if self.output.frontend.ddp else None
        if warning is not None:
            self.output.warn(warning)

    def _nothing_to_watch(self, layout: ParamLayout) -> None:
        self.output.nothing_to_watch(bool(len(layout)))

    def _reduction(self) -> Reduction:
        frontend = self.output.frontend
        if not self._fsdp1_done and frontend.fsdp1_root is not None:
            frontend.reduction = fsdp1_reduction(frontend.fsdp1_root())
            self._fsdp1_done = True
        return frontend.reduction

    def _add_extras(self, pending: PendingStats, scale: torch.Tensor | None, loss: torch.Tensor | float | None) -> None:
        if scale is not None:
            pending.extras["amp_scale"] = scale
        if loss is not None:
            value = torch.as_tensor(loss).detach().reshape(())
            device = pending.packed.device
            pending.extras["loss"] = value if value.device == device else value.to(device)  # (a plain float)
        if self._tracker.first_bad is not None:
            pending.extras["first_nonfinite_micro_batch"] = self._tracker.first_bad
        # else: a single micro-batch; the engine reports micro-batch 0 for a non-finite step

    def _launched(self, pending: PendingStats, scale: torch.Tensor | None, ctx: StepContext) -> StepMeta:
        """What rides with a launched step's values (loss, scale, the noise scale's); where the step is."""
        self._add_extras(pending, scale, ctx.loss if ctx.due else None)
        fold_loss(pending, ctx.loss)  # (a non-finite loss fails the step: birth.py)
        pending.extras |= self._measures.extras(ctx.step, ctx.optimizer_idx)  # (the noise scale's, on due steps)
        if ctx.due:
            pending.extras |= self._loss.extras(ctx.step)  # (every step's loss since the last due step, reduced)
        return StepMeta(ctx.step, ctx.global_step, ctx.epoch, ctx.batch_idx, ctx.optimizer_idx)

    def _with_loss(self, record: StepStats | None, host_extras: dict[str, float]) -> StepStats | None:
        """A computed step's record with its loss summary and learning rate (stats/loss.py)."""
        if record is None:
            return None
        self._loss.landed(record.step, host_extras)
        return self._loss.apply(record)

    def _facts(self) -> None:
        """Before a report: what the loss is judged against (frozen parts, classes) and the front-end's name."""
        self.output.history.facts = training_facts(self.model, self.output.frontend.name, self._loss.optimizer)
        self.output.history.alerts_raised = self.alerts.total
        early = self.guard.early_norms  # the growth baseline, measured once (the guard's first steps)
        self.output.history.early_norm = statistics.median(early) if len(early) == EARLY else None

    def _end_step(self, go: bool) -> bool:
        self._tracker.reset()
        return go

    def _read_activations(self, step: int) -> None:
        assert self.activations is not None
        self.activations.detach()
        stats = self.activations.read()  # collective under DDP: every rank reads
        self.output.add_activations(step, stats)

    def _flush_pending(self, collectives: bool = True) -> None:
        """Take the post-clip norm of the steps the framework clipped (after :meth:`on_step`) and publish them."""
        while self._clip_pending:  # deferred: the post-clip norm goes to the host with the step, no sync
            _, (entry, layout) = self._clip_pending.popitem()
            if collectives and (norm := self._post_clip_norm(layout)) is not None:
                self._deferred.post_clip(entry, norm)
        while self._awaiting_clip:
            _, (record, layout, several) = self._awaiting_clip.popitem()
            if collectives and (norm := self._post_clip_norm(layout)) is not None:
                record = replace(record, post_clip_norm=norm.item())  # the second transfer of a clipped step
            self._publish(record, several)

    def _post_clip_norm(self, layout: ParamLayout) -> torch.Tensor | None:
        present = layout.with_grad()
        grads = stat_grads(layout, present)
        if not grads:
            return None
        params = [layout.params[i] for i in present]
        return self.engine.global_norm(grads, self.output.frontend.reduction, params=params)  # type: ignore[arg-type]

    def _publish(self, record: StepStats, several: bool) -> None:
        record = self._measures.apply(record)  # (update size, gradient cosine, noise scale launched at its step)
        self.last_record = record
        counters = {metrics.ALERTS: float(self.alerts.total), **self.guard.counters(self.output.frontend.amp)}
        self.output.publish(record, several, counters)

    def _fail(self, record: StepStats, failure: Failure, micro_batches: bool, several: bool, note: str = "") -> None:
        """Log the step, flush the loggers, write the report, raise :class:`TrainingHealthError`."""
        record = self._replays.birth(record, self.model, self.output.frontend.sharded)  # type: ignore[arg-type]
        message = format_nonfinite_message(record, failure.reason, micro_batches=micro_batches, note=note)
        first = message.splitlines()[0]
        alert = Alert(kind=failure.kind, severity=Severity.CRITICAL, step=record.step, epoch=record.epoch,
                      batch_idx=record.batch_idx, message=first)  # fmt: skip
        self.alerts(alert, rank_zero=self.output.frontend.rank_zero)
        self._publish(record, several)
        self.output.emit()
        self._facts()
        self.output.write_report(self.watched.sparse_layers, self.inventory)
        self.output.flush()
        self._closed = True  # (the report is written: a close() in a finally adds nothing)
        raise TrainingHealthError(
            message, record=record, step=record.step, layers=[lay.name for lay in record.nonfinite_layers]
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """All running state, so that a resumed run makes the same decisions as an uninterrupted one."""
        self._drain()  # (the steps in flight count)
        return {
            **self.guard.state_dict(),
            "warned": sorted(self.output.warned),
            "alerts": self.alerts.state_dict(),
            "watched": self.watched.state_dict(),
            "noise_scale": self._measures.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.output.warned = set(state_dict.get("warned", ()))
        self.watched.load_state_dict(state_dict.get("watched"))
        self.alerts.load_state_dict(state_dict.get("alerts") or {})
        self._measures.load_state_dict(state_dict.get("noise_scale"))
        warning = self.guard.load_state_dict(state_dict)
        if warning is not None:
            self.output.warn(warning)
