"""Update size: ``update_ratio/<layer>`` and ``grad_health/grad_cosine`` against independent float64 snapshots.

The reference copies every parameter and gradient in float64 at every step (the monitor only at the step before a
logged one), and computes, per layer, ``‖θ_t − θ_{t−1}‖ / ‖θ_{t−1}‖`` by concatenating the layer's tensors, and the
cosine between the concatenated gradients of steps ``t − 1`` and ``t``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import Capture, TinyMLP, loader, make_trainer
from test_logging import read_scalars
from torch import nn

from lightning_gradhealth import GradientHealth, GradientHealthMonitor
from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.model.layout import layer_name

ON = {"update_ratio": True, "grad_cosine": True}  # (opt-in: see benchmarks/extras.py for their cost)


def _cat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def reference(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per layer, ``‖after − before‖ / ‖before‖`` in float64."""
    layers: dict[str, list[str]] = {}
    for name in before:
        layers.setdefault(layer_name(name, "module"), []).append(name)
    out = {}
    for layer, names in layers.items():
        b, a = _cat(before, names), _cat(after, names)
        out[layer] = (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()
    return out


def cosine(g0: dict[str, torch.Tensor], g1: dict[str, torch.Tensor]) -> float:
    names = sorted(g0.keys() & g1.keys())
    a, b = _cat(g0, names), _cat(g1, names)
    return (a @ b / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))).item()


def f64(model: nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad if grads else p).detach().double().clone()
        for n, p in model.named_parameters()
        if not grads or p.grad is not None
    }


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_plain_loop_update_ratio_and_grad_cosine_equal_a_float64_snapshot(optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-2)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    )
    health = GradientHealth(model, log_every_n_steps=3, report=False, verbose=False, **ON)
    params, grads, records = [], [], {}
    for i, (x, y) in enumerate(loader(n=96)):
        nn.functional.mse_loss(model(x), y).backward()
        params.append(f64(model))
        grads.append(f64(model, grads=True))
        health.step(opt, step=i)
        opt.step()
        opt.zero_grad()
        if health.last_record is not None:
            records[health.last_record.step] = health.last_record
    assert sorted(records) == [2, 5, 8, 11]
    for step, record in records.items():
        expected = reference(params[step - 1], params[step])
        got = {lay.name: lay.update_ratio for lay in record.layers}
        assert got.keys() == expected.keys()
        for layer, value in expected.items():
            assert got[layer] == pytest.approx(value, rel=1e-4), (step, layer)
        assert record.grad_cosine == pytest.approx(cosine(grads[step - 1], grads[step]), rel=1e-4, abs=1e-5)
    # a test that can fail: the values move from step to step and are not trivially 0 or 1
    ratios = [lay.update_ratio for rec in records.values() for lay in rec.layers]
    assert all(1e-5 < r < 1 for r in ratios) and len(set(ratios)) == len(ratios)


def test_log_every_step_keeps_two_snapshots():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = GradientHealth(model, log_every_n_steps=1, report=False, verbose=False, **ON)
    params, grads = [], []
    for i, (x, y) in enumerate(loader(n=32)):
        nn.functional.mse_loss(model(x), y).backward()
        params.append(f64(model))
        grads.append(f64(model, grads=True))
        health.step(opt, step=i)
        opt.step()
        opt.zero_grad()
        record = health.last_record
        assert record is not None and record.step == i
        if i == 0:  # no step before the first: nothing to compare with
            assert record.grad_cosine is None and all(lay.update_ratio is None for lay in record.layers)
            continue
        expected = reference(params[i - 1], params[i])
        assert {lay.name: lay.update_ratio for lay in record.layers} == pytest.approx(expected, rel=1e-4)
        assert record.grad_cosine == pytest.approx(cosine(grads[i - 1], grads[i]), rel=1e-4, abs=1e-5)


def test_off_by_default_costs_nothing_and_logs_nothing():
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = GradientHealth(model, log_every_n_steps=2, report=False)
    for i in range(4):
        model(torch.randn(3, 4)).sum().backward()
        health.step(opt, step=i)
        assert health._measures.updates._taking is None  # no copy taken
        opt.step()
        opt.zero_grad()
    assert health.last_record is not None and health.last_record.grad_cosine is None
    assert all(lay.update_ratio is None for lay in health.last_record.layers)


def test_options_are_validated():
    with pytest.raises(TypeError, match=r"`update_ratio` must be a bool, got 'yes'"):
        HealthOptions(update_ratio="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`grad_cosine` must be a bool"):
        GradientHealthMonitor(grad_cosine=1)  # type: ignore[arg-type]


def test_lightning_callback_logs_update_ratio_and_grad_cosine(tmp_path):
    capture = Capture()
    monitor = GradientHealthMonitor(report=False, verbose=False, **ON)
    trainer = make_trainer(tmp_path, max_steps=8, log_every_n_steps=4, callbacks=[monitor, capture])
    trainer.fit(TinyMLP(optimizer="adam", lr=1e-2), loader())
    steps: dict[int, dict[str, Any]] = {s["step"]: s for s in capture.steps}
    scalars = read_scalars(tmp_path)
    for step in (3, 7):
        expected = reference(steps[step - 1]["params"], steps[step]["params"])
        for layer, value in expected.items():
            assert scalars[f"update_ratio/{layer}"][step] == pytest.approx(value, rel=1e-4)
        want = cosine(steps[step - 1]["grads"], steps[step]["grads"])
        assert scalars["grad_health/grad_cosine"][step] == pytest.approx(want, rel=1e-4, abs=1e-5)
        assert not math.isnan(want)


FSDP2_SCRIPT = '''
import json, sys
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch import nn
from torch.distributed._composable.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh
from lightning_gradhealth import GradientHealth


def run(rank, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 1))
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    health = GradientHealth(model, log_every_n_steps=2, update_ratio=True, grad_cosine=True, report=False)
    gen = torch.Generator().manual_seed(100 + rank)
    steps = []
    for step in range(4):
        x, y = torch.randn(8, 8, generator=gen), torch.randn(8, 1, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        full = {n: (p.full_tensor().double().tolist(), p.grad.full_tensor().double().tolist())
                for n, p in model.named_parameters()}
        health.step(opt, step=step)
        rec = health.last_record
        steps.append({"full": full, "record": None if rec is None or rec.step != step else
                      {"cosine": rec.grad_cosine, "update": {lay.name: lay.update_ratio for lay in rec.layers}}})
        opt.step()
        opt.zero_grad()
    if rank == 0:
        json.dump(steps, open(f"{out}/steps.json", "w"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
'''


def test_fsdp2_update_ratio_and_grad_cosine_combine_the_shards(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "fsdp2_updates.py"
    script.write_text(FSDP2_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((tmp_path / "steps.json").read_text())
    params = [{n: torch.tensor(v[0], dtype=torch.float64) for n, v in s["full"].items()} for s in steps]
    grads = [{n: torch.tensor(v[1], dtype=torch.float64) for n, v in s["full"].items()} for s in steps]
    for step in (1, 3):
        record = steps[step]["record"]
        expected = reference(params[step - 1], params[step])
        assert record["update"] == pytest.approx(expected, rel=1e-4), step
        assert record["cosine"] == pytest.approx(cosine(grads[step - 1], grads[step]), rel=1e-4, abs=1e-5)


def test_a_learning_rate_far_too_high_for_a_layer_is_found_and_a_healthy_run_is_not():
    def train(lr: float) -> list[Any]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        health = GradientHealth(model, log_every_n_steps=2, report=False, verbose=False, thresholds=None, **ON)
        for i, (x, y) in enumerate(loader(n=240)):
            nn.functional.mse_loss(model(x), y).backward()
            health.step(opt, step=i)
            opt.step()
            opt.zero_grad()
        health.close()
        return health.findings

    assert train(1e-3) == []  # Adam at 1e-3: ~1e-3 of the weights per step
    findings = train(1.0)  # Adam at lr 1: the small output layer moves by about its own size each step
    ratio = next(f for f in findings if f.kind == "ratio_high" and "update ratio" in f.summary)
    assert "move by more than 0.1 of their weights per step" in ratio.summary and "2" in ratio.layers
    assert all(m > 0.1 for m in ratio.evidence["median_update_ratio"].values())
