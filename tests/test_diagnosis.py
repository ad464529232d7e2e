"""Rules and the Gradient Health Report on pathological and healthy runs (real Trainers)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TinyMLP, loader, make_trainer
from test_safety import Regression, regression_data
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradhealth import GradientHealthError, GradientHealthMonitor, Severity
from lightning_gradhealth.cli.demo import DeepSigmoidMLP
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.schema.record import StepStats


def _fit(model, data, tmp_path, steps=30, **monitor_kwargs):
    monitor = GradientHealthMonitor(**monitor_kwargs)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=steps, log_every_n_steps=1)
    trainer.fit(model, DataLoader(data, batch_size=64))
    return monitor, trainer


def _kinds(monitor):
    return {f.kind: f for f in monitor.findings}


def test_vanishing_deep_sigmoid_net(tmp_path):
    monitor, _ = _fit(Regression(DeepSigmoidMLP(in_dim=32)), regression_data(), tmp_path)
    finding = _kinds(monitor)["vanishing"]
    assert finding.severity is Severity.CRITICAL
    assert finding.layers[0] == "model.net.0"  # depth order: the first layer is the most affected
    assert finding.evidence["early_over_late"] < 1e-6
    assert "exploding" not in _kinds(monitor)


class DeepLinear(nn.Module):
    """An exploding net: 20 Linear layers, init std 1.5/sqrt(width)."""

    def __init__(self, depth=20, width=32):
        super().__init__()
        layers = []
        for _ in range(depth):
            layer = nn.Linear(width, width, bias=False)
            nn.init.normal_(layer.weight, std=1.5 / math.sqrt(width))
            layers.append(layer)
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x):
        return self.net(x)


def test_exploding_deep_linear_net(tmp_path):
    monitor, _ = _fit(Regression(DeepLinear(), lr=1e-5), regression_data(), tmp_path, steps=10)
    finding = _kinds(monitor)["exploding"]
    assert finding.severity is Severity.CRITICAL
    assert finding.evidence["median_total_norm"] > 1000


def test_dead_relu_layers(tmp_path):
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        net[2].bias.fill_(-20.0)  # every unit of the 2nd layer is off for every input: its ReLU kills the gradient
    monitor, _ = _fit(Regression(net), regression_data(), tmp_path, steps=20)
    finding = _kinds(monitor)["dead"]
    # the dead layer's units, and every unit upstream of its ReLUs, get exactly-zero gradients; the output layer's
    # single unit is alive (its inputs are dead, not it)
    assert finding.layers == ("model.0", "model.2")
    assert finding.evidence["dead_unit_frac"] == {"model.0": 1.0, "model.2": 1.0}


def test_nonfinite_report_is_written_when_failing_fast(tmp_path):
    monitor = GradientHealthMonitor()
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=10)
    with pytest.raises(GradientHealthError):
        trainer.fit(TinyMLP(poison={4: ("net.2.weight", math.nan)}), loader())
    report = json.loads((tmp_path / "gradient_health_report.json").read_text())
    (nonfinite,) = [f for f in report["findings"] if f["kind"] == "nonfinite"]
    assert nonfinite["severity"] == "critical" and nonfinite["layers"] == ["net.2"]
    assert nonfinite["evidence"]["step"] == 4
    md = (tmp_path / "gradient_health_report.md").read_text()
    assert md.startswith("## Gradient Health Report")
    assert "| Layers with NaN/Inf gradients (worst record) | 1 | ❌ |" in md
    assert "| Non-finite records | 1 | ❌ |" in md
    assert "### Code to Add" in md and "```python" in md


def test_nonfinite_finding_tells_how_far_it_spread_under_warn(tmp_path):
    """With on_nonfinite="warn" the NaN update is applied: every later gradient and the weights are NaN. The
    report must say so, not only describe the first bad step."""
    monitor = GradientHealthMonitor(on_nonfinite="warn")
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=8)
    trainer.fit(TinyMLP(poison={3: ("net.2.weight", math.nan)}), loader())
    (nonfinite,) = [f for f in monitor.findings if f.kind == "nonfinite"]
    assert nonfinite.evidence["step"] == 3 and nonfinite.evidence["nonfinite_records"] == 5  # steps 3..7
    assert nonfinite.evidence["last_step"] == 7 and nonfinite.evidence["params_nonfinite_from"] == 4
    assert "restart from a checkpoint saved before step 3" in nonfinite.summary
    md = (tmp_path / "gradient_health_report.md").read_text()
    assert "| Layers with NaN/Inf gradients (worst record) | 3 | ❌ |" in md  # every layer, at the end
    assert "| Non-finite records | 5 | ❌ |" in md


def test_spike_finding(tmp_path):
    monitor = GradientHealthMonitor(spike_warmup_steps=5, on_spike="skip")
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=20)
    trainer.fit(TinyMLP(loss_scale_at={15: 1e4}), loader(n=256))
    finding = _kinds(monitor)["spike"]
    assert finding.evidence["spikes"][0]["step"] == 15


def test_history_is_bounded_and_keeps_the_first_and_nonfinite_records():
    history = History(max_snapshots=64)

    def record(step, total):
        return StepStats(step=step, global_step=step, epoch=0, batch_idx=step, optimizer_idx=0, total_norm=total,
                         param_norm=1.0, zero_frac=0.0, nan_count=0, inf_count=0, layer_norm_ratio=1.0,
                         no_grad_count=0)  # fmt: skip

    for step in range(5000):
        history.add(record(step, math.nan if step == 3001 else 1.0))
    assert len(history.steps) <= 64 and history.records_seen == 5000
    assert history.steps[0] == 0 and 3001 in history.steps
    assert history.first_nonfinite.step == 3001
    gaps = [b - a for a, b in zip(history.steps, history.steps[1:], strict=False) if 3001 not in (a, b)]
    assert max(gaps) <= 2 * min(gaps)  # evenly thinned


def _history(norms, layer_norms=None, losses=None):
    from lightning_gradhealth.schema.record import LayerStats

    history = History()
    for step, total in enumerate(norms):
        loss = None if losses is None else losses[step]
        layers = tuple(
            LayerStats(name=f"l{j}", numel=10, grad_norm=n, param_norm=1.0, ratio=n, zero_frac=0.0)
            for j, n in enumerate(layer_norms or [total / 2, total / 2])
        )
        history.add(StepStats(step=step, global_step=step, epoch=0, batch_idx=step, optimizer_idx=0,
                              total_norm=total, param_norm=1.0, zero_frac=0.0, nan_count=0, inf_count=0,
                              layer_norm_ratio=1.0, no_grad_count=0, layers=layers, loss=loss))  # fmt: skip
    return history


def test_trend_rules_rising_and_decaying():
    from lightning_gradhealth import Thresholds
    from lightning_gradhealth.diagnosis.rules import diagnose

    th = Thresholds()
    rising = diagnose(_history([1.0 * 1.1**i for i in range(36)]), th)  # 25x its first values: not yet exploding
    assert [f.kind for f in rising] == ["rising_trend"]
    assert rising[0].evidence["late"] / rising[0].evidence["early"] >= 10
    # further on, 88x its first values: grown past the run's own baseline, exploding, the learning rate first
    exploded = diagnose(_history([1.0 * 1.1**i for i in range(48)]), th)
    assert [f.kind for f in exploded] == ["exploding"] and exploded[0].evidence["growth"] > 30
    assert "learning rate" in exploded[0].fixes[0]
    decaying = diagnose(_history([1.0 * 0.7**i for i in range(40)]), th)
    assert "decaying_trend" in [f.kind for f in decaying]
    assert diagnose(_history([1.0 + 0.1 * math.sin(i) for i in range(40)]), th) == []  # stable: healthy
    # a noisy but flat run does not make a trend, and a short one is not judged at all
    assert diagnose(_history([1.0, 50.0] * 20), th) == []
    assert diagnose(_history([1.0, 2.0]), th) == []


def test_layers_joining_mid_run_take_their_place_in_depth_order():
    from lightning_gradhealth.schema.record import LayerStats

    history = History()

    def add(step, names):
        layers = tuple(
            LayerStats(name=n, numel=1, grad_norm=10.0 * step + j, param_norm=1.0, ratio=0.1, zero_frac=0.0)
            for j, n in enumerate(names)
        )
        history.add(StepStats(step=step, global_step=step, epoch=0, batch_idx=step, optimizer_idx=0,
                              total_norm=1.0, param_norm=1.0, zero_frac=0.0, nan_count=0, inf_count=0,
                              layer_norm_ratio=1.0, no_grad_count=0, layers=layers))  # fmt: skip

    add(0, ["neck", "head"])  # the backbone is frozen
    add(1, ["stem", "block", "neck", "head"])  # unfrozen: it joins BEFORE the layers already known
    add(2, ["stem", "neck", "tail", "head"])  # "block" frozen again, a "tail" joins between
    assert history.layer_names == ["stem", "block", "neck", "tail", "head"]
    stem = history.layer_series("stem")
    assert math.isnan(stem[0]) and stem[1:] == [10.0, 20.0]
    assert history.layer_series("head")[0] == 1.0 and history.layer_series("head")[1:] == [13.0, 23.0]
    assert history.layer_series("neck") == [0.0, 12.0, 21.0]
    assert math.isnan(history.layer_series("block")[2]) and history.layer_series("block")[1] == 11.0


def test_alerts_findings_and_fixes_share_one_vocabulary():
    from lightning_gradhealth import Thresholds
    from lightning_gradhealth.diagnosis.checks import check_global_norm, check_record
    from lightning_gradhealth.diagnosis.fixes import FIXES
    from lightning_gradhealth.diagnosis.rules import CODE
    from lightning_gradhealth.schema.kinds import ALERT_KINDS, KINDS, Kind
    from lightning_gradhealth.schema.record import LayerStats

    assert len(set(KINDS)) == len(KINDS) and ALERT_KINDS <= set(KINDS)
    assert (Kind.NONFINITE, Kind.SPIKE) == ("nonfinite", "spike")  # what the guard emits
    assert ALERT_KINDS <= FIXES.keys() <= set(KINDS) and CODE.keys() == set(KINDS)
    th = Thresholds(warmup_steps=0)
    layers = (  # (b before a: a spread, not a decay toward the input, which would be vanishing only)
        LayerStats(name="b", numel=10, grad_norm=10.0, param_norm=1e-3, ratio=1e4 + 1, zero_frac=1.0),
        LayerStats(name="a", numel=10, grad_norm=1e-9, param_norm=1.0, ratio=1e-9, zero_frac=1.0),
    )
    record = StepStats(step=0, global_step=0, epoch=0, batch_idx=0, optimizer_idx=0, total_norm=10.0, param_norm=1.0,
                       zero_frac=1.0, nan_count=0, inf_count=0, layer_norm_ratio=1e10, no_grad_count=0,
                       layers=layers)  # fmt: skip
    alerts = check_record(record, th, steps_seen=1) + check_global_norm(1e5, 0, th, steps_seen=1)
    alerts += check_global_norm(1e-9, 0, th, steps_seen=1)
    kinds = {(a.kind, a.layer) for a in alerts}
    assert kinds == {
        ("layer_imbalance", None), ("dead", None), ("vanishing", "a"), ("ratio_low", "a"), ("ratio_high", "b"),
        ("exploding", None), ("vanishing", None),
    }  # fmt: skip
    for a in alerts:  # the alert's message ends with the first fix of its kind
        assert a.message.endswith(f" Fix: {FIXES[a.kind][0]}."), a


def test_metric_keys_round_trip():
    from lightning_gradhealth.schema.metrics import (
        ACT_DEAD_FRAC,
        ALERTS,
        GRAD_NORM,
        HISTOGRAM,
        TOTAL_NORM,
        MetricKey,
        activation_metrics,
        metric_key,
        metrics_to_record,
        parse_key,
        record_to_metrics,
    )
    from lightning_gradhealth.schema.record import LayerStats

    layers = (
        LayerStats(name="net.0", numel=1, grad_norm=2.0, param_norm=math.nan, ratio=0.5, zero_frac=0.25, nan_count=3),
        LayerStats(name="net.2", numel=1, grad_norm=1.0, param_norm=math.nan, ratio=0.1, zero_frac=0.0, max_abs=0.9,
                   min_abs_nonzero=1e-4, mean=0.01, std=0.2),
    )  # fmt: skip
    record = StepStats(step=7, global_step=7, epoch=0, batch_idx=0, optimizer_idx=0, total_norm=3.0, param_norm=4.0,
                       zero_frac=0.1, nan_count=3, inf_count=0, layer_norm_ratio=2.0, no_grad_count=1, layers=layers,
                       post_clip_norm=1.0, amp_scale=1024.0)  # fmt: skip
    for idx in (None, 1):
        metrics = record_to_metrics(record, idx)
        assert all(parse_key(key) is not None for key in metrics)
        back = metrics_to_record({"loss": 1.0, **activation_metrics({"act": (0.1, 0.2, None)}), **metrics}, 7, idx)
        assert back == StepStats(**{**record.__dict__, "optimizer_idx": idx or 0})
        # the keys of another optimizer are not this one's
        with pytest.raises(KeyError):
            metrics_to_record(metrics, 7, 0)
    assert metric_key(TOTAL_NORM) == "grad_health/total_norm"
    assert metric_key(GRAD_NORM, "a.b", 2) == "grad_norm/a.b/opt2"
    assert parse_key("grad_health/total_norm/opt3") == MetricKey(TOTAL_NORM, None, 3)
    assert parse_key("grad_norm/opt0") == MetricKey(GRAD_NORM, "opt0", None)  # a layer called "opt0"
    assert parse_key("grad_hist/net.0") == MetricKey(HISTOGRAM, "net.0", None)
    assert parse_key("act_dead_frac/relu") == MetricKey(ACT_DEAD_FRAC, "relu", None)
    assert parse_key(ALERTS) == MetricKey(ALERTS, None, None)
    assert parse_key("loss") is None and parse_key("grad_norm") is None and parse_key("grad_health/x") is None


def test_a_converged_run_is_not_stalling_and_a_rising_loss_is_divergence():
    from lightning_gradhealth import Thresholds
    from lightning_gradhealth.diagnosis.rules import diagnose

    th = Thresholds()
    norms = [1.0 * 0.7**i for i in range(40)]
    # the norm decays 1e6x while the loss falls to ~6e-5: converged (a ReLU MLP fitting its data), not stalling
    converged = diagnose(_history(norms, losses=[1.0 * 0.78**i for i in range(40)]), th)
    assert "decaying_trend" not in [f.kind for f in converged]
    stalled = diagnose(_history(norms, losses=[1.0] * 40), th)  # the same norms, the loss flat: stalling
    assert "decaying_trend" in [f.kind for f in stalled]
    # the loss 6x its first values while the norm grows 8x (Adam at lr 1): diverging, the learning rate first
    diverging = diagnose(_history([2.0 + 0.4 * i for i in range(40)], losses=[4.0 + 0.6 * i for i in range(40)]), th)
    (finding,) = [f for f in diverging if f.kind == "diverging"]
    assert finding.severity.value == "critical" and "learning rate" in finding.fixes[0]
    assert diverging[0].kind == "diverging"
