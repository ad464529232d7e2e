"""Every clipper on bare tensors, no Trainer, against an independent float64 reference.

tests/test_clipping.py checks the clippers through a Trainer; here each clipper is called directly, with loss-scaled
gradients, bounded histories, units below the AGC floor and non-finite norms in the middle of a warm-up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gradhealth.guard.clipping import AGCClipper, AutoClipper, Clipper, NormClipper, ValueClipper, ZClipper

EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s


def _norm64(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def _modules(seed: int = 0) -> list[torch.Tensor]:
    """The parameters of a Linear, a Conv2d and a 1-D bias, as float32 tensors."""
    torch.manual_seed(seed)
    lin, conv = nn.Linear(5, 6), nn.Conv2d(3, 4, 3)
    return [lin.weight.detach().clone(), lin.bias.detach().clone(), conv.weight.detach().clone()]


def _grads(params: Sequence[torch.Tensor], seed: int = 1, gain: float = 1.0) -> list[torch.Tensor]:
    """Gradients whose units (rows along dimension 0) span six orders of magnitude."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen)
        if p.ndim > 1:
            g *= torch.logspace(-4, 2, p.shape[0]).reshape(-1, *([1] * (p.ndim - 1)))
        out.append(g * gain)
    return out


def _copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def _close(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float = 1e-6) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e.double(), rtol=rtol, atol=1e-12)


def _torch_clipped(grads: Sequence[torch.Tensor], clip: Callable[..., object], bound: float) -> list[torch.Tensor]:
    """What a torch.nn.utils clipper does to float64 copies of ``grads``."""
    params = [nn.Parameter(torch.zeros_like(g, dtype=torch.float64)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.double().clone()
    clip(params, bound)
    return [p.grad for p in params]


# ---------------------------------------------------------------------------------------------------- norm


@pytest.mark.parametrize("max_norm", [0.05, 1.0, 1e4])
def test_norm_clipper_equals_clip_grad_norm(max_norm):
    params = _modules()
    grads = _grads(params)
    total = _norm64(grads)
    expected = _torch_clipped(grads, torch.nn.utils.clip_grad_norm_, max_norm)
    out = NormClipper(max_norm).clip(grads, params, total)
    _close(grads, expected)
    coef = min(1.0, max_norm / (total + EPS))
    assert out.coef == pytest.approx(coef, rel=1e-12) and out.clipped is (coef < 1.0)
    assert out.threshold == max_norm
    assert out.clipped_norm == pytest.approx(_norm64(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- value


@pytest.mark.parametrize("clip_value", [0.05, 1.0, 1e4])
def test_value_clipper_equals_clamp_and_clip_grad_value(clip_value):
    params = _modules()
    grads = _grads(params)
    expected = [g.double().clamp(-clip_value, clip_value) for g in grads]
    _close(expected, _torch_clipped(grads, torch.nn.utils.clip_grad_value_, clip_value), rtol=0)
    peak = max(float(g.abs().max()) for g in grads)
    exact = [g.clamp(-clip_value, clip_value) for g in grads]  # in the gradients' dtype: the bound is rounded
    out = ValueClipper(clip_value).clip(grads, params, _norm64(grads))
    assert all(torch.equal(g, e) for g, e in zip(grads, exact, strict=True))
    _close(grads, expected, rtol=1e-7)  # float32(clip_value) vs clip_value
    assert out.clipped is None and out.coef is None  # decided per entry: known on the device
    assert bool(out.clipped_device) is (peak > clip_value)
    assert float(out.clipped_norm_device) == pytest.approx(_norm64(expected), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- AGC


def _agc_reference(
    grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], factor: float, eps: float
) -> tuple[list[torch.Tensor], int, int]:
    """NFNets' unit-wise rule, in float64, one unit at a time; also how many units were clipped and kept."""
    out, clipped, kept = [], 0, 0
    for g, p in zip(grads, params, strict=True):
        g64, p64 = g.double().clone(), p.double()
        units = [(g64, p64)] if g.ndim <= 1 else [(g64[i], p64[i]) for i in range(g.shape[0])]
        for gu, pu in units:
            w = max(math.sqrt(float((pu * pu).sum())), eps)
            n = math.sqrt(float((gu * gu).sum()))
            if n / w > factor:
                gu.mul_(factor * w / n)  # a view: changes g64
                clipped += 1
            else:
                kept += 1
        out.append(g64)
    return out, clipped, kept


@pytest.mark.parametrize(("factor", "eps"), [(0.01, 1e-3), (0.1, 1e-3), (0.05, 0.5)])
def test_agc_equals_the_unit_wise_formula_for_linear_conv_and_bias(factor, eps):
    params = _modules()
    params[0][2].zero_()  # a unit with no weight: clipped against eps, the floor
    grads = _grads(params)
    expected, clipped, kept = _agc_reference(grads, params, factor, eps)
    assert clipped > 0 and kept > 0  # both branches are exercised
    out = AGCClipper(factor, eps).clip(grads, params, _norm64(grads))
    _close(grads, expected)
    assert bool(out.clipped_device) and out.clipped is None
    assert float(out.clipped_norm_device) == pytest.approx(_norm64(expected), rel=1e-6)
    # the zero-weight unit was clipped to factor * eps exactly
    assert _norm64([grads[0][2]]) == pytest.approx(factor * eps, rel=1e-6)


def test_agc_leaves_small_gradients_alone():
    params = _modules()
    grads = _grads(params, gain=1e-9)
    before = _copies(grads)
    out = AGCClipper(0.01).clip(grads, params, _norm64(grads))
    assert all(torch.equal(a, b) for a, b in zip(grads, before, strict=True))
    assert not bool(out.clipped_device)
    assert float(out.clipped_norm_device) == pytest.approx(_norm64(before), rel=1e-6)


def test_agc_unitwise_norm_is_per_output_unit():
    w = torch.randn(4, 3, 2, 2)
    ref = w.double().reshape(4, -1).norm(dim=1).reshape(4, 1, 1, 1)
    torch.testing.assert_close(AGCClipper.unitwise_norm(w).double(), ref, rtol=1e-6, atol=0)
    b = torch.randn(7)
    assert float(AGCClipper.unitwise_norm(b)) == pytest.approx(float(b.double().norm()), rel=1e-6)


# ---------------------------------------------------------------------------------------------------- AutoClip


def _norm_sequence(n: int, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(v) for v in np.exp(rng.normal(0.0, 0.7, n))]


def _grads_of_norm(norm: float, seed: int) -> list[torch.Tensor]:
    grads = _grads(_modules(), seed=seed)
    current = _norm64(grads)
    return [g * (norm / current) for g in grads]


@pytest.mark.parametrize(("q", "history"), [(10.0, 10_000), (50.0, 5), (0.0, 100), (100.0, 3), (37.5, 7)])
def test_autoclip_clips_to_the_percentile_of_its_bounded_history(q, history):
    clipper = AutoClipper(q, history)
    norms = _norm_sequence(25)
    seen: list[float] = []
    clipped = 0
    for i, x in enumerate(norms):
        seen.append(x)  # the current norm joins the history first
        thr = float(np.percentile(seen[-history:], q))
        coef = min(1.0, thr / (x + EPS))
        grads = _grads_of_norm(x, seed=i)
        expected = [g.double() * coef for g in grads]
        out = clipper.clip(grads, [], x)
        _close(grads, expected)
        assert out.threshold == pytest.approx(thr, rel=1e-12)
        assert out.coef == pytest.approx(coef, rel=1e-12) and out.clipped is (coef < 1.0)
        clipped += coef < 1.0
    assert list(clipper.history) == seen[-history:]
    assert clipped > 0 or q == 100.0


# ---------------------------------------------------------------------------------------------------- ZClip


class ZClipReference:
    """ZClip as its class docstring defines it, written independently in float64."""

    def __init__(self, alpha: float, z_thresh: float, warmup_steps: int, eps: float = 1e-6) -> None:
        self.alpha, self.z_thresh, self.warmup_steps, self.eps = alpha, z_thresh, warmup_steps, eps
        self.buffer: list[float] = []
        self.mean: float | None = None
        self.var: float | None = None

    def step(self, x: float) -> tuple[float, float | None]:
        """The coefficient applied to a gradient of norm ``x``, and the threshold (``None``: not clipped)."""
        if self.mean is None:
            self.buffer.append(x)
            if len(self.buffer) == self.warmup_steps:
                self.mean, self.var = float(np.mean(self.buffer)), float(np.var(self.buffer))
            return 1.0, None
        std = math.sqrt(self.var)
        z = (x - self.mean) / (std + self.eps)
        thr = self.mean + self.z_thresh * std / (z / self.z_thresh) if z > self.z_thresh else None
        used = x if thr is None else thr
        self.mean = self.alpha * self.mean + (1 - self.alpha) * used
        self.var = self.alpha * self.var + (1 - self.alpha) * (used - self.mean) ** 2
        return (1.0 if thr is None else min(1.0, thr / (x + EPS))), thr


@pytest.mark.parametrize(("alpha", "z_thresh", "warmup"), [(0.97, 2.5, 25), (0.9, 2.0, 5), (0.5, 1.0, 1)])
def test_zclip_matches_its_ema_definition(alpha, z_thresh, warmup):
    clipper, ref = ZClipper(alpha, z_thresh, warmup), ZClipReference(alpha, z_thresh, warmup)
    norms = _norm_sequence(60, seed=2)
    norms[warmup + 3] *= 50.0  # an outlier after the warm-up
    coefs = []
    for i, x in enumerate(norms):
        coef, thr = ref.step(x)
        grads = _grads_of_norm(x, seed=i)
        expected = [g.double() * coef for g in grads]
        if thr is not None:
            assert clipper.threshold(x) == pytest.approx(thr, rel=1e-12)
        out = clipper.clip(grads, [], x)
        _close(grads, expected)
        assert out.clipped is (coef < 1.0)
        assert out.clipped_norm == pytest.approx(x * coef, rel=1e-9)
        coefs.append(coef)
    assert coefs[:warmup] == [1.0] * warmup  # the warm-up never clips
    assert coefs[warmup + 3] < 0.1  # the outlier is clipped hard
    assert clipper.mean == pytest.approx(ref.mean, rel=1e-12) and clipper.var == pytest.approx(ref.var, rel=1e-12)


# ---------------------------------------------------------------------------------------------------- loss scale


def _clippers() -> dict[str, Callable[[], Clipper]]:
    return {
        "norm": lambda: NormClipper(0.5),
        "value": lambda: ValueClipper(0.05),
        "agc": lambda: AGCClipper(0.02, 1e-3),
        "autoclip": lambda: AutoClipper(30.0, 100),
        "zclip": lambda: ZClipper(0.9, 1.5, 3),
    }


@pytest.mark.parametrize("scale", [1024.0, 3.0])
@pytest.mark.parametrize("name", list(_clippers()))
def test_scaled_gradients_are_clipped_as_their_unscaled_values(name, scale):
    make = _clippers()[name]
    plain, scaled = make(), make()
    norms = _norm_sequence(8, seed=5)
    norms[6] *= 20.0  # something for the adaptive clippers to clip
    any_clipped = False
    for i, x in enumerate(norms):
        params = _modules(seed=i)
        grads = _grads_of_norm(x, seed=i)
        expected = [g.double().clone() for g in grads]
        out = plain.clip(expected, params, x)  # the unscaled gradient, in float64
        held = [g * scale for g in grads]  # still holding the loss scale (float32)
        got = scaled.clip(held, params, x, torch.tensor(scale))
        _close([g.double() / scale for g in held], expected, rtol=2e-6)
        for a, b in ((out.coef, got.coef), (out.threshold, got.threshold), (out.clipped_norm, got.clipped_norm)):
            assert (a is None and b is None) or a == pytest.approx(b, rel=1e-9)
        if out.clipped_norm_device is not None:  # value / AGC report the unscaled post-clip norm
            assert float(got.clipped_norm_device) == pytest.approx(_norm64(expected), rel=1e-6)
            any_clipped |= bool(got.clipped_device)
        else:
            any_clipped |= bool(got.clipped)
    assert any_clipped
    assert scaled.state_dict() == plain.state_dict()  # the same (unscaled) norms entered the same state
    if name == "autoclip":
        assert list(scaled.history) == list(plain.history) == norms  # unscaled norms in the history


@pytest.mark.parametrize("name", ["value", "agc"])
def test_a_loss_scale_multiplies_the_threshold(name):
    # clipping S-scaled gradients with scale=S is clipping them without a scale with the threshold times S
    scale = 256.0
    params = _modules()
    grads = [g * scale for g in _grads(params)]
    a, b = _copies(grads), _copies(grads)
    if name == "value":
        ValueClipper(0.05).clip(a, params, 1.0, torch.tensor(scale))
        ValueClipper(0.05 * scale).clip(b, params, 1.0)
    else:
        AGCClipper(0.02).clip(a, params, 1.0, torch.tensor(scale))
        AGCClipper(0.02 * scale).clip(b, params, 1.0)
    _close(a, b, rtol=1e-6)
    assert not all(torch.equal(x, y) for x, y in zip(a, grads, strict=True))  # it did clip


# ---------------------------------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("name", ["autoclip", "zclip"])
def test_non_finite_norms_never_enter_the_adaptive_state_even_during_warm_up(name, bad):
    make = {"autoclip": lambda: AutoClipper(50.0, 100), "zclip": lambda: ZClipper(0.9, 1.5, 4)}[name]
    exposed, clean = make(), make()
    norms = _norm_sequence(12, seed=7)
    norms[9] *= 30.0
    for i, x in enumerate(norms):
        if i in (0, 2, 6):  # the very first norm, one in the warm-up, one after it
            before = exposed.state_dict()
            exposed.clip([torch.full((3,), bad)], [torch.ones(3)], bad)
            assert exposed.state_dict() == before
        a, b = _grads_of_norm(x, seed=i), _grads_of_norm(x, seed=i)
        out_a, out_b = exposed.clip(a, [], x), clean.clip(b, [], x)
        assert out_a == out_b and all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert exposed.state_dict() == clean.state_dict()
    assert all(math.isfinite(v) for v in (exposed.history if name == "autoclip" else (exposed.mean, exposed.var)))


@pytest.mark.parametrize("name", ["autoclip", "zclip"])
def test_state_dict_round_trip_clips_identically(name):
    make = {"autoclip": lambda: AutoClipper(25.0, 6), "zclip": lambda: ZClipper(0.9, 1.5, 4)}[name]
    first = make()
    norms = _norm_sequence(20, seed=8)
    norms[15] *= 40.0
    for i, x in enumerate(norms[:10]):
        first.clip(_grads_of_norm(x, seed=i), [], x)
    second = make()
    second.load_state_dict(first.state_dict())
    for i, x in enumerate(norms[10:], 10):
        a, b = _grads_of_norm(x, seed=i), _grads_of_norm(x, seed=i)
        assert first.clip(a, [], x) == second.clip(b, [], x)
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert first.state_dict() == second.state_dict()
