"""The gradient noise scale against a closed form: linear regression with Gaussian inputs and noise, at fixed weights.

With ``x ~ N(0, I_d)``, ``y = w*·x + ε``, ``ε ~ N(0, σ²)`` and the per-example loss ``½(w·x − y)²``, the per-example
gradient at ``w = w* + δ`` is ``g = x (x·δ − ε)``. Its mean is ``G = δ``; by Isserlis' theorem
``E[g gᵀ] = |δ|² I + 2 δδᵀ + σ² I``, so ``tr(Σ) = (d + 1)|δ|² + d σ²`` and
``B_simple = tr(Σ) / |G|² = d + 1 + d σ² / |δ|²`` (McCandlish et al., 2018, appendix A).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealth, GradientHealthMonitor
from lightning_gradhealth.stats.noise import NoiseScale, batch_size_of

D, SIGMA, DELTA = 10, 2.0, 1.0
HERE = Path(__file__).parent


def closed_form(d: int = D, sigma: float = SIGMA, delta: float = DELTA) -> float:
    return d + 1 + d * sigma**2 / delta**2


def regression(n: int, seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A linear model at ``w* + δ`` (|δ| = DELTA) and ``n`` examples of the regression problem."""
    gen = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D, generator=gen)
    delta = torch.randn(D, generator=gen)
    delta = delta / delta.norm() * DELTA
    model = nn.Linear(D, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_((w_star + delta).reshape(1, D))
    x = torch.randn(n, D, generator=gen)
    y = (x @ w_star + SIGMA * torch.randn(n, generator=gen)).reshape(n, 1)
    return model, x, y


def half_mse(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((model(x) - y) ** 2).mean()


def test_plain_loop_noise_scale_is_within_2x_of_the_closed_form():
    steps, k, micro_batch = 400, 4, 8
    model, x, y = regression(steps * k * micro_batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay at the fixed point
    health = GradientHealth(model, log_every_n_steps=1, report=False, verbose=False, noise_scale=True)
    estimates = []
    for step in range(steps):
        for j in range(k):
            at = (step * k + j) * micro_batch
            xb, yb = x[at : at + micro_batch], y[at : at + micro_batch]
            (half_mse(model, xb, yb) / k).backward()  # the mean over micro-batches, as Lightning does
            health.after_backward()
        health.step(opt, step=step, batch=(xb, yb))
        opt.zero_grad()
        assert health.last_record is not None
        estimates.append(health.last_record.noise_scale)
    assert estimates[0] is None  # (the first step was not known to be due before its backward passes)
    final = estimates[-1]
    assert final is not None
    assert closed_form() / 2 < final < closed_form() * 2, (final, closed_form())


def test_no_estimate_without_accumulation_and_the_batch_size_option():
    model, x, y = regression(64)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    health = GradientHealth(model, log_every_n_steps=1, report=False, noise_scale=True)
    for step in range(4):
        half_mse(model, x[step * 8 : step * 8 + 8], y[step * 8 : step * 8 + 8]).backward()
        health.after_backward()
        health.step(opt, step=step)
        opt.zero_grad()
        assert health.last_record is not None and health.last_record.noise_scale is None


def test_estimator_matches_mccandlish_formulas():
    # two batch sizes, exact squared norms: the unbiased estimators of appendix A.1 by hand
    noise = NoiseScale(beta=0.0)
    from lightning_gradhealth.schema.record import StepStats

    record = StepStats(step=0, global_step=0, epoch=0, batch_idx=0, optimizer_idx=0, total_norm=1.0,
                       param_norm=1.0, zero_frac=0.0, nan_count=0, inf_count=0, layer_norm_ratio=1.0,
                       no_grad_count=0)  # fmt: skip
    b, k = 8, 4
    g_small, g_big = 3.0, 1.5  # |G_small|², |G_big|² (the first micro-batch's, already multiplied back by k)
    out = noise.apply(record, {"noise": [g_small / k**2, g_big]}, micro_batches=k, batch_size=b)
    b_small, b_big = b, b * k
    gsq = (b_big * g_big - b_small * g_small) / (b_big - b_small)
    trace = (g_small - g_big) / (1 / b_small - 1 / b_big)
    assert out.noise_scale == pytest.approx(trace / gsq)
    assert batch_size_of({"x": torch.zeros(5, 3), "y": [torch.zeros(5)]}) == 5 and batch_size_of(3) is None


class LitRegression(L.LightningModule):
    def __init__(self, model: nn.Linear) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return half_mse(self.model, *batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_lightning_callback_noise_scale_under_accumulation():
    steps, k, b = 120, 4, 8
    model, x, y = regression(steps * k * b, seed=1)
    monitor = GradientHealthMonitor(report=False, verbose=False, log_every_n_steps=1, noise_scale=True)
    trainer = make_trainer(max_steps=steps, accumulate_grad_batches=k, callbacks=[monitor])
    trainer.fit(LitRegression(model), DataLoader(TensorDataset(x, y), batch_size=b))
    record = monitor.last_record
    assert record is not None and record.noise_scale is not None
    assert closed_form() / 2 < record.noise_scale < closed_form() * 2, (record.noise_scale, closed_form())


def test_the_report_compares_the_batch_size_with_the_noise_scale(tmp_path):
    steps, k, b = 60, 4, 8
    model, x, y = regression(steps * k * b)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    health = GradientHealth(model, log_every_n_steps=1, report_dir=tmp_path, verbose=False, noise_scale=True)
    for step in range(steps):
        for j in range(k):
            at = (step * k + j) * b
            (half_mse(model, x[at : at + b], y[at : at + b]) / k).backward()
            health.after_backward()
        health.step(opt, step=step, batch=(x[at : at + b],))
        opt.zero_grad()
    health.close()
    history = health.history
    recent = [v for v in history.noise_scale[history.recent()] if math.isfinite(v)]
    noise = statistics.median(recent)  # the report's: the estimate is noisy from record to record
    assert len(recent) > 5 and min(recent) < noise < max(recent)
    assert health.last_record.batch_size == b * k
    report = (tmp_path / "gradient_health_report.md").read_text()
    assert f"batch {b * k} against a noise scale ~{noise:,.3g}" in report


def test_ddp_without_accumulation_the_communication_hook_estimates_it(tmp_path):
    # 2-process gloo DDP, no accumulation: each rank's gradient (batch b) against the averaged one (batch 2b)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    script = [sys.executable, str(HERE / "ddp_noise_script.py"), str(tmp_path)]
    proc = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    for r in (r0, r1):  # (each rank its own gradient against the same average: both estimate it)
        assert r["world"] == 2 and r["batch_size"] == 2 * 64
        for noise in (r["noise_scale"], r["plain"]["noise_scale"]):
            assert closed_form() / 2 < noise < closed_form() * 2, (noise, closed_form())
        # the hook takes squared norms (one bucket: before and after its all-reduce) on due steps only (every
        # second one, log_every_n_steps=2: steps 1, 3, ...); on the others it only all-reduces
        squared = {int(k): v for k, v in r["squared"].items()}
        assert squared == {step: 2 for step in range(1, 200, 2)}, squared
        assert r["plain"]["batch_size"] == 2 * 64 and r["plain"]["squared"] > 0
        # under accumulation the first micro-batch's gradient (b) against the accumulated one (b * 2 * world): the
        # hook only all-reduces
        accumulated = r["accumulated"]
        assert accumulated["batch_size"] == 64 * 2 * 2 and accumulated["squared"] == 0
        assert closed_form() / 2 < accumulated["noise_scale"] < closed_form() * 2, accumulated
        # a DDP module with its own communication hook: said once on rank zero, not estimated without accumulation
        assert r["own_hook"]["noise_scale"] is None
    assert r0["own_hook"]["told"].count("noise scale is estimated under gradient accumulation only") == 1
    assert r1["own_hook"]["told"] == ""
