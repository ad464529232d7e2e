"""Recovery without a restart: roll back to a trusted in-memory snapshot, skip ahead, back the learning rate off.

:class:`RecoveryGuard` reviews the guard's :class:`~lightning_gradhealth.guard.step.StepOutcome` of every step.

Triggers (why: ``docs/recovery.md``):

- ``nonfinite``: a non-finite gradient or loss. The first is skipped (whatever ``on_nonfinite`` says, the update is
  never applied); a second within ``nonfinite_window`` steps is one that a skip does not cure (the weights or the
  optimizer's moments are already bad): roll back.
- ``absurd update``: a finite global norm over ``spike_factor`` times the median of the recent healthy ones: one
  huge update (a bit flip, a bad collective, a poisoned batch) would poison the steps after it.
- ``divergence``: the loss over ``loss_rise`` times the median of the recent healthy losses (early in a run, of
  the first ones: a warmup overshoot shows before spike statistics warm up) for ``patience`` steps in a row.
- ``spike``: the spike detector's failures (``on_spike="raise"``, or too many skipped spikes).

On a trigger the last trusted snapshot is restored, the step's update is skipped, the data loader goes on (the
batches between the snapshot and the trigger are skipped, as PaLM did), and the learning rate is multiplied by a
factor on top of the schedule, applied around ``optimizer.step()`` only (a step post-hook puts the scheduler's value
back), so schedulers never see it. Every decision is taken from values that every rank shares (the guard's global
norm is agreed over the ranks; the loss is averaged over them), so every rank rolls back at the same step.
"""

from __future__ import annotations

import math
import statistics
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.config.recovery import Recovery
from lightning_gradhealth.guard.snapshot import Snapshot, Targets, restore, take
from lightning_gradhealth.guard.step import Failure, StepGuard, StepOutcome
from lightning_gradhealth.schema import metrics
from lightning_gradhealth.schema.kinds import Kind

__all__ = ["RecoveryGuard", "Rollback"]


@dataclass(frozen=True)
class Rollback:
    """One rollback, as the report lists it.

    Attributes:
        step: The step that triggered it (its update skipped).
        to_step: The snapshot's step: training goes on from the state before that step's update.
        trigger: ``"nonfinite"``, ``"absurd update"``, ``"divergence"`` or ``"spike"``.
        reason: What was seen, in words.
        factor: The learning-rate factor after it.
        skipped: The first and last batch (step) whose updates were undone.
    """

    step: int
    to_step: int
    trigger: str
    reason: str
    factor: float
    skipped: tuple[int, int]

    def line(self, count: int, most: int) -> str:
        """The console line."""
        return (
            f"rollback {count}/{most} at step {self.step} to the snapshot of step {self.to_step} ({self.trigger}: "
            f"{self.reason}); batches {self.skipped[0]}-{self.skipped[1]} skipped, learning-rate factor now "
            f"{self.factor:.3g}."
        )


class RecoveryGuard:
    """Keeps snapshots, spots the failures a skip does not cure, rolls back and backs the learning rate off.

    Args:
        settings: The :class:`~lightning_gradhealth.config.recovery.Recovery` settings.
        guard: The step guard, whose running state (spike detector, clipper) a snapshot keeps.
    """

    def __init__(self, settings: Recovery, guard: StepGuard) -> None:
        self.settings = settings
        self.guard = guard
        self.model: nn.Module | None = None
        self.targets = Targets(running_state=self._running_state, load_running_state=self._load_running_state)
        self.snapshots: list[Snapshot] = []
        self._spare: list[Snapshot] = []  # dropped snapshots whose host buffers the next ones reuse
        self.events: list[dict[str, Any]] = []
        """Every rollback (:class:`Rollback` as a dict), for the report."""
        self.rollbacks = 0
        self.factor = 1.0
        self.ceiling = 1.0
        self._healthy_run = 0
        self._reviews = 0
        self._fresh = True
        self._last_nonfinite: int | None = None
        self._diverging = 0
        self._norms: deque[float] = deque(maxlen=settings.window)
        self._losses: deque[float] = deque(maxlen=settings.window)
        self.best_loss: float | None = None
        """The lowest median of ``window`` healthy losses so far: the level a diverging loss is compared with."""
        self._scaled: dict[int, tuple[weakref.ReferenceType[Optimizer], list[Any]]] = {}
        self._hooked: weakref.WeakSet[Optimizer] = weakref.WeakSet()

    # ------------------------------------------------------------------ set-up
    def bind(self, schedulers: Sequence[Any] = (), scaler: Any = None) -> None:
        """What the snapshots cover besides the model and optimizers: LR schedulers and a GradScaler."""
        self.targets.schedulers = list(schedulers)
        self.targets.scaler = scaler

    def start(self, model: nn.Module) -> None:
        """A run starts on ``model``: its first snapshot (the state it starts or resumes from) is trusted at once."""
        self.model = model
        self._spare += self.snapshots
        self.snapshots = []
        self._reviews = 0
        self._fresh = True

    # ------------------------------------------------------------------ the step
    def review(
        self,
        outcome: StepOutcome,
        total: float,
        step: int,
        loss: torch.Tensor | float | None,
        optimizer: Optimizer,
        optimizers: Sequence[Optimizer],
        *,
        amp: bool = False,
    ) -> str | None:
        """Review the guard's outcome of one step, before its update; may change it (skip, roll back, stop).

        A failure it adds leaves ``outcome.record`` as it is: the caller fills in a failing step's full record.

        Returns:
            A line for the console (a rollback, or a non-finite step skipped), or ``None``.
        """
        self._unscale()
        self._reviews += 1
        value = self._agreed_loss(loss)
        note: str | None = None
        trigger = self._trigger(outcome, total, value, amp)
        if trigger == ("nonfinite", ""):  # the first one: skipped, never applied
            outcome.failure, outcome.skip, trigger = None, True, None
            window = self.settings.nonfinite_window
            note = f"non-finite step {step} skipped (recover: another within {window} steps rolls back)."
        if trigger is not None:
            return self._roll_back(outcome, trigger, step, optimizers)
        healthy = outcome.go_ahead and outcome.spike is None and math.isfinite(total) and not self._diverging
        self._vet(healthy, total, value)
        if self.model is not None and (self._reviews - 1) % self.settings.every_n_steps == 0 and healthy:
            self._snapshot(step, optimizers)
        if outcome.go_ahead and self.factor != 1.0:
            self._scale(optimizer)
        return note

    def _trigger(self, outcome: StepOutcome, total: float, loss: float | None, amp: bool) -> tuple[str, str] | None:
        """Why this step rolls back (``("nonfinite", "")``: a first non-finite step, to skip), or ``None``."""
        s = self.settings
        if not math.isfinite(total) or (loss is not None and not math.isfinite(loss)):
            if amp and outcome.failure is None:
                return None  # a GradScaler overflow: the scaler's business
            seen, self._last_nonfinite = self._last_nonfinite, self._reviews
            if seen is not None and self._reviews - seen <= s.nonfinite_window:
                return "nonfinite", f"non-finite again, {self._reviews - seen} step(s) after the last one"
            return "nonfinite", ""
        if outcome.failure is not None:
            return "spike", outcome.failure.reason
        if len(self._norms) >= 3 and total > s.spike_factor * (median := statistics.median(self._norms)):
            return "absurd update", f"global norm {total:.3g} is {total / median:.3g}x the recent median {median:.3g}"
        if loss is not None and self.best_loss is not None:
            base = self.best_loss
            self._diverging = self._diverging + 1 if loss > s.loss_rise * base else 0
            if self._diverging >= s.patience:
                self._diverging = 0
                rise = f"loss {loss:.4g} above {s.loss_rise:g}x its best level {base:.4g} for {s.patience} steps"
                return "divergence", rise
        return None

    def _vet(self, healthy: bool, total: float, loss: float | None) -> None:
        """Advance the snapshots' vetting; keep the healthy baselines; bring the factor back."""
        if not healthy:
            self.snapshots = [snap for snap in self.snapshots if snap.trusted or self._drop(snap)]
            self._healthy_run = 0
            return
        self._norms.append(total)
        if loss is not None:
            self._losses.append(loss)
            level = statistics.median(self._losses)  # (a falling loss: its best level is its latest)
            self.best_loss = level if self.best_loss is None else min(self.best_loss, level)
        for snap in self.snapshots:
            snap.healthy += 1
            snap.trusted = snap.trusted or snap.healthy >= self.settings.trust_after
        if self.settings.lr_return_steps is not None and self.factor < self.ceiling:
            self._healthy_run += 1
            if self._healthy_run >= self.settings.lr_return_steps:
                self.factor, self._healthy_run = min(self.ceiling, 2 * self.factor), 0

    def _drop(self, snap: Snapshot) -> bool:
        self._spare.append(snap)
        return False

    def _snapshot(self, step: int, optimizers: Sequence[Optimizer]) -> None:
        assert self.model is not None
        first, self._fresh = self._fresh, False
        trusted = [s for s in self.snapshots if s.trusted]
        if trusted:  # only the newest trusted one is kept
            for old in trusted[:-1]:
                self.snapshots.remove(old)
                self._spare.append(old)
        while len(self.snapshots) >= self.settings.kept:
            victim = next((s for s in self.snapshots if not s.trusted), self.snapshots[0])
            self.snapshots.remove(victim)
            self._spare.append(victim)
        snap = take(self._spare.pop() if self._spare else None, step, self.model, optimizers, self.targets)
        snap.trusted = first
        self.snapshots.append(snap)

    def _roll_back(
        self,
        outcome: StepOutcome,
        trigger: tuple[str, str],
        step: int,
        optimizers: Sequence[Optimizer],
    ) -> str | None:
        kind, reason = trigger
        trusted = [s for s in self.snapshots if s.trusted]
        if not trusted:  # (only at a run's very first step): the guard's own verdict stands
            return None
        if self.rollbacks >= self.settings.max_rollbacks:
            outcome.failure = Failure(
                f"Recovery gave up after {self.rollbacks} rollbacks, at another {kind} ({reason})",
                Kind.NONFINITE if kind == "nonfinite" else Kind.SPIKE,
            )
            return None
        snap = trusted[-1]
        assert self.model is not None
        restore(snap, self.model, optimizers, self.targets)
        for later in [s for s in self.snapshots if s.step > snap.step]:
            self.snapshots.remove(later)
            self._spare.append(later)
        before = self.factor
        self.factor *= self.settings.lr_factor
        self.ceiling = min(self.ceiling, math.sqrt(before * self.factor))  # never all the way back to what failed
        self.rollbacks += 1
        self._healthy_run = self._diverging = 0
        self._last_nonfinite = None
        event = Rollback(step, snap.step, kind, reason, self.factor, (snap.step, step))
        self.events.append({**asdict(event), "skipped": list(event.skipped)})
        outcome.failure, outcome.skip = None, True
        return event.line(self.rollbacks, self.settings.max_rollbacks)

    # ------------------------------------------------------------------ the learning-rate factor
    def _scale(self, optimizer: Optimizer) -> None:
        """Multiply ``optimizer``'s learning rates by the factor until its step has run (a post-hook unscales)."""
        if optimizer not in self._hooked:
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self._unscale())
            self._hooked.add(optimizer)
        saved = [group["lr"] for group in optimizer.param_groups]
        for group, lr in zip(optimizer.param_groups, saved, strict=True):
            group["lr"] = lr * self.factor
        self._scaled[id(optimizer)] = (weakref.ref(optimizer), saved)

    def _unscale(self) -> None:
        """Put the schedule's learning rates back (after the step, or before the next review if it never ran)."""
        for ref, saved in self._scaled.values():
            opt = ref()
            if opt is not None:
                for group, lr in zip(opt.param_groups, saved, strict=True):
                    group["lr"] = lr
        self._scaled.clear()

    # ------------------------------------------------------------------ agreement
    @staticmethod
    def _agreed_loss(loss: torch.Tensor | float | None) -> float | None:
        """The step's loss on the host, averaged over the ranks (one all-reduce of two numbers) when distributed."""
        if loss is None:
            return None
        value = torch.as_tensor(loss).detach().reshape(()).double()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            both = torch.stack([value, torch.ones_like(value)]).reshape(2)
            if dist.get_backend() == "nccl" and not both.is_cuda:
                both = both.cuda()
            dist.all_reduce(both)
            value = both[0] / both[1]
        return float(value)

    # ------------------------------------------------------------------ the monitor's own state
    def _running_state(self) -> dict[str, Any]:
        spikes, clipper = self.guard.spikes, self.guard.clipper
        return {
            "spikes": None if spikes is None else spikes.state_dict(),
            "clipper": None if clipper is None else clipper.state_dict(),
        }

    def _load_running_state(self, state: dict[str, Any]) -> None:
        if self.guard.spikes is not None and state.get("spikes") is not None:
            self.guard.spikes.load_state_dict(state["spikes"])
        if self.guard.clipper is not None and state.get("clipper") is not None:
            self.guard.clipper.load_state_dict(state["clipper"])
        self.guard.policy.consecutive_skips = 0

    # ------------------------------------------------------------------ logging and state
    def counters(self) -> dict[str, float]:
        """``grad_health/rollbacks`` (cumulative) and ``grad_health/lr_factor``."""
        return {metrics.ROLLBACKS: float(self.rollbacks), metrics.LR_FACTOR: self.factor}

    def state_dict(self) -> dict[str, Any]:
        """The recovery state a resumed run goes on with (not the snapshots: they live in host memory)."""
        return {
            "rollbacks": self.rollbacks,
            "factor": self.factor,
            "ceiling": self.ceiling,
            "healthy_run": self._healthy_run,
            "events": [dict(e) for e in self.events],
            "norms": list(self._norms),
            "losses": list(self._losses),
            "best_loss": self.best_loss,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`."""
        state = state or {}
        self.rollbacks = int(state.get("rollbacks", 0))
        self.factor = float(state.get("factor", 1.0))
        self.ceiling = float(state.get("ceiling", 1.0))
        self._healthy_run = int(state.get("healthy_run", 0))
        self.events[:] = [dict(e) for e in state.get("events", ())]
        self._norms.clear()
        self._norms.extend(float(v) for v in state.get("norms", ()))
        self._losses.clear()
        self._losses.extend(float(v) for v in state.get("losses", ()))
        self.best_loss = None if state.get("best_loss") is None else float(state["best_loss"])
