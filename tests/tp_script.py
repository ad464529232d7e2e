"""Run by test_parallel.py as `python tp_script.py OUT_DIR MODE`: a plain PyTorch loop on 4 gloo processes with
`GradientHealth`, running the cases of ``CASES[MODE]`` one after the other in the same processes (the test runs
``MODE=all``: one launch), on layouts of the same small residual MLP:

- ``fsdp_tp``: a 2x2 mesh ("dp", "tp"): each block's ``w1``/``w2`` Colwise/Rowwise parallel on "tp", then
  ``fully_shard`` on "dp" (torchtitan's 2-D layout: ``_StridedShard``, ``Shard`` on two dims, 1-D meshes beside);
- ``tp``: tensor parallelism alone on 4 ranks (the other modules stay plain tensors, copies on every rank);
- ``hsdp``: a 2x2 mesh ("replicate", "shard") under ``fully_shard`` (``Replicate`` x ``Shard``);
- ``pp``: a 2x2 mesh ("pp", "dp"): stage 0 holds ``inp`` and ``blocks.0``, stage 1 ``blocks.1`` and ``out``, each
  stage under ``fully_shard`` on "dp", activations sent between stages by hand; ``pipeline_group`` is "pp";
- ``pp_tp``: a 2x2 mesh ("pp", "tp"): the same two stages, each block tensor parallel on "tp";
- ``pp_plain``: four stages of plain modules, one per rank (``inp``, ``blocks.0``, ``blocks.1``, ``out``).

A training case (``TRAIN``) runs a few steps with the options of its layout; every rank saves its records and, at
step 0, its clipped gradients (whole tensors). At step 2 one rank writes a NaN into its piece of
``blocks.1.w2.weight``: every rank must stop at that step naming the layer (one step later under the deferred
guard). A ``deferred:<layout>`` case does the same under ``guard_mode="deferred"`` with nothing logged: the failing
step is guarded only and read one step late, when its sharded gradients are gone (``deferred:pp`` with the inf
norm). An ``agc:<layout>`` case clips one step's gradient with ``clip="agc"`` and saves it whole; ``refuse:tp`` gives
AGC gradients it cannot pair with their parameters' rows; ``value:fsdp1`` clips by value under FSDP1 ``NO_SHARD``.
The test rebuilds every number from an unsharded float64 reference fed the same batches.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lightning_gradhealth import GradientHealth, TrainingHealthError

D, H, MAX_NORM, AGC, CLIP_VALUE = 8, 16, 0.05, 0.5, 0.01
CASES = {
    "fsdp_tp": ("fsdp_tp", "agc:fsdp_tp", "deferred:fsdp_tp"),
    "tp": ("tp", "agc:tp", "refuse:tp"),
    "hsdp": ("hsdp", "agc:hsdp", "value:fsdp1", "deferred:hsdp"),
    "pp": ("pp", "pp_tp", "agc:pp_tp", "pp_plain", "deferred:pp"),
}
CASES["all"] = tuple(case for cases in CASES.values() for case in cases)  # (one launch for the whole test module)
# per training case: steps, the rank whose piece turns NaN at step 2, and the monitor's options
TRAIN = {
    "fsdp_tp": (3, 3, {"clip": "norm", "max_norm": MAX_NORM}),
    "tp": (3, 3, {"clip": "norm", "max_norm": MAX_NORM}),
    "hsdp": (3, 3, {"clip": "norm", "max_norm": MAX_NORM}),
    "pp": (3, 3, {"clip": "norm", "max_norm": MAX_NORM}),
    "pp_tp": (4, 3, {"guard_mode": "deferred"}),  # computed failing step (read at step 3)
    "pp_plain": (4, 2, {"guard_mode": "deferred", "log_every_n_steps": 2}),  # guarded (not computed) failing step
}
# a ``deferred:<layout>`` case: sharded (DTensor) gradients, the deferred guard, the failing step guarded only
DEFERRED = (4, 3, {"guard_mode": "deferred", "log_every_n_steps": 100})


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.w1 = nn.Linear(D, H)
        self.w2 = nn.Linear(H, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w2(torch.relu(self.w1(self.norm(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, D)
        self.blocks = nn.ModuleDict({"0": Block(), "1": Block()})
        self.out = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # a pipeline stage lacks some modules
        h = self.inp(x) if self.inp is not None else x
        for block in self.blocks.values():
            h = block(h)
        return self.out(h) if self.out is not None else h


def make_model() -> Net:
    torch.manual_seed(0)
    model = Net()
    with torch.no_grad():
        for block in model.blocks.values():
            block.w1.bias[0] = -100.0  # hidden unit 0 never fires: a dead row in w1's gradient
    return model


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * seed + step)
    return torch.randn(6, 4, generator=gen), torch.randn(6, 1, generator=gen)


def _tp(model: Net, mesh) -> None:
    for block in model.blocks.values():
        parallelize_module(block, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})


def _keep(model: Net, names: set) -> None:
    """Cut a stage out of the whole model (torchtitan's way): delete what the stage does not hold."""
    for key in [k for k in model.blocks if f"blocks.{k}" not in names]:
        del model.blocks[key]
    model.inp = model.inp if "inp" in names else None
    model.out = model.out if "out" in names else None


_MESHES: dict = {}


def _mesh(shape: tuple, names: tuple):
    if names not in _MESHES:  # (one set of process groups per layout, whatever the number of cases)
        _MESHES[names] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    return _MESHES[names]


def setup(layout: str, rank: int):
    """The model of this rank, its data coordinate, and the pipeline's links (empty without a pipeline)."""
    model = make_model()
    extra = {}
    if layout == "fsdp_tp":
        mesh = _mesh((2, 2), ("dp", "tp"))
        _tp(model, mesh["tp"])
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        data = mesh["dp"].get_local_rank()
    elif layout == "tp":
        _tp(model, _mesh((4,), ("tp",)))
        data = 0
    elif layout == "hsdp":
        mesh = _mesh((2, 2), ("replicate", "shard"))
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        data = rank
    elif layout in ("pp", "pp_tp"):
        inner = "dp" if layout == "pp" else "tp"
        mesh = _mesh((2, 2), ("pp", inner))
        stage = mesh["pp"].get_local_rank()
        _keep(model, {"inp", "blocks.0"} if stage == 0 else {"blocks.1", "out"})
        if layout == "pp":
            for block in model.blocks.values():
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(model, mesh=mesh["dp"])
        else:
            _tp(model, mesh["tp"])
        data = mesh["dp"].get_local_rank() if layout == "pp" else 0
        extra = {"pipeline_group": mesh["pp"].get_group(), "prev": rank - 2 if stage else None,
                 "next": None if stage else rank + 2}  # fmt: skip
    else:  # pp_plain: one stage per rank
        if "world" not in _MESHES:
            _MESHES["world"] = dist.new_group(list(range(4)))
        _keep(model, [{"inp"}, {"blocks.0"}, {"blocks.1"}, {"out"}][rank])
        data = 0
        extra = {"pipeline_group": _MESHES["world"], "prev": rank - 1 if rank else None,
                 "next": rank + 1 if rank < 3 else None}  # fmt: skip
    return model, data, extra


def forward_backward(model: Net, x: torch.Tensor, y: torch.Tensor, extra: dict) -> None:
    """One forward and backward pass; a pipeline stage receives and sends activations and their gradients."""
    prev, nxt = extra.get("prev"), extra.get("next")
    h_in = x
    if prev is not None:
        h_in = torch.empty(x.shape[0], D)
        dist.recv(h_in, prev)
        h_in.requires_grad_(True)
    h = model(h_in)
    if nxt is None:
        nn.functional.mse_loss(h, y).backward()
    else:
        dist.send(h.detach().contiguous(), nxt)
        grad = torch.empty_like(h)
        dist.recv(grad, nxt)
        h.backward(grad)
    if prev is not None:
        dist.send(h_in.grad.contiguous(), prev)


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if type(t).__name__ == "DTensor" else t


def _layer(lay) -> dict:
    keys = ("grad_norm", "param_norm", "ratio", "zero_frac", "max_abs", "min_abs_nonzero", "mean", "std", "units",
            "dead_unit_frac", "nan_count", "inf_count")  # fmt: skip
    return {k: getattr(lay, k) for k in keys}


def _monitor(model: Net, extra: dict, **options) -> GradientHealth:
    if "pipeline_group" in extra:
        options["pipeline_group"] = extra["pipeline_group"]
    options = {"log_every_n_steps": 1, "report": False, "figure_every_n_steps": None, "stats": "full", **options}
    return GradientHealth(model, **options)


def train(layout: str, rank: int, out: Path, plan: tuple | None = None) -> dict:
    """A few steps; the records (every rank), the clipped gradients of step 0, and where the run stopped."""
    steps, bad_rank, options = TRAIN[layout] if plan is None else plan
    model, data, extra = setup(layout, rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = _monitor(model, extra, **options)
    records, error = {}, None
    for step in range(steps):
        x, y = batch(data, step)
        forward_backward(model, x, y, extra)
        if step == 2 and rank == bad_rank:
            _local(model.blocks["1"].w2.weight.grad).view(-1)[0] = float("nan")  # one rank's piece only
        try:
            health.step(opt, step=step)
        except TrainingHealthError as err:
            error = {"step": err.context["step"], "layers": err.context["layers"], "at": step}
            if plan is not None:  # the failure record's layers (named from the norms copied with the step)
                error["norms"] = {lay.name: lay.grad_norm for lay in err.context["record"].layers}
            break
        record = health.last_record  # (a deferred guard reads a step late)
        if record is not None and record.step not in records:
            records[record.step] = {
                "step": record.step, "total_norm": record.total_norm, "param_norm": record.param_norm,
                "zero_frac": record.zero_frac, "layer_norm_ratio": record.layer_norm_ratio,
                "grad_max_abs": record.grad_max_abs, "layers": {lay.name: _layer(lay) for lay in record.layers},
            }  # fmt: skip
        if step == 0 and "clip" in options:  # the gradients the optimizer receives, whole (a collective per DTensor)
            clipped = {n: _whole(p.grad).detach().clone() for n, p in model.named_parameters()}
            torch.save(clipped, out / f"clipped_{layout}_rank{rank}.pt")
        opt.step()
        opt.zero_grad()
    return {"records": list(records.values()), "error": error, "data": data}


def agc(layout: str, rank: int, out: Path) -> dict:
    """One step of ``clip="agc"`` on a fresh model: the clipped gradients, whole, and the post-clip norm."""
    model, data, extra = setup(layout, rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = _monitor(model, extra, clip="agc", agc_clip_factor=AGC, stats="basic")
    forward_backward(model, *batch(data, 0), extra)
    health.step(opt, step=0)
    clipped = {n: _whole(p.grad).detach().clone() for n, p in model.named_parameters()}
    torch.save(clipped, out / f"agc_{layout}_rank{rank}.pt")
    clipped_norm = health.guard.counters(amp=False)["grad_health/clipped_norm"]  # (every rank; rank zero logs it)
    health.close()
    return {"clipped_norm": clipped_norm, "data": data}


def value(layout: str, rank: int, out: Path) -> dict:
    """FSDP1 leaving every parameter whole (``NO_SHARD``): ``clip="value"``'s post-clip norm counts each once."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    model = FullyShardedDataParallel(make_model(), sharding_strategy=ShardingStrategy.NO_SHARD, use_orig_params=True,
                                     device_id=torch.device("cpu"))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = _monitor(model, {}, clip="value", clip_value=CLIP_VALUE, stats="basic")
    forward_backward(model, *batch(rank, 0), {})
    health.step(opt, step=0)
    return {"clipped_norm": health.guard.counters(amp=False)["grad_health/clipped_norm"], "data": rank}


def refuse(layout: str, rank: int, out: Path) -> dict:
    """AGC refuses, saying why, a gradient still ``Partial`` or placed otherwise than its parameter."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from lightning_gradhealth.guard.clipping import AGCClipper
    from lightning_gradhealth.model.distributed import local, resolve
    from lightning_gradhealth.model.shards import shards_of
    from lightning_gradhealth.schema.errors import UnsupportedSetupError

    mesh = _mesh((4,), ("tp",))
    weight = distribute_tensor(torch.ones(8, 4), mesh, [Shard(0)])
    reasons = []
    for placement in (Partial(), Replicate()):
        grad = DTensor.from_local(torch.ones(8, 4), mesh, [placement])
        try:
            shards = shards_of([grad], resolve([grad], None), [weight])
            AGCClipper(AGC).clip([local(grad)], [local(weight)], 1.0, None, shards)
        except UnsupportedSetupError as err:
            reasons.append(str(err))
    return {"reasons": reasons, "data": 0}


def deferred(layout: str, rank: int, out: Path) -> dict:
    """A guarded-only step whose sharded gradient turns NaN on one rank, read a step late (no layer is logged)."""
    steps, bad_rank, options = DEFERRED
    if layout == "pp":  # the inf norm: the largest |g| of each stage, maxed over the shards and the stages
        options = {**options, "norm_type": float("inf")}
    return train(layout, rank, out, (steps, bad_rank, options))


def run(rank: int, out: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=4)
    torch.set_num_threads(1)
    result = {}
    for case in CASES[mode]:
        kind, _, layout = case.rpartition(":")
        result[case] = {"agc": agc, "refuse": refuse, "value": value, "deferred": deferred, "": train}[kind](layout, rank, Path(out))
        dist.barrier()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(run, args=(sys.argv[1], sys.argv[2]), nprocs=4, start_method="fork")  # (no re-import)
