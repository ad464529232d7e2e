"""The statistics engine: plain torch, no Lightning.

Everything is computed on the gradients' device (:mod:`~lightning_gradhealth.stats.kernels`), accumulated in float32 or
wider whatever the gradient dtype, and gathered by name in a :class:`Pack`: combined across ranks in ONE
collective when the gradients are sharded, then packed into ONE tensor. :meth:`GradStatsEngine.finish` copies that
tensor to the host once and reads it back by name into a :class:`~lightning_gradhealth.schema.record.StepStats`. Exact
NaN/Inf counts cost a full pass over the gradients, so they are computed only when the global norm (which is free)
shows something non-finite; that rare step makes one more transfer.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from typing import Literal

import torch
from torch.linalg import vector_norm

from lightning_gradhealth.model.distributed import (
    Reduction,
    counted,
    cut_dead_rows,
    local,
    mean_over,
    reduce_sum_max,
    resolve,
    settle_partial,
    sum_over,
)
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.model.stages import merge_stages, stage_norm
from lightning_gradhealth.schema.record import LayerStats, StepStats
from lightning_gradhealth.stats.blocks import contributions, derive, layer_stats
from lightning_gradhealth.stats.horizontal import HorizontalPlan, gradient_stats
from lightning_gradhealth.stats.kernels import (
    accum_dtype,
    foreach_norms,
    layer_sums,
    nonzero_counts,
    stat_grads,
)
from lightning_gradhealth.stats.pack import Pack, PackSchema, PackValues
from lightning_gradhealth.stats.pending import PendingStats, StepMeta, first_micro_batch_anywhere, outgoing, transfer
from lightning_gradhealth.stats.tracker import NonFiniteTracker
from lightning_gradhealth.stats.units import LayerUnits

__all__ = [
    "GradStatsEngine",
    "NonFiniteTracker",  # re-exported from tracker
    "Pack",  # re-exported from pack
    "PackSchema",  # re-exported from pack
    "PackValues",  # re-exported from pack
    "PendingStats",  # re-exported from pending
    "StepMeta",  # re-exported from pending
    "nonzero_counts",  # re-exported from kernels
    "stat_grads",  # re-exported from kernels
]

StatsLevel = Literal["basic", "full"]


class GradStatsEngine:
    """Compute gradient statistics for a :class:`ParamLayout`.

    Args:
        norm_type: Order of the norms (any float ``>= 1`` or ``inf``).
        stats: ``"basic"`` (norms, ratios, zero fraction, dead units, non-finite counts) or ``"full"`` (adds max
            ``|g|``, min non-zero ``|g|``, mean and std per layer).
        per_layer: Whether to produce per-layer statistics (dead units among them); ``False`` keeps only the
            global ones.
        eps: Added to the parameter norm in the grad/param ratio.
    """

    def __init__(
        self,
        norm_type: float = 2.0,
        stats: StatsLevel = "basic",
        per_layer: bool = True,
        eps: float = 1e-8,
    ) -> None:
        self.norm_type = float(norm_type)
        self.full = stats == "full"
        self.per_layer = per_layer
        self.eps = eps
        self._index_cache: dict[
            tuple[int, tuple[int, ...], torch.device], tuple[weakref.ReferenceType[ParamLayout], torch.Tensor]
        ] = {}
        self._scratch: dict[torch.device, torch.Tensor] = {}  # zero counting's reused buffer (CPU)
        self._plans: dict[tuple[object, ...], HorizontalPlan] = {}  # the multi-tensor path's blocks, by shapes
        self._horizontal: bool | None = None  # multi-tensor path: None = by device (use_horizontal); tests force it
        self._units = LayerUnits()  # which gradient rows are units, per layout (cached)

    # ------------------------------------------------------------------ device side
    def _layer_index(self, layout: ParamLayout, present: tuple[int, ...], device: torch.device) -> torch.Tensor:
        key = (id(layout), present, device)
        cached = self._index_cache.get(key)
        if cached is not None and cached[0]() is layout:  # a weak reference: a freed layout's id may be reused
            return cached[1]
        if len(self._index_cache) > 64:
            self._index_cache.clear()
        index = torch.tensor([layout.layer_of_param[i] for i in present], dtype=torch.long, device=device)
        self._index_cache[key] = (weakref.ref(layout), index)
        return index

    def norms(self, tensors: Sequence[torch.Tensor], ord: float | None = None) -> torch.Tensor:
        """Per-tensor norms, accumulated in float32 whatever the tensors' dtype, as one device vector.

        Args:
            tensors: Tensors on one device.
            ord: Norm order; defaults to the engine's ``norm_type``.

        Returns:
            A 1-D tensor of per-tensor norms in the accumulation dtype (float64 except on MPS).
        """
        order = self.norm_type if ord is None else ord
        return foreach_norms(tensors, order).to(accum_dtype(tensors[0].device))

    @torch.no_grad()
    def global_norm(
        self,
        tensors: Sequence[torch.Tensor],
        reduction: Reduction | None = None,
        params: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The global norm of ``tensors`` as a device scalar (no host synchronisation).

        Sharded tensors (DTensors, or ``reduction.shard_group``): the local shards' powered sum (maximum for
        ``inf``), combined over the sharding group in one collective. Float32 per-tensor norms: the value only
        needs to be finite-or-not and good to float32 precision (guard, clipping thresholds, spike z-scores,
        post-clip norm). Replicas are not averaged here (see :meth:`guard`). ``params`` (aligned with ``tensors``)
        lets parameters that are whole on every rank of the sharding group count once.
        """
        p = self.norm_type
        red = resolve(tensors, reduction)
        if red.shard_group is None:  # the hot path of every guarded step: no per-tensor Python work
            total = vector_norm(foreach_norms(tensors, p), p)
            return total if red.stage_group is None else stage_norm(total, p, red.stage_group)
        return self._sharded_total(foreach_norms([local(t) for t in tensors], p), red, params)

    def _sharded_total(
        self, norms: torch.Tensor, red: Reduction, params: Sequence[torch.Tensor] | None
    ) -> torch.Tensor:
        """The global norm from the local shards' per-tensor ``norms``: one collective over the sharding group."""
        p = self.norm_type
        norms = norms.to(accum_dtype(norms.device))
        if math.isinf(p):
            _, reduced = reduce_sum_max(norms.new_zeros(0), norms.amax().reshape(1), red.shard_group)
            total = reduced.reshape(())  # type: ignore[union-attr]
        else:
            powered = norms.pow(p)
            if params is not None and len(params) == len(norms):  # tensors whole on every rank count once
                weight = self._weights(red, list(params), powered.device, powered.dtype)
                powered = powered if weight is None else powered * weight
            total = sum_over(powered.sum().reshape(1), red.shard_group).pow(1.0 / p).reshape(())
        return total if red.stage_group is None else stage_norm(total, p, red.stage_group)  # pipeline stages

    @torch.no_grad()
    def shard_tensor_norms(self, pending: PendingStats, norms: Sequence[float]) -> list[float]:
        """The whole tensors' norms from the local shards' ``norms`` a guard copied (a failing step only: rare).

        One collective over the sharding group (a sum of powered norms; an all-gather and maximum for ``inf``);
        copies of a tensor (``Replicate`` placements, plain tensors beside DTensors) count once. NaN and Inf
        propagate, so every rank names the layers whose gradient went non-finite on any rank.
        """
        red = pending.reduction
        device = pending.packed.device
        local_norms = torch.tensor(list(norms), dtype=accum_dtype(device), device=device)
        p = self.norm_type
        if math.isinf(p):  # (an all-gather and a local maximum: NaN propagates, unlike gloo's MAX)
            _, whole = reduce_sum_max(local_norms.new_zeros(0), local_norms, red.shard_group)
            return [float(v) for v in whole.tolist()]  # type: ignore[union-attr]
        powered = local_norms.pow(p)
        weight = self._weights(red, [pending.layout.params[i] for i in pending.present], device, powered.dtype)
        powered = powered if weight is None else powered * weight
        return [float(v) for v in sum_over(powered, red.shard_group).pow(1.0 / p).tolist()]

    @torch.no_grad()
    def compute(
        self,
        layout: ParamLayout,
        grad_scale: torch.Tensor | None = None,
        reduction: Reduction | None = None,
    ) -> PendingStats | None:
        """Launch every reduction of one step on the device; nothing is copied to the host.

        Every statistic is first formed per layer from this rank's tensors, as sums (powered norms, zero counts,
        dead rows, sums of ``g`` and ``g**2``) and maxima (``inf`` norms, largest ``|g|``, smallest non-zero ``|g|``
        negated). Sharded gradients combine them over the sharding group in ONE collective
        (:func:`~lightning_gradhealth.model.distributed.reduce_sum_max`); replicated ones (DDP) average the global
        norm over the replicas (one scalar all-reduce), so that every rank takes the same decisions.

        Args:
            layout: The parameters to look at.
            grad_scale: When the gradients still contain a GradScaler's loss scale (fused optimizers under
                ``16-mixed``), the scale tensor; every magnitude is divided by it.
            reduction: Process groups to combine over (DTensor gradients find their sharding group themselves).

        Returns:
            The pending statistics, or ``None`` when no watched parameter has a gradient.

        Raises:
            GradientHealthError: A layout of DTensor shards that is not supported.
        """
        params = layout.params
        settle_partial(params)  # (DTensor gradients still Partial somewhere: summed first)
        present = layout.with_grad()
        given_shards = reduction is not None and reduction.shard_group is not None
        if not present and not given_shards:
            return None
        grads = stat_grads(layout, present)
        red = resolve(grads, reduction)
        if red.mesh is not None:  # DTensors (beside plain copies, under tensor parallelism)
            local_g = [local(g) for g in grads]
            local_p = [local(params[i]) for i in present]  # no_grad: no detach (a DTensor dispatch each)
        else:
            local_g, local_p = grads, [params[i] for i in present]
        if not present:
            # FSDP1: this rank's pieces are all empty, hence without gradient; it still takes part in the
            # collective, with one empty tensor (zero contributions) standing for layer 0
            local_g = local_p = [layout.params[0].new_zeros(0)]
        device = local_g[0].device
        index = (
            self._layer_index(layout, present, device) if present else torch.zeros(1, dtype=torch.long, device=device)
        )
        p = self.norm_type
        acc = accum_dtype(device)
        # dead units (rows of 2-D+ gradients entirely zero): per-layer records only, in the zero counting's pass
        # (per-layer blocks are copied to the host only for per-layer records)
        units = (self._units.mask(layout, present, red) if present else (False,)) if self.per_layer else None
        inv_scale = None if grad_scale is None else grad_scale.detach().to(acc).reshape(()).reciprocal()
        # the gradients' norms, zero counts, dead rows and (stats="full") extremes and sums, in one place: each
        # tensor in turn while in cache on the CPU, multi-tensor (few kernels for all) on accelerators
        raw_g_norm, nonzero, dead_rows, full = gradient_stats(
            local_g, units, self.full, p, inv_scale, self._scratch, self._plans, self._horizontal
        )
        dtensors = units is not None and red.mesh is not None
        cut = cut_dead_rows([params[i] for i in present], local_g) if dtensors else None
        if cut is not None:  # rows cut across ranks (tensor parallelism's Rowwise weights), summed over the cut
            dead_rows = cut if dead_rows is None else dead_rows.to(cut.dtype) + cut
        p_norm = self.norms(local_p)
        g_norm = raw_g_norm if inv_scale is None else raw_g_norm * inv_scale

        # a tensor that is whole on every rank of the sharding group is counted on its first rank only
        sharded = red.shard_group is not None
        weight = self._weights(red, [params[i] for i in present], device, acc) if sharded and present else None
        per_tensor = (g_norm, p_norm, nonzero, dead_rows, full)
        pack = contributions(layout, present, sharded, local_g, (index, weight), per_tensor, p, self.per_layer)
        pack.reduce(red.shard_group)  # the step's one collective (none when unsharded)
        derive(pack, red, p, self.per_layer, self.full)
        packed, schema = pack.build()
        return PendingStats(layout, present, packed, grads, grad_scale, reduction=red, schema=schema)

    def _weights(
        self, red: Reduction, params: list[torch.Tensor], device: torch.device, acc: torch.dtype
    ) -> torch.Tensor | None:
        """1/0 per tensor: whether this rank counts it (copies of a tensor count once: see ``counted``)."""
        keep = counted(red, params)
        return None if keep is None else torch.tensor(keep, dtype=acc).to(device)

    @torch.no_grad()
    def guard(
        self,
        layout: ParamLayout,
        grad_scale: torch.Tensor | None = None,
        reduction: Reduction | None = None,
        tensor_norms: bool = False,
    ) -> PendingStats | None:
        """The cheapest useful check of a step: the global gradient norm alone (one foreach kernel).

        Its finiteness catches any NaN/Inf in any gradient; :meth:`read_guard` copies it (and the extras) to the
        host in one transfer. Sharded gradients add one scalar all-reduce over the sharding group; replicated ones
        (``reduction.replica_group``) one over the replicas, so that every rank sees a gradient that went bad on
        any of them.

        Args:
            layout: The parameters to look at.
            grad_scale: Loss scale still contained in the gradients, divided out of the norm.
            reduction: Process groups to combine over.
            tensor_norms: Also send the per-tensor norms the global one is made of (dense gradients, plain or
                DTensors: a step read later names its non-finite layers from them; ``present`` is then set).
                DTensors send their local shards' norms (no collective more; see :meth:`shard_tensor_norms`).

        Returns:
            The pending guard, or ``None`` when no watched parameter has a gradient.
        """
        settle_partial(layout.params)  # (DTensor gradients still Partial somewhere: summed first)
        if layout.sparse:
            grads = stat_grads(layout, layout.with_grad())
        else:
            grads = [g for p in layout.params if (g := p.grad) is not None]  # one pass
        placeholder = not grads
        if placeholder:
            if reduction is None or reduction.shard_group is None:
                return None
            grads = [layout.params[0].new_zeros(0)]  # FSDP1, all pieces empty here: still take part
        red = resolve(grads, reduction)
        # FSDP1 only (parameters whole on every rank count once): the parameters aligned with the gradients
        params = [p for p in layout.params if p.grad is not None] if red.whole or red.replicated else None
        # named: plain tensors, or DTensors (the same parameters on every rank of the group; FSDP1's are not)
        dense = not (layout.sparse or placeholder)
        named = tensor_norms and dense and (red.shard_group is None or red.mesh is not None)
        norms = None
        if not named:
            total = self.global_norm(grads, red, params=params)
        elif red.shard_group is None:  # (global_norm's own unsharded path)
            norms = foreach_norms(grads, self.norm_type)
            total = vector_norm(norms, self.norm_type)
            if red.stage_group is not None:
                total = stage_norm(total, self.norm_type, red.stage_group)
        else:  # the local shards' norms, sent as they are: combined over the group on a failing step only
            norms = foreach_norms([local(t) for t in grads], self.norm_type)
            total = self._sharded_total(norms, red, params)
        if grad_scale is not None:
            scale = grad_scale.detach().float().reshape(())
            total, norms = total / scale, None if norms is None else norms / scale
        if red.replica_group is not None:
            total = mean_over(total, red.replica_group)
        pack = Pack()
        pack.add("total_norm", total)  # the guard's whole pack
        if norms is not None:
            pack.add("tensor_norms", norms.to(total.dtype))
        packed, schema = pack.build()
        # `present` stays empty unless named: a guard never becomes a record (a failing step recomputes everything)
        present = layout.with_grad() if named else ()
        return PendingStats(layout, present, packed, grads, grad_scale, reduction=red, schema=schema)


    @staticmethod
    def outgoing(pending: PendingStats) -> tuple[torch.Tensor, tuple[str, ...]]:
        """The device tensor that goes to the host: the packed values with the extras appended (and their names)."""
        return outgoing(pending)

    def read_guard(self, pending: PendingStats) -> tuple[float, dict[str, float]]:
        """Copy a guard's global norm and extras to the host (one transfer). Returns ``(total_norm, extras)``."""
        host, extras = transfer(pending)
        return host.scalar("total_norm"), extras

    @torch.no_grad()
    def nonfinite_counts(self, pending: PendingStats) -> torch.Tensor:
        """Exact per-layer NaN and Inf counts, packed ``[nan_0..nan_L, inf_0..inf_L]`` (device tensor).

        Summed over the sharding group (each rank counts its shard) and maxed over the replicas (a rank whose
        gradient went bad alone still names its layers on every rank): one all-reduce each, on failing steps only.
        """
        layout = pending.layout
        device = pending.packed.device
        acc = pending.packed.dtype
        index = self._layer_index(layout, pending.present, device)
        local_g = [local(g) for g in pending.grads]
        if not local_g:  # FSDP1: no piece of any gradient on this rank; it still takes part in the sums
            local_g, index = [pending.packed.new_zeros(0)], torch.zeros(1, dtype=torch.long, device=device)
        nan = torch.stack([torch.isnan(g).sum() for g in local_g]).to(acc)
        inf = torch.stack([torch.isinf(g).sum() for g in local_g]).to(acc)
        red = pending.reduction
        weight = None  # tensors whole on every rank of the sharding group are counted once
        if red.shard_group is not None and pending.present and pending.grads:
            weight = self._weights(red, [layout.params[i] for i in pending.present], device, acc)
        n = layout.num_layers
        counts = torch.cat([layer_sums(nan, index, n, weight), layer_sums(inf, index, n, weight)])
        if red.shard_group is not None:
            sum_over(counts, red.shard_group)
        if red.replica_group is not None:
            # replicas hold the same gradient: the largest count is the broken replica's (a healthy one counts 0)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX, group=red.replica_group)
        return counts

    # ------------------------------------------------------------------ host side
    def finish(self, pending: PendingStats, meta: StepMeta, values: list[float] | None = None) -> StepStats:
        """Copy the packed tensor to the host (one transfer) and build the record.

        A step whose global norm is non-finite makes one more transfer, for the exact NaN/Inf counts.

        Args:
            pending: What :meth:`compute` returned, plus any extras added since.
            meta: Step, epoch, batch and optimizer indices.
            values: The host copy of :meth:`outgoing`, made earlier without blocking (``guard_mode="deferred"``):
                no transfer and no collective here; the gradients are gone, so a non-finite step's NaN/Inf
                entries are not counted (:attr:`StepStats.counts_exact` is ``False``).

        Returns:
            The typed record.
        """
        exact = values is None
        host, extras = transfer(pending, values)  # the one device -> host transfer of the step
        pending.host_extras = extras
        layout = pending.layout
        n = layout.num_layers
        sharded = "presence" in host
        present = set(pending.present)
        if sharded:  # a gradient on any rank counts (FSDP1 leaves an empty shard without one)
            present = {i for i, v in enumerate(host.get("presence")) if v > 0}
        present_numel = [0] * n
        for i in pending.present:
            present_numel[layout.layer_of_param[i]] += layout.params[i].numel()
        total_numel = int(host.scalar("total_numel")) if sharded else sum(present_numel)

        nan_l, inf_l = [0] * n, [0] * n
        total = host.scalar("total_norm")
        if not math.isfinite(total) and exact:
            counts = [int(c) for c in self.nonfinite_counts(pending).tolist()]  # rare second transfer
            nan_l, inf_l = counts[:n], counts[n:]

        layers: list[LayerStats] = []
        if "grad_norm" in host:  # per-layer statistics
            if sharded:  # element counts summed over the shards
                present_numel = [int(v) for v in host.get("numel")]
            # dead units: dead rows summed on the device; a layer's units (rows of its parameters with a gradient
            # on some rank) counted here
            have = tuple(sorted(present)) if sharded else pending.present
            counted = "dead_units" in host
            units_l = self._units.per_layer(layout, have, pending.reduction) if counted else (None,) * n
            layers = layer_stats(layout, host, present_numel, (nan_l, inf_l), units_l, self.eps)
        n_ratio = int(host.scalar("num_ratio_layers"))
        if not math.isfinite(total):
            layer_norm_ratio = math.nan  # not a healthy 1.0: the layers cannot be compared on a non-finite step
        else:
            layer_norm_ratio = host.scalar("max_layer_norm") / host.scalar("min_layer_norm") if n_ratio >= 2 else 1.0
        no_grad = tuple(name for i, name in enumerate(layout.param_names) if i not in present)
        micro = extras.get("first_nonfinite_micro_batch")
        if not math.isfinite(total) and not pending.reduction.empty and exact:
            # each rank saw its own gradient (or shard) go bad at its own micro-batch: the first one anywhere
            micro = first_micro_batch_anywhere(micro, pending)
        if micro is not None:
            extras = {**extras, "first_nonfinite_micro_batch": micro}
        zero_frac = (total_numel - host.scalar("total_nonzero")) / total_numel
        record = StepStats.assemble(
            meta, total, layers, extras, param_norm=host.scalar("total_param_norm"), zero_frac=zero_frac,
            nan_count=sum(nan_l), inf_count=sum(inf_l), layer_norm_ratio=layer_norm_ratio, no_grad_params=no_grad,
            counts_exact=exact,
        )  # fmt: skip
        if pending.reduction.stage_group is not None:  # pipeline: every stage's layers in one record
            record = merge_stages(record, total_numel, self.norm_type, pending.reduction.stage_group)
        return record
