"""Update size: how far each layer's weights move per step, and how the gradient's direction turns.

- ``update_ratio/<layer>`` = ``‖θ_after − θ_before‖ / ‖θ_before‖``: the relative size of an optimizer step. Around
  1e-3 is the rule of thumb for a healthy run (Karpathy, "CS231n: Neural Networks Part 3", 2016, "ratio of weights:
  updates"); per-layer update-to-weight ratios are also what layer-wise adaptive methods equalise (You et al., 2017,
  "Large Batch Training of Convolutional Networks", LARS). Far above it, the layer's learning rate is too high; far
  below, the layer barely trains.
- ``grad_health/grad_cosine``: the cosine between consecutive steps' gradients (near 1: a consistent direction, the
  learning rate could be larger; negative: the steps oscillate across a valley).

Both are opt-in (``update_ratio=True``, ``grad_cosine=True``) and measured on computed (due) steps only, from a
snapshot taken at the step just before: the parameters (and gradients) at step ``t − 1`` are copied (one foreach
kernel) when step ``t`` is due, and at step ``t``, before its optimizer step, foreach norms of the difference give the
update that step ``t − 1`` applied, and ``a·b = (|a + b|² − |a|² − |b|²) / 2`` the cosine. The measurement stays inside
the core's own calls (no hook after ``optimizer.step()``), so it works in every front-end; the price is one copy of
the watched parameters (and gradients) held for one step in every ``log_every_n_steps``. The values go to the host
without blocking (a pinned buffer and an event on CUDA) and are read when the step's record is published, after the
statistics' transfer. Sharded parameters (DTensors, FSDP2) use their local shards, summed over the sharding group;
DDP replicas are identical, so each rank's own copy is the answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_gradhealth.model.distributed import Reduction, counted, local, resolve, sum_over
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.schema.record import StepStats
from lightning_gradhealth.stats.kernels import foreach_norms
from lightning_gradhealth.stats.noise import NoiseScale

__all__ = ["Measures", "UpdateSize"]


@dataclass
class _Snapshot:
    step: int
    params: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> local copy before the update
    grads: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> local copy of the gradient


class UpdateSize:
    """Snapshot at the step before a due step; per-layer update ratios and the gradient cosine at the due step.

    Args:
        update_ratio: Measure ``update_ratio/<layer>``.
        grad_cosine: Measure ``grad_health/grad_cosine``.
    """

    def __init__(self, update_ratio: bool = True, grad_cosine: bool = True) -> None:
        self.update_ratio = update_ratio
        self.grad_cosine = grad_cosine
        self._taking: _Snapshot | None = None  # being taken at this step, for the next (due) one
        self._ready: _Snapshot | None = None  # taken at the step before this one

    @property
    def enabled(self) -> bool:
        """Whether anything is measured."""
        return self.update_ratio or self.grad_cosine

    @torch.no_grad()
    def before(self, step: int, layout: ParamLayout, next_due: bool) -> None:
        """At every optimizer step's start: copy the parameters and gradients when the next step is due.

        With several optimizers the first call of a step copies every watched parameter (none has moved yet);
        gradients are copied as they appear (a later optimizer's backward may come after an earlier one's step).
        """
        if self._taking is not None and self._taking.step != step:  # a new step: last step's copy is ready
            self._ready, self._taking = (self._taking if self._taking.step == step - 1 else None), None
        if self._ready is not None and self._ready.step != step - 1:
            self._ready = None
        if not next_due or not self.enabled:
            return
        snap = self._taking = self._taking or _Snapshot(step)
        if self.update_ratio:
            _copy_into(snap.params, [(id(p), local(p.detach())) for p in layout.params if id(p) not in snap.params])
        if self.grad_cosine:
            grads = [(id(p), local(g.detach())) for p in layout.params if (g := p.grad) is not None and not g.is_sparse]
            _copy_into(snap.grads, [(k, g) for k, g in grads if k not in snap.grads], wide=True)

    @torch.no_grad()
    def measure(self, layout: ParamLayout, step: int, reduction: Reduction | None = None) -> dict[str, torch.Tensor]:
        """At a due step, before its optimizer step: device vectors to read (see :meth:`apply`).

        Returns ``{"update": [Δ²_0..Δ²_L, θ²_0..θ²_L]}`` (squared norms per layer) and
        ``{"cosine": [a·b, ‖a‖², ‖b‖²]}``, each present when its snapshot is; the copies used are released.
        """
        out: dict[str, torch.Tensor] = {}
        snap = self._ready
        if snap is None or snap.step != step - 1:
            return out
        mine = {id(p) for p in layout.params}
        taken, grads = (
            {k: snap.params.pop(k) for k in mine & snap.params.keys()},
            {k: snap.grads.pop(k) for k in mine & snap.grads.keys()},
        )
        params = [p for p in layout.params if id(p) in taken]
        if params:
            before = [taken[id(p)] for p in params]
            now = [local(p.detach()) for p in params]
            red = resolve([p.detach() for p in params], reduction)  # (DTensors name their sharding group)
            theta = foreach_norms(before, 2.0).double() ** 2
            torch._foreach_sub_(before, now)  # in place: the snapshot becomes -Δ (no second copy)
            delta = foreach_norms(before, 2.0).double() ** 2
            keep = counted(red, params) if red.shard_group is not None else None  # copies count once
            if keep is not None:
                weight = torch.tensor(keep, dtype=delta.dtype).to(delta.device)
                theta, delta = theta * weight, delta * weight
            index = torch.tensor(_layer_index(layout, params), device=delta.device)
            n = layout.num_layers
            sums = torch.zeros(2 * n, dtype=delta.dtype, device=delta.device)
            sums.index_add_(0, index, delta).index_add_(0, index + n, theta)
            if red.shard_group is not None:
                sum_over(sums, red.shard_group)
            out["update"] = sums
        pairs = [
            (grads[id(p)], local(g.detach()))
            for p in layout.params
            if id(p) in grads and (g := p.grad) is not None and not g.is_sparse
        ]
        if pairs:
            a = [x for x, _ in pairs]
            b = [y for _, y in pairs]
            red = resolve([g for p in layout.params if id(p) in grads and (g := p.grad) is not None], reduction)
            owners = [p for p in layout.params if id(p) in grads and p.grad is not None and not p.grad.is_sparse]
            keep = counted(red, owners)
            w = None if keep is None or red.shard_group is None else torch.tensor(keep, dtype=torch.float64)

            def sq(t: list[torch.Tensor]) -> torch.Tensor:  # (copies of a tensor count once)
                v = foreach_norms(t, 2.0).double() ** 2
                return (v if w is None else v * w.to(v.device)).sum()

            a2, b2 = sq(a), sq(b)
            torch._foreach_add_(a, b)  # in place on the copy: a·b = (|a + b|² − |a|² − |b|²) / 2, three foreach norms
            dot = (sq(a) - a2 - b2) / 2
            vec = torch.stack([dot, a2, b2])
            if red.shard_group is not None:
                sum_over(vec, red.shard_group)
            out["cosine"] = vec
        return out

    @staticmethod
    def apply(record: StepStats, layout: ParamLayout, host: Mapping[str, Sequence[float]]) -> StepStats:
        """The record with ``update_ratio`` per layer and ``grad_cosine`` filled from :meth:`measure`'s values."""
        changes: dict[str, Any] = {}
        if "update" in host:
            n = layout.num_layers
            values = host["update"]
            # a layer with no snapshot, or whose weights are all zero, has no ratio
            ratio = {layout.layer_names[j]: math.sqrt(values[j] / values[n + j]) for j in range(n) if values[n + j] > 0}
            changes["layers"] = tuple(
                replace(lay, update_ratio=ratio[lay.name]) if lay.name in ratio else lay for lay in record.layers
            )
        if "cosine" in host:
            dot, a2, b2 = host["cosine"]
            changes["grad_cosine"] = dot / math.sqrt(a2 * b2) if a2 > 0 and b2 > 0 else math.nan
        return replace(record, **changes) if changes else record


def _copy_into(store: dict[int, torch.Tensor], items: Sequence[tuple[int, torch.Tensor]], wide: bool = False) -> None:
    """Copy tensors in one foreach kernel (``wide``: at least float32, so that the cosine's sum is not rounded)."""
    if not items:
        return
    tensors = [t for _, t in items]
    if wide:
        copies = [t.float() if t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors]
        same = [k for k, (c, t) in enumerate(zip(copies, tensors, strict=True)) if c is t]
        if same:
            for k, copy in zip(same, torch._foreach_mul([tensors[k] for k in same], 1.0), strict=True):
                copies[k] = copy
    else:
        copies = list(torch._foreach_mul(tensors, 1.0))
    store.update((key, copy) for (key, _), copy in zip(items, copies, strict=True))


def _layer_index(layout: ParamLayout, params: Sequence[torch.Tensor]) -> list[int]:
    position = {id(p): i for i, p in enumerate(layout.params)}
    return [layout.layer_of_param[position[id(p)]] for p in params]


NOISE_SMALL, NOISE_BIG = "noise_first_micro_sq", "noise_accumulated_sq"  # (extras' names, never logged)


class Measures:
    """Update size, gradient cosine and noise scale for the core: launched at a due step, read when it is published.

    The values are computed on the device before the step's optimizer update and copied to the host without
    blocking (a pinned buffer and an event on CUDA); :meth:`apply` reads them when the step's record is published,
    when they have long been copied, whichever guard mode produced the record.

    Args:
        options: The options (``update_ratio``, ``grad_cosine``, ``noise_scale``, ``micro_batch_size``).
    """

    def __init__(self, options: Any) -> None:
        self.updates = UpdateSize(options.update_ratio, options.grad_cosine)
        # "auto": where it is free (accumulation); True: also DDP's communication hook
        self.noise = NoiseScale(bool(options.noise_scale), options.micro_batch_size, hook=options.noise_scale is True)
        self._launched: dict[tuple[int, int], tuple[ParamLayout, _Copy, dict[str, Any]]] = {}

    def before(self, step: int, layout: ParamLayout, next_due: bool) -> None:
        """At every optimizer step's start (before its update): snapshots for the next step, when it is due."""
        self.noise.step_start(next_due)
        if self.updates.enabled:
            self.updates.before(step, layout, next_due)

    def after_backward(self, layout: ParamLayout, micro_batches: int) -> None:
        """After each backward pass (``micro_batches`` counted so far): the first micro-batch's ``|g|²``."""
        if self.noise.enabled:
            self.noise.first_micro_batch(layout, micro_batches)

    def launch(self, layout: ParamLayout, ctx: Any, frontend: Any, micro_batches: int) -> None:
        """At a due step, before its update: compute on the device and start the copy to the host."""
        parts = self.updates.measure(layout, ctx.step, frontend.reduction) if self.updates.enabled else {}
        noise = self.noise.measure(layout, micro_batches, frontend.sharded) if self.noise.enabled else None
        if not (parts or noise):
            return
        group = frontend.reduction.replica_group
        hooked = noise is not None and noise[1] == 1  # (the DDP hook's: the rank's gradient against the average)
        replicas = self.noise.replicas if hooked else None if group is None else torch.distributed.get_world_size(group)
        info = {
            "micro_batches": noise[1] if noise is not None else micro_batches,
            "replicas": replicas or 1,
            "batch_size": ctx.micro_batch_size,
            "amp": ctx.scaler is not None,  # (the scale itself is read with the record: no sync here)
            "big_scaled": hooked or ctx.grads_scaled,  # (the hook read both in the backward pass: both scaled)
            "noise": noise[0] if noise is not None else None,  # two device scalars, in the statistics' one transfer
        }
        self._launched[(ctx.step, ctx.optimizer_idx)] = (layout, _Copy(parts) if parts else None, info)
        while len(self._launched) > 8:  # (records that were never published: a step that found no gradient)
            self._launched.pop(next(iter(self._launched)))

    def extras(self, step: int, optimizer_idx: int) -> dict[str, torch.Tensor]:
        """The device scalars that ride in the step's statistics (``PendingStats.extras``): the noise scale's."""
        launched = self._launched.get((step, optimizer_idx))
        noise = None if launched is None else launched[2]["noise"]
        return {} if noise is None else {NOISE_SMALL: noise[0], NOISE_BIG: noise[1]}

    def landed(self, step: int, optimizer_idx: int, extras: Mapping[str, float]) -> None:
        """The step's extras, read back with its statistics (what :meth:`extras` sent)."""
        launched = self._launched.get((step, optimizer_idx))
        if launched is not None and NOISE_SMALL in extras:
            launched[2]["noise"] = [extras[NOISE_SMALL], extras[NOISE_BIG]]

    def apply(self, record: StepStats) -> StepStats:
        """The record with what was launched at its step (unchanged when nothing was)."""
        launched = self._launched.pop((record.step, record.optimizer_idx), None)
        if launched is None:
            return record
        layout, copy, info = launched
        host = copy.read() if copy is not None else {}
        if isinstance(info["noise"], list):  # (landed with the statistics)
            host["noise"] = info["noise"]
        record = self.updates.apply(record, layout, host)
        scale = record.amp_scale if info["amp"] and record.amp_scale else 1.0
        return self.noise.apply(
            record, host, micro_batches=info["micro_batches"], replicas=info["replicas"],
            batch_size=info["batch_size"], small_scale=scale, big_scale=scale if info["big_scaled"] else 1.0,
        )  # fmt: skip

    def state_dict(self) -> dict[str, float]:
        """The noise scale's moving averages."""
        return self.noise.state_dict()

    def load_state_dict(self, state: Mapping[str, float] | None) -> None:
        """Restore :meth:`state_dict`."""
        self.noise.load_state_dict(state or {})


class _Copy:
    """Named device vectors on their way to the host: a non-blocking copy on CUDA, read once it has landed."""

    def __init__(self, parts: Mapping[str, torch.Tensor]) -> None:
        self.names = [(k, v.numel()) for k, v in parts.items()]
        flat = torch.cat([v.detach().reshape(-1).double() for v in parts.values()])
        self.event = None
        if flat.device.type == "cuda":
            self.host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self.host.copy_(flat, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = flat.cpu()

    def read(self) -> dict[str, list[float]]:
        if self.event is not None:
            self.event.synchronize()  # (only up to the copy: long done when the record is published)
        values: list[float] = self.host.tolist()
        out, at = {}, 0
        for name, n in self.names:
            out[name] = values[at : at + n]
            at += n
        return out
