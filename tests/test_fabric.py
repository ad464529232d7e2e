"""GradientHealth in real 2-process Lightning Fabric DDP loops (gloo, CPU): the records are those of the
rank-averaged gradient (checked against a float64 recomputation on the full batch in this process), and a NaN on
one rank stops both ranks at the same step, naming the layer. Also runs examples/fabric_loop.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference, run_example
from fabric_script import BAD_STEP, EVERY, STEPS, batch, make_model
from torch import nn

HERE = Path(__file__).parent
ROOT = HERE.parent


def _run(out: Path, mode: str) -> tuple[subprocess.CompletedProcess[str], dict, dict]:
    """Run fabric_script.py (Fabric launches the second rank) and read each rank's JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run(
        [sys.executable, str(HERE / "fabric_script.py"), str(out), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a rank left hanging in a collective ends here
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text())


def _full_batch_reference(params: dict[str, torch.Tensor], step: int, ranks: tuple[int, ...] = (0, 1)) -> dict:
    """float64 gradient of the mean loss over the ranks' halves together: what DDP's average stands for."""
    model = make_model().double()
    model.load_state_dict(params)
    xs, ys = zip(*(batch(step, r) for r in ranks), strict=True)
    loss = nn.functional.mse_loss(model(torch.cat(xs).double()), torch.cat(ys).double())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return reference(grads, {n: p.detach() for n, p in model.named_parameters()})


def test_fabric_ddp_records_are_those_of_the_rank_averaged_gradient(tmp_path):
    _, r0, r1 = _run(tmp_path, "stats")
    assert r0["error_step"] is None and r1["error_step"] is None
    assert r0["records"] == r1["records"]  # every rank has the same record (the averaged gradient)
    steps = [rec["step"] for rec in r0["records"]]
    assert steps == [s for s in range(STEPS) if (s + 1) % EVERY == 0] == [1, 3, 5]
    params = torch.load(tmp_path / "params.pt")
    for rec in r0["records"]:
        ref = _full_batch_reference(params[rec["step"]], rec["step"])
        assert rec["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
        assert rec["param_norm"] == pytest.approx(ref["param_norm"], rel=1e-5)
        assert rec["zero_frac"] == pytest.approx(ref["zero_frac"], abs=1e-12)
        assert ref["zero_frac"] > 0
        assert rec["layer_norm_ratio"] == pytest.approx(ref["layer_norm_ratio"], rel=1e-5)
        assert list(rec["layers"]) == list(ref["layers"]) == ["net.0", "net.2", "net.4"]
        for name, (grad_norm, param_norm, ratio, zero_frac) in rec["layers"].items():
            r = ref["layers"][name]
            assert grad_norm == pytest.approx(r["grad_norm"], rel=1e-5), name
            assert param_norm == pytest.approx(r["param_norm"], rel=1e-5), name
            assert ratio == pytest.approx(r["ratio"], rel=1e-5), name
            assert zero_frac == pytest.approx(r["zero_frac"], abs=1e-12), name
        # the ranks' own gradients are far from it: the record is not one rank's local gradient
        for r in (0, 1):
            local = _full_batch_reference(params[rec["step"]], rec["step"], ranks=(r,))
            assert local["total_norm"] != pytest.approx(ref["total_norm"], rel=1e-2)
    # only rank zero writes the report
    assert (tmp_path / "gradient_health_report.md").is_file()
    assert r0["params_after"] == r1["params_after"]


@pytest.mark.parametrize("mode", ["nan_after_sync", "nan_backward"])
def test_fabric_ddp_nan_on_one_rank_stops_both_ranks_naming_the_layer(tmp_path, mode):
    proc, r0, r1 = _run(tmp_path, mode)
    for r in (r0, r1):
        assert r["error_step"] == BAD_STEP, proc.stderr[-2000:]
        assert r["layers"] == ["net.2"]  # named on rank 0 too, although only rank 1's gradient broke
        assert f"Non-finite gradients at step {BAD_STEP}" in r["message"] and "net.2" in r["message"]
        assert [rec["step"] for rec in r["records"]] == [1]  # the failing step's record is not a due one
    # both stopped before the update: the replicas are still the same
    assert r0["params_after"] == r1["params_after"]
    assert (tmp_path / "gradient_health_report.md").is_file()


def test_fabric_example_runs(tmp_path):
    proc = run_example("fabric_loop.py", tmp_path)
    assert "grad_health/total_norm at step" in proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("report: "))
    report = tmp_path / line.removeprefix("report: ")
    assert report.is_file() and report.name == "gradient_health_report.md"
    assert any(report.parent.glob("events.out.tfevents.*"))  # next to the TensorBoard logs
