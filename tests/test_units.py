"""Dead units: rows (output features, output channels) of 2-D+ gradients that are entirely zero, per layer.

Every count is checked exactly against a float64/bool reference built here from the captured gradients: a unit is
a row along dim 0 of a parameter with two dimensions or more, dead when every entry of its gradient row is 0.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from conftest import Capture, Records, TinyMLP, loader, make_trainer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F

from lightning_gradhealth import GradientHealth, GradientHealthMonitor, GradStatsEngine, build_layout
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.model.layout import layer_name
from lightning_gradhealth.schema.metrics import (
    GRAD_DEAD_UNITS,
    LAYER_KEYS,
    LOSS,
    MetricKey,
    metric_key,
    metrics_to_record,
    parse_key,
    record_to_metrics,
)
from lightning_gradhealth.schema.record import LayerStats, StepStats
from lightning_gradhealth.stats.engine import StepMeta
from lightning_gradhealth.stats.kernels import SCRATCH_MAX, SCRATCH_MIN, nonzero_and_dead_rows, nonzero_counts

HERE = Path(__file__).parent


# ---------------------------------------------------------------------------------------------- references
def dead_rows(g: torch.Tensor) -> int:
    """Rows along dim 0 whose entries are all exactly zero (bool reference, float64 copy)."""
    return int((g.double().reshape(g.shape[0], -1) == 0).all(dim=1).sum())


def unit_reference(grads: Mapping[str, torch.Tensor], group_by: str = "module") -> dict[str, tuple[int, int] | None]:
    """Per layer: ``(dead, units)`` over its 2-D+ gradients, or ``None`` without any."""
    out: dict[str, tuple[int, int] | None] = {}
    for name, g in grads.items():
        layer = layer_name(name, group_by)
        out.setdefault(layer, None)
        if g.ndim >= 2 and g.numel():
            dead, units = out[layer] or (0, 0)
            out[layer] = (dead + dead_rows(g), units + g.shape[0])
    return out


def assert_units(record: StepStats, ref: Mapping[str, tuple[int, int] | None]) -> None:
    assert [lay.name for lay in record.layers] == list(ref)
    for lay in record.layers:
        expected = ref[lay.name]
        if expected is None:
            assert lay.units is None and lay.dead_unit_frac is None and lay.dead_units is None, lay.name
        else:
            dead, units = expected
            assert (lay.dead_units, lay.units) == (dead, units), lay.name
            assert lay.dead_unit_frac == dead / units, lay.name  # exact: a ratio of exact integers


def engine_record(model: nn.Module, **engine_kwargs) -> StepStats:
    engine = GradStatsEngine(**engine_kwargs)
    pending = engine.compute(build_layout(model.named_parameters()))
    assert pending is not None
    return engine.finish(pending, StepMeta())


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


# ---------------------------------------------------------------------------------------------- models
class DeadMLP(nn.Module):
    """Linear + ReLU where the units ``dead`` of the first layer never activate (bias -100)."""

    def __init__(self, width: int = 16, dead: tuple[int, ...] = (0, 3, 4, 9, 15), inputs: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, 4)
        with torch.no_grad():
            self.fc1.bias.fill_(1.0)  # every other unit is active on some sample
            self.fc1.bias[list(dead)] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    model(x).float().square().mean().backward()


# ---------------------------------------------------------------------------------------------- engine
DEAD = (0, 3, 4, 9, 15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_units_that_never_activate_are_exactly_the_dead_units(dtype):
    model = DeadMLP(dead=DEAD).to(dtype)
    backward(model, torch.randn(32, 8).to(dtype))
    grads = grads_of(model)
    ref = unit_reference(grads)
    # the set-up does what it says: exactly those rows of fc1's weight have a zero gradient, fc2 has none dead
    assert torch.equal((grads["fc1.weight"] == 0).all(1).nonzero().flatten(), torch.tensor(DEAD))
    assert ref == {"fc1": (len(DEAD), 16), "fc2": (0, 4)}
    record = engine_record(model)
    assert_units(record, ref)
    assert record.layer("fc1").dead_units == len(DEAD)
    assert record.layer("fc2").dead_units == 0  # its input columns 0, 3, ... are zero: zero entries, live rows
    assert record.layer("fc2").zero_frac > 0
    metrics = record_to_metrics(record)
    assert metrics[metric_key(GRAD_DEAD_UNITS, "fc1")] == len(DEAD) / 16
    assert metrics[metric_key(GRAD_DEAD_UNITS, "fc2")] == 0.0


@pytest.mark.parametrize("stats", ["basic", "full"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_every_counting_path_gives_the_reference(stats, norm_type):
    """Small tensors copied together (by row length, 1-D and 2-D+), mid-size ones through the buffer, one larger
    than the buffer, a transposed and a 4-D gradient, a float64 tensor, empty and 0-d parameters."""
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "small": nn.Linear(8, 16),  # grouped small path
            "small_too": nn.Linear(8, 16),  # same row length: the same block
            "mid": nn.Linear(512, 256),  # 131K entries: buffered
            "large": nn.Linear(SCRATCH_MAX // 1024 + 1, 1024, bias=False),  # > SCRATCH_MAX: count_nonzero per row
            "conv": nn.Conv2d(3, 8, 3),
        }
    )
    # weight (4, 0): no entries, hence no units (its bias has entries)
    model["empty"] = nn.ParameterDict({"weight": nn.Parameter(torch.ones(4, 0)), "bias": nn.Parameter(torch.ones(4))})
    model.register_parameter("scale", nn.Parameter(torch.ones(())))  # 0-d: a layer of its own, no units
    model.register_parameter("wide", nn.Parameter(torch.ones(5, 7, dtype=torch.float64)))  # float64: per tensor
    gen = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen).to(p.dtype)
        g[torch.rand(p.shape, generator=gen) < 0.5] = 0
        if p.ndim >= 2 and p.shape[0] > 3 and p.numel():
            g[1] = 0  # dead rows, one of them with a -0.0
            g[3] = 0
            g.view(p.shape[0], -1)[3, 0] = -0.0
            if p.shape[0] > 5:
                g.view(p.shape[0], -1)[5, -1] = float("nan") if name == "mid.weight" else 1e-30  # not dead
                g.view(p.shape[0], -1)[5, :-1] = 0
        p.grad = g
    model["mid"].weight.grad = model["mid"].weight.grad.t().contiguous().t()  # non-contiguous: still its rows
    record = engine_record(model, stats=stats, norm_type=norm_type)
    ref = unit_reference(grads_of(model))
    assert ref["large"] == (2, 1024) and ref["mid"] == (2, 256) and ref["empty"] is None
    assert_units(record, ref)


def test_a_convolution_on_1x1_feature_maps_has_no_dead_units_though_most_entries_are_zero():
    """The false alarm this statistic removes: a 3x3 kernel with padding 1 on 1x1 maps only ever sees zero
    padding in 8 of its 9 taps, so ~8/9 of its gradient entries are exactly zero, yet every channel learns."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1))
    with torch.no_grad():
        model[0].bias.fill_(0.5)  # every channel active on some sample
    backward(model, torch.randn(16, 16, 1, 1))
    grads = grads_of(model)
    ref = unit_reference(grads)
    assert ref == {"0": (0, 32), "2": (0, 8)}
    record = engine_record(model)
    assert_units(record, ref)
    for name in ("0", "2"):
        assert record.layer(name).zero_frac >= 8 / 9 * (grads[f"{name}.weight"].numel() / record.layer(name).numel)
        assert record.layer(name).dead_unit_frac == 0.0


def test_a_convolution_with_dead_output_channels_counts_channels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        model[0].bias.fill_(0.5)
        model[0].bias[[2, 6]] = -1e4
    backward(model, torch.randn(4, 3, 5, 5))
    ref = unit_reference(grads_of(model))
    assert ref == {"0": (2, 8), "2": (0, 2)}
    assert_units(engine_record(model), ref)


def test_layers_without_a_2d_parameter_have_no_units_and_log_no_key():
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.ln = nn.LayerNorm(6)
            self.bn = nn.BatchNorm1d(6)
            self.shift = nn.Parameter(torch.zeros(6))  # a bias alone (a layer of its own under "module")

        def forward(self, x):
            return self.bn(self.ln(self.fc(x))) + self.shift

    model = Net()
    backward(model, torch.randn(8, 6))
    ref = unit_reference(grads_of(model))
    assert ref["ln"] is None and ref["bn"] is None and ref["shift"] is None
    record = engine_record(model)
    assert_units(record, ref)
    metrics = record_to_metrics(record)
    assert metric_key(GRAD_DEAD_UNITS, "fc") in metrics
    for layer in ("ln", "bn", "shift"):
        assert metric_key(GRAD_DEAD_UNITS, layer) not in metrics
    # grouped by parameter: the weight is a layer with units, its bias one without
    by_param = GradStatsEngine()
    pending = by_param.compute(build_layout(model.named_parameters(), group_by="parameter"))
    rec = by_param.finish(pending, StepMeta())
    assert rec.layer("fc.weight").units == 6 and rec.layer("fc.bias").units is None


def test_without_per_layer_statistics_nothing_is_counted():
    model = DeadMLP()
    backward(model, torch.randn(8, 8))
    record = engine_record(model, per_layer=False)
    assert record.layers == ()


def test_a_sparse_gradient_has_no_units():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(50, 4, sparse=True), "dense": nn.Embedding(50, 4)})
    idx = torch.tensor([1, 2, 2, 7])
    (model["emb"](idx).sum() + model["dense"](idx).sum()).backward()
    layout = build_layout(model.named_parameters(), sparse_grads=[model["emb"].weight])
    engine = GradStatsEngine()
    record = engine.finish(engine.compute(layout), StepMeta())
    assert record.layer("emb").units is None and record.layer("emb").dead_unit_frac is None
    # the dense embedding's untouched rows are dead units (the rules decide what to ignore by layer kind)
    assert (record.layer("dense").dead_units, record.layer("dense").units) == (47, 50)


# ---------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dead_rows_and_counts_of_bare_tensors_match_the_reference(dtype):
    gen = torch.Generator().manual_seed(0)

    def make(shape, dead=()):
        t = torch.randn(shape, generator=gen)
        t[torch.rand(shape, generator=gen) < 0.5] = 0
        for r in dead:
            t[r] = 0
        return t.to(dtype)

    tensors = [
        make((7,)), make((33, 65), (0, 5)), make((SCRATCH_MIN + 3,)), make((0,)), make((4, 1, 3), (1,)),
        make((300, 400), (3, 299)), make((64, 64), (1,)), make((64, 64)), make((64,)), make((64,)), make((0, 5)),
        make((5, 0)), make((16, 3, 3, 3), (2, 7)), make((200, 300), (4,)).t(), torch.tensor(0.0, dtype=dtype),
        torch.tensor(1.0, dtype=dtype), make((8, 8), range(8)), make((SCRATCH_MIN // 2, 3), (0, 11)),
    ]  # fmt: skip
    tensors[5][10, 3] = float("nan")  # a NaN row is not dead
    tensors[6][1, 0] = -0.0  # -0.0 is zero
    scratch: dict = {}
    for units in ([True] * len(tensors), [k % 2 == 0 for k in range(len(tensors))], [False] * len(tensors)):
        for order in (list(range(len(tensors))), list(range(len(tensors)))[::-1]):
            group = [tensors[k] for k in order]
            marks = [units[k] for k in order]
            counts, dead = nonzero_and_dead_rows(group, marks, scratch)
            assert counts.dtype == dead.dtype == torch.float64
            assert counts.tolist() == [torch.count_nonzero(t).item() for t in group]
            assert dead.tolist() == [
                dead_rows(t) if u and t.ndim >= 2 and t.numel() else 0 for t, u in zip(group, marks, strict=True)
            ]
            assert nonzero_counts(group, scratch).tolist() == counts.tolist()
            assert nonzero_and_dead_rows(group, None, scratch)[1] is None


def test_many_small_tensors_beyond_one_buffer_are_counted_in_blocks():
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(SCRATCH_MIN - 1, 8, generator=gen)[: (SCRATCH_MIN - 1) // 8] for _ in range(600)]
    for k, t in enumerate(tensors):
        t[k % t.shape[0]] = 0
    counts, dead = nonzero_and_dead_rows(tensors, [True] * len(tensors), {})
    assert sum(t.numel() for t in tensors) > SCRATCH_MAX  # more than one block
    assert counts.tolist() == [torch.count_nonzero(t).item() for t in tensors]
    assert dead.tolist() == [dead_rows(t) for t in tensors]


# ---------------------------------------------------------------------------------------------- keys, history
def test_the_key_is_parsed_and_read_back():
    key = metric_key(GRAD_DEAD_UNITS, "net.0", 1)
    assert key == "grad_dead_units/net.0/opt1"
    assert parse_key(key) == MetricKey(GRAD_DEAD_UNITS, "net.0", 1)
    assert GRAD_DEAD_UNITS in LAYER_KEYS["units"]
    layers = (
        LayerStats(name="a", numel=1, grad_norm=1.0, param_norm=math.nan, ratio=0.1, zero_frac=0.5, units=8,
                   dead_unit_frac=0.25),
        LayerStats(name="b", numel=1, grad_norm=1.0, param_norm=math.nan, ratio=0.1, zero_frac=0.5),
    )  # fmt: skip
    assert layers[0].dead_units == 2 and layers[1].dead_units is None
    record = StepStats(step=3, global_step=3, epoch=0, batch_idx=0, optimizer_idx=0, total_norm=1.0, param_norm=2.0,
                       zero_frac=0.5, nan_count=0, inf_count=0, layer_norm_ratio=1.0, no_grad_count=0, layers=layers,
                       loss=0.5)  # fmt: skip
    metrics = record_to_metrics(record)
    assert metrics["grad_dead_units/a"] == 0.25 and "grad_dead_units/b" not in metrics
    assert LOSS == "grad_health/loss" and LOSS not in metrics  # the training loop logs its loss
    back = metrics_to_record(metrics, 3)
    assert back.layer("a").dead_unit_frac == 0.25 and back.layer("a").units is None  # units are not logged
    assert back.layer("b").dead_unit_frac is None
    assert back.loss is None
    assert metrics_to_record({**metrics, LOSS: 1.5}, 3).loss == 1.5


def _record(step, layers, loss=None, total=1.0):
    stats = tuple(
        LayerStats(name=name, numel=1, grad_norm=1.0, param_norm=1.0, ratio=1.0, zero_frac=0.0,
                   units=None if frac is None else 10, dead_unit_frac=frac)
        for name, frac in layers
    )  # fmt: skip
    return StepStats(step=step, global_step=step, epoch=0, batch_idx=0, optimizer_idx=0, total_norm=total,
                     param_norm=1.0, zero_frac=0.0, nan_count=0, inf_count=0, layer_norm_ratio=1.0, no_grad_count=0,
                     layers=stats, loss=loss)  # fmt: skip


def test_history_keeps_the_dead_unit_series_and_the_loss_merged_and_thinned():
    history = History(max_snapshots=4)
    history.add(_record(0, [("a", 0.1), ("c", None)], loss=2.0))
    history.add(_record(1, [("a", 0.2), ("b", 0.5), ("c", None)]))  # b joins between a and c
    assert history.layer_names == ["a", "b", "c"]
    assert history.layer_series("a", "dead_units") == [0.1, 0.2]
    b = history.layer_series("b", "dead_units")
    assert math.isnan(b[0]) and b[1] == 0.5
    assert all(math.isnan(v) for v in history.layer_series("c", "dead_units"))  # no units: NaN
    assert history.loss[0] == 2.0 and math.isnan(history.loss[1])
    for step in range(2, 9):
        history.add(_record(step, [("a", step / 10), ("b", 0.5), ("c", None)], loss=float(step)))
    # thinned like every other series: the same records kept
    assert history.steps == [0, 4, 8]
    assert history.layer_dead_units[0][0] == 0.1 and math.isnan(history.layer_dead_units[0][1])
    assert history.layer_dead_units[1:] == [[0.4, 0.5, pytest.approx(math.nan, nan_ok=True)],
                                            [0.8, 0.5, pytest.approx(math.nan, nan_ok=True)]]  # fmt: skip
    assert history.loss == [2.0, 4.0, 8.0]


# ---------------------------------------------------------------------------------------------- front-ends
class DeadTinyMLP(TinyMLP):
    """conftest's TinyMLP with 4 units of ``net.0`` that never activate (SGD never revives them)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.net[0].bias[[1, 5, 6, 12]] = -100.0


def test_a_trainer_run_records_and_logs_the_dead_units(tmp_path):
    monitor = GradientHealthMonitor()
    records = Records(monitor)
    capture = Capture()
    trainer = make_trainer(tmp_path, callbacks=[monitor, records, capture], max_steps=6, log_every_n_steps=2)
    trainer.fit(DeadTinyMLP(), loader())
    by_step = {r.step: r for r in records.records}
    scalars = read_scalars(trainer.logger.log_dir)
    computed = sorted(scalars["grad_health/total_norm"])
    assert computed == [1, 3, 5]
    for captured in capture.steps:
        if captured["step"] not in computed:
            continue
        record = by_step[captured["step"]]
        ref = unit_reference(captured["grads"])
        assert ref["net.0"] == (4, 16)
        assert_units(record, ref)
        for layer, (dead, units) in ref.items():
            assert scalars[f"grad_dead_units/{layer}"][record.step] == pytest.approx(dead / units, abs=1e-7)
    series = monitor.health.history.layer_series("net.0", "dead_units")
    assert series == [4 / 16] * 3


def test_gradient_health_records_logs_and_keeps_the_dead_units_and_the_loss(tmp_path):
    torch.manual_seed(0)
    model = DeadMLP(dead=DEAD)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, loggers=str(tmp_path / "tb"), log_every_n_steps=1, report=False)
    refs, losses = [], []
    for i in range(4):
        model.zero_grad()
        loss = model(torch.randn(16, 8)).square().mean()
        loss.backward()
        refs.append(unit_reference(grads_of(model)))
        losses.append(loss.item())
        health.step(opt, loss=loss)
        assert health.last_record.step == i
        assert_units(health.last_record, refs[-1])
        assert health.last_record.loss == pytest.approx(losses[-1], rel=1e-6)
        opt.step()
    health.close()
    scalars = read_scalars(tmp_path / "tb")
    assert sorted(scalars["grad_dead_units/fc1"]) == [0, 1, 2, 3]
    for step, ref in enumerate(refs):
        for layer, (dead, units) in ref.items():
            assert scalars[f"grad_dead_units/{layer}"][step] == pytest.approx(dead / units, abs=1e-7)
    assert "grad_health/loss" not in scalars
    assert health.history.layer_series("fc1", "dead_units") == [len(DEAD) / 16] * 4
    assert health.history.loss == pytest.approx(losses, rel=1e-6)


# ---------------------------------------------------------------------------------------------- sharded
_SHARDED_SCRIPT = r"""
import json, sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from lightning_gradhealth import GradStatsEngine, build_layout
from lightning_gradhealth.model.distributed import fsdp1_reduction
from lightning_gradhealth.stats.engine import StepMeta
from lightning_gradhealth.model.layout import clean_name


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5), nn.ReLU(), nn.Linear(5, 1))
    with torch.no_grad():
        net[0].bias.fill_(1.0)
        net[0].bias[[0, 2, 3, 9, 10, 15]] = -100.0  # dead on both ranks' shards (rows 0-7 and 8-15)
    return net


def run(rank, mode, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    net = model()
    reduction = None
    if mode == "fsdp2":
        from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        for m in net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)  # Linear(16, 5): 3 rows and 2; Linear(5, 1): one rank's shard empty
        fully_shard(net, mesh=mesh)
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        strategy = ShardingStrategy.NO_SHARD if mode == "fsdp1_no_shard" else ShardingStrategy.FULL_SHARD
        net = FullyShardedDataParallel(net, use_orig_params=True, device_id=torch.device("cpu"),
                                       auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), sharding_strategy=strategy)
        reduction = fsdp1_reduction(net)
    torch.manual_seed(1 + rank)
    x = torch.randn(16, 8)
    net(x).square().mean().backward()
    layout = build_layout(net.named_parameters())
    engine = GradStatsEngine()
    record = engine.finish(engine.compute(layout, reduction=reduction), StepMeta())
    if mode == "fsdp2":
        grads = {n: p.grad.full_tensor().double() for n, p in net.named_parameters()}
    else:
        grads = {clean_name(n): p.grad.double() for n, p in net.named_parameters() if p.grad is not None}
    if rank == 0:
        torch.save(grads, Path(out) / "grads.pt")
    shapes = {clean_name(n): list(p.grad.to_local().shape if mode == "fsdp2" else p.grad.shape) for n, p in net.named_parameters()
              if p.grad is not None}
    result = {"layers": {lay.name: [lay.units, lay.dead_units, lay.dead_unit_frac] for lay in record.layers},
              "shapes": shapes}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()  # (tearing gloo down while the other rank still talks aborts the process)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def _run_sharded(tmp_path: Path, mode: str) -> tuple[dict, dict, dict]:
    script = tmp_path / "units_script.py"
    script.write_text(_SHARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    return r0, r1, torch.load(tmp_path / "grads.pt")


def test_fsdp2_shards_keep_rows_whole_and_their_dead_rows_add_up(tmp_path):
    r0, r1, grads = _run_sharded(tmp_path, "fsdp2")
    assert r0["shapes"]["2.weight"][0] + r1["shapes"]["2.weight"][0] == 5  # uneven row shards
    assert [0, 5] in (r0["shapes"]["4.weight"], r1["shapes"]["4.weight"])  # and an empty one
    assert r0["layers"] == r1["layers"]
    ref = unit_reference(grads)
    assert ref["0"] == (6, 16)
    for layer, (dead, units) in ref.items():
        assert r0["layers"][layer] == [units, dead, dead / units], layer


def test_fsdp1_flat_shards_have_no_units_and_whole_parameters_count_once(tmp_path):
    r0, r1, _ = _run_sharded(tmp_path, "fsdp1")
    assert r0["layers"] == r1["layers"]
    assert all(len(shape) == 1 for shape in r0["shapes"].values())  # flat pieces: rows cut anywhere
    assert all(v == [None, None, None] for v in r0["layers"].values())
    no_shard = tmp_path / "no_shard"
    no_shard.mkdir()
    r0, r1, grads = _run_sharded(no_shard, "fsdp1_no_shard")  # whole on every rank: counted on rank 0 only
    assert r0["layers"] == r1["layers"]
    for layer, (dead, units) in unit_reference(grads).items():
        assert r0["layers"][layer] == [units, dead, dead / units], layer


# ---------------------------------------------------------------------------------------------- HF Conv1D (issue 19)
class Conv1D(nn.Module):
    """An exact copy of ``transformers.pytorch_utils.Conv1D`` (transformers is not a test dependency).

    GPT-2's linear layer: the weight is stored as (inputs, outputs), ``nx`` x ``nf``, and applied as
    ``x @ weight + bias``: its output units are the weight's columns (dim 1), not its rows.
    """

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.nx = nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)  # noqa: RUF005  (as transformers writes it)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class GPT2Block(nn.Module):
    """GPT-2's block (``ln_1``, ``attn.c_attn``/``attn.c_proj``, ``ln_2``, ``mlp.c_fc``/``mlp.c_proj``) of Conv1Ds.

    The units ``dead`` of ``mlp.c_fc`` never activate (bias -100 before a ReLU, so that their gradient is exactly
    zero): ``mlp.c_fc`` has dead outputs; ``mlp.c_proj`` has dead *inputs* (rows of its (in, out) weight) but no
    dead output.
    """

    def __init__(self, d: int = 16, heads: int = 2, dead: tuple[int, ...] = DEAD) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(3 * d, d)
        self.attn.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(4 * d, d)
        self.mlp.act = nn.ReLU()
        self.mlp.c_proj = Conv1D(d, 4 * d)
        self.head = nn.Linear(d, 3)
        with torch.no_grad():
            self.mlp.c_fc.bias.fill_(0.5)
            self.mlp.c_fc.bias[list(dead)] = -100.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.attn.c_proj(y)
        x = x + self.mlp.c_proj(self.mlp.act(self.mlp.c_fc(self.ln_2(x))))
        return self.head(x)


def conv1d_reference(model: nn.Module) -> dict[str, tuple[int, int] | None]:
    """Per layer ``(dead, units)``, counting the units of a Conv1D along dim 1 of its weight (its outputs)."""
    out: dict[str, tuple[int, int] | None] = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        layer, _, pname = name.rpartition(".")
        out.setdefault(layer, None)
        g = p.grad.detach().double()
        if g.ndim < 2:
            continue
        if isinstance(modules[layer], Conv1D):
            dead, units = int((g == 0).all(dim=0).sum()), g.shape[1]
        else:
            dead, units = dead_rows(g), g.shape[0]
        have = out[layer] or (0, 0)
        out[layer] = (have[0] + dead, have[1] + units)
    return out


def test_hf_conv1d_units_are_its_outputs_not_its_rows():
    """Issue 19: GPT-2's Conv1D (weight (in, out)): ``mlp.c_fc``'s dead outputs are found there, none in c_proj."""
    from lightning_gradhealth.model.detect import module_kind, transposed_weights

    torch.manual_seed(0)
    model = GPT2Block()
    x = torch.randn(4, 6, 16)
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    flipped = transposed_weights(model)
    assert {id(p) for p in flipped} == {id(m.weight) for m in model.modules() if isinstance(m, Conv1D)}
    assert module_kind(model.mlp.c_fc).units == 64
    ref = conv1d_reference(model)
    assert ref["mlp.c_fc"] == (len(DEAD), 64) and ref["mlp.c_proj"] == (0, 16)  # the premise
    for stats in ("basic", "full"):
        engine = GradStatsEngine(stats=stats)
        pending = engine.compute(build_layout(model.named_parameters(), transposed=flipped))
        assert pending is not None
        record = engine.finish(pending, StepMeta())
        assert_units(record, ref)
        dense = engine.finish(engine.compute(build_layout(model.named_parameters())), StepMeta())  # type: ignore[arg-type]
        assert record.total_norm == pytest.approx(dense.total_norm, rel=1e-6)  # (the transposed view changes no other statistic)
        assert [lay.zero_frac for lay in record.layers] == [lay.zero_frac for lay in dense.layers]
    # the loop API finds the layout itself (from the modules)
    health = GradientHealth(model, log_every_n_steps=1, report=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    health.step(opt, step=0)
    assert_units(health.last_record, ref)
    health.close()
