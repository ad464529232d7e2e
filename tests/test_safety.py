"""Fail-fast, skip, AMP overflow escalation, alerts and thresholds, resumable state, and the fault matrix."""

from __future__ import annotations

import json
import logging
import math

import lightning as L
import pytest
import torch
from conftest import Capture, Records, TinyMLP, loader, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from test_logging import read_scalars
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import Alert, AlertManager, GradientHealthError, GradientHealthMonitor, Severity, Thresholds
from lightning_gradhealth.cli.demo import ResidualReLUMLP
from lightning_gradhealth.schema.errors import TrainingHealthError, UnsupportedSetupError

PRECISIONS = {
    "32-true": {},
    "bf16-mixed": {"precision": "bf16-mixed"},
    "16-mixed": {"plugins": [MixedPrecision("16-mixed", "cpu")]},
}


# ---------------------------------------------------------------- thresholds
def test_thresholds_are_frozen_and_validated():
    th = Thresholds()
    with pytest.raises(AttributeError):
        th.total_norm_high_warning = 5.0  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"`Thresholds.total_norm_high_warning` must be < .*critical.*warning=2000"):
        Thresholds(total_norm_high_warning=2000.0)
    with pytest.raises(ValueError, match=r"`Thresholds.layer_norm_low_warning` must be > .*critical"):
        Thresholds(layer_norm_low_warning=1e-9)
    with pytest.raises(ValueError, match=r"`Thresholds.zero_frac_warning` must be a finite float > 0, got -0.1"):
        Thresholds(zero_frac_warning=-0.1)
    with pytest.raises(ValueError, match=r"`Thresholds.zero_frac_critical` must be <= 1"):
        Thresholds(zero_frac_critical=1.5)
    with pytest.raises(ValueError, match=r"`Thresholds.warmup_steps` must be an int >= 0"):
        Thresholds(warmup_steps=-1)
    assert th.grade_high("total_norm_high", 50) is Severity.OK
    assert th.grade_high("total_norm_high", 500) is Severity.WARNING
    assert th.grade_high("total_norm_high", 5000) is Severity.CRITICAL
    assert th.grade_low("layer_norm_low", 1e-6) is Severity.WARNING
    assert th.grade_low("layer_norm_low", 1e-8) is Severity.CRITICAL


def test_monitor_safety_arguments_are_validated():
    with pytest.raises(
        ValueError, match=r"`on_nonfinite` must be one of 'raise' \| 'skip' \| 'warn' \| None, got 'stop'"
    ):
        GradientHealthMonitor(on_nonfinite="stop")
    with pytest.raises(TypeError, match=r"`thresholds` must be a lightning_gradhealth.Thresholds or None, got \{"):
        GradientHealthMonitor(thresholds={"total_norm_high_warning": 1})
    with pytest.raises(TypeError, match=r"`on_alert` must be None or a callable"):
        GradientHealthMonitor(on_alert="pager")
    with pytest.raises(ValueError, match=r"`max_consecutive_skips` must be an int >= 1, got 0"):
        GradientHealthMonitor(max_consecutive_skips=0)
    with pytest.raises(ValueError, match=r"`on_spike` must be one of 'warn' \| 'skip' \| 'raise', got 'ignore'"):
        GradientHealthMonitor(on_spike="ignore")
    with pytest.raises(ValueError, match=r"`spike_z_thresh` must be a finite float > 0 or None, got -1"):
        GradientHealthMonitor(spike_z_thresh=-1)


# ---------------------------------------------------------------- alerts
def test_alert_manager_rate_limits_per_kind_and_layer_and_counts_held_back(caplog):
    seen = []
    manager = AlertManager(window=10, on_alert=seen.append)

    def alert(step, layer="a", kind="dead"):
        return Alert(kind=kind, severity=Severity.WARNING, step=step, message=f"{kind} {layer}", layer=layer)

    with caplog.at_level(logging.WARNING, logger="lightning_gradhealth"):
        emitted = [manager(alert(s)) for s in range(0, 25)]
        manager(alert(3, layer="b"))
        manager(alert(4, kind="ratio_high"))
    assert emitted == [s % 10 == 0 for s in range(25)]
    assert manager.total == 27
    assert [(a.kind, a.layer, a.step, a.held_back) for a in seen] == [
        ("dead", "a", 0, 0),
        ("dead", "a", 10, 9),
        ("dead", "a", 20, 9),
        ("dead", "b", 3, 0),
        ("ratio_high", "a", 4, 0),
    ]
    assert "9 similar alert(s) held back since step 0" in caplog.text
    # state survives a round trip
    other = AlertManager(window=10)
    other.load_state_dict(manager.state_dict())
    assert other(alert(21)) is False and other(alert(30)) is True


class Regression(L.LightningModule):
    def __init__(self, model, lr=1e-3, opt="adamw", lm=False):
        super().__init__()
        self.model, self.lr, self.opt, self.lm = model, lr, opt, lm

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.model(x)
        if self.lm:
            return nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())
        return nn.functional.mse_loss(out, y)

    def configure_optimizers(self):
        if self.opt == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def he_mlp(width=256, depth=4, in_dim=32):
    layers, d = [], in_dim
    for _ in range(depth):
        lin = nn.Linear(d, width)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
        layers += [lin, nn.ReLU()]
        d = width
    return nn.Sequential(*layers, nn.Linear(d, 1))


class TinyTransformer(nn.Module):
    def __init__(self, vocab=512, d=64, layers=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, batch_first=True, norm_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        return self.head(self.norm(self.enc(self.emb(x))))


def regression_data(in_dim=32, n=2048):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, 1, generator=g) / math.sqrt(in_dim)
    return TensorDataset(x, torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=g))


def lm_data(vocab=512, n=256, t=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (n, t + 1), generator=g)
    for i in range(1, t + 1):
        x[:, i] = (x[:, i - 1] * 3 + 1) % vocab
    return TensorDataset(x[:, :-1], x[:, 1:])


HEALTHY = {
    "relu_he_mlp_adamw": lambda: (Regression(he_mlp()), regression_data()),
    "relu_he_mlp_sgd": lambda: (Regression(he_mlp(width=32), opt="sgd"), regression_data()),
    "layernorm_transformer": lambda: (Regression(TinyTransformer(), lm=True), lm_data()),
    "residual_mlp": lambda: (Regression(ResidualReLUMLP(in_dim=32)), regression_data()),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_runs_raise_no_alert_and_get_a_clean_report(name, caplog, tmp_path):
    model, data = HEALTHY[name]()
    seen = []
    monitor = GradientHealthMonitor(on_alert=seen.append)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=150, log_every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="lightning_gradhealth"):
        trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
    assert seen == [], [a.message for a in seen]
    assert "grad_health" not in caplog.text
    assert trainer.callback_metrics["grad_health/alerts"].item() == 0
    # the end-of-fit diagnosis agrees: no finding, a clean report next to the logs
    assert monitor.findings == [], [f.summary for f in monitor.findings]
    report = json.loads((tmp_path / "gradient_health_report.json").read_text())
    assert report["findings"] == [] and report["records"] == 150
    assert all(row["status"] == "ok" for row in report["summary"])
    assert "None: no rule fired over the run. ✅" in (tmp_path / "gradient_health_report.md").read_text()


def test_pathological_run_raises_alerts_with_structured_records(caplog):
    # a deep sigmoid net: vanishing gradients in the first layers
    from lightning_gradhealth.cli.demo import DeepSigmoidMLP

    seen = []
    monitor = GradientHealthMonitor(on_alert=seen.append)
    trainer = make_trainer(callbacks=[monitor], max_steps=30, log_every_n_steps=1)
    with caplog.at_level(logging.WARNING, logger="lightning_gradhealth"):
        trainer.fit(Regression(DeepSigmoidMLP(in_dim=32)), DataLoader(regression_data(), batch_size=64))
    kinds = {a.kind for a in seen}
    assert "vanishing" in kinds and "layer_imbalance" not in kinds  # a depth pattern: vanishing, not an imbalance
    vanishing = [a for a in seen if a.kind == "vanishing" and a.layer is not None]
    assert vanishing[0].layer == "model.net.0" and vanishing[0].severity is Severity.CRITICAL
    assert vanishing[0].value < 1e-7
    # rate limited: 30 logged steps, but one alert per kind and layer per window of 100 steps
    assert sum(a.kind == "vanishing" and a.layer == "model.net.0" for a in seen) == 1
    assert trainer.callback_metrics["grad_health/alerts"].item() > len(seen)
    assert "Fix:" in caplog.text


# ---------------------------------------------------------------- fail fast
def test_raise_names_step_layer_counts_and_fixes_and_logs_the_step_first(tmp_path):
    monitor = GradientHealthMonitor(log_every_n_steps=50)  # step 10 is not a logged step
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=20, accumulate_grad_batches=4)
    with pytest.raises(GradientHealthError) as exc:
        trainer.fit(TinyMLP(poison={42: ("net.2.weight", math.nan)}), loader(n=512))
    err = exc.value
    assert isinstance(err, TrainingHealthError)  # the run must stop: not an unsupported set-up
    assert not isinstance(err, UnsupportedSetupError)
    msg = str(err)
    assert msg.startswith("Non-finite gradients at step 10 (global step 10, epoch 0, last batch 43, micro-batch 2 (counted")
    assert "net.2: 1 NaN, 0 Inf of 272 gradient entries" in msg
    assert msg.count("\n  ") >= 3 and "lower the learning rate" in msg
    assert err.record.step == 10 and err.context["layers"] == ["net.2"]
    assert trainer.global_step == 10  # the update of the failing step was not applied
    scalars = read_scalars(tmp_path)
    assert scalars["grad_health/nan_count"] == {10: 1.0}
    assert scalars["grad_nan/net.2"] == {10: 1.0}


def test_nonfinite_parameters_are_named():
    class Corrupt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net[2].weight[0, 0] = math.inf

    monitor = GradientHealthMonitor()
    trainer = make_trainer(callbacks=[monitor, Corrupt()], max_steps=6)
    with pytest.raises(GradientHealthError, match=r"parameters of net.2 are non-finite") as exc:
        trainer.fit(TinyMLP(), loader())
    assert exc.value.record.step == 2


def test_skip_leaves_the_weights_untouched_and_escalates_after_max_consecutive_skips():
    before = Capture()
    monitor = GradientHealthMonitor(on_nonfinite="skip", max_consecutive_skips=3, log_every_n_steps=1)
    trainer = make_trainer(callbacks=[before, monitor], max_steps=5)
    trainer.fit(TinyMLP(poison={2: ("net.0.weight", math.inf)}), loader())
    p2, p3 = before.steps[2]["params"], before.steps[3]["params"]
    assert all(torch.equal(p2[n], p3[n]) for n in p2)  # step 2 was skipped
    assert not torch.equal(before.steps[1]["params"]["net.0.weight"], p2["net.0.weight"])  # others were not
    assert trainer.global_step == 5
    assert trainer.callback_metrics["grad_health/skipped_steps"].item() == 1

    monitor = GradientHealthMonitor(on_nonfinite="skip", max_consecutive_skips=3)
    trainer = make_trainer(callbacks=[monitor], max_steps=8)
    poison = {i: ("net.0.weight", math.nan) for i in (1, 2, 3)}
    with pytest.raises(GradientHealthError, match=r"Non-finite gradients for 3 steps in a row .* at step 3"):
        trainer.fit(TinyMLP(poison=poison), loader())


def test_warn_applies_the_update_and_alerts(caplog):
    monitor = GradientHealthMonitor(on_nonfinite="warn")
    trainer = make_trainer(callbacks=[monitor], max_steps=3)
    with caplog.at_level(logging.ERROR, logger="lightning_gradhealth"):
        trainer.fit(TinyMLP(poison={1: ("net.4.bias", math.nan)}), loader())
    assert "step 1: non-finite gradients (1 NaN, 0 Inf) in net.4; update applied" in caplog.text


def test_amp_overflow_is_counted_never_raised_but_escalates_when_it_persists():
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    trainer = make_trainer(callbacks=[monitor], max_steps=6, plugins=[MixedPrecision("16-mixed", "cpu")])
    trainer.fit(TinyMLP(optimizer="adam", lr=1e-3, loss_scale_at={1: 1e34, 3: 1e34}), loader())
    assert trainer.callback_metrics["grad_health/amp_overflow"].item() == 2

    monitor = GradientHealthMonitor(amp_max_consecutive_overflows=3)
    trainer = make_trainer(callbacks=[monitor], max_steps=8, plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(GradientHealthError, match=r"GradScaler overflow persists \(3 overflow step\(s\) in a row"):
        trainer.fit(TinyMLP(optimizer="adam", loss_scale_at={i: 1e34 for i in range(2, 8)}), loader())

    # the scale starts at 65536 (above the floor) and halves on the first overflow: the second overflow happens
    # at 32768, below a floor of 4e4
    monitor = GradientHealthMonitor(amp_min_scale=4e4)
    trainer = make_trainer(callbacks=[monitor], max_steps=8, plugins=[MixedPrecision("16-mixed", "cpu")])
    with pytest.raises(GradientHealthError, match=r"loss scale now 32768.*overflow fp16 even unscaled") as exc:
        trainer.fit(TinyMLP(optimizer="adam", loss_scale_at={i: 1e34 for i in range(2, 8)}), loader())
    assert exc.value.record.step == 3


# ---------------------------------------------------------------- fault-injection matrix
@pytest.mark.parametrize("accumulate", [1, 4])
@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fault_matrix(bad, precision, accumulate, tmp_path):
    step, layer = 3, "net.2"
    micro = step * accumulate + (accumulate - 1)  # the last micro-batch of optimizer step 3
    monitor = GradientHealthMonitor(log_every_n_steps=2)
    trainer = make_trainer(
        tmp_path, callbacks=[monitor], max_steps=6, accumulate_grad_batches=accumulate, **PRECISIONS[precision]
    )
    model = TinyMLP(optimizer="adam", lr=1e-3, poison={micro: (f"{layer}.weight", bad)})
    data = loader(n=8 * 6 * accumulate)
    if precision == "16-mixed":
        trainer.fit(model, data)  # the scaler's business: counted, logged, not raised
        assert trainer.callback_metrics["grad_health/amp_overflow"].item() == 1
        record_step = step
    else:
        with pytest.raises(GradientHealthError) as exc:
            trainer.fit(model, data)
        rec = exc.value.record
        assert rec.step == step and rec.first_nonfinite_micro_batch == accumulate - 1
        assert [lay.name for lay in rec.nonfinite_layers] == [layer]
        assert f"{layer}: " in str(exc.value)
        record_step = rec.step
    scalars = read_scalars(tmp_path)
    key = "grad_nan" if math.isnan(bad) else "grad_inf"
    assert f"{key}/{layer}" in scalars and record_step in scalars[f"{key}/{layer}"]
    assert set(scalars["grad_health/total_norm"]) >= {1, record_step}  # events present through that step


@pytest.mark.parametrize("accumulate", [1, 4])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_fault_matrix_healthy_controls(precision, accumulate, caplog):
    monitor = GradientHealthMonitor(log_every_n_steps=2)
    trainer = make_trainer(
        callbacks=[monitor], max_steps=6, accumulate_grad_batches=accumulate, **PRECISIONS[precision]
    )
    with caplog.at_level(logging.WARNING, logger="lightning_gradhealth"):
        trainer.fit(TinyMLP(optimizer="adam", lr=1e-3), loader(n=8 * 6 * accumulate))
    assert trainer.global_step == 6
    assert "grad_health" not in caplog.text


# ---------------------------------------------------------------- resumable state
def _resume_monitor():
    return GradientHealthMonitor(
        log_every_n_steps=1, clip="zclip", zclip_warmup_steps=3, spike_warmup_steps=3, spike_z_thresh=2.0
    )


def test_resumed_run_makes_the_same_decisions(tmp_path):
    spikes = {9: 30.0, 13: 50.0}
    full_mon = _resume_monitor()
    full_rec = Records(full_mon)
    # 8 batches per epoch: the checkpoint at step 8 is an end-of-epoch one, so the resumed run sees the same data
    make_trainer(callbacks=[full_mon, full_rec], max_steps=16).fit(TinyMLP(loss_scale_at=spikes), loader(n=64))

    first_mon = _resume_monitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=8)
    torch.manual_seed(0)
    make_trainer(callbacks=[first_mon, ckpt], max_steps=8, enable_checkpointing=True).fit(
        TinyMLP(loss_scale_at=spikes), loader(n=64)
    )
    resumed_mon = _resume_monitor()
    resumed_rec = Records(resumed_mon)
    model = TinyMLP(loss_scale_at=spikes)
    model.micro = 8  # the module's own counter of micro-batches (for the injection) is not checkpointed
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=8)
    make_trainer(callbacks=[resumed_mon, resumed_rec, ckpt], max_steps=16, enable_checkpointing=True).fit(
        model, loader(n=64), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert resumed_mon.health.guard.steps_seen == full_mon.health.guard.steps_seen == 16
    resumed_z, full_z = resumed_mon.health.guard.clipper.state_dict(), full_mon.health.guard.clipper.state_dict()
    assert (resumed_z["mean"], resumed_z["var"]) == pytest.approx((full_z["mean"], full_z["var"]), rel=1e-9)
    assert resumed_mon.health.guard.spikes.state_dict() == pytest.approx(
        full_mon.health.guard.spikes.state_dict(), rel=1e-9
    )
    assert resumed_mon.health.guard.spike_count == full_mon.health.guard.spike_count >= 1
    assert resumed_mon.health.guard.clipped_steps == full_mon.health.guard.clipped_steps >= 1
    tail = {r.step: r.total_norm for r in full_rec.records if r.step >= 8}
    assert {r.step: r.total_norm for r in resumed_rec.records} == pytest.approx(tail)


def test_spike_skip_escalates_when_spikes_persist():
    # a lasting jump of the loss scale: every step after 8 is a "spike"; skipping them all would freeze training
    monitor = GradientHealthMonitor(on_spike="skip", spike_warmup_steps=5, max_consecutive_skips=3)
    trainer = make_trainer(callbacks=[monitor], max_steps=30)
    with pytest.raises(GradientHealthError, match=r"Gradient-norm spikes for 3 steps in a row .* at step 10") as exc:
        trainer.fit(TinyMLP(loss_scale_at={i: 1e4 for i in range(8, 30)}), loader(n=256))
    assert exc.value.record.step == 10
    assert trainer.global_step == 10


def test_docs_threshold_table_is_the_code_s():
    from pathlib import Path

    from lightning_gradhealth.config.thresholds import THRESHOLD_SOURCES

    page = (Path(__file__).resolve().parents[1] / "docs" / "diagnosis.md").read_text()
    for check, warning, critical, source in THRESHOLD_SOURCES:
        assert f"| {check} | {warning} | {critical} | {source} |" in page, check
        assert "seed" not in source.lower(), check  # the literature or our measurements, never outside notes
    th = Thresholds()  # the table's numbers are the defaults
    assert (th.total_norm_high_warning, th.total_norm_high_critical) == (100, 1000)
    assert (th.total_norm_low_warning, th.total_norm_low_critical) == (1e-3, 1e-8)
    assert (th.layer_norm_low_warning, th.layer_norm_low_critical) == (1e-5, 1e-7)
    assert (th.layer_norm_ratio_warning, th.layer_norm_ratio_critical) == (1e3, 1e4)
    assert (th.zero_frac_warning, th.zero_frac_critical) == (0.5, 0.9)
    assert (th.grad_param_ratio_high_warning, th.grad_param_ratio_high_critical) == (1e2, 1e4)
    assert (th.grad_param_ratio_low_warning, th.grad_param_ratio_low_critical) == (1e-6, 1e-9)
    assert (th.update_ratio_high_warning, th.update_ratio_high_critical) == (0.1, 1.0)
    assert (th.update_ratio_low_warning, th.update_ratio_low_critical) == (1e-7, 1e-9)
