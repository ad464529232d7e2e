"""Run by test_distributed.py as `python ddp_nan_script.py OUT_DIR MODE`: in a real 2-process gloo DDP fit, only
rank 1's gradient goes bad; every rank must take the same decision at the same step, with no hang.

- ``nan``: rank 1's backward produces a NaN (DDP's all-reduce then spreads it to rank 0).
- ``nan_after_sync``: rank 1's gradient turns NaN after DDP's all-reduce (a fault no collective spreads).
- ``nan_accum``: with ``accumulate_grad_batches=4``, rank 1's micro-batch 1 goes NaN inside ``no_sync``; rank 0 only
  sees it after the final micro-batch's all-reduce.
- ``spike_after_sync``: rank 1's gradient is multiplied by 1e4 after the all-reduce, with ``on_spike="skip"``.
- ``nan_deferred``: as ``nan``, with fused Adam and ``guard_mode="deferred"``: every rank reads the verdict one step
  late, with no host sync, and raises at the same step; the fused kernel skipped the update on every rank.
"""

import json
import sys
from pathlib import Path

import torch
from conftest import TinyMLP, loader, make_trainer
from lightning.pytorch import Callback

from lightning_gradhealth import GradientHealthError, GradientHealthMonitor


class RankPoison(TinyMLP):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1:
            self.poison = self.rank1_poison
        return super().training_step(batch, batch_idx)


class AfterSync(Callback):
    """Placed before the monitor: changes rank 1's already all-reduced gradient at one step."""

    def __init__(self, step: int, fn) -> None:
        self.step, self.fn = step, fn

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 1 and trainer.global_step == self.step:
            for p in pl_module.parameters():
                self.fn(p)


def _nan_first_entry(p):
    if p.ndim == 2 and p.shape == (16, 16):  # net.2.weight
        p.grad.view(-1)[0] = float("nan")


def _times_1e4(p):
    p.grad.mul_(1e4)


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = RankPoison(optimizer="adam", lr=1e-2, fused=True) if mode == "nan_deferred" else RankPoison()
    model.rank1_poison = {}
    callbacks = []
    kwargs = {}
    monitor_kwargs = {"log_every_n_steps": 50}
    if mode == "nan":
        model.rank1_poison = {2: ("net.2.weight", float("nan"))}
    elif mode == "nan_deferred":
        model.rank1_poison = {2: ("net.2.weight", float("nan"))}
        monitor_kwargs["guard_mode"] = "deferred"
    elif mode == "nan_after_sync":
        callbacks.append(AfterSync(2, _nan_first_entry))
    elif mode == "nan_accum":
        model.rank1_poison = {5: ("net.2.weight", float("nan"))}  # optimizer step 1, micro-batch 1
        kwargs["accumulate_grad_batches"] = 4
    elif mode == "spike_after_sync":
        callbacks.append(AfterSync(5, _times_1e4))
        monitor_kwargs.update(spike_warmup_steps=3, on_spike="skip")
    monitor = GradientHealthMonitor(**monitor_kwargs)
    trainer = make_trainer(callbacks=[*callbacks, monitor], strategy="ddp", devices=2, max_steps=8, **kwargs)
    result = {"error_step": None}
    try:
        trainer.fit(model, loader(n=512))
    except GradientHealthError as err:
        result = {
            "error_step": err.record.step,
            "layers": err.context["layers"],
            "micro_batch": err.record.first_nonfinite_micro_batch,
            "global_step": trainer.global_step,
        }
    result["skipped"] = monitor.health.guard.policy.skipped_steps
    result["spikes"] = monitor.health.guard.spike_count
    result["params"] = [p.detach().double().sum().item() for p in model.parameters()]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # tear the gloo process group down explicitly: left to interpreter exit, it can abort the process
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
