"""What the CPU benchmarks share: the model shapes and the round-robin timing (``overhead.py``, ``sharded.py``).

Scripts in ``benchmarks/`` run with this directory on ``sys.path`` (``python benchmarks/overhead.py``), so they
import it as ``common``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch
from lightning.pytorch import LightningModule
from torch import nn

__all__ = [
    "SHAPES",
    "Holder",
    "TinyLM",
    "bench",
    "build_shape",
    "fmt_iqr",
    "fmt_pct",
    "fmt_ratio",
    "fmt_t",
    "iqr_pct",
    "linear_stack",
    "med",
    "verdict",
]


# ---------------------------------------------------------------------------------------------- models
class Holder(LightningModule):
    """A LightningModule around a plain network, so that the callback's hooks can be called on it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


class TinyLM(nn.Module):
    """Embedding, TransformerEncoder, vocabulary head."""

    def __init__(self, vocab: int = 4096, d_model: int = 352, layers: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead=8, dim_feedforward=1408, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tokens)))


def linear_stack(n: int, width: int) -> nn.Sequential:
    """``n`` x ``Linear(width, width)`` with ReLU between (also the sharded benchmark's network)."""
    mods: list[nn.Module] = []
    for i in range(n):
        mods.append(nn.Linear(width, width))
        if i < n - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods)


def build_shape(key: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    """A network and a closure returning its loss on a fixed batch."""
    if key == "mlp":
        net: nn.Module = linear_stack(10, 1000)
        x, y = torch.randn(64, 1000), torch.randn(64, 1000)
        return net, lambda: nn.functional.mse_loss(net(x), y)
    if key == "many":
        net = linear_stack(500, 64)
        x, y = torch.randn(64, 64), torch.randn(64, 64)
        return net, lambda: nn.functional.mse_loss(net(x), y)
    if key == "transformer":
        net = TinyLM()
        tokens, target = torch.randint(0, 4096, (8, 128)), torch.randint(0, 4096, (8, 128))
        return net, lambda: nn.functional.cross_entropy(net(tokens).reshape(-1, 4096), target.reshape(-1))
    raise ValueError(key)


SHAPES = {
    "mlp": "MLP 10 x Linear(1000,1000), batch 64",
    "transformer": "TransformerEncoder d352 x16 + emb/head 4096, 8x128 tokens",
    "many": "500 x Linear(64,64) (1,000 tensors), batch 64",
}


# ---------------------------------------------------------------------------------------------- timing
def bench(
    cands: dict[str, Callable[[], object]],
    reps: int,
    min_sample_s: float,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Time candidates side by side; return per-call seconds for every repetition.

    Each candidate is warmed up, then an inner loop count is chosen so that one sample lasts at least
    ``min_sample_s`` (1 when ``min_sample_s`` is 0). Every repetition runs all candidates once each, starting
    from a rotating position.
    """
    names = list(cands)
    inner: dict[str, int] = {}
    for name in names:
        fn = cands[name]
        for _ in range(warmup):
            fn()
        if min_sample_s <= 0:
            inner[name] = 1
            continue
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            dt = time.perf_counter() - t0
            if dt >= min_sample_s / 4 or n >= 1 << 16:
                break
            n *= 2
        inner[name] = max(1, math.ceil(n * min_sample_s / max(dt, 1e-9)))
    samples: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            fn, m = cands[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(m):
                fn()
            samples[name].append((time.perf_counter() - t0) / m)
    return samples


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def iqr_pct(xs: list[float]) -> float:
    """Inter-quartile range as a percentage of the median (0 with fewer than 4 samples)."""
    if len(xs) < 4:
        return float("nan")
    q = statistics.quantiles(xs, n=4)
    return 100.0 * (q[2] - q[0]) / statistics.median(xs)


def fmt_iqr(xs: list[float]) -> str:
    spread = iqr_pct(xs)
    return "n/a" if math.isnan(spread) else f"{spread:.1f}%"


def fmt_t(seconds: float) -> str:
    if abs(seconds) >= 1e-3:
        return f"{seconds * 1e3:10.3f} ms"
    return f"{seconds * 1e6:10.2f} µs"


def fmt_pct(frac: float) -> str:
    return f"{100 * frac:.4f}%" if abs(frac) < 0.001 else f"{100 * frac:.3f}%"


def fmt_ratio(ratio: float) -> str:
    return f"{ratio:9.1e}x" if ratio < 0.01 else f"{ratio:9.3f}x"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"
