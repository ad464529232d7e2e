"""Numbers in every Lightning regime, against a float64 reference built from grads captured in the same hook."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Capture, Records, TinyMLP, assert_matches, loader, make_trainer, reference
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_gradhealth import GradientHealthMonitor


def _fit(model, monitor, **trainer_kwargs):
    capture = Capture()
    records = Records(monitor)
    trainer = make_trainer(callbacks=[monitor, capture, records], **trainer_kwargs)
    trainer.fit(model, loader())
    return trainer, capture, records.records


def _check_all(capture, records, *, full=False, scaled=False, rel=1e-6):
    assert len(records) == len(capture.steps) > 0
    for rec, cap in zip(records, capture.steps, strict=True):
        assert rec.step == cap["step"]
        scale = cap["scale"] if scaled else 1.0
        assert_matches(rec, reference(cap["grads"], cap["params"], scale=scale), rel=rel, full=full)


@pytest.mark.parametrize("stats", ["basic", "full"])
def test_32_true_matches_reference(stats):
    monitor = GradientHealthMonitor(stats=stats)
    _, capture, records = _fit(TinyMLP(frozen=True), monitor)
    _check_all(capture, records, full=stats == "full")
    # frozen parameters are ignored entirely
    assert all(not lay.name.startswith("frozen") for rec in records for lay in rec.layers)
    assert [lay.name for lay in records[0].layers] == ["net.0", "net.2", "net.4"]


@pytest.mark.parametrize("norm_type", [1.0, 3.0, math.inf])
def test_norm_types_match_reference(norm_type):
    monitor = GradientHealthMonitor(norm_type=norm_type)
    _, capture, records = _fit(TinyMLP(), monitor, max_steps=2)
    for rec, cap in zip(records, capture.steps, strict=True):
        ref = reference(cap["grads"], cap["params"], norm_type=norm_type)
        # float32 power sums in the CPU's kernel order against float64: 1e-5 holds on any CPU (inf is exact)
        assert rec.total_norm == pytest.approx(ref["total_norm"], rel=1e-5)
        for lay in rec.layers:
            assert lay.grad_norm == pytest.approx(ref["layers"][lay.name]["grad_norm"], rel=1e-5)
            assert lay.param_norm == pytest.approx(ref["layers"][lay.name]["param_norm"], rel=1e-5)


def test_bf16_mixed_matches_reference():
    monitor = GradientHealthMonitor(stats="full")
    _, capture, records = _fit(TinyMLP(), monitor, precision="bf16-mixed")
    _check_all(capture, records, full=True)


def test_16_mixed_with_grad_scaler_reports_unscaled_grads():
    monitor = GradientHealthMonitor()
    trainer, capture, records = _fit(
        TinyMLP(optimizer="adam", lr=1e-3), monitor, plugins=[MixedPrecision("16-mixed", "cpu")]
    )
    assert trainer.precision_plugin.scaler is not None
    # non-fused: Lightning unscaled before the hook, so the captured grads are already true grads
    _check_all(capture, records)
    assert all(rec.amp_scale == cap["scale"] for rec, cap in zip(records, capture.steps, strict=True))
    assert not any(rec.amp_overflow for rec in records)


def test_16_mixed_fused_optimizer_grads_still_scaled_are_unscaled():
    monitor = GradientHealthMonitor(stats="full")
    trainer, capture, records = _fit(
        TinyMLP(optimizer="adam", fused=True, lr=1e-3), monitor, plugins=[MixedPrecision("16-mixed", "cpu")]
    )
    cap = capture.steps[0]
    # the hook really sees scaled gradients here: their raw norm is the true norm times the scale
    raw = reference(cap["grads"], cap["params"])["total_norm"]
    assert raw == pytest.approx(records[0].total_norm * cap["scale"], rel=1e-5)  # a float32 norm against float64
    assert cap["scale"] > 1
    _check_all(capture, records, full=True, scaled=True)


def test_16_mixed_overflow_is_recorded_as_skipped_overflow_not_corruption():
    # micro-batch 2 gets its loss multiplied so that the scaled fp16 backward overflows
    monitor = GradientHealthMonitor()
    trainer, capture, records = _fit(
        TinyMLP(optimizer="adam", lr=1e-3, loss_scale_at={2: 1e34}),
        monitor,
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    by_step = {rec.step: rec for rec in records}
    bad = by_step[2]
    assert bad.amp_overflow and not bad.is_finite
    assert bad.nan_count + bad.inf_count > 0
    assert bad.first_nonfinite_micro_batch == 0
    # the scaler skipped that update and halved its scale
    assert by_step[3].amp_scale == pytest.approx(bad.amp_scale / 2)
    assert all(not by_step[s].amp_overflow for s in by_step if s != 2)
    for rec, cap in zip(records, capture.steps, strict=True):
        if rec.step != 2:
            assert_matches(rec, reference(cap["grads"], cap["params"]))


def test_accumulation_one_record_per_optimizer_step_from_accumulated_grads():
    monitor = GradientHealthMonitor()
    trainer, capture, records = _fit(TinyMLP(), monitor, accumulate_grad_batches=4, max_steps=2)
    assert len(records) == 2 == trainer.global_step
    assert [r.step for r in records] == [0, 1]
    assert [r.batch_idx for r in records] == [3, 7]
    _check_all(capture, records)
    assert all(r.first_nonfinite_micro_batch is None for r in records)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_accumulation_names_first_nonfinite_micro_batch(bad_value):
    # micro-batch 6 = the 3rd micro-batch (index 2) of optimizer step 1
    monitor = GradientHealthMonitor(on_nonfinite="warn")
    model = TinyMLP(poison={6: ("net.2.weight", bad_value)})
    trainer, capture, records = _fit(model, monitor, accumulate_grad_batches=4, max_steps=2)
    rec = records[1]
    assert rec.first_nonfinite_micro_batch == 2
    assert not rec.is_finite
    (layer,) = rec.nonfinite_layers
    assert layer.name == "net.2"
    ref = reference(capture.steps[1]["grads"], capture.steps[1]["params"])["layers"]["net.2"]
    assert (layer.nan_count, layer.inf_count) == (ref["nan"], ref["inf"])
    assert layer.nan_count + layer.inf_count == 1
    assert records[0].first_nonfinite_micro_batch is None


@pytest.mark.parametrize("guard_mode", ["sync", "deferred"])  # deferred: the post-clip norm is copied without a sync
def test_gradient_clipping_stats_are_pre_clip_and_post_clip_norm_is_logged(guard_mode):
    monitor = GradientHealthMonitor(guard_mode=guard_mode)
    trainer, capture, records = _fit(TinyMLP(lr=0.01), monitor, gradient_clip_val=0.05)
    _check_all(capture, records)  # pre-clip
    for rec, cap in zip(records, capture.steps, strict=True):
        pre = reference(cap["grads"], cap["params"])["total_norm"]
        assert pre > 0.05
        # torch.nn.utils.clip_grad_norm_ semantics: scale by max_norm / (norm + 1e-6), capped at 1
        assert rec.post_clip_norm == pytest.approx(pre * min(1.0, 0.05 / (pre + 1e-6)), rel=1e-5)


@pytest.mark.parametrize(("layer", "value"), [("net.2", math.inf), ("net.0", math.nan)])
def test_gradient_clipping_nonfinite_counts_are_pre_clip(layer, value):
    # clipping an Inf/NaN gradient by norm turns every entry into NaN or 0; the counts must be the pre-clip ones
    monitor = GradientHealthMonitor(on_nonfinite="warn")
    param = f"{layer}.weight"
    trainer, capture, records = _fit(TinyMLP(poison={1: (param, value)}), monitor, gradient_clip_val=1.0, max_steps=2)
    bad = records[1]
    expected = (0, 1) if math.isinf(value) else (1, 0)
    assert (bad.nan_count, bad.inf_count) == expected
    assert (bad.layer(layer).nan_count, bad.layer(layer).inf_count) == expected
    assert [lay.name for lay in bad.nonfinite_layers] == [layer]
    assert math.isnan(bad.post_clip_norm)  # after the clip everything is NaN: why counts are taken before it


def test_gradient_clipping_by_value_post_clip_norm():
    monitor = GradientHealthMonitor()
    trainer, capture, records = _fit(TinyMLP(), monitor, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    for rec, cap in zip(records, capture.steps, strict=True):
        clipped = [g.clamp(-0.01, 0.01) for g in cap["grads"].values()]
        expect = torch.cat([g.reshape(-1) for g in clipped]).norm().item()
        assert rec.post_clip_norm == pytest.approx(expect, rel=1e-5)
        assert rec.total_norm > rec.post_clip_norm


class TwoOptimizers(LightningModule):
    """Manual optimization: two optimizers, each stepped once per batch (a GAN-like loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.disc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        d_loss = self.disc(self.gen(x).detach()).pow(2).mean() - self.disc(x).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = -self.disc(self.gen(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log("g_loss", g_loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.gen.parameters(), lr=0.01), torch.optim.SGD(self.disc.parameters(), lr=0.01)


def test_manual_optimization_two_optimizers_record_per_step(tmp_path):
    monitor = GradientHealthMonitor()
    capture = Capture()
    records = Records(monitor)
    trainer = make_trainer(tmp_path, callbacks=[monitor, capture, records], max_steps=6)
    trainer.fit(TwoOptimizers(), loader())
    # global_step counts every opt.step(): 6 steps = 3 batches × 2 optimizers, one record each
    assert len(capture.steps) == 6
    assert len(records.records) == 6
    for rec, cap in zip(records.records, capture.steps, strict=True):
        assert rec.optimizer_idx == trainer.optimizers.index(cap["optimizer"])
        owned = {n: g for n, g in cap["grads"].items() if n.startswith("gen" if rec.optimizer_idx == 0 else "disc")}
        assert_matches(rec, reference(owned, cap["params"]))
    # keys carry the optimizer index when there is more than one optimizer
    assert "grad_health/total_norm/opt0" in trainer.callback_metrics
    assert "grad_health/total_norm/opt1" in trainer.callback_metrics
    assert "grad_health/total_norm" not in trainer.callback_metrics


def test_single_optimizer_keys_have_no_index():
    monitor = GradientHealthMonitor()
    trainer, _, _ = _fit(TinyMLP(), monitor, max_steps=1)
    assert "grad_health/total_norm" in trainer.callback_metrics
    assert not any("/opt" in k for k in trainer.callback_metrics)


def test_unused_parameters_counted_and_named_once():
    monitor = GradientHealthMonitor()
    with pytest.warns(
        UserWarning, match=r"2 trainable parameter\(s\) got no gradient.*unused.weight, unused.bias"
    ) as w:
        trainer, capture, records = _fit(TinyMLP(unused=True), monitor, max_steps=3)
    assert sum("got no gradient" in str(x.message) for x in w) == 1
    assert all(r.no_grad_count == 2 and r.no_grad_params == ("unused.weight", "unused.bias") for r in records)
    assert trainer.callback_metrics["grad_health/no_grad_count"].item() == 2
    _check_all(capture, records)


def test_group_by_parameter_and_callable_and_filters():
    monitor = GradientHealthMonitor(group_by="parameter", exclude=r"\.bias$")
    _, capture, records = _fit(TinyMLP(), monitor, max_steps=1)
    assert [lay.name for lay in records[0].layers] == ["net.0.weight", "net.2.weight", "net.4.weight"]
    grads = {n: g for n, g in capture.steps[0]["grads"].items() if not n.endswith("bias")}
    assert_matches(records[0], reference(grads, capture.steps[0]["params"], group_by="parameter"))

    monitor = GradientHealthMonitor(group_by=lambda name: "early" if name.startswith("net.0") else "late")
    _, capture, records = _fit(TinyMLP(), monitor, max_steps=1)
    assert [lay.name for lay in records[0].layers] == ["early", "late"]

    monitor = GradientHealthMonitor(include=r"^net\.4")
    _, capture, records = _fit(TinyMLP(), monitor, max_steps=1)
    assert [lay.name for lay in records[0].layers] == ["net.4"]


def test_per_layer_false_keeps_global_metrics_only(tmp_path):
    monitor = GradientHealthMonitor(per_layer=False)
    trainer, capture, records = _fit(TinyMLP(), monitor, max_steps=2)
    assert records[0].layers == ()
    ref = reference(capture.steps[0]["grads"], capture.steps[0]["params"])
    # float32 norms against float64, in the CPU's kernel order: 1e-5 holds on any CPU
    assert records[0].total_norm == pytest.approx(ref["total_norm"], rel=1e-5)
    assert records[0].zero_frac == pytest.approx(ref["zero_frac"], abs=1e-12)
    assert records[0].layer_norm_ratio == pytest.approx(ref["layer_norm_ratio"], rel=1e-5)


class WideMLP(TinyMLP):
    """Weights of 64K to 4M entries take the engine's buffered CPU paths (zero counts, max / min non-zero |g|);
    the small layers take the per-tensor ones. ReLU gives exact zeros."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 1))


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed"])
def test_large_tensors_and_64_true_match_reference(precision):
    monitor = GradientHealthMonitor(stats="full")
    _, capture, records = _fit(WideMLP(), monitor, precision=precision, max_steps=3)
    assert capture.steps[0]["grads"]["net.2.weight"].numel() >= 2**16
    assert any(r.layer("net.2").zero_frac > 0 for r in records)  # there are zeros to count
    # float32 accumulation over 131K entries: ~1e-6 relative; float64 gradients are accumulated in float64
    _check_all(capture, records, full=True, rel=1e-12 if precision == "64-true" else 1e-5)


def test_64_true_with_clipping_and_the_guard():
    monitor = GradientHealthMonitor(clip="agc", log_every_n_steps=2)
    _, capture, records = _fit(WideMLP(), monitor, precision="64-true", max_steps=4)
    assert records and all(math.isfinite(r.total_norm) for r in records)
