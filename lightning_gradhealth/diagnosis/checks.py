"""Threshold checks: a record (or a bare global norm) in, alerts out. Pure functions, no state."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.advice import for_frontend
from lightning_gradhealth.diagnosis.fixes import fixes_for
from lightning_gradhealth.diagnosis.grading import compared_layers, depth_decay, layer_spread, norm_growth
from lightning_gradhealth.diagnosis.learning import loss_rising
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.schema.alert import Alert
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.schema.record import StepStats

__all__ = ["check_global_norm", "check_growth", "check_record"]


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
    inventory: ModelInventory | None = None,
    fix: str | None = None,
    frontend: str | None = None,
) -> None:
    """Grade ``value`` against the ``<check>_warning`` / ``<check>_critical`` lines; append an alert if it fires.

    ``message`` is formatted with ``value``, ``line`` (the line crossed) and ``layer``; the first fix of ``kind``
    (a :class:`~lightning_gradhealth.schema.kinds.Kind`), fitted to the ``frontend`` in use, is appended to it.
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
            message=message.format(value=value, line=line, layer=layer)
            + f" Fix: {for_frontend(fix or fixes_for(kind, inventory)[0], frontend)}.",
            layer=layer,
            value=value,
            threshold=line,
            epoch=epoch,
            batch_idx=batch_idx,
        )
    )


def check_global_norm(
    total_norm: float,
    step: int,
    th: Thresholds,
    *,
    steps_seen: int,
    epoch: int = 0,
    batch_idx: int = 0,
    inventory: ModelInventory | None = None,
    frontend: str | None = None,
) -> list[Alert]:
    """Checks of the global gradient norm (available on every optimizer step).

    Args:
        total_norm: The global gradient norm (non-finite steps are handled by the non-finite policy).
        step: The Trainer's logging step.
        th: Thresholds.
        steps_seen: Optimizer steps seen so far in the run (for the warm-up of the "too small" check).
        epoch: For the alert.
        batch_idx: For the alert.
        inventory: What the model is made of: the fixes fit it.
        frontend: The front-end's name (``Frontend.name``): the fixes fit it.

    Returns:
        Zero, one or two alerts.
    """
    out: list[Alert] = []
    if not math.isfinite(total_norm):
        return out
    where = {"step": step, "epoch": epoch, "batch_idx": batch_idx, "inventory": inventory, "frontend": frontend}
    msg = "global gradient norm {value:.3g} > {line:g}: exploding gradients."
    _check(out, th, "total_norm_high", total_norm, high=True, kind=Kind.EXPLODING, message=msg, **where)
    if steps_seen >= th.warmup_steps:
        msg = "global gradient norm {value:.3g} < {line:g}: vanishing gradients, little or no learning."
        _check(out, th, "total_norm_low", total_norm, high=False, kind=Kind.VANISHING, message=msg, **where)
    return out


def check_growth(
    total_norm: float,
    loss: float | None,
    early_norm: float,
    early_loss: float | None,
    meta: Any,
    th: Thresholds,
    frontend: str | None = None,
) -> list[Alert]:
    """The global norm, and the loss, against the run's own early level (the median of its first values).

    A norm grown ``norm_growth`` times over it means unstable updates whatever the absolute scale; a loss risen
    ``loss_rise`` times together with a norm grown as much means divergence. Both point at the learning rate.

    Args:
        total_norm: The step's global gradient norm.
        loss: The training loss, smoothed over every step since the previous computed step when known (one noisy
            batch is not a divergence).
        early_norm: The run's early global norm.
        early_loss: The run's early loss, when known.
        meta: Where the step is (``step``, ``epoch``, ``batch_idx``).
        th: Thresholds.
        frontend: The front-end's name: the fixes fit it.

    Returns:
        Zero, one or two alerts.
    """
    out: list[Alert] = []
    if not math.isfinite(total_norm) or early_norm <= 0:
        return out
    where = {"step": meta.step, "epoch": meta.epoch, "batch_idx": meta.batch_idx, "frontend": frontend}
    growth = norm_growth(total_norm, early_norm)
    msg = "global gradient norm {value:.3g}x its level early in the run (> {line:g}x): the updates are unstable."
    _check(out, th, "norm_growth", growth, high=True, kind=Kind.EXPLODING, message=msg, **where,
           fix=fixes_for(Kind.DIVERGING)[0])  # fmt: skip
    if loss is None or early_loss is None or not math.isfinite(loss) or early_loss <= 0:
        return out
    rise = loss / early_loss
    if growth >= th.loss_rise_warning:
        msg = (
            f"training diverges: the loss is {{value:.3g}}x its early level (> {{line:g}}x, {early_loss:.3g} -> "
            f"{loss:.3g}) and the gradient norm {growth:.3g}x."
        )
        _check(out, th, "loss_rise", rise, high=True, kind=Kind.DIVERGING, message=msg, **where)
    return out


def _decays_with_depth(record: StepStats, names: list[str], inventory: ModelInventory | None, th: Thresholds) -> bool:
    """Whether the main path's first quarter gets less than 1/``layer_norm_ratio_warning`` of its last quarter."""
    path = set(inventory.main_path(names)) if inventory is not None else set(names)
    norms = [lay.grad_norm for lay in record.layers if lay.name in path and lay.grad_norm > 0]
    return len(norms) >= 2 and depth_decay(norms)[2] < 1.0 / th.layer_norm_ratio_warning


def check_record(
    record: StepStats,
    th: Thresholds,
    *,
    steps_seen: int,
    sparse_layers: Collection[str] = (),
    inventory: ModelInventory | None = None,
    frontend: str | None = None,
) -> list[Alert]:
    """Per-layer and ratio checks of a full record (logged steps). The global norm is checked separately.

    With an ``inventory`` like is compared with like: the spread of layer norms over the weight matrices of the
    repeated blocks (not embeddings against norm biases), dead units (output rows or channels with an all-zero
    gradient) over the weight matrices but embeddings, low norms along the main path, grad/param ratios of weight
    matrices. Every check waits ``th.warmup_steps``: at initialisation extreme values are the rule.

    Args:
        record: The step's record.
        th: Thresholds.
        steps_seen: Optimizer steps seen so far.
        sparse_layers: Layers whose gradients are sparse by design (embeddings): never dead.
        inventory: What the model is made of (:func:`~lightning_gradhealth.model.inventory.take_inventory`).
        frontend: The front-end's name: the fixes fit it.

    Returns:
        The alerts, global ones first, then per layer in definition order.
    """
    out: list[Alert] = []
    if not record.is_finite or steps_seen < th.warmup_steps:
        return out
    where = {"step": record.step, "epoch": record.epoch, "batch_idx": record.batch_idx, "inventory": inventory,
             "frontend": frontend}  # fmt: skip
    names = [lay.name for lay in record.layers]
    if record.layers:
        spread = layer_spread([lay.grad_norm for lay in record.layers], compared_layers(names, inventory))
        ratio = record.layer_norm_ratio if spread is None else spread
    else:
        ratio = record.layer_norm_ratio
    msg = "the gradient norms of comparable layers span a factor of {value:.3g} (> {line:g}): gradients do not flow "
    msg += "evenly."
    rising = loss_rising(record.loss_summary)  # the loss above its start: no imbalance or raise-the-lr advice
    if not rising and not _decays_with_depth(record, names, inventory, th):  # (a depth pattern: vanishing)
        _check(out, th, "layer_norm_ratio", ratio, high=True, kind=Kind.LAYER_IMBALANCE, message=msg, **where)
    embeddings = set(sparse_layers) | (set(inventory.of_kind("embedding")) if inventory is not None else set())
    weights = set(inventory.comparable(names)) if inventory is not None else set(names)
    candidates = [lay for lay in record.layers if lay.name in weights and lay.name not in embeddings]
    with_units = [
        lay
        for lay in candidates
        if lay.units
        and lay.dead_unit_frac is not None
        and not (lay.dead_unit_frac >= 1.0 and lay.grad_norm > 0)  # zero inputs (dead upstream), live bias
    ]
    if with_units:
        units = sum(lay.units for lay in with_units)  # type: ignore[misc]
        dead = sum(lay.dead_unit_frac * lay.units for lay in with_units) / units  # type: ignore[operator]
        msg = "{value:.0%} of the units (output rows or channels) get an exactly-zero gradient (> {line:.0%}): dead "
        msg += "units."
        _check(out, th, "dead_units", dead, high=True, kind=Kind.DEAD, message=msg, **where)
    elif record.layers:  # no unit statistic: exact zero entries (convolutions left out: padding taps are zeros)
        dense = [lay for lay in candidates if inventory is None or inventory.kind_of(lay.name) != "conv"]
        numel = sum(lay.numel for lay in dense)
        zero_frac = sum(lay.zero_frac * lay.numel for lay in dense) / numel if numel else 0.0
        msg = "{value:.0%} of gradient entries are exactly zero (> {line:.0%}): many dead units."
        _check(out, th, "zero_frac", zero_frac, high=True, kind=Kind.DEAD, message=msg, **where)
    else:
        msg = "{value:.0%} of gradient entries are exactly zero (> {line:.0%}): many dead units."
        _check(out, th, "zero_frac", record.zero_frac, high=True, kind=Kind.DEAD, message=msg, **where)
    path = set(inventory.main_path(names)) if inventory is not None else set(names)
    for lay in record.layers:
        if lay.name in path and lay.grad_norm > 0:  # (exactly zero: dead units or no gradient, not vanishing)
            msg = "layer {layer}: gradient norm {value:.3g} < {line:g}: vanishing gradient in this layer."
            _check(out, th, "layer_norm_low", lay.grad_norm, high=False, kind=Kind.VANISHING, message=msg,
                   layer=lay.name, **where)  # fmt: skip
        if lay.param_norm <= 0 or lay.name not in weights:
            continue
        msg = "layer {layer}: grad/param ratio {value:.3g} > {line:g}: updates too large for the weights."
        _check(out, th, "grad_param_ratio_high", lay.ratio, high=True, kind=Kind.RATIO_HIGH, message=msg,
               layer=lay.name, **where)  # fmt: skip
        if lay.grad_norm > 0 and not rising:
            msg = "layer {layer}: grad/param ratio {value:.3g} < {line:g}: gradients too small to matter."
            _check(out, th, "grad_param_ratio_low", lay.ratio, high=False, kind=Kind.RATIO_LOW, message=msg,
                   layer=lay.name, **where)  # fmt: skip
    return out
