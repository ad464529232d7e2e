"""StepGuard on bare numbers and tensors, no Trainer: the non-finite / spike / skip matrix, alerts, clipping, state."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.config.thresholds import Severity
from lightning_gradhealth.guard.step import StepGuard, StepOutcome
from lightning_gradhealth.model.distributed import Reduction
from lightning_gradhealth.model.layout import build_layout
from lightning_gradhealth.schema import metrics
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.schema.record import LayerStats, StepStats
from lightning_gradhealth.stats.engine import StepMeta

# ---------------------------------------------------------------------------------------------------- helpers


def _record(step: int, total: float, *, amp_scale: float | None = None, nan: int = 0, inf: int = 0) -> StepStats:
    """A full record of a step with two layers; a non-finite one has its NaN/Inf in layer ``b``."""
    bad = not math.isfinite(total)
    layers = (
        LayerStats(name="a", numel=10, grad_norm=0.5, param_norm=1.0, ratio=0.5, zero_frac=0.0),
        LayerStats(
            name="b",
            numel=10,
            grad_norm=total if bad else 0.5,
            param_norm=1.0,
            ratio=0.5,
            zero_frac=0.0,
            nan_count=nan,
            inf_count=inf,
        ),
    )
    return StepStats(
        step=step, global_step=step, epoch=0, batch_idx=step, optimizer_idx=0, total_norm=total, param_norm=1.4,
        zero_frac=0.0, nan_count=nan, inf_count=inf, layer_norm_ratio=math.nan if bad else 1.0, no_grad_count=0,
        layers=layers, amp_scale=amp_scale, amp_overflow=amp_scale is not None and bad,
    )  # fmt: skip


class Step:
    """Runs one step as the core does: ``guard.decide``, then the full record and the clip the outcome asks for.

    Counts the full records made (a non-finite norm, or a failing guarded step) and the clips asked for.
    """

    def __init__(self, guard: StepGuard) -> None:
        self.guard = guard
        self.full_calls = 0
        self.clip_calls = 0

    def __call__(
        self,
        step: int,
        total: float,
        *,
        amp_scale: float | None = None,
        nan: int = 0,
        inf: int = 0,
        batches: Sequence[Any] = (),
        clip: Any = None,
    ) -> StepOutcome:
        full = _record(step, total, amp_scale=amp_scale, nan=nan, inf=inf)
        record = None
        if not math.isfinite(total):
            self.full_calls += 1
            record = full
        outcome = self.guard.decide(
            total,
            StepMeta(step=step, global_step=step, epoch=0, batch_idx=step),
            record,
            amp=amp_scale is not None,
            batches=batches,
        )
        if outcome.failure is not None and outcome.record is None:
            self.full_calls += 1
            outcome.record = full
        if outcome.clip_wanted:
            self.clip_calls += 1
            if clip is not None:
                outcome.clip = clip() or {}
        return outcome


def _kinds(outcome: StepOutcome) -> list[tuple[str, Severity]]:
    return [(a.kind, a.severity) for a in outcome.alerts]


def _log_normal_norms(n: int, seed: int = 0, sigma: float = 0.1, level: float = 0.05) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(level * math.exp(v)) for v in rng.normal(0.0, sigma, n)]


def _spike_z_reference(warmup_norms: Sequence[float], x: float, min_std: float = 0.05) -> float:
    """z of ``x`` right after the warm-up: exact mean and population variance of the log-norms (float64)."""
    logs = np.log(np.asarray(warmup_norms, dtype=np.float64))
    std = max(float(np.sqrt(np.var(logs))), min_std)
    return (math.log(x) - float(np.mean(logs))) / std


# ---------------------------------------------------------------------------------------------------- the matrix


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("on_nonfinite", ["raise", "skip", "warn", None])
def test_nonfinite_matrix(on_nonfinite, amp, bad):
    guard = StepGuard(HealthOptions(on_nonfinite=on_nonfinite, spike_z_thresh=None, clip="norm"))
    step = Step(guard)
    scale = 1024.0 if amp else None

    healthy = step(1, 0.5, amp_scale=scale)  # a finite norm: the update goes ahead, nothing to say
    assert healthy.go_ahead and not healthy.skip and healthy.failure is None and healthy.alerts == []
    assert healthy.spike is None and step.full_calls == 0 and step.clip_calls == 1

    out = step(2, bad, amp_scale=scale, nan=3 if math.isnan(bad) else 0, inf=0 if math.isnan(bad) else 2)
    assert step.full_calls == 1 and out.record is not None and out.record.step == 2  # the full record, exact counts
    assert step.clip_calls == 1  # a non-finite norm is never clipped
    assert out.spike is None
    if amp:  # the GradScaler's business: it skips the update and lowers its scale; counted, nothing else
        assert out.failure is None and not out.skip and out.alerts == []
        assert guard.policy.amp_overflows == 1
        assert guard.counters(amp=True)[metrics.AMP_OVERFLOW] == 1.0
        return
    assert guard.policy.amp_overflows == 0
    if on_nonfinite == "raise":
        assert out.failure is not None and out.failure.kind == Kind.NONFINITE
        assert out.failure.reason == "Non-finite gradients"
        assert not out.skip and not out.go_ahead and out.alerts == []
    elif on_nonfinite in ("skip", "warn"):
        assert out.failure is None
        assert out.skip is (on_nonfinite == "skip") and out.go_ahead is (on_nonfinite == "warn")
        assert _kinds(out) == [(Kind.NONFINITE, Severity.CRITICAL)]
        alert = out.alerts[0]
        assert (alert.step, alert.batch_idx, alert.value) == (2, 2, 3.0 if math.isnan(bad) else 2.0)
        assert "in b;" in alert.message  # the offending layer is named, not the healthy one
        assert ("update skipped" if on_nonfinite == "skip" else "update applied") in alert.message
        assert guard.policy.skipped_steps == (1 if on_nonfinite == "skip" else 0)
    else:  # on_nonfinite=None: nothing at all
        assert out.failure is None and not out.skip and out.go_ahead and out.alerts == []
        assert guard.policy.skipped_steps == 0


def test_a_norm_that_overflows_with_finite_entries_is_called_exploding():
    step = Step(StepGuard(HealthOptions(on_nonfinite="warn", spike_z_thresh=None)))
    out = step(1, math.inf)  # no NaN, no Inf entry: the float32 norm itself overflowed
    assert _kinds(out) == [(Kind.NONFINITE, Severity.CRITICAL)]
    assert "finite gradients so large that their norm overflows" in out.alerts[0].message


def test_amp_overflows_escalate_when_they_persist_and_a_finite_step_restarts_the_count():
    guard = StepGuard(HealthOptions(amp_max_consecutive_overflows=3, spike_z_thresh=None))
    step = Step(guard)
    decisions = []
    for i, total in enumerate([math.nan, math.nan, 0.5, math.nan, math.nan, math.nan], 1):
        out = step(i, total, amp_scale=2.0**15)
        decisions.append(out.failure is not None)
    assert decisions == [False, False, False, False, False, True]
    assert out.failure is not None and out.failure.kind == Kind.NONFINITE
    assert out.failure.reason.startswith(
        "GradScaler overflow persists (3 overflow step(s) in a row, loss scale now 32768"
    )
    assert guard.policy.amp_overflows == 5 and guard.counters(amp=True)[metrics.AMP_OVERFLOW] == 5.0


def test_a_loss_scale_below_amp_min_scale_is_a_failure_at_once():
    guard = StepGuard(HealthOptions(amp_min_scale=1.0, spike_z_thresh=None))
    step = Step(guard)
    assert step(1, math.inf, amp_scale=2.0).failure is None
    out = step(2, math.inf, amp_scale=0.5)
    assert out.failure is not None and "loss scale now 0.5" in out.failure.reason
    assert guard.policy.amp_overflows == 2


def test_max_consecutive_skips_escalates_skip_to_a_failure():
    guard = StepGuard(HealthOptions(on_nonfinite="skip", max_consecutive_skips=3, spike_z_thresh=None))
    step = Step(guard)
    outs = [step(i, t, nan=1) for i, t in enumerate([math.nan, math.nan, 1.0, math.nan, math.nan, math.nan], 1)]
    assert [o.skip for o in outs] == [True, True, False, True, True, False]
    assert [o.failure is not None for o in outs] == [False] * 5 + [True]
    assert outs[-1].failure.reason == "Non-finite gradients for 3 steps in a row (on_nonfinite='skip')"
    assert guard.policy.skipped_steps == 5 and guard.counters(amp=False)[metrics.SKIPPED_STEPS] == 5.0


# ---------------------------------------------------------------------------------------------------- spikes


def test_a_100x_norm_after_warm_up_is_a_spike_with_the_reference_z():
    warmup = 20
    guard = StepGuard(HealthOptions(spike_z_thresh=6.0, spike_warmup_steps=warmup, thresholds=None))
    step = Step(guard)
    norms = _log_normal_norms(warmup)
    for i, x in enumerate(norms):
        out = step(i, x)
        assert out.spike is None and out.alerts == []  # warm-up never flags, however noisy
    x = 100 * norms[-1]
    out = step(warmup, x)
    z = _spike_z_reference(norms, x)
    assert z > 6.0 and out.spike == pytest.approx(z, rel=1e-9)
    assert _kinds(out) == [(Kind.SPIKE, Severity.WARNING)] and out.go_ahead  # on_spike="warn"
    assert guard.spike_count == 1 and guard.counters(amp=False)[metrics.SPIKES] == 1.0
    assert step.full_calls == 0  # a warned spike needs no full record
    assert step(warmup + 1, norms[0]).spike is None  # back to normal: the spike did not raise the bar


def test_a_spike_during_warm_up_is_not_flagged():
    guard = StepGuard(HealthOptions(spike_z_thresh=6.0, spike_warmup_steps=10, thresholds=None))
    step = Step(guard)
    norms = _log_normal_norms(5)
    for i, x in enumerate([*norms, 100 * norms[0]]):
        assert step(i, x).spike is None


def _warmed_guard(**kwargs: Any) -> tuple[StepGuard, Step, list[float]]:
    options = {"spike_z_thresh": 6.0, "spike_warmup_steps": 10, "thresholds": None, "clip": "norm", **kwargs}
    guard = StepGuard(HealthOptions(**options))
    step = Step(guard)
    norms = _log_normal_norms(10, seed=1)
    for i, x in enumerate(norms):
        assert step(i, x).go_ahead
    return guard, step, norms


def test_on_spike_warn_alerts_and_lets_the_clipped_update_go_ahead():
    guard, step, norms = _warmed_guard(on_spike="warn")
    out = step(10, 100 * norms[0])
    assert out.spike is not None and out.go_ahead and not out.skip and out.failure is None
    assert _kinds(out) == [(Kind.SPIKE, Severity.WARNING)]
    assert step.clip_calls == 11 and guard.policy.skipped_steps == 0


def test_on_spike_skip_alerts_skips_and_does_not_clip():
    guard, step, norms = _warmed_guard(on_spike="skip")
    out = step(10, 100 * norms[0])
    assert out.spike is not None and out.skip and out.failure is None and not out.go_ahead
    assert _kinds(out) == [(Kind.SPIKE, Severity.WARNING)] and "update skipped" in out.alerts[0].message
    assert step.clip_calls == 10 and guard.policy.skipped_steps == 1
    assert guard.counters(amp=False)[metrics.SKIPPED_STEPS] == 1.0


def test_on_spike_raise_is_a_spike_failure_with_the_full_record():
    guard, step, norms = _warmed_guard(on_spike="raise")
    x = 100 * norms[0]
    out = step(10, x)
    assert out.failure is not None and out.failure.kind == Kind.SPIKE and not out.go_ahead
    assert out.failure.reason.startswith("Gradient-norm spike (z = ")
    assert step.full_calls == 1 and out.record is not None and out.record.total_norm == x
    assert out.spike == pytest.approx(_spike_z_reference(norms, x), rel=1e-9)
    assert step.clip_calls == 10


def test_on_spike_skip_escalates_after_max_consecutive_skips():
    guard, step, norms = _warmed_guard(on_spike="skip", max_consecutive_skips=2)
    first = step(10, 100 * norms[0])
    second = step(11, 120 * norms[0])
    assert first.skip and first.failure is None
    assert second.failure is not None and second.failure.kind == Kind.SPIKE
    assert "spikes for 2 steps in a row (on_spike='skip'" in second.failure.reason


def test_spike_dir_saves_the_batches_of_the_spiking_step(tmp_path):
    spike_dir = tmp_path / "spikes"
    guard, step, norms = _warmed_guard(spike_dir=str(spike_dir))
    leaf = torch.randn(4, 3, requires_grad=True)
    x, y = leaf * 2.0, torch.arange(4)  # x is not a leaf: it must be saved detached
    batches = [(x, y), {"x": x, "meta": "text"}]
    assert step(10, norms[1], batches=batches).spike is None
    assert not spike_dir.exists() or not any(spike_dir.iterdir())  # nothing saved for a healthy step
    total = 100 * norms[0]
    out = step(11, total, batches=batches)
    path = spike_dir / "spike_step11_rank0.pt"
    assert [p.name for p in spike_dir.iterdir()] == [path.name]
    assert str(path) in out.alerts[0].message
    saved = torch.load(path, weights_only=True)
    assert (saved["step"], saved["global_step"], saved["epoch"], saved["batch_idx"]) == (11, 11, 0, 11)
    assert saved["total_norm"] == total and saved["zscore"] == out.spike
    (sx, sy), as_dict = saved["batches"]
    assert torch.equal(sx, x.detach()) and torch.equal(sy, y) and not sx.requires_grad
    assert torch.equal(as_dict["x"], x.detach()) and as_dict["meta"] == "text"


# ---------------------------------------------------------------------------------------------------- thresholds


@pytest.mark.parametrize(("total", "severity"), [(500.0, Severity.WARNING), (5000.0, Severity.CRITICAL)])
def test_a_too_large_norm_gets_an_exploding_alert(total, severity):
    guard = StepGuard(HealthOptions(spike_z_thresh=None))
    out = Step(guard)(1, total)
    assert _kinds(out) == [(Kind.EXPLODING, severity)]
    alert = out.alerts[0]
    line = 100.0 if severity is Severity.WARNING else 1000.0
    assert alert.value == total and alert.threshold == line and alert.layer is None and out.go_ahead


def test_a_too_small_norm_is_flagged_only_after_the_thresholds_warm_up():
    guard = StepGuard(HealthOptions(spike_z_thresh=None))  # Thresholds.warmup_steps = 10
    step = Step(guard)
    kinds = [_kinds(step(i, 1e-9)) for i in range(1, 12)]
    assert kinds[:9] == [[]] * 9
    assert kinds[9:] == [[(Kind.VANISHING, Severity.CRITICAL)]] * 2


def test_no_threshold_alert_without_thresholds():
    out = Step(StepGuard(HealthOptions(spike_z_thresh=None, thresholds=None)))(1, 1e6)
    assert out.alerts == [] and out.go_ahead


# ---------------------------------------------------------------------------------------------------- clipping


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)


def _model_with_grads(scale: float = 1.0, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TwoLayers()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale
    return model


def _norm64(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def test_guard_clip_on_a_real_layout_equals_clip_grad_norm():
    guard = StepGuard(HealthOptions(clip="norm", max_norm=0.5, spike_z_thresh=None))
    model = _model_with_grads(scale=3.0)
    model.b.bias.grad = None  # a watched parameter without a gradient this step is left alone
    layout = build_layout(model.named_parameters())
    grads64 = [p.grad.double().clone() for p in layout.params if p.grad is not None]
    total = _norm64(grads64)
    ref = [nn.Parameter(g.clone()) for g in grads64]
    for r, g in zip(ref, grads64, strict=True):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, 0.5)
    out = Step(guard)(1, total, clip=lambda: guard.clip(layout, None, total, True, Reduction()))
    got = [p.grad for p in layout.params if p.grad is not None]
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r.grad, rtol=1e-6, atol=0)
    assert model.b.bias.grad is None
    coef = 0.5 / (total + 1e-6)
    assert out.clip[metrics.CLIP_COEF] == pytest.approx(coef, rel=1e-12)
    assert out.clip[metrics.CLIPPED_NORM] == pytest.approx(_norm64([r.grad for r in ref]), rel=1e-6)
    assert guard.clipped_steps == 1 and guard.counters(amp=False)[metrics.CLIP_FRAC] == 1.0


@pytest.mark.parametrize(
    ("options", "total", "amp_scale"),
    [
        ({"on_nonfinite": "skip"}, math.nan, None),
        ({"on_nonfinite": "warn"}, math.nan, None),  # the update goes ahead, but with a non-finite norm
        ({"on_nonfinite": "raise"}, math.inf, None),
        ({"on_nonfinite": None}, math.nan, None),
        ({"on_nonfinite": "raise"}, math.nan, 1024.0),  # an AMP overflow
    ],
)
def test_gradients_are_not_clipped_unless_the_update_goes_ahead_with_a_finite_norm(options, total, amp_scale):
    guard = StepGuard(HealthOptions(clip="value", clip_value=1e-3, spike_z_thresh=None, **options))
    model = _model_with_grads()
    model.a.weight.grad[0, 0] = total
    layout = build_layout(model.named_parameters())
    before = [p.grad.clone() for p in layout.params]
    step = Step(guard)
    step(1, total, amp_scale=amp_scale, clip=lambda: guard.clip(layout, None, total, True, Reduction()))
    assert step.clip_calls == 0
    for p, b in zip(layout.params, before, strict=True):
        assert _same(p.grad, b)
    assert guard.clipped_steps == 0


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def test_the_clip_metrics_of_a_step_that_was_not_clipped_are_empty_not_the_previous_step_s():
    guard = StepGuard(HealthOptions(clip="norm", max_norm=0.1, on_nonfinite="skip", spike_z_thresh=None))
    model = _model_with_grads(scale=3.0)
    layout = build_layout(model.named_parameters())
    step = Step(guard)
    total = _norm64([p.grad for p in layout.params])
    clipped = step(1, total, clip=lambda: guard.clip(layout, None, total, True, Reduction()))
    assert clipped.clip[metrics.CLIP_COEF] == pytest.approx(0.1 / (total + 1e-6), rel=1e-12)
    skipped = step(2, math.nan, nan=1, clip=lambda: guard.clip(layout, None, math.nan, True, Reduction()))
    assert skipped.skip and skipped.clip == {}  # nothing was clipped at this step
    assert guard.counters(amp=False)[metrics.CLIP_COEF] == clipped.clip[metrics.CLIP_COEF]  # the last clip, logged
    assert guard.counters(amp=False)[metrics.CLIP_FRAC] == 0.5


def test_no_clipper_means_the_clip_callable_is_never_called():
    step = Step(StepGuard(HealthOptions(spike_z_thresh=None)))
    out = step(1, 0.5)
    assert step.clip_calls == 0 and out.clip == {}


def test_value_clipping_through_the_guard_counts_clipped_steps_and_reports_the_norm_on_logged_steps():
    guard = StepGuard(HealthOptions(clip="value", clip_value=0.25, spike_z_thresh=None))
    model = _model_with_grads()
    layout = build_layout(model.named_parameters())
    step = Step(guard)
    expected = []
    for i, logged in enumerate([False, False, True], 1):
        for p in layout.params:
            p.grad = torch.randn_like(p)
        expected = [p.grad.double().clamp(-0.25, 0.25) for p in layout.params]
        total = _norm64([p.grad for p in layout.params])
        out = step(i, total, clip=lambda t=total, lg=logged: guard.clip(layout, None, t, lg, Reduction()))
        for p, e in zip(layout.params, expected, strict=True):
            torch.testing.assert_close(p.grad.double(), e, rtol=0, atol=0)
        if not logged:  # counted on the device, read on logged steps only
            assert metrics.CLIPPED_NORM not in out.clip and guard.clipped_steps == 0
    assert out.clip[metrics.CLIPPED_NORM] == pytest.approx(_norm64(expected), rel=1e-6)
    assert guard.clipped_steps == 3
    assert guard.counters(amp=False)[metrics.CLIP_FRAC] == 1.0


# ---------------------------------------------------------------------------------------------------- state


def _sequence() -> list[float]:
    norms = _log_normal_norms(30, seed=3)
    norms[8] = math.nan  # a skipped non-finite step
    norms[10] = 60 * norms[9]  # a spike before the cut
    norms[14] = 80 * norms[13]  # a spike after the warm-up
    norms[22] = math.inf
    norms[25] = 150 * norms[24]
    return norms


def _outcome_key(out: StepOutcome) -> tuple[Any, ...]:
    return (
        out.skip,
        None if out.failure is None else (out.failure.reason, out.failure.kind),
        out.spike,
        [(a.kind, a.severity, a.message, a.value) for a in out.alerts],
        out.clip,
    )


def _run(guard: StepGuard, model: nn.Module, norms: Sequence[float], start: int) -> list[tuple[Any, ...]]:
    layout = build_layout(model.named_parameters())
    step = Step(guard)
    keys = []
    for i, total in enumerate(norms, start):
        torch.manual_seed(i)
        for p in layout.params:
            p.grad = torch.randn_like(p)
        if math.isfinite(total):  # the gradients have the norm the guard is given
            current = _norm64([p.grad for p in layout.params])
            for p in layout.params:
                p.grad.mul_(total / current)
        out = step(i, total, nan=0 if math.isfinite(total) else 1,
                   clip=lambda t=total: guard.clip(layout, None, t, True, Reduction()))  # fmt: skip
        keys.append((*_outcome_key(out), [p.grad.clone() for p in layout.params]))
    return keys


def _assert_same_runs(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[:-1] == y[:-1]
        for ga, gb in zip(x[-1], y[-1], strict=True):
            assert _same(ga, gb)


@pytest.mark.parametrize("clip", ["zclip", "autoclip", "norm"])
def test_state_dict_round_trip_makes_a_second_guard_decide_identically(clip):
    options = HealthOptions(
        on_nonfinite="skip", spike_z_thresh=4.0, spike_warmup_steps=6, clip=clip,
        **({"zclip_warmup_steps": 4} if clip == "zclip" else {"autoclip_percentile": 50.0} if clip == "autoclip" else {}),
    )  # fmt: skip
    norms = _sequence()
    cut = 12
    first = StepGuard(options)
    head = _run(first, _model_with_grads(), norms[:cut], 0)
    buffer = io.BytesIO()
    torch.save(copy.deepcopy(first.state_dict()), buffer)  # as in a checkpoint
    buffer.seek(0)
    second = StepGuard(options)
    assert second.load_state_dict(torch.load(buffer, weights_only=True)) is None
    assert second.state_dict() == first.state_dict() and second.spike_count == first.spike_count == 1
    tail_first = _run(first, _model_with_grads(), norms[cut:], cut)
    tail_second = _run(second, _model_with_grads(), norms[cut:], cut)
    _assert_same_runs(tail_first, tail_second)
    assert first.state_dict() == second.state_dict()
    assert first.counters(amp=False) == second.counters(amp=False)
    # the sequence really exercises the decisions: a skip before the cut, a spike and a skip after it
    assert any(k[0] for k in head) and any(k[2] is not None for k in head)
    assert any(k[2] is not None for k in tail_first) and any(k[0] for k in tail_first)
    # and a fresh guard (no state) decides otherwise: the state carries something
    fresh = _run(StepGuard(options), _model_with_grads(), norms[cut:], cut)
    assert [k[2] for k in fresh] != [k[2] for k in tail_first]


def test_a_checkpoint_of_another_clipper_is_announced_and_the_clipper_starts_afresh():
    auto = StepGuard(HealthOptions(clip="autoclip", spike_z_thresh=None))
    _run(auto, _model_with_grads(), _log_normal_norms(5), 0)
    state = auto.state_dict()
    zclip = StepGuard(HealthOptions(clip="zclip", spike_z_thresh=None))
    warning = zclip.load_state_dict(state)
    assert warning is not None and "clip='autoclip'" in warning and "clip='zclip'" in warning
    assert zclip.clipper.state_dict() == StepGuard(HealthOptions(clip="zclip")).clipper.state_dict()
    assert zclip.steps_seen == 5  # the counters are restored all the same


def test_reset_restarts_spike_statistics_and_adaptive_clipping():
    options = HealthOptions(spike_z_thresh=6.0, spike_warmup_steps=10, thresholds=None, clip="zclip",
                            zclip_warmup_steps=3)  # fmt: skip
    guard = StepGuard(options)
    _run(guard, _model_with_grads(), _log_normal_norms(15, seed=4), 0)
    assert guard.reset() == ["spike detection", "zclip clipping"]
    # after the reset, a norm 100x larger is the start of a new warm-up, not a spike, exactly as for a new guard
    later = [100 * x for x in _log_normal_norms(14, seed=5)] + [1e4 * 0.05]
    reset_run = _run(guard, _model_with_grads(), later, 15)
    fresh_run = _run(StepGuard(options), _model_with_grads(), later, 15)
    _assert_same_runs(reset_run, fresh_run)
    assert [k[2] is not None for k in reset_run] == [False] * 14 + [True]
    assert StepGuard(HealthOptions(spike_z_thresh=None, clip="norm")).reset() == []
    assert StepGuard(HealthOptions(clip="norm")).reset() == ["spike detection"]


def test_without_reset_the_same_norms_are_spikes():
    # the control of the test above: the old statistics flag the new level
    options = HealthOptions(spike_z_thresh=6.0, spike_warmup_steps=10, thresholds=None)
    guard = StepGuard(options)
    step = Step(guard)
    for i, x in enumerate(_log_normal_norms(15, seed=4)):
        step(i, x)
    assert step(15, 100 * _log_normal_norms(1, seed=5)[0]).spike is not None
