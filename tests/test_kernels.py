"""The kernels on bare tensors against float64 references, and the engine's named pack (no Trainer)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_gradhealth import GradStatsEngine, build_layout
from lightning_gradhealth.stats import horizontal
from lightning_gradhealth.stats import pack as pack_module
from lightning_gradhealth.stats.engine import Pack, PackValues, StepMeta
from lightning_gradhealth.stats.horizontal import gradient_stats, horizontal_stats, use_horizontal
from lightning_gradhealth.stats.kernels import (
    SCRATCH_MIN,
    accum_dtype,
    foreach_norm_f32_or_wider,
    foreach_norms,
    full_stats,
    layer_maxes,
    layer_sums,
    nonzero_and_dead_rows,
    stat_grads,
)

# float32 accumulation against float64: a few ulps times log2(n) in whatever order the CPU's kernels sum; 1e-5
# holds on any CPU (1e-6 does not), for every statistic that is a sum. Maxima and minima pick a value: exact.
REL = 1e-5


def _tensors(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(7,), (33, 65), (SCRATCH_MIN + 3,), (0,), (4, 1, 3)]  # the large one takes the buffered CPU path
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen) * 3
        t[torch.rand(shape, generator=gen) < 0.25] = 0
        out.append(t.to(dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("order", [1.0, 2.0, 3.0, math.inf])
def test_foreach_norms_match_float64_norms(dtype, order):
    tensors = _tensors(dtype)
    norms = foreach_norms(tensors, order)
    assert norms.shape == (len(tensors),)
    assert norms.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for t, norm in zip(tensors, norms.tolist(), strict=True):
        ref = torch.linalg.vector_norm(t.double(), order).item() if t.numel() else 0.0  # empty: 0, also for inf
        assert norm == pytest.approx(ref, rel=REL, abs=0.0)


def test_foreach_norm_widens_everything_when_a_tensor_is_float64():
    tensors = [torch.randn(100, dtype=torch.float64), torch.randn(50).half(), torch.randn(20)]
    norms = foreach_norm_f32_or_wider(tensors, 2.0)
    assert [n.dtype for n in norms] == [torch.float64] * 3
    for t, norm in zip(tensors, norms, strict=True):
        assert norm.item() == pytest.approx(t.double().norm().item(), rel=REL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scale", [None, 1024.0])
def test_full_stats_match_float64_reference(dtype, scale):
    tensors = _tensors(dtype)
    inv = None if scale is None else torch.tensor(1.0 / scale, dtype=torch.float64)
    scratch: dict = {}
    max_abs, neg_min, sums, squares = full_stats(tensors, torch.float64, inv, scratch=scratch)
    assert scratch or dtype == torch.float64  # the buffer is kept for the next call
    div = 1.0 if scale is None else scale  # a power of two: divides exactly
    for k, t in enumerate(tensors):
        a = t.double().abs()
        if t.numel() == 0:  # the neutral values
            assert (max_abs[k].item(), neg_min[k].item(), sums[k].item(), squares[k].item()) == (0, -math.inf, 0, 0)
            continue
        assert max_abs[k].item() == a.max().item() / div
        assert -neg_min[k].item() == a[a != 0].min().item() / div
        # a sum may cancel: its error is relative to the sum of magnitudes
        assert sums[k].item() == pytest.approx(t.double().sum().item() / div, abs=REL * a.sum().item() / div)
        assert squares[k].item() == pytest.approx(a.square().sum().item() / div**2, rel=REL)


def test_full_stats_reuses_given_l2_norms():
    tensors = _tensors(torch.float32)
    l2 = torch.tensor([3.0, 0.5, 2.0, 0.0, 1.0], dtype=torch.float64)
    *_, squares = full_stats(tensors, torch.float64, None, l2)
    assert squares.tolist() == [9.0, 0.25, 4.0, 0.0, 1.0]


def test_layer_sums_and_maxes():
    values = torch.tensor([1.0, 2.0, 4.0, math.nan, 8.0], dtype=torch.float64)
    index = torch.tensor([0, 2, 0, 3, 2])
    assert layer_sums(values[:3], index[:3], 4).tolist() == [5.0, 0.0, 2.0, 0.0]
    weight = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)  # the second tensor counted elsewhere
    assert layer_sums(values[:3], index[:3], 4, weight).tolist() == [5.0, 0.0, 0.0, 0.0]
    maxes = layer_maxes(values, index, 5, neutral=-math.inf).tolist()
    assert maxes[:3] + maxes[4:] == [4.0, -math.inf, 8.0, -math.inf] and math.isnan(maxes[3])


def test_sparse_gradient_is_read_as_its_coalesced_rows_in_float32():
    emb = nn.Embedding(10, 3, sparse=True).half()
    emb(torch.tensor([1, 4, 1, 1])).float().sum().backward()  # row 1 three times: summed
    layout = build_layout(emb.named_parameters(), sparse_grads=[emb.weight])
    (values,) = stat_grads(layout, layout.with_grad())
    assert values.dtype == torch.float32 and values.shape == (2, 3)
    dense = emb.weight.grad.to_dense().double()
    assert values.double().tolist() == dense[[1, 4]].tolist()


def test_accumulation_dtype():
    assert accum_dtype(torch.device("cpu")) == torch.float64
    assert accum_dtype(torch.device("mps")) == torch.float32  # MPS has no float64


# ---------------------------------------------------------------------------------------------- the named pack
def _pack(offset: float) -> Pack:
    pack = Pack()
    pack.add_sum("counts", torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) + offset)
    pack.add_max("largest", torch.tensor([offset, -offset], dtype=torch.float64))
    pack.add_sum("hidden", torch.tensor(10.0 + offset, dtype=torch.float64), send=False)
    pack.add_max("peak", torch.tensor(offset, dtype=torch.float64))
    return pack


def test_pack_round_trips_by_name():
    pack = _pack(0.5)
    pack.reduce(None)  # unsharded: nothing combined, no collective
    pack.add("derived", pack["hidden"] * 2)
    packed, schema = pack.build()
    assert schema == (("counts", 3), ("largest", 2), ("peak", 1), ("derived", 1))  # "hidden" is not sent
    host = PackValues(schema, [*packed.tolist(), 99.0])  # what follows the pack (extras) is not read
    assert host.get("counts") == [1.5, 2.5, 3.5]
    assert host.get("largest") == [0.5, -0.5]
    assert host.scalar("peak") == 0.5 and host.scalar("derived") == 21.0
    assert "hidden" not in host and "counts" in host
    with pytest.raises(ValueError):
        host.scalar("counts")  # not a scalar
    with pytest.raises(ValueError):
        pack.add("counts", torch.zeros(3))  # one entry per name


def test_pack_single_entry_is_sent_without_a_copy():
    pack = Pack()
    total = torch.tensor(3.0)
    pack.add("total_norm", total)
    packed, schema = pack.build()
    assert schema == (("total_norm", 1),) and packed.data_ptr() == total.data_ptr()


def test_pack_sums_sums_and_maxes_maxes_in_one_collective(monkeypatch):
    """Two ranks faked: each rank's vectors are what its own reduce sends; the collective sums and maxes them."""
    sent: list[tuple[torch.Tensor, torch.Tensor]] = []

    def capture(sums, maxes, group):
        sent.append((sums.clone(), maxes.clone()))
        return sums, maxes

    monkeypatch.setattr(pack_module, "reduce_sum_max", capture)
    _pack(4.0).reduce(group=object())  # the other rank: what it sends
    (other_sums, other_maxes), calls = sent[0], []

    def two_ranks(sums, maxes, group):
        calls.append(group)
        return sums + other_sums, torch.maximum(maxes, other_maxes)

    monkeypatch.setattr(pack_module, "reduce_sum_max", two_ranks)
    pack = _pack(1.0)
    pack.add("kept", torch.tensor(7.0, dtype=torch.float64))  # already combined: left alone
    pack.reduce(group=object())
    assert len(calls) == 1  # ONE collective for every sum and maximum
    assert pack["counts"].tolist() == [2.0 + 5.0, 3.0 + 6.0, 4.0 + 7.0]
    assert pack["largest"].tolist() == [4.0, -1.0]
    assert pack["hidden"].item() == 11.0 + 14.0 and pack["hidden"].shape == ()
    assert pack["peak"].item() == 4.0 and pack["peak"].shape == ()
    assert pack["kept"].item() == 7.0


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("stats", ["basic", "full"])
def test_engine_sends_what_finish_reads(per_layer, stats):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model(torch.randn(3, 4)).sum().backward()
    eng = GradStatsEngine(stats=stats, per_layer=per_layer)
    pending = eng.compute(build_layout(model.named_parameters()))
    names = [name for name, _ in pending.schema]
    head = ["total_norm", "total_param_norm", "total_nonzero", "max_layer_norm", "min_layer_norm", "num_ratio_layers"]
    assert set(head) <= set(names)
    layer_names = {"grad_norm", "param_norm", "nonzero"} | (
        {"sum", "sum_squares", "max_abs", "min_abs_nonzero"} if stats == "full" else set()
    )
    assert (layer_names <= set(names)) if per_layer else not (layer_names & set(names))
    assert pending.packed.numel() == sum(length for _, length in pending.schema)
    rec = eng.finish(pending, StepMeta())
    assert len(rec.layers) == (2 if per_layer else 0)
    ref = math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))
    assert rec.total_norm == pytest.approx(ref, rel=REL)


# ---------------------------------------------------------------------------------------------- multi-tensor path
def _mixed() -> list[torch.Tensor]:
    """Every case the multi-tensor path meets: dtypes, empties, 0-d, views, dead rows, NaN, ±inf, -0.0."""
    gen = torch.Generator().manual_seed(0)

    def make(shape, dtype=torch.float32, dead=()):
        t = torch.randn(shape, generator=gen) * 3
        t[torch.rand(shape, generator=gen) < 0.4] = 0
        for r in dead:
            t[r] = 0
        return t.to(dtype)

    tensors = [
        make((33, 65), dead=(0, 5)), make((7,), torch.bfloat16), make((0,)), make((4, 1, 3), torch.float16, (1,)),
        make((20, 30), torch.float64, (2,)), make((200, 30), dead=(4,)).t(), torch.tensor(2.0), make((0, 5)),
        make((16, 3, 3, 3), torch.bfloat16, (2, 7)).permute(0, 2, 3, 1), make((64, 64), torch.float16, (9,)),
        make((64, 64), dead=range(64)), make((300,)), make((5, 0)), make((40, 65), torch.bfloat16, (39,)),
    ]  # fmt: skip
    tensors[0][10, 3] = math.nan  # a NaN row is not dead; the tensor's extremes are NaN
    tensors[9][1, 0] = -0.0  # -0.0 is zero
    tensors[11][5], tensors[11][6] = math.inf, -math.inf
    return tensors


def _dead_rows(t: torch.Tensor) -> int:
    return int((t.double().reshape(t.shape[0], -1) == 0).all(dim=1).sum()) if t.dim() >= 2 and t.numel() else 0


def _check_against_reference(tensors, units, counts, dead, extremes):
    """Exact counts, dead rows and extremes; sums within float32 accumulation of the float64 reference."""
    max_abs, neg_min, sums = extremes
    assert counts.dtype == dead.dtype == max_abs.dtype == neg_min.dtype == sums.dtype == torch.float64
    assert counts.tolist() == [torch.count_nonzero(t).item() for t in tensors]
    assert dead.tolist() == [_dead_rows(t) if u else 0 for t, u in zip(tensors, units, strict=True)]
    per_tensor = nonzero_and_dead_rows(tensors, units, {})
    assert counts.tolist() == per_tensor[0].tolist() and dead.tolist() == per_tensor[1].tolist()
    for k, t in enumerate(tensors):
        a = t.double().abs()
        if t.numel() == 0:  # the neutral values
            assert (max_abs[k].item(), neg_min[k].item(), sums[k].item()) == (0.0, -math.inf, 0.0)
        elif torch.isnan(a).any():
            assert math.isnan(max_abs[k].item()) and math.isnan(neg_min[k].item())
        else:  # extremes pick a value: exact; a sum may cancel: its error is relative to the sum of magnitudes
            assert max_abs[k].item() == a.max().item()
            assert -neg_min[k].item() == (a[a != 0].min().item() if a.any() else math.inf)  # all zero: none
            expected = t.double().sum().item()
            if math.isfinite(expected):
                assert sums[k].item() == pytest.approx(expected, abs=REL * a.sum().item())
            else:
                assert math.isnan(sums[k].item())  # inf - inf


# blocks: one row per block and rows split across blocks; rows of 65 wider than the block (per-tensor fallback);
# everything in one block
@pytest.mark.parametrize("block", [64, 300, 2**16])
def test_multi_tensor_path_matches_the_float64_reference_and_the_per_tensor_path(block):
    tensors = _mixed()
    units = [k % 3 != 1 for k in range(len(tensors))]
    plans: dict = {}
    for _ in range(2):  # the second call reuses the plan
        counts, dead, extremes = horizontal_stats(tensors, units, True, {}, plans, block=block, fused=False)
    assert len(plans) == 1
    _check_against_reference(tensors, units, counts, dead, extremes)
    assert horizontal_stats(tensors, None, False, {}, None, block=block)[1:] == (None, None)


# The fused kernel runs on CPU tensors through Triton's interpreter, which is chosen when triton is first imported
# (TRITON_INTERPRET=1): the tests below run in a child pytest that sets it (test_triton_interpreter_runs_...).
INTERPRETED = horizontal.fused_available(torch.device("cpu"))
in_interpreter = pytest.mark.skipif(not INTERPRETED, reason="run by test_triton_interpreter_runs_the_fused_tests")


def test_triton_interpreter_runs_the_fused_tests():
    pytest.importorskip("triton")
    if INTERPRETED:
        pytest.skip("this is the child run")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n0", __file__, "-k", "fused_triton"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout, done.stdout  # run, not skipped


@pytest.fixture
def triton_kernels(monkeypatch):
    """The kernel module (which imports Triton), its use not disabled by an earlier test."""
    monkeypatch.setitem(horizontal._FUSED, "disabled", False)
    from lightning_gradhealth.stats import triton_kernels
    return triton_kernels


@in_interpreter
@pytest.mark.parametrize("block", [300, 2**16])
def test_fused_triton_kernel_matches_the_float64_reference(triton_kernels, monkeypatch, block):
    monkeypatch.setattr(horizontal, "DIRECT_MIN", 1000)  # contiguous tensors of 1000+ read where they lie
    calls = []
    row_stats = triton_kernels.row_stats
    monkeypatch.setattr(triton_kernels, "row_stats", lambda view: calls.append(view) or row_stats(view))
    wide = torch.randn(3, 2500, generator=torch.Generator().manual_seed(2))  # rows read in several chunks
    wide[wide.abs() < 0.5] = 0
    wide[1] = 0
    tensors = [*_mixed(), wide, wide.t()]
    units = [True] * len(tensors)
    plans: dict = {}
    counts, dead, extremes = horizontal_stats(tensors, units, True, {}, plans, block=block)  # fused where available
    (plan,) = plans.values()
    wide_direct = block >= wide.shape[1]  # else its rows do not fit a block: per tensor
    assert len(calls) == len(plan.blocks) and sum(direct for _, direct, _ in plan.blocks) == 4 + wide_direct
    _check_against_reference(tensors, units, counts, dead, extremes)


@in_interpreter
def test_a_failing_fused_triton_kernel_is_disabled_and_the_eager_kernels_answer(triton_kernels, monkeypatch):
    def broken(view):
        raise RuntimeError("no such GPU")

    monkeypatch.setattr(triton_kernels, "row_stats", broken)
    tensors = _mixed()
    units = [True] * len(tensors)
    with pytest.warns(UserWarning, match="fused Triton kernel disabled"):
        counts, dead, extremes = horizontal_stats(tensors, units, True, {}, {})
    assert not horizontal.fused_available(torch.device("cpu"))
    _check_against_reference(tensors, units, counts, dead, extremes)


def test_multi_tensor_counts_read_large_tensors_in_place(monkeypatch):
    monkeypatch.setattr(horizontal, "DIRECT_MIN", 1000)  # five float32/16 tensors of 1000+ read where they lie
    tensors = _mixed()
    units = [True] * len(tensors)
    plans: dict = {}
    counts, dead, extremes = horizontal_stats(tensors, units, False, {}, plans)
    (plan,) = plans.values()
    assert sum(direct for _, direct, _ in plan.blocks) == 5 and extremes is None
    assert counts.tolist() == [torch.count_nonzero(t).item() for t in tensors]
    assert dead.tolist() == [_dead_rows(t) for t in tensors]


@pytest.mark.parametrize("scale", [None, 1024.0])
def test_gradient_stats_paths_agree_with_a_loss_scale(scale, monkeypatch):
    """Multi-tensor, CPU (small tensors' extremes in blocks) and plain per-tensor ``full_stats``: the same numbers."""
    tensors = [t for t in _mixed() if not torch.isnan(t).any() and not torch.isinf(t).any()]
    inv = None if scale is None else torch.tensor(1.0 / scale, dtype=torch.float64)
    units = [True] * len(tensors)
    _, c1, d1, f1 = gradient_stats(tensors, units, True, 2.0, inv, {}, {}, horizontal=True)
    blocked = []
    monkeypatch.setattr(horizontal, "horizontal_stats", lambda *a, **k: blocked.append(a) or horizontal_stats(*a, **k))
    _, c0, d0, f0 = gradient_stats(tensors, units, True, 2.0, inv, {}, None, horizontal=False)
    assert len(blocked) == 1 and len(blocked[0][0]) == 8  # the CPU's small tensors' extremes, in blocks
    plain = full_stats(tensors, torch.float64, inv)  # per tensor throughout
    assert c1.tolist() == c0.tolist() and d1.tolist() == d0.tolist()
    magnitude = torch.stack([t.double().abs().sum() for t in tensors]) * (1.0 if scale is None else 1.0 / scale)
    for f in (f1, f0):
        assert f[0].tolist() == plain[0].tolist() and f[1].tolist() == plain[1].tolist()  # extremes: exact
        assert torch.all((f[2] - plain[2]).abs() <= REL * magnitude)
        assert torch.allclose(f[3], plain[3], rtol=REL, atol=0.0)
    assert use_horizontal(torch.device("cpu")) is False and use_horizontal(torch.device("cuda", 0)) is True


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("order", [2.0, 1.0])
def test_gradient_stats_on_the_cpu_read_large_tensors_once_and_match_the_reference(full, order):
    """Large float32/16 tensors one at a time (cache-resident), the rest grouped: norms, counts, dead rows,
    extremes and sums against float64, in the order given, next to the multi-tensor path."""
    gen = torch.Generator().manual_seed(1)
    large = [torch.randn(256, 256, generator=gen), torch.randn(300, 300, generator=gen).bfloat16().t()]
    large += [torch.randn(SCRATCH_MIN + 5, generator=gen).half(), torch.randn(512, 8, 16, generator=gen)]
    for t in large:
        t[torch.rand(t.shape, generator=gen) < 0.3] = 0
    large[0][[3, 200]] = 0  # dead rows
    large[3][7] = 0
    large[1][5, 5] = math.nan
    tensors = [large[0], *_mixed()[:5], large[1], large[2], large[3]]
    units = [True] * len(tensors)
    norms, counts, dead, stats = gradient_stats(tensors, units, full, order, None, {}, {}, horizontal=False)
    h_norms, h_counts, h_dead, h_stats = gradient_stats(tensors, units, full, order, None, {}, {}, horizontal=True)
    torch.testing.assert_close(norms, h_norms, rtol=0, atol=0, equal_nan=True)  # the same norm kernel
    assert counts.tolist() == h_counts.tolist() and dead.tolist() == h_dead.tolist()
    for k, t in enumerate(tensors):
        ref = torch.linalg.vector_norm(t.double(), order).item()
        assert norms[k].item() == pytest.approx(ref, rel=REL, nan_ok=True)
    extremes = stats[:3] if full else (torch.zeros(len(tensors)),) * 3
    if full:
        _check_against_reference(tensors, units, counts, dead, extremes)
        for a, b in zip(stats[:2], h_stats[:2], strict=True):  # extremes: exact on both paths
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert stats is None and counts.tolist() == [torch.count_nonzero(t).item() for t in tensors]
        assert dead.tolist() == [_dead_rows(t) for t in tensors]
