"""The pipeline of one optimizer step, shared by every front-end, in plain torch.

:class:`StepPipeline` does everything that happens at an optimizer step: statistics on due steps
(:mod:`~lightning_gradhealth.stats.engine`), the guard's decisions (:mod:`~lightning_gradhealth.guard.step`), the
watched set (:mod:`~lightning_gradhealth.model.watch`), alerts, the loggers and the history that the report is made from
(:mod:`~lightning_gradhealth.output.pipeline`). Front-ends drive it through the calls of
:mod:`~lightning_gradhealth.core.contract` and only decide *when* and map their framework's state to a
:class:`~lightning_gradhealth.core.context.StepContext`: ``GradientHealthMonitor`` for the Lightning ``Trainer``,
and :class:`~lightning_gradhealth.core.health.GradientHealth` (whose :meth:`step` is the plain and Fabric loops'
front-end).
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.config.thresholds import Severity
from lightning_gradhealth.core.context import (
    DEFAULT_LOG_EVERY_N_STEPS,
    StepContext,
    due,
)
from lightning_gradhealth.core.inflight import StepsInFlight
from lightning_gradhealth.diagnosis.rules import EARLY, Finding
from lightning_gradhealth.diagnosis.safety import format_nonfinite_message
from lightning_gradhealth.guard.birth import Replays
from lightning_gradhealth.guard.deferred import DeferredStep, failure_note
from lightning_gradhealth.guard.recovery import RecoveryGuard
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
from lightning_gradhealth.stats.engine import GradStatsEngine, NonFiniteTracker
from lightning_gradhealth.stats.loss import LossTracker
from lightning_gradhealth.stats.updates import Measures

if TYPE_CHECKING:
    from lightning_gradhealth.stats.activations import ActivationStats

__all__ = ["StepPipeline"]

class StepPipeline:
    """The pipeline of one optimizer step (see the module docstring); the base of every front-end's core.

    Args:
        options: The validated options.
        scaler: The ``torch.amp.GradScaler`` in use, restored by a rollback (``recover=``).
        schedulers: The LR schedulers in use, restored by a rollback (``recover=``).
    """

    def __init__(self, options: HealthOptions, *, scaler: Any = None, schedulers: Sequence[Any] = ()) -> None:
        self.options = options
        self.guard = StepGuard(self.options)
        self.recovery = None if (rec := self.options.recovery) is None else RecoveryGuard(rec, self.guard)
        """Recovery without a restart (``recover=``: :mod:`~lightning_gradhealth.guard.recovery`), or ``None``."""
        if self.recovery is not None:
            self.recovery.bind(schedulers, scaler)
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
        self._inflight = StepsInFlight(self.engine, self.options)  # read at once (sync) or a step late (deferred)
        self._now = 0
        self.activations: ActivationStats | None = None
        """The activation statistics' hooks (``activation_stats_every_n_steps``), or ``None``."""
        self._fsdp1_done = False
        self._run_steps = self._due_steps = 0  # optimizer steps of this run, and the computed ones
        self._closed = False
        self.model: nn.Module | None = None
        self.inventory: ModelInventory | None = None
        """What the model is made of (layer kinds, activations, norms, residual connections): rules and fixes read
        it. Taken when a run starts."""
        self._unwatch_maps: Callable[[], None] = lambda: None


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
        if self.recovery is not None:
            self.recovery.start(names_model)
            self.output.history.rollbacks = self.recovery.events
        self._measures.noise.watch_ddp(ddp, self.output.info)  # (DDP without accumulation: a communication hook)
        self.guard.begin(frontend.rank, frontend.name)
        self._loss.reset()
        self._inflight.awaiting_clip.clear()
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
            from lightning_gradhealth.stats.activations import ActivationStats  # (torchmetrics: only when used)

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
            self._inflight.close()
        self.guard.resolve_clip_count()
        self.output.emit()
        if self.output.history.records_seen:
            self._facts()
            self.output.write_report(self.watched.sparse_layers, self.inventory)
        else:
            self.output.no_report(self._due_steps, self._run_steps)
        self.output.flush()  # a loop's loggers buffer (CSV) or queue (TensorBoard): on disk once closed
        self.output.close_loggers()

    def abort(self) -> None:
        """On an exception: write what was computed before it, so that nothing already measured is lost."""
        if self.activations is not None:
            self.activations.detach()
        try:
            # sharded: no collective here (the other ranks may not be failing), so no post-clip norm either
            self._flush_pending(collectives=not self.output.frontend.sharded)
            self._drain(act=False)  # what was measured is logged; the run is ending on its own exception
        finally:
            self._inflight.close()
            self.output.emit()

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
        if due or self.options.guards_every_step:  # (with every per-step feature off: no torch op at all)
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

        What :meth:`step` and the callback's hook both run. There is one decision path: the step's values are
        launched into the one queue of steps in flight (:class:`~lightning_gradhealth.core.inflight.StepsInFlight`);
        a synchronous step is read and decided at once (:meth:`_decide`), a deferred one at the next step's start
        (:meth:`_drain`), by the same code.

        Returns:
            Whether the update goes ahead.
        """
        if ctx.due:
            self.check_watched(optimizers, ctx.step)
            self._loss.note_lr(ctx.step, optimizer)
        layout, change = self.watched.layout_for(optimizer, optimizers)
        self._changed(change, ctx.step)
        self._before_decide(ctx, layout)
        deferred, why = self._inflight.defers(optimizer, ctx, layout, clipping=self.guard.clipper is not None)
        deferred = deferred and self.recovery is None  # (recovery decides before the update)
        if why is not None:
            self.output.info(f"{self.output.frontend.name}: guard_mode='deferred' checks synchronously here: {why}.")
        red = self._reduction()
        entry = self._inflight.launch(
            optimizer, ctx, layout, deferred=deferred, reduction=red, first_bad=self._tracker.first_bad,
            extras=self._measures.extras(ctx.step, ctx.optimizer_idx)  # (the noise scale's, on due steps)
            | (self._loss.extras(ctx.step) if ctx.due else {}),  # (every step's loss since the last due step)
        )  # fmt: skip
        if entry is None:
            self._nothing_to_watch(layout)
            return self._end_step(True)
        self.output.visuals(layout, entry.pending.grad_scale, ctx.step, None, red)  # (histograms: pre-update, pre-clip)
        if deferred:
            return self._end_step(True)  # decided at the next step's start, with no host sync
        outcome = self._decide(entry, optimizers=(optimizer, optimizers))
        if outcome.skip:
            for group in optimizer.param_groups:  # all of the optimizer's parameters, watched or not
                for p in group["params"]:
                    p.grad = None
        return self._end_step(outcome.go_ahead)

    def _drain(self, act: bool = True) -> None:
        """Read the steps in flight and decide on them, oldest first (every rank at the same step: no collective)."""
        for entry in self._inflight.take():
            self._decide(entry, note=failure_note(entry, self._now) if act else None)

    def _decide(
        self,
        entry: DeferredStep,
        note: str | None = "",
        optimizers: tuple[Optimizer, Sequence[Optimizer]] | None = None,
    ) -> StepOutcome:
        """Read a launched step, let the guard decide, clip, announce and publish (raises on a failure).

        ``note``: what a late read adds to a failure message; ``None``: no raise (the run ends on its own
        exception). ``optimizers``: the step's optimizer and all of them, for a step decided at once (recovery).
        """
        total, record, values = self._inflight.read(entry)
        self._measures.landed(entry.meta.step, entry.meta.optimizer_idx, entry.pending.host_extras)
        if entry.due:  # (a computed step's record carries the loss summary; a failing guarded step's does not)
            record = self._with_loss(record, entry.pending.host_extras)
        outcome = self.guard.decide(
            total,
            entry.meta,
            record,
            amp=entry.amp,
            sparse_layers=self.watched.sparse_layers,
            inventory=self.inventory,
            batches=entry.batches,
        )
        if self.recovery is not None and entry.live is not None and optimizers is not None:
            line = self.recovery.review(  # may turn the outcome into a rollback (restores the state, skips)
                outcome, total, entry.meta.step, entry.live.loss, optimizers[0], optimizers[1], amp=entry.amp
            )
            if line is not None:
                self.output.info(f"{self.output.frontend.name}: {line}")
        if outcome.failure is not None and outcome.record is None:
            outcome.record = self._inflight.failure_record(entry, values)
        if outcome.clip_wanted and outcome.go_ahead and entry.live is not None:
            live = entry.live
            outcome.clip = self.guard.clip(live.layout, live.grad_scale, total, entry.due, live.reduction)
        self._announce(outcome, entry.meta.step, entry.micro_batches, entry.several, note)
        if record is not None:
            self.output.figure(record, outcome.alerts)  # (coloured by this step's grading: nothing graded twice)
        if outcome.record is not None:
            if self._inflight.holds(entry):
                entry.decided = outcome.record  # published with its post-clip norm at end_batch
            else:
                self._publish(outcome.record, entry.several)
        return outcome

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
        if self.options.pipeline_group is not None and frontend.reduction.stage_group is None:  # (pipeline stages)
            frontend.reduction = dataclasses.replace(frontend.reduction, stage_group=self.options.pipeline_group)
        return frontend.reduction

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
        """Publish the records that waited for the framework's clipping, with their post-clip norm."""
        for record, several in self._inflight.flush(self.output.frontend.reduction, collectives):
            self._publish(record, several)

    def _publish(self, record: StepStats, several: bool) -> None:
        record = self._measures.apply(record)  # (update size, gradient cosine, noise scale launched at its step)
        self.last_record = record
        counters = {metrics.ALERTS: float(self.alerts.total), **self.guard.counters(self.output.frontend.amp)}
        counters |= self.recovery.counters() if self.recovery is not None else {}
        self.output.publish(record, several, counters)

    def _fail(self, record: StepStats, failure: Failure, micro_batches: bool, several: bool, note: str = "") -> None:
        """Log the step, flush the loggers, write the report, raise :class:`TrainingHealthError`."""
        sharded = self.output.frontend.sharded or self.options.pipeline_group is not None  # (no replay of one rank)
        record = self._replays.birth(record, self.model, sharded)  # type: ignore[arg-type]
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
            **({"recovery": self.recovery.state_dict()} if self.recovery is not None else {}),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.output.warned = set(state_dict.get("warned", ()))
        self.watched.load_state_dict(state_dict.get("watched"))
        self.alerts.load_state_dict(state_dict.get("alerts") or {})
        self._measures.load_state_dict(state_dict.get("noise_scale"))
        if self.recovery is not None:
            self.recovery.load_state_dict(state_dict.get("recovery"))
        warning = self.guard.load_state_dict(state_dict)
        if warning is not None:
            self.output.warn(warning)
