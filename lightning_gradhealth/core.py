"""The product's core: gradient health for any training loop, in plain torch.

:class:`GradientHealth` does everything that happens at an optimizer step: statistics on due steps
(:mod:`~lightning_gradhealth.engine`), the guard's decisions (:mod:`~lightning_gradhealth.guard`), the watched set
(:mod:`~lightning_gradhealth.watch`), alerts, the loggers and the history that the report is made from
(:mod:`~lightning_gradhealth.output`). Front-ends only decide *when* and map their framework's state to a
:class:`StepContext`: ``GradientHealthMonitor`` for the Lightning ``Trainer``, and :meth:`GradientHealth.step` itself
for plain PyTorch and Lightning Fabric loops.
"""

from __future__ import annotations

import difflib
import itertools
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth import metrics
from lightning_gradhealth.activations import ActivationStats
from lightning_gradhealth.alerts import Alert, AlertManager
from lightning_gradhealth.distributed import Reduction, fsdp1_reduction
from lightning_gradhealth.engine import GradStatsEngine, NonFiniteTracker, PendingStats, StepMeta, stat_grads
from lightning_gradhealth.errors import TrainingHealthError
from lightning_gradhealth.guard import Failure, StepGuard, StepOutcome
from lightning_gradhealth.inventory import ModelInventory, take_inventory, watch_feature_maps
from lightning_gradhealth.layout import ParamLayout
from lightning_gradhealth.options import HealthOptions
from lightning_gradhealth.output import Frontend, Output
from lightning_gradhealth.record import StepStats
from lightning_gradhealth.rules import Finding
from lightning_gradhealth.safety import format_nonfinite_message
from lightning_gradhealth.thresholds import Severity
from lightning_gradhealth.watch import WatchChange, WatchedSet, some

__all__ = ["Frontend", "GradientHealth", "StepContext"]

#: ``log_every_n_steps`` when a loop does not say (Lightning's default).
DEFAULT_LOG_EVERY_N_STEPS = 50


@dataclass(frozen=True)
class StepContext:
    """A front-end's view of one optimizer step.

    Attributes:
        step: The loggers' x-axis value (counts optimizer steps).
        due: Whether this step is computed and logged.
        global_step: The framework's global step, for messages.
        epoch: The epoch.
        batch_idx: The batch that triggered the step (the last micro-batch under accumulation).
        optimizer_idx: The optimizer's index (keys get ``/opt<index>`` when ``several``).
        several: Whether the run has several optimizers.
        scaler: The active GradScaler, if any.
        grads_scaled: Whether the gradients still hold the scaler's loss scale (not yet unscaled).
        micro_batches: Whether the step accumulates several backward passes (messages name the first bad one).
        defer_publish: The framework clips the gradients after this call: the record is published at
            :meth:`GradientHealth.end_batch`, with the post-clip norm.
        batches: The step's batches, saved with a spike when ``spike_dir`` is set.
        loss: The step's training loss (a device scalar, unscaled; the mean over micro-batches), read on computed
            steps with the statistics' one transfer.
    """

    step: int
    due: bool
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    optimizer_idx: int = 0
    several: bool = False
    scaler: Any = None
    grads_scaled: bool = False
    micro_batches: bool = False
    defer_publish: bool = False
    batches: Sequence[Any] = ()
    loss: torch.Tensor | float | None = None


def due(step: int, every: int | None) -> bool:
    """Whether logging step ``step`` is one of every ``every`` steps (Lightning's schedule)."""
    return every is not None and every > 0 and (step + 1) % every == 0


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

    Logged metrics: the same keys as :class:`~lightning_gradhealth.callback.GradientHealthMonitor`.

    Args:
        model: The model (a ``DistributedDataParallel`` or Fabric-wrapped model is unwrapped for names; DDP
            decisions are then agreed across ranks).
        loggers: Where the metrics go: a Lightning/Fabric logger (``TensorBoardLogger``, ``CSVLogger``, ...), a
            list of them, or a TensorBoard log directory path. ``None``: nowhere (read :attr:`last_record`).
        scaler: The ``torch.amp.GradScaler`` in use: its scale is divided out of gradients that are not unscaled
            yet, and its overflow steps are counted, not alarmed.
        options: A :class:`~lightning_gradhealth.options.HealthOptions` (instead of keyword arguments).
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
        if options is not None and kwargs:
            raise TypeError(f"Give `options` or keyword options, not both; got `options` and {sorted(kwargs)}.")
        if options is not None and not isinstance(options, HealthOptions):
            raise TypeError(f"`options` must be a lightning_gradhealth.HealthOptions or None, got {options!r}.")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
        if scaler is not None and not (callable(getattr(scaler, "is_enabled", None)) and hasattr(scaler, "scale")):
            raise TypeError(f"`scaler` must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}.")
        unknown = sorted(set(kwargs) - set(HealthOptions.names()))
        if unknown:
            close = {name: difflib.get_close_matches(name, HealthOptions.names(), n=1) for name in unknown}
            hints = "; ".join(f"`{n}`" + (f" (did you mean `{c[0]}`?)" if c else "") for n, c in close.items())
            raise TypeError(f"GradientHealth got unknown option(s): {hints}. The options are those of HealthOptions.")
        self.options = options if options is not None else HealthOptions(**kwargs)
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
            self.attach(Frontend.for_model(model, loggers, amp=scaler is not None, every=every))
            self.start()
            self.before_batch(0)

    # ------------------------------------------------------------------ public
    @property
    def findings(self) -> list[Finding]:
        """The findings of the last report (filled by :meth:`close`, or when failing fast)."""
        return self.output.findings

    @property
    def history(self) -> Any:
        """The run's :class:`~lightning_gradhealth.history.History`."""
        return self.output.history

    def attach(self, frontend: Frontend, optimizers: Sequence[Optimizer] = ()) -> None:
        """Start a run on ``frontend.model`` (front-ends call this; ``GradientHealth(model, ...)`` does it itself).

        Per-run state is reset; counters, running statistics and the watched names survive (a resumed run
        compares against them).

        Raises:
            ValueError: Nothing can be watched.
            UnsupportedSetupError: The model cannot be watched as set up.
        """
        names_model = self.model = frontend.model
        self.output.begin(frontend)
        self.guard.rank = frontend.rank
        self._awaiting_clip.clear()
        self._tracker.reset()
        self._fsdp1_done = False
        self._run_steps = self._due_steps = 0
        self._closed = False
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

    def step(
        self,
        optimizer: Optimizer,
        *,
        step: int | None = None,
        loss: torch.Tensor | float | None = None,
        epoch: int = 0,
        batch: Any = None,
    ) -> bool:
        """Check, measure, decide and clip, on this optimizer step's gradient. Call before ``optimizer.step()``.

        Args:
            optimizer: The optimizer about to step.
            step: The loggers' x-axis value; default: the count of calls so far (from 0).
            loss: The step's training loss (unscaled; under accumulation the mean over micro-batches). Read on
                computed steps, in the statistics' one transfer (no extra sync), for the divergence diagnosis.
            epoch: The epoch, for messages and the record.
            batch: The step's batch, saved with a spike when ``spike_dir`` is set.

        Returns:
            ``True`` to go ahead with ``optimizer.step()``; ``False`` when the update was skipped (the gradients
            were set to ``None``, so ``optimizer.step()`` leaves the weights alone).

        Raises:
            TrainingHealthError: The run must stop.
        """
        if self.model is None:
            raise RuntimeError("GradientHealth(model=None) has no model to watch: pass the model to GradientHealth.")
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise TypeError(f"`step` must be None or an int >= 0, got {step!r}.")
        count = next(self._steps)
        step = count if step is None else step
        known = [opt for ref in self._optimizers if (opt := ref()) is not None]
        if all(opt is not optimizer for opt in known):
            self._optimizers.append(weakref.ref(optimizer))
            known.append(optimizer)
            if self.watched.names is not None and count < len(known) + 1:
                self.watched.rebuild(known)  # a loop's optimizers show up one by one at the start: not a change
        scaler = self._scaler if self._scaler is not None and self._scaler.is_enabled() else None
        ctx = StepContext(
            step=step,
            due=due(step, self.output.frontend.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS),
            global_step=count,
            epoch=epoch,
            batch_idx=step,
            optimizer_idx=next(i for i, opt in enumerate(known) if opt is optimizer),
            several=len(known) > 1,
            scaler=scaler,
            grads_scaled=scaler is not None and _still_scaled(scaler, optimizer),
            micro_batches=self._tracker.micro_batches > 1,
            batches=() if batch is None else (batch,),
            loss=loss,
        )
        go = self.on_step(optimizer, ctx, known) if self.before_step(ctx.step, ctx.due) else True
        self.end_batch()
        if self.activations is not None and due(step + 1, self.options.activation_stats_every_n_steps):
            self.activations.attach()  # for the next step's forward pass
        return go

    def close(self) -> None:
        """Write anything still buffered, then the report (on rank zero). Idempotent per run."""
        if self._closed:
            return
        self._closed = True
        self._unwatch_maps()  # (feature-map hooks of a model that never ran forward)
        self.guard.resolve_clip_count()
        self._flush_pending()
        self.output.emit()
        if self.output.history.records_seen:
            self.output.write_report(self.watched.sparse_layers, self.inventory)
        elif self._due_steps:
            self.output.warn(
                f"{self.output.frontend.name}: no record and no report: {self._due_steps} computed step(s) found no "
                "gradient on the watched parameters. Call step() after loss.backward(), before optimizer.zero_grad()."
            )
        elif self._run_steps:
            every = self.output.frontend.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS
            self.output.warn(
                f"{self.output.frontend.name}: no step was computed, so there is no record and no report: the run "
                f"made {self._run_steps} optimizer step(s) and statistics are taken every {every} steps (steps "
                f"{every - 1}, {2 * every - 1}, ...). Fix: log more often, e.g. "
                f"`log_every_n_steps={max(1, min(every, self._run_steps) // 4)}` (on the monitor, or on the Trainer, "
                "whose value the monitor follows)."
            )
        self.output.flush()  # a loop's loggers buffer (CSV) or queue (TensorBoard): on disk once closed

    def abort(self) -> None:
        """On an exception: write what was computed before it, so that nothing already measured is lost."""
        if self.activations is not None:
            self.activations.detach()
        try:
            # sharded: no collective here (the other ranks may not be failing), so no post-clip norm either
            self._flush_pending(collectives=not self.output.frontend.sharded)
        finally:
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

    def before_step(self, step: int, due: bool) -> bool:
        """The start of every optimizer step; returns whether anything is to be done at it.

        A step that is not due, with no guard, clipping or spike detection, stops here: it runs no torch operation.
        """
        self._run_steps += 1
        self._due_steps += bool(due)
        self._flush_pending()
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
        layout, change = self.watched.layout_for(optimizer, optimizers)
        self._changed(change, ctx.step)
        scale = getattr(ctx.scaler, "_scale", None) if ctx.scaler is not None else None
        grad_scale = scale if ctx.grads_scaled else None
        red = self._reduction()
        pending = (
            self.engine.compute(layout, grad_scale, red) if ctx.due else self.engine.guard(layout, grad_scale, red)
        )
        if pending is None:
            self._nothing_to_watch(layout)
            return self._end_step(True)
        self._add_extras(pending, scale, ctx.loss if ctx.due else None)
        meta = StepMeta(ctx.step, ctx.global_step, ctx.epoch, ctx.batch_idx, ctx.optimizer_idx)
        record = self.engine.finish(pending, meta) if ctx.due else None
        total = record.total_norm if record is not None else self.engine.read_guard(pending)[0]
        self.output.visuals(self.engine, layout, grad_scale, meta.step, record, red)

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

    # ------------------------------------------------------------------ internals
    def _act_on(self, outcome: StepOutcome, optimizer: Optimizer, ctx: StepContext, layout: ParamLayout) -> None:
        if outcome.spike is not None:
            self.output.history.add_spike(ctx.step, outcome.spike)
        self.alerts.emit_step(outcome.alerts, rank_zero=self.output.frontend.rank_zero)
        if outcome.failure is not None:
            assert outcome.record is not None
            self._fail(outcome.record, outcome.failure, ctx)
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
        self.output.info(
            f"{name}: the watched parameters changed at step {step}: {change.describe()}. "
            "Every statistic covers the new set from this step"
            + (f"; the running statistics of {' and '.join(restarted)} start over." if restarted else ".")
        )
        if change.late and self.output.frontend.ddp:
            self.output.warn(
                f"{name}: {len(change.late)} parameter(s) started training after DistributedDataParallel "
                f"wrapped the model ({some(change.late)}). DDP only averages the gradients of the parameters that "
                "required a gradient when it wrapped the model, so these are not averaged across ranks: their "
                "replicas drift apart, and their per-layer statistics here are rank 0's own. Create the model with "
                "them trainable (and freeze them through the optimizer instead), or let the strategy wrap it again."
            )

    def _nothing_to_watch(self, layout: ParamLayout) -> None:
        name = self.output.frontend.name
        if len(layout):
            self.output.warn_once(
                "no-grad-at-all",
                f"{name}: no watched parameter has a gradient at this optimizer step; nothing is recorded for it.",
            )
        else:
            self.output.warn_once(
                "nothing-watched",
                f"{name}: this optimizer has no parameter to watch at this step (all frozen, or left out by "
                "`include`/`exclude`); nothing is recorded for it until one trains.",
            )

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

    def _end_step(self, go: bool) -> bool:
        self._tracker.reset()
        return go

    def _read_activations(self, step: int) -> None:
        assert self.activations is not None
        self.activations.detach()
        stats = self.activations.read()  # collective under DDP: every rank reads
        self.output.add_activations(step, stats)

    def _flush_pending(self, collectives: bool = True) -> None:
        while self._awaiting_clip:
            _, (record, layout, several) = self._awaiting_clip.popitem()
            present = layout.with_grad()
            params = [layout.params[i] for i in present]
            grads = stat_grads(layout, present)
            if grads and collectives:  # the second transfer of a step, only when the framework clips gradients
                norm = self.engine.global_norm(grads, self.output.frontend.reduction, params=params)  # type: ignore[arg-type]
                record = replace(record, post_clip_norm=norm.item())
            self._publish(record, several)

    def _publish(self, record: StepStats, several: bool) -> None:
        self.last_record = record
        counters = {metrics.ALERTS: float(self.alerts.total), **self.guard.counters(self.output.frontend.amp)}
        self.output.publish(record, several, counters)

    def _alert(self, alert: Alert) -> None:
        self.alerts(alert, rank_zero=self.output.frontend.rank_zero)

    def _fail(self, record: StepStats, failure: Failure, ctx: StepContext) -> None:
        """Log the step, flush the loggers, write the report, raise :class:`TrainingHealthError`."""
        message = format_nonfinite_message(record, failure.reason, micro_batches=ctx.micro_batches)
        first = message.splitlines()[0]
        self._alert(Alert(kind=failure.kind, severity=Severity.CRITICAL, step=record.step, epoch=record.epoch,
                          batch_idx=record.batch_idx, message=first))  # fmt: skip
        self._publish(record, ctx.several)
        self.output.emit()
        self.output.write_report(self.watched.sparse_layers, self.inventory)
        self.output.flush()
        self._closed = True  # (the report is written: a close() in a finally adds nothing)
        raise TrainingHealthError(
            message, record=record, step=record.step, layers=[lay.name for lay in record.nonfinite_layers]
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """All running state, so that a resumed run makes the same decisions as an uninterrupted one."""
        return {
            **self.guard.state_dict(),
            "warned": sorted(self.output.warned),
            "alerts": self.alerts.state_dict(),
            "watched": self.watched.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.output.warned = set(state_dict.get("warned", ()))
        self.watched.load_state_dict(state_dict.get("watched"))
        self.alerts.load_state_dict(state_dict.get("alerts") or {})
        warning = self.guard.load_state_dict(state_dict)
        if warning is not None:
            self.output.warn(warning)


def _still_scaled(scaler: Any, optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s gradients still hold ``scaler``'s loss scale (``scaler.unscale_`` not called yet)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:
        return False
    from torch.amp.grad_scaler import OptState

    return states[id(optimizer)]["stage"] is not OptState.UNSCALED
