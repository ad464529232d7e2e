"""The monitor's own clippers, on real Trainer runs, against torch's clippers or the papers' formulas in float64.

Gradients are captured twice per step: by a ``Capture`` placed BEFORE the monitor (pre-clip, callbacks run in list
order) and by one placed AFTER it (post-clip). Every expected value is computed here from the pre-clip copy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import Capture, Records, TinyMLP, assert_matches, loader, make_trainer, reference
from lightning.pytorch import Callback
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradhealth import GradientHealthMonitor
from lightning_gradhealth.guard.clipping import AutoClipper, ZClipper, percentile

CLIP_KEYS = ("grad_health/clip_coef", "grad_health/clipped_norm", "grad_health/clip_frac")


class ClipMetrics(Callback):
    """Snapshots the clip metrics the monitor put into callback_metrics at each step (place it after the monitor)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items() if k in CLIP_KEYS})


def _fit(model, monitor, tmp_path=None, **trainer_kwargs):
    pre, post, metrics, records = Capture(), Capture(), ClipMetrics(), Records(monitor)
    trainer = make_trainer(tmp_path, callbacks=[pre, monitor, post, metrics, records], **trainer_kwargs)
    trainer.fit(model, loader())
    assert len(pre.steps) == len(post.steps) == trainer.global_step
    assert [c["step"] for c in pre.steps] == [c["step"] for c in post.steps] == list(range(trainer.global_step))
    return trainer, pre, post, metrics.steps, records.records


def _read_scalars(log_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _torch_clip(grads: dict[str, torch.Tensor], fn, *args) -> dict[str, torch.Tensor]:
    """Apply a torch.nn.utils clipper to float64 copies of ``grads`` held by dummy leaf tensors."""
    holders = {}
    for name, g in grads.items():
        holder = torch.zeros_like(g, dtype=torch.float64, requires_grad=True)
        holder.grad = g.detach().to(torch.float64).clone()
        holders[name] = holder
    fn(list(holders.values()), *args)
    return {name: h.grad for name, h in holders.items()}


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return torch.cat([g.reshape(-1).to(torch.float64) for g in grads.values()]).norm().item()


def _scaled(grads: dict[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    return {n: g * factor for n, g in grads.items()}


# The monitor's clip coefficients come from float32 norms (accumulated in the CPU's kernel order: a few float32 ulps
# times log2(n) relative to the float64 reference, more than 1e-6 on some CPUs): whatever follows from a norm is
# compared to 1e-5. Value clipping (a clamp) and unclipped steps are exact.
NORM_REL = 1e-5


def _assert_grads_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float = 1e-6):
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=rel, atol=1e-12, msg=name)


# ---------------------------------------------------------------------------------------------------- norm


def test_norm_clip_matches_clip_grad_norm_and_logs_the_reference_values(tmp_path):
    max_norm = 0.7
    monitor = GradientHealthMonitor(clip="norm", max_norm=max_norm)
    trainer, pre, post, _, records = _fit(TinyMLP(), monitor, tmp_path, max_steps=8)
    scalars = _read_scalars(trainer.logger.log_dir)
    assert len(records) == len(pre.steps) == 8

    clipped_so_far = 0
    coefs = []
    for i, (a, b, rec) in enumerate(zip(pre.steps, post.steps, records, strict=True)):
        expected = _torch_clip(a["grads"], torch.nn.utils.clip_grad_norm_, max_norm)
        _assert_grads_equal(b["grads"], expected, rel=NORM_REL)
        pre_norm, post_norm = _norm(a["grads"]), _norm(expected)
        coef = post_norm / pre_norm
        coefs.append(coef)
        clipped_so_far += coef < 1.0
        step = a["step"]
        assert scalars["grad_health/clip_coef"][step] == pytest.approx(coef, rel=NORM_REL)
        assert scalars["grad_health/clipped_norm"][step] == pytest.approx(post_norm, rel=NORM_REL)
        assert scalars["grad_health/clip_frac"][step] == pytest.approx(clipped_so_far / (i + 1), rel=1e-6)
        # the record (and what is logged as total_norm) stays PRE-clip
        assert rec.step == step
        assert_matches(rec, reference(a["grads"], a["params"]))
        assert scalars["grad_health/total_norm"][step] == pytest.approx(pre_norm, rel=NORM_REL)
    # the run exercises both branches: steps above max_norm are clipped, steps below it are left alone
    assert min(coefs) < 0.8 and any(c == 1.0 for c in coefs)
    assert monitor.last_record.total_norm == pytest.approx(_norm(pre.steps[-1]["grads"]), rel=NORM_REL)
    assert trainer.callback_metrics["grad_health/clip_frac"].item() == pytest.approx(clipped_so_far / 8, rel=1e-6)
    assert trainer.callback_metrics["grad_health/clip_coef"].item() == pytest.approx(coefs[-1], rel=NORM_REL)


def test_norm_clip_changes_the_update():
    # the clipped gradient is the one the optimizer applies: SGD moves the weights by lr * post-clip gradient
    monitor = GradientHealthMonitor(clip="norm", max_norm=0.1)
    trainer, pre, post, _, _ = _fit(TinyMLP(lr=0.05), monitor, max_steps=3)
    for a, b, nxt in zip(pre.steps, post.steps, pre.steps[1:], strict=False):
        assert _norm(b["grads"]) == pytest.approx(0.1, rel=1e-5)
        for name, g in b["grads"].items():
            torch.testing.assert_close(nxt["params"][name], a["params"][name] - 0.05 * g, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- value


def test_value_clip_matches_clip_grad_value():
    clip_value = 0.05
    monitor = GradientHealthMonitor(clip="value", clip_value=clip_value)
    trainer, pre, post, metrics, records = _fit(TinyMLP(), monitor, max_steps=5)
    for a, b, m, rec in zip(pre.steps, post.steps, metrics, records, strict=True):
        expected = _torch_clip(a["grads"], torch.nn.utils.clip_grad_value_, clip_value)
        _assert_grads_equal(b["grads"], expected)
        assert max(g.abs().max().item() for g in a["grads"].values()) > clip_value  # something really is clipped
        assert m["grad_health/clipped_norm"] == pytest.approx(_norm(expected), rel=NORM_REL)
        assert m["grad_health/clip_frac"] == 1.0
        assert_matches(rec, reference(a["grads"], a["params"]))  # pre-clip
        assert rec.total_norm > _norm(expected)


@pytest.mark.parametrize("kwargs", [{"clip": "value", "clip_value": 1e3}, {"clip": "agc", "agc_clip_factor": 1e3}])
def test_clip_frac_is_zero_when_nothing_is_clipped(kwargs):
    # value and AGC clippers decide per entry / per unit: a step counts as clipped only if a gradient changed
    monitor = GradientHealthMonitor(**kwargs)
    trainer, pre, post, metrics, _ = _fit(TinyMLP(), monitor, max_steps=3)
    for a, b in zip(pre.steps, post.steps, strict=True):
        _assert_grads_equal(b["grads"], a["grads"], rel=0)  # nothing changed...
    assert trainer.callback_metrics["grad_health/clip_frac"].item() == 0.0  # ...so no step was clipped
    assert monitor.state_dict()["clipped_steps"] == 0


def test_value_clip_frac_counts_clipped_steps_also_between_logged_steps():
    clip_value = 0.4
    monitor = GradientHealthMonitor(clip="value", clip_value=clip_value, log_every_n_steps=4)
    trainer, pre, post, metrics, _ = _fit(TinyMLP(), monitor, max_steps=10)
    clipped = []
    for a, b in zip(pre.steps, post.steps, strict=True):
        _assert_grads_equal(b["grads"], _torch_clip(a["grads"], torch.nn.utils.clip_grad_value_, clip_value))
        clipped.append(max(g.abs().max().item() for g in a["grads"].values()) > clip_value)
    assert 0 < sum(clipped) < len(clipped)  # a mix of clipped and untouched steps
    assert any(clipped[8:]) and not all(clipped[8:])  # ...also after the last logged step (7)
    for step in (3, 7):  # the logged steps: clip_frac counts every step so far, logged or not
        assert metrics[step]["grad_health/clip_frac"] == pytest.approx(sum(clipped[: step + 1]) / (step + 1))
    assert monitor.state_dict()["clipped_steps"] == sum(clipped)


# ---------------------------------------------------------------------------------------------------- AGC


def _unitwise_norm(x: torch.Tensor) -> torch.Tensor:
    if x.ndim <= 1:
        return x.norm()
    return x.norm(dim=tuple(range(1, x.ndim)), keepdim=True)


def _agc_reference(grads, params, clip_factor, eps):
    """timm's adaptive_clip_grad, written out in float64."""
    out = {}
    for name, g in grads.items():
        max_norm = _unitwise_norm(params[name]).clamp(min=eps) * clip_factor
        g_norm = _unitwise_norm(g)
        clipped = g * (max_norm / g_norm.clamp(min=1e-6))
        out[name] = torch.where(g_norm < max_norm, g, clipped)
    return out


@pytest.mark.parametrize(("factor", "eps"), [(0.1, 1e-3), (0.05, 0.5)])
def test_agc_matches_timm_formula(factor, eps):
    monitor = GradientHealthMonitor(clip="agc", agc_clip_factor=factor, agc_eps=eps)
    trainer, pre, post, metrics, records = _fit(TinyMLP(), monitor, max_steps=5)
    units_clipped = units_kept = 0
    for a, b, m, rec in zip(pre.steps, post.steps, metrics, records, strict=True):
        expected = _agc_reference(a["grads"], a["params"], factor, eps)
        _assert_grads_equal(b["grads"], expected, rel=1e-5)
        for name, g in a["grads"].items():
            changed = ~torch.isclose(expected[name], g, rtol=1e-9, atol=0).reshape(g.shape[0], -1).all(dim=1)
            units_clipped += int(changed.sum()) if g.ndim > 1 else int(changed.any())
            units_kept += int((~changed).sum()) if g.ndim > 1 else int(not changed.any())
        assert m["grad_health/clipped_norm"] == pytest.approx(_norm(expected), rel=1e-5)
        assert_matches(rec, reference(a["grads"], a["params"]))  # pre-clip
    assert units_clipped > 0 and units_kept > 0  # both branches of the rule are exercised
    # with the large eps, the floor on the unit weight norm is really used by some unit
    floored = [(_unitwise_norm(p) < eps).any().item() for n, p in pre.steps[0]["params"].items()]
    assert any(floored) == (eps == 0.5)


# ---------------------------------------------------------------------------------------------------- AutoClip


def test_autoclip_clips_to_the_percentile_of_the_norm_history():
    p = 50.0
    monitor = GradientHealthMonitor(clip="autoclip", autoclip_percentile=p)
    trainer, pre, post, metrics, _ = _fit(TinyMLP(), monitor, max_steps=10)
    history: list[float] = []
    clipped = 0
    for i, (a, b, m) in enumerate(zip(pre.steps, post.steps, metrics, strict=True)):
        norm = _norm(a["grads"])
        history.append(norm)
        thr = float(np.percentile(history, p))
        coef = min(1.0, thr / (norm + 1e-6))
        clipped += coef < 1.0
        _assert_grads_equal(b["grads"], _scaled(a["grads"], coef), rel=NORM_REL)
        assert m["grad_health/clip_coef"] == pytest.approx(coef, rel=NORM_REL)
        assert m["grad_health/clipped_norm"] == pytest.approx(norm * coef, rel=NORM_REL)
        assert m["grad_health/clip_frac"] == pytest.approx(clipped / (i + 1), rel=1e-6)
    assert list(monitor.health.guard.clipper.history) == pytest.approx(history, rel=NORM_REL)
    assert any(_norm(a["grads"]) > 1.01 * _norm(b["grads"]) for a, b in zip(pre.steps, post.steps, strict=True))


# ---------------------------------------------------------------------------------------------------- ZClip


class ZClipReference:
    """ZClip (Kumar et al., 2025) from its definition, in float64: warm-up buffer, then EMA z-score clipping."""

    def __init__(self, alpha=0.97, z_thresh=2.5, warmup_steps=25, eps=1e-6):
        self.alpha, self.z_thresh, self.warmup_steps, self.eps = alpha, z_thresh, warmup_steps, eps
        self.buffer: list[float] = []
        self.mean = self.var = None

    def step(self, g: float) -> float:
        """Return the coefficient to apply to the gradient of norm ``g``."""
        if self.mean is None:
            self.buffer.append(g)
            if len(self.buffer) == self.warmup_steps:
                self.mean = float(np.mean(self.buffer))
                self.var = float(np.var(self.buffer))  # population variance
            return 1.0
        std = math.sqrt(self.var)
        z = (g - self.mean) / (std + self.eps)
        x = g
        if z > self.z_thresh:
            x = self.mean + self.z_thresh * std / (z / self.z_thresh)
        coef = min(1.0, x / (g + 1e-6)) if x != g else 1.0
        new_mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - new_mean) ** 2
        self.mean = new_mean
        return coef


def test_zclip_matches_its_definition_and_clips_an_injected_spike():
    monitor = GradientHealthMonitor(clip="zclip", zclip_warmup_steps=3)
    # micro-batch 5 (after the 3 warm-up steps) has its loss, hence its gradient, multiplied by 30
    trainer, pre, post, metrics, _ = _fit(TinyMLP(loss_scale_at={5: 30.0}), monitor, max_steps=9)
    ref = ZClipReference(warmup_steps=3)
    coefs = []
    for a, b, m in zip(pre.steps, post.steps, metrics, strict=True):
        norm = _norm(a["grads"])
        coef = ref.step(norm)
        coefs.append(coef)
        _assert_grads_equal(b["grads"], _scaled(a["grads"], coef), rel=NORM_REL)
        assert m["grad_health/clipped_norm"] == pytest.approx(norm * coef, rel=NORM_REL)
    assert coefs[:3] == [1.0, 1.0, 1.0]  # warm-up never clips
    assert coefs[5] < 0.2  # the spike is really clipped, hard
    assert monitor.health.guard.clipper.mean == pytest.approx(ref.mean, rel=NORM_REL)
    assert monitor.health.guard.clipper.var == pytest.approx(ref.var, rel=1e-5)
    n_clipped = sum(c < 1.0 for c in coefs)
    assert trainer.callback_metrics["grad_health/clip_frac"].item() == pytest.approx(n_clipped / 9, rel=1e-6)


# ---------------------------------------------------------------------------------------------------- NaN


@pytest.mark.parametrize("clip", ["zclip", "autoclip"])
def test_nan_step_does_not_poison_the_adaptive_state(clip):
    nan_step, spike_step = 4, 6
    own = {"zclip": {"zclip_warmup_steps": 3}, "autoclip": {"autoclip_percentile": 50.0}}[clip]
    monitor = GradientHealthMonitor(clip=clip, on_nonfinite="skip", **own)
    model = TinyMLP(poison={nan_step: ("net.2.weight", math.nan)}, loss_scale_at={spike_step: 30.0})
    trainer, pre, post, _, _ = _fit(model, monitor, max_steps=10)
    assert math.isnan(_norm(pre.steps[nan_step]["grads"]))
    # the NaN step was skipped: no gradient reached the optimizer, the weights did not move
    assert post.steps[nan_step]["grads"] == {}
    for name, value in pre.steps[nan_step]["params"].items():
        assert torch.equal(pre.steps[nan_step + 1]["params"][name], value), name
    assert trainer.callback_metrics["grad_health/skipped_steps"].item() == 1

    zref, history, coefs = ZClipReference(warmup_steps=3), [], []
    for i, (a, b) in enumerate(zip(pre.steps, post.steps, strict=True)):
        if i == nan_step:
            continue
        norm = _norm(a["grads"])
        if clip == "zclip":
            coef = zref.step(norm)
        else:
            history.append(norm)
            coef = min(1.0, float(np.percentile(history, 50.0)) / (norm + 1e-6))
        coefs.append(coef)
        _assert_grads_equal(b["grads"], _scaled(a["grads"], coef), rel=NORM_REL)
    assert any(c < 0.5 for c in coefs[nan_step:])  # clipping still really happens after the NaN step

    state = monitor.health.guard.clipper.state_dict()
    if clip == "zclip":
        assert math.isfinite(state["mean"]) and math.isfinite(state["var"])
        assert state["mean"] == pytest.approx(zref.mean, rel=NORM_REL)
        assert state["var"] == pytest.approx(zref.var, rel=1e-5)
    else:
        assert all(math.isfinite(h) for h in state["history"])
        assert state["history"] == pytest.approx(history, rel=NORM_REL)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_adaptive_clippers_keep_non_finite_norms_out_of_their_state(bad):
    # the clippers themselves, called directly: a non-finite norm (on_nonfinite="warn" or None) changes no state
    zclip, autoclip = ZClipper(warmup_steps=2), AutoClipper(percentile=50.0)
    for clipper in (zclip, autoclip):
        for norm in (1.0, 2.0, 1.5):
            grads = [torch.full((3,), norm / math.sqrt(3))]
            clipper.clip(grads, [torch.ones(3)], norm)
        before = clipper.state_dict()
        grads = [torch.tensor([bad, 1.0, 1.0])]
        clipper.clip(grads, [torch.ones(3)], bad)
        assert clipper.state_dict() == before
    ref = ZClipReference(warmup_steps=2)
    for norm in (1.0, 2.0, 1.5):
        ref.step(norm)
    assert (zclip.mean, zclip.var) == pytest.approx((ref.mean, ref.var), rel=1e-12)
    assert list(autoclip.history) == [1.0, 2.0, 1.5]


@pytest.mark.parametrize("q", [0.0, 10.0, 37.5, 50.0, 90.0, 100.0])
def test_percentile_is_numpys_linear_percentile(q):
    values = [3.0, 0.5, 7.25, 1.0, 2.0, 9.0, 0.1]
    for n in range(1, len(values) + 1):
        assert percentile(values[:n], q) == pytest.approx(float(np.percentile(values[:n], q)), rel=1e-12)


# ---------------------------------------------------------------------------------------------------- Trainer clip


def test_trainer_gradient_clip_val_and_monitor_clip_are_rejected_together():
    monitor = GradientHealthMonitor(clip="norm")
    trainer = make_trainer(callbacks=[monitor], gradient_clip_val=1.0, max_steps=1)
    with pytest.raises(ValueError, match=r"(?s)(?=.*clip='norm')(?=.*gradient_clip_val=1\.0)"):
        trainer.fit(TinyMLP(), loader())
    assert trainer.global_step == 0
    # each alone is fine
    make_trainer(callbacks=[GradientHealthMonitor()], gradient_clip_val=1.0, max_steps=1).fit(TinyMLP(), loader())
    make_trainer(callbacks=[GradientHealthMonitor(clip="norm")], max_steps=1).fit(TinyMLP(), loader())


# ---------------------------------------------------------------------------------------------------- 16-mixed


@pytest.mark.parametrize(("kind", "bound"), [("norm", 0.5), ("value", 0.02), ("agc", 0.1)])
def test_16_mixed_fused_optimizer_clips_the_true_gradient(kind, bound):
    kwargs = {"norm": {"max_norm": bound}, "value": {"clip_value": bound}, "agc": {"agc_clip_factor": bound}}[kind]
    monitor = GradientHealthMonitor(clip=kind, **kwargs)
    trainer, pre, post, metrics, records = _fit(
        TinyMLP(optimizer="adam", fused=True, lr=1e-3), monitor, plugins=[MixedPrecision("16-mixed", "cpu")]
    )
    assert trainer.precision_plugin.scaler is not None
    any_clipped = False
    for a, b, m, rec in zip(pre.steps, post.steps, metrics, records, strict=True):
        scale = a["scale"]
        assert scale == b["scale"] > 1
        assert rec.is_finite and not rec.amp_overflow
        true_pre = _scaled(a["grads"], 1 / scale)
        # the hook really sees the scaled gradient
        assert _norm(a["grads"]) == pytest.approx(scale * _norm(true_pre), rel=1e-9)
        if kind == "norm":
            expected = _torch_clip(true_pre, torch.nn.utils.clip_grad_norm_, bound)
        elif kind == "value":
            expected = _torch_clip(true_pre, torch.nn.utils.clip_grad_value_, bound)
        else:
            expected = _agc_reference(true_pre, a["params"], bound, 1e-3)
        _assert_grads_equal(_scaled(b["grads"], 1 / scale), expected, rel=1e-6 if kind == "value" else NORM_REL)
        any_clipped |= _norm(expected) < 0.99 * _norm(true_pre)
        assert m["grad_health/clipped_norm"] == pytest.approx(_norm(expected), rel=NORM_REL)
        assert rec.total_norm == pytest.approx(_norm(true_pre), rel=NORM_REL)  # pre-clip, unscaled
    assert any_clipped


# ---------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "exc", "name"),
    [
        ({"clip": "value"}, ValueError, "clip_value"),
        ({"clip": "value", "clip_value": 0}, ValueError, "clip_value"),
        ({"clip": "value", "clip_value": "0.1"}, TypeError, "clip_value"),
        ({"clip": "norm", "norm_type": 1}, ValueError, "norm_type"),
        ({"clip": "zclip", "norm_type": math.inf}, ValueError, "norm_type"),
        ({"clip": "foo"}, ValueError, "clip"),
        ({"clip": 1}, ValueError, "clip"),
        ({"max_norm": 0}, ValueError, "max_norm"),
        ({"max_norm": -1.0}, ValueError, "max_norm"),
        ({"max_norm": math.nan}, ValueError, "max_norm"),
        ({"max_norm": True}, TypeError, "max_norm"),
        ({"agc_clip_factor": -1}, ValueError, "agc_clip_factor"),
        ({"agc_eps": 0}, ValueError, "agc_eps"),
        ({"zclip_alpha": 1.5}, ValueError, "zclip_alpha"),
        ({"zclip_alpha": 0}, ValueError, "zclip_alpha"),
        ({"zclip_z_thresh": 0}, ValueError, "zclip_z_thresh"),
        ({"zclip_warmup_steps": 0}, ValueError, "zclip_warmup_steps"),
        ({"zclip_warmup_steps": 2.5}, TypeError, "zclip_warmup_steps"),
        ({"autoclip_percentile": 101}, ValueError, "autoclip_percentile"),
        ({"autoclip_percentile": -1}, ValueError, "autoclip_percentile"),
        ({"autoclip_history": 0}, ValueError, "autoclip_history"),
    ],
)
def test_clipping_arguments_are_validated(kwargs, exc, name):
    with pytest.raises(exc, match=rf"`{name}`") as info:
        GradientHealthMonitor(**kwargs)
    assert type(info.value) is exc


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip": "norm", "max_norm": 2.0},
        {"clip": "value", "clip_value": 0.5},
        {"clip": "agc", "agc_clip_factor": 0.02, "agc_eps": 1e-4},
        {"clip": "autoclip", "autoclip_percentile": 0, "autoclip_history": 1},
        {"clip": "autoclip", "autoclip_percentile": 100},
        {"clip": "zclip", "zclip_alpha": 1, "zclip_warmup_steps": 1},
        {"clip": None, "norm_type": 1},
    ],
)
def test_valid_clipping_arguments_are_accepted(kwargs):
    monitor = GradientHealthMonitor(**kwargs)
    assert monitor.clip == kwargs["clip"]
    assert (monitor.health.guard.clipper is None) == (kwargs["clip"] is None)


@pytest.mark.parametrize("make", [lambda: AutoClipper(10.0, 100), lambda: ZClipper(warmup_steps=5)])
def test_reset_clips_like_a_new_clipper(make):
    rng = np.random.default_rng(0)
    norms = [float(v) for v in np.exp(rng.normal(0.0, 0.5, 40))]
    used, fresh = make(), make()
    for x in norms:
        used.clip([torch.ones(3) * x], [torch.ones(3)], x * 1e3)  # a history at another level
    used.reset()
    for x in norms:
        a, b = torch.ones(3) * x, torch.ones(3) * x
        out_used = used.clip([a], [torch.ones(3)], float(a.norm()))
        out_fresh = fresh.clip([b], [torch.ones(3)], float(b.norm()))
        assert out_used == out_fresh and torch.equal(a, b)
    assert used.state_dict() == fresh.state_dict()
