"""The plain PyTorch and Lightning Fabric loops' front-end: :class:`GradientHealth`.

It is the core (:class:`~lightning_gradhealth.core.pipeline.StepPipeline`) plus :meth:`GradientHealth.step`, which
maps a loop's optimizer step onto the front-end contract (:mod:`~lightning_gradhealth.core.contract`), the context
manager, and the run's registration for interpreter exit (:mod:`~lightning_gradhealth.core.at_exit`).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.core.at_exit import OPEN_RUNS as _OPEN
from lightning_gradhealth.core.context import (
    DEFAULT_LOG_EVERY_N_STEPS,
    StepContext,
    check_step_call,
    checked_options,
    due,
)
from lightning_gradhealth.core.pipeline import StepPipeline
from lightning_gradhealth.guard.birth import Replay
from lightning_gradhealth.output.pipeline import Frontend
from lightning_gradhealth.schema.errors import TrainingHealthError

__all__ = ["DEFAULT_LOG_EVERY_N_STEPS", "Frontend", "GradientHealth", "StepContext", "due"]


class GradientHealth(StepPipeline):
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
        schedulers: The LR schedulers in use: a rollback (``recover=``) restores them with the rest of the state.
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
        schedulers: Sequence[Any] = (),
        **kwargs: Any,
    ) -> None:
        super().__init__(checked_options(model, scaler, options, kwargs), scaler=scaler, schedulers=schedulers)
        self._optimizers: list[weakref.ReferenceType[Optimizer]] = []
        self._scaler = scaler
        self._steps = itertools.count()
        if model is not None:
            every = self.options.log_every_n_steps
            self.attach(Frontend.for_model(model, loggers, amp=scaler is not None, every=every), ddp=model)
            self.start()
            _OPEN.add(self)
            self.before_batch(0)
            self._replays.mark()  # (the RNG state the first step's replay restores; then after each step())

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
        every = self.output.frontend.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS
        ctx = StepContext.for_loop(
            optimizer, known, step=step, count=count, every=every, epoch=epoch, scaler=scaler, loss=loss,
            batch=batch, replay=replay, micro_batches=self._tracker.micro_batches > 1,
            noise_scale=bool(self.options.noise_scale),
        )  # fmt: skip
        go = self.on_step(optimizer, ctx, known) if self.before_step(ctx.step, ctx.due, loss) else True
        self.end_batch()
        self._replays.mark()  # the next step's forward comes next (a front-end's replays carry their own states)
        if self.activations is not None and due(step + 1, self.options.activation_stats_every_n_steps):
            self.activations.attach()  # for the next step's forward pass
        return go

    def close(self) -> None:
        """Write anything still buffered, then the report (on rank zero). Idempotent per run."""
        _OPEN.discard(self)
        super().close()

    def __enter__(self) -> GradientHealth:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
        elif not isinstance(exc, TrainingHealthError):  # (that one already logged, flushed and reported)
            _OPEN.discard(self)
            self.abort()
            self.output.flush()  # the exception may end the process: what was measured must be on disk
            if not self._closed:  # the report of what was measured, saying why the run stopped
                self._closed = True
                where = f" after step {self._now}" if self._run_steps else ""
                self.output.write_report(self.watched.sparse_layers, self.inventory,
                                         stopped=f"{type(exc).__name__}{where}: {exc}")  # fmt: skip
                self.output.flush()
            self.output.close_loggers()
