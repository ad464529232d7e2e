"""Gradient-norm spike detection: the detector against a float64 reference of its rule, and real Trainer runs."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from conftest import Capture, TinyMLP, loader, make_trainer

from lightning_gradhealth import GradientHealthError, GradientHealthMonitor
from lightning_gradhealth.guard.spikes import SpikeDetector


class SpikeReference:
    """The documented rule, written out: exact mean/variance of the first ``warmup`` log-norms, then an EMA.

    A norm is a spike when ``(log(norm) - mean) / max(std, min_std) > z_thresh``; spikes, non-finite and
    non-positive norms never enter the statistics, except that the ``rebaseline_after``-th spike in a row
    restarts the statistics (a new warm-up) from itself. The EMA is the exponentially weighted mean and variance
    (``mean' = a*mean + (1-a)*x``, ``var' = a*var + (1-a)*(x - mean)*(x - mean')``).
    """

    def __init__(self, z_thresh=6.0, alpha=0.98, warmup_steps=50, min_std=0.05, rebaseline_after=10):
        self.z_thresh, self.alpha, self.warmup_steps, self.min_std = z_thresh, alpha, warmup_steps, min_std
        self.rebaseline_after = rebaseline_after
        self.in_a_row = 0
        self.warm: list[float] = []
        self.mean = self.var = None

    def observe(self, norm: float) -> float | None:
        if not (math.isfinite(norm) and norm > 0):
            return None
        x = math.log(norm)
        if self.mean is None:
            self.warm.append(x)
            if len(self.warm) == self.warmup_steps:
                self.mean, self.var = float(np.mean(self.warm)), float(np.var(self.warm))
            return None
        z = (x - self.mean) / max(math.sqrt(self.var), self.min_std)
        if z > self.z_thresh:
            self.in_a_row += 1
            if self.in_a_row == self.rebaseline_after:
                self.in_a_row = 0
                self.mean = self.var = None
                self.warm = [x]
                if self.warmup_steps == 1:
                    self.mean, self.var = x, 0.0
            return z
        self.in_a_row = 0
        new_mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) * (x - new_mean)
        self.mean = new_mean
        return None


def _norm_sequence(seed: int, n: int = 120) -> list[float]:
    rng = random.Random(seed)
    norms = [math.exp(rng.gauss(0.0, 0.3)) * (1 + 0.002 * i) for i in range(n)]
    norms[7] *= 200.0  # a jump inside the longer warm-ups: it only widens the statistics there
    for i in (30, 31, 64, 90):  # big upward jumps, two of them in a row
        norms[i] *= 1e5
    for i, bad in ((3, math.nan), (12, math.inf), (40, -math.inf), (41, 0.0), (77, math.nan)):
        norms[i] = bad
    norms[100] *= 1e-3  # a drop is not a spike
    return norms


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("warmup", "alpha", "z_thresh"), [(20, 0.98, 6.0), (5, 0.9, 3.0), (1, 0.5, 2.0)])
def test_detector_matches_float64_reference(seed, warmup, alpha, z_thresh):
    det = SpikeDetector(z_thresh=z_thresh, alpha=alpha, warmup_steps=warmup)
    ref = SpikeReference(z_thresh=z_thresh, alpha=alpha, warmup_steps=warmup)
    flagged = []
    for i, norm in enumerate(_norm_sequence(seed)):
        expected = ref.observe(norm)
        got = det.observe(norm)
        if expected is None:
            assert got is None, (i, norm, got)
        else:
            assert got == pytest.approx(expected, rel=1e-9), i
            flagged.append(i)
        if ref.mean is not None:
            assert det.mean == pytest.approx(ref.mean, rel=1e-9, abs=1e-12), i
            assert det.var == pytest.approx(ref.var, rel=1e-9, abs=1e-15), i
    # the injected jumps after the warm-up are caught; the reference is not vacuous
    assert {64, 90} <= set(flagged)
    if warmup == 20:
        assert flagged == [30, 31, 64, 90]
    assert 100 not in flagged


def test_warmup_uses_the_exact_mean_and_population_variance_and_never_flags():
    norms = [1.0, 2.0, 4.0, 1000.0, 0.5]
    det = SpikeDetector(warmup_steps=5)
    for n in norms:
        assert det.zscore(n) is None
        assert det.observe(n) is None
    logs = np.log(norms)
    assert det.mean == pytest.approx(logs.mean(), rel=1e-12)
    assert det.var == pytest.approx(logs.var(), rel=1e-12)
    assert det.count == 5
    # first decision right after the warm-up, against those exact statistics
    z = det.zscore(8.0)
    assert z == pytest.approx((math.log(8.0) - logs.mean()) / logs.std(), rel=1e-12)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0.0, -1.0])
def test_non_finite_and_non_positive_norms_are_ignored(bad):
    det = SpikeDetector(warmup_steps=3)
    for n in (1.0, 1.1, 0.9):
        det.observe(n)
    before = det.state_dict()
    assert det.observe(bad) is None
    assert det.zscore(bad) is None
    assert det.state_dict() == before
    # also during the warm-up: the bad value does not count as a warm-up step
    det = SpikeDetector(warmup_steps=3)
    det.observe(1.0)
    det.observe(bad)
    assert det.count == 1
    assert det.observe(1.0) is None and det.observe(1.0) is None
    assert det.count == 3
    assert det.zscore(1.0) == 0.0


def test_spikes_do_not_enter_the_ema():
    det = SpikeDetector(warmup_steps=4, z_thresh=6.0)
    for n in (1.0, 1.2, 0.8, 1.1):
        det.observe(n)
    stats = ("count", "mean", "var")
    before = {k: det.state_dict()[k] for k in stats}
    z = det.observe(1e4)
    assert z is not None and z > 6.0
    assert {k: det.state_dict()[k] for k in stats} == before
    # a second, identical outlier is judged against the same statistics (the bar was not raised)
    assert det.observe(1e4) == z
    assert {k: det.state_dict()[k] for k in stats} == before
    assert det.consecutive == 2


def test_a_lasting_jump_becomes_the_new_baseline():
    det = SpikeDetector(warmup_steps=4, z_thresh=6.0, rebaseline_after=3)
    for n in (1.0, 1.2, 0.8, 1.1):
        det.observe(n)
    assert [det.observe(1e4) is not None for _ in range(3)] == [True, True, True]
    # the third spike in a row restarted the statistics from 1e4: a new warm-up, then 1e4 is normal
    assert det.count == 1 and det.mean == pytest.approx(math.log(1e4))
    for _ in range(3):
        assert det.observe(1e4) is None
    assert det.observe(1.2e4) is None


def test_min_std_floor():
    det = SpikeDetector(warmup_steps=5, z_thresh=6.0, min_std=0.05)
    for _ in range(5):
        det.observe(2.0)
    assert det.var == 0.0
    # with a flat history the standard deviation is the floor: z = log(norm / 2) / 0.05
    for ratio in (1.01, 1.2, 1.3):
        assert det.zscore(2.0 * ratio) == pytest.approx(math.log(ratio) / 0.05, rel=1e-9)
    assert det.observe(2.0 * math.exp(0.29)) is None  # 5.8 sigma: not a spike (enters the EMA)
    det = SpikeDetector(warmup_steps=5, z_thresh=6.0, min_std=0.05)
    for _ in range(5):
        det.observe(2.0)
    assert det.observe(2.0 * math.exp(0.31)) == pytest.approx(6.2, rel=1e-9)  # 6.2 sigma: a spike
    # a larger floor turns the same jump into noise
    det = SpikeDetector(warmup_steps=5, z_thresh=6.0, min_std=0.1)
    for _ in range(5):
        det.observe(2.0)
    assert det.observe(2.0 * math.exp(0.31)) is None


def test_state_dict_round_trip_makes_the_same_decisions():
    norms = _norm_sequence(5)
    a = SpikeDetector(warmup_steps=10, z_thresh=3.0)
    for n in norms[:50]:
        a.observe(n)
    b = SpikeDetector(warmup_steps=10, z_thresh=3.0)
    b.load_state_dict(a.state_dict())
    assert [a.observe(n) for n in norms[50:]] == [b.observe(n) for n in norms[50:]]


# ---------------------------------------------------------------------------------------------------- Trainer

SPIKE_STEP = 9  # epoch 1, batch 1 (8 batches per epoch): the step and the batch index differ


def _spike_messages(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "lightning_gradhealth" and "gradient-norm spike" in r.getMessage()
    ]


def _norms(capture: Capture) -> list[float]:
    return [
        torch.cat([g.reshape(-1) for g in c["grads"].values()]).norm().item() if c["grads"] else math.nan
        for c in capture.steps
    ]


@pytest.mark.parametrize("inject", [True, False])
def test_warn_flags_exactly_the_spiking_step(inject, caplog):
    caplog.set_level(logging.WARNING, logger="lightning_gradhealth")
    monitor = GradientHealthMonitor(spike_warmup_steps=5, on_spike="warn")
    pre = Capture()
    trainer = make_trainer(callbacks=[pre, monitor], max_steps=12)
    model = TinyMLP(optimizer="adam", lr=1e-3, loss_scale_at={SPIKE_STEP: 1e4} if inject else None)
    trainer.fit(model, loader())

    # independent decision on the captured norms, with the monitor's default z_thresh / alpha / min_std
    ref = SpikeReference(warmup_steps=5)
    expected = [i for i, n in enumerate(_norms(pre)) if ref.observe(n) is not None]
    assert expected == ([SPIKE_STEP] if inject else [])

    messages = _spike_messages(caplog)
    assert trainer.callback_metrics["grad_health/spikes"].item() == len(expected)
    if inject:
        (msg,) = messages
        assert f"at step {SPIKE_STEP} " in msg
        assert "epoch 1, batch 1)" in msg
        assert any(r.levelno == logging.WARNING for r in caplog.records if "gradient-norm spike" in r.getMessage())
    else:
        assert messages == []
    assert trainer.global_step == 12  # warn: training goes on


def test_skip_leaves_the_weights_untouched_and_is_counted():
    monitor = GradientHealthMonitor(spike_warmup_steps=5, on_spike="skip")
    pre, post = Capture(), Capture()
    trainer = make_trainer(callbacks=[pre, monitor, post], max_steps=12)
    trainer.fit(TinyMLP(loss_scale_at={SPIKE_STEP: 1e4}), loader())
    before, after = pre.steps[SPIKE_STEP]["params"], pre.steps[SPIKE_STEP + 1]["params"]
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    # control: the step before it did move the weights
    assert any(not torch.equal(pre.steps[SPIKE_STEP - 1]["params"][n], v) for n, v in before.items())
    assert post.steps[SPIKE_STEP]["grads"] == {}  # the update was dropped
    assert all(c["grads"] for i, c in enumerate(post.steps) if i != SPIKE_STEP)
    assert trainer.callback_metrics["grad_health/skipped_steps"].item() == 1
    assert trainer.callback_metrics["grad_health/spikes"].item() == 1
    assert trainer.global_step == 12


def test_raise_stops_at_the_spiking_step():
    monitor = GradientHealthMonitor(spike_warmup_steps=5, on_spike="raise")
    pre = Capture()
    trainer = make_trainer(callbacks=[pre, monitor], max_steps=12)
    with pytest.raises(GradientHealthError, match="spike") as info:
        trainer.fit(TinyMLP(loss_scale_at={SPIKE_STEP: 1e4}), loader())
    err = info.value
    assert err.record.step == SPIKE_STEP
    assert err.context["step"] == SPIKE_STEP
    assert err.record.batch_idx == 1 and err.record.epoch == 1
    assert len(pre.steps) == SPIKE_STEP + 1
    # the record carries the (pre-clip, unscaled) statistics of that step
    assert err.record.total_norm == pytest.approx(_norms(pre)[SPIKE_STEP], rel=1e-5)  # float32 norm vs float64


@pytest.mark.parametrize("accumulate", [1, 2])
def test_spike_dir_saves_the_batches_of_the_spiking_step(accumulate, tmp_path):
    spike_dir = tmp_path / "spikes" / "nested"
    assert not spike_dir.exists()
    step = 6
    last_micro = accumulate * (step + 1) - 1  # index of the step's last micro-batch (one epoch of 16 batches)
    monitor = GradientHealthMonitor(spike_warmup_steps=5, on_spike="warn", spike_dir=spike_dir)
    trainer = make_trainer(callbacks=[monitor], max_steps=10, accumulate_grad_batches=accumulate)
    dl = loader(n=128)
    trainer.fit(TinyMLP(optimizer="adam", lr=1e-3, loss_scale_at={last_micro: 1e4}), dl)

    files = sorted(spike_dir.iterdir())
    assert [f.name for f in files] == [f"spike_step{step}_rank0.pt"]
    saved = torch.load(files[0], weights_only=False)
    assert isinstance(saved, dict)
    assert saved["step"] == step
    assert saved["batch_idx"] == last_micro
    assert saved["epoch"] == 0
    assert math.isfinite(saved["total_norm"]) and saved["zscore"] > 6.0
    expected = list(dl)[last_micro - accumulate + 1 : last_micro + 1]
    assert len(saved["batches"]) == accumulate
    for got, want in zip(saved["batches"], expected, strict=True):
        assert len(got) == len(want) == 2
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_reset_decides_like_a_new_detector():
    rng = random.Random(3)
    norms = [math.exp(rng.gauss(0.0, 0.1)) for _ in range(80)]
    used, fresh = SpikeDetector(warmup_steps=10), SpikeDetector(warmup_steps=10)
    for x in norms:
        used.observe(x * 100.0)  # another level entirely
    used.reset()
    assert [used.observe(x) for x in norms] == [fresh.observe(x) for x in norms]
    assert used.state_dict() == fresh.state_dict()
