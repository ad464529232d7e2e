"""Per-layer histograms of the gradient entries, computed on the device and copied to the host in one transfer."""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_gradhealth.model.distributed import Reduction, counted, local, reduce_sum_max, resolve, sum_over
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.stats.kernels import accum_dtype, stat_grads

__all__ = ["layer_histograms"]


@torch.no_grad()
def layer_histograms(
    layout: ParamLayout,
    bins: int = 64,
    grad_scale: torch.Tensor | None = None,
    reduction: Reduction | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-layer histograms of the gradient entries, computed on the device, copied in one transfer.

    Bucket edges span each layer's [min, max] evenly; no gradient is copied to the host. The zeros a sparse
    gradient does not store (its untouched rows) are counted in the bucket of 0. Sharded gradients take two
    collectives: the layers' global [min, max] (the edges), then the summed bucket counts.

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
    acc = accum_dtype(device)
    sharded = red.shard_group is not None
    # copies of a tensor (whole on every rank of the group, or replicated over a mesh dimension) count once
    keep = counted(red, [layout.params[i] for i in present]) if sharded else None
    by_layer: dict[int, list[torch.Tensor]] = {}
    implicit = [0] * layout.num_layers  # zeros a sparse gradient does not store (its untouched rows)
    for k, (i, g) in enumerate(zip(present, grads, strict=True)):
        flat = local(g).detach().reshape(-1)
        by_layer.setdefault(layout.layer_of_param[i], [])
        if i in layout.sparse:
            implicit[layout.layer_of_param[i]] += layout.params[i].numel() - flat.numel()
        if flat.numel() and (keep is None or keep[k]):
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
