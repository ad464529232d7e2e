"""The statistics engine: plain torch, no Lightning.

Everything is computed on the gradients' device in foreach kernels (or one small kernel per tensor where
torch has no foreach form), accumulated in float32 or wider whatever the gradient dtype, and packed into ONE
tensor. :meth:`GradStatsEngine.finish` then copies that tensor to the host once and turns it into a
:class:`~lightning_gradhealth.record.StepStats`. Exact NaN/Inf counts cost a full pass over the gradients, so
they are computed only when the global norm (which is free) shows something non-finite; that rare step makes
one more transfer.

No dense gradient is copied, cast or modified; a sparse one (``nn.Embedding(sparse=True)``) is read through its
coalesced form, a copy of the rows it touches (:func:`stat_grads`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_gradhealth.distributed import (
    Reduction,
    is_dtensor,
    local,
    mean_over,
    min_valid_over,
    reduce_sum_max,
    resolve,
    sum_over,
)
from lightning_gradhealth.layout import ParamLayout
from lightning_gradhealth.record import LayerStats, StepStats

__all__ = ["GradStatsEngine", "NonFiniteTracker", "PendingStats", "StepMeta", "nonzero_counts", "stat_grads"]

StatsLevel = Literal["basic", "full"]

# Order of the global scalars at the head of the packed tensor.
_HEAD = ("total_norm", "param_norm", "nonzero", "max_layer_norm", "min_layer_norm", "num_ratio_layers", "numel")


def stat_grads(layout: ParamLayout, indices: Sequence[int]) -> list[torch.Tensor]:
    """The gradients of ``layout.params[i]`` for ``i`` in ``indices``, as the statistics read them.

    Dense gradients are returned as they are. A sparse gradient (``nn.Embedding``/``nn.EmbeddingBag`` with
    ``sparse=True``, or found sparse at a step; listed in ``layout.sparse``) is read as the values of its coalesced
    form: entries at repeated indices summed (in float32 at least), as the dense gradient holds them (one copy of
    the touched rows, not of the table). Its norms,
    extremes, sums and NaN/Inf counts are then those of the dense gradient, and the untouched rows count as zeros
    through the parameter's element count.
    """
    params = layout.params
    grads: list[torch.Tensor] = [params[i].grad for i in indices]  # type: ignore[misc]
    if layout.sparse:
        grads = [
            _coalesced_values(g) if i in layout.sparse and g.is_sparse else g
            for i, g in zip(indices, grads, strict=True)
        ]
    return grads


def _coalesced_values(g: torch.Tensor) -> torch.Tensor:
    # repeated rows are summed in float32 at least (a float16/bfloat16 sum would round at every addition)
    wide = g if g.dtype in (torch.float32, torch.float64) else g.float()
    return wide.coalesce().values()


def _accum_dtype(device: torch.device) -> torch.dtype:
    # float64 makes combining many per-tensor norms and counting elements exact; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


_SCRATCH_MIN = 2**16  # below this, one count_nonzero kernel beats two kernels (per-tensor overhead dominates)
_SCRATCH_MAX = 2**22  # up to this, counted through a reused float32 scratch buffer (16 MB at most)


def nonzero_counts(
    tensors: Sequence[torch.Tensor], scratch: dict[torch.device, torch.Tensor] | None = None
) -> torch.Tensor:
    """Exact number of non-zero entries of each tensor (NaN counts as non-zero, -0.0 as zero), as float64.

    On the CPU ``count_nonzero`` branches per element, so its cost grows with how scattered the zeros are (3x a
    norm pass on a ReLU MLP's gradient, up to 24x with zeros spread at random). For tensors of 64K to 4M entries,
    ``g != 0`` written into a reused float32 buffer and summed costs ~2x a norm pass whatever the data, with no
    allocation; the float32 sum of 0/1 values is exact (every partial sum is an integer below 2**24). Smaller
    tensors (where one kernel's overhead dominates), larger ones, and other devices (CUDA, where
    ``count_nonzero`` is bandwidth-bound) use ``count_nonzero``.

    Args:
        tensors: Tensors on one device.
        scratch: Where the buffer is kept between calls (per device); ``None``: a buffer for this call only.
    """
    device = tensors[0].device
    mid = (
        [k for k, t in enumerate(tensors) if _SCRATCH_MIN <= t.numel() <= _SCRATCH_MAX] if device.type == "cpu" else []
    )
    if not mid:
        return torch.stack([torch.count_nonzero(t) for t in tensors]).double()
    buf = _scratch_buffer({} if scratch is None else scratch, device, max(tensors[k].numel() for k in mid))
    counts = []
    for k in mid:
        t = tensors[k]
        view = buf[: t.numel()].view(t.shape)
        torch.ne(t, 0, out=view)
        counts.append(view.sum())  # float32, exact: every partial sum is an integer <= 2**22
    mid_counts = torch.stack(counts).double()
    if len(mid) == len(tensors):
        return mid_counts
    in_mid = set(mid)
    rest = [k for k in range(len(tensors)) if k not in in_mid]
    out = torch.empty(len(tensors), dtype=torch.float64, device=device)
    out[mid] = mid_counts
    out[rest] = torch.stack([torch.count_nonzero(tensors[k]) for k in rest]).double()
    return out


def _scratch_buffer(store: dict[torch.device, torch.Tensor], device: torch.device, numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` entries on ``device``, kept in ``store`` and reused."""
    buf = store.get(device)
    if buf is None or buf.numel() < numel:
        buf = store[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


_INT32_MAX = 0x7FFFFFFF
_BUFFERED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _abs_max_and_min_nonzero(g: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``|g|`` and smallest non-zero ``|g|`` (``inf`` if none) of a float32/16 tensor, through ``buf``.

    ``|g|`` goes into the buffer; the bit patterns of non-negative floats order like the floats, so after
    ``bits - 1`` (a zero becomes -1) masked to 31 bits (-1 becomes the largest int), the smallest int is the
    smallest non-zero ``|g|`` minus one: no mask tensor, no ``masked_fill``, ~1/8 of the cost (CPU).
    """
    view = buf[: g.numel()].view(g.shape)
    if g.dtype == torch.float32:
        torch.abs(g, out=view)
    else:
        view.copy_(g).abs_()  # float16/bfloat16 widen exactly into float32
    largest = view.amax()
    bits = view.view(torch.int32)
    bits.sub_(1).bitwise_and_(_INT32_MAX)
    low = bits.amin()
    smallest = torch.where(low == _INT32_MAX, torch.inf, (low + 1).view(torch.float32))
    return largest, torch.where(torch.isnan(largest), largest, smallest)  # NaN present: NaN, as a plain min


def _foreach_norm_f32_or_wider(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """``_foreach_norm`` accumulated in float32, or in float64 for float64 tensors (which cannot narrow)."""
    try:
        return list(torch._foreach_norm(tensors, order, dtype=torch.float32))
    except RuntimeError:
        if not any(t.dtype == torch.float64 for t in tensors):
            raise
    wide = [k for k, t in enumerate(tensors) if t.dtype == torch.float64]  # precision="64-true"
    rest = [k for k, t in enumerate(tensors) if t.dtype != torch.float64]
    out: list[torch.Tensor] = [tensors[0].new_zeros(())] * len(tensors)
    for k, norm in zip(wide, torch._foreach_norm([tensors[k] for k in wide], order), strict=True):
        out[k] = norm
    if rest:
        for k, norm in zip(
            rest, torch._foreach_norm([tensors[k] for k in rest], order, dtype=torch.float32), strict=True
        ):
            out[k] = norm.double()
    return out


def _foreach_norms(tensors: Sequence[torch.Tensor], order: float) -> torch.Tensor:
    """Per-tensor norms accumulated in float32 (float64 tensors: in float64), stacked.

    An empty tensor (a local shard) has norm 0, also for ``inf``.
    """
    tensors = list(tensors)
    if math.isinf(order) and any(t.numel() == 0 for t in tensors):
        whole = [t for t in tensors if t.numel()]
        if not whole:
            return torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device)
        norms = torch.stack(_foreach_norm_f32_or_wider(whole, order))
        out = torch.zeros(len(tensors), dtype=norms.dtype, device=norms.device)
        out[torch.tensor([k for k, t in enumerate(tensors) if t.numel()], device=out.device)] = norms
        return out
    return torch.stack(_foreach_norm_f32_or_wider(tensors, order))


@dataclass(frozen=True)
class StepMeta:
    """Where in training a step happened (host values known to the caller, never transferred)."""

    step: int = 0
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    optimizer_idx: int = 0


@dataclass
class PendingStats:
    """Device-side results of one step, waiting for the single transfer.

    Attributes:
        layout: The layout the statistics were computed for.
        present: Indices (into the layout) of the parameters that had a gradient.
        packed: The packed device tensor.
        grads: The gradients the statistics were computed from (references, not copies), kept so that exact
            NaN/Inf counts can be taken if the step turns out non-finite.
        grad_scale: Loss scale still contained in ``grads`` (fused optimizers under a GradScaler), else None.
        extras: Optional device scalars appended at transfer time, by name.
        reduction: The process groups the statistics were combined over.
    """

    layout: ParamLayout
    present: tuple[int, ...]
    packed: torch.Tensor
    grads: list[torch.Tensor]
    grad_scale: torch.Tensor | None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    reduction: Reduction = field(default_factory=Reduction)


class GradStatsEngine:
    """Compute gradient statistics for a :class:`ParamLayout`.

    Args:
        norm_type: Order of the norms (any float ``>= 1`` or ``inf``).
        stats: ``"basic"`` (norms, ratios, zero fraction, non-finite counts) or ``"full"`` (adds max ``|g|``,
            min non-zero ``|g|``, mean and std per layer).
        per_layer: Whether to produce per-layer statistics; ``False`` keeps only the global ones.
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
        return _foreach_norms(tensors, order).to(_accum_dtype(tensors[0].device))

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
            return torch.linalg.vector_norm(_foreach_norms(tensors, p), p)
        norms = _foreach_norms([local(t) for t in tensors], p)
        norms = norms.to(_accum_dtype(norms.device))
        if math.isinf(p):
            _, reduced = reduce_sum_max(norms.new_zeros(0), norms.amax().reshape(1), red.shard_group)
            return reduced.reshape(())  # type: ignore[union-attr]
        powered = norms.pow(p)
        if params is not None and len(params) == len(tensors):  # tensors whole on every rank count once
            weight = self._weights(red, list(params), powered.device, powered.dtype)
            powered = powered if weight is None else powered * weight
        return sum_over(powered.sum().reshape(1), red.shard_group).pow(1.0 / p).reshape(())

    @torch.no_grad()
    def compute(
        self,
        layout: ParamLayout,
        grad_scale: torch.Tensor | None = None,
        reduction: Reduction | None = None,
    ) -> PendingStats | None:
        """Launch every reduction of one step on the device; nothing is copied to the host.

        Every statistic is first formed per layer from this rank's tensors, as sums (powered norms, zero counts,
        sums of ``g`` and ``g**2``) and maxima (``inf`` norms, largest ``|g|``, smallest non-zero ``|g|``
        negated). Sharded gradients combine them over the sharding group in ONE collective
        (:func:`~lightning_gradhealth.distributed.reduce_sum_max`); replicated ones (DDP) average the global
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
        present = layout.with_grad()
        given_shards = reduction is not None and reduction.shard_group is not None
        if not present and not given_shards:
            return None
        grads = stat_grads(layout, present)
        red = resolve(grads, reduction)
        if grads and is_dtensor(grads[0]):  # (resolve refused a mix of DTensors and plain tensors)
            local_g = [local(g) for g in grads]
            local_p = [local(params[i]) for i in present]  # no_grad: no detach (a DTensor dispatch each)
        else:
            local_g, local_p = grads, [params[i] for i in present]
        if not present:
            # FSDP1: this rank's pieces are all empty, hence without gradient; it still takes part in the
            # collective, with one empty tensor (zero contributions) standing for layer 0
            local_g = local_p = [layout.params[0].new_zeros(0)]
        device = local_g[0].device
        n = layout.num_layers
        index = (
            self._layer_index(layout, present, device) if present else torch.zeros(1, dtype=torch.long, device=device)
        )
        p = self.norm_type
        inf_norm = math.isinf(p)

        raw_g_norm = self.norms(local_g)
        p_norm = self.norms(local_p)
        acc = raw_g_norm.dtype
        nonzero = nonzero_counts(local_g, self._scratch).to(acc)
        inv_scale = None
        g_norm = raw_g_norm
        if grad_scale is not None:
            inv_scale = grad_scale.detach().to(acc).reshape(()).reciprocal()
            g_norm = raw_g_norm * inv_scale

        def per_layer_sum(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(n, dtype=acc, device=device).index_add_(0, index, values)

        def per_layer_max(values: torch.Tensor, neutral: float = 0.0) -> torch.Tensor:
            # a layer with nothing on this rank contributes the neutral value (0 for magnitudes)
            out = torch.full((n,), neutral, dtype=acc, device=device)
            return out.scatter_reduce_(0, index, values, reduce="amax", include_self=False)

        sharded = red.shard_group is not None
        weight = self._weights(red, [layout.params[i] for i in present], device, acc) if sharded and present else None

        def per_layer_sum_once(values: torch.Tensor) -> torch.Tensor:
            # a tensor that is whole on every rank of the sharding group is counted on its first rank only
            return per_layer_sum(values if weight is None else values * weight)

        # per-layer contributions of this rank: sums and maxima, each a block of n numbers
        if inf_norm:
            sums, maxes = [per_layer_sum_once(nonzero)], [per_layer_max(g_norm), per_layer_max(p_norm)]
        else:
            pw_g, pw_p = per_layer_sum_once(g_norm.pow(p)), per_layer_sum_once(p_norm.pow(p))
            sums, maxes = [pw_g, pw_p, per_layer_sum_once(nonzero)], []
        if sharded:  # element counts of the local shards (FSDP1's are flat pieces, FSDP2's may be empty)
            numel = torch.tensor([float(g.numel()) for g in local_g], dtype=acc).to(device, non_blocking=True)
            sums.append(per_layer_sum_once(numel))
            at = torch.tensor(present, dtype=torch.long).to(device, non_blocking=True)  # may be empty
            sums.append(torch.zeros(len(layout.params), dtype=acc, device=device).index_fill_(0, at, 1.0))
        if self.full:
            l2 = raw_g_norm if p == 2.0 else None  # reuse the L2 norms already taken
            max_abs, neg_min_abs, g_sum, g_sq = self._full_stats(local_g, acc, inv_scale, l2)
            sums += [per_layer_sum_once(g_sum), per_layer_sum_once(g_sq)]
            maxes += [per_layer_max(max_abs), per_layer_max(neg_min_abs, -math.inf)]
        sum_vec = torch.cat(sums)
        max_vec = torch.cat(maxes) if maxes else None
        if sharded:
            sum_vec, max_vec = reduce_sum_max(sum_vec, max_vec, red.shard_group)  # the step's one collective
        s_blocks = list(sum_vec.split([t.numel() for t in sums]))
        m_blocks = list(max_vec.split(n)) if max_vec is not None else []

        if inf_norm:
            layer_nz = s_blocks.pop(0)
            layer_g, layer_p = m_blocks.pop(0), m_blocks.pop(0)
            total, p_total = layer_g.amax(), layer_p.amax()
        else:
            pw_g, pw_p, layer_nz = s_blocks.pop(0), s_blocks.pop(0), s_blocks.pop(0)
            root = (lambda x: x.sqrt()) if p == 2.0 else (lambda x: x.pow(1.0 / p))
            layer_g, layer_p = root(pw_g), root(pw_p)
            total, p_total = root(pw_g.sum()), root(pw_p.sum())
        layer_numel = s_blocks.pop(0) if sharded else None
        presence = s_blocks.pop(0) if sharded else None
        if red.replica_group is not None:
            total = mean_over(total, red.replica_group)  # decisions agree on every replica
        usable = torch.isfinite(layer_g) & (layer_g > 0)
        inf = torch.tensor(math.inf, dtype=acc, device=device)
        head = torch.stack(
            [
                total,
                p_total,
                layer_nz.sum(),
                torch.where(usable, layer_g, -inf).amax(),
                torch.where(usable, layer_g, inf).amin(),
                usable.sum().to(acc),
                layer_nz.new_zeros(()) if layer_numel is None else layer_numel.sum(),  # unsharded: known on host
            ]
        )
        parts = [head]
        if presence is not None:  # which parameters have a gradient on some rank (FSDP1: not an empty shard)
            parts.append(presence)
        if self.per_layer:
            parts += [layer_g, layer_p, layer_nz]
            if layer_numel is not None:
                parts.append(layer_numel)
        if self.full:
            g_sum_l, g_sq_l = s_blocks
            max_l, neg_min_l = m_blocks
            parts += [max_l, -neg_min_l, g_sum_l, g_sq_l]
        return PendingStats(
            layout=layout,
            present=present,
            packed=torch.cat(parts),
            grads=grads,
            grad_scale=grad_scale,
            reduction=red,
        )

    def _weights(
        self, red: Reduction, params: list[torch.Tensor], device: torch.device, acc: torch.dtype
    ) -> torch.Tensor | None:
        """1/0 per tensor: whether this rank counts it (tensors whole on every rank count on the first only)."""
        if not red.skips_whole():
            return None
        return torch.tensor([0.0 if id(q) in red.whole else 1.0 for q in params], dtype=acc).to(device)

    def _full_stats(
        self,
        grads: list[torch.Tensor],
        acc: torch.dtype,
        inv_scale: torch.Tensor | None,
        l2_norms: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per tensor: max ``|g|``, minus the smallest non-zero ``|g|``, sum of ``g``, sum of ``g**2``.

        An empty (local shard of a) tensor contributes the neutral values: 0, -inf, 0, 0.
        """
        device = grads[0].device
        max_l, neg_min_l, sums = [], [], []
        zero = torch.zeros((), dtype=acc, device=device)
        neg_inf = torch.full((), -math.inf, dtype=acc, device=device)
        for g in grads:
            if g.numel() == 0:
                max_l.append(zero)
                neg_min_l.append(neg_inf)
                sums.append(zero)
                continue
            if device.type == "cpu" and g.dtype in _BUFFERED_DTYPES and _SCRATCH_MIN <= g.numel() <= _SCRATCH_MAX:
                largest, smallest = _abs_max_and_min_nonzero(g, _scratch_buffer(self._scratch, device, g.numel()))
                max_l.append(largest.to(acc))
                neg_min_l.append(-smallest.to(acc))
            else:  # small (fewer kernels), float64, or too large for the buffer: one |g| temporary, max, min
                absg = g.abs()
                max_l.append(absg.amax().to(acc))
                neg_min_l.append(-absg.masked_fill_(absg == 0, math.inf).amin().to(acc))
            # float32 (or wider) cascade sum per tensor; combined across tensors in `acc`
            sums.append(g.sum(dtype=torch.promote_types(g.dtype, torch.float32)).to(acc))
        max_abs = torch.stack(max_l).to(acc)
        neg_min_abs = torch.stack(neg_min_l).to(acc)
        sums_t = torch.stack(sums).to(acc)
        sq = (l2_norms if l2_norms is not None else self.norms(grads, 2.0)).square()
        if inv_scale is not None:
            max_abs, neg_min_abs, sums_t = max_abs * inv_scale, neg_min_abs * inv_scale, sums_t * inv_scale
            sq = sq * (inv_scale * inv_scale)
        return max_abs, neg_min_abs, sums_t, sq

    @torch.no_grad()
    def guard(
        self, layout: ParamLayout, grad_scale: torch.Tensor | None = None, reduction: Reduction | None = None
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

        Returns:
            The pending guard, or ``None`` when no watched parameter has a gradient.
        """
        if layout.sparse:
            grads = stat_grads(layout, layout.with_grad())
        else:
            grads = [g for p in layout.params if (g := p.grad) is not None]  # one pass
        if not grads:
            if reduction is None or reduction.shard_group is None:
                return None
            grads = [layout.params[0].new_zeros(0)]  # FSDP1, all pieces empty here: still take part
        red = resolve(grads, reduction)
        # FSDP1 only (parameters whole on every rank count once): the parameters aligned with the gradients
        params = [p for p in layout.params if p.grad is not None] if red.whole else None
        total = self.global_norm(grads, red, params=params)
        if grad_scale is not None:
            total = total / grad_scale.detach().float().reshape(())
        if red.replica_group is not None:
            total = mean_over(total, red.replica_group)
        # `present` stays empty: a guard never becomes a record (a failing step recomputes everything)
        return PendingStats(
            layout=layout, present=(), packed=total.reshape(1), grads=grads, grad_scale=grad_scale, reduction=red
        )

    @torch.no_grad()
    def histograms(
        self,
        layout: ParamLayout,
        bins: int = 64,
        grad_scale: torch.Tensor | None = None,
        reduction: Reduction | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Per-layer histograms of the gradient entries, computed on the device, copied in one transfer.

        Bucket edges span each layer's [min, max] evenly; no gradient is copied to the host. Sharded gradients
        take two collectives: the layers' global [min, max] (the edges), then the summed bucket counts.

        Args:
            layout: The parameters.
            bins: Buckets per layer.
            grad_scale: Loss scale still contained in the gradients (divided out of every value).
            reduction: Process groups to combine over (DTensor gradients find their sharding group themselves).

        Returns:
            ``{layer: {"min", "max", "num", "sum", "sum_squares", "bucket_limits", "bucket_counts"}}`` for the layers
            with a gradient, ready for ``SummaryWriter.add_histogram_raw``.
        """
        present = layout.with_grad()
        if not present:
            return {}
        grads = stat_grads(layout, present)
        red = resolve(grads, reduction)
        device = local(grads[0]).device
        acc = _accum_dtype(device)
        sharded = red.shard_group is not None
        # a tensor whole on every rank of the sharding group is counted on its first rank only
        skip_whole = sharded and red.skips_whole()
        by_layer: dict[int, list[torch.Tensor]] = {}
        implicit = [0] * layout.num_layers  # zeros a sparse gradient does not store (its untouched rows)
        for i, g in zip(present, grads, strict=True):
            flat = local(g).detach().reshape(-1)
            by_layer.setdefault(layout.layer_of_param[i], [])
            if i in layout.sparse:
                implicit[layout.layer_of_param[i]] += layout.params[i].numel() - flat.numel()
            if flat.numel() and not (skip_whole and id(layout.params[i]) in red.whole):
                by_layer[layout.layer_of_param[i]].append(flat)  # an empty local shard adds nothing
        # sharded: every layer, in the same order on every rank (a rank may hold no piece of some layer)
        order = list(range(layout.num_layers)) if sharded else sorted(by_layer)
        by_layer = {j: by_layer.get(j, []) for j in order}
        big = torch.tensor(math.inf, dtype=acc, device=device)
        lows, highs = [], []
        for j in order:
            flats = by_layer[j]
            low = torch.stack([f.min() for f in flats]).min().to(acc) if flats else big
            high = torch.stack([f.max() for f in flats]).max().to(acc) if flats else -big
            if implicit[j]:
                low, high = low.clamp(max=0.0), high.clamp(min=0.0)
            lows.append(low)
            highs.append(high)
        lo, hi = torch.stack(lows), torch.stack(highs)
        if sharded:
            _, extremes = reduce_sum_max(lo.new_zeros(0), torch.cat([-lo, hi]), red.shard_group)
            lo, hi = -extremes[: len(order)], extremes[len(order) :]  # type: ignore[index]
        steps = torch.arange(bins + 1, device=device, dtype=acc) / bins
        edges = lo[:, None] + (hi - lo)[:, None] * steps  # [layers, bins + 1]
        sums = torch.zeros(len(order), 3 + bins, dtype=acc, device=device)  # num, sum, sum of squares, counts
        for k, j in enumerate(order):
            for f in by_layer[j]:
                idx = torch.bucketize(f, edges[k, 1:-1].to(f.dtype), right=True)
                sums[k, 0] += f.numel()
                sums[k, 1] += f.sum(dtype=acc)
                sums[k, 2] += torch.linalg.vector_norm(f, dtype=acc).square()
                sums[k, 3:] += torch.bincount(idx, minlength=bins).to(acc)
            if implicit[j]:
                zero = torch.bucketize(torch.zeros((), dtype=acc, device=device), edges[k, 1:-1], right=True)
                sums[k, 0] += implicit[j]
                sums[k, 3 + zero] += implicit[j]
        if red.shard_group is not None:
            sum_over(sums, red.shard_group)
        values = torch.cat([lo[:, None], hi[:, None], sums[:, :3], edges[:, 1:], sums[:, 3:]], dim=1)
        if grad_scale is not None:
            inv = grad_scale.detach().to(acc).reshape(()).reciprocal()
            scale = torch.ones(values.shape[1], dtype=acc, device=device)
            scale[[0, 1, 3]] = inv
            scale[4] = inv * inv
            scale[5 : 5 + bins] = inv
            values = values * scale
        host = values.tolist()  # one transfer for every layer
        out = {}
        for j, row in zip(order, host, strict=True):
            if row[2] == 0:
                continue  # no gradient on any rank
            out[layout.layer_names[j]] = {
                "min": row[0], "max": row[1], "num": row[2], "sum": row[3], "sum_squares": row[4],
                "bucket_limits": row[5 : 5 + bins], "bucket_counts": row[5 + bins :],
            }  # fmt: skip
        return out

    @staticmethod
    def _transfer(pending: PendingStats) -> tuple[list[float], dict[str, float]]:
        """The one device-to-host copy: the packed tensor with the extras appended."""
        names = list(pending.extras)
        packed = pending.packed
        if names:
            extra = torch.stack([pending.extras[k].detach().to(packed.dtype).reshape(()) for k in names])
            packed = torch.cat([packed, extra])
        values: list[float] = packed.tolist()
        if not names:
            return values, {}
        return values[: -len(names)], dict(zip(names, values[-len(names) :], strict=True))

    def read_guard(self, pending: PendingStats) -> tuple[float, dict[str, float]]:
        """Copy a guard's global norm and extras to the host (one transfer). Returns ``(total_norm, extras)``."""
        values, extras = self._transfer(pending)
        return values[0], extras

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
        if pending.reduction.shard_group is not None and pending.present and pending.grads:
            weight = self._weights(pending.reduction, [layout.params[i] for i in pending.present], device, acc)
            if weight is not None:  # tensors whole on every rank are counted once
                nan, inf = nan * weight, inf * weight
        zeros = torch.zeros(layout.num_layers, dtype=acc, device=device)
        counts = torch.cat([zeros.index_add(0, index, nan), zeros.index_add(0, index, inf)])
        red = pending.reduction
        if red.shard_group is not None:
            sum_over(counts, red.shard_group)
        if red.replica_group is not None:
            # replicas hold the same gradient: the largest count is the broken replica's (a healthy one counts 0)
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX, group=red.replica_group)
        return counts

    # ------------------------------------------------------------------ host side
    def finish(self, pending: PendingStats, meta: StepMeta) -> StepStats:
        """Copy the packed tensor to the host (one transfer) and build the record.

        A step whose global norm is non-finite makes one more transfer, for the exact NaN/Inf counts.

        Args:
            pending: What :meth:`compute` returned, plus any extras added since.
            meta: Step, epoch, batch and optimizer indices.

        Returns:
            The typed record.
        """
        values, extras = self._transfer(pending)  # the one device -> host transfer of the step
        head = dict(zip(_HEAD, values[: len(_HEAD)], strict=True))
        pos = len(_HEAD)
        layout = pending.layout
        n = layout.num_layers
        sharded = pending.reduction.shard_group is not None
        present = set(pending.present)
        if sharded:  # a gradient on any rank counts (FSDP1 leaves an empty shard without one)
            present = {i for i, v in enumerate(values[pos : pos + len(layout.params)]) if v > 0}
            pos += len(layout.params)
        present_numel = [0] * n
        for i in pending.present:
            present_numel[layout.layer_of_param[i]] += layout.params[i].numel()
        total_numel = int(head["numel"]) if sharded else sum(present_numel)

        nan_l = [0] * n
        inf_l = [0] * n
        total = head["total_norm"]
        if not math.isfinite(total):
            counts = [int(c) for c in self.nonfinite_counts(pending).tolist()]  # rare second transfer
            nan_l, inf_l = counts[:n], counts[n:]

        layers: list[LayerStats] = []
        if self.per_layer:
            g, p, nz = (values[pos + k * n : pos + (k + 1) * n] for k in range(3))
            pos += 3 * n
            if sharded:  # element counts summed over the shards
                present_numel = [int(v) for v in values[pos : pos + n]]
                pos += n
            full: list[list[float]] = []
            if self.full:
                full = [values[pos + k * n : pos + (k + 1) * n] for k in range(4)]
                pos += 4 * n
            for j in range(n):
                if present_numel[j] == 0:
                    continue
                numel = present_numel[j]
                kwargs: dict[str, float | None] = {}
                if full:
                    mean = full[2][j] / numel
                    var = max(full[3][j] / numel - mean * mean, 0.0)
                    kwargs = {"max_abs": full[0][j], "min_abs_nonzero": full[1][j], "mean": mean, "std": math.sqrt(var)}
                layers.append(
                    LayerStats(
                        name=layout.layer_names[j],
                        numel=numel,
                        grad_norm=g[j],
                        param_norm=p[j],
                        ratio=g[j] / (p[j] + self.eps),
                        zero_frac=(numel - nz[j]) / numel,
                        nan_count=nan_l[j],
                        inf_count=inf_l[j],
                        **kwargs,  # type: ignore[arg-type]
                    )
                )
        n_ratio = int(head["num_ratio_layers"])
        if not math.isfinite(total):
            layer_norm_ratio = math.nan  # not a healthy 1.0: the layers cannot be compared on a non-finite step
        else:
            layer_norm_ratio = head["max_layer_norm"] / head["min_layer_norm"] if n_ratio >= 2 else 1.0
        no_grad = tuple(name for i, name in enumerate(layout.param_names) if i not in present)
        grad_scale = extras.get("amp_scale")
        micro = extras.get("first_nonfinite_micro_batch")
        if not math.isfinite(total) and not pending.reduction.empty:
            # each rank saw its own gradient (or shard) go bad at its own micro-batch: the first one anywhere
            micro = self._first_micro_batch_anywhere(micro, pending)
        if micro is None and not math.isfinite(total):
            micro = 0  # no micro-batch tracking (a single micro-batch): it is the one that went non-finite
        return StepStats(
            step=meta.step,
            global_step=meta.global_step,
            epoch=meta.epoch,
            batch_idx=meta.batch_idx,
            optimizer_idx=meta.optimizer_idx,
            total_norm=total,
            param_norm=head["param_norm"],
            zero_frac=(total_numel - head["nonzero"]) / total_numel,
            nan_count=sum(nan_l),
            inf_count=sum(inf_l),
            layer_norm_ratio=layer_norm_ratio,
            no_grad_count=len(no_grad),
            no_grad_params=no_grad,
            layers=tuple(layers),
            amp_scale=grad_scale,
            amp_overflow=grad_scale is not None and not math.isfinite(total),
            first_nonfinite_micro_batch=None if micro is None or micro < 0 else int(micro),
            grad_max_abs=max((lay.max_abs for lay in layers if lay.max_abs is not None), default=None),
        )

    @staticmethod
    def _first_micro_batch_anywhere(micro: float | None, pending: PendingStats) -> float | None:
        device = pending.packed.device
        value = None if micro is None else int(micro)
        for group in (pending.reduction.shard_group, pending.reduction.replica_group):
            if group is not None:
                value = min_valid_over(value, group, device)
        return value


class NonFiniteTracker:
    """Remember, on the device, the first micro-batch after which the accumulated gradient went non-finite.

    Accumulated gradients are running sums, so once non-finite they stay non-finite: the first micro-batch
    whose running gradient is non-finite is the one that introduced the NaN/Inf. Each observation is one
    foreach norm and a few scalar kernels, with no host synchronisation. Each rank watches its own gradient (or
    shards); a failing step takes the earliest micro-batch over the ranks (:meth:`GradStatsEngine.finish`).
    """

    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None
        self.micro_batches = 0

    def reset(self) -> None:
        """Forget the current optimizer step."""
        self.first_bad = None
        self.micro_batches = 0

    @torch.no_grad()
    def observe(self, layout: ParamLayout) -> None:
        """Look at the running gradients of ``layout``'s parameters after one more backward pass."""
        present = layout.with_grad()
        grads = [local(g) for g in stat_grads(layout, present)]  # sharded: this rank's shards
        idx = self.micro_batches
        self.micro_batches += 1
        if not grads:
            return
        norms = _foreach_norms(grads, 2.0)
        bad = ~torch.isfinite(norms).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=norms.device)
        self.first_bad = torch.where(bad & (self.first_bad < 0), idx, self.first_bad)
