"""Threshold checks: a record (or a bare global norm) in, alerts out. Pure functions, no state.

Every kind is graded by its one function of :mod:`~lightning_gradhealth.diagnosis.graded`, on a window of this one
record, the same function the end-of-run rules call on the recent records: here each line crossed becomes an alert
(a message and the kind's first fix).
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.advice import for_frontend
from lightning_gradhealth.diagnosis.fixes import fixes_for
from lightning_gradhealth.diagnosis.graded import (
    DEPTH_DECAY,
    Hit,
    Verdict,
    Window,
    dead,
    diverging,
    exploding,
    imbalance,
    ratio,
    vanishing,
)
from lightning_gradhealth.diagnosis.learning import loss_rising
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.schema.alert import Alert
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.schema.record import StepStats

__all__ = ["check_global_norm", "check_growth", "check_record"]

#: Each line's alert message, formatted with the ``value``, the ``line`` crossed and the ``layer``.
MESSAGES = {
    "total_norm_high": "global gradient norm {value:.3g} > {line:g}: exploding gradients.",
    "total_norm_low": "global gradient norm {value:.3g} < {line:g}: vanishing gradients, little or no learning.",
    "norm_growth": "global gradient norm {value:.3g}x its level early in the run (> {line:g}x): the updates are "
    "unstable.",
    "layer_norm_ratio": "the gradient norms of comparable layers span a factor of {value:.3g} (> {line:g}): "
    "gradients do not flow evenly.",
    DEPTH_DECAY: "gradients vanish toward the input: the first layers get {value:.1e} of the last layers' gradient "
    "(< {line:g}).",
    "dead_units": "{value:.0%} of the units (output rows or channels) get an exactly-zero gradient (> {line:.0%}): "
    "dead units.",
    "zero_frac": "{value:.0%} of gradient entries are exactly zero (> {line:.0%}): many dead units.",
    "layer_norm_low": "layer {layer}: gradient norm {value:.3g} < {line:g}: vanishing gradient in this layer.",
    "grad_param_ratio_high": "layer {layer}: grad/param ratio {value:.3g} > {line:g}: updates too large for the "
    "weights.",
    "grad_param_ratio_low": "layer {layer}: grad/param ratio {value:.3g} < {line:g}: gradients too small to matter.",
}


def _alert(
    hit: Hit,
    kind: str,
    where: dict[str, Any],
    *,
    message: str | None = None,
    fix: str | None = None,
) -> Alert:
    """``hit`` as an alert of ``kind``: its message (:data:`MESSAGES`) and the first fix of the kind (or ``fix``).

    ``where``: ``step``, ``epoch``, ``batch_idx``, and the ``inventory`` and ``frontend`` the fix is fitted to.
    """
    text = (message or MESSAGES[hit.check]).format(value=hit.value, line=hit.line, layer=hit.layer)
    first = fix or fixes_for(kind, where["inventory"])[0]
    return Alert(
        kind=kind,
        severity=hit.severity,
        step=where["step"],
        message=f"{text} Fix: {for_frontend(first, where['frontend'])}.",
        layer=hit.layer,
        value=hit.value,
        threshold=hit.line,
        epoch=where["epoch"],
        batch_idx=where["batch_idx"],
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
    if not math.isfinite(total_norm):
        return []
    where = {"step": step, "epoch": epoch, "batch_idx": batch_idx, "inventory": inventory, "frontend": frontend}
    window = Window.of_norms(total_norm)
    out = [_alert(hit, Kind.EXPLODING, where) for hit in _hits(exploding(window, th), "total_norm_high")]
    if steps_seen >= th.warmup_steps:
        out += [_alert(hit, Kind.VANISHING, where) for hit in _hits(vanishing(window, th), "total_norm_low")]
    return out


def _hits(verdict: Verdict | None, *checks: str) -> list[Hit]:
    """The hits of ``checks`` in ``verdict`` (every hit without ``checks``)."""
    if verdict is None:
        return []
    return verdict.of(*checks) if checks else list(verdict.hits)


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
    if not math.isfinite(total_norm) or early_norm <= 0:
        return []
    where = {"step": meta.step, "epoch": meta.epoch, "batch_idx": meta.batch_idx, "inventory": None,
             "frontend": frontend}  # fmt: skip
    known = loss is not None and early_loss is not None and math.isfinite(loss) and early_loss > 0
    window = Window.of_norms(total_norm, early_norm, loss if known else None, early_loss if known else None)
    grown = fixes_for(Kind.DIVERGING)[0]
    out = [_alert(hit, Kind.EXPLODING, where, fix=grown) for hit in _hits(exploding(window, th), "norm_growth")]
    message = (
        f"training diverges: the loss is {{value:.3g}}x its early level (> {{line:g}}x, {early_loss or 0:.3g} -> "
        f"{loss or 0:.3g}) and the gradient norm {window.growth:.3g}x."
    )
    out += [_alert(hit, Kind.DIVERGING, where, message=message) for hit in _hits(diverging(window, th), "loss_rise")]
    return out


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
    if not record.is_finite or steps_seen < th.warmup_steps:
        return []
    where = {"step": record.step, "epoch": record.epoch, "batch_idx": record.batch_idx, "inventory": inventory,
             "frontend": frontend}  # fmt: skip
    window = Window.of_record(record, inventory, frozenset(sparse_layers))
    rising = loss_rising(record.loss_summary)  # the loss above its start: no imbalance or raise-the-lr advice
    out: list[Alert] = []
    if not rising and (spread := imbalance(window, th)) is not None:
        out.append(_alert(spread.worst, Kind.LAYER_IMBALANCE, where))
    if (units := dead(window, th)) is not None:
        out.append(_alert(units.worst, Kind.DEAD, where))
    layered: list[Alert] = []
    if (low := vanishing(window, th)) is not None:
        layers = [_alert(hit, Kind.VANISHING, where) for hit in low.of("layer_norm_low")]
        told = Severity.worst(a.severity for a in layers)
        if told.rank < low.severity.rank:  # the depth profile is worse than any layer's own line: say it too
            out += [_alert(hit, Kind.VANISHING, where) for hit in low.of(DEPTH_DECAY)]
        layered += layers
    layered += [_alert(hit, Kind.RATIO_HIGH, where) for hit in _hits(ratio(window, th, high=True))]
    if not rising:
        layered += [_alert(hit, Kind.RATIO_LOW, where) for hit in _hits(ratio(window, th, high=False))]
    depth = {name: j for j, name in enumerate(window.names)}
    return out + sorted(layered, key=lambda a: depth.get(a.layer, -1))  # stable: per layer, in the kinds' order
