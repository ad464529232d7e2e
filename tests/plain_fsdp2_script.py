"""Run by test_core.py as `python plain_fsdp2_script.py OUT_DIR`: a plain PyTorch loop with FSDP2 (`fully_shard`)
on 2 gloo processes and `GradientHealth`, no Lightning. Each rank trains on its half of the batch; rank 0 saves
its records and every rank its batch, so that the test rebuilds the numbers from an unsharded float64 reference.
A NaN in rank 1's shard at step 2 must stop both ranks at that step, naming the layer."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed._composable.fsdp import fully_shard
from torch.distributed.device_mesh import init_device_mesh

from lightning_gradhealth import GradientHealth, TrainingHealthError


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 1))


def run(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2,))
    model = make_model()
    for module in model:
        if isinstance(module, nn.Linear):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    health = GradientHealth(model, log_every_n_steps=1, report_dir=out)
    gen = torch.Generator().manual_seed(100 + rank)
    records, error = [], None
    for step in range(4):
        x, y = torch.randn(8, 8, generator=gen), torch.randn(8, 1, generator=gen)
        torch.save((x, y), Path(out) / f"batch_rank{rank}_step{step}.pt")
        nn.functional.mse_loss(model(x), y).backward()
        if step == 2 and rank == 1:
            model[2].weight.grad.to_local().view(-1)[0] = float("nan")  # (after the reduce-scatter: one shard)
        try:
            health.step(opt, step=step)
        except TrainingHealthError as err:
            error = {"step": err.context["step"], "layers": err.context["layers"]}
            break
        record = health.last_record
        records.append(
            {
                "step": record.step,
                "total_norm": record.total_norm,
                "param_norm": record.param_norm,
                "layers": {lay.name: [lay.grad_norm, lay.param_norm, lay.zero_frac] for lay in record.layers},
            }
        )
        opt.step()
        opt.zero_grad()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps({"records": records, "error": error}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
