"""Multi-tensor (horizontal) statistics for accelerators: a few kernels per block of rows, not per tensor.

On a GPU, one kernel per tensor is launch-bound: a 350M-parameter transformer has ~300 gradient tensors, and three
small launches each (``ne``, ``sum``, a copy) cost more than reading the whole gradient once. Here the tensors'
rows are copied together, by row length and dtype, into a reused buffer of at most ``block`` entries
(:data:`BLOCK`; one batched ``torch.cat`` a block), and every statistic is taken per row on the whole block at
once: the number of launches grows with the number of blocks, not with the number of tensors. The per-row results
are then combined per tensor with one ``index_add``/``scatter_reduce`` each, in float64
(:func:`~.kernels.accum_dtype`).

- Exact zero counts: ``linalg.vector_norm(block, 0, dim=1)`` counts the non-zero entries of each row (NaN counts,
  -0.0 does not); a row is at most ``2**24`` entries wide, so its float32 count is exact. Dead rows (every entry
  zero) are the rows counted 0 of the tensors whose units are counted.
- ``stats="full"``: row sums, row maxima of ``|g|``, and the smallest non-zero ``|g|`` per row through the bit
  patterns of ``|g|`` (as :func:`~.kernels.abs_max_and_min_nonzero` does), all on the same block; or, where
  Triton is available, all four in one read by the fused kernel of :mod:`~.triton_kernels`.
- A tensor of :data:`DIRECT_MIN` entries or more is read where it lies (no copy) when counting zeros only, or by
  the fused kernel.

Float64 tensors (a float32 copy could underflow), rows wider than the block and sparse values go through the
per-tensor functions of :mod:`~.kernels`; empty tensors contribute the neutral values. The CPU keeps the
per-tensor kernels (:func:`use_horizontal`), which are faster there, except for the extremes of many small
tensors (:func:`gradient_stats`); tests run every path on CPU tensors.
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_gradhealth.stats.kernels import (
    SCRATCH_MAX,
    SCRATCH_MIN,
    accum_dtype,
    cache_resident_stats,
    foreach_norms,
    full_stats,
    nonzero_and_dead_rows,
    scratch_buffer,
)

__all__ = [
    "BLOCK",
    "DIRECT_MIN",
    "MAX_WIDTH",
    "HorizontalPlan",
    "disable_fused",
    "fused_available",
    "gradient_stats",
    "horizontal_stats",
    "use_horizontal",
    "with_squares",
]

BLOCK = 2**25
"""Most entries of one block (128 MB in float32); a block's kernels read it whole."""
DIRECT_MIN = 2**22
"""Counting zeros only, tensors of this many entries or more are read where they lie (one kernel, no copy)."""

MAX_WIDTH = 2**16
"""Widest row the fused kernel reads (wider rows: the eager kernels)."""

_WIDEST = 2**24  # float32 counts of a row stay exact integers
_FUSED = {"disabled": False}
_INT32_MAX = 0x7FFFFFFF
_BUFFERED = (torch.float32, torch.float16, torch.bfloat16)


def use_horizontal(device: torch.device) -> bool:
    """Whether the engine takes the multi-tensor path on ``device``: on CUDA, where per-tensor launches dominate.

    On the CPU the per-tensor kernels of :mod:`~.kernels` are faster (no copy, and ``vector_norm(x, 0)`` is
    not vectorised there).
    """
    return device.type == "cuda"


def fused_available(device: torch.device) -> bool:
    """Whether the fused Triton kernel runs on ``device``: CUDA with Triton installed, or its interpreter (tests).

    The interpreter runs CPU tensors when ``TRITON_INTERPRET=1``. :mod:`~.triton_kernels` (and so Triton) is
    imported on first use only.
    """
    if _FUSED["disabled"] or importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def disable_fused(error: BaseException) -> None:
    """Stop using the fused kernel (it failed to compile or run here), saying why once."""
    if not _FUSED["disabled"]:
        message = f"lightning_gradhealth: fused Triton kernel disabled ({error!r}); eager kernels used"
        warnings.warn(message, stacklevel=3)
    _FUSED["disabled"] = True


def gradient_stats(
    tensors: Sequence[torch.Tensor],
    units: Sequence[bool] | None,
    full: bool,
    order: float = 2.0,
    inv_scale: torch.Tensor | None = None,
    scratch: dict[torch.device, torch.Tensor] | None = None,
    plans: dict[tuple[object, ...], HorizontalPlan] | None = None,
    horizontal: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
    """The engine's per-tensor statistics of the gradients: the one place their kernels are chosen.

    Accelerators (:func:`use_horizontal`): foreach norms and the multi-tensor blocks of :func:`horizontal_stats`.
    The CPU: float32/16 tensors of :data:`~.kernels.SCRATCH_MIN` to :data:`~.kernels.SCRATCH_MAX` entries one at a
    time, every statistic while the tensor is in cache (:func:`~.kernels.cache_resident_stats`); the others through
    :func:`~.kernels.nonzero_and_dead_rows` (small ones grouped) and, for ``full``, :func:`_cpu_full_stats`.

    Args:
        tensors: Non-empty sequence of tensors on one device.
        units: Per tensor, whether to count its dead rows; ``None``: for none.
        full: Whether to add max ``|g|``, minus min non-zero ``|g|``, sum and sum of squares
            (:func:`~.kernels.full_stats`).
        order: The norm order.
        inv_scale: Reciprocal of a loss scale still contained in ``tensors``, multiplied into the full statistics
            (not into the norms).
        scratch: Where the float32 buffer is kept between calls (per device).
        plans: Where the multi-tensor plans are kept between calls.
        horizontal: Force the multi-tensor path (``True``) or the CPU's (``False``); ``None``: by device.

    Returns:
        ``(norms, counts, dead, full_stats)`` in :func:`~.kernels.accum_dtype`: ``dead`` is ``None`` when ``units``
        is, ``full_stats`` (four tensors, as :func:`~.kernels.full_stats`) when ``full``.
    """
    device = tensors[0].device
    acc = accum_dtype(device)
    n = len(tensors)
    if use_horizontal(device) if horizontal is None else horizontal:
        norms = foreach_norms(tensors, order).to(acc)
        counts, dead, extremes = horizontal_stats(tensors, units, full, scratch, plans)
        l2 = norms if order == 2.0 else None
        stats = None if extremes is None else with_squares(extremes, tensors, acc, inv_scale, l2)
        return norms, counts.to(acc), dead, stats
    cached = (
        [k for k, t in enumerate(tensors) if t.dtype in _BUFFERED and SCRATCH_MIN <= t.numel() <= SCRATCH_MAX]
        if device.type == "cpu"
        else []
    )
    if not cached:
        norms = foreach_norms(tensors, order).to(acc)
        counts, dead = nonzero_and_dead_rows(tensors, units, scratch)
        l2 = norms if order == 2.0 else None
        stats = _cpu_full_stats(tensors, acc, inv_scale, l2, scratch, plans) if full else None
        return norms, counts.to(acc), dead, stats
    marks = [False] * n if units is None else [bool(u) for u in units]
    parts = [cache_resident_stats([tensors[k] for k in cached], [marks[k] for k in cached], full, order, scratch)]
    chosen = set(cached)
    rest = [k for k in range(n) if k not in chosen]
    if rest:
        sub = [tensors[k] for k in rest]
        others = [foreach_norms(sub, order), *nonzero_and_dead_rows(sub, [marks[k] for k in rest], scratch)]
        if full:
            no_l2 = torch.zeros(len(sub), dtype=acc)  # (the squares are taken below)
            others += _cpu_full_stats(sub, acc, None, no_l2, scratch, plans)[:3]
        parts.append(tuple(others))  # type: ignore[arg-type]
    at = [torch.tensor(cached), torch.tensor(rest)]
    merged = [torch.empty(n, dtype=acc) for _ in parts[0]]
    for where, values in zip(at, parts, strict=False):
        for into, part in zip(merged, values, strict=True):
            into.index_copy_(0, where, part.to(acc))
    norms, counts, dead = merged[:3]
    l2 = norms if order == 2.0 else None
    stats = with_squares(tuple(merged[3:]), tensors, acc, inv_scale, l2) if full else None  # type: ignore[arg-type]
    return norms, counts, None if units is None else dead, stats


def _cpu_full_stats(
    tensors: Sequence[torch.Tensor],
    acc: torch.dtype,
    inv_scale: torch.Tensor | None,
    l2_norms: torch.Tensor | None,
    scratch: dict[torch.device, torch.Tensor] | None,
    plans: dict[tuple[object, ...], HorizontalPlan] | None,
) -> tuple[torch.Tensor, ...]:
    """:func:`~.kernels.full_stats`, with the small float32/16 tensors' extremes and sums taken in blocks.

    Per tensor, the extremes cost ~6 kernels: on many small tensors (a transformer's biases and norms, 500 small
    layers) the blocks of :func:`horizontal_stats` (without counts) are ~2x faster on the CPU; tensors of
    :data:`~.kernels.SCRATCH_MIN` entries or more keep the per-tensor buffered kernels, faster there.
    """
    small = [k for k, t in enumerate(tensors) if t.dtype in _BUFFERED and 0 < t.numel() < SCRATCH_MIN]
    if len(small) < 8:  # a few kernels saved at most
        return full_stats(tensors, acc, inv_scale, l2_norms, scratch)
    device = tensors[0].device
    n = len(tensors)
    out = (
        torch.zeros(n, dtype=acc, device=device),
        torch.full((n,), -math.inf, dtype=acc, device=device),
        torch.zeros(n, dtype=acc, device=device),
    )
    extremes = horizontal_stats([tensors[k] for k in small], None, True, scratch, plans, fused=False, count=False)[2]
    at = torch.tensor(small, dtype=torch.long, device=device)
    for into, values in zip(out, extremes, strict=True):  # type: ignore[arg-type]
        into.index_copy_(0, at, values)
    chosen = set(small)
    big = [k for k in range(n) if k not in chosen]
    if big:
        no_l2 = torch.zeros(len(big), dtype=acc, device=device)  # (the squares are taken below)
        per_tensor = full_stats([tensors[k] for k in big], acc, None, no_l2, scratch)
        at = torch.tensor(big, dtype=torch.long, device=device)
        for into, values in zip(out, per_tensor[:3], strict=True):
            into.index_copy_(0, at, values)
    return with_squares(out, tensors, acc, inv_scale, l2_norms)


@dataclass(frozen=True)
class HorizontalPlan:
    """How one list of tensors is cut into blocks (kept between steps for the same shapes).

    Attributes:
        blocks: Per block: its row width, whether it is a tensor read where it lies, and its pieces
            ``(tensor index, first row, row after the last)``.
        rest: Indices of the tensors left to the per-tensor functions (float64, rows too wide).
        owner: Per row of the concatenated per-row results, its tensor (``long``, on the device).
        measured: Per row, 1 if its tensor's dead rows are counted, else 0 (accumulation dtype, on the device).
        buffer: Entries of the largest copied block (the buffer holds no more).
    """

    blocks: tuple[tuple[int, bool, tuple[tuple[int, int, int], ...]], ...]
    rest: tuple[int, ...]
    owner: torch.Tensor
    measured: torch.Tensor
    buffer: int = 0


def _rows(t: torch.Tensor) -> tuple[int, int]:
    """A tensor as ``(rows, width)``: its slices along dim 0 for two dimensions or more, else one row."""
    if t.dim() >= 2:
        return t.shape[0], t.numel() // t.shape[0]
    return 1, t.numel()


def _plan(
    tensors: Sequence[torch.Tensor], marks: Sequence[bool], full: bool, block: int, acc: torch.dtype, fused: bool
) -> HorizontalPlan:
    device = tensors[0].device
    # (width, dtype, 1-D) -> (tensor, rows): one dtype a block (one batched cat); 1-D tensors apart (stacked whole)
    by_width: dict[tuple[int, torch.dtype, bool], list[tuple[int, int]]] = {}
    direct: list[tuple[int, int, int]] = []  # (tensor, rows, width)
    rest: list[int] = []
    for k, t in enumerate(tensors):
        numel = t.numel()
        if not numel:
            continue  # the neutral values: nothing to read
        rows, width = _rows(t)
        if t.dtype not in _BUFFERED or width > min(block, _WIDEST):
            rest.append(k)
        elif numel >= DIRECT_MIN and (not full or (fused and width <= MAX_WIDTH and t.is_contiguous())):
            direct.append((k, rows, width))
        else:
            by_width.setdefault((width, t.dtype, t.dim() == 1), []).append((k, rows))
    blocks: list[tuple[int, bool, tuple[tuple[int, int, int], ...]]] = [
        (width, True, ((k, 0, rows),)) for k, rows, width in direct
    ]
    for (width, _, _), members in by_width.items():
        capacity = block // width  # rows per block
        pieces: list[tuple[int, int, int]] = []
        room = capacity
        for k, rows in members:
            start = 0
            while start < rows:
                take = min(room, rows - start)
                pieces.append((k, start, start + take))
                start += take
                room -= take
                if room == 0:
                    blocks.append((width, False, tuple(pieces)))
                    pieces, room = [], capacity
        if pieces:
            blocks.append((width, False, tuple(pieces)))
    owners = [k for _, _, pieces in blocks for k, a, b in pieces for _ in range(b - a)]
    measured = [1.0 if marks[k] and tensors[k].dim() >= 2 else 0.0 for k in owners]
    return HorizontalPlan(
        blocks=tuple(blocks),
        rest=tuple(rest),
        owner=torch.tensor(owners, dtype=torch.long).to(device, non_blocking=True),
        measured=torch.tensor(measured, dtype=acc).to(device, non_blocking=True),
        buffer=max((width * sum(b - a for _, a, b in p) for width, d, p in blocks if not d), default=0),
    )


def _piece(t: torch.Tensor, width: int, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``t`` seen as rows of ``width`` entries (``t`` itself when that is all of it)."""
    if t.dim() != 2:
        t = t.reshape(-1, width)
    return t if start == 0 and stop == t.shape[0] else t[start:stop]


def _per_row(
    plan: HorizontalPlan,
    tensors: Sequence[torch.Tensor],
    full: bool,
    store: dict[torch.device, torch.Tensor],
    fused: bool,
    count: bool = True,
) -> list[list[torch.Tensor]]:
    """The per-row results of every block, in the plan's row order: counts, and (``full``) sums, max, min."""
    device = tensors[0].device
    out: list[list[torch.Tensor]] = [[], [], [], []]  # counts, sums, max |g|, min non-zero |g|
    for width, direct, pieces in plan.blocks:
        if direct:  # read where it lies
            view = tensors[pieces[0][0]].reshape(-1, width)
        else:  # copied into the buffer, rows of several tensors one after the other
            rows = sum(b - a for _, a, b in pieces)
            buf = scratch_buffer(store, device, plan.buffer).view(tensors[pieces[0][0]].dtype)  # 16-bit: 2x
            view = buf[: rows * width].view(rows, width)
            first = tensors[pieces[0][0]]
            if first.dim() == 1 and len(pieces) > 1:  # whole 1-D tensors of one length: no per-tensor view
                torch.stack([tensors[k] for k, _, _ in pieces], out=view)
            else:  # (a whole 2-D tensor goes in as it is; the rest, as rows of the block's width)
                parts = [_piece(tensors[k], width, a, b) for k, a, b in pieces]
                if len(parts) == 1:
                    view.copy_(parts[0])
                else:
                    torch.cat(parts, out=view)
        if full and fused and width <= MAX_WIDTH:  # one read for all four
            from lightning_gradhealth.stats import triton_kernels  # (imports Triton: only where it runs)

            for into, values in zip(out, triton_kernels.row_stats(view), strict=True):
                into.append(values)
            continue
        if count:
            out[0].append(torch.linalg.vector_norm(view, 0, dim=1, dtype=torch.float32))  # NaN counts, -0.0 not
        if full:
            if direct:  # (planned only for the fused kernel) the eager kernels below overwrite the block
                raise RuntimeError("a gradient read where it lies must not be modified")
            out[1].append(view.sum(1, dtype=torch.float32))
            view.abs_()
            out[2].append(view.amax(1).float())
            as_int, top = (torch.int32, _INT32_MAX) if view.dtype == torch.float32 else (torch.int16, 0x7FFF)
            bits = view.view(as_int)  # |g| >= 0: its bits order like it; a zero becomes the largest int
            low = bits.sub_(1).bitwise_and_(top).amin(1)
            out[3].append(torch.where(low == top, math.inf, (low + 1).view(view.dtype).float()))
    return out


def horizontal_stats(
    tensors: Sequence[torch.Tensor],
    units: Sequence[bool] | None = None,
    full: bool = False,
    scratch: dict[torch.device, torch.Tensor] | None = None,
    plans: dict[tuple[object, ...], HorizontalPlan] | None = None,
    block: int = BLOCK,
    fused: bool | None = None,
    count: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Per tensor: exact non-zero counts, dead rows, and (``full``) max ``|g|``, minus min non-zero ``|g|``, sum.

    The same numbers as :func:`~.kernels.nonzero_and_dead_rows` and the first three of :func:`~.kernels.full_stats`
    (without a loss scale: the caller multiplies it in), computed block by block (see the module docstring).

    Args:
        tensors: Non-empty sequence of tensors on one device.
        units: Per tensor, whether to count its dead rows; ``None``: for none (and no dead rows are returned).
        full: Whether to add the extremes and sums.
        scratch: Where the float32 buffer is kept between calls (per device); ``None``: one for this call only.
        plans: Where the plan of each list of shapes is kept between calls; ``None``: planned for this call only.
        block: Entries of the buffer (at least one row of each tensor fits, else the tensor goes per tensor).
        fused: Whether ``full`` statistics use the fused Triton kernel (:mod:`~.triton_kernels`); ``None``: where
            it is available. A kernel that fails is disabled, with a warning, and the eager kernels take over.
        count: Whether to count (``False``: counts and dead rows are zeros; the extremes alone, eager).

    Returns:
        ``(counts, dead, extremes)``: 1-D tensors in :func:`~.kernels.accum_dtype`, one entry per tensor;
        ``dead`` is ``None`` when ``units`` is ``None``; ``extremes`` is ``(max_abs, neg_min_abs, sums)`` when
        ``full`` (empty tensors: 0, -inf, 0), else ``None``.
    """
    device = tensors[0].device
    acc = accum_dtype(device)
    n = len(tensors)
    fused = full and (fused_available(device) if fused is None else fused)
    marks = (False,) * n if units is None else tuple(bool(u) for u in units)
    key = (device, full, block, fused, count, marks, tuple((t.shape, t.dtype) for t in tensors))
    plan = None if plans is None else plans.get(key)
    if plan is None:
        plan = _plan(tensors, marks, full, block, acc, fused)
        if plans is not None:
            if len(plans) > 8:
                plans.clear()
            plans[key] = plan
    store: dict[torch.device, torch.Tensor] = {} if scratch is None else scratch
    try:
        counts_r, sums_r, max_r, min_r = _per_row(plan, tensors, full, store, fused, count)
    except Exception as error:  # a kernel that does not compile here: the eager ones
        if not fused:
            raise
        disable_fused(error)
        return horizontal_stats(tensors, units, full, scratch, plans, block, False, count)
    rest = list(plan.rest)
    owner = plan.owner
    zeros = torch.zeros(n, dtype=acc, device=device)
    counts = zeros.clone()
    dead = None if units is None else zeros.clone()
    if counts_r:
        per_row = torch.cat(counts_r) if len(counts_r) > 1 else counts_r[0]
        counts.index_add_(0, owner, per_row.to(acc))
        if dead is not None:
            dead.index_add_(0, owner, (per_row == 0).to(acc) * plan.measured)
    extremes = None
    if full:
        max_abs = zeros.clone()
        sums = zeros.clone()
        smallest = torch.full((n,), math.inf, dtype=acc, device=device)
        if sums_r:
            sums.index_add_(0, owner, torch.cat(sums_r).to(acc))
            max_abs.scatter_reduce_(0, owner, torch.cat(max_r).to(acc), reduce="amax", include_self=False)
            smallest.scatter_reduce_(0, owner, torch.cat(min_r).to(acc), reduce="amin", include_self=False)
        neg_min = torch.where(torch.isnan(max_abs), max_abs, -smallest)  # NaN present: NaN, as a plain min
        extremes = (max_abs, neg_min, sums)
    if rest:  # float64, rows too wide: per tensor
        at = torch.tensor(rest, dtype=torch.long).to(device, non_blocking=True)
        sub = [tensors[k] for k in rest]
        c, d = nonzero_and_dead_rows(sub, [marks[k] for k in rest] if units is not None else None, store)
        counts.index_copy_(0, at, c.to(acc))
        if dead is not None and d is not None:
            dead.index_copy_(0, at, d.to(acc))
        if extremes is not None:
            fs = full_stats(sub, acc, None, torch.zeros(len(sub), dtype=acc, device=device), store)
            for out, values in zip(extremes, fs[:3], strict=True):
                out.index_copy_(0, at, values)
    return counts, dead, extremes


def with_squares(
    extremes: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    tensors: Sequence[torch.Tensor],
    acc: torch.dtype,
    inv_scale: torch.Tensor | None = None,
    l2_norms: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`horizontal_stats`' extremes and sums completed as :func:`~.kernels.full_stats` returns them.

    Args:
        extremes: ``(max_abs, neg_min_abs, sums)`` from :func:`horizontal_stats`.
        tensors: The tensors they were taken from.
        acc: The accumulation dtype.
        inv_scale: Reciprocal of a loss scale still contained in the tensors, multiplied into every result.
        l2_norms: The tensors' L2 norms in ``acc`` when already taken (their squares are the sums of ``g**2``).

    Returns:
        ``(max_abs, neg_min_abs, sums, sums_of_squares)`` in ``acc``.
    """
    max_abs, neg_min, sums = extremes
    sq = (l2_norms if l2_norms is not None else foreach_norms(tensors, 2.0).to(acc)).square()
    if inv_scale is not None:
        max_abs, neg_min, sums = max_abs * inv_scale, neg_min * inv_scale, sums * inv_scale
        sq = sq * (inv_scale * inv_scale)
    return max_abs, neg_min, sums, sq
