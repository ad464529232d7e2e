"""Real 2-process DDP runs (gloo, CPU): only rank zero writes; every rank computes the same record, the same
activation statistics, and stops at the same step when one rank's gradient goes bad."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(script: str, out: Path) -> tuple[subprocess.CompletedProcess[str], dict, dict]:
    """Run ``script`` (it launches its second rank through Lightning) and read each rank's JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(HERE / script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang would end here
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text())


def test_ddp_two_processes_rank_zero_logs_only(tmp_path):
    _, r0, r1 = _run("ddp_script.py", tmp_path)
    assert r0["log_calls"] == 4  # log_every_n_steps=1, max_steps=4
    assert r1["log_calls"] == 0
    # gradients are averaged across ranks before on_before_optimizer_step: identical records
    assert r0["step"] == r1["step"] == 3
    assert r0["total_norm"] == r1["total_norm"]
    # activation statistics are summed across ranks (torchmetrics): both ranks see the global batch's numbers,
    # although each ran its forward on a different half of it
    assert r0["activations"] == r1["activations"]
    assert len(r0["activations"]["net.1"]) == 4


def test_ddp_one_rank_goes_nan_every_rank_stops_at_that_step(tmp_path):
    proc, r0, r1 = _run("ddp_nan_script.py", tmp_path)
    # DDP averages gradients before the hook: rank 1's NaN reaches rank 0, and both stop at step 2, no update
    assert r0 == r1 == {"error_step": 2, "layers": ["net.2"], "global_step": 2}, proc.stderr[-2000:]


def test_fsdp2_sharded_statistics_match_an_unsharded_reference(tmp_path):
    import torch
    from conftest import reference
    from fsdp_script import Sharded, make_data
    from torch import nn

    _, r0, r1 = _run("fsdp_script.py", tmp_path)
    assert r0 == r1  # one all-reduce: every rank has the global numbers
    # unsharded float64 reference: same initialisation, the union of the two ranks' batches
    make_data()
    model = Sharded()
    batches = [torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    nn.functional.mse_loss(model.net(x), y).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference(grads, params)
    assert r0["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
    assert r0["guard_total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)  # the guard's sharded path
    assert r0["guard_records"] is False
    assert r0["param_norm"] == pytest.approx(ref["param_norm"], rel=1e-6)
    assert r0["zero_frac"] == pytest.approx(ref["zero_frac"], abs=1e-12)
    assert list(r0["layers"]) == ["net.0", "net.2", "net.4"]  # net.4's weight shard is empty on one rank
    for name, (grad_norm, param_norm, zero_frac) in r0["layers"].items():
        assert grad_norm == pytest.approx(ref["layers"][name]["grad_norm"], rel=1e-5), name
        assert param_norm == pytest.approx(ref["layers"][name]["param_norm"], rel=1e-6), name
        assert zero_frac == pytest.approx(ref["layers"][name]["zero_frac"], abs=1e-12), name
