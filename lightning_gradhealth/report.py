"""The Gradient Health Report (seed 003's format): Markdown and JSON files, and a console summary."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning_gradhealth.history import History
from lightning_gradhealth.rules import Finding
from lightning_gradhealth.thresholds import Severity, Thresholds

__all__ = ["REPORT_JSON", "REPORT_MD", "console_summary", "render_markdown", "report_dict", "write_report"]

REPORT_MD = "gradient_health_report.md"
REPORT_JSON = "gradient_health_report.json"
_ICON = {Severity.OK: "✅", Severity.WARNING: "⚠️", Severity.CRITICAL: "❌"}


def _summary(history: History, th: Thresholds) -> list[tuple[str, str, Severity]]:
    last = len(history.steps) - 1
    total = history.total_norm[last] if last >= 0 else math.nan
    if not math.isfinite(total):
        total_sev = Severity.CRITICAL
    else:
        high, low = th.grade_high("total_norm_high", total), th.grade_low("total_norm_low", total)
        total_sev = max(high, low, key=lambda s: [Severity.OK, Severity.WARNING, Severity.CRITICAL].index(s))
    nan_layers = history.worst_nonfinite_layers
    zero = history.zero_frac[last] if last >= 0 else math.nan
    zero_sev = th.grade_high("zero_frac", zero) if math.isfinite(zero) else Severity.OK
    return [
        ("Total grad norm (last record)", f"{total:.4g}", total_sev),
        (
            "Layers with NaN/Inf gradients (worst record)",
            str(nan_layers) if nan_layers or not history.nonfinite_records or history.layer_names else "n/a",
            Severity.CRITICAL if nan_layers or history.nonfinite_records else Severity.OK,
        ),
        (
            "Non-finite records",
            str(history.nonfinite_records),
            Severity.CRITICAL if history.nonfinite_records else Severity.OK,
        ),
        ("Zero-grad entries (last record)", f"{zero:.1%}" if math.isfinite(zero) else "n/a", zero_sev),
    ]


def report_dict(history: History, findings: list[Finding], th: Thresholds) -> dict[str, Any]:
    """The report as a JSON-ready dict: summary rows, findings, and how much was seen."""
    return {
        "summary": [{"metric": m, "value": v, "status": s.value} for m, v, s in _summary(history, th)],
        "findings": [f.to_dict() for f in findings],
        "records": history.records_seen,
        "steps": [history.steps[0], history.steps[-1]] if history.steps else [],
        "layers": list(history.layer_names),
    }


def render_markdown(history: History, findings: list[Finding], th: Thresholds) -> str:
    """The report in seed 003's Markdown format."""
    lines = [
        "## Gradient Health Report",
        "",
        "### Summary",
        "| Metric | Value | Status |",
        "|--------|-------|--------|",
    ]
    lines += [f"| {m} | {v} | {_ICON[s]} |" for m, v, s in _summary(history, th)]
    lines += ["", "### Issues Detected"]
    if not findings:
        lines.append("None: no rule fired over the run. ✅")
    for i, f in enumerate(findings, 1):
        where = f" Layers: {', '.join(f.layers[:8])}{' ...' if len(f.layers) > 8 else ''}." if f.layers else ""
        lines.append(f"{i}. {_ICON[f.severity]} **{f.kind}** ({f.severity.value}): {f.summary}{where}")
    lines += ["", "### Recommendations"]
    recs: list[str] = []
    for f in findings:
        recs += [fix for fix in f.fixes[:2] if fix not in recs]
    lines += [f"{i}. {r}" for i, r in enumerate(recs, 1)] or ["Nothing to change."]
    codes: list[str] = []
    for f in findings:
        if f.code and f.code not in codes:
            codes.append(f.code)
    if codes:
        lines += ["", "### Code to Add", "```python", *"\n\n".join(codes).splitlines(), "```"]
    lines += ["", f"_{history.records_seen} record(s) from step {history.steps[0] if history.steps else '-'} "
              f"to {history.steps[-1] if history.steps else '-'}._", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(directory: str | Path, history: History, findings: list[Finding], th: Thresholds) -> Path:
    """Write ``gradient_health_report.md`` and ``.json`` into ``directory`` (created if missing).

    Returns:
        The path of the Markdown file.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    md = out / REPORT_MD
    md.write_text(render_markdown(history, findings, th), encoding="utf-8")
    (out / REPORT_JSON).write_text(json.dumps(report_dict(history, findings, th), indent=2, default=str) + "\n")
    return md


def console_summary(findings: list[Finding], path: Path | None) -> str:
    """A few lines for the console."""
    if not findings:
        head = "Gradient health: ✅ no issue detected."
    else:
        crit = sum(f.severity is Severity.CRITICAL for f in findings)
        head = f"Gradient health: {len(findings)} issue(s) ({crit} critical)."
    lines = [head] + [f"  {_ICON[f.severity]} {f.kind}: {f.summary}" for f in findings[:6]]
    if path is not None:
        lines.append(f"  Report: {path}")
    return "\n".join(lines)
