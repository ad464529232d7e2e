"""Gradient health in a plain PyTorch loop: no Lightning, no Fabric.

`health.step(optimizer)` goes after the backward pass and before `optimizer.step()`: it measures every 10th step
(one device-to-host transfer), guards every step against NaN/Inf, clips, and says whether to step. Leaving the
`with` block writes the Gradient Health Report next to the TensorBoard logs.

    python examples/plain_loop.py [--out .] [--steps 200]  (logs and report under ./runs/plain)
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from lightning_gradhealth import GradientHealth

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    y = x.sum(dim=1, keepdim=True).sin()
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    log_dir = Path(args.out) / "runs" / "plain"

    # loggers: a TensorBoard directory, a Lightning/Fabric logger, or a list of them
    with GradientHealth(model, loggers=str(log_dir), log_every_n_steps=10, clip="norm", max_norm=1.0) as health:
        for step in range(args.steps):
            idx = torch.randint(0, len(x), (32,))
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            loss.backward()
            if health.step(optimizer, step=step):  # False: a skipped update (only with on_nonfinite="skip")
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    rec = health.last_record
    print(f"grad_health/total_norm at step {rec.step}: {rec.total_norm:.4f} (before clipping)")
    for layer in rec.layers:
        print(
            f"  {layer.name:6s} norm {layer.grad_norm:.3e}  grad/param {layer.ratio:.2e}  zeros {layer.zero_frac:.1%}"
        )
    print(f"report: {log_dir / 'gradient_health_report.md'}")
    print(f"tensorboard --logdir {log_dir}")
