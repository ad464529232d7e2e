"""Run by test_recovery.py as `python recovery_dist_script.py OUT_DIR`: a plain loop under DDP, then under FSDP2,
on the same 2 gloo processes with ``GradientHealth(recover=...)`` and Adam. At step ``FAULT`` rank 1 alone sets one
gradient entry of its (DDP: averaged; FSDP2: sharded) gradient to a huge finite value. Each rank saves the rollbacks
it saw, its local parameters and optimizer moments before every step, right after the rollback and at the end, so
that the test checks that both ranks rolled back at the same step to the same snapshot, bit for bit."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_gradhealth import GradientHealth, Recovery

FAULT, STEPS = 17, 24


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4), nn.Tanh(), nn.Linear(4, 1))


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    params = list(model.parameters())
    moments = [_local(opt.state[p]["exp_avg_sq"]) for p in params if p in opt.state]
    return {"params": [_local(p) for p in params], "exp_avg_sq": moments}


def run(rank: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=2)
    torch.set_num_threads(1)
    for mode in ("ddp", "fsdp2"):
        train(rank, out, mode)
        dist.barrier()
    dist.destroy_process_group()


def train(rank: int, out: str, mode: str) -> None:
    model = make_model()
    if mode == "fsdp2":
        from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (2,))
        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        net = fully_shard(model, mesh=mesh)
        layer = model[2]
    else:
        net = DistributedDataParallel(model)
        layer = model[2]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    recover = Recovery(every_n_steps=5, trust_after=3)
    health = GradientHealth(net, recover=recover, log_every_n_steps=4, report=False)
    gen = torch.Generator().manual_seed(100 + rank)
    teacher = torch.randn(8, 1, generator=torch.Generator().manual_seed(7))
    before: dict[int, dict] = {}
    after_rollback = None
    losses = []
    for step in range(STEPS):
        x = torch.randn(16, 8, generator=gen)
        loss = nn.functional.mse_loss(net(x), torch.tanh(x @ teacher))
        loss.backward()
        before[step] = _state(model, opt)
        if step == FAULT and rank == 1:
            grad = layer.weight.grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = 1e12
        events = len(health.recovery.events)
        if health.step(opt, step=step, loss=loss.detach()):
            opt.step()
        if len(health.recovery.events) > events:
            after_rollback = _state(model, opt)
        opt.zero_grad()
        losses.append(loss.item())
    health.close()
    event = health.recovery.events[0] if health.recovery.events else None
    torch.save(
        {
            "events": health.recovery.events,
            "snapshot": before[event["to_step"]] if event else None,
            "after_rollback": after_rollback,
            "end": _state(model, opt),
            "full": [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach() for p in model.parameters()],
            "factor": health.recovery.factor,
        },
        Path(out) / f"{mode}_rank{rank}.pt",
    )
    (Path(out) / f"{mode}_rank{rank}.json").write_text(json.dumps({"losses": losses}))


if __name__ == "__main__":
    mp.spawn(run, args=(sys.argv[1],), nprocs=2)
