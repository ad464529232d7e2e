"""The kernels on bare tensors against float64 references, and the engine's named pack (no Trainer)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_gradhealth import GradStatsEngine, build_layout
from lightning_gradhealth import pack as pack_module
from lightning_gradhealth.engine import Pack, PackValues, StepMeta
from lightning_gradhealth.kernels import (
    SCRATCH_MIN,
    accum_dtype,
    foreach_norm_f32_or_wider,
    foreach_norms,
    full_stats,
    layer_maxes,
    layer_sums,
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
