"""The Gradient Health Report: Markdown and JSON files (summary, issues, recommendations, code), PNG plots, console."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.grading import recent_medians
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.diagnosis.learning import frozen_words, lr_words, smoothed_loss
from lightning_gradhealth.diagnosis.rules import Finding
from lightning_gradhealth.output.layer_table import ICON, LAYER_ROWS, extra_columns, layer_rows, layer_table
from lightning_gradhealth.output.safe_io import clean, md_text, write_bytes, write_text
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.stats.noise import batch_advice

__all__ = [
    "LAYER_ROWS",
    "MODEL_JSON",
    "REPORT_JSON",
    "REPORT_MD",
    "console_summary",
    "layer_rows",
    "render_markdown",
    "report_dict",
    "write_report",
]

REPORT_MD = "gradient_health_report.md"
#: The model's inventory and the run's thresholds, written next to the logs when training starts (``gradhealth report``
#: reads both back).
MODEL_JSON = "gradient_health_model.json"
REPORT_JSON = "gradient_health_report.json"
#: The per-layer table of the Markdown report shows this many layers at each end of a deeper model.
PLOTS_HINT = "No PNG plots: matplotlib (a dependency) could not be imported (`pip install matplotlib`)."
_ICON = ICON


def _worst(severities: Iterable[Severity]) -> Severity:
    return Severity.worst(severities)


def _of(findings: Sequence[Finding], *kinds: str) -> Severity:
    """The worst severity of the findings of ``kinds``, ``ok`` if none."""
    return _worst(f.severity for f in findings if f.kind in kinds)


def _summary(history: History, findings: Sequence[Finding], th: Thresholds) -> list[tuple[str, str, Severity, tuple]]:
    """Summary rows ``(metric, value, status, kinds)``.

    Each status is the worst of the findings of its kinds and, for the global norm, the non-finite records and the
    zero fraction, of the last record against the thresholds.
    """
    last = len(history.steps) - 1
    rows: list[tuple[str, str, Severity, tuple]] = []
    if findings:
        crit = sum(f.severity is Severity.CRITICAL for f in findings)
        value = f"{len(findings)} ({crit} critical, {len(findings) - crit} warning)"
    else:
        value = "none"
    rows.append(
        ("Findings", value, _worst(f.severity for f in findings), tuple(dict.fromkeys(f.kind for f in findings)))
    )

    kinds: tuple = (Kind.EXPLODING, Kind.RISING_TREND, Kind.DECAYING_TREND)  # (diverging: the loss's row)
    total = history.total_norm[last] if last >= 0 else math.nan
    if not math.isfinite(total):
        total_sev = Severity.CRITICAL
    else:
        total_sev = _worst((th.grade_high("total_norm_high", total), th.grade_low("total_norm_low", total)))
    rows.append(("Total grad norm (last record)", f"{total:.4g}", _worst((total_sev, _of(findings, *kinds))), kinds))

    kinds = (Kind.NONFINITE,)
    nan_layers = history.worst_nonfinite_layers
    bad = Severity.CRITICAL if nan_layers or history.nonfinite_records else Severity.OK
    rows.append((
        "Layers with NaN/Inf gradients (worst record)",
        str(nan_layers) if nan_layers or not history.nonfinite_records or history.layer_names else "n/a",
        _worst((bad, _of(findings, *kinds))), kinds,
    ))  # fmt: skip
    bad = Severity.CRITICAL if history.nonfinite_records else Severity.OK
    rows.append(("Non-finite records", str(history.nonfinite_records), _worst((bad, _of(findings, *kinds))), kinds))

    kinds = (Kind.VANISHING, Kind.LAYER_IMBALANCE)
    spread = history.layer_norm_ratio[last] if last >= 0 and len(history.layer_names) > 1 else math.nan
    if math.isnan(spread) and history.nonfinite_records:
        kinds = (*kinds, Kind.NONFINITE)  # (not comparable on a non-finite record: not a healthy "n/a")
    rows.append((
        "Largest / smallest layer grad norm (last record)",
        f"{spread:.4g}" if not math.isnan(spread) else "n/a", _of(findings, *kinds), kinds,
    ))  # fmt: skip

    kinds = (Kind.DEAD,)
    zero = history.zero_frac[last] if last >= 0 else math.nan
    zero_sev = th.grade_high("zero_frac", zero) if math.isfinite(zero) else Severity.OK
    rows.append((
        "Zero-grad entries (last record)", f"{zero:.1%}" if math.isfinite(zero) else "n/a",
        _worst((zero_sev, _of(findings, *kinds))), kinds,
    ))  # fmt: skip

    kinds = (Kind.RATIO_HIGH, Kind.RATIO_LOW)
    medians = [m for m in recent_medians(history, "ratio") if math.isfinite(m)]
    rows.append((
        "Grad/param ratio, median over recent records (lowest – highest layer)",
        f"{min(medians):.3g} – {max(medians):.3g}" if medians else "n/a", _of(findings, *kinds), kinds,
    ))  # fmt: skip

    rows += _update_rows(history, findings)
    rows += _learning_rows(history, findings)

    kinds = (Kind.SPIKE,)
    rows.append(("Gradient-norm spikes", str(len(history.spikes)), _of(findings, *kinds), kinds))

    kinds = (Kind.NO_GRADIENT,)
    never = len(history.no_grad_params or ())
    rows.append(("Trainable parameters that never got a gradient", str(never), _of(findings, *kinds), kinds))

    kinds = (Kind.SATURATION,)
    saturated = [s[-1][3] for s in history.activations.values() if s and s[-1][3] is not None]
    if saturated or _of(findings, *kinds) is not Severity.OK:
        rows.append((
            "Saturated sigmoid/tanh outputs (worst module, last sample)",
            f"{max(saturated):.1%}" if saturated else "n/a", _of(findings, *kinds), kinds,
        ))  # fmt: skip
    covered = {kind for row in rows[1:] for kind in row[3]}  # a kind no row above shows (a new rule's) gets one
    others = tuple(dict.fromkeys(f.kind for f in findings if f.kind not in covered))
    if others:
        rows.append(("Other findings", ", ".join(others), _of(findings, *others), others))
    return rows


def _update_rows(history: History, findings: Sequence[Finding]) -> list[tuple[str, str, Severity, tuple]]:
    """Update size and batch size, when they were measured (``update_ratio``, ``grad_cosine``, ``noise_scale``)."""
    rows: list[tuple[str, str, Severity, tuple]] = []
    recent = history.recent()
    medians = [m for m in recent_medians(history, "update_ratio") if math.isfinite(m)]
    if medians:
        kinds = (Kind.RATIO_HIGH, Kind.RATIO_LOW)
        rows.append((
            "Update ratio ‖Δθ‖/‖θ‖ per step, median over recent records (lowest – highest layer; ~1e-3 is healthy)",
            f"{min(medians):.3g} – {max(medians):.3g}", _of(findings, *kinds), kinds,
        ))  # fmt: skip
    cosines = [c for c in history.grad_cosine[recent] if math.isfinite(c)]
    if cosines:
        rows.append(("Cosine of consecutive gradients, median over recent records",
                     f"{statistics.median(cosines):.3g}", Severity.OK, ()))  # fmt: skip
    noises = [v for v in history.noise_scale[recent] if math.isfinite(v)]  # (a noisy estimate: the recent median)
    unstable = _of(findings, Kind.DIVERGING, Kind.NONFINITE) is not Severity.OK
    if noises:  # (an unstable run's noise scale says nothing about its batch size)
        rows.append(("Batch size against the gradient noise scale (McCandlish et al., 2018), recent median",
                     "not judged: the run is unstable; fix the learning rate first" if unstable
                     else batch_advice(statistics.median(noises), history.batch_size), Severity.OK, ()))  # fmt: skip
    return rows


def _learning_rows(history: History, findings: Sequence[Finding]) -> list[tuple[str, str, Severity, tuple]]:
    """The training loss (every step, smoothed), the learning rate and what is frozen, when known."""
    rows: list[tuple[str, str, Severity, tuple]] = []
    summary, facts = history.loss_summary, history.facts
    smooth, _ = smoothed_loss(history)
    kinds: tuple = (Kind.DIVERGING, Kind.STALL)
    if summary is not None and smooth:
        value = (
            f"{summary.start:.4g} at the first step -> {smooth[-1]:.4g} now (mean since the previous record); "
            f"highest step {max(v for v in history.loss_high if math.isfinite(v)):.4g}"
            if any(math.isfinite(v) for v in history.loss_high) else f"{smooth[-1]:.4g}"
        )
        value += f"; {summary.nonfinite} NaN/Inf step(s)" if summary.nonfinite else ""
        chance = facts.chance_loss if facts is not None else None
        value += (
            f"; chance level log({facts.classes}) = {chance:.3g}" if chance is not None and facts is not None
            else "; chance level unknown (no final nn.Linear with 2+ outputs)"
        )
        rows.append((f"Training loss, every step ({summary.steps} steps)", value, _of(findings, *kinds), kinds))
    else:
        rows.append(("Training loss, every step", "not given to the monitor", _of(findings, *kinds), kinds))
    lrs = lr_words(history)
    if lrs:
        rows.append(("Learning rate (largest group, computed steps)", lrs, _of(findings, Kind.STALL), (Kind.STALL,)))
    words = frozen_words(facts)
    if words:
        status = Severity.OK if facts is None or facts.intended else _of(findings, Kind.STALL)
        rows.append(("Frozen parameters (requires_grad=False)", words, status, (Kind.STALL,)))
    return rows


def _json_number(v: float) -> float | str | None:
    return None if math.isnan(v) else (v if math.isfinite(v) else str(v))


def report_dict(
    history: History,
    findings: list[Finding],
    th: Thresholds,
    *,
    inventory: Any = None,
    plots: Sequence[str | Path] = (),
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The report as a JSON-ready dict.

    Summary rows, findings, the per-layer table, plots, how much was seen, the thresholds it was graded with and
    ``notes`` (warnings about its input, e.g. a truncated event file) under ``"warnings"``.
    """
    return {
        "summary": [
            {"metric": m, "value": v, "status": s.value, "kinds": list(k)}
            for m, v, s, k in _summary(history, findings, th)
        ],
        "findings": [f.to_dict() for f in findings],
        "records": history.records_seen,
        "steps": [history.steps[0], history.steps[-1]] if history.steps else [],
        "layers": list(history.layer_names),
        "layer_table": [
            {
                **row,
                **{k: _json_number(row[k]) for k in ("last_grad_norm", "median_ratio", "zero_frac",
                                                     *extra_columns(history))},
                "status": row["status"].value,
            }
            for row in layer_rows(history, findings, inventory)
        ],
        "plots": [Path(p).name for p in plots],
        "thresholds": th.to_dict(),
        "warnings": list(notes),
        "training": {
            "loss": None if history.loss_summary is None
            else {k: _json_number(v) if isinstance(v, float) else v for k, v in vars(history.loss_summary).items()},
            "lr": [[s, _json_number(v)] for s, v in zip(history.steps, history.lr, strict=False)],
            "model": None if history.facts is None else history.facts.to_dict(),
        },
        **({"recovery": [dict(r) for r in history.rollbacks]} if history.rollbacks else {}),
    }


def _caption(path: str | Path) -> str:
    return Path(path).stem.replace("_", " ")


def render_markdown(
    history: History,
    findings: list[Finding],
    th: Thresholds,
    *,
    inventory: Any = None,
    plots: Sequence[str | Path] = (),
    plots_note: str = "",
    notes: Sequence[str] = (),
) -> str:
    """The report in Markdown: a summary table, the issues, a per-layer table, recommendations and code to add.

    Args:
        history: The kept records.
        findings: The findings of :func:`~lightning_gradhealth.diagnosis.rules.diagnose`.
        th: The thresholds (the summary grades the last record against them).
        inventory: A :class:`~lightning_gradhealth.model.inventory.ModelInventory` or a mapping of layer name to kind,
            for a "Kind" column in the per-layer table (see :func:`layer_rows`).
        plots: PNG files next to the Markdown file, linked from a "Plots" section.
        plots_note: A sentence for the "Plots" section (e.g. why there are none).
        notes: Warnings about the input (e.g. a truncated event file), shown first.
    """
    lines = ["## Gradient Health Report", ""]
    lines += [f"> ⚠️ {md_text(note)}" for note in notes] + ([""] if notes else [])
    lines += [
        "### Summary",
        "| Metric | Value | Status |",
        "|--------|-------|--------|",
    ]
    lines += [f"| {m} | {md_text(v)} | {_ICON[s]} |" for m, v, s, _ in _summary(history, findings, th)]
    lines += ["", "### Issues Detected"]
    if not findings:
        lines.append("None: no rule fired over the run. ✅")
    for i, f in enumerate(findings, 1):
        shown = ", ".join(md_text(layer) for layer in f.layers[:8])
        where = f" Layers: {shown}{' ...' if len(f.layers) > 8 else ''}." if f.layers else ""
        head = f"{i}. {_ICON[f.severity]} **{md_text(f.kind)}** ({f.severity.value})"
        lines.append(f"{head}: {md_text(f.summary)}{where}")
    lines += layer_table(history, findings, inventory)
    lines += _recovery_section(history)
    lines += ["", "### Recommendations"]
    recs: list[str] = []
    for f in findings:
        recs += [fix for fix in f.fixes[:2] if fix not in recs]
    lines += [f"{i}. {md_text(r)}" for i, r in enumerate(recs, 1)] or ["Nothing to change."]
    codes: list[str] = []
    for f in findings:
        if f.code and f.code not in codes:
            codes.append(f.code)
    if codes:
        code = [clean(line) for line in "\n\n".join(codes).splitlines()]  # (no line of it can close the fence)
        lines += ["", "### Code to Add", "```python", *(" " + c if c.lstrip().startswith("`" * 3) else c for c in code),
                  "```"]  # fmt: skip
    if plots or plots_note:
        lines += ["", "### Plots"]
        for p in plots:
            lines += ["", f"![{md_text(_caption(p))}]({md_text(Path(p).name)})"]
        lines += ["", md_text(plots_note)] if plots_note else []
    lines += ["", f"_{history.records_seen} record(s) from step {history.steps[0] if history.steps else '-'} "
              f"to {history.steps[-1] if history.steps else '-'}._", ""]  # fmt: skip
    return "\n".join(lines)


def _recovery_section(history: History) -> list[str]:
    """Each rollback of recovery (``recover=``): where from and to, why, the batches skipped, the new LR factor."""
    if not history.rollbacks:
        return []
    lines = ["", "### Recovery", "| Step | Back to | Trigger | Skipped batches | LR factor | Why |",
             "|------|---------|---------|-----------------|-----------|-----|"]  # fmt: skip
    for r in history.rollbacks:
        lines.append(f"| {r['step']} | {r['to_step']} | {r['trigger']} | {r['skipped'][0]}-{r['skipped'][1]} | "
                     f"{r['factor']:.3g} | {r['reason']} |")  # fmt: skip
    return lines


def _write_plots(history: History, out: Path, findings: Sequence[Finding], th: Thresholds) -> tuple[list[Path], str]:
    """The PNG plots (or none, and the sentence saying why); the gradient flow coloured by ``findings``.

    Drawn in a private temporary folder, then written into ``out`` without following a link (:func:`write_bytes`);
    the layer names on them are escaped (no line break, no ``$`` that matplotlib would read as math).
    """
    import tempfile

    shown = replace(history, layer_names=[clean(n).replace("$", r"\$") for n in history.layer_names])
    try:
        from lightning_gradhealth.output.figures import flagged_from, reference_lines
        from lightning_gradhealth.output.plots import write_plots

        with tempfile.TemporaryDirectory(prefix="gradhealth-plots-") as tmp:
            drawn = write_plots(shown, tmp, flagged_from(findings), reference_lines(th))
            return [write_bytes(out / p.name, p.read_bytes()) for p in drawn], ""
    except ImportError:
        return [], PLOTS_HINT
    except Exception as err:  # a plot must never cost the report
        return [], f"The PNG plots could not be drawn ({type(err).__name__}: {clean(str(err))})."


def write_report(
    directory: str | Path,
    history: History,
    findings: list[Finding],
    th: Thresholds,
    *,
    inventory: Any = None,
    plots: bool = True,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``gradient_health_report.md`` and ``.json`` into ``directory`` (created if missing).

    With ``plots`` and matplotlib installed, the PNG plots of :func:`~lightning_gradhealth.output.plots.write_plots`
    (``global_norm.png``, ``layer_heatmap.png``, ``gradient_flow.png``) go next to them and the Markdown links
    them; without matplotlib there are no plots and the report says how to get them.

    Args:
        directory: Where the files go.
        history: The kept records.
        findings: The findings of :func:`~lightning_gradhealth.diagnosis.rules.diagnose`.
        th: The thresholds.
        inventory: A :class:`~lightning_gradhealth.model.inventory.ModelInventory` or a mapping of layer name to kind,
            for a "Kind" column in the per-layer table (see :func:`layer_rows`).
        plots: Whether to draw the PNG plots.
        notes: Warnings about the input (e.g. a truncated event file), shown first and kept in the JSON.

    Returns:
        The path of the Markdown file.

    Raises:
        UnsafePathError: A file to replace in ``directory`` is a symbolic link or not a regular file: nothing is
            written through a link (:mod:`~lightning_gradhealth.output.safe_io`).
    """
    out = Path(directory)  # (the caller's choice: a linked folder is followed; ``gradhealth report`` checks its own)
    out.mkdir(parents=True, exist_ok=True)
    pngs, note = _write_plots(history, out, findings, th) if plots else ([], "")
    md = out / REPORT_MD
    text = render_markdown(history, findings, th, inventory=inventory, plots=pngs, plots_note=note, notes=notes)
    write_text(md, text)
    data = report_dict(history, findings, th, inventory=inventory, plots=pngs, notes=notes)
    write_text(out / REPORT_JSON, json.dumps(data, indent=2, default=str) + "\n")
    return md


def console_summary(findings: list[Finding], path: Path | None, alerts: int = 0) -> str:
    """A few lines for the console (``alerts``: how many alerts the run raised, said when no finding stands)."""
    if not findings:
        head = "Gradient health: ✅ no issue detected."
        if alerts:
            head += f" {alerts} alert(s) were raised during the run: transient (no rule over the run confirmed them)."
    else:
        crit = sum(f.severity is Severity.CRITICAL for f in findings)
        head = f"Gradient health: {len(findings)} issue(s) ({crit} critical)."
    lines = [head] + [f"  {_ICON[f.severity]} {f.kind}: {f.summary}" for f in findings[:6]]
    if path is not None:
        lines.append(f"  Report: {path}")
    return "\n".join(lines)
