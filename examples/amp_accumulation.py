"""Mixed precision with a real GradScaler, gradient accumulation and gradient clipping.

The monitor reports the accumulated, unscaled, pre-clip gradient of each optimizer step, the post-clip norm,
and the loss scale. An overflow step (the scaler skips it and halves its scale) is recorded as such, not as
corruption.

    python examples/amp_accumulation.py [--out .]  (logs under ./lightning_logs)
"""

import argparse

import lightning as L
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealthMonitor


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.LayerNorm(128), nn.Linear(128, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()

    x = torch.randn(2048, 32)
    y = (x[:, :10].argmax(dim=1) + (x[:, 10] > 0).long()) % 10
    data = DataLoader(TensorDataset(x, y), batch_size=32)

    # On a GPU, precision="16-mixed" gives the same GradScaler; on CPU it must be asked for explicitly.
    precision = "16-mixed" if torch.cuda.is_available() else None
    plugins = [] if precision else [MixedPrecision("16-mixed", "cpu")]
    monitor = GradientHealthMonitor(stats="full")
    trainer = L.Trainer(
        max_steps=40,
        accumulate_grad_batches=4,
        gradient_clip_val=1.0,
        precision=precision,
        plugins=plugins,
        callbacks=[monitor],
        default_root_dir=args.out,
        log_every_n_steps=5,
        enable_progress_bar=False,
    )
    trainer.fit(Classifier(), data)

    rec = monitor.last_record
    print(
        f"step {rec.step}: grad_health/total_norm {rec.total_norm:.4f} (pre-clip, unscaled), "
        f"post-clip {rec.post_clip_norm:.4f}, loss scale {rec.amp_scale:g}, overflow skipped: {rec.amp_overflow}"
    )
    print(f"tensorboard --logdir {trainer.logger.log_dir}")
