"""Rules over the history of records: findings with evidence, fixes and code. Pure functions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from lightning_gradhealth.fixes import CODE, code_for, fixes_for
from lightning_gradhealth.history import History
from lightning_gradhealth.inventory import ModelInventory
from lightning_gradhealth.kinds import Kind
from lightning_gradhealth.thresholds import Severity, Thresholds

__all__ = ["CODE", "Finding", "diagnose"]  # (CODE: the generic code to add, from fixes.py)


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        kind: A :class:`~lightning_gradhealth.kinds.Kind`: ``nonfinite``, ``exploding``, ``vanishing``, ``dead``,
            ``saturation``, ``layer_imbalance``, ``ratio_high``, ``ratio_low``, ``spike``, ``rising_trend``,
            ``decaying_trend`` or ``no_gradient``.
        severity: ``warning`` or ``critical``.
        summary: One sentence.
        layers: Layers concerned, in depth (definition) order.
        evidence: Numbers and steps behind the finding.
        fixes: Recommended fixes, most useful first.
        code: Code to add.
    """

    kind: str
    severity: Severity
    summary: str
    layers: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)
    fixes: tuple[str, ...] = ()
    code: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "kind": self.kind,
            "severity": self.severity.value,
            "summary": self.summary,
            "layers": list(self.layers),
            "evidence": self.evidence,
            "fixes": list(self.fixes),
            "code": self.code,
        }


def _finder(inventory: ModelInventory | None) -> Callable[..., Finding]:
    """Makes findings whose fixes and code fit ``inventory`` (the model's make-up; ``None``: generic fixes)."""

    def finding(kind: str, severity: Severity, summary: str, fix_kind: str | None = None, **kw: Any) -> Finding:
        fixes = fixes_for(fix_kind or kind, inventory)
        return Finding(kind, severity, summary, fixes=fixes, code=code_for(kind, inventory), **kw)

    return finding


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def diagnose(
    history: History,
    th: Thresholds,
    *,
    sparse_layers: Collection[str] = (),
    inventory: ModelInventory | None = None,
    min_snapshots: int = 3,
) -> list[Finding]:
    """Run every rule over ``history``.

    Rules look at the recent quarter of the run (at least ``min_snapshots`` records) for states, and at the
    whole run for trends; a state that only showed in one record is not a finding.

    Args:
        history: The kept records.
        th: The thresholds the states are judged by.
        sparse_layers: Layers with sparse gradients by design (embeddings), left out of the "dead" rule.
        inventory: What the model is made of (:func:`~lightning_gradhealth.inventory.take_inventory`): fixes fit it.
        min_snapshots: Fewer kept records than this: only non-finite and no-gradient findings.

    Returns:
        Findings, critical first, then in the order of the rules above.
    """
    _finding = _finder(inventory)
    out: list[Finding] = []
    first_bad = history.first_nonfinite
    if first_bad is not None:
        layers = tuple(lay.name for lay in first_bad.nonfinite_layers)
        last_bad = history.last_nonfinite or first_bad
        spread = ""
        if history.nonfinite_records > 1:
            where = f" in {len(last_bad.nonfinite_layers)} layer(s)" if last_bad.layers else ""
            spread = (
                f" {history.nonfinite_records} recorded steps were non-finite, the last at step {last_bad.step}{where}."
            )
        if history.nonfinite_params_step is not None:
            spread += (
                f" The weights themselves are non-finite from step {history.nonfinite_params_step}: the run cannot "
                f"recover; restart from a checkpoint saved before step {first_bad.step}."
            )
        out.append(_finding(
            Kind.NONFINITE, Severity.CRITICAL,
            (
                f"non-finite gradients at step {first_bad.step} ({first_bad.nan_count} NaN, {first_bad.inf_count} Inf)"
                if first_bad.nan_count or first_bad.inf_count or first_bad.amp_overflow
                else f"gradients at step {first_bad.step} so large that their norm overflows float32 (no NaN/Inf entry)"
            )
            + (f", first in {layers[0]}" if layers else "") + "." + spread,
            layers=layers,
            evidence={"step": first_bad.step, "nan_count": first_bad.nan_count, "inf_count": first_bad.inf_count,
                      "amp_overflow": first_bad.amp_overflow, "nonfinite_records": history.nonfinite_records,
                      "last_step": last_bad.step, "last_nan_count": last_bad.nan_count,
                      "last_inf_count": last_bad.inf_count, "params_nonfinite_from": history.nonfinite_params_step},
        ))  # fmt: skip
    if history.no_grad_params:
        names = tuple(sorted(history.no_grad_params))
        out.append(_finding(
            Kind.NO_GRADIENT, Severity.WARNING, f"{len(names)} trainable parameter(s) never got a gradient.",
            fix_kind=Kind.VANISHING, layers=names, evidence={"parameters": list(names)},
        ))  # fmt: skip
    if len(history.steps) < min_snapshots:
        return _ordered(out)

    recent = history.recent()
    names = history.layer_names
    steps = history.steps
    # -------------------------------------------------------------- exploding: large norms, now or growing
    total_recent = _median(history.total_norm[recent])
    sev = th.grade_high("total_norm_high", total_recent)
    if sev is not Severity.OK:
        norms = [_median([row[j] for row in history.layer_norm[recent]]) for j in range(len(names))]
        finite = [(n, name) for n, name in zip(norms, names, strict=True) if math.isfinite(n)]
        top = tuple(name for _, name in sorted(finite, reverse=True)[:3])
        out.append(_finding(
            Kind.EXPLODING, sev, f"the global gradient norm is {total_recent:.3g} over the recent steps "
            f"(> {getattr(th, f'total_norm_high_{sev.value}'):g}).",
            layers=tuple(n for n in names if n in top),
            evidence={"median_total_norm": total_recent, "steps": [steps[recent.start], steps[-1]],
                      "largest_layers": list(top),
                      "first_over_last_layer": finite[0][0] / finite[-1][0] if finite and finite[-1][0] > 0
                      else math.nan},
        ))  # fmt: skip
    # -------------------------------------------------------------- vanishing: depth decay or tiny layers
    depth = [_median([row[j] for row in history.layer_norm[recent] if j < len(row)]) for j in range(len(names))]
    present = [(name, n) for name, n in zip(names, depth, strict=True) if math.isfinite(n)]
    if len(present) >= 2:
        head = present[: max(1, len(present) // 4)]
        tail = present[-max(1, len(present) // 4) :]
        early, late = _median([n for _, n in head]), _median([n for _, n in tail])
        decay = early / late if late > 0 else math.inf
        tiny = [name for name, n in present if th.grade_low("layer_norm_low", n) is not Severity.OK]
        if decay < 1.0 / th.layer_norm_ratio_warning or tiny:
            critical = decay < 1.0 / th.layer_norm_ratio_critical or any(
                th.grade_low("layer_norm_low", n) is Severity.CRITICAL for _, n in present
            )
            affected = tuple(name for name, n in present if n < late / th.layer_norm_ratio_warning) or tuple(tiny)
            out.append(_finding(
                Kind.VANISHING, Severity.CRITICAL if critical else Severity.WARNING,
                f"gradients vanish toward the input: the first layers get {decay:.1e} of the last layers' gradient"
                + (f"; {len(tiny)} layer(s) below {th.layer_norm_low_warning:g}" if tiny else "") + ".",
                layers=affected,
                evidence={"early_over_late": decay, "early_norm": early, "late_norm": late,
                          "layer_norms": {name: n for name, n in present}},
            ))  # fmt: skip
        elif max(n for _, n in present) / max(min(n for _, n in present), 1e-300) > th.layer_norm_ratio_warning:
            ratio = _median(history.layer_norm_ratio[recent])
            if th.grade_high("layer_norm_ratio", ratio) is not Severity.OK:
                out.append(_finding(
                    Kind.LAYER_IMBALANCE, th.grade_high("layer_norm_ratio", ratio),
                    f"layer gradient norms span a factor of {ratio:.3g}.",
                    layers=(min(present, key=lambda p: p[1])[0], max(present, key=lambda p: p[1])[0]),
                    evidence={"median_layer_norm_ratio": ratio},
                ))  # fmt: skip
    # -------------------------------------------------------------- dead: persistently zero gradients
    dead = []
    for j, name in enumerate(names):
        if name in sparse_layers:
            continue
        zeros = [row[j] for row in history.layer_zero_frac[recent] if j < len(row) and math.isfinite(row[j])]
        if len(zeros) >= min_snapshots and min(zeros) > th.zero_frac_warning:
            dead.append((name, statistics.mean(zeros)))
    # activation statistics, when sampled: units dead for whole batches, saturated outputs
    dead_units: list[tuple[str, float]] = []
    saturated: list[tuple[str, float]] = []
    for name, samples in history.activations.items():
        last = samples[-3:]
        if len(last) < 2:
            continue
        if min(s[1] for s in last) > th.dead_units_warning:
            dead_units.append((name, statistics.mean(s[1] for s in last)))
        sats = [s[3] for s in last if s[3] is not None]
        if len(sats) == len(last) and min(sats) > th.saturation_warning:
            saturated.append((name, statistics.mean(sats)))
    for kind, hits, check, template, key in (
        (Kind.DEAD, dead_units, "dead_units", "{n} activation module(s) have more than {line:.0%} of their units zero "
         "for whole batches: dead units.", "dead_unit_frac"),
        (Kind.SATURATION, saturated, "saturation", "{n} sigmoid/tanh module(s) keep more than {line:.0%} of their "
         "outputs saturated: their gradients vanish.", "saturated_frac"),
        (Kind.DEAD, dead, "zero_frac", "{n} layer(s) keep more than {line:.0%} of their gradient exactly zero in "
         "every recent step: dead units.", "mean_zero_frac"),
    ):  # fmt: skip
        if hits:  # every hit is above the warning line; the worst one decides the severity
            out.append(_finding(
                kind, th.grade_high(check, max(v for _, v in hits)),
                template.format(n=len(hits), line=getattr(th, f"{check}_warning")),
                layers=tuple(name for name, _ in hits), evidence={key: dict(hits)},
            ))  # fmt: skip
    # -------------------------------------------------------------- grad/param ratios, persistently
    for kind, check, high in (
        (Kind.RATIO_HIGH, "grad_param_ratio_high", True),
        (Kind.RATIO_LOW, "grad_param_ratio_low", False),
    ):
        hits = []
        for j, name in enumerate(names):
            values = [row[j] for row in history.layer_ratio[recent] if j < len(row) and math.isfinite(row[j])]
            if len(values) < min_snapshots:
                continue
            m = statistics.median(values)
            if (m > 0 or high) and (th.grade_high(check, m) if high else th.grade_low(check, m)) is not Severity.OK:
                hits.append((name, m))
        if hits:
            out.append(_finding(
                kind, Severity.WARNING,
                f"{len(hits)} layer(s) have a grad/param ratio {'above' if high else 'below'} "
                f"{getattr(th, f'{check}_warning'):g} over the recent steps.",
                layers=tuple(name for name, _ in hits), evidence={"median_ratio": dict(hits)},
            ))  # fmt: skip
    # -------------------------------------------------------------- spikes and trends over the run
    if history.spikes:
        out.append(_finding(
            Kind.SPIKE, Severity.WARNING, f"{len(history.spikes)} gradient-norm spike(s), first at step "
            f"{history.spikes[0][0]}.", evidence={"spikes": [{"step": s, "z": z} for s, z in history.spikes]},
        ))  # fmt: skip
    finite = [(s, v) for s, v in zip(steps, history.total_norm, strict=True) if math.isfinite(v) and v > 0]
    if len(finite) >= 2 * min_snapshots:
        k = max(min_snapshots, len(finite) // 4)
        early = _median([v for _, v in finite[:k]])
        late = _median([v for _, v in finite[-k:]])
        rising = [b >= a for (_, a), (_, b) in pairwise(finite)]
        if late / early >= 10 and sum(rising) / len(rising) >= 0.6:
            out.append(_finding(
                Kind.RISING_TREND, Severity.WARNING,
                f"the global gradient norm rose steadily from {early:.3g} to {late:.3g}: building to an explosion.",
                fix_kind=Kind.EXPLODING, evidence={"early": early, "late": late},
            ))  # fmt: skip
        if late / early <= 1e-2 and th.grade_low("total_norm_low", late) is not Severity.OK:
            out.append(_finding(
                Kind.DECAYING_TREND, Severity.WARNING,
                f"the global gradient norm decayed from {early:.3g} to {late:.3g}: training is stalling.",
                fix_kind=Kind.VANISHING, evidence={"early": early, "late": late},
            ))  # fmt: skip
    return _ordered(out)


def _ordered(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: f.severity is not Severity.CRITICAL)
