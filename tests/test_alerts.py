"""AlertManager: escalation through the rate limiter, one line per kind per step, verbose, progress bars."""

from __future__ import annotations

import io
import logging
import sys

import pytest
from conftest import TinyMLP, loader, make_trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_gradhealth import Alert, AlertManager, GradientHealthMonitor, Severity, Thresholds
from lightning_gradhealth.diagnosis.checks import check_record
from lightning_gradhealth.schema.record import LayerStats, StepStats

LOGGER = "lightning_gradhealth"


def _alert(step, severity=Severity.WARNING, layer="net.0", kind="vanishing"):
    return Alert(kind=kind, severity=severity, step=step, message=f"{kind} {layer} {severity.value}", layer=layer)


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


# ---------------------------------------------------------------- escalation
def test_a_more_severe_alert_goes_out_inside_the_window(caplog):
    seen = []
    manager = AlertManager(window=100, on_alert=seen.append)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        emitted = [
            manager(_alert(0)),  # first: out
            manager(_alert(1)),  # same severity inside the window: held back
            manager(_alert(2, Severity.CRITICAL)),  # escalation: out, with the held-back count
            manager(_alert(3, Severity.CRITICAL)),  # same severity again: held back
            manager(_alert(4)),  # less severe: held back
            manager(_alert(5, Severity.CRITICAL, layer="net.2")),  # another layer: its own key
        ]
    assert emitted == [True, False, True, False, False, True]
    assert manager.total == 6
    assert [(a.step, a.severity, a.held_back) for a in seen] == [
        (0, Severity.WARNING, 0),
        (2, Severity.CRITICAL, 1),
        (5, Severity.CRITICAL, 0),
    ]
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in records] == [logging.WARNING, logging.ERROR, logging.ERROR]
    assert "[grad_health critical] step 2: vanishing net.0 critical (1 similar alert(s) held back since step 0)" in (
        records[1].getMessage()
    )
    # the window restarts at the critical alert: the next warning waits for step 102
    assert manager(_alert(101)) is False and manager(_alert(102)) is True


def test_escalation_survives_a_checkpoint_and_old_checkpoints_load():
    manager = AlertManager(window=100)
    manager(_alert(0, Severity.CRITICAL))
    state = manager.state_dict()
    assert state["severity"] == [["vanishing", "net.0", "critical"]]
    restored = AlertManager(window=100)
    restored.load_state_dict(state)
    assert restored(_alert(5, Severity.CRITICAL)) is False  # a critical already went out in this window
    # a checkpoint from before the severities were kept: the last alert is taken as a warning
    old = {"total": 3, "last": [["vanishing", "net.0", 0]], "held": [["vanishing", "net.0", 2]]}
    restored = AlertManager(window=100)
    restored.load_state_dict(old)
    assert restored(_alert(5)) is False
    assert restored(_alert(6, Severity.CRITICAL)) is True
    assert restored.total == 5


# ---------------------------------------------------------------- one line per kind per step
def _record(step):
    """16 layers in depth order: the first 15 vanish (5.7e-18 up to 3e-12), the last is healthy."""
    norms = [5.7e-18 * (3e-12 / 5.7e-18) ** (i / 14) for i in range(15)] + [1.0]
    layers = tuple(
        LayerStats(name=f"net.{2 * i}", numel=100, grad_norm=g, param_norm=1.0, ratio=g, zero_frac=0.0)
        for i, g in enumerate(norms)
    )
    return StepStats(step=step, global_step=step, epoch=0, batch_idx=step, optimizer_idx=0, total_norm=1.0,
                     param_norm=4.0, zero_frac=0.0, nan_count=0, inf_count=0, layer_norm_ratio=1.0 / 5.7e-18,
                     no_grad_count=0, layers=layers)  # fmt: skip


def test_emit_step_logs_one_line_per_kind_with_the_layer_count_first_and_last(caplog):
    alerts = check_record(_record(40), Thresholds(), steps_seen=40)
    assert sum(a.kind == "vanishing" for a in alerts) == 15 and sum(a.kind == "ratio_low" for a in alerts) == 15
    seen = []
    manager = AlertManager(window=100, on_alert=seen.append)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        emitted = manager.emit_step(alerts, rank_zero=True)
    assert len(emitted) == len(alerts) == len(seen) == 30  # every structured alert reaches on_alert
    assert manager.total == 30
    lines = _lines(caplog)
    # vanishing and ratio_low: one line each (the spread of this depth profile is vanishing, not an imbalance)
    assert len(lines) == 2, lines
    vanishing, ratio = lines
    assert vanishing.startswith(
        "[grad_health critical] step 40: vanishing in 15 layers (net.0 … net.28, first/last 5.7e-18 / 3e-12 "
        "vs line 1e-07): vanishing gradient in these layers. Fix: "
    )
    assert ratio.startswith("[grad_health critical] step 40: ratio_low in 15 layers (net.0 … net.28, ")
    assert all(line.count("[grad_health") == 1 for line in lines)

    # the next step: everything is within the window, nothing is logged, everything is counted
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert manager.emit_step(check_record(_record(41), Thresholds(), steps_seen=41), rank_zero=True) == []
    assert _lines(caplog) == [] and manager.total == 60
    # after the window: one line per kind again, telling how many were held back
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        manager.emit_step(check_record(_record(140), Thresholds(), steps_seen=140), rank_zero=True)
    assert "vanishing in 15 layers" in _lines(caplog)[0]
    assert _lines(caplog)[0].endswith("(15 similar alert(s) held back since the last ones)")


def test_emit_step_keeps_single_alert_lines_and_only_counts_off_rank_zero(caplog):
    seen = []
    manager = AlertManager(window=10, on_alert=seen.append)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = manager.emit_step([_alert(0, kind="spike", layer=None), _alert(0, layer="net.2")], rank_zero=True)
        manager.emit_step([_alert(20, layer="net.4")], rank_zero=False)
    assert [a.kind for a in out] == ["spike", "vanishing"]
    assert _lines(caplog) == [
        "[grad_health warning] step 0: spike None warning",
        "[grad_health warning] step 0: vanishing net.2 warning",
    ]
    assert len(seen) == 2 and manager.total == 3


def test_a_spread_without_a_depth_pattern_is_an_imbalance_line(caplog):
    norms = [1.0, 1e4, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0]  # one layer 1e4x the others, not a decay toward the input
    layers = tuple(
        LayerStats(name=f"net.{i}", numel=100, grad_norm=g, param_norm=100.0, ratio=g / 100, zero_frac=0.0)
        for i, g in enumerate(norms)
    )
    record = StepStats(step=40, global_step=40, epoch=0, batch_idx=40, optimizer_idx=0, total_norm=1e4,
                       param_norm=100.0, zero_frac=0.0, nan_count=0, inf_count=0, layer_norm_ratio=1e4,
                       no_grad_count=0, layers=layers)  # fmt: skip
    alerts = check_record(record, Thresholds(), steps_seen=40)
    assert [a.kind for a in alerts] == ["layer_imbalance"] and alerts[0].severity is Severity.WARNING
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        AlertManager().emit_step(alerts, rank_zero=True)
    assert _lines(caplog)[0].startswith(
        "[grad_health warning] step 40: the gradient norms of comparable layers span a factor of 1e+04 (> 1000)"
    )


# ---------------------------------------------------------------- verbose
def test_verbose_false_prints_nothing_but_counts_and_calls_on_alert(caplog, capfd):
    seen = []
    manager = AlertManager(window=100, on_alert=seen.append, verbose=False)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        manager(_alert(0))
        manager.emit_step(check_record(_record(40), Thresholds(), steps_seen=40), rank_zero=True)
    assert _lines(caplog) == []
    out, err = capfd.readouterr()
    assert "grad_health" not in out + err
    assert len(seen) == 31 and manager.total == 31


# ---------------------------------------------------------------- where the lines are printed
def test_alert_lines_print_once_on_stderr_without_logging_configured(monkeypatch, capsys, caplog):
    manager = AlertManager()
    # pytest's own handlers sit on the root logger: the configured logging shows the record, nothing is printed
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        manager(_alert(0))
    assert len(_lines(caplog)) == 1
    assert capsys.readouterr().err == ""
    # no logging configuration at all (a plain script): printed once, on stderr, like Python's last resort
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    manager(_alert(200))
    assert capsys.readouterr().err == "[grad_health warning] step 200: vanishing net.0 warning\n"


def test_alerts_do_not_break_the_progress_bar(monkeypatch, tmp_path):
    """A real Trainer with Lightning's tqdm bar and alerts on every step, in a "terminal" where stdout and stderr
    interleave (as on a tty). Every alert line starts on a line of its own and the bar is redrawn after it."""
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # no logging configuration, as in a plain script
    seen = []
    # every global norm is "exploding", and the window is one step: one alert per step
    th = Thresholds(total_norm_high_warning=1e-9, total_norm_high_critical=1e-8)
    monitor = GradientHealthMonitor(thresholds=th, alert_window=1, on_alert=seen.append, report=False)
    # (Lightning's default bar is Rich's when `rich` is installed, as it is with the test extras: ask for tqdm)
    bar = TQDMProgressBar()
    trainer = make_trainer(tmp_path, callbacks=[monitor, bar], max_steps=6, enable_progress_bar=True)
    trainer.fit(TinyMLP(), loader(n=64, batch_size=8))  # 8 batches: the bar is mid-epoch at every alert

    text = terminal.getvalue()
    assert "Epoch 0:" in text  # the bar was drawn
    assert len(seen) == 6
    alert_lines = [line for line in text.split("\n") if "[grad_health" in line]
    assert len(alert_lines) == len(seen)
    for line in alert_lines:
        visible = line.split("\r")[-1]  # what is left on screen after the carriage returns
        assert visible.startswith("[grad_health critical] step "), repr(line)
        assert visible.count("[grad_health") == 1
    # after each alert line the bar is drawn again
    after = text.split("\n")
    for i, line in enumerate(after[:-1]):
        if "[grad_health" in line and "[grad_health" not in after[i + 1]:
            assert "Epoch 0:" in after[i + 1] or after[i + 1].strip("\r ") == "", repr(after[i + 1])


@pytest.mark.parametrize("bar", [False, True])
def test_alert_line_goes_through_tqdm_write_only_with_an_open_bar(monkeypatch, bar):
    from tqdm import tqdm

    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    writes = []
    monkeypatch.setattr(tqdm, "write", classmethod(lambda cls, s, file=None, **kw: writes.append(s)))
    progress = tqdm(total=10, file=io.StringIO()) if bar else None
    try:
        AlertManager()(_alert(0))
    finally:
        if progress is not None:
            progress.close()
    line = "[grad_health warning] step 0: vanishing net.0 warning"
    assert (writes, terminal.getvalue()) == (([line], "") if bar else ([], line + "\n"))
