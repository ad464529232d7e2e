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
Under DDP without accumulation, a communication hook (:meth:`NoiseScale.watch_ddp`, registered on the
``DistributedDataParallel`` module) gives the two batches: on due steps only, it adds up each bucket's squared norm
before the all-reduce (the rank's own gradient, a batch of ``b``) and, in the all-reduce future's ``.then``, after it
(the averaged gradient, ``b · world``); on other steps it only calls torch's ``allreduce_hook``. Under DDP with
accumulation the first micro-batch's path is kept (the hook then does nothing). Not estimated: without accumulation
outside DDP (one batch size only), where a communication hook is already registered (DDP takes one), and for sharded
gradients (FSDP).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from lightning_gradhealth.model.distributed import local
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.schema.record import StepStats
from lightning_gradhealth.stats.kernels import foreach_norms, stat_grads

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

    def __init__(
        self, enabled: bool = True, batch_size: int | None = None, beta: float = 0.98, hook: bool = True
    ) -> None:
        self.enabled = enabled
        self.hook = hook
        """Whether DDP without accumulation gets the communication hook (it replaces DDP's C++ all-reduce)."""
        self.batch_size = batch_size
        self.beta = beta
        self.next_due = False
        """Whether the coming optimizer step is due (set at each step's start)."""
        self._small: torch.Tensor | None = None
        self._trace = self._gsq = 0.0  # the EMAs of tr(Σ) and |G|²
        self._seen = 0
        # the DDP communication hook's (watch_ddp): per-bucket |g_local|², |G_averaged|², the buckets seen, the
        # step they belong to (a count of step starts), whether two all-reduces ran in one step (not one batch)
        self._ddp: weakref.ReferenceType[nn.Module] | None = None
        self._world = 1
        self._local: list[torch.Tensor] = []
        self._averaged: list[torch.Tensor] = []
        self._buckets: set[int] = set()
        self._steps = self._hooked_at = 0
        self._spoiled = False

    def step_start(self, next_due: bool) -> None:
        """At every optimizer step's start: whether the next step is due (the hook measures on due steps only)."""
        self.next_due = next_due
        self._steps += 1

    def watch_ddp(self, model: nn.Module | None, info: Callable[[str], None]) -> None:
        """Register the communication hook on ``model`` when it is (a Fabric module around) a DDP module.

        Nothing is registered when the noise scale is off or ``"auto"``, outside DDP, or on a single rank. DDP takes
        one hook, before the first backward pass: when registering fails (the user's own ``ddp_comm_hook``),
        ``info`` says once that the noise scale is estimated under accumulation only.
        """
        from torch.nn.parallel import DistributedDataParallel

        module = getattr(model, "_forward_module", model)  # Lightning Fabric's _FabricModule
        if not (self.enabled and self.hook) or not isinstance(module, DistributedDataParallel):
            return
        if self._ddp is not None and self._ddp() is module:  # (a second run on the same wrapper)
            return
        group = module.process_group
        world = torch.distributed.get_world_size(group)
        if world < 2:
            return
        try:
            module.register_comm_hook(group, self._hook)
        except Exception as err:  # (RuntimeError: "can only be called once"; whatever else a torch version raises)
            info(
                f"The gradient noise scale is estimated under gradient accumulation only: its DDP communication "
                f"hook could not be registered ({type(err).__name__}: {str(err).strip().splitlines()[0][:200]}), "
                "most likely because the model already has one (`ddp_comm_hook`)."
            )
            return
        self._ddp, self._world = weakref.ref(module), world

    def _hook(self, state, bucket):  # noqa: ANN001, ANN202 (DDP checks these annotations: string ones fail)
        """DDP's communication hook: ``allreduce_hook``, plus two squared norms on due steps."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if not self.next_due or self._small is not None:  # (not due, or the first micro-batch's path is on)
            return allreduce_hook(state, bucket)
        if self._hooked_at != self._steps:  # the step's first bucket: forget what an unread step left
            self._hooked_at, self._spoiled = self._steps, False
            self._local, self._averaged, self._buckets = [], [], set()
        if bucket.index() in self._buckets:  # a second all-reduce in the step (accumulation without no_sync)
            self._spoiled = True
        self._buckets.add(bucket.index())
        self._local.append(_squared(bucket.buffer()))  # before allreduce_hook divides and reduces it in place
        return allreduce_hook(state, bucket).then(self._after_allreduce)

    def _after_allreduce(self, future: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        averaged = future.value()
        self._averaged.append(_squared(averaged))
        return averaged

    def first_micro_batch(self, layout: ParamLayout, micro_batches: int) -> None:
        """After a backward pass: on the first micro-batch of a due step, keep ``|g|²`` on the device."""
        hooked = self._hooked_at == self._steps and bool(self._local)  # (the DDP hook measured this backward)
        if self.enabled and self.next_due and micro_batches == 1 and not hooked:
            self._small = squared_norm(layout)

    def measure(self, layout: ParamLayout, micro_batches: int, sharded: bool) -> tuple[torch.Tensor, int] | None:
        """At a due step: ``[|g_small|², |G_big|²]`` on the device and ``k`` (``None`` when not estimable).

        Under accumulation ``k`` micro-batches, the first one's gradient and the accumulated one; from the DDP hook
        ``k = 1``, the rank's gradient and the averaged one.
        """
        small, self._small = self._small, None
        local, averaged, self._local, self._averaged = self._local, self._averaged, [], []
        if sharded:
            return None
        if small is not None and micro_batches >= 2:
            big = squared_norm(layout)
            if big is None:
                return None
            return torch.stack([small, big if big.device == small.device else big.to(small.device)]), micro_batches
        # the hook's sums, from the backward pass of this step (it started after the previous step's start)
        if self._hooked_at != self._steps - 1 or self._spoiled or not local or len(averaged) != len(local):
            return None
        if averaged[0].is_cuda:  # (made on the future's callback stream: not reused before this stream reads them)
            for t in averaged:
                t.record_stream(torch.cuda.current_stream(t.device))
        return torch.stack([torch.stack(local).sum(), torch.stack(averaged).sum()]), 1

    @property
    def replicas(self) -> int | None:
        """The ranks the DDP hook's all-reduce averages over (``None`` when no hook is registered)."""
        return self._world if self._ddp is not None else None

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


def _squared(buffer: torch.Tensor) -> torch.Tensor:
    """``‖buffer‖²`` as a float64 device scalar (half-precision buffers summed in float32, without a copy)."""
    low = buffer.dtype in (torch.float16, torch.bfloat16)
    return torch.linalg.vector_norm(buffer, dtype=torch.float32 if low else None).double() ** 2


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
