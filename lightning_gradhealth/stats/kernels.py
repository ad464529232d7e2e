"""What runs on one rank's gradients on the device: foreach norms, exact zero counts, extremes, per-layer sums.

Plain torch, no Lightning, no collective and no host synchronisation: every function here works on the tensors of
one rank (the local shards of sharded gradients) and returns device tensors, accumulated in float32 or wider
whatever the gradient dtype (:func:`accum_dtype`). The statistics engine (which combines them across ranks and
copies them to the host), the histograms, the clippers and :mod:`~.tracker` build on these.

No dense gradient is copied, cast or modified; a sparse one (``nn.Embedding(sparse=True)``) is read through its
coalesced form, a copy of the rows it touches (:func:`stat_grads`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_gradhealth.model.layout import ParamLayout

__all__ = [
    "SCRATCH_MAX",
    "SCRATCH_MIN",
    "abs_max_and_min_nonzero",
    "accum_dtype",
    "cache_resident_stats",
    "coalesced_values",
    "foreach_norm_f32_or_wider",
    "foreach_norms",
    "full_stats",
    "layer_maxes",
    "layer_sums",
    "nonzero_and_dead_rows",
    "nonzero_counts",
    "scratch_buffer",
    "stat_grads",
]

SCRATCH_MIN = 2**16
"""Below this many entries, one ``count_nonzero`` kernel beats two kernels (per-tensor overhead dominates)."""
SCRATCH_MAX = 2**22
"""Up to this many entries, tensors are counted through a reused float32 scratch buffer (16 MB at most)."""

_INT32_MAX = 0x7FFFFFFF
_BUFFERED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def stat_grads(layout: ParamLayout, indices: Sequence[int]) -> list[torch.Tensor]:
    """The gradients of ``layout.params[i]`` for ``i`` in ``indices``, as the statistics read them.

    Dense gradients as they are, but a weight stored as (inputs, outputs) (``layout.transposed``: HF ``Conv1D``)
    transposed (a view), so that its rows are its units as for ``nn.Linear``. A sparse gradient (listed in
    ``layout.sparse``) as the values of its coalesced form (:func:`coalesced_values`): one copy of the touched
    rows, not of the table; its norms, extremes, sums and NaN/Inf counts are those of the dense gradient, and the
    untouched rows count as zeros through the parameter's element count.

    Args:
        layout: The parameters.
        indices: Indices into ``layout.params`` of parameters that have a gradient.

    Returns:
        One tensor per index, in order.
    """
    params = layout.params
    grads: list[torch.Tensor] = [params[i].grad for i in indices]  # type: ignore[misc]
    sparse, flip = layout.sparse, layout.transposed
    if sparse or flip:  # (flip: (inputs, outputs) weights read as (outputs, inputs): rows are units)
        grads = [
            coalesced_values(g) if i in sparse and g.is_sparse
            else g.t() if i in flip and g.dim() == 2 and type(g) is torch.Tensor else g
            for i, g in zip(indices, grads, strict=True)
        ]
    return grads


def coalesced_values(g: torch.Tensor) -> torch.Tensor:
    """The values of a sparse COO gradient's coalesced form: entries at repeated indices summed, as dense holds them.

    Repeated rows are summed in float32 at least (a float16/bfloat16 sum would round at every addition).
    """
    wide = g if g.dtype in (torch.float32, torch.float64) else g.float()
    return wide.coalesce().values()


def accum_dtype(device: torch.device) -> torch.dtype:
    """The dtype statistics are combined in on ``device``: float64, or float32 on MPS (which has no float64).

    Float64 makes combining many per-tensor norms and counting elements exact.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def scratch_buffer(store: dict[torch.device, torch.Tensor], device: torch.device, numel: int) -> torch.Tensor:
    """A float32 buffer of at least ``numel`` entries on ``device``, kept in ``store`` and reused.

    Args:
        store: Buffers by device, kept by the caller between calls.
        device: Where the buffer lives.
        numel: The least number of entries needed.

    Returns:
        The 1-D buffer (grown in ``store`` when too small).
    """
    buf = store.get(device)
    if buf is None or buf.numel() < numel:
        buf = store[device] = torch.empty(numel, dtype=torch.float32, device=device)
    return buf


def _on(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to ``device`` without waiting (nothing to do for the CPU)."""
    return host if device.type == "cpu" else host.to(device, non_blocking=True)


def nonzero_counts(
    tensors: Sequence[torch.Tensor], scratch: dict[torch.device, torch.Tensor] | None = None
) -> torch.Tensor:
    """Exact number of non-zero entries of each tensor (NaN counts as non-zero, -0.0 as zero), as float64.

    See :func:`nonzero_and_dead_rows`, which this is without the dead rows.

    Args:
        tensors: Tensors on one device.
        scratch: Where the buffer is kept between calls (per device); ``None``: a buffer for this call only.

    Returns:
        A 1-D tensor of counts in :func:`accum_dtype` (float64 except on MPS), one per tensor.
    """
    return nonzero_and_dead_rows(tensors, None, scratch)[0]


def nonzero_and_dead_rows(
    tensors: Sequence[torch.Tensor],
    units: Sequence[bool] | None = None,
    scratch: dict[torch.device, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per tensor, the exact number of non-zero entries and, for the tensors in ``units``, of dead rows.

    A tensor's *rows* are its slices along dim 0 (a Linear weight's output units, a convolution's output channels;
    :func:`stat_grads` hands an HF ``Conv1D`` weight over transposed); a row is *dead* when every entry is exactly
    zero (NaN counts as non-zero, -0.0 as zero). Rows are counted for the marked tensors of 2+ dimensions.

    On the CPU ``count_nonzero`` branches per element (3x a norm pass on a ReLU MLP's gradient, up to 24x with
    zeros spread at random), so there: tensors of 64K to 4M entries write ``g != 0`` into a reused float32 buffer
    summed per row (~2x a norm pass, no allocation); smaller float32/16 tensors are copied together into the
    buffer by row length (a few kernels for any number of tensors); larger and float64 ones (which a float32 copy
    could underflow) use ``count_nonzero``, as other devices do (bandwidth-bound there). The per-row counts are
    summed per tensor through one cumulative sum; every float32 partial sum is an integer below 2**24: exact.

    Args:
        tensors: Tensors on one device.
        units: Per tensor, whether to count its dead rows; ``None``: for none (and no dead rows are returned).
        scratch: Where the CPU buffer is kept between calls (per device); ``None``: a buffer for this call only.

    Returns:
        ``(counts, dead)``: 1-D tensors in :func:`accum_dtype` (float64 except on MPS), one entry per tensor;
        ``dead`` is 0 for a tensor whose rows are not counted, and ``None`` when ``units`` is ``None``.
    """
    device = tensors[0].device
    n = len(tensors)
    store: dict[torch.device, torch.Tensor] = {} if scratch is None else scratch
    marks = (False,) * n if units is None else units
    seg = _Segments()
    # small tensors by (two dimensions or more, row length): (index, as 2-D or 1-D, entries, segments, measured)
    groups: dict[tuple[bool, int], list[tuple[int, torch.Tensor, int, int, bool]]] = {}
    for k, t in enumerate(tensors):  # (the per-tensor Python work is kept to a few attribute reads)
        numel = t.numel()
        shape = t.shape
        by_row = bool(marks[k]) and len(shape) >= 2 and numel > 0
        if device.type == "cpu" and numel:
            if numel < SCRATCH_MIN:
                if shape and t.dtype in _BUFFERED_DTYPES:
                    if len(shape) == 1:
                        groups.setdefault((False, numel), []).append((k, t, numel, 1, False))
                    else:
                        rows = shape[0]
                        width = numel // rows
                        flat = t if len(shape) == 2 else t.reshape(rows, width)
                        groups.setdefault((True, width), []).append((k, flat, numel, rows, bool(marks[k])))
                    continue
            elif numel <= SCRATCH_MAX:
                counted = _row_nonzeros(t, scratch_buffer(store, device, numel), by_row)
                seg.add(k, counted, by_row, buffered=True)
                continue
        if by_row:
            seg.add(k, torch.count_nonzero(t.reshape(shape[0], -1), dim=1), True)
        else:
            seg.add(k, torch.count_nonzero(t).reshape(1), False)
    for (wide, width), members in groups.items():
        _count_group(members, wide, width, store, device, seg)
    return seg.per_tensor(n, units is not None, device)


class _Segments:
    """The counts of :func:`nonzero_and_dead_rows` as segments (a tensor's rows, or its whole): buffered first."""

    def __init__(self) -> None:
        self.owner: list[int] = []
        self.lengths: list[int] = []
        self.measured: list[bool] = []
        self.f32: list[torch.Tensor] = []  # 1-D float32 counts, from the buffer
        self.i64: list[tuple[int, torch.Tensor, bool]] = []  # (tensor, 1-D int64 counts, measured)

    def add(self, k: int, counts: torch.Tensor, measured: bool, buffered: bool = False) -> None:
        """One tensor's 1-D counts (per row when ``measured``, else one entry)."""
        if buffered:
            self.f32.append(counts)
            self.owner.append(k)
            self.lengths.append(len(counts))
            self.measured.append(measured)
        else:
            self.i64.append((k, counts, measured))

    def per_tensor(self, n: int, units: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each tensor's count and (``units``) dead rows, in tensor order."""
        acc = accum_dtype(device)
        owner, lengths, measured = self.owner, self.lengths, self.measured
        parts = [torch.cat(self.f32).to(acc)] if self.f32 else []
        if self.i64:
            parts.append(torch.cat([c for _, c, _ in self.i64]).to(acc))
            owner = owner + [k for k, _, _ in self.i64]
            lengths = lengths + [len(c) for _, c, _ in self.i64]
            measured = measured + [m for _, _, m in self.i64]
        segments = parts[0] if len(parts) == 1 else torch.cat(parts)
        in_order = owner == list(range(n))
        if len(segments) == n and not (units and any(measured)):  # one segment per tensor: its count
            if not in_order:
                segments = torch.empty_like(segments).index_copy_(0, _on(torch.tensor(owner), device), segments)
            return segments, torch.zeros(n, dtype=acc, device=device) if units else None
        meta = _on(torch.tensor([owner, lengths, measured]), device)
        ends = meta[1].cumsum(0) - 1  # each tensor's last segment
        exact = torch.int64 if acc == torch.float32 else acc  # running sums of counts: exact integers

        def summed(per_segment: torch.Tensor, keep: bool = False) -> torch.Tensor:  # per tensor, in tensor order
            running = per_segment.cumsum(0, dtype=exact)[ends]
            values = torch.diff(running, prepend=running.new_zeros(1)).to(acc)
            values = values * meta[2].to(acc) if keep else values  # (keep: the tensors whose rows are counted)
            return values if in_order else torch.empty_like(values).index_copy_(0, meta[0], values)

        return summed(segments), summed(segments == 0, keep=True) if units else None


def _count_group(
    members: list[tuple[int, torch.Tensor, int, int, bool]],
    wide: bool,
    width: int,
    store: dict[torch.device, torch.Tensor],
    device: torch.device,
    seg: _Segments,
) -> None:
    """Count small tensors of one row length together: copied into the buffer, compared and summed per row."""
    start, m = 0, len(members)
    while start < m:  # blocks of at most SCRATCH_MAX entries
        stop, size = start + 1, members[start][2]
        while stop < m and size + members[stop][2] <= SCRATCH_MAX:
            size += members[stop][2]
            stop += 1
        chunk = members[start:stop] if start or stop < m else members
        block = scratch_buffer(store, device, size)[:size].view(-1, width)
        if wide:  # each tensor's rows, one after the other
            torch.cat([c[1] for c in chunk], out=block)
        else:  # 1-D tensors of one length: one row each
            torch.stack([c[1] for c in chunk], out=block)
        seg.f32.append(block.ne_(0).sum(1))
        seg.owner += [c[0] for c in chunk]
        seg.lengths += [c[3] for c in chunk]
        seg.measured += [c[4] for c in chunk]
        start = stop


def _memory_order(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``t``, or its transpose when ``t`` is a transposed view of a contiguous 2-D tensor (HF ``Conv1D``'s)."""
    if t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous():
        return t.t(), True
    return t, False


def _row_nonzeros(t: torch.Tensor, buf: torch.Tensor, by_row: bool) -> torch.Tensor:
    """``t != 0`` into the float32 buffer, per row (``by_row``; a transposed view per column) or whole: exact."""
    src, flipped = _memory_order(t)
    view = buf[: t.numel()].view(src.shape)
    torch.ne(src, 0, out=view)
    if not by_row:
        return view.sum().reshape(1)
    return view.sum(0) if flipped else view.view(t.shape[0], -1).sum(1)


def abs_max_and_min_nonzero(g: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest ``|g|`` and smallest non-zero ``|g|`` (``inf`` if none) of a float32/16 tensor, through ``buf``.

    ``|g|`` goes into the buffer; the bit patterns of non-negative floats order like the floats, so after
    ``bits - 1`` (a zero becomes -1) masked to 31 bits (-1 becomes the largest int), the smallest int is the
    smallest non-zero ``|g|`` minus one: no mask tensor, no ``masked_fill``, ~1/8 of the cost (CPU).

    Args:
        g: A float32, float16 or bfloat16 tensor with at least one entry.
        buf: A float32 buffer of at least ``g.numel()`` entries on ``g``'s device (overwritten).

    Returns:
        Two float32 device scalars; both NaN when ``g`` holds a NaN, as a plain max and min would be.
    """
    g = _memory_order(g)[0]  # (the same entries)
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


def cache_resident_stats(
    tensors: Sequence[torch.Tensor],
    marks: Sequence[bool],
    full: bool,
    order: float,
    scratch: dict[torch.device, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, ...]:
    """Every statistic of each tensor in turn, while it is in the CPU's cache: one read from memory, not three.

    Taken pass by pass over all the tensors (norms, then zeros, then extremes), each pass reads every gradient
    from memory again; taken tensor by tensor, the later passes find it in cache: ~25% less time for the zero
    counts and the norms, ~30% less with ``stats="full"`` (10 x 1M-entry gradients). For float32/float16/bfloat16
    tensors of :data:`SCRATCH_MIN` to :data:`SCRATCH_MAX` entries, through the reused float32 buffer as
    :func:`nonzero_and_dead_rows` and :func:`abs_max_and_min_nonzero`.

    Args:
        tensors: Non-empty sequence of such tensors on the CPU.
        marks: Per tensor, whether to count its dead rows (tensors of two dimensions or more).
        full: Whether to add max ``|g|``, minus min non-zero ``|g|`` and the sum of ``g``.
        order: The norm order.
        scratch: Where the buffer is kept between calls (per device); ``None``: a buffer for this call only.

    Returns:
        ``(norms, counts, dead)`` and, when ``full``, ``(max_abs, neg_min_abs, sums)``: 1-D tensors, one entry per
        tensor, the norms in float32 and the rest in float64.
    """
    store: dict[torch.device, torch.Tensor] = {} if scratch is None else scratch
    buf = scratch_buffer(store, tensors[0].device, max(t.numel() for t in tensors))
    zero = torch.zeros((), dtype=torch.float32)
    norms, counts, dead, largest, smallest, sums = [], [], [], [], [], []
    for t, mark in zip(tensors, marks, strict=True):
        norms.append(torch.linalg.vector_norm(t, order, dtype=torch.float32))
        by_row = mark and t.dim() >= 2
        rows = _row_nonzeros(t, buf, by_row)  # every partial sum is an integer under 2**24: exact
        counts.append(rows.sum())
        dead.append((rows == 0).sum().float() if by_row else zero)
        if full:
            high, low = abs_max_and_min_nonzero(t, buf)
            largest.append(high)
            smallest.append(low)
            sums.append(t.sum(dtype=torch.float32))
    out = [torch.stack(norms), torch.stack(counts).double(), torch.stack(dead).double()]
    if full:
        out += [torch.stack(largest).double(), -torch.stack(smallest).double(), torch.stack(sums).double()]
    return tuple(out)


def foreach_norm_f32_or_wider(tensors: list[torch.Tensor], order: float) -> list[torch.Tensor]:
    """``_foreach_norm`` accumulated in float32, or in float64 for float64 tensors (which cannot narrow).

    Args:
        tensors: Non-empty list of tensors on one device.
        order: Norm order.

    Returns:
        One 0-d norm per tensor: float32, or float64 for every tensor when some tensor is float64.
    """
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


def foreach_norms(tensors: Sequence[torch.Tensor], order: float) -> torch.Tensor:
    """Per-tensor norms accumulated in float32 (float64 tensors: in float64), stacked.

    An empty tensor (a local shard) has norm 0, also for ``inf``.

    Args:
        tensors: Non-empty sequence of tensors on one device.
        order: Norm order.

    Returns:
        A 1-D tensor of norms, one per tensor.
    """
    tensors = list(tensors)
    if math.isinf(order) and any(t.numel() == 0 for t in tensors):
        whole = [t for t in tensors if t.numel()]
        if not whole:
            return torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device)
        norms = torch.stack(foreach_norm_f32_or_wider(whole, order))
        out = torch.zeros(len(tensors), dtype=norms.dtype, device=norms.device)
        out[torch.tensor([k for k, t in enumerate(tensors) if t.numel()], device=out.device)] = norms
        return out
    return torch.stack(foreach_norm_f32_or_wider(tensors, order))


def layer_sums(
    values: torch.Tensor, index: torch.Tensor, num_layers: int, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-layer sums of per-tensor values: ``out[index[k]] += values[k] * weight[k]``, from zeros.

    Args:
        values: One value per tensor.
        index: The layer of each tensor (``long``, on the same device).
        num_layers: Length of the result; a layer without tensors sums to 0.
        weight: Optional 1/0 per tensor (whether it counts), multiplied in first.

    Returns:
        A 1-D tensor of ``num_layers`` sums, in ``values``' dtype.
    """
    out = torch.zeros(num_layers, dtype=values.dtype, device=values.device)
    return out.index_add_(0, index, values if weight is None else values * weight)


def layer_maxes(values: torch.Tensor, index: torch.Tensor, num_layers: int, neutral: float = 0.0) -> torch.Tensor:
    """Per-layer maxima of per-tensor values (NaN propagates); a layer without tensors gets ``neutral``.

    Args:
        values: One value per tensor.
        index: The layer of each tensor (``long``, on the same device).
        num_layers: Length of the result.
        neutral: The value of a layer without tensors (0 for magnitudes, ``-inf`` for negated ones).

    Returns:
        A 1-D tensor of ``num_layers`` maxima, in ``values``' dtype.
    """
    out = torch.full((num_layers,), neutral, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, index, values, reduce="amax", include_self=False)


def full_stats(
    grads: Sequence[torch.Tensor],
    acc: torch.dtype,
    inv_scale: torch.Tensor | None = None,
    l2_norms: torch.Tensor | None = None,
    scratch: dict[torch.device, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tensor: max ``|g|``, minus the smallest non-zero ``|g|``, sum of ``g``, sum of ``g**2``.

    An empty (local shard of a) tensor contributes the neutral values: 0, -inf, 0, 0. The smallest non-zero
    ``|g|`` is negated so that, like the others, it combines across tensors and ranks by a maximum.

    Args:
        grads: Non-empty sequence of tensors on one device.
        acc: The accumulation dtype of the results (:func:`accum_dtype`).
        inv_scale: Reciprocal of a loss scale still contained in ``grads``, multiplied into every result.
        l2_norms: The tensors' L2 norms in ``acc`` when already taken (their squares are the sums of ``g**2``).
        scratch: Where the CPU buffer is kept between calls (per device); ``None``: a buffer for this call only.

    Returns:
        Four 1-D tensors in ``acc``, one entry per tensor.
    """
    device = grads[0].device
    store: dict[torch.device, torch.Tensor] = {} if scratch is None else scratch
    max_l, neg_min_l, sums = [], [], []
    zero = torch.zeros((), dtype=acc, device=device)
    neg_inf = torch.full((), -math.inf, dtype=acc, device=device)
    for g in grads:
        if g.numel() == 0:
            max_l.append(zero)
            neg_min_l.append(neg_inf)
            sums.append(zero)
            continue
        if device.type == "cpu" and g.dtype in _BUFFERED_DTYPES and SCRATCH_MIN <= g.numel() <= SCRATCH_MAX:
            largest, smallest = abs_max_and_min_nonzero(g, scratch_buffer(store, device, g.numel()))
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
    sq = (l2_norms if l2_norms is not None else foreach_norms(grads, 2.0).to(acc)).square()
    if inv_scale is not None:
        max_abs, neg_min_abs, sums_t = max_abs * inv_scale, neg_min_abs * inv_scale, sums_t * inv_scale
        sq = sq * (inv_scale * inv_scale)
    return max_abs, neg_min_abs, sums_t, sq
