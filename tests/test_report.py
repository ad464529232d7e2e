"""The report: a summary that agrees with the findings, the per-layer table, the PNG plots."""

from __future__ import annotations

import json
import sys

import pytest

from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.diagnosis.rules import Finding, diagnose
from lightning_gradhealth.output.report import (
    LAYER_ROWS,
    PLOTS_HINT,
    layer_rows,
    render_markdown,
    report_dict,
    write_report,
)
from lightning_gradhealth.schema.kinds import KINDS, Kind
from lightning_gradhealth.schema.record import LayerStats, StepStats


def _record(step, norms, *, ratio=1e-3, zero=0.0, names=None):
    names = names or [f"net.{2 * i}" for i in range(len(norms))]
    layers = tuple(
        LayerStats(name=n, numel=100, grad_norm=g, param_norm=g / ratio, ratio=ratio, zero_frac=zero)
        for n, g in zip(names, norms, strict=True)
    )
    finite = [g for g in norms if g > 0]
    return StepStats(step=step, global_step=step, epoch=0, batch_idx=step, optimizer_idx=0,
                     total_norm=sum(g * g for g in norms) ** 0.5, param_norm=10.0, zero_frac=zero, nan_count=0,
                     inf_count=0, layer_norm_ratio=max(finite) / min(finite) if len(finite) > 1 else 1.0,
                     no_grad_count=0, layers=layers)  # fmt: skip


def _history(norms, steps=12, **kw):
    history = History()
    for s in range(steps):
        history.add(_record(s, norms, **kw))
    return history


def _rows(history, findings):
    return {row["metric"]: row for row in report_dict(history, findings, Thresholds())["summary"]}


# ---------------------------------------------------------------- summary
def test_summary_agrees_with_a_critical_finding():
    history = _history([1.0, 1.0, 1.0])  # healthy numbers on the last record
    finding = Finding(Kind.VANISHING, Severity.CRITICAL, "gradients vanish toward the input.", layers=("net.0",))
    rows = _rows(history, [finding])
    first = report_dict(history, [finding], Thresholds())["summary"][0]
    assert first == {"metric": "Findings", "value": "1 (1 critical, 0 warning)", "status": "critical",
                     "kinds": ["vanishing"]}  # fmt: skip
    assert rows["Largest / smallest layer grad norm (last record)"]["status"] == "critical"
    md = render_markdown(history, [finding], Thresholds())
    assert "| Findings | 1 (1 critical, 0 warning) | ❌ |" in md
    assert "| Largest / smallest layer grad norm (last record) | 1 | ❌ |" in md
    # without findings, the same history is all green
    assert all(row["status"] == "ok" for row in _rows(history, []).values())
    assert "| Findings | none | ✅ |" in render_markdown(history, [], Thresholds())


@pytest.mark.parametrize("kind", KINDS)
def test_every_finding_kind_shows_in_a_summary_row(kind):
    history = _history([1.0, 1.0, 1.0])
    rows = report_dict(history, [Finding(kind, Severity.WARNING, "x")], Thresholds())["summary"]
    assert rows[0]["metric"] == "Findings" and rows[0]["status"] == "warning"
    assert any(kind in row["kinds"] and row["status"] == "warning" for row in rows[1:]), rows


def test_summary_statuses_are_at_least_as_bad_as_the_rules_findings():
    # a real vanishing pattern: the first layers' norms 1e-9 of the last ones
    history = _history([1e-10, 1e-8, 1e-3, 1.0], steps=20)
    findings = diagnose(history, Thresholds())
    assert {f.kind for f in findings} >= {Kind.VANISHING}
    rows = report_dict(history, findings, Thresholds())["summary"]
    rank = {"ok": 0, "warning": 1, "critical": 2}
    for f in findings:
        matching = [row for row in rows[1:] if f.kind in row["kinds"]]
        assert matching and max(rank[r["status"]] for r in matching) >= rank[f.severity.value], (f.kind, rows)
    assert rank[rows[0]["status"]] == max(rank[f.severity.value] for f in findings)


# ---------------------------------------------------------------- per-layer table
def test_layer_table_is_in_depth_order_with_statuses_from_the_findings():
    history = History()
    # net.2 joins later (unfrozen): it still goes between net.0 and net.4
    for s in range(6):
        history.add(_record(s, [1e-3, 0.5], names=["net.0", "net.4"], zero=0.25))
    for s in range(6, 12):
        history.add(_record(s, [1e-3, 0.1, 0.5], names=["net.0", "net.2", "net.4"], zero=0.25))
    findings = [
        Finding(Kind.RATIO_HIGH, Severity.WARNING, "w", layers=("net.4",)),
        Finding(Kind.VANISHING, Severity.CRITICAL, "c", layers=("net.0", "net.4")),
    ]
    rows = layer_rows(history, findings, {"net.0": "Linear", "net.2": {"kind": "Conv2d"}})
    assert [r["layer"] for r in rows] == ["net.0", "net.2", "net.4"]
    assert [r["status"] for r in rows] == [Severity.CRITICAL, Severity.OK, Severity.CRITICAL]
    assert [r["kind"] for r in rows] == ["Linear", "Conv2d", ""]
    assert rows[1]["last_grad_norm"] == 0.1 and rows[1]["zero_frac"] == 0.25
    assert rows[1]["median_ratio"] == pytest.approx(1e-3)

    md = render_markdown(history, findings, Thresholds(), inventory={"net.0": "Linear"})
    table = md[md.index("### Layers (depth order)") :].split("\n\n")[0].splitlines()
    assert table[1] == (
        "| # | Layer | Kind | Last grad norm | Median grad/param ratio (recent) | Zero fraction (last) | Status |"
    )
    assert table[3] == "| 0 | `net.0` | Linear | 0.001 | 0.001 | 25.0% | ❌ critical |"
    assert table[4] == "| 1 | `net.2` |  | 0.1 | 0.001 | 25.0% | ✅ ok |"
    assert table[5].startswith("| 2 | `net.4` |")
    # without an inventory there is no Kind column
    assert "| # | Layer | Last grad norm |" in render_markdown(history, findings, Thresholds())
    # JSON: every layer, numbers or null
    data = report_dict(history, findings, Thresholds())
    assert [r["layer"] for r in data["layer_table"]] == ["net.0", "net.2", "net.4"]
    assert data["layer_table"][0]["status"] == "critical"
    json.dumps(data, allow_nan=False)


def test_layer_table_is_bounded_for_deep_models():
    n = 2 * LAYER_ROWS + 10
    history = _history([1.0] * n, steps=3)
    md = render_markdown(history, [], Thresholds())
    table = [line for line in md[md.index("### Layers") :].split("\n\n")[0].splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 * LAYER_ROWS + 1  # header, first 20, "... more", last 20
    assert table[1].startswith("| 0 | `net.0` |")
    assert table[LAYER_ROWS + 1].startswith("| … | … 10 more layers … |")
    assert table[-1].startswith(f"| {n - 1} | `net.{2 * (n - 1)}` |")
    assert len(report_dict(history, [], Thresholds())["layer_table"]) == n


# ---------------------------------------------------------------- plots
def test_plots_are_written_and_linked(tmp_path):
    pytest.importorskip("matplotlib")
    history = _history([1e-3, 0.1, 0.5])
    md = write_report(tmp_path, history, [], Thresholds())
    for name in ("global_norm.png", "layer_heatmap.png", "gradient_flow.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    text = md.read_text()
    assert "![global norm](global_norm.png)" in text
    assert "![layer heatmap](layer_heatmap.png)" in text and "![gradient flow](gradient_flow.png)" in text
    assert PLOTS_HINT not in text
    data = json.loads((tmp_path / "gradient_health_report.json").read_text())
    assert data["plots"] == ["global_norm.png", "layer_heatmap.png", "gradient_flow.png"]


def test_one_record_plots(tmp_path):
    pytest.importorskip("matplotlib")
    write_report(tmp_path, _history([1.0, 2.0], steps=1), [], Thresholds())
    assert (tmp_path / "layer_heatmap.png").exists()


def test_without_matplotlib_the_report_says_how_to_get_plots(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    md = write_report(tmp_path, _history([1.0, 2.0]), [], Thresholds())
    assert not list(tmp_path.glob("*.png"))
    text = md.read_text()
    assert PLOTS_HINT in text and "![" not in text
    # and on request, no plots and no sentence
    md = write_report(tmp_path / "bare", _history([1.0, 2.0]), [], Thresholds(), plots=False)
    assert "### Plots" not in md.read_text()


def test_layer_table_takes_the_kinds_from_a_model_inventory():
    from torch import nn

    from lightning_gradhealth.model.inventory import take_inventory

    inventory = take_inventory(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.LayerNorm(8), nn.Linear(8, 1)))
    history = _history([0.1, 0.2, 0.3], names=["0", "2", "3"], steps=3)
    assert [r["kind"] for r in layer_rows(history, [], inventory)] == ["linear (Linear)", "norm (LayerNorm)",
                                                                       "linear (Linear)"]  # fmt: skip
    md = render_markdown(history, [], Thresholds(), inventory=inventory)
    assert "| 1 | `2` | norm (LayerNorm) | 0.2 |" in md
