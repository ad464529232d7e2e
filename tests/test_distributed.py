"""Real 2-process runs (gloo, CPU), DDP and FSDP2: only rank zero writes; every rank computes the same record, the
same activation statistics, and takes the same decisions at the same step when one rank's gradient goes bad;
sharded statistics, histograms and clipping match unsharded float64 references."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _run(script: str, out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict, dict]:
    """Run ``script`` (it launches its second rank through Lightning) and read each rank's JSON result.

    No test may depend on a warm compile cache: torch's C++ extensions (DeepSpeed JIT-builds its ops there) go to a
    folder of this test's own, so a lock left behind by a killed build elsewhere can never make it wait.
    """
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"),
        "DS_BUILD_OPS": "0",  # (DeepSpeed's install-time switch; the scripts also refuse its JIT builds)
    }
    proc = subprocess.run(
        [sys.executable, str(HERE / script), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang would end here (generous: a loaded 2-core machine runs these minutes, not seconds)
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


@pytest.mark.parametrize(
    ("mode", "step", "micro_batch"),
    [
        ("nan", 2, 0),  # DDP's all-reduce spreads rank 1's NaN: both see it
        ("nan_after_sync", 2, 0),  # no collective spreads it: the monitor's reduced decision does
        ("nan_accum", 1, 1),  # rank 0 sees it at micro-batch 3 only; the first one anywhere is reported
    ],
)
def test_ddp_one_rank_goes_nan_every_rank_stops_at_that_step(tmp_path, mode, step, micro_batch):
    proc, r0, r1 = _run("ddp_nan_script.py", tmp_path, mode)
    for r in (r0, r1):
        assert r["error_step"] == step, proc.stderr[-2000:]
        assert r["layers"] == ["net.2"]  # named on both ranks, although only rank 1's gradient broke
        assert r["micro_batch"] == micro_batch
        assert r["global_step"] == step  # stopped before the update: no extra step
    assert r0["params"] == r1["params"]


def test_ddp_deferred_guard_stops_every_rank_at_the_same_step_with_the_weights_clean(tmp_path):
    proc, r0, r1 = _run("ddp_nan_script.py", tmp_path, "nan_deferred")
    for r in (r0, r1):
        assert r["error_step"] == 2, proc.stderr[-2000:]
        assert r["layers"] == ["net.2"]
        assert r["global_step"] == 3  # read at the next step; the fused kernel skipped step 2's update
    assert r0["params"] == r1["params"]
    assert all(math.isfinite(v) for v in r0["params"])


def test_ddp_spike_on_one_rank_is_skipped_on_every_rank(tmp_path):
    _, r0, r1 = _run("ddp_nan_script.py", tmp_path, "spike_after_sync")
    assert r0["error_step"] is None and r1["error_step"] is None
    assert r0["spikes"] == r1["spikes"] == 1
    assert r0["skipped"] == r1["skipped"] == 1
    # had only rank 1 skipped its update, DDP's replicas would have drifted apart for good
    assert r0["params"] == r1["params"]


@pytest.fixture(scope="module")
def fsdp_stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_stats")
    _, r0, r1 = _run("fsdp_script.py", out, "stats")
    return out, r0, r1


def test_fsdp2_sharded_statistics_match_an_unsharded_reference(fsdp_stats):
    import torch
    from conftest import reference
    from fsdp_script import Sharded, make_data
    from torch import nn

    out, r0, r1 = fsdp_stats
    assert r0 == r1  # one collective: every rank has the global numbers
    # unsharded float64 reference: same initialisation, the union of the two ranks' batches
    make_data()
    model = Sharded()
    batches = [torch.load(out / f"batch_rank{r}.pt") for r in (0, 1)]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    nn.functional.mse_loss(model.net(x), y).backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    ref = reference(grads, params)
    assert r0["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
    assert r0["guard_total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)  # the guard's sharded path
    assert r0["guard_records"] is False
    # plain gradients beside DTensors that differ between ranks (nothing averages them): refused at the first step
    assert "only partly under fully_shard" in r0["mixed"] and "differ between ranks" in r0["mixed"]
    assert r0["tp"] == [None, 1]  # tensor parallelism runs (its numbers: test_parallel.py)
    # float32 norms in the CPU's kernel order against float64: 1e-5 (1e-6 does not hold on every CPU)
    assert r0["param_norm"] == pytest.approx(ref["param_norm"], rel=1e-5)
    assert r0["zero_frac"] == pytest.approx(ref["zero_frac"], abs=1e-12)
    assert r0["layer_norm_ratio"] == pytest.approx(ref["layer_norm_ratio"], rel=1e-5)
    assert list(r0["layers"]) == ["net.0", "net.2", "net.4"]  # net.4's weight shard is empty on one rank
    for name, (grad_norm, param_norm, zero_frac) in r0["layers"].items():
        assert grad_norm == pytest.approx(ref["layers"][name]["grad_norm"], rel=1e-5), name
        assert param_norm == pytest.approx(ref["layers"][name]["param_norm"], rel=1e-5), name
        assert zero_frac == pytest.approx(ref["layers"][name]["zero_frac"], abs=1e-12), name


def test_fsdp2_full_statistics_and_inf_norm_match_the_all_gathered_gradients(fsdp_stats):
    """Maxima and minima (max |g|, min non-zero |g|, the inf norm) need a MAX over the shards, sums a SUM: one
    all-gather carries both. The reference is the full gradient, all-gathered by DTensor itself."""
    import torch
    from conftest import reference

    out, r0, r1 = fsdp_stats
    step = torch.load(out / "capture.pt", weights_only=False)[0]
    ref = reference(step["grads"], step["params"])
    full = r0["full"]
    assert full == r1["full"]
    assert full["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
    assert full["grad_max_abs"] == pytest.approx(ref["max_abs"], rel=1e-6)
    for name, (grad_norm, _, zero_frac, max_abs, min_nz, mean, std) in full["layers"].items():
        r = ref["layers"][name]
        assert grad_norm == pytest.approx(r["grad_norm"], rel=1e-5), name
        assert zero_frac == pytest.approx(r["zero_frac"], abs=1e-12), name
        assert max_abs == pytest.approx(r["max_abs"], rel=1e-6), name
        assert min_nz == pytest.approx(r["min_abs_nonzero"], rel=1e-6), name
        assert mean == pytest.approx(r["mean"], rel=1e-5, abs=1e-5 * r["std"]), name  # a float32 sum that cancels
        assert std == pytest.approx(r["std"], rel=1e-5), name
    ref_inf = reference(step["grads"], step["params"], norm_type=math.inf)
    inf = r0["inf"]
    assert inf["total_norm"] == pytest.approx(ref_inf["total_norm"], rel=1e-6)
    assert inf["param_norm"] == pytest.approx(ref_inf["param_norm"], rel=1e-6)
    for name, (grad_norm, param_norm, _) in inf["layers"].items():
        assert grad_norm == pytest.approx(ref_inf["layers"][name]["grad_norm"], rel=1e-6), name
        assert param_norm == pytest.approx(ref_inf["layers"][name]["param_norm"], rel=1e-6), name


def test_fsdp2_histograms_are_of_the_whole_gradient(fsdp_stats):
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = fsdp_stats
    step = torch.load(out / "capture.pt", weights_only=False)[0]
    acc = EventAccumulator(str(out / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    assert acc.Tags()["histograms"] == ["grad_hist/net.2"]  # only rank zero wrote, once
    (event,) = acc.Histograms("grad_hist/net.2")
    h = event.histogram_value
    flat = torch.cat([step["grads"]["net.2.weight"].reshape(-1), step["grads"]["net.2.bias"].reshape(-1)])
    assert h.num == flat.numel() == sum(h.bucket)  # both ranks' shards are in
    assert h.min == pytest.approx(flat.min().item(), rel=1e-6) and h.max == pytest.approx(flat.max().item(), rel=1e-6)
    assert h.sum == pytest.approx(flat.sum().item(), rel=1e-5, abs=1e-7)
    assert h.sum_squares == pytest.approx(flat.square().sum().item(), rel=1e-6)
    edges = torch.linspace(flat.min().item(), flat.max().item(), len(h.bucket) + 1, dtype=torch.float64)
    assert list(h.bucket) == pytest.approx(torch.histogram(flat, bins=edges).hist.tolist(), abs=1)


def test_fsdp2_nan_in_one_ranks_shard_stops_every_rank_at_that_step(tmp_path):
    _, r0, r1 = _run("fsdp_script.py", tmp_path, "nan")
    # the guard's all-reduce carries the NaN to rank 0; the exact counts are summed over the shards
    assert r0 == r1 == {"error_step": 1, "layers": ["net.2"], "global_step": 1, "nan": 1}


def test_fsdp2_clipping_matches_the_unsharded_formulas(tmp_path):
    """Every clipper, on sharded gradients, changes the whole gradient exactly as on an unsharded one: the
    expected gradient is the reference clipper applied to the all-gathered pre-clip gradient."""
    import numpy as np
    import torch
    from fsdp_script import CLIPPERS, SPIKE_AT
    from test_clipping import ZClipReference, _agc_reference, _norm, _scaled, _torch_clip

    _run("fsdp_script.py", tmp_path, "clip")
    runs = torch.load(tmp_path / "clip.pt", weights_only=False)
    assert list(runs) == list(CLIPPERS)
    for kind, run in runs.items():
        history: list[float] = []
        zclip = ZClipReference(warmup_steps=CLIPPERS["zclip"]["zclip_warmup_steps"])
        clipped = 0
        for i, (a, b) in enumerate(zip(run["pre"], run["post"], strict=True)):
            grads, norm = a["grads"], _norm(a["grads"])
            if kind == "norm":
                expected = _torch_clip(grads, torch.nn.utils.clip_grad_norm_, CLIPPERS["norm"]["max_norm"])
            elif kind == "value":
                expected = _torch_clip(grads, torch.nn.utils.clip_grad_value_, CLIPPERS["value"]["clip_value"])
            elif kind == "agc":
                expected = _agc_reference(grads, a["params"], CLIPPERS["agc"]["agc_clip_factor"], 1e-3)
            elif kind == "autoclip":
                history.append(norm)
                thr = float(np.percentile(history, CLIPPERS["autoclip"]["autoclip_percentile"]))
                expected = _scaled(grads, min(1.0, thr / (norm + 1e-6)))
            else:
                expected = _scaled(grads, zclip.step(norm))
            for name, g in b["grads"].items():
                assert g == pytest.approx(expected[name], rel=1e-5, abs=1e-9), (kind, i, name)
            assert b["metrics"]["grad_health/clipped_norm"] == pytest.approx(_norm(expected), rel=1e-5), (kind, i)
            clipped += _norm(expected) < 0.999 * norm
        assert clipped > 0, kind  # the clipper really acted
        if kind == "zclip":
            assert _norm(run["post"][SPIKE_AT]["grads"]) < 0.5 * _norm(run["pre"][SPIKE_AT]["grads"])


def test_fsdp1_flat_shards_match_an_unsharded_reference(tmp_path):
    """FSDP1 (use_orig_params=True): each rank holds flat 1-D pieces of the parameters, an empty piece has no
    gradient at all. Statistics are summed over the FSDP process group, element counts included; names lose
    FSDP's wrapper segments; a parameter whose piece is empty on one rank is not reported as gradient-less."""
    import torch
    from conftest import reference
    from fsdp_script import Sharded, make_data
    from torch import nn

    _, r0, r1 = _run("fsdp1_script.py", tmp_path)
    assert r0["shapes"] != r1["shapes"]  # really sharded: different flat pieces on the two ranks
    assert [0] in r0["shapes"].values()  # ... and an empty one
    for key in ("total_norm", "param_norm", "zero_frac", "layers", "full", "inf", "guard_total_norm", "no_grad"):
        assert r0[key] == r1[key], key
    assert r0["no_grad"] == []
    assert "clip='agc'" in r0["agc_refused"] and "FSDPStrategy" in r1["agc_refused"]
    # the unsharded gradient: same initialisation, the union of the two ranks' batches, one process
    make_data()
    model = Sharded()
    batches = [torch.load(tmp_path / f"batch_rank{r}.pt") for r in (0, 1)]
    nn.functional.mse_loss(model.net(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches])).backward()
    whole = {n: p.grad.double() for n, p in model.named_parameters()}
    # the gradient the monitors saw: rank 0's flat piece of each parameter, then rank 1's (FSDP1 shards the flat
    # parameter in rank order); a rank whose piece is empty has no gradient for it
    pieces = [torch.load(tmp_path / f"pieces_rank{r}.pt") for r in (0, 1)]
    grads = {n: torch.cat([p["grads"][n] for p in pieces if n in p["grads"]]) for n in whole}
    params = {n: torch.cat([p["params"][n] for p in pieces]) for n in whole}
    for name, p in model.named_parameters():
        assert torch.equal(params[name], p.detach().double().reshape(-1)), name
        # FSDP's reduce-scatter averages two half-batch gradients, the reference sums the whole batch at once:
        # same float32 gradient up to rounding. Each entry is a float32 sum over 16 samples and up to 16 units,
        # its error a few float32 ulps (6e-8) of its largest terms, which are no larger than the parameter's
        # largest entry: 1e-5 of that is far outside the rounding (a wrong shard or scaling is not)
        torch.testing.assert_close(
            grads[name], whole[name].reshape(-1), rtol=1e-5, atol=1e-5 * whole[name].abs().max().item()
        )
    # every statistic against a float64 reference of those very float32 values (not of the unsharded gradient,
    # whose smallest entries differ from FSDP's by more than 1e-6 relative, depending on the CPU's kernels).
    # Maxima and minima pick one of the same float32 values: exact on any CPU. Norms and sums are float32
    # accumulations (another order than float64's, per CPU): relative error a few ulps times log2(n), n <= 128
    # here, so rel=1e-5; means are compared to 1e-5 of the std, as their sums cancel.
    ref = reference(grads, params)
    assert r0["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
    assert r0["guard_total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
    assert r0["param_norm"] == pytest.approx(ref["param_norm"], rel=1e-5)
    assert r0["zero_frac"] == pytest.approx(ref["zero_frac"], abs=1e-12)
    assert r0["inf"] == reference(grads, params, norm_type=math.inf)["total_norm"]
    assert list(r0["layers"]) == ["net.0", "net.2", "net.4"]
    for name, (grad_norm, param_norm, zero_frac, numel) in r0["layers"].items():
        r = ref["layers"][name]
        assert grad_norm == pytest.approx(r["grad_norm"], rel=1e-5), name
        assert param_norm == pytest.approx(r["param_norm"], rel=1e-5), name
        assert zero_frac == pytest.approx(r["zero_frac"], abs=1e-12), name
        assert numel == sum(whole[n].numel() for n in whole if n.startswith(name + "."))
        max_abs, min_nz, mean, std = r0["full"][name]
        assert max_abs == r["max_abs"], name
        assert min_nz == r["min_abs_nonzero"], name
        assert mean == pytest.approx(r["mean"], rel=1e-5, abs=1e-5 * r["std"]), name
        assert std == pytest.approx(r["std"], rel=1e-5), name
    # per parameter: a parameter with no piece on one rank still gets its true numbers (that rank contributes the
    # neutral values, -inf for the negated minimum); a rank with no watched gradient at all still takes part
    ref_p = reference(grads, params, group_by="parameter")
    assert list(r0["per_param"]) == list(ref_p["layers"])
    for name, (grad_norm, min_nz, numel) in r0["per_param"].items():
        assert grad_norm == pytest.approx(ref_p["layers"][name]["grad_norm"], rel=1e-5), name
        assert min_nz == ref_p["layers"][name]["min_abs_nonzero"], name
        assert numel == whole[name].numel()
    # NO_SHARD units: whole parameters on every rank, counted once (not world-size times). Another run, whose
    # all-reduce rounds otherwise again: against the unsharded gradient, to the float32 norms' 1e-5
    ref_whole = reference(whole, params)
    assert r0["no_shard"] == pytest.approx([ref_whole["total_norm"], ref_whole["zero_frac"]], rel=1e-5)
    assert r0["no_shard_guard"] == pytest.approx(ref_whole["total_norm"], rel=1e-5)
    # one entry: its float32 norm sqrt(g * g) is |g| exactly; the guard's exp(log(.)) is float64 rounding
    bias = ref_p["layers"]["net.4.bias"]["grad_norm"]
    assert r0["narrow"] == r1["narrow"] == pytest.approx(bias, rel=1e-6)
    assert r0["narrow_guard"] == pytest.approx(bias, rel=1e-6)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    acc.Reload()
    for name, g in whole.items():
        (event,) = acc.Histograms(f"grad_hist/{name}")
        assert event.histogram_value.num == g.numel() == sum(event.histogram_value.bucket), name


@pytest.fixture(scope="module")
def deepspeed_fits(tmp_path_factory):
    """One process fits under ZeRO 0, 1, 2 and 3 in turn (one import of DeepSpeed and Lightning for the four)."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    _, r0, _ = _run("deepspeed_script.py", out, "0,1,2,3")
    assert not (out / "torch_extensions").exists(), "DeepSpeed compiled an op"
    return r0


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_is_refused_at_setup(deepspeed_fits, stage):
    """Under ZeRO >= 1 `param.grad` is None in the hook (DeepSpeed keeps partitioned buffers): refused clearly."""
    refused = deepspeed_fits[str(stage)]["refused"]
    assert f"ZeRO stage {stage}" in refused
    assert "safe_get_full_grad" in refused and "ModelParallelStrategy" in refused


def test_deepspeed_zero_0_is_watched(deepspeed_fits):
    assert "refused" not in deepspeed_fits["0"]
    assert deepspeed_fits["0"]["total_norm"] > 0


@pytest.mark.parametrize("mode", ["frozen", "optimizer"])
def test_ddp_layer_joining_after_wrapping_is_watched_and_missing_averaging_is_said(tmp_path, mode):
    proc, r0, r1 = _run("ddp_unfreeze_script.py", tmp_path, mode)
    for r in (r0, r1):  # both ranks keep in step through the change
        assert r["steps"] == 6
        assert r["layers"][:3] == [["net.2", "net.4"]] * 3 and r["layers"][3:] == [["net.0", "net.2", "net.4"]] * 3
    assert r1["ddp_warnings"] == []  # rank zero speaks
    if mode == "frozen":  # frozen when DDP wrapped the model: DDP does not average it, and the replicas drift
        assert len(r0["ddp_warnings"]) == 1 and "net.0.weight" in r0["ddp_warnings"][0]
        assert r0["net0_weights"] != r1["net0_weights"]
    else:  # trainable when DDP wrapped it: averaged all along, nothing to warn about
        assert r0["ddp_warnings"] == []
        assert r0["net0_weights"] == r1["net0_weights"]
