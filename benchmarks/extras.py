"""What update size, gradient cosine, noise scale and the NaN replay's RNG capture cost, amortised over a run.

Times the work each one adds (the calls of :class:`~lightning_gradhealth.stats.updates.Measures` and of the RNG capture,
wrapped with a timer) against the time of the whole training step, in a plain loop with ``GradientHealth`` and
``log_every_n_steps=50`` (the Trainer's default), so that the snapshot on the step before a logged one, the norms on
the logged one and the read are all counted. Run::

    python benchmarks/extras.py [--device cuda] [--width 1024] [--depth 8] [--steps 300]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_gradhealth import GradientHealth


class Timer:
    """Accumulates the wall time of wrapped calls (synchronising CUDA around them, so the device work counts)."""

    def __init__(self, device: torch.device) -> None:
        self.seconds = 0.0
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                self.seconds += time.perf_counter() - start

        return timed


def run(option: str, args: argparse.Namespace) -> tuple[float, float]:
    """Seconds per step, and seconds per step added by ``option`` (amortised over the run)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.depth):
        layers += [nn.Linear(args.width, args.width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(args.width, 10)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kwargs = {option: True} if option in ("update_ratio", "grad_cosine", "noise_scale") else {}
    health = GradientHealth(model, log_every_n_steps=50, report=False, verbose=False, **kwargs)
    timer = Timer(device)
    measures = health._measures
    for name in ("before", "after_backward", "launch", "apply"):
        setattr(measures, name, timer.wrap(getattr(measures, name)))
    if option == "replay_nonfinite":
        health._replays.mark = timer.wrap(health._replays.mark)  # type: ignore[method-assign]
    accumulate = 2 if option == "noise_scale" else 1
    x = torch.randn(args.batch, args.width, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    total = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            timer.seconds, total = 0.0, 0.0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(accumulate):
            loss = nn.functional.cross_entropy(model(x), y) / accumulate
            loss.backward()
            health.after_backward()
        if health.step(opt, step=step, batch=(x, y), loss=loss):
            opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total += time.perf_counter() - start
    n = args.steps - args.warmup
    return total / n, timer.seconds / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=49)
    args = parser.parse_args()
    params = args.depth * (args.width * args.width + args.width) + args.width * 10 + 10
    print(f"device={args.device} MLP {args.depth}x{args.width} ({params / 1e6:.1f}M params), batch {args.batch}, "
          f"log_every_n_steps=50, {args.steps - args.warmup} timed steps")  # fmt: skip
    print(f"{'option':<18} {'step (ms)':>10} {'added (ms/step)':>16} {'amortised':>10}")
    for option in ("replay_nonfinite", "update_ratio", "grad_cosine", "noise_scale"):
        step, added = run(option, args)
        print(f"{option:<18} {step * 1e3:>10.2f} {added * 1e3:>16.4f} {added / step:>10.3%}")


if __name__ == "__main__":
    main()
