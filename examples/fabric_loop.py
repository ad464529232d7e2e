"""Gradient health in a Lightning Fabric loop (LitGPT-style pre-training of a tiny causal transformer).

`health.after_backward()` after each micro-batch's backward, `health.step(optimizer)` once per optimizer step,
before clipping and `optimizer.step()`. Under DDP (`--devices 2`) every rank gets the same record and decisions,
and only rank zero logs and writes the report.

    python examples/fabric_loop.py [--out .] [--devices 1] [--steps 60]  (logs and report under ./runs/fabric)
"""

import argparse
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.loggers import TensorBoardLogger
from torch import nn

from lightning_gradhealth import GradientHealth

VOCAB, CONTEXT = 64, 32


class TinyGPT(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.zeros(CONTEXT, dim))
        block = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        return self.head(self.blocks(self.embed(idx) + self.pos[: idx.shape[1]], mask=mask, is_causal=True))


def get_batch(gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    # each sequence counts up with its own stride (mod VOCAB); one token in five is noise
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=gen)
    stride = torch.randint(1, 8, (batch_size, 1), generator=gen)
    seq = (start + stride * torch.arange(CONTEXT + 1)) % VOCAB
    noise = torch.rand(seq.shape, generator=gen) < 0.2
    seq = torch.where(noise, torch.randint(0, VOCAB, seq.shape, generator=gen), seq)
    return seq[:, :-1], seq[:, 1:]


def main(fabric: L.Fabric, args: argparse.Namespace) -> None:
    fabric.seed_everything(42)
    with fabric.init_module():
        model = TinyGPT()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, optimizer = fabric.setup(model, optimizer)

    # same options as GradientHealthMonitor; loggers: fabric.loggers, one logger, or a log directory
    health = GradientHealth(model, loggers=fabric.loggers, log_every_n_steps=10)
    gen = torch.Generator().manual_seed(fabric.global_rank)
    accumulate = 2
    for step in range(args.steps):
        for micro in range(accumulate):
            x, y = (t.to(fabric.device) for t in get_batch(gen, batch_size=8))
            with fabric.no_backward_sync(model, enabled=micro < accumulate - 1):
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
                fabric.backward(loss / accumulate)
            health.after_backward()  # lets a failing step name the micro-batch that went non-finite
        if health.step(optimizer, step=step):  # raises TrainingHealthError when the run must stop
            fabric.clip_gradients(model, optimizer, max_norm=1.0)  # optional; health saw the pre-clip gradient
            optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0:
            fabric.print(f"step {step}: loss {loss.item():.3f}")
    health.close()  # writes the report (rank zero), next to the first logger's logs

    rec = health.last_record
    fabric.print(f"grad_health/total_norm at step {rec.step}: {rec.total_norm:.4f} (before clipping)")
    for layer in rec.layers[:4]:
        fabric.print(f"  {layer.name:36s} norm {layer.grad_norm:.3e}  grad/param {layer.ratio:.2e}")
    log_dir = Path(fabric.logger.log_dir)
    fabric.print(f"report: {log_dir / 'gradient_health_report.md'}")
    fabric.print(f"tensorboard --logdir {log_dir}")
    fabric.logger.finalize("success")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    logger = TensorBoardLogger(root_dir=Path(args.out) / "runs", name="fabric")
    strategy = "ddp" if args.devices > 1 else "auto"
    fabric = L.Fabric(accelerator="cpu", devices=args.devices, strategy=strategy, loggers=logger)
    fabric.launch()
    main(fabric, args)
