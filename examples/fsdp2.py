"""Sharded training (FSDP2 through Lightning's ModelParallelStrategy) with the monitor: nothing extra to set.

Runs on 2 CPU processes (gloo) as it is; on GPUs, drop ``accelerator``/``devices`` and it uses NCCL.

python examples/fsdp2.py [--out .]  (logs under ./lightning_logs)
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealthMonitor


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)  # the root too: every gradient is a DTensor

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    data = DataLoader(TensorDataset(x, x[:, :1] * 0.5 + 0.1 * torch.randn(2048, 1)), batch_size=32)
    # per-layer statistics, the largest |g| (a MAX over the shards), histograms and norm clipping, all sharded
    monitor = GradientHealthMonitor(stats="full", clip="norm", max_norm=1.0, histogram_every_n_steps=50)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2,
        log_every_n_steps=10,
        default_root_dir=args.out,
        enable_progress_bar=False,
        callbacks=[monitor],
    )
    trainer.fit(Regressor(), data)
    log_dir = trainer.log_dir  # a broadcast: every rank asks
    if trainer.is_global_zero:
        rec = monitor.last_record
        print(
            f"step {rec.step}: global grad norm {rec.total_norm:.4g} over {len(rec.layers)} layers, "
            f"largest |g| {rec.grad_max_abs:.3g}; tensorboard --logdir {log_dir}"
        )
    if torch.distributed.is_initialized():  # tear gloo down before interpreter exit, every rank together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
