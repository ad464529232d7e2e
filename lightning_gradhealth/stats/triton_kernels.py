"""Fused Triton kernel: every per-row gradient statistic of a 2-D view in one read.

:func:`row_stats` gives, per row of a ``(rows, width)`` view, the number of non-zero entries (NaN counts, -0.0
does not), the sum, the largest ``|g|`` and the smallest non-zero ``|g|`` (``inf`` without one; both NaN when the
row holds a NaN), reading each entry once, in float32 whatever the view's dtype. The multi-tensor path
(:mod:`~lightning_gradhealth.stats.horizontal`) uses it with ``stats="full"`` on CUDA in place of its ~10 eager kernels
per block, and on large tensors where they lie, without a copy.

Optional: this module imports Triton (which ships with CUDA builds of torch) and is imported only where the kernel
runs (:func:`~lightning_gradhealth.stats.horizontal.fused_available`); without Triton, or after a failed compilation,
the eager multi-tensor kernels are used. On the CPU, tests run the kernel through Triton's interpreter
(``TRITON_INTERPRET=1`` before Triton is first imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["row_stats"]

_CHUNK = 1024  # columns a program reads at a time
_TILE = 2048  # entries a program reads at a time: ROWS x CHUNK


@triton.jit
def _row_stats_kernel(  # noqa: ANN202 - a Triton kernel: its arguments' types are Triton's to infer
    x_ptr,  # noqa: ANN001
    stride,  # noqa: ANN001
    rows,  # noqa: ANN001
    width,  # noqa: ANN001
    cnt_ptr,  # noqa: ANN001
    sum_ptr,  # noqa: ANN001
    max_ptr,  # noqa: ANN001
    min_ptr,  # noqa: ANN001
    ROWS: tl.constexpr,
    CHUNK: tl.constexpr,
):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # this program's rows, read CHUNK columns at a time
    live = r < rows
    base = x_ptr + r.to(tl.int64)[:, None] * stride
    cnt = tl.zeros([ROWS, CHUNK], dtype=tl.int32)
    nan = tl.zeros([ROWS, CHUNK], dtype=tl.int32)
    total = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
    high = tl.zeros([ROWS, CHUNK], dtype=tl.float32)
    low = tl.full([ROWS, CHUNK], float("inf"), dtype=tl.float32)
    for start in range(0, width, CHUNK):
        c = start + tl.arange(0, CHUNK)
        x = tl.load(base + c[None, :], mask=live[:, None] & (c < width)[None, :], other=0.0).to(tl.float32)
        a = tl.abs(x)
        cnt += (x != 0).to(tl.int32)
        nan += (x != x).to(tl.int32)
        total += x
        high = tl.maximum(high, a)
        low = tl.minimum(low, tl.where(a == 0, float("inf"), a))
    has_nan = tl.sum(nan, axis=1) > 0
    tl.store(cnt_ptr + r, tl.sum(cnt, axis=1).to(tl.float32), mask=live)
    tl.store(sum_ptr + r, tl.sum(total, axis=1), mask=live)
    tl.store(max_ptr + r, tl.where(has_nan, float("nan"), tl.max(high, axis=1)), mask=live)
    tl.store(min_ptr + r, tl.where(has_nan, float("nan"), tl.min(low, axis=1)), mask=live)


def row_stats(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``view``: non-zero count, sum, max ``|g|``, min non-zero ``|g|``, as float32 vectors.

    Args:
        view: A 2-D float32/float16/bfloat16 tensor whose rows are contiguous (``stride(1) == 1``).

    Returns:
        Four 1-D float32 tensors of ``view.shape[0]`` entries.
    """
    rows, width = view.shape
    out = torch.empty(4, rows, dtype=torch.float32, device=view.device)
    if rows:
        chunk = max(16, min(_CHUNK, 1 << (width - 1).bit_length()))  # narrow rows: several per program
        per = _TILE // chunk
        grid = ((rows + per - 1) // per,)
        _row_stats_kernel[grid](view, view.stride(0), rows, width, *out, ROWS=per, CHUNK=chunk)
    return out[0], out[1], out[2], out[3]
