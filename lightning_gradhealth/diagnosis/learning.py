"""Rules over the training loss: is the run learning? Instability, stalls, frozen parts. Pure functions.

The loss of every optimizer step is summed up on the device (:mod:`~lightning_gradhealth.stats.loss`): each record
carries the mean, the largest value and the run's first loss since the previous record, so a blow-up between two
computed steps is seen, the baseline is the loss before any update, and what is judged is a smoothed loss, never one
noisy batch. The learning rate of each record comes from the optimizer's parameter groups, frozen parts and the
chance level from the model (:mod:`~lightning_gradhealth.model.frozen`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.advice import lr_fix
from lightning_gradhealth.diagnosis.graded import Window, diverging
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.schema.kinds import Kind

__all__ = [
    "EARLY_RISE",
    "SUSTAINED_STEPS",
    "frozen_words",
    "instability",
    "loss_rising",
    "lr_words",
    "settle",
    "smoothed_loss",
    "stall",
]

#: The loss, smoothed over the first computed step's window, this much above the run's first loss (taken before any
#: update), and one step of that window a further 10% above it: the run got worse from its very first updates.
EARLY_RISE = 1.03
#: A rise counts when it lasts this many optimizer steps (smoothed windows, or several computed steps): one noisy
#: batch is not a divergence.
SUSTAINED_STEPS = 8
#: The run's first steps, where a loss rising above its first value is an instability (a warm-up overshoot).
EARLY_STEPS = 2 * SUSTAINED_STEPS
#: Learning rates far above the usual range of an optimizer family (a loss rising at the start is then theirs).
_HIGH_LR = {"adaptive": 1e-2, "sgd": 1.0}
#: Kinds whose advice (raise a learning rate, per-layer rates, a stall) is wrong while the loss diverges: they are
#: symptoms of the same instability, named in its evidence instead.
_SYMPTOMS = (Kind.RATIO_LOW, Kind.LAYER_IMBALANCE, Kind.DECAYING_TREND, Kind.STALL)
#: The phrase of a learning-rate cut sized for a mild problem.
_MILD_CUT = "lower the learning rate (3-10x)"


def smoothed_loss(history: History) -> tuple[list[float], int]:
    """The smoothed loss of each kept record, and how many optimizer steps each one averages.

    The mean over every step since the previous record when the device summary is there; else the record's own loss
    (one batch: a rise must then last several records).
    """
    means = [v for v in history.loss_mean if math.isfinite(v)]
    summary = history.loss_summary
    if means and summary is not None:
        return means, max(1, summary.steps // max(1, history.records_seen))
    return [v for v in history.loss if math.isfinite(v)], 1


def loss_rising(summary: Any) -> bool:
    """Whether the run's smoothed loss (a ``LossSummary``) rose above its very first loss at some point.

    Once it did, the run's state is the damage of an unstable step size: advice to raise a learning rate (low
    ratios) or to rebalance layers is wrong, and the per-step checks hold it back, as the rules do (:func:`settle`).
    """
    if summary is None or not (math.isfinite(summary.peak) and math.isfinite(summary.start)) or summary.start <= 0:
        return False
    return summary.peak >= EARLY_RISE * summary.start


def _longest(flags: Sequence[bool]) -> int:
    """The longest run of ``True`` in ``flags``."""
    best = run = 0
    for flag in flags:
        run = run + 1 if flag else 0
        best = max(best, run)
    return best


def _lr_high(facts: Any, lr: float | None) -> bool:
    if lr is None or facts is None or not getattr(facts, "optimizer", None):
        return False
    family = "sgd" if "sgd" in facts.optimizer.lower() else "adaptive"
    return lr >= _HIGH_LR[family]


def _current_lr(history: History) -> float | None:
    rates = [v for v in history.lr if math.isfinite(v)]
    return rates[-1] if rates else None


def instability(history: History, th: Thresholds, find: Callable[..., Any], out: list[Any], norm_growth: float) -> None:
    """The loss rising: from the very first updates (often before the first computed step), or lasting, late on.

    ``norm_growth``: the global norm's growth over its early level (the rules' exploding check computed it).
    """
    smooth, per_record = smoothed_loss(history)
    summary, facts = history.loss_summary, history.facts
    start = summary.start if summary is not None and math.isfinite(summary.start) else math.nan
    early = summary.first if summary is not None and math.isfinite(summary.first) else math.nan
    if not math.isfinite(early):
        finite = [v for v in history.loss if math.isfinite(v)]
        early = statistics.median(finite[:3]) if len(finite) >= 3 else math.nan
    if not smooth or not math.isfinite(early) or early <= 0:
        return
    lr = _current_lr(history)
    highs = [v for v in history.loss_high if math.isfinite(v)]
    nonfinite = summary.nonfinite if summary is not None else 0
    base = start if math.isfinite(start) and start > 0 else early
    peak = max(highs) if highs else max(smooth)
    late = smooth[-1]
    need = max(2, math.ceil(SUSTAINED_STEPS / per_record))  # a lasting rise: SUSTAINED_STEPS steps, two records
    rise_late = min(smooth[-need:]) / early
    # graded as the per-step alert grades it (graded.py): the smallest of the latest losses over the early level
    lasting = diverging(Window(loss=tuple(smooth[-need:]) if len(smooth) >= need else (), early_loss=early,
                               growth=norm_growth), th)  # fmt: skip
    diverging_late = lasting is not None
    # the run's first steps (EARLY_STEPS of them, at least the first record): a loss that rises above where it started
    # there rose before anything could have helped it (a learning rate or warm-up too aggressive), whether the rise is
    # seen in the first record (logged rarely) or over the first few (logged often)
    k = max(1, sum(1 for s in history.steps if s < EARLY_STEPS)) if history.steps else 1
    first_high = highs[0] if highs else smooth[0]
    before_first = smooth[0] >= EARLY_RISE * base and first_high >= 1.1 * base
    window = [v for v in smooth[:k] if math.isfinite(v)]
    window_high = max((v for v in highs[:k] if math.isfinite(v)), default=first_high)
    in_window = bool(window) and max(window) >= EARLY_RISE * base and window_high >= 1.1 * base
    # a blow-up: the smoothed loss 2x its start over two records and SUSTAINED_STEPS steps at least (one batch, however
    # large, is not one)
    blowup = _longest([v >= th.loss_rise_warning * base for v in smooth]) >= max(2, SUSTAINED_STEPS / per_record)
    # a NaN loss corroborates a rise seen before the first record only (later, one NaN is the nonfinite finding's)
    strong = blowup or _lr_high(facts, lr) or norm_growth >= 3
    early_rise = (before_first and (strong or nonfinite > 0)) or (in_window and strong)
    if not (diverging_late or early_rise or blowup):
        return
    severe = max(smooth) >= th.loss_rise_critical * base or nonfinite > 0 or late >= base or _lr_high(facts, lr)
    steps = history.steps
    if early_rise and before_first:
        when = f"before the first computed step (step {steps[0]})"
    else:
        when = f"within its first {EARLY_STEPS} steps" if early_rise else f"by step {steps[-1]}"
    summary_text = (
        f"the training loss rose from {base:.3g} (its first step, before any update) to {peak:.3g} {when}"
        if not diverging_late
        else f"training diverges: the loss rose from {early:.3g} to {late:.3g} (smoothed over every step)"
        + (f" while the gradient norm grew {norm_growth:.3g}x" if math.isfinite(norm_growth) else "")
    )
    summary_text += (
        f"; it ends at {late:.3g}" + (" — above where it started" if late >= base else "") + "."
        if not diverging_late
        else "."
    )
    if nonfinite:
        summary_text += f" {nonfinite} step(s) had a NaN/Inf loss."
    if _lr_high(facts, lr):
        summary_text += f" {facts.optimizer} at lr {lr:g} is far above its usual range."
    # a lasting rise is graded on the alert's lines (one severity per kind); a rise from the first steps, by its damage
    if lasting is not None:
        severity = Severity.CRITICAL if nonfinite else lasting.severity
    else:
        severity = Severity.CRITICAL if severe else Severity.WARNING
    finding = find(
        Kind.DIVERGING, severity, summary_text,
        evidence={"first_loss": base, "early_loss": early, "peak_loss": peak, "late_loss": late,
                  "loss_rise": rise_late, "norm_growth": norm_growth, "nonfinite_losses": nonfinite,
                  "lr": lr, "steps_per_record": per_record},
    )  # fmt: skip
    fixes = (lr_fix(lr, severe), *(f for f in finding.fixes if not f.startswith("lower the learning rate")))
    code = finding.code
    if severe:  # (a tenth of a far too large learning rate is still too large)
        code = (
            "optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)  # SGD: lr=0.05, momentum=0.9\n"
            "warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=500)"
        )
    out.append(type(finding)(**{**vars(finding), "fixes": fixes, "code": code}))


def _flat(values: Sequence[float]) -> bool:
    """Whether ``values`` (a smoothed loss) stopped improving: the latest no more than 1% below the earliest."""
    return len(values) >= 2 and min(values[-2:]) >= 0.99 * values[0]


def stall(history: History, th: Thresholds, find: Callable[..., Any], out: list[Any]) -> None:
    """The loss stopped improving for a reason the run shows: the learning rate at 0, frozen layers, chance level."""
    smooth, per_record = smoothed_loss(history)
    facts = history.facts
    n = len(smooth)
    rates = list(history.lr)
    finite_rates = [v for v in rates if math.isfinite(v)]
    if n >= 4 and finite_rates and max(finite_rates) > 0 and len(rates) == len(history.steps):
        top = max(finite_rates)
        low = [math.isfinite(v) and v <= 1e-3 * top for v in rates]
        since = next((i for i in range(len(low)) if all(low[i:])), None)
        if since is not None and len(rates) - since >= max(2, len(rates) // 10) and _flat(smooth[max(0, since - 1) :]):
            out.append(find(
                Kind.STALL, Severity.WARNING,
                f"the learning rate fell to {rates[-1]:g} by step {history.steps[since]} (from {top:g}) and the loss "
                f"has not improved since ({smooth[max(0, since - 1)]:.3g} -> {smooth[-1]:.3g}): training stopped. "
                "The learning-rate schedule ends too early.",
                evidence={"lr_max": top, "lr_last": rates[-1], "lr_low_from_step": history.steps[since],
                          "loss_then": smooth[max(0, since - 1)], "loss_last": smooth[-1]},
            ))  # fmt: skip
            return
    flat = n >= 4 and _flat(smooth[n // 2 :])
    if facts is not None and facts.frozen and not facts.intended and facts.frozen_frac >= 0.1:
        names = facts.frozen_modules
        out.append(find(
            Kind.STALL, Severity.WARNING,
            f"{facts.frozen_frac:.0%} of the parameters are frozen (requires_grad=False) between trained layers: "
            f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}"
            + (f"; the loss stopped improving at {smooth[-1]:.3g}" if flat else "; they do not learn")
            + ". A frozen backbone sits before the trained layers; frozen layers in the middle are usually a "
            "mistake (a freeze not undone).",
            layers=tuple(names), evidence={"frozen_frac": facts.frozen_frac, "frozen_modules": list(names)},
        ))  # fmt: skip
        return
    chance = facts.chance_loss if facts is not None else None
    seen = history.loss_summary.steps if history.loss_summary is not None else n * per_record
    if chance is not None and flat and seen >= 50 and smooth[-1] >= 0.99 * chance:
        out.append(find(
            Kind.STALL, Severity.WARNING,
            f"the loss sits at chance level ({smooth[-1]:.3g}; a uniform guess over {facts.classes} classes scores "
            f"log({facts.classes}) = {chance:.3g}) and stopped improving: the model learns nothing from its inputs.",
            evidence={"loss_last": smooth[-1], "chance_loss": chance, "classes": facts.classes},
        ))  # fmt: skip


def settle(findings: list[Any]) -> list[Any]:
    """While the loss diverges, no finding advises raising a learning rate; the instability leads.

    Symptoms of the same instability (low grad/param ratios, layer imbalance, a decaying norm, a stall) are named
    in its evidence, not given their own (contrary) advice; a mild learning-rate cut elsewhere is sized like its.
    """
    lead = next((f for f in findings if f.kind == Kind.DIVERGING), None)
    if lead is None:
        return findings
    kept, symptoms = [], []
    for f in findings:
        if f.kind in _SYMPTOMS:
            symptoms.append(f.kind)
            continue
        if f is not lead and lead.fixes and any(fix.startswith(_MILD_CUT) for fix in f.fixes):
            fixes = tuple(lead.fixes[0] if fix.startswith(_MILD_CUT) else fix for fix in f.fixes)
            f = type(f)(**{**vars(f), "fixes": fixes})
        kept.append(f)
    if symptoms:
        lead.evidence["symptoms"] = sorted(set(symptoms))
    return kept


def lr_words(history: History) -> str:
    """The learning-rate trajectory over the computed steps, in a few values (``""`` when unknown)."""
    pairs = [(s, v) for s, v in zip(history.steps, history.lr, strict=False) if math.isfinite(v)]
    if not pairs:
        return ""
    runs: list[tuple[int, int, float]] = []  # (first step, last step, value): equal values in a row, merged
    for s, v in pairs:
        if runs and math.isclose(runs[-1][2], v, rel_tol=1e-9):
            runs[-1] = (runs[-1][0], s, v)
        else:
            runs.append((s, s, v))
    if len(runs) > 6:
        k = len(runs) - 1
        runs = [runs[round(i * k / 5)] for i in range(6)]
    return ", ".join(f"{v:.3g} (step{f' {a}' if a == b else f's {a}-{b}'})" for a, b, v in runs)


def frozen_words(facts: Any) -> str:
    """What is frozen, in words: nothing, an intended freeze (a backbone, adapters), or frozen layers in the middle."""
    if facts is None or not facts.total:
        return ""
    if not facts.frozen:
        return "none: every parameter trains"
    names = ", ".join(facts.frozen_modules[:6]) + (" ..." if len(facts.frozen_modules) > 6 else "")
    share = f"{facts.frozen_frac:.0%} of the parameters ({names or 'the whole model'})"
    if facts.frozen == facts.total:
        return f"{share}: nothing trains"
    if facts.intended:
        return (
            f"{share}: an intended freeze (frozen layers first and trained layers after: a frozen backbone with a "
            "trained head), not a problem"
        )
    return f"{share}, between trained layers: likely frozen by mistake"
