"""The gradient noise scale, from gradients the step already has: the batch size where speed-ups stop.

McCandlish et al. (2018), "An Empirical Model of Large-Batch Training", define the simple noise scale
``B_simple = tr(Σ) / |G|²`` (Σ: the per-example gradient covariance, G: the true gradient) and estimate it, in their
appendix A.1, from the squared norms of gradients taken over two batch sizes ``B_small < B_big``:

- ``|G|² ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small)``,
- ``tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)``,

both unbiased, each smoothed over steps with an exponential moving average, and their ratio taken last.

Here the two batches are free. Under gradient accumulation the first micro-batch's gradient (read after its backward
pass, on due steps only: one foreach norm to a device scalar) is a batch of ``b`` examples, and the accumulated
gradient one of ``b · k`` (``k`` micro-batches; ``b · k · world`` under DDP, where micro-batches before the last run
under ``no_sync`` as Lightning does, so the first is the rank's own). The accumulated gradient is taken to be the
*mean* over the micro-batches (the loss divided by ``k``, as Lightning does and Fabric's and Hugging Face's loops
do); the first micro-batch's gradient is then ``k`` times what it left in ``.grad``. No extra backward pass is run.
Not estimated: without accumulation (it would need a DDP communication hook), and for sharded gradients (FSDP).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

from lightning_gradhealth.distributed import local
from lightning_gradhealth.kernels import foreach_norms, stat_grads
from lightning_gradhealth.layout import ParamLayout
from lightning_gradhealth.record import StepStats

__all__ = ["NoiseScale", "batch_advice", "batch_size_of", "squared_norm"]


def batch_size_of(batch: Any) -> int | None:
    """The first dimension of the first tensor in ``batch`` (nested lists, tuples and dicts), or ``None``."""
    leaves, _ = tree_flatten(batch)
    shape = next((t.shape for t in leaves if isinstance(t, torch.Tensor) and len(t.shape) > 0), None)
    return None if shape is None else int(shape[0])


@torch.no_grad()
def squared_norm(layout: ParamLayout) -> torch.Tensor | None:
    """``Σ ‖g‖²`` over the local gradients of ``layout`` as a float64 device scalar (no host sync), or ``None``."""
    grads = [local(g) for g in stat_grads(layout, layout.with_grad())]
    if not grads:
        return None
    return (foreach_norms(grads, 2.0).double() ** 2).sum()


class NoiseScale:
    """The gradient noise scale ``B_simple``, smoothed over the due steps.

    Args:
        enabled: Whether to estimate it.
        batch_size: The micro-batch size (examples per backward pass on one rank); ``None``: read from each step's
            batch.
        beta: The moving averages' factor (per due step), bias-corrected as Adam's.
    """

    def __init__(self, enabled: bool = True, batch_size: int | None = None, beta: float = 0.98) -> None:
        self.enabled = enabled
        self.batch_size = batch_size
        self.beta = beta
        self.next_due = False
        """Whether the coming optimizer step is due (set at each step's start)."""
        self._small: torch.Tensor | None = None
        self._trace = self._gsq = 0.0  # the EMAs of tr(Σ) and |G|²
        self._seen = 0

    def first_micro_batch(self, layout: ParamLayout, micro_batches: int) -> None:
        """After a backward pass: on the first micro-batch of a due step, keep ``|g|²`` on the device."""
        if self.enabled and self.next_due and micro_batches == 1:
            self._small = squared_norm(layout)

    def measure(self, layout: ParamLayout, micro_batches: int, sharded: bool) -> dict[str, torch.Tensor]:
        """At a due step: ``{"noise": [|g_first|², |G_accumulated|²]}`` on the device (empty when not estimable)."""
        small, self._small = self._small, None
        if small is None or micro_batches < 2 or sharded:
            return {}
        big = squared_norm(layout)
        if big is None:
            return {}
        return {"noise": torch.stack([small, big if big.device == small.device else big.to(small.device)])}

    def apply(
        self,
        record: StepStats,
        host: Mapping[str, Sequence[float]],
        *,
        micro_batches: int,
        replicas: int = 1,
        batch_size: int | None = None,
        small_scale: float = 1.0,
        big_scale: float = 1.0,
    ) -> StepStats:
        """The record with ``noise_scale`` from :meth:`measure`'s values.

        Args:
            record: The due step's record.
            host: The values read back.
            micro_batches: ``k``, the backward passes accumulated in this step.
            replicas: Data-parallel ranks whose gradients were averaged into the accumulated one.
            batch_size: The micro-batch size seen by the front-end (``batch_size`` given at construction wins).
            small_scale: Loss scale still in the first micro-batch's gradient (a GradScaler's), divided out.
            big_scale: Loss scale still in the accumulated gradient.
        """
        b = self.batch_size or batch_size
        if "noise" not in host or not b:
            return record
        small, big = host["noise"]
        small = small * micro_batches**2 / small_scale**2  # the first micro-batch's own (mean) gradient
        big = big / big_scale**2
        b_small, b_big = float(b), float(b * micro_batches * replicas)
        if not (math.isfinite(small) and math.isfinite(big)):
            return record
        gsq = (b_big * big - b_small * small) / (b_big - b_small)
        trace = (small - big) / (1.0 / b_small - 1.0 / b_big)
        self._seen += 1
        self._gsq = self.beta * self._gsq + (1 - self.beta) * gsq
        self._trace = self.beta * self._trace + (1 - self.beta) * trace
        # (Adam's bias correction divides both averages by the same factor: it cancels in the ratio)
        if self._gsq <= 0 or self._trace <= 0:  # (not yet resolved from the noise: nothing to say)
            return record
        return replace(record, noise_scale=self._trace / self._gsq, batch_size=int(b_big))

    def state_dict(self) -> dict[str, float]:
        """The moving averages."""
        return {"trace": self._trace, "gsq": self._gsq, "seen": float(self._seen)}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self._trace = float(state.get("trace", 0.0))
        self._gsq = float(state.get("gsq", 0.0))
        self._seen = int(state.get("seen", 0))


def batch_advice(noise_scale: float, batch_size: int | None) -> str:
    """The report's sentence comparing the batch size in use with the noise scale (McCandlish et al., 2018, §2.2).

    Below the noise scale a larger batch still trains nearly as fast per step with fewer steps (speed-ups almost
    linear); far above it, extra examples buy little (each step's gradient is already nearly the true one).
    """
    scale = f"a noise scale ~{noise_scale:,.3g}" if noise_scale < 1000 else f"a noise scale ~{noise_scale:,.0f}"
    if batch_size is None:
        return f"{scale} (the batch size in use is unknown)"
    head = f"batch {batch_size:,} against {scale}"
    if batch_size < noise_scale / 2:
        return head + ": larger batches would still speed training up"
    if batch_size > 2 * noise_scale:
        return head + ": larger batches would waste compute; a smaller batch trains as fast per example"
    return head + ": near the most efficient trade-off between steps and examples"
