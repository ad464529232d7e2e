"""Threshold checks: a record (or a bare global norm) in, alerts out. Pure functions, no state."""

from __future__ import annotations

import math
from collections.abc import Collection

from lightning_gradhealth.alerts import Alert
from lightning_gradhealth.fixes import FIXES
from lightning_gradhealth.kinds import Kind
from lightning_gradhealth.record import StepStats
from lightning_gradhealth.thresholds import Severity, Thresholds

__all__ = ["check_global_norm", "check_record"]


def _check(
    out: list[Alert],
    th: Thresholds,
    check: str,
    value: float,
    *,
    high: bool,
    kind: str,
    message: str,
    step: int,
    epoch: int,
    batch_idx: int,
    layer: str | None = None,
) -> None:
    """Grade ``value`` against the ``<check>_warning`` / ``<check>_critical`` lines; append an alert if it fires.

    ``message`` is formatted with ``value``, ``line`` (the line crossed) and ``layer``; the first fix of ``kind``
    (a :class:`~lightning_gradhealth.kinds.Kind`) is appended to it.
    """
    sev = th.grade_high(check, value) if high else th.grade_low(check, value)
    if sev is Severity.OK:
        return
    line = getattr(th, f"{check}_{sev.value}")
    out.append(
        Alert(
            kind=kind,
            severity=sev,
            step=step,
            message=message.format(value=value, line=line, layer=layer) + f" Fix: {FIXES[kind][0]}.",
            layer=layer,
            value=value,
            threshold=line,
            epoch=epoch,
            batch_idx=batch_idx,
        )
    )


def check_global_norm(
    total_norm: float, step: int, th: Thresholds, *, steps_seen: int, epoch: int = 0, batch_idx: int = 0
) -> list[Alert]:
    """Checks of the global gradient norm (available on every optimizer step).

    Args:
        total_norm: The global gradient norm (non-finite steps are handled by the non-finite policy).
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
    where = {"step": step, "epoch": epoch, "batch_idx": batch_idx}
    msg = "global gradient norm {value:.3g} > {line:g}: exploding gradients."
    _check(out, th, "total_norm_high", total_norm, high=True, kind=Kind.EXPLODING, message=msg, **where)
    if steps_seen >= th.warmup_steps:
        msg = "global gradient norm {value:.3g} < {line:g}: vanishing gradients, little or no learning."
        _check(out, th, "total_norm_low", total_norm, high=False, kind=Kind.VANISHING, message=msg, **where)
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
    where = {"step": record.step, "epoch": record.epoch, "batch_idx": record.batch_idx}
    msg = "layer gradient norms span a factor of {value:.3g} (> {line:g}): gradients do not flow evenly."
    _check(out, th, "layer_norm_ratio", record.layer_norm_ratio, high=True, kind=Kind.LAYER_IMBALANCE, message=msg,
           **where)  # fmt: skip
    if steps_seen < th.warmup_steps:
        return out
    zero_frac = record.zero_frac
    if record.layers:
        dense = [lay for lay in record.layers if lay.name not in sparse_layers]
        numel = sum(lay.numel for lay in dense)
        zero_frac = sum(lay.zero_frac * lay.numel for lay in dense) / numel if numel else 0.0
    msg = "{value:.0%} of gradient entries are exactly zero (> {line:.0%}): many dead units."
    _check(out, th, "zero_frac", zero_frac, high=True, kind=Kind.DEAD, message=msg, **where)
    for lay in record.layers:
        msg = "layer {layer}: gradient norm {value:.3g} < {line:g}: vanishing gradient in this layer."
        _check(out, th, "layer_norm_low", lay.grad_norm, high=False, kind=Kind.VANISHING, message=msg,
               layer=lay.name, **where)  # fmt: skip
        if lay.param_norm <= 0:
            continue
        msg = "layer {layer}: grad/param ratio {value:.3g} > {line:g}: updates too large for the weights."
        _check(out, th, "grad_param_ratio_high", lay.ratio, high=True, kind=Kind.RATIO_HIGH, message=msg,
               layer=lay.name, **where)  # fmt: skip
        if lay.grad_norm > 0:
            msg = "layer {layer}: grad/param ratio {value:.3g} < {line:g}: gradients too small to matter."
            _check(out, th, "grad_param_ratio_low", lay.ratio, high=False, kind=Kind.RATIO_LOW, message=msg,
                   layer=lay.name, **where)  # fmt: skip
    return out
