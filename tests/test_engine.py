"""The engine and layout against float64 references, on their own and (multi-tensor path) in a Trainer."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import Capture, Records, TinyMLP, assert_matches, loader, make_trainer, reference
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_gradhealth import GradientHealthMonitor, GradStatsEngine, build_layout
from lightning_gradhealth.stats import horizontal
from lightning_gradhealth.stats.engine import NonFiniteTracker, StepMeta
from lightning_gradhealth.stats.horizontal import horizontal_stats
from lightning_gradhealth.stats.kernels import SCRATCH_MAX, SCRATCH_MIN, abs_max_and_min_nonzero, nonzero_counts


def _model_with_grads(dtype=torch.float32, scale=1.0, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).to(dtype)
    for p in model.parameters():
        p.grad = (torch.randn_like(p, dtype=torch.float32) * scale).to(dtype)
        p.grad[p.grad.abs() < 0.2 * scale] = 0  # some exact zeros
    return model


def _run(model, horizontal=None, **engine_kwargs):
    engine = GradStatsEngine(**engine_kwargs)
    engine._horizontal = horizontal  # None: by device (per tensor on the CPU); True: the multi-tensor path
    layout = build_layout(model.named_parameters())
    pending = engine.compute(layout)
    return engine.finish(pending, StepMeta())


HORIZONTAL = pytest.mark.parametrize("horizontal", [None, True], ids=["per_tensor", "multi_tensor"])


def _captured(model):
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    return grads, params


@HORIZONTAL
def test_fp16_gradients_accumulate_in_float32_and_do_not_overflow(horizontal):
    # entries of ~1000 over thousands of elements: the norm itself exceeds the fp16 range (max 65504)
    model = _model_with_grads(torch.float16, scale=1000.0)
    fp16_norms = torch._foreach_norm([p.grad for p in model.parameters()], 2)
    # the trap: a global norm taken in the grads' own dtype overflows
    assert torch.isinf(torch.linalg.vector_norm(torch.stack(fp16_norms)))
    rec = _run(model, horizontal, stats="full")
    grads, params = _captured(model)
    ref = reference(grads, params)
    assert math.isfinite(rec.total_norm) and rec.total_norm > 65504
    assert rec.nan_count == rec.inf_count == 0
    assert rec.total_norm == pytest.approx(ref["total_norm"], rel=1e-5)
    for lay in rec.layers:
        assert lay.grad_norm == pytest.approx(ref["layers"][lay.name]["grad_norm"], rel=1e-5)
        assert lay.std == pytest.approx(ref["layers"][lay.name]["std"], rel=1e-4)


@HORIZONTAL
def test_bf16_gradients_match_reference(horizontal):
    model = _model_with_grads(torch.bfloat16)
    rec = _run(model, horizontal, stats="full")
    ref = reference(*_captured(model))
    assert rec.total_norm == pytest.approx(ref["total_norm"], rel=1e-5)
    assert rec.zero_frac == pytest.approx(ref["zero_frac"], abs=1e-12)
    for lay in rec.layers:
        r = ref["layers"][lay.name]
        assert (lay.max_abs, lay.min_abs_nonzero) == (r["max_abs"], r["min_abs_nonzero"])  # picked values: exact
        assert lay.zero_frac == pytest.approx(r["zero_frac"], abs=1e-12)
        assert lay.std == pytest.approx(r["std"], rel=1e-4)


@HORIZONTAL
def test_grad_scale_is_divided_out_of_every_magnitude(horizontal):
    model = _model_with_grads()
    ref = reference(*_captured(model))
    for p in model.parameters():
        p.grad.mul_(1024.0)
    engine = GradStatsEngine(stats="full")
    engine._horizontal = horizontal
    layout = build_layout(model.named_parameters())
    rec = engine.finish(engine.compute(layout, grad_scale=torch.tensor(1024.0)), StepMeta())
    # float32 norms against float64: a few ulps times log2(n), in the CPU's kernel order (1e-5 holds on any CPU);
    # the scale (a power of two) divides exactly, and max / min pick one of the same values (exact)
    assert rec.total_norm == pytest.approx(ref["total_norm"], rel=1e-5)
    for lay in rec.layers:
        r = ref["layers"][lay.name]
        assert lay.grad_norm == pytest.approx(r["grad_norm"], rel=1e-5)
        assert lay.max_abs == pytest.approx(r["max_abs"], rel=1e-6)
        assert lay.min_abs_nonzero == pytest.approx(r["min_abs_nonzero"], rel=1e-6)
        assert lay.std == pytest.approx(r["std"], rel=1e-5)
        assert lay.zero_frac == pytest.approx(r["zero_frac"], abs=1e-12)


@HORIZONTAL
def test_nan_and_inf_counts_are_exact_per_layer(horizontal):
    model = _model_with_grads()
    model[2].weight.grad[0, :3] = math.nan
    model[2].bias.grad[5] = math.inf
    model[4].weight.grad[1, 1] = -math.inf
    rec = _run(model, horizontal, stats="full")
    ref = reference(*_captured(model))
    assert not rec.is_finite
    assert [lay.name for lay in rec.nonfinite_layers] == ["2", "4"]
    for lay in rec.layers:
        assert (lay.nan_count, lay.inf_count) == (ref["layers"][lay.name]["nan"], ref["layers"][lay.name]["inf"])
    assert (rec.nan_count, rec.inf_count) == (3, 2)
    assert math.isnan(rec.layer_norm_ratio)  # not a healthy-looking 1.0 on a non-finite step


def test_layer_norm_ratio_ignores_zero_layers_and_true_global_norm_is_not_a_sum():
    model = _model_with_grads()
    model[4].weight.grad.zero_()
    model[4].bias.grad.zero_()
    rec = _run(model)
    ref = reference(*_captured(model))
    assert rec.layer_norm_ratio == pytest.approx(ref["layer_norm_ratio"], rel=1e-5)  # float32 norms (see above)
    assert rec.total_norm == pytest.approx(ref["total_norm"], rel=1e-5)
    assert rec.total_norm < sum(lay.grad_norm for lay in rec.layers)
    assert rec.layer("4").zero_frac == 1.0


def test_layout_groups_by_owner_module_in_definition_order_and_skips_frozen_and_shared():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.enc = nn.Linear(4, 4)
            self.frozen = nn.Linear(4, 4).requires_grad_(False)
            self.dec = nn.Linear(4, 4)
            self.tied = self.enc  # shared module: its parameters appear once

    layout = build_layout(Net().named_parameters())
    assert layout.layer_names == ("scale", "enc", "dec")
    assert layout.param_names == ("scale", "enc.weight", "enc.bias", "dec.weight", "dec.bias")
    assert layout.layer_numel == (1, 20, 20)


def test_no_gradient_at_all_gives_no_record():
    model = nn.Linear(3, 3)
    engine = GradStatsEngine()
    assert engine.compute(build_layout(model.named_parameters())) is None


def test_tracker_remembers_first_bad_micro_batch_without_sync():
    p = nn.Parameter(torch.zeros(4))
    layout = build_layout([("w", p)])
    tracker = NonFiniteTracker()
    for micro, value in enumerate([0.0, 1.0, math.nan, 2.0]):
        g = torch.full((4,), value)
        p.grad = g if p.grad is None else p.grad + g
        tracker.observe(layout)
        assert tracker.micro_batches == micro + 1
    assert tracker.first_bad.item() == 2
    tracker.reset()
    assert tracker.first_bad is None


def _special(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(n, generator=gen).to(dtype)
    t[torch.rand(n, generator=gen) < 0.3] = 0
    if n > 8:
        t[1], t[2], t[3] = -0.0, float("inf"), -float("inf")
        if dtype != torch.float64:
            t[4] = torch.finfo(dtype).tiny / 4  # subnormal (flushed to 0 in bf16 arithmetic? stays a value)
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_nonzero_counts_and_abs_extremes_match_the_plain_formulas(dtype):
    """The buffered CPU paths against count_nonzero and a masked min, across the size thresholds, with NaN, ±inf,
    -0.0, subnormals, non-contiguous views, and the buffer reused at growing and shrinking sizes."""
    gen = torch.Generator().manual_seed(0)
    sizes = [0, 7, SCRATCH_MIN - 1, SCRATCH_MIN, 100_000, SCRATCH_MAX, SCRATCH_MAX + 1, 70_000]
    tensors = [_special(n, dtype, gen) for n in sizes]
    tensors.append(_special(2 * SCRATCH_MIN, dtype, gen).reshape(256, -1).t())  # transposed view
    tensors.append(torch.zeros(SCRATCH_MIN, dtype=dtype))  # all zeros
    with_nan = _special(SCRATCH_MIN, dtype, gen)
    with_nan[10] = float("nan")
    tensors.append(with_nan)
    scratch: dict = {}
    for group in (tensors, tensors[::-1], tensors[3:5]):
        counts = nonzero_counts(group, scratch).tolist()
        assert counts == [torch.count_nonzero(t).item() for t in group]
    buf = torch.empty(max(t.numel() for t in tensors))
    for t in tensors:
        if t.numel() == 0 or dtype == torch.float64:
            continue
        a = t.float().abs()
        largest, smallest = abs_max_and_min_nonzero(t, buf)
        nz = a[a != 0]
        if torch.isnan(a).any():
            assert math.isnan(largest.item()) and math.isnan(smallest.item())
        else:
            assert largest.item() == a.max().item()
            assert smallest.item() == (nz.min().item() if nz.numel() else math.inf)


@pytest.mark.parametrize("stats", ["basic", "full"])
def test_multi_tensor_path_gives_the_per_tensor_record(stats):
    """The accelerators' path (forced on CPU tensors) against the CPU's, dead units and a float16 layer included."""
    model = _model_with_grads()
    model[2].half()
    model[2].weight.grad = (torch.randn(64, 64) * (torch.rand(64, 64) < 0.5)).half()
    model[2].bias.grad = torch.randn(64).half()
    model[0].weight.grad[[3, 17, 40]] = 0  # dead units
    model[2].weight.grad[[0, 63]] = 0
    records = [_run(model, horizontal, stats=stats) for horizontal in (False, True)]
    per_tensor, multi = ([lay for lay in r.layers] for r in records)
    dead = {"0": 3, "2": 2, "4": 0}
    for a, b in zip(per_tensor, multi, strict=True):
        assert a.dead_unit_frac == b.dead_unit_frac == dead[a.name] / a.units
        assert a.zero_frac == b.zero_frac and a.grad_norm == b.grad_norm  # exact counts; the same norm kernel
        if stats == "full":
            assert (a.max_abs, a.min_abs_nonzero) == (b.max_abs, b.min_abs_nonzero)
            assert b.mean == pytest.approx(a.mean, abs=1e-5 * a.grad_norm) and b.std == pytest.approx(a.std, rel=1e-5)


@pytest.mark.parametrize("fused_scaler", [False, True], ids=["bf16-mixed", "16-mixed-fused-adam"])
def test_multi_tensor_path_in_a_real_trainer_matches_the_float64_reference(monkeypatch, fused_scaler):
    """The accelerators' path chosen on the CPU, through a real Trainer; a fused optimizer's still-scaled gradients
    divided by the scale in it."""
    monkeypatch.setattr(horizontal, "use_horizontal", lambda device: True)
    calls = []
    monkeypatch.setattr(horizontal, "horizontal_stats", lambda *a, **k: calls.append(1) or horizontal_stats(*a, **k))
    monitor = GradientHealthMonitor(stats="full", log_every_n_steps=1)
    capture, records = Capture(), Records(monitor)
    if fused_scaler:
        kwargs = {"plugins": [MixedPrecision("16-mixed", "cpu")]}
        model = TinyMLP(optimizer="adam", fused=True, lr=1e-3)
    else:
        kwargs, model = {"precision": "bf16-mixed"}, TinyMLP()
    make_trainer(callbacks=[monitor, capture, records], **kwargs).fit(model, loader())
    assert len(records.records) == len(capture.steps) == len(calls) > 0
    for rec, cap in zip(records.records, capture.steps, strict=True):
        scale = cap["scale"] if fused_scaler else 1.0
        assert_matches(rec, reference(cap["grads"], cap["params"], scale=scale), full=True)
