"""Run by test_fabric.py as `python fabric_script.py OUT_DIR MODE`: a real 2-process Lightning Fabric DDP loop
(gloo, CPU) with GradientHealth. Each rank trains on its own half of every global batch.

- ``stats``: rank 0 saves the parameters before every logged step; both ranks write their records.
- ``nan_after_sync``: at step 2 only rank 1's gradient turns NaN, after DDP's all-reduce (no collective of DDP
  spreads it): the averaged decision must stop both ranks at that step.
- ``nan_backward``: at step 2 only rank 1's backward pass produces a NaN (DDP's all-reduce spreads it).

Each rank writes ``rank<r>.json``; a rank left waiting in a collective would hang the run until the test's timeout.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch import nn

from lightning_gradhealth import GradientHealth, TrainingHealthError

STEPS = 6
EVERY = 2
BATCH = 8  # per rank
BAD_STEP = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s half of global batch ``step``: different data on each rank; the first feature is 0, so the
    first layer has exactly-zero gradient entries."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, 8, generator=gen) * (1.0 + rank)  # the ranks' halves differ in scale too
    x[:, 0] = 0.0
    y = x[:, 1:2] * 0.5 + 0.1 * torch.randn(BATCH, 1, generator=gen)
    return x, y


def record_json(rec) -> dict:
    return {
        "step": rec.step,
        "total_norm": rec.total_norm,
        "param_norm": rec.param_norm,
        "zero_frac": rec.zero_frac,
        "layer_norm_ratio": rec.layer_norm_ratio,
        "layers": {lay.name: [lay.grad_norm, lay.param_norm, lay.ratio, lay.zero_frac] for lay in rec.layers},
    }


def main(out: Path, mode: str) -> None:
    fabric = Fabric(accelerator="cpu", devices=2, strategy="ddp", num_nodes=1)
    fabric.launch()
    rank = fabric.global_rank
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    health = GradientHealth(model, log_every_n_steps=EVERY, report_dir=out)
    weight = model.module.net[2].weight  # net.2.weight
    records, params, result = [], {}, {"rank": rank, "error_step": None}
    try:
        for step in range(STEPS):
            x, y = batch(step, rank)
            if rank == 0 and (step + 1) % EVERY == 0:
                params[step] = {n: p.detach().double().clone() for n, p in model.module.named_parameters()}
            handle = None
            if mode == "nan_backward" and rank == 1 and step == BAD_STEP:
                handle = weight.register_hook(lambda g: g.index_fill(0, torch.tensor([1]), math.nan))
            fabric.backward(nn.functional.mse_loss(model(x), y))
            if handle is not None:
                handle.remove()
            if mode == "nan_after_sync" and rank == 1 and step == BAD_STEP:
                weight.grad.view(-1)[7] = math.nan
            before = health.last_record
            go = health.step(optimizer, step=step)
            if health.last_record is not before:
                records.append(record_json(health.last_record))
            if go:
                optimizer.step()
            optimizer.zero_grad()
        health.close()
    except TrainingHealthError as err:
        result.update(error_step=err.context["step"], layers=err.context["layers"], message=str(err))
    result["records"] = records
    result["params_after"] = {n: p.detach().reshape(-1).tolist() for n, p in model.module.named_parameters()}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save(params, out / "params.pt")
    # tear the gloo process group down explicitly: left to interpreter exit, it can abort the process
    fabric.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
