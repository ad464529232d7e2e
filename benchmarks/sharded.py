"""Sharded benchmark: the global norm of 1,000 DTensor gradients, torch's ``get_total_norm`` against ours.

Run from the repository root::

    python benchmarks/sharded.py            # under a minute on 2 CPU cores
    python benchmarks/sharded.py --quick    # fewer repetitions
    python benchmarks/sharded.py --census   # the collectives of a guarded and a logged step, and their bytes

``--census`` runs 4 CPU processes on a 2x2 ("dp", "tp") mesh: 8 residual blocks of ``Linear(64, 256)`` (ColwiseParallel)
and ``Linear(256, 64)`` (RowwiseParallel) with a LayerNorm, under ``fully_shard`` on "dp" (FSDP2 x TP, torchtitan's
layout), and counts every collective the monitor starts (by wrapping torch.distributed's functions) in a guarded step
(``engine.guard``), in a logged step with ``stats="basic"`` and ``"full"`` (``engine.compute`` + ``finish``) and in
the clipping of ``clip="agc"`` (on top of the guarded step), with the bytes each rank sends into it (the tensor's size;
an object all-gather's pickle).

Two CPU processes (``torch.multiprocessing.spawn``, gloo backend, ``MASTER_ADDR=127.0.0.1`` and a free port)
shard a network of 500 x ``nn.Linear(64, 64)`` with ReLU between (1,000 parameter tensors) with FSDP2's
``fully_shard``, one call per ``Linear`` and one on the root, over a 1-D ``DeviceMesh`` of the 2 ranks. One
forward and backward pass (batch 64, MSE loss) leaves every ``param.grad`` a DTensor placed ``Shard(0)``.
Each rank runs with ``torch.set_num_threads(1)``.

Candidates, each ending with the global value on the host, as a user needs it:

- (a) ``torch.nn.utils.get_total_norm(grads, 2.0)``, then ``.full_tensor().item()`` (the result is a
  DTensor; ``full_tensor()`` makes sure a partial placement is reduced, so that the number is the global
  norm and not this rank's local one);
- (b) ``GradStatsEngine().global_norm(grads).item()``: local ``_foreach_norm`` on the shards, one
  ``all_reduce`` over the sharding group;
- (c) ``GradStatsEngine().finish(engine.compute(layout), StepMeta())``: every per-layer statistic of the
  500 layers (gradient and parameter norms, zero counts), one ``all_reduce``, one transfer.

(b) and (c) are timed twice: as called (grad mode on) and under ``torch.no_grad()``, which is how the
callback runs them (Lightning calls ``on_before_optimizer_step`` inside ``optimizer.step``, where torch turns
grad mode off). ``get_total_norm`` disables grad mode itself. A floor row times the least a sharded global norm
can cost (``to_local()`` under ``no_grad``, one ``_foreach_norm`` on the shards, one ``all_reduce``, one
``.item()``), and two diagnostic rows time ``to_local()`` on the 1,000 gradients in both modes.

Before timing, (a) and (b) must agree to a relative 1e-5 with each other and with an unsharded reference
(every gradient gathered with ``full_tensor()``, norm taken in float64), and (c)'s total norm with it too;
the script asserts it. The first call of each candidate in the process ("cold": DTensor's sharding
propagation cache is empty) is timed separately, as is the first call of (a) on the fresh gradients of a
second backward pass (cache warm, new gradient tensors: what every later training step pays).

Warm timing: every candidate is warmed up, then each repetition runs all candidates once, round-robin from a
rotating start. Before every sample both ranks meet at a barrier; a sample is the slower rank's time (a step
waits for its slowest rank). Medians over repetitions are reported, with the inter-quartile range (IQR) as a
noise estimate. Rank 0 prints the table and the issue's target: on 1,000 DTensor gradients, the sharded
global norm must be at least 50x faster than ``get_total_norm``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time
import warnings
from collections.abc import Callable

import lightning
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard

try:
    from torch.distributed.fsdp import fully_shard
except ImportError:  # torch < 2.6
    from torch.distributed._composable.fsdp import fully_shard

from common import linear_stack  # the overhead benchmark's network (benchmarks/ is this script's directory)

from lightning_gradhealth.guard.clipping import AGCClipper
from lightning_gradhealth.model.distributed import local, resolve
from lightning_gradhealth.model.layout import build_layout
from lightning_gradhealth.model.shards import shards_of
from lightning_gradhealth.stats.engine import GradStatsEngine, StepMeta

WORLD = 2
LAYERS = 500  # 500 x Linear(64, 64): 1,000 parameter tensors
WIDTH = 64
BATCH = 64
TARGET_RATIO = 50.0  # issue: the sharded path >= 50x faster than get_total_norm on 1,000 DTensor grads
RTOL = 1e-5

ROWS: list[tuple[str, str]] = [
    ("a", "(a) get_total_norm + .full_tensor().item()"),
    ("b", "(b) ours: global_norm(grads).item()"),
    ("c", "(c) ours: finish(compute(layout)), 500 layers"),
    ("b_ng", "(b) ours, under torch.no_grad()"),
    ("c_ng", "(c) ours, under torch.no_grad()"),
    ("floor", "floor: no_grad shards, _foreach_norm, all_reduce"),
    ("d_tl", "diag: [g.to_local() for g in grads]"),
    ("d_tl_ng", "diag: the same under torch.no_grad()"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one call of ``fn``, started together on every rank."""
    dist.barrier()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(cands: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Per-repetition seconds of every candidate, this rank's view (the same call order on every rank)."""
    names = list(cands)
    for name in names:
        for _ in range(warmup):
            cands[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(timed(cands[name])[0])
    return samples


def rel(x: float, y: float) -> float:
    return abs(x - y) / max(abs(y), 1e-30)


def worker(rank: int, port: int, reps: int, warmup: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        run(rank, reps, warmup)
    finally:
        dist.destroy_process_group()


def run(rank: int, reps: int, warmup: int) -> None:
    start = time.perf_counter()
    torch.manual_seed(0)  # the same initial weights on every rank
    mesh = init_device_mesh("cpu", (WORLD,))
    net = linear_stack(LAYERS, WIDTH)
    for mod in net:
        if isinstance(mod, nn.Linear):
            fully_shard(mod, mesh=mesh)
    fully_shard(net, mesh=mesh)
    x, y = torch.randn(BATCH, WIDTH), torch.randn(BATCH, WIDTH)

    def backward() -> list[torch.Tensor]:
        net.zero_grad(set_to_none=True)
        nn.functional.mse_loss(net(x), y).backward()
        return [p.grad for p in net.parameters()]

    grads = backward()
    assert len(grads) == 2 * LAYERS, len(grads)
    for g in grads:
        assert type(g).__name__ == "DTensor" and tuple(g.placements) == (Shard(0),), g
    layout = build_layout(net.named_parameters())
    engine = GradStatsEngine()
    meta = StepMeta()

    def torch_norm() -> float:
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        return norm.full_tensor().item() if type(norm).__name__ == "DTensor" else norm.item()

    def ours_norm() -> float:
        return engine.global_norm(grads).item()

    def ours_full() -> float:
        pending = engine.compute(layout)
        assert pending is not None
        return engine.finish(pending, meta).total_norm

    def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
        def run_no_grad() -> object:
            with torch.no_grad():
                return fn()

        return run_no_grad

    group = mesh.get_group(0)

    def floor() -> float:
        with torch.no_grad():
            shards = [g.to_local() for g in grads]
        powered = torch.stack(torch._foreach_norm(shards, 2.0, dtype=torch.float32)).double().square().sum()
        dist.all_reduce(powered.reshape(1), group=group)
        return powered.sqrt().item()

    def to_local() -> list[torch.Tensor]:
        return [g.to_local() for g in grads]

    # Cold: the first call of each in this process, then (a) on a second backward's fresh gradients.
    cold = {
        "a": timed(torch_norm)[0],
        "b": timed(ours_norm)[0],
        "c": timed(ours_full)[0],
    }
    grads = backward()
    cold["a_fresh"], _ = timed(torch_norm)

    # Correctness before timing: (a) == (b) == (c) == unsharded float64 reference.
    full = [g.full_tensor() for g in grads]
    ref = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(f.double()) for f in full])).item()
    raw = torch.nn.utils.get_total_norm(grads, 2.0)
    raw_placements = tuple(raw.placements) if type(raw).__name__ == "DTensor" else None
    raw_item = raw.to_local().item() if raw_placements is not None else raw.item()
    a_val, b_val, c_val = torch_norm(), ours_norm(), ours_full()
    assert rel(floor(), ref) <= RTOL, (rank, floor(), ref)
    assert rel(a_val, b_val) <= RTOL, (rank, a_val, b_val)
    assert rel(a_val, ref) <= RTOL, (rank, a_val, ref)
    assert rel(b_val, ref) <= RTOL, (rank, b_val, ref)
    assert rel(c_val, ref) <= RTOL, (rank, c_val, ref)

    cands: dict[str, Callable[[], object]] = {
        "a": torch_norm,
        "b": ours_norm,
        "c": ours_full,
        "b_ng": no_grad(ours_norm),
        "c_ng": no_grad(ours_full),
        "floor": floor,
        "d_tl": to_local,
        "d_tl_ng": no_grad(to_local),
    }
    samples = bench(cands, reps, warmup)

    gathered: list[object] = [None] * WORLD
    dist.all_gather_object(gathered, (samples, cold))
    if rank == 0:
        report(gathered, reps, warmup, ref, a_val, b_val, c_val, raw_placements, raw_item)
        print(f"\ntotal wall time (rank 0, after spawn) {time.perf_counter() - start:.1f} s")


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 4:
        m = statistics.median(xs)
        return m, min(xs), max(xs)
    q1, q2, q3 = statistics.quantiles(xs, n=4)
    return q2, q1, q3


def report(
    gathered: list[object],
    reps: int,
    warmup: int,
    ref: float,
    a_val: float,
    b_val: float,
    c_val: float,
    raw_placements: tuple[object, ...] | None,
    raw_item: float,
) -> None:
    per_rank = [g[0] for g in gathered]  # type: ignore[index]
    colds = [g[1] for g in gathered]  # type: ignore[index]
    slow = {k: [max(r[k][i] for r in per_rank) for i in range(reps)] for k in per_rank[0]}
    stats = {k: quartiles(v) for k, v in slow.items()}
    cold = {k: max(c[k] for c in colds) for k in colds[0]}
    med = {k: v[0] for k, v in stats.items()}

    print("lightning_gradhealth sharded benchmark")
    print(
        f"torch {torch.__version__}, lightning {lightning.__version__}, python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {WORLD} ranks (gloo), torch threads 1 per rank, device cpu"
    )
    print(
        f"{LAYERS} x Linear({WIDTH},{WIDTH}) -> {2 * LAYERS} DTensor grads, Shard(0) over a 1-D mesh of {WORLD} "
        f"ranks (fully_shard per layer); reps {reps}, warm-up {warmup}; a sample is the slower rank's time"
    )
    print("\ncorrectness (asserted on every rank, rel <= 1e-5)")
    print(f"  unsharded reference (full_tensor, float64)  {ref:.10g}")
    print(f"  (a) get_total_norm -> full_tensor().item()   {a_val:.10g}   rel {rel(a_val, ref):.1e}")
    print(f"  (b) ours global_norm().item()                {b_val:.10g}   rel {rel(b_val, ref):.1e}")
    print(f"  (c) ours record.total_norm                   {c_val:.10g}   rel {rel(c_val, ref):.1e}")
    if raw_placements is not None:
        what = "the global norm" if rel(raw_item, ref) <= RTOL else "NOT the global norm (a local value)"
        print(
            f"  get_total_norm returns a DTensor placed {raw_placements}; its local .item() alone = "
            f"{raw_item:.10g}: {what}"
        )

    print(f"\nfirst call (cold){'':36}ms")
    for key, label in [
        ("a", "(a) first call in the process"),
        ("b", "(b) first call in the process"),
        ("c", "(c) first call in the process"),
        ("a_fresh", "(a) first call on a 2nd backward's fresh grads"),
    ]:
        print(f"  {label:<48}{cold[key] * 1e3:9.1f}")

    print(f"\nwarm{'':45}median ms    IQR ms   (a)/row")
    for key, label in ROWS:
        m, q1, q3 = stats[key]
        print(f"  {label:<48}{m * 1e3:9.2f}{(q3 - q1) * 1e3:10.2f}{med['a'] / m:9.2f}x")

    print(f"\ntarget (issue): the sharded path >= {TARGET_RATIO:g}x faster than get_total_norm on 1,000 DTensor grads")
    for label, ratio in [
        ("(a)/(b), warm, as called", med["a"] / med["b"]),
        ("(a)/(b), warm, under no_grad (as in the callback)", med["a"] / med["b_ng"]),
        ("(a)/(c), warm, as called", med["a"] / med["c"]),
        ("(a)/(c), warm, under no_grad (as in the callback)", med["a"] / med["c_ng"]),
    ]:
        verdict = "PASS" if ratio >= TARGET_RATIO else "MISS"
        print(f"  {label:<52}{ratio:8.2f}x  {verdict}")
    print(f"  (for information) warm (a)/floor, the most any sharded path can gain: {med['a'] / med['floor']:.2f}x")
    print(f"  (for information) first call, (a)/(b) cold: {cold['a'] / cold['b']:.1f}x")


CENSUS_WORLD = 4


class CensusBlock(nn.Module):
    """A residual MLP block: ``x + w2(relu(w1(norm(x))))``."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.w1, self.w2 = nn.LayerNorm(64), nn.Linear(64, 256), nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.relu(self.w1(self.norm(x))))


def census_worker(rank: int, port: int) -> None:
    """One rank of ``--census``: count the monitor's collectives on FSDP2 x TP (2x2) and print them on rank 0."""
    import pickle

    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=CENSUS_WORLD)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    blocks = nn.Sequential(*(CensusBlock() for _ in range(8)))
    for block in blocks:
        parallelize_module(block, mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(blocks, mesh=mesh["dp"])
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(mesh["dp"].get_local_rank()))
    blocks(x).square().mean().backward()
    layout = build_layout(blocks.named_parameters())
    calls: list[tuple[str, int]] = []

    def counting(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            first = args[1] if name == "all_gather_single" else args[0]
            size = len(pickle.dumps(first)) if name == "all_gather_object" else first.numel() * first.element_size()  # type: ignore[union-attr]
            calls.append((name, size))
            return fn(*args, **kwargs)

        return wrapped

    names = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "all_gather_object")
    originals = {name: getattr(dist, name) for name in names}
    rows = []
    params = list(layout.params)

    def agc() -> None:  # what the guard's clip does: the units cut across ranks put together, then clipped
        grads = [p.grad for p in params]
        shards = shards_of(grads, resolve(grads, None), params)
        AGCClipper(0.01).clip([local(g) for g in grads], [local(p) for p in params], 1.0, None, shards)

    steps = (("guarded step", None), ("logged step, basic", "basic"), ("logged step, full", "full"), ("clip='agc'", 0))
    for label, stats in steps:
        engine = GradStatsEngine(stats=stats or "basic")
        engine.guard(layout)  # warm: the first call resolves the mesh once
        calls.clear()
        for name in names:
            setattr(dist, name, counting(name, originals[name]))
        try:
            if stats == 0:
                agc()
            elif stats is None:
                engine.read_guard(engine.guard(layout))  # type: ignore[arg-type]
            else:
                engine.finish(engine.compute(layout), StepMeta())  # type: ignore[arg-type]
        finally:
            for name in names:
                setattr(dist, name, originals[name])
        rows.append((label, list(calls)))
    if rank == 0:
        print(f"FSDP2 x TP on a 2x2 mesh, {len(layout.params)} tensors in {layout.num_layers} layers, 4 gloo ranks")
        for label, made in rows:
            detail = ", ".join(f"{name} {size} B" for name, size in made)
            print(f"  {label:<20} {len(made)} collective(s), {sum(s for _, s in made)} B sent per rank: {detail}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=31, help="timed repetitions per candidate (default: 31)")
    parser.add_argument("--warmup", type=int, default=3, help="warm-up calls per candidate (default: 3)")
    parser.add_argument("--quick", action="store_true", help="5 repetitions, 1 warm-up")
    parser.add_argument("--census", action="store_true", help="count the collectives (4 ranks, FSDP2 x TP)")
    args = parser.parse_args()
    if args.census:
        mp.spawn(census_worker, args=(free_port(),), nprocs=CENSUS_WORLD, join=True)
        return
    reps, warmup = (5, 1) if args.quick else (args.reps, args.warmup)
    mp.spawn(worker, args=(free_port(), reps, warmup), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
