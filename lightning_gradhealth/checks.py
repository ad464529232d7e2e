"""Threshold checks: a record (or a bare global norm) in, alerts out. Pure functions, no state."""

from __future__ import annotations

import math
from collections.abc import Collection

from lightning_gradhealth.alerts import Alert
from lightning_gradhealth.fixes import FIXES
from lightning_gradhealth.record import StepStats
from lightning_gradhealth.thresholds import Severity, Thresholds

__all__ = ["check_global_norm", "check_record"]


def _alert(kind: str, sev: Severity, rec_step: int, msg: str, fix_kind: str, **kw: object) -> Alert:
    return Alert(kind=kind, severity=sev, step=rec_step, message=f"{msg} Fix: {FIXES[fix_kind][0]}.", **kw)  # type: ignore[arg-type]


def check_global_norm(
    total_norm: float, step: int, th: Thresholds, *, steps_seen: int, epoch: int = 0, batch_idx: int = 0
) -> list[Alert]:
    """Checks of the global gradient norm (available on every optimizer step).

    Args:
        total_norm: The global gradient norm (finite; non-finite steps are handled by the non-finite policy).
        step: The Trainer's logging step.
        th: Thresholds.
        steps_seen: Optimizer steps seen so far in the run (for the warm-up of the "too small" check).
        epoch: For the alert.
        batch_idx: For the alert.

    Returns:
        Zero, one or two alerts.
    """
    out: list[Alert] = []
    if not math.isfinite(total_norm):
        return out
    where = {"epoch": epoch, "batch_idx": batch_idx, "value": total_norm}
    sev = th.grade_high("total_norm_high", total_norm)
    if sev is not Severity.OK:
        line = th.total_norm_high_critical if sev is Severity.CRITICAL else th.total_norm_high_warning
        what = "exploding" if sev is Severity.CRITICAL else "potentially exploding"
        msg = f"global gradient norm {total_norm:.3g} > {line:g}: {what} gradients."
        out.append(_alert("total_norm_high", sev, step, msg, "exploding", threshold=line, **where))
    if steps_seen >= th.warmup_steps:
        sev = th.grade_low("total_norm_low", total_norm)
        if sev is not Severity.OK:
            line = th.total_norm_low_critical if sev is Severity.CRITICAL else th.total_norm_low_warning
            msg = f"global gradient norm {total_norm:.3g} < {line:g}: vanishing gradients, little or no learning."
            out.append(_alert("total_norm_low", sev, step, msg, "vanishing", threshold=line, **where))
    return out


def check_record(
    record: StepStats, th: Thresholds, *, steps_seen: int, sparse_layers: Collection[str] = ()
) -> list[Alert]:
    """Per-layer and ratio checks of a full record (logged steps). The global norm is checked separately.

    Args:
        record: The step's record.
        th: Thresholds.
        steps_seen: Optimizer steps seen so far (checks of scale-dependent values wait ``th.warmup_steps``).
        sparse_layers: Layers whose gradients are sparse by design (embeddings): left out of the zero fraction.

    Returns:
        The alerts, global ones first, then per layer in definition order.
    """
    out: list[Alert] = []
    if not record.is_finite:
        return out
    where = {"epoch": record.epoch, "batch_idx": record.batch_idx}
    sev = th.grade_high("layer_norm_ratio", record.layer_norm_ratio)
    if sev is not Severity.OK:
        line = getattr(th, f"layer_norm_ratio_{sev.value}")
        msg = (
            f"layer gradient norms span a factor of {record.layer_norm_ratio:.3g} (> {line:g}): gradients do not flow "
            "evenly through the network."
        )
        out.append(
            _alert(
                "layer_norm_ratio",
                sev,
                record.step,
                msg,
                "layer_imbalance",
                value=record.layer_norm_ratio,
                threshold=line,
                **where,
            )
        )
    if steps_seen < th.warmup_steps:
        return out
    dense = [lay for lay in record.layers if lay.name not in sparse_layers]
    if record.layers:
        zeros = sum(lay.zero_frac * lay.numel for lay in dense)
        numel = sum(lay.numel for lay in dense)
        zero_frac = zeros / numel if numel else 0.0
    else:
        zero_frac = record.zero_frac
    sev = th.grade_high("zero_frac", zero_frac)
    if sev is not Severity.OK:
        line = getattr(th, f"zero_frac_{sev.value}")
        msg = f"{zero_frac:.0%} of gradient entries are exactly zero (> {line:.0%}): many dead units."
        out.append(_alert("zero_frac", sev, record.step, msg, "dead", value=zero_frac, threshold=line, **where))
    for lay in record.layers:
        sev = th.grade_low("layer_norm_low", lay.grad_norm)
        if sev is not Severity.OK:
            line = getattr(th, f"layer_norm_low_{sev.value}")
            msg = f"layer {lay.name}: gradient norm {lay.grad_norm:.3g} < {line:g}: vanishing gradient in this layer."
            out.append(
                _alert(
                    "layer_vanishing",
                    sev,
                    record.step,
                    msg,
                    "vanishing",
                    layer=lay.name,
                    value=lay.grad_norm,
                    threshold=line,
                    **where,
                )
            )
        if lay.param_norm <= 0:
            continue
        sev = th.grade_high("grad_param_ratio_high", lay.ratio)
        if sev is not Severity.OK:
            line = getattr(th, f"grad_param_ratio_high_{sev.value}")
            msg = f"layer {lay.name}: grad/param ratio {lay.ratio:.3g} > {line:g}: updates too large for the weights."
            out.append(
                _alert(
                    "ratio_high",
                    sev,
                    record.step,
                    msg,
                    "ratio_high",
                    layer=lay.name,
                    value=lay.ratio,
                    threshold=line,
                    **where,
                )
            )
        sev = th.grade_low("grad_param_ratio_low", lay.ratio)
        if sev is not Severity.OK and lay.grad_norm > 0:
            line = getattr(th, f"grad_param_ratio_low_{sev.value}")
            msg = f"layer {lay.name}: grad/param ratio {lay.ratio:.3g} < {line:g}: gradients too small to matter."
            out.append(
                _alert(
                    "ratio_low",
                    sev,
                    record.step,
                    msg,
                    "ratio_low",
                    layer=lay.name,
                    value=lay.ratio,
                    threshold=line,
                    **where,
                )
            )
    return out
