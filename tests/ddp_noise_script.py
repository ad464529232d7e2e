"""Run by test_noise.py as `python ddp_noise_script.py OUT_DIR`: the noise scale under 2-process gloo DDP on CPU,
without gradient accumulation (the communication hook's estimate: each rank's gradient against the averaged one).

1. A Lightning Trainer (``strategy="ddp"``, ``devices=2``) on test_noise's linear regression at a fixed point
   (``lr=0``), ``log_every_n_steps=2``: the logged noise scales, and how many squared norms the hook took at each
   optimizer step (none on the steps that are not due).
2. A plain loop with ``GradientHealth(DistributedDataParallel(model))`` on the same problem.
3. The same under accumulation (two micro-batches, the first under ``no_sync``): the first micro-batch's estimate,
   the hook idle.
4. A plain loop on a DDP module that already has a communication hook: what rank zero was told, and no estimate.

Each rank writes ``rank<r>.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from conftest import make_trainer
from test_noise import LitRegression, half_mse, regression
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import lightning_gradhealth.stats.noise as noise_module
from lightning_gradhealth import GradientHealth, GradientHealthMonitor

STEPS = 200
EVERY = 2
BATCH = 64  # per rank: near the noise scale (51), where the two-batch estimate resolves with two ranks
SQUARED: Counter[int] = Counter()  # optimizer step -> squared norms the communication hook took in its backward


class CountSteps(L.Callback):
    """Files the hook's squared norms under the optimizer step whose backward pass took them."""

    def __init__(self) -> None:
        self.step = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.step += 1


def counting(original: Any, steps: CountSteps) -> Any:
    def squared(buffer: torch.Tensor) -> torch.Tensor:
        SQUARED[steps.step] += 1
        return original(buffer)

    return squared


def trainer_run() -> dict[str, Any]:
    model, x, y = regression(STEPS * 2 * BATCH, seed=3)
    monitor = GradientHealthMonitor(report=False, verbose=False, log_every_n_steps=EVERY, noise_scale=True)
    steps = CountSteps()
    noise_module._squared = counting(noise_module._squared, steps)
    trainer = make_trainer(callbacks=[monitor, steps], strategy="ddp", devices=2, max_steps=STEPS)
    trainer.fit(LitRegression(model), DataLoader(TensorDataset(x, y), batch_size=BATCH))
    rec = monitor.last_record
    return {
        "rank": trainer.global_rank,
        "noise_scale": rec.noise_scale,
        "batch_size": rec.batch_size,
        "squared": {str(k): v for k, v in SQUARED.items()},
        "world": trainer.world_size,
    }


def plain_run(own_hook: bool = False, accumulate: int = 1) -> dict[str, Any]:
    model, x, y = regression(STEPS * 2 * BATCH * accumulate, seed=4)
    ddp = DistributedDataParallel(model)
    if own_hook:
        ddp.register_comm_hook(None, allreduce_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.0)
    told = io.StringIO()
    with contextlib.redirect_stderr(told):
        health = GradientHealth(ddp, log_every_n_steps=1, report=False, verbose=False, noise_scale=True)
    rank, before = torch.distributed.get_rank(), sum(SQUARED.values())
    for step in range(STEPS):
        for j in range(accumulate):  # (micro-batches before the last under no_sync, as Lightning does)
            at = ((2 * step + rank) * accumulate + j) * BATCH  # each rank its own half of the global batch
            xb, yb = x[at : at + BATCH], y[at : at + BATCH]
            with ddp.no_sync() if j < accumulate - 1 else contextlib.nullcontext():
                (half_mse(ddp, xb, yb) / accumulate).backward()
            health.after_backward()
        health.step(opt, step=step, batch=(xb, yb))
        opt.step()
        opt.zero_grad()
    health.close()
    rec = health.last_record
    squared = sum(SQUARED.values()) - before
    return {"noise_scale": rec.noise_scale, "batch_size": rec.batch_size, "told": told.getvalue(), "squared": squared}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    result = trainer_run()
    result["plain"] = plain_run()
    result["accumulated"] = plain_run(accumulate=2)
    result["own_hook"] = plain_run(own_hook=True)
    (out / f"rank{result['rank']}.json").write_text(json.dumps(result))
    # tear the gloo process group down explicitly: left to interpreter exit, it can abort the process
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
