"""Past data parallelism, on 4 real gloo processes (tp_script.py): FSDP2 x tensor parallelism on a 2x2 mesh,
tensor parallelism alone, HSDP, a 2-stage pipeline x 2-way FSDP2, a 2-stage pipeline x 2-way tensor parallelism and
a 4-stage pipeline of plain modules (both under the deferred guard). Every logged number (total and every layer,
stats="full", dead units) equals an unsharded float64 reference fed the same batches; clipping by norm and AGC give
the reference's clipped gradients; a NaN in one rank's piece stops every rank at the same step, naming the layer.
One launch runs every case in sequence (tp_script.CASES); each test checks the cases of one layout family."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import reference
from torch import nn

HERE = Path(__file__).parent
ROOT = HERE.parent
# the data coordinate of each rank, per layout (tensor-parallel peers and pipeline stages share a batch)
DATA = {"fsdp_tp": (0, 0, 1, 1), "tp": (0, 0, 0, 0), "hsdp": (0, 1, 2, 3), "pp": (0, 1, 0, 1), "pp_tp": (0, 0, 0, 0),
        "pp_plain": (0, 0, 0, 0), "fsdp1": (0, 1, 2, 3)}  # fmt: skip


def _launch(mode: str, out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    proc = subprocess.run(
        [sys.executable, str(HERE / "tp_script.py"), str(out), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang ends here
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


def _dead_fracs(model: nn.Module) -> dict[str, float]:
    """Per layer (module), dead rows of its 2-D+ gradients over its rows."""
    rows: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        if p.grad is not None and p.grad.ndim >= 2:
            layer = name.rsplit(".", 1)[0]
            dead = int((p.grad.reshape(p.grad.shape[0], -1) == 0).all(dim=1).sum())
            have = rows.setdefault(layer, [0, 0])
            have[0] += dead
            have[1] += p.grad.shape[0]
    return {layer: dead / units for layer, (dead, units) in rows.items()}


def _union_batch(layout: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tp_script import batch

    batches = [batch(d, step) for d in sorted(set(DATA[layout]))]
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _check_training(layout: str, out: Path, ranks: list[dict]) -> None:
    """The records of a training case against the unsharded twin (the union of the data-parallel batches)."""
    from tp_script import MAX_NORM, TRAIN, make_model

    _, _, options = TRAIN[layout]
    deferred = options.get("guard_mode") == "deferred"
    for r in ranks:  # a NaN in one rank's piece of blocks.1.w2: every rank stops at step 2 naming it
        assert r[layout]["error"] == {"step": 2, "layers": ["blocks.1.w2"], "at": 3 if deferred else 2}, layout
        assert r[layout]["records"] == ranks[0][layout]["records"]  # global numbers on every rank (every stage)
    records = {rec["step"]: rec for rec in ranks[0][layout]["records"]}
    every = options.get("log_every_n_steps", 1)
    assert sorted(records) == [s for s in range(2) if (s + 1) % every == 0]
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(2):
        x, y = _union_batch(layout, step)
        nn.functional.mse_loss(model(x), y).backward()
        grads = {n: p.grad.double() for n, p in model.named_parameters()}
        ref = reference(grads, {n: p.detach().double() for n, p in model.named_parameters()})
        if step in records:
            _check_record(records[step], ref, _dead_fracs(model))
        if "clip" in options:
            assert MAX_NORM / (ref["total_norm"] + 1e-6) < 1  # the test clips
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
            if step == 0:  # the clipped gradients the optimizer received, on a rank of every stage
                for r in (0, 2):
                    for name, g in torch.load(out / f"clipped_{layout}_rank{r}.pt").items():
                        torch.testing.assert_close(g.double(), model.get_parameter(name).grad.double(), rtol=1e-5,
                                                   atol=1e-7, msg=name)  # fmt: skip
        opt.step()
        opt.zero_grad()


def _check_deferred(case: str, layout: str, ranks: list[dict]) -> None:
    """Guarded only, read a step late: every rank stops at the failing step naming the layer, and the failure
    record's other layers hold the twin's norms (the shards' norms combined, copies counted once)."""
    from tp_script import make_model

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        opt.zero_grad()
        x, y = _union_batch(layout, step)
        nn.functional.mse_loss(model(x), y).backward()
        if step < 2:
            opt.step()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    ref = reference(grads, {n: p.detach().double() for n, p in model.named_parameters()})["layers"]
    for result in ranks:
        assert result[case]["records"] == [], case  # nothing logged: the failing step was guarded only
        error = result[case]["error"]
        assert {k: error[k] for k in ("step", "layers", "at")} == {"step": 2, "layers": ["blocks.1.w2"], "at": 3}
        assert list(error["norms"]) == list(ref), case  # every layer of the whole model (every stage), in order
        for name, norm in error["norms"].items():
            if name == "blocks.1.w2":
                assert math.isnan(norm), case
            else:
                key = "max_abs" if layout == "pp" else "grad_norm"  # (deferred:pp: norm_type=inf)
                assert norm == pytest.approx(ref[name][key], rel=1e-5), (case, name)


def _check_record(rec: dict, ref: dict, dead: dict[str, float]) -> None:
    assert math.isfinite(rec["total_norm"])
    assert rec["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
    assert rec["param_norm"] == pytest.approx(ref["param_norm"], rel=1e-5)
    assert rec["zero_frac"] == pytest.approx(ref["zero_frac"], abs=1e-12)
    assert rec["layer_norm_ratio"] == pytest.approx(ref["layer_norm_ratio"], rel=1e-5)
    assert rec["grad_max_abs"] == pytest.approx(ref["max_abs"], rel=1e-5)
    assert list(rec["layers"]) == list(ref["layers"])  # every layer of the whole model, in order
    for name, lay in rec["layers"].items():
        r = ref["layers"][name]
        for key in ("grad_norm", "param_norm", "ratio", "std"):
            assert lay[key] == pytest.approx(r[key], rel=1e-5), (name, key)
        # extremes select one float32 entry, but the sharded run computed the entries in another order (its
        # all-reduces) than the twin: a few float32 ulps apart, more for a small entry made of cancelling terms
        assert lay["max_abs"] == pytest.approx(r["max_abs"], rel=1e-5), name
        assert lay["min_abs_nonzero"] == pytest.approx(r["min_abs_nonzero"], rel=1e-5, abs=1e-6 * r["max_abs"]), name
        assert lay["zero_frac"] == pytest.approx(r["zero_frac"], abs=1e-12), name
        assert lay["mean"] == pytest.approx(r["mean"], rel=1e-5, abs=1e-5 * r["std"]), name
        assert lay["nan_count"] == lay["inf_count"] == 0
        if name in dead:
            assert lay["dead_unit_frac"] == pytest.approx(dead[name], abs=1e-12), name


def _check_agc(layout: str, out: Path, ranks: list[dict]) -> None:
    """AGC on the sharded pieces equals timm's formula on the whole float64 gradient, on every rank."""
    from test_clipping import _agc_reference
    from tp_script import AGC, make_model

    model = make_model().double()
    x, y = _union_batch(layout, 0)
    nn.functional.mse_loss(model(x.double()), y.double()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    expected = _agc_reference(grads, {n: p.detach() for n, p in model.named_parameters()}, AGC, 1e-3)
    # the clipper acts on some units and not on others: rows cut by RowwiseParallel and 1-D tensors among them
    changed = {n: ~torch.isclose(expected[n], g, rtol=1e-9, atol=0).reshape(g.shape[0] if g.ndim > 1 else 1, -1)
               .all(dim=1) for n, g in grads.items()}  # fmt: skip
    assert changed["blocks.1.w2.weight"].any() and not changed["blocks.1.w2.weight"].all()
    assert any(changed[n].all() for n in grads if grads[n].ndim == 1)
    assert not all(changed[n].all() for n in grads if grads[n].ndim == 1)
    seen = set()
    for r, result in enumerate(ranks):
        for name, g in torch.load(out / f"agc_{layout}_rank{r}.pt").items():
            # (float32 pieces: entries that are a few float32 ulps of the tensor's largest apart)
            atol = 1e-6 * float(expected[name].abs().max())
            torch.testing.assert_close(g.double(), expected[name], rtol=1e-5, atol=atol, msg=f"{layout} {r} {name}")
            seen.add(name)
        norm = torch.cat([t.reshape(-1) for t in expected.values()]).norm().item()
        assert result[f"agc:{layout}"]["clipped_norm"] == pytest.approx(norm, rel=1e-5), (layout, r)
    assert seen == set(grads)  # every parameter, on some stage


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Every case of tp_script.py, in ONE launch of 4 processes (a launch costs more than all its cases)."""
    out = tmp_path_factory.mktemp("tp")
    return out, _launch("all", out)


@pytest.mark.parametrize("mode", ["fsdp_tp", "tp", "hsdp", "pp"])
def test_four_processes_equal_the_unsharded_reference_and_stop_together(launched, mode):
    from tp_script import CASES

    tmp_path, ranks = launched
    for case in CASES[mode]:
        kind, _, layout = case.rpartition(":")
        for r, result in enumerate(ranks):
            assert result[case]["data"] == DATA[layout][r], case
        if kind == "refuse":  # a gradient still Partial, or placed otherwise than its parameter: refused, saying why
            for result in ranks:
                partial, other = result[case]["reasons"]
                assert "clip='agc'" in partial and "still Partial" in partial and "redistribute" in partial
                assert "placed (Replicate(),) but its parameter (Shard(dim=0),)" in other and "redistribute" in other
            continue
        if kind == "value":  # FSDP1 NO_SHARD: every rank holds whole parameters, counted once in the post-clip norm
            from tp_script import CLIP_VALUE, make_model

            model = make_model()
            x, y = _union_batch(layout, 0)
            nn.functional.mse_loss(model(x), y).backward()
            norm = torch.cat([p.grad.double().clamp(-CLIP_VALUE, CLIP_VALUE).reshape(-1) for p in model.parameters()])
            assert all(r[case]["clipped_norm"] == pytest.approx(norm.norm().item(), rel=1e-5) for r in ranks)
            continue
        if kind == "deferred":
            _check_deferred(case, layout, ranks)
            continue
        (_check_agc if kind else _check_training)(layout, tmp_path, ranks)


def test_lightning_model_parallel_strategy_fsdp2_x_tp_on_four_processes(tmp_path):
    """``Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2))`` with the
    parallelisation in ``configure_model``: the monitor's records, the same on every rank, equal a float64 reference
    of the whole gradients the optimizer receives (all-gathered by DTensor itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)])}
    proc = subprocess.run([sys.executable, str(HERE / "tp_lightning_script.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["records"] for r in range(4)]
    assert all(r == ranks[0] for r in ranks) and len(ranks[0]) == 2
    for step, rec in enumerate(ranks[0]):
        batches = [torch.load(tmp_path / f"batch_rank{r}_step{step}.pt") for r in range(4)]
        for r in (0, 2):  # tensor-parallel peers see the same batch
            assert torch.equal(batches[r][0], batches[r + 1][0]) and torch.equal(batches[r][1], batches[r + 1][1])
        grads, params = torch.load(tmp_path / f"full_step{step}.pt")
        ref = reference(grads, params)
        assert rec["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
        assert rec["param_norm"] == pytest.approx(ref["param_norm"], rel=1e-5)
        assert rec["zero_frac"] == pytest.approx(ref["zero_frac"], abs=1e-12)
        assert list(rec["layers"]) == list(ref["layers"])
        dead = {}
        for name, g in grads.items():
            if g.ndim >= 2:
                dead[name.rsplit(".", 1)[0]] = float((g == 0).all(dim=1).sum()) / g.shape[0]
        assert dead["model.blocks.0.w1"] > 0  # (the dead hidden unit: a ColwiseParallel row)
        for name, (grad_norm, param_norm, zero_frac, max_abs, dead_frac) in rec["layers"].items():
            r = ref["layers"][name]
            assert grad_norm == pytest.approx(r["grad_norm"], rel=1e-5), name
            assert param_norm == pytest.approx(r["param_norm"], rel=1e-5), name
            assert zero_frac == pytest.approx(r["zero_frac"], abs=1e-12), name
            assert max_abs == pytest.approx(r["max_abs"], rel=1e-6), name
            if name in dead:
                assert dead_frac == pytest.approx(dead[name], abs=1e-12), name
