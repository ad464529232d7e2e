"""Run by test_ddp.py as `python ddp_nan_script.py OUT_DIR`: in a real 2-process gloo DDP fit, only rank 1's
gradient goes NaN (at its micro-batch 2); both ranks must stop at that step, with no hang and no extra step."""

import json
import sys
from pathlib import Path

import torch
from conftest import TinyMLP, loader, make_trainer

from lightning_gradhealth import GradientHealthError, GradientHealthMonitor


class RankPoison(TinyMLP):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_rank == 1:
            self.poison = {2: ("net.2.weight", float("nan"))}
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=50)
    trainer = make_trainer(callbacks=[monitor], strategy="ddp", devices=2, max_steps=6)
    result = {"error_step": None}
    try:
        trainer.fit(RankPoison(), loader(n=256))
    except GradientHealthError as err:
        result = {"error_step": err.record.step, "layers": err.context["layers"], "global_step": trainer.global_step}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    # tear the gloo process group down explicitly: left to interpreter exit, it can abort the process
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
