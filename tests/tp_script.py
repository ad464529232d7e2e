"""Run by test_parallel.py as `python tp_script.py OUT_DIR MODE`: a plain PyTorch loop on 4 gloo processes with
`GradientHealth(..., clip="norm")`, in one of four layouts of the same small residual MLP:

- ``fsdp_tp``: a 2x2 mesh ("dp", "tp"): each block's ``w1``/``w2`` Colwise/Rowwise parallel on "tp", then
  ``fully_shard`` on "dp" (torchtitan's 2-D layout: ``_StridedShard``, ``Shard`` on two dims, 1-D meshes beside);
- ``tp``: tensor parallelism alone on 4 ranks (the other modules stay plain tensors, copies on every rank);
- ``hsdp``: a 2x2 mesh ("replicate", "shard") under ``fully_shard`` (``Replicate`` x ``Shard``);
- ``pp``: a 2x2 mesh ("pp", "dp"): stage 0 holds ``inp`` and ``blocks.0``, stage 1 ``blocks.1`` and ``out``, each
  stage under ``fully_shard`` on "dp", activations sent between stages by hand; ``pipeline_group`` is "pp".

Every rank saves its records, the batches of its data-parallel coordinate and, at step 0, its clipped gradients
(whole tensors); the test rebuilds the numbers from an unsharded float64 reference. At step 2 rank 3 writes a NaN
into its shard of ``blocks.1.w2.weight``: every rank must stop at that step naming the layer.
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

from lightning_gradhealth import GradientHealth, GradientHealthError, TrainingHealthError

D, H, STEPS, MAX_NORM = 8, 16, 3, 0.05


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


def setup(mode: str, rank: int):
    """The model of this rank, its data coordinate, and the options to give the monitor."""
    model = make_model()
    extra = {}
    if mode == "fsdp_tp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        _tp(model, mesh["tp"])
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        data = mesh["dp"].get_local_rank()
    elif mode == "tp":
        mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        _tp(model, mesh)
        data = 0
    elif mode == "hsdp":
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        data = rank
    else:  # pp
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        stage = mesh["pp"].get_local_rank()
        if stage == 0:
            del model.blocks["1"]
            model.out = None
        else:
            del model.blocks["0"]
            model.inp = None
        for block in model.blocks.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        data = mesh["dp"].get_local_rank()
        extra = {"pipeline_group": mesh["pp"].get_group(), "stage": stage, "peer": rank + 2 if stage == 0 else rank - 2}
    return model, data, extra


def forward_backward(model: Net, x: torch.Tensor, y: torch.Tensor, extra: dict) -> None:
    if "stage" not in extra:
        nn.functional.mse_loss(model(x), y).backward()
    elif extra["stage"] == 0:
        h = model(x)
        dist.send(h.detach().contiguous(), extra["peer"])
        grad = torch.empty_like(h)
        dist.recv(grad, extra["peer"])
        h.backward(grad)
    else:
        h = torch.empty(x.shape[0], D)
        dist.recv(h, extra["peer"])
        h.requires_grad_(True)
        nn.functional.mse_loss(model(h), y).backward()
        dist.send(h.grad.contiguous(), extra["peer"])


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if type(t).__name__ == "DTensor" else t


def _layer(lay) -> dict:
    keys = ("grad_norm", "param_norm", "ratio", "zero_frac", "max_abs", "min_abs_nonzero", "mean", "std", "units",
            "dead_unit_frac", "nan_count", "inf_count")  # fmt: skip
    return {k: getattr(lay, k) for k in keys}


def run(rank: int, out: str, mode: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=4)
    torch.set_num_threads(1)
    model, data, extra = setup(mode, rank)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    options = {"pipeline_group": extra["pipeline_group"]} if "pipeline_group" in extra else {}
    health = GradientHealth(model, log_every_n_steps=1, report=False, figure_every_n_steps=None, stats="full", clip="norm",
                           max_norm=MAX_NORM,
                            **options)  # fmt: skip
    records, error = [], None
    for step in range(STEPS):
        x, y = batch(data, step)
        forward_backward(model, x, y, extra)
        if step == 2 and rank == 3:
            model.blocks["1"].w2.weight.grad.to_local().view(-1)[0] = float("nan")  # one rank's shard only
        try:
            health.step(opt, step=step)
        except TrainingHealthError as err:
            error = {"step": err.context["step"], "layers": err.context["layers"]}
            break
        record = health.last_record
        records.append({
            "step": record.step, "total_norm": record.total_norm, "param_norm": record.param_norm,
            "zero_frac": record.zero_frac, "layer_norm_ratio": record.layer_norm_ratio,
            "grad_max_abs": record.grad_max_abs, "layers": {lay.name: _layer(lay) for lay in record.layers},
        })  # fmt: skip
        if step == 0:  # the gradients the optimizer receives, whole (a collective per DTensor: every rank)
            clipped = {n: _whole(p.grad).detach().clone() for n, p in model.named_parameters()}
            torch.save(clipped, Path(out) / f"clipped_rank{rank}.pt")
        opt.step()
        opt.zero_grad()
    result = {"records": records, "error": error, "data": data}
    if mode == "fsdp_tp":  # AGC needs whole units: refused under tensor parallelism, saying why
        opt.zero_grad()
        forward_backward(model, *batch(data, 0), extra)
        agc = GradientHealth(model, report=False, figure_every_n_steps=None, clip="agc")
        try:
            agc.step(opt, step=0)
        except GradientHealthError as err:
            result["agc"] = str(err)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.start_processes(run, args=(sys.argv[1], sys.argv[2]), nprocs=4, start_method="fork")  # (no re-import)
