"""Rules over the history of records: findings with evidence, fixes and code. Pure functions."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.advice import for_frontend
from lightning_gradhealth.diagnosis.fixes import CODE, code_for, fixes_for
from lightning_gradhealth.diagnosis.graded import DEPTH_DECAY, Window, dead, exploding, imbalance, ratio, vanishing
from lightning_gradhealth.diagnosis.grading import (
    EARLY,
    baseline,
    compared_layers,
    layer_spread,
    layers_of,
    median,
    series,
    worst_of,
)
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.diagnosis.learning import instability, settle, stall
from lightning_gradhealth.diagnosis.safety import amp_overflow_finding, nonfinite_fixes
from lightning_gradhealth.diagnosis.through_time import recurrence
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.schema.kinds import Kind

__all__ = [
    "CODE",
    "EARLY",
    "Finding",
    "baseline",
    "compared_layers",
    "diagnose",
    "layer_spread",
]  # (CODE: the generic code to add, from fixes.py)


@dataclass(frozen=True)
class Finding:
    """One diagnosis.

    Attributes:
        kind: A :class:`~lightning_gradhealth.schema.kinds.Kind`: ``nonfinite``, ``exploding``, ``vanishing``, ``dead``,
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


def _finder(inventory: ModelInventory | None, frontend: str | None = None) -> Callable[..., Finding]:
    """Makes findings whose fixes and code fit ``inventory`` and the front-end.

    ``inventory``: the model's make-up (``None``: generic fixes); ``frontend``: its name (a loop is never told to
    change a ``Trainer`` argument).
    """

    def finding(
        kind: str, severity: Severity, summary: str, fix_kind: str | None = None, fixes: Sequence[str] = (), **kw: Any
    ) -> Finding:
        fixes = tuple(for_frontend(fix, frontend) for fix in (fixes or fixes_for(fix_kind or kind, inventory)))
        code = for_frontend(code_for(kind, inventory), frontend)
        return Finding(kind, severity, summary, fixes=fixes, code=code, **kw)

    return finding


def diagnose(
    history: History,
    th: Thresholds,
    *,
    sparse_layers: Collection[str] = (),
    inventory: ModelInventory | None = None,
    min_snapshots: int = 3,
) -> list[Finding]:
    """Run every rule over ``history``.

    Rules look at the recent quarter of the run (at least ``min_snapshots`` records) for states, at the latest
    records for a run that is blowing up now, and at the whole run for trends; a state that only showed in one
    record is not a finding. With an ``inventory`` the rules compare like with like: depth profiles and the spread
    of layer norms are read over the weight matrices of the main path (not embeddings against norm biases), and
    "dead" means units (output rows or channels whose whole gradient is zero), not zero entries.

    Args:
        history: The kept records.
        th: The thresholds the states are judged by.
        sparse_layers: Layers with sparse gradients by design (embeddings), left out of the "dead" rule.
        inventory: What the model is made of (:func:`~lightning_gradhealth.model.inventory.take_inventory`): the layers
            compared, and fixes that fit the model.
        min_snapshots: Fewer kept records than this: only non-finite and no-gradient findings.

    Returns:
        Findings, critical first, then in the order of the rules.
    """
    find = _finder(inventory, history.facts.frontend if history.facts is not None else None)
    out: list[Finding] = []
    _nonfinite(history, find, out)
    recurrence(inventory, find, out)
    if history.no_grad_params:
        names = tuple(sorted(history.no_grad_params))
        out.append(find(
            Kind.NO_GRADIENT, Severity.WARNING, f"{len(names)} trainable parameter(s) never got a gradient.",
            layers=names, evidence={"parameters": list(names)},
        ))  # fmt: skip
    if len(history.steps) < min_snapshots:
        return _ordered(out)
    window = Window.of_history(history, inventory, frozenset(sparse_layers), min_snapshots)
    _exploding(window, th, find, out)
    instability(history, th, find, out, window.growth)  # (learning.py: the loss of every step)
    _flow(window, th, find, out)
    _dead(history, window, th, find, out)
    _ratios(window, th, find, out)
    _trends(history, th, find, out, min_snapshots, exploding=any(f.kind == Kind.EXPLODING for f in out))
    _updates(history, th, inventory, find, out, min_snapshots)
    if not any(f.kind == Kind.DIVERGING for f in out):
        stall(history, th, find, out)
    return _ordered(settle(out))


def _nonfinite(history: History, find: Callable[..., Finding], out: list[Finding]) -> None:
    first_bad = history.first_nonfinite
    if first_bad is None:
        return
    if first_bad.amp_overflow and (amp := amp_overflow_finding(history, find)) is not None:  # (issue 19: fp16)
        out.append(amp)
        return
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
    if layers and len(layers) == len(first_bad.layers) > 1:
        where = f", in every layer ({len(layers)}): it spread through the whole model within the step"
    else:
        where = f", first in {layers[0]}" if layers else ""
    born = f"{first_bad.nonfinite_birth} " if first_bad.nonfinite_birth else ""  # (the replay's answer leads)
    out.append(find(
        Kind.NONFINITE, Severity.CRITICAL,
        born + ("N" if born else "n") + (
            f"on-finite gradients at step {first_bad.step} ({first_bad.nan_count} NaN, {first_bad.inf_count} Inf)"
            if first_bad.nan_count or first_bad.inf_count or first_bad.amp_overflow
            else f"on-finite gradients at step {first_bad.step}"
            if not first_bad.counts_exact
            else f"on-finite norm at step {first_bad.step}: gradients so large that their norm overflows float32 "
            "(no NaN/Inf entry)"
        )
        + where + "." + spread,
        fixes=nonfinite_fixes(first_bad),  # (the exception's fixes, in its order)
        layers=layers,
        evidence={"step": first_bad.step, "nan_count": first_bad.nan_count, "inf_count": first_bad.inf_count,
                  "amp_overflow": first_bad.amp_overflow, "nonfinite_records": history.nonfinite_records,
                  "last_step": last_bad.step, "last_nan_count": last_bad.nan_count,
                  "last_inf_count": last_bad.inf_count, "params_nonfinite_from": history.nonfinite_params_step,
                  "born": first_bad.nonfinite_birth},
    ))  # fmt: skip


def _exploding(w: Window, th: Thresholds, find: Callable[..., Finding], out: list[Finding]) -> None:
    """Large norms now (the recent median, or the latest records all over a line), or grown far above the run's.

    Graded by :func:`~lightning_gradhealth.diagnosis.graded.exploding`; the run's own early level is its baseline.
    """
    verdict = exploding(w, th)
    if verdict is None:
        return
    ev = verdict.evidence
    grown = bool(verdict.of("norm_growth"))
    summary = (
        f"the global gradient norm is {ev['value']:.3g} over the latest steps"
        + (f", {w.growth:.3g}x its level early in the run ({w.early_norm:.3g}): the updates are unstable"
           if grown else "")
        + "."
    )  # fmt: skip
    out.append(find(
        Kind.EXPLODING, verdict.severity, summary,
        fix_kind=Kind.DIVERGING if grown else None,  # grown from a healthy start: the learning rate first
        layers=verdict.layers,
        evidence={"median_total_norm": ev["median_total_norm"], "latest_total_norm": ev["latest_total_norm"],
                  "early_total_norm": ev["early_total_norm"], "growth": ev["growth"],
                  "steps": [w.steps[0], w.steps[-1]], "largest_layers": ev["largest_layers"]},
    ))  # fmt: skip


def _flow(w: Window, th: Thresholds, find: Callable[..., Finding], out: list[Finding]) -> None:
    """Vanishing (a depth profile decaying toward the input, tiny layers, a tiny global norm) and layer imbalance.

    Graded by :func:`~lightning_gradhealth.diagnosis.graded.vanishing` and
    :func:`~lightning_gradhealth.diagnosis.graded.imbalance` (which leaves a depth decay to vanishing).
    """
    low = vanishing(w, th)
    if low is not None:
        ev = low.evidence
        decay = low.of(DEPTH_DECAY)
        tiny = low.of("layer_norm_low")
        if decay:
            text = f"gradients vanish toward the input: the first layers get {ev['early_over_late']:.1e} of the last "
            text += "layers' gradient" + (f"; {len(tiny)} layer(s) below {th.layer_norm_low_warning:g}" if tiny else "")
        elif tiny:
            text = f"{len(tiny)} layer(s) get almost no gradient"
        else:
            text = f"the global gradient norm is {ev['median_total_norm']:.3g} over the recent steps (< "
            text += f"{th.total_norm_low_warning:g}): little or no learning"
        evidence = {k: ev[k] for k in ("early_over_late", "early_norm", "late_norm", "layer_norms") if k in ev}
        if low.of("total_norm_low"):
            evidence["median_total_norm"] = ev["median_total_norm"]
        out.append(find(Kind.VANISHING, low.severity, text + ".", layers=low.layers, evidence=evidence))
    spread = imbalance(w, th)
    if spread is not None:
        out.append(find(
            Kind.LAYER_IMBALANCE, spread.severity,
            f"the gradient norms of comparable layers (the weight matrices of the repeated blocks) span a factor of "
            f"{spread.value:.3g}.",
            layers=spread.layers, evidence=spread.evidence,
        ))  # fmt: skip


def _dead(
    history: History, w: Window, th: Thresholds, find: Callable[..., Finding], out: list[Finding]
) -> None:
    """Dead units: output rows or channels whose whole gradient is zero in every recent record.

    Graded by :func:`~lightning_gradhealth.diagnosis.graded.dead`. Structure (padding taps, masked positions, unused
    embedding rows) leaves units alive. Sampled activation statistics count too.
    """
    act_dead: list[tuple[str, float]] = []
    saturated: list[tuple[str, float]] = []
    for name, samples in history.activations.items():
        last = samples[-3:]
        if len(last) < 2:
            continue
        if min(s[1] for s in last) > th.dead_units_warning:
            act_dead.append((name, statistics.mean(s[1] for s in last)))
        sats = [s[3] for s in last if s[3] is not None]
        if len(sats) == len(last) and min(sats) > th.saturation_warning:
            saturated.append((name, statistics.mean(sats)))
    for kind, hits, check, template, key in (
        (Kind.DEAD, act_dead, "dead_units", "{n} activation module(s) have more than {line:.0%} of their units zero "
         "for whole batches: dead units.", "dead_unit_frac"),
        (Kind.SATURATION, saturated, "saturation", "{n} sigmoid/tanh module(s) keep more than {line:.0%} of their "
         "outputs saturated: their gradients vanish.", "saturated_frac"),
    ):  # fmt: skip
        if hits:  # every hit is above the warning line; the worst one decides the severity
            out.append(find(
                kind, th.grade_high(check, max(v for _, v in hits)),
                template.format(n=len(hits), line=getattr(th, f"{check}_warning")),
                layers=tuple(name for name, _ in hits), evidence={key: dict(hits)},
            ))  # fmt: skip
    verdict = dead(w, th)
    if verdict is None:
        return
    units = verdict.worst.check == "dead_units"
    line = th.dead_units_warning if units else th.zero_frac_warning
    what = "of their units (output rows or channels) with an exactly-zero gradient" if units else (
        "of their gradient entries exactly zero")  # fmt: skip
    text = (
        f"{len(verdict.layers)} layer(s) have more than {line:.0%} {what} in every recent step: dead units."
        if verdict.layers
        else f"{verdict.value:.0%} of the {'units' if units else 'gradient entries'} get an exactly-zero gradient in "
        "every recent step: dead units."
    )
    out.append(find(Kind.DEAD, verdict.severity, text, layers=verdict.layers, evidence=verdict.evidence))


def _ratios(w: Window, th: Thresholds, find: Callable[..., Finding], out: list[Finding]) -> None:
    """Grad/param ratios of the weight matrices, persistently out of range.

    Graded by :func:`~lightning_gradhealth.diagnosis.graded.ratio`: the worst layer decides.
    """
    for high, check in ((True, "grad_param_ratio_high"), (False, "grad_param_ratio_low")):
        verdict = ratio(w, th, high=high)
        if verdict is not None:
            out.append(find(
                verdict.kind, verdict.severity,
                f"{len(verdict.hits)} layer(s) have a grad/param ratio {'above' if high else 'below'} "
                f"{getattr(th, f'{check}_warning'):g} over the recent steps.",
                layers=verdict.layers, evidence=verdict.evidence,
            ))  # fmt: skip


def _trends(
    history: History,
    th: Thresholds,
    find: Callable[..., Finding],
    out: list[Finding],
    min_snapshots: int,
    *,
    exploding: bool,
) -> None:
    """Spikes, and the global norm rising or decaying over the whole run."""
    if history.spikes:
        out.append(find(
            Kind.SPIKE, Severity.WARNING, f"{len(history.spikes)} gradient-norm spike(s), first at step "
            f"{history.spikes[0][0]}.", evidence={"spikes": [{"step": s, "z": z} for s, z in history.spikes]},
        ))  # fmt: skip
    finite = [(s, v) for s, v in zip(history.steps, history.total_norm, strict=True) if math.isfinite(v) and v > 0]
    if len(finite) < 2 * min_snapshots:
        return
    k = max(min_snapshots, len(finite) // 4)
    early = median([v for _, v in finite[:k]])
    late = median([v for _, v in finite[-k:]])
    rising = [b >= a for (_, a), (_, b) in pairwise(finite)]
    if late / early >= 10 and sum(rising) / len(rising) >= 0.6 and not exploding:
        out.append(find(
            Kind.RISING_TREND, Severity.WARNING,
            f"the global gradient norm rose steadily from {early:.3g} to {late:.3g}: building to an explosion.",
            evidence={"early": early, "late": late},
        ))  # fmt: skip
    losses = [v for v in history.loss if math.isfinite(v)]
    converged = len(losses) >= 2 * min_snapshots and median(losses[-k:]) <= median(losses[:k]) / 10
    if late / early <= 1e-2 and th.grade_low("total_norm_low", late) is not Severity.OK and not converged:
        out.append(find(
            Kind.DECAYING_TREND, Severity.WARNING,
            f"the global gradient norm decayed from {early:.3g} to {late:.3g}"
            + (" while the loss did not fall" if losses else "") + ": training is stalling.",
            evidence={"early": early, "late": late},
        ))  # fmt: skip


def _updates(
    history: History,
    th: Thresholds,
    inventory: ModelInventory | None,
    find: Callable[..., Finding],
    out: list[Finding],
    min_snapshots: int,
) -> None:
    """Update ratios ``‖Δθ‖ / ‖θ‖`` far from the ~1e-3 rule of thumb (Karpathy, CS231n; You et al., 2017, LARS)."""
    recent = history.recent()
    names = history.layer_names
    checks = ((Kind.RATIO_HIGH, "update_ratio_high", True), (Kind.RATIO_LOW, "update_ratio_low", False))
    for kind, check, high in checks:
        hits: list[tuple[str, float, Severity]] = []
        for j in layers_of(names, inventory, main_path=False):
            values = series(history.layer_update_ratio[recent], j)
            if len(values) < min_snapshots:
                continue
            m = statistics.median(values)
            grade = th.grade_high(check, m) if high else th.grade_low(check, m)
            if grade is not Severity.OK:
                hits.append((names[j], m, grade))
        if hits:
            line = getattr(th, f"{check}_warning")
            out.append(find(
                kind, worst_of(grade for _, _, grade in hits),
                f"{len(hits)} layer(s) move by {'more' if high else 'less'} than {line:g} of their weights per step "
                f"(update ratio ‖Δθ‖/‖θ‖, ~1e-3 is healthy): "
                + ("their learning rate is too high." if high else "they barely train."),
                layers=tuple(name for name, _, _ in hits), evidence={"median_update_ratio": {n: m for n, m, _ in hits}},
            ))  # fmt: skip


def _ordered(findings: list[Finding]) -> list[Finding]:
    """The findings in the order a reader should act on them.

    A critical explosion through time first (the cause of the run's NaN, whose fix is clipping, not an eps where the
    NaN surfaced), then non-finite gradients, the loss's instability (its fix comes first), critical findings.
    """
    return sorted(findings, key=lambda f: (not (f.kind == Kind.RECURRENT_EXPLODING and f.severity is Severity.CRITICAL),
                                           f.kind != Kind.NONFINITE, f.kind != Kind.DIVERGING,
                                           f.severity is not Severity.CRITICAL))  # fmt: skip
