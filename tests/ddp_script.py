"""Run by test_ddp.py as `python ddp_script.py OUT_DIR`: a real 2-process gloo DDP fit on CPU."""

import json
import sys
from pathlib import Path

import torch
from conftest import TinyMLP, loader, make_trainer
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_gradhealth import GradientHealthMonitor


class CountingTB(TensorBoardLogger):
    calls = 0

    def log_metrics(self, metrics, step=None):
        if "grad_health/total_norm" in metrics:
            CountingTB.calls += 1
        super().log_metrics(metrics, step)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(activation_stats_every_n_steps=1)
    trainer = make_trainer(
        callbacks=[monitor],
        logger=CountingTB(str(out), name="tb", version=""),
        strategy="ddp",
        devices=2,
        max_steps=4,
    )
    trainer.fit(TinyMLP(), loader(n=128))
    rec = monitor.last_record
    result = {
        "rank": trainer.global_rank,
        "log_calls": CountingTB.calls,
        "total_norm": rec.total_norm,
        "step": rec.step,
        "activations": monitor.health.history.activations,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # tear the gloo process group down explicitly: left to interpreter exit, it can abort the process
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
