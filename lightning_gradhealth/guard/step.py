"""The per-step decision: non-finite gradients, spikes, threshold alerts and clipping, on plain tensors.

A :class:`StepGuard` is given the global norm of a step (and its record, on computed steps) and *returns* a
:class:`StepOutcome`: whether the update goes ahead, the alerts to emit, the failure that must stop the run, and
what clipping did. It never logs, raises or touches a training framework; the caller acts on the outcome.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.checks import check_global_norm, check_growth, check_record
from lightning_gradhealth.diagnosis.fixes import FIXES
from lightning_gradhealth.diagnosis.rules import EARLY
from lightning_gradhealth.diagnosis.safety import NonFinitePolicy, nonfinite_fixes
from lightning_gradhealth.guard.clipping import AutoClipper, ZClipper, make_clipper
from lightning_gradhealth.guard.spikes import SpikeDetector
from lightning_gradhealth.model.distributed import Reduction, local, resolve
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.model.shards import shards_of
from lightning_gradhealth.schema import metrics
from lightning_gradhealth.schema.alert import Alert
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.schema.record import StepStats
from lightning_gradhealth.stats.engine import StepMeta

__all__ = ["Failure", "StepGuard", "StepOutcome"]


@dataclass(frozen=True)
class Failure:
    """Why the run must stop at this step.

    Attributes:
        reason: The first words of the error message (``"Non-finite gradients"``, ...).
        kind: The alert kind (``"nonfinite"`` or ``"spike"``).
    """

    reason: str
    kind: str = Kind.NONFINITE


@dataclass
class StepOutcome:
    """What the guard decided for one optimizer step.

    Attributes:
        record: The step's record: the logged step's, or the full record of a failing guarded step; ``None`` on a
            healthy step that is not logged.
        skip: Whether the update must be skipped (gradients set to ``None``).
        alerts: Alerts to emit, in order.
        failure: Set when the run must stop.
        spike: The z-score when the step's norm was a spike.
        clip_wanted: Whether the update goes ahead with a finite norm under a clipper: the caller clips
            (:meth:`StepGuard.clip`) and stores what that returns in ``clip``.
        clip: The clipping metrics of the step (``grad_health/clip_coef``, ``grad_health/clipped_norm``).
    """

    record: StepStats | None = None
    skip: bool = False
    alerts: list[Alert] = field(default_factory=list)
    failure: Failure | None = None
    spike: float | None = None
    clip_wanted: bool = False
    clip: dict[str, float] = field(default_factory=dict)

    @property
    def go_ahead(self) -> bool:
        """Whether the optimizer may step."""
        return not self.skip and self.failure is None


class StepGuard:
    """Decides, step by step, what a gradient means: non-finite policy, spike detection, clipping and counters.

    Args:
        options: The validated options.
        rank: This process's global rank (names the files of saved spike batches).

    Attributes:
        policy: The non-finite policy and its counters.
        spikes: The spike detector, or ``None`` when detection is off.
        clipper: The clipper, or ``None``.
        steps_seen: Optimizer steps the guard looked at.
        clipped_steps: Steps the clipper changed the gradient.
        spike_count: Spikes detected.
    """

    def __init__(self, options: HealthOptions, rank: int = 0) -> None:
        self.options = options
        self.rank = rank
        self.frontend: str | None = None  # the front-end's name: alerts' fixes fit it
        self.policy = NonFinitePolicy(
            options.on_nonfinite,  # type: ignore[arg-type]
            options.max_consecutive_skips,
            options.amp_max_consecutive_overflows,
            options.amp_min_scale,
        )
        self.spikes = (
            None
            if options.spike_z_thresh is None
            else SpikeDetector(options.spike_z_thresh, warmup_steps=options.spike_warmup_steps)
        )
        self.clipper = make_clipper(options)
        self.steps_seen = 0
        self.clipped_steps = 0
        self.spike_count = 0
        self._clipped_dev: torch.Tensor | None = None
        self._last_clip: dict[str, float] = {}
        self.early_norms: list[float] = []  # the run's first finite global norms: its own baseline
        self.early_losses: list[float] = []  # and its first losses (computed steps)
        self._norms: deque[float] = deque(maxlen=EARLY)  # the latest ones
        self._losses: deque[float] = deque(maxlen=EARLY)

    def begin(self, rank: int, frontend: str | None = None) -> None:
        """A run starts on this process's global rank (which names the files of saved spike batches).

        ``frontend``: the front-end's name (the alerts' fixes fit it).
        """
        self.rank = rank
        self.frontend = frontend

    def decide(
        self,
        total: float,
        meta: StepMeta,
        record: StepStats | None,
        *,
        amp: bool = False,
        sparse_layers: frozenset[str] = frozenset(),
        inventory: ModelInventory | None = None,
        batches: Sequence[Any] = (),
    ) -> StepOutcome:
        """Decide for one step. It never acts: the caller clips, skips, announces and raises from the outcome.

        Args:
            total: The step's global gradient norm (unscaled).
            meta: Where the step is.
            record: The step's record: on computed steps, and on every step whose norm is non-finite (the full
                record of a failing step); else ``None``.
            amp: Whether a GradScaler is active (non-finite steps are then its business).
            sparse_layers: Layers whose gradients are sparse by design (no "dead" alerts).
            inventory: What the model is made of: the per-layer checks compare like with like.
            batches: The step's batches, saved with a spike when ``spike_dir`` is set.

        Returns:
            The outcome. A failing step without a record (a spike on a guarded step) has ``record=None``: the
            caller fills in the full record.
        """
        self.steps_seen += 1
        out = StepOutcome(record=record)
        thresholds = self.options.thresholds
        if not math.isfinite(total):
            if record is None:
                raise ValueError("StepGuard.decide needs the full record of a step whose norm is non-finite.")
            if self.options.on_nonfinite is not None or amp:
                self._nonfinite(out, amp)
        else:
            if self.spikes is not None:
                self._spike(out, meta, total, batches)
            if not out.skip:
                self.policy.finite()
            if thresholds is not None:
                out.alerts += check_global_norm(
                    total,
                    meta.step,
                    thresholds,
                    steps_seen=self.steps_seen,
                    epoch=meta.epoch,
                    batch_idx=meta.batch_idx,
                    inventory=inventory,
                    frontend=self.frontend,
                )
                out.alerts += self._growth(total, record, meta, thresholds)
        if out.failure is not None:
            return out
        out.clip_wanted = not out.skip and self.clipper is not None and math.isfinite(total)
        if out.record is not None and thresholds is not None:
            out.alerts += check_record(
                out.record, thresholds, steps_seen=self.steps_seen, sparse_layers=sparse_layers, inventory=inventory,
                frontend=self.frontend,
            )
        return out

    def _growth(self, total: float, record: StepStats | None, meta: StepMeta, thresholds: Thresholds) -> list[Alert]:
        """The norm (and the loss, on computed steps) against the run's own first values: grown far above them.

        The loss is the mean over every step since the previous computed step, against the run's first losses
        (stats/loss.py), when the front-end gave every step's loss; else the computed steps' own.
        """
        summary = record.loss_summary if record is not None else None
        smooth = summary is not None and math.isfinite(summary.mean) and math.isfinite(summary.first)
        loss = summary.mean if smooth else (None if record is None else record.loss)  # type: ignore[union-attr]
        for early, latest, value in ((self.early_norms, self._norms, total), (self.early_losses, self._losses, loss)):
            if value is not None and math.isfinite(value):
                latest.append(value)
                if len(early) < EARLY:
                    early.append(value)
        if len(self.early_norms) < EARLY or len(self._norms) < EARLY:
            return []
        # the median of the latest values against the median of the first: a lasting change, not a noisy step
        loss_early = statistics.median(self.early_losses) if len(self.early_losses) == EARLY else None
        loss_early = summary.first if smooth else loss_early  # type: ignore[union-attr]
        loss_now = statistics.median(self._losses) if loss is not None and len(self._losses) == EARLY else None
        return check_growth(
            statistics.median(self._norms), loss_now, statistics.median(self.early_norms), loss_early, meta, thresholds,
            self.frontend,
        )

    def _nonfinite(self, out: StepOutcome, amp: bool) -> None:
        record = out.record
        assert record is not None
        decision = self.policy.nonfinite(record.amp_scale if amp else None)
        if decision == "amp_overflow":
            return  # the scaler skips the update and lowers its scale: normal mixed-precision behaviour
        if decision == "amp_collapse":
            out.failure = Failure(
                f"GradScaler overflow persists ({self.policy.consecutive_overflows} overflow step(s) in a row, loss "
                f"scale now {record.amp_scale:g}): the gradients overflow fp16 even unscaled"
            )
            return
        if decision in ("raise", "skip_limit"):
            finite_grads = not (record.nan_count or record.inf_count or record.nonfinite_layers)
            loss_bad = record.loss is not None and not math.isfinite(record.loss)
            reason = "Non-finite loss" if loss_bad and finite_grads else "Non-finite gradients"
            if decision == "skip_limit":
                reason += f" for {self.policy.consecutive_skips} steps in a row (on_nonfinite='skip')"
            out.failure = Failure(reason)
            return
        names = ", ".join(lay.name for lay in record.nonfinite_layers[:5]) or "the global norm"
        action = "update skipped" if decision == "skip" else "update applied (on_nonfinite='warn')"
        what = (
            f"non-finite gradients ({record.nan_count} NaN, {record.inf_count} Inf)"
            if record.nan_count or record.inf_count
            else "finite gradients so large that their norm overflows float32 (exploding)"
        )
        message = f"{what} in {names}; {action}. Fix: {nonfinite_fixes(record)[0]}."
        out.alerts.append(
            _alert(Kind.NONFINITE, Severity.CRITICAL, record, message, record.nan_count + record.inf_count)
        )
        out.skip = decision == "skip"

    def _spike(
        self,
        out: StepOutcome,
        meta: StepMeta,
        total: float,
        batches: Sequence[Any],
    ) -> None:
        assert self.spikes is not None
        z = self.spikes.observe(total)
        if z is None:
            return
        self.spike_count += 1
        out.spike = z
        saved = self._save_batches(meta, total, z, batches)
        on_spike = self.options.on_spike
        if on_spike == "raise":
            reason = f"Gradient-norm spike (z = {z:.1f}, norm {total:.3g})"
            out.failure = Failure(reason, Kind.SPIKE)
            return
        if on_spike == "skip" and self.policy.skipped() == "skip_limit":
            reason = (
                f"Gradient-norm spikes for {self.policy.consecutive_skips} steps in a row (on_spike='skip'; "
                f"norm {total:.3g}, z = {z:.1f}): the gradient scale changed for good"
            )
            out.failure = Failure(reason, Kind.SPIKE)
            return
        message = (
            f"gradient-norm spike: {total:.3g} is {z:.1f} sigma above its running (log) mean, at step {meta.step} "
            f"(epoch {meta.epoch}, batch {meta.batch_idx})"
            + (f"; batch saved to {saved}" if saved else "")
            + ("; update skipped" if on_spike == "skip" else "")
            + f". Fix: {FIXES[Kind.SPIKE][0]}."
        )
        out.alerts.append(_alert(Kind.SPIKE, Severity.WARNING, meta, message, total))
        out.skip = on_spike == "skip"

    def _save_batches(self, meta: StepMeta, total: float, z: float, batches: Sequence[Any]) -> Path | None:
        directory = self.options.spike_dir
        if directory is None:
            return None
        assert isinstance(directory, Path)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"spike_step{meta.step}_rank{self.rank}.pt"
        saved = {"step": meta.step, "global_step": meta.global_step, "epoch": meta.epoch, "batch_idx": meta.batch_idx,
                 "total_norm": total, "zscore": z, "batches": [_to_cpu(b) for b in batches]}  # fmt: skip
        torch.save(saved, path)
        return path

    def clip(
        self, layout: ParamLayout, grad_scale: torch.Tensor | None, total: float, logged: bool, reduction: Reduction
    ) -> dict[str, float]:
        """Clip the watched gradients in place with the step's global norm ``total``; count what was clipped.

        Returns:
            The step's clipping metrics (``grad_health/clip_coef``, ``grad_health/clipped_norm``).
        """
        assert self.clipper is not None
        present = [p for p in layout.params if p.grad is not None]
        grads: list[torch.Tensor] = [p.grad for p in present]  # type: ignore[misc]
        shards = shards_of(grads, resolve(grads, reduction), present)
        # sharded gradients are clipped shard by shard (in place, through the local views) with global numbers
        outcome = self.clipper.clip([local(g) for g in grads], [local(p) for p in present], total, grad_scale, shards)
        if outcome.clipped:
            self.clipped_steps += 1
        if outcome.clipped_device is not None:  # value / AGC: counted on the device, read on logged steps
            count = outcome.clipped_device.long()
            self._clipped_dev = count if self._clipped_dev is None else self._clipped_dev + count
        self._last_clip = {}
        if outcome.coef is not None:
            self._last_clip[metrics.CLIP_COEF] = outcome.coef
        if outcome.clipped_norm is not None:
            self._last_clip[metrics.CLIPPED_NORM] = outcome.clipped_norm
        elif outcome.clipped_norm_device is not None and logged:  # value / AGC: one more transfer, logged steps
            assert self._clipped_dev is not None
            post, count = torch.stack([outcome.clipped_norm_device.double(), self._clipped_dev.double()]).tolist()
            self._last_clip[metrics.CLIPPED_NORM] = post
            self.clipped_steps += int(count)
            self._clipped_dev = None
        return dict(self._last_clip)

    def resolve_clip_count(self) -> None:
        """Read the clip count still held on the device (value/AGC clipping), with one transfer."""
        if self._clipped_dev is not None:
            self.clipped_steps += int(self._clipped_dev.item())
            self._clipped_dev = None

    def counters(self, amp: bool) -> dict[str, float]:
        """The cumulative counters of the safety features that are on, by metric key (alerts excepted)."""
        out: dict[str, float] = {}
        if self.options.on_nonfinite == "skip" or self.options.on_spike == "skip":
            out[metrics.SKIPPED_STEPS] = float(self.policy.skipped_steps)
        if amp:
            out[metrics.AMP_OVERFLOW] = float(self.policy.amp_overflows)
        if self.spikes is not None:
            out[metrics.SPIKES] = float(self.spike_count)
        if self.clipper is not None:
            out.update(self._last_clip)
            out[metrics.CLIP_FRAC] = self.clipped_steps / max(self.steps_seen, 1)
        return out

    def reset(self) -> list[str]:
        """Restart the running statistics (the watched set changed); returns what was restarted, for a message."""
        restarted = (["spike detection"] if self.spikes is not None else []) + (
            [f"{self.options.clip} clipping"] if isinstance(self.clipper, (AutoClipper, ZClipper)) else []
        )
        if self.spikes is not None:
            self.spikes.reset()
        if self.clipper is not None:
            self.clipper.reset()
        self.early_norms.clear()  # (norms of other parameters now; the loss is the same loss)
        self._norms.clear()
        return restarted

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Counters and running statistics."""
        self.resolve_clip_count()
        return {
            "steps_seen": self.steps_seen,
            "clipped_steps": self.clipped_steps,
            "spike_count": self.spike_count,
            "policy": self.policy.state_dict(),
            "spikes": None if self.spikes is None else self.spikes.state_dict(),
            "clipper": None if self.clipper is None else self.clipper.state_dict(),
            "clip": self.options.clip,
            "early_norms": list(self.early_norms),
            "early_losses": list(self.early_losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> str | None:
        """Restore :meth:`state_dict`. Returns a warning when the checkpoint's clipper is not this run's."""
        self.steps_seen = int(state.get("steps_seen", 0))
        self.clipped_steps = int(state.get("clipped_steps", 0))
        self.spike_count = int(state.get("spike_count", 0))
        self.policy.load_state_dict(state.get("policy") or {})
        self.early_norms = [float(v) for v in state.get("early_norms", ())]
        self.early_losses = [float(v) for v in state.get("early_losses", ())]
        if self.spikes is not None and state.get("spikes") is not None:
            self.spikes.load_state_dict(state["spikes"])
        if self.clipper is not None and state.get("clipper") is not None:
            if state.get("clip", self.options.clip) != self.options.clip:
                return (
                    f"GradientHealthMonitor: the checkpoint was made with clip={state.get('clip')!r}, this run uses "
                    f"clip={self.options.clip!r}; the clipper starts afresh."
                )
            self.clipper.load_state_dict(state["clipper"])
        return None


def _alert(kind: str, severity: Severity, at: StepMeta | StepStats, message: str, value: float | None) -> Alert:
    """An alert about the step ``at`` (its step, epoch and batch index)."""
    return Alert(kind=kind, severity=severity, step=at.step, epoch=at.epoch, batch_idx=at.batch_idx,
                 value=None if value is None else float(value), message=message)  # fmt: skip


def _to_cpu(batch: Any) -> Any:
    """A copy of ``batch`` with every tensor detached and on the CPU (for ``torch.save``)."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu()
    if isinstance(batch, (list, tuple)):
        items = [_to_cpu(b) for b in batch]
        return type(batch)(*items) if hasattr(batch, "_fields") else type(batch)(items)
    if isinstance(batch, dict):
        return {k: _to_cpu(v) for k, v in batch.items()}
    return batch
