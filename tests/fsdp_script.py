"""Run by test_ddp.py as `python fsdp_script.py OUT_DIR`: FSDP2 (ModelParallelStrategy + fully_shard), 2 gloo
processes on CPU. Saves each rank's batch and record; the test rebuilds an unsharded float64 reference."""

import json
import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed._composable.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealthMonitor


def make_data():
    torch.manual_seed(0)
    return TensorDataset(torch.randn(64, 8), torch.randn(64, 1))


class Sharded(L.LightningModule):
    """Linear(3, 1) has one output row: one rank's shard of it is empty."""

    def __init__(self, out: Path | None = None) -> None:
        super().__init__()
        self.out = out
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 1))

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.out is not None and batch_idx == 0:
            torch.save((x, y), self.out / f"batch_rank{self.global_rank}.pt")
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    data = make_data()
    model = Sharded(out)  # initialised right after the data, as the test's reference
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    # a second monitor for which step 0 is not logged: its per-step guard takes the sharded path, and its spike
    # detector's first observation is the guard's global norm
    guard = GradientHealthMonitor(log_every_n_steps=50, include=r"^net\.")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[monitor, guard],
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    rec = monitor.last_record
    result = {
        "total_norm": rec.total_norm,
        "param_norm": rec.param_norm,
        "zero_frac": rec.zero_frac,
        "guard_total_norm": math.exp(guard._spikes.mean),
        "guard_records": guard.last_record is not None,
        "layers": {lay.name: [lay.grad_norm, lay.param_norm, lay.zero_frac] for lay in rec.layers},
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
