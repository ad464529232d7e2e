"""What to do about a non-finite step: the decision logic of ``on_nonfinite``, kept apart from Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from lightning_gradhealth.config.thresholds import Severity
from lightning_gradhealth.diagnosis.fixes import FIXES
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.schema.record import StepStats

__all__ = ["NonFinitePolicy", "amp_fixes", "amp_overflow_finding", "format_nonfinite_message", "nonfinite_fixes"]

Decision = Literal["raise", "skip", "warn", "amp_overflow", "amp_collapse", "skip_limit"]


class NonFinitePolicy:
    """Decide, step by step, what a non-finite gradient means and what to do.

    Under a GradScaler a non-finite step is the scaler's business (it skips the update and lowers its scale):
    it is counted, and escalated only when overflows persist (``amp_max_consecutive_overflows`` in a row) or the
    scale collapses below ``amp_min_scale`` (then the unscaled gradients themselves overflow: an explosion, not
    an AMP transient). Without a scaler, ``on_nonfinite`` decides; ``"skip"`` escalates to a raise after
    ``max_consecutive_skips`` skipped steps in a row.
    """

    def __init__(
        self,
        on_nonfinite: Literal["raise", "skip", "warn"] = "raise",
        max_consecutive_skips: int = 5,
        amp_max_consecutive_overflows: int = 20,
        amp_min_scale: float = 1.0,
    ) -> None:
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.amp_max_consecutive_overflows = amp_max_consecutive_overflows
        self.amp_min_scale = amp_min_scale
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.amp_overflows = 0
        self.consecutive_overflows = 0

    def nonfinite(self, amp_scale: float | None) -> Decision:
        """Decide for a step whose gradient norm is non-finite. ``amp_scale``: the loss scale, if a scaler is on."""
        if amp_scale is not None:
            self.amp_overflows += 1
            self.consecutive_overflows += 1
            if self.consecutive_overflows >= self.amp_max_consecutive_overflows or amp_scale < self.amp_min_scale:
                return "amp_collapse"
            return "amp_overflow"
        if self.on_nonfinite == "skip":
            self.skipped_steps += 1
            self.consecutive_skips += 1
            return "skip_limit" if self.consecutive_skips >= self.max_consecutive_skips else "skip"
        return self.on_nonfinite

    def skipped(self) -> Decision:
        """Count a step skipped for another reason (a spike); ``"skip_limit"`` after too many in a row."""
        self.skipped_steps += 1
        self.consecutive_skips += 1
        return "skip_limit" if self.consecutive_skips >= self.max_consecutive_skips else "skip"

    def finite(self) -> None:
        """A healthy step: reset the consecutive counters."""
        self.consecutive_skips = 0
        self.consecutive_overflows = 0

    def state_dict(self) -> dict[str, Any]:
        """Counters."""
        return {
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "amp_overflows": self.amp_overflows,
            "consecutive_overflows": self.consecutive_overflows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        for key in ("skipped_steps", "consecutive_skips", "amp_overflows", "consecutive_overflows"):
            setattr(self, key, int(state.get(key, 0)))


FP16_MAX = 65504.0
"""The largest finite float16."""


def amp_fixes(record: StepStats) -> tuple[str, ...]:
    """The fixes of an fp16 overflow under a GradScaler, most useful first (Micikevicius et al., 2018).

    fp16 tops out at 65504: with a loss scale, a large loss or large activations overflow it. bf16 has float32's
    range and needs no scaler, so it comes first; then a smaller loss (what is scaled), then the scaler's settings.
    """
    parts = [f"the loss is {record.loss:.3g}"] if record.loss is not None and math.isfinite(record.loss) else []
    parts += [f"scaled by {record.amp_scale:g}"] if record.amp_scale else []
    detail = f" ({', '.join(parts)})" if parts else ""
    return (
        "train in bf16 instead of fp16: precision='bf16-mixed' (Trainer/Fabric) or torch.autocast(device_type, "
        "dtype=torch.bfloat16) without a GradScaler: bf16 has float32's range, so nothing overflows at "
        f"{FP16_MAX:g}",
        f"keep the loss and activations small under fp16{detail}: average instead of summing, normalise the "
        "targets, drop a constant factor on the loss, keep the softmax and the loss in float32",
        "tune the GradScaler: a lower init_scale (torch.amp.GradScaler(init_scale=2.0**10)) and a longer "
        "growth_interval (e.g. 4000) so that fewer steps overflow while it finds its scale",
    )


def nonfinite_fixes(record: StepStats) -> tuple[str, ...]:
    """The fixes of a non-finite step, most likely first.

    Under a GradScaler (``record.amp_scale`` set) an overflow of fp16 is the likely cause: bf16, a smaller loss and
    the scaler's settings lead (:func:`amp_fixes`), before where the replay found it born. A non-finite loss (read
    with the statistics) means the forward pass or the loss produced the NaN/Inf, not an update that was too large:
    numerical stability comes first then.
    """
    if record.amp_scale is not None or record.amp_overflow:
        rest = [fix for fix in _unscaled_fixes(record) if "bf16" not in fix]
        return (*amp_fixes(record), *rest)
    return _unscaled_fixes(record)


def _unscaled_fixes(record: StepStats) -> tuple[str, ...]:
    fixes = FIXES[Kind.NONFINITE]
    born = record.nonfinite_birth or ""
    if born.startswith("Born in `"):  # the replay named a module: what to do there comes first
        module = born.split("`")[1]
        there = (
            f"guard the operation in `{module}` that made it: clamp the input of log/sqrt/pow, add an eps to "
            "divisions and norms, or compute that module in float32"
            if "(forward)" in born
            else f"`{module}`'s backward produced it (a custom backward, or an op whose derivative is unbounded at its "
            "input: sqrt or log at 0, acos at ±1): add an eps there"
        )
        return (there, *fixes)
    if born.startswith("Born in the loss") or (record.loss is not None and not math.isfinite(record.loss)):
        stable = [fix for fix in fixes if "numerically stable" in fix]
        return (*stable, *(fix for fix in fixes if fix not in stable))
    return fixes


def format_nonfinite_message(
    record: StepStats, reason: str, max_layers: int = 5, micro_batches: bool = True, note: str = ""
) -> str:
    """The message of a fail-fast error: where, which layers, what to do.

    Args:
        record: The full record of the failing step (with exact NaN/Inf counts).
        reason: Why the run stops (first line).
        max_layers: How many offending layers to name.
        micro_batches: Whether the step accumulates several micro-batches (then the first bad one is named).
        note: A line right after the first one.

    Returns:
        A multi-line message.
    """
    micro = record.first_nonfinite_micro_batch if micro_batches else None
    lines = [
        f"{reason} at step {record.step} (global step {record.global_step}, epoch {record.epoch}, "
        f"{'last batch' if micro is not None else 'batch'} {record.batch_idx}"
    ]
    if micro is not None:  # (the step's batches end at batch_idx; the first that went bad is this one)
        lines[0] += f", micro-batch {micro} (counted from 0) of the accumulated step"
    lines[0] += ")."
    if note:  # (a deferred guard: when the step was read, and what became of its update)
        lines.append(note)
    if record.nonfinite_birth is not None:  # the replay's answer leads (birth.py)
        lines.append(record.nonfinite_birth)
    bad = [lay for lay in record.layers if lay.nan_count or lay.inf_count]
    if not record.counts_exact:  # read without a host sync: the layers are known by their norms, not counted
        bad = list(record.nonfinite_layers)
        lines.append("Non-finite layers, in definition order (entries not counted: read without a host sync):")
        lines += [f"  {lay.name}: gradient norm {lay.grad_norm}" for lay in bad[:max_layers]]
        if len(bad) > max_layers:
            lines.append(f"  ... and {len(bad) - max_layers} more layer(s)")
    elif bad:
        lines.append("First offending layers, in definition order:")
        for lay in bad[:max_layers]:
            lines.append(f"  {lay.name}: {lay.nan_count} NaN, {lay.inf_count} Inf of {lay.numel:,} gradient entries")
        if len(bad) > max_layers:
            lines.append(f"  ... and {len(bad) - max_layers} more layer(s)")
    elif record.loss is not None and not math.isfinite(record.loss):
        lines.append(
            f"No gradient entry is NaN or Inf: the loss itself is {record.loss} (the forward pass or the loss function "
            "produced it; its gradient happens to be finite)."
        )
    elif record.layers:
        huge = [lay.name for lay in record.layers if not lay.is_finite]
        lines.append(
            "No gradient entry is NaN or Inf: the gradients are finite but so large that their norm overflows "
            f"float32 (exploding gradients), first in {', '.join(huge[:max_layers]) or 'the global norm'}."
        )
    corrupt = [lay.name for lay in record.layers if not math.isfinite(lay.param_norm)] if record.counts_exact else []
    if corrupt:
        lines.append(
            "The parameters of " + ", ".join(corrupt[:max_layers]) + " are non-finite: an earlier update corrupted "
            "them (a non-finite weight makes every later gradient non-finite)."
        )
    lines.append("Fixes:")
    lines += [f"  {i}. {fix}" for i, fix in enumerate(nonfinite_fixes(record), 1)]
    return "\n".join(lines)


def amp_overflow_finding(history: History, find: Callable[..., Any]) -> Any:
    """The finding of a run whose non-finite steps are GradScaler overflows of fp16, or None when some are not.

    A scaler skips the update of an overflowing step and halves its scale: a few such steps while it finds its
    scale are the normal working of mixed precision: a warning when the run recovered (its latest record is
    finite) with a scale above 1, critical when it still overflows or the scale fell to 1 or below (the unscaled
    gradients themselves are at the edge of fp16's range: the loss is too large, not a transient). The summary
    says what happened to the scale, not "non-finite in every layer" (one overflowing fp16 op makes every gradient
    upstream of it non-finite). Its fixes lead with bf16, a smaller loss and the scaler's settings
    (:func:`amp_fixes`).

    Args:
        history: The kept records (its first non-finite record is an overflow under a scaler).
        find: Makes the finding (``rules._finder``): ``find(kind, severity, summary, **fields)``.
    """
    first, last = history.first_nonfinite, history.last_nonfinite or history.first_nonfinite
    if first is None or last is None or not (first.amp_overflow and last.amp_overflow):
        return None
    recovered = bool(history.steps) and history.steps[-1] > last.step
    collapsed = last.amp_scale is not None and last.amp_scale <= 1.0  # the unscaled gradients barely fit fp16
    scales = f"; its loss scale went from {first.amp_scale:g} to {last.amp_scale:g}" if first.amp_scale else ""
    count = history.nonfinite_records
    summary = (
        f"the GradScaler skipped the update of {count} recorded step(s) for an fp16 overflow (steps {first.step} to "
        f"{last.step}){scales}: " + ("it then found a scale that fits, but" if recovered else "it still overflows:")
        + " the loss or activations are too large for fp16's range."
    )
    finding = find(
        Kind.NONFINITE, Severity.WARNING if recovered and not collapsed else Severity.CRITICAL, summary,
        layers=tuple(lay.name for lay in first.nonfinite_layers),
        evidence={"step": first.step, "last_step": last.step, "amp_overflow": True, "nonfinite_records": count,
                  "first_scale": first.amp_scale, "last_scale": last.amp_scale, "recovered": recovered},
    )  # fmt: skip
    rest = (fix for fix in finding.fixes if "bf16" not in fix)
    return replace(finding, fixes=tuple(dict.fromkeys((*amp_fixes(last), *rest))))
