"""Recovery benchmark: what ``recover=True`` costs: bytes and time per snapshot, and its amortised overhead.

Run from the repository root::

    python benchmarks/recovery.py           # full run, a few minutes on 2 CPU cores
    python benchmarks/recovery.py --quick   # fewer repetitions

On the CPU with ``torch.set_num_threads(1)``, on the shapes of ``overhead.py`` (``common.py``), each trained with
AdamW. For each shape:

- **bytes / snapshot**: the host memory one snapshot holds (parameters, buffers, AdamW's two moments and step
  counters), and its ratio to the parameters' own bytes;
- **snapshot (first)**: the first snapshot of a slot (allocates its host buffers); **snapshot (reused)**: a later
  one into the same slot's buffers (the steady state);
- **review / step**: the recovery's own per-step work (reading the loss, the triggers, the medians, the vetting),
  ``RecoveryGuard.review`` timed on its own (a difference of two end-to-end step times drowns in their noise);
- **amortised**: review + snapshot (reused) / ``every_n_steps`` (50), as a percentage of a plain training step
  (forward, backward, ``AdamW.step``, ``zero_grad``). Target: <= 1%.

Timing as ``overhead.py``: candidates warmed up, then timed round-robin with a rotating start; medians, with the
inter-quartile range as a noise estimate. On CUDA (``--device cuda``) the snapshot goes into pinned buffers with
non-blocking copies; the time then includes a final synchronisation, an upper bound of what the step waits for.
"""

from __future__ import annotations

import argparse
import platform
import warnings

import torch
from common import SHAPES, bench, build_shape, fmt_iqr, fmt_pct, fmt_t, med, verdict  # (benchmarks/ on sys.path)
from torch import nn

from lightning_gradhealth import GradientHealth, Recovery
from lightning_gradhealth.guard.snapshot import Targets, take
from lightning_gradhealth.guard.step import StepOutcome

warnings.filterwarnings("ignore")


def _trainer(net: nn.Module, loss_fn, health: GradientHealth | None, opt: torch.optim.Optimizer):
    def step() -> None:
        loss = loss_fn()
        loss.backward()
        if health is None or health.step(opt, loss=loss.detach()):
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(shape: str, reps: int, min_sample_s: float, device: str) -> dict[str, float]:
    torch.manual_seed(0)
    base, _ = build_shape(shape)
    base = base.to(device)
    data = _batch(shape, device)
    every = Recovery().every_n_steps
    net = base
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    steps = bench({"plain": _trainer(net, lambda: data(net), None, opt)}, reps, min_sample_s)
    targets = Targets()
    guard = GradientHealth(None, report=False, verbose=False, recover=Recovery(every_n_steps=10**9)).recovery
    assert guard is not None
    loss = data(net).detach()

    def review() -> None:
        guard.review(StepOutcome(), 1.0, 0, loss, opt, [opt], lambda: None)  # type: ignore[arg-type,return-value]

    def snap_first() -> None:
        take(None, 0, net, [opt], targets).wait()

    slot = take(None, 0, net, [opt], targets)

    def snap_reused() -> None:
        take(slot, 0, net, [opt], targets).wait()

    snaps = bench({"first": snap_first, "reused": snap_reused, "review": review}, reps, min_sample_s)
    plain, review_s = med(steps["plain"]), med(snaps["review"])
    param_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    return {
        "bytes": slot.nbytes,
        "bytes_ratio": slot.nbytes / param_bytes,
        "first": med(snaps["first"]),
        "reused": med(snaps["reused"]),
        "reused_iqr": snaps["reused"],
        "plain": plain,
        "plain_iqr": steps["plain"],
        "review": review_s,
        "amortised": (review_s + med(snaps["reused"]) / every) / plain,
    }


def _batch(shape: str, device: str):
    """A loss closure ``(net) -> loss`` on the shape's fixed batch, for any copy of its network."""
    gen = torch.Generator().manual_seed(1)
    if shape == "transformer":
        tokens = torch.randint(0, 4096, (8, 128), generator=gen).to(device)
        target = torch.randint(0, 4096, (8, 128), generator=gen).to(device)
        return lambda n: nn.functional.cross_entropy(n(tokens).reshape(-1, 4096), target.reshape(-1))
    width = 1000 if shape == "mlp" else 64
    x, y = torch.randn(64, width, generator=gen).to(device), torch.randn(64, width, generator=gen).to(device)
    return lambda n: nn.functional.mse_loss(n(x), y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps, min_sample_s = (5, 0.005) if args.quick else (15, 0.02)
    every = Recovery().every_n_steps
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {args.device}, 1 thread")
    print(f"every_n_steps={every} (default); medians of {reps} round-robin repetitions")
    head = ("shape", "bytes/snapshot", "x params", "snapshot first", "snapshot reused", "IQR", "plain step", "IQR",
            "review/step", "amortised", "<=1%")  # fmt: skip
    print(" | ".join(head))
    for shape in args.shapes:
        r = measure(shape, reps, min_sample_s, args.device)
        row = (
            shape,
            f"{r['bytes'] / 2**20:.1f} MiB",
            f"{r['bytes_ratio']:.2f}",
            fmt_t(r["first"]),
            fmt_t(r["reused"]),
            fmt_iqr(r["reused_iqr"]),
            fmt_t(r["plain"]),
            fmt_iqr(r["plain_iqr"]),
            fmt_t(r["review"]),
            fmt_pct(r["amortised"]),
            verdict(r["amortised"] <= 0.01),
        )
        print(" | ".join(row))


if __name__ == "__main__":
    main()
