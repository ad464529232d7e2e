"""The minimal use: add the callback, train, look at TensorBoard.

python examples/quickstart.py [--out .]  (logs under ./lightning_logs)
"""

import argparse

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealthMonitor


class Regressor(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()

    x = torch.randn(1024, 16)
    data = DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True).sin()), batch_size=32)

    monitor = GradientHealthMonitor()  # <- the whole integration
    trainer = L.Trainer(
        max_epochs=2, callbacks=[monitor], default_root_dir=args.out, log_every_n_steps=10, enable_progress_bar=False
    )
    trainer.fit(Regressor(), data)

    rec = monitor.last_record
    print(f"grad_health/total_norm at step {rec.step}: {rec.total_norm:.4f}")
    for layer in rec.layers:
        print(
            f"  {layer.name:8s} norm {layer.grad_norm:.3e}  grad/param {layer.ratio:.2e}  zeros {layer.zero_frac:.1%}"
        )
    print(f"tensorboard --logdir {trainer.logger.log_dir}")
