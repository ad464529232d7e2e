"""Real 2-process DDP runs (gloo, CPU): only rank zero writes; every rank computes the same record, the same
activation statistics, and stops at the same step when one rank's gradient goes bad."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
