"""The host side of a step: the one device-to-host copy, read back by name into per-layer records.

:func:`outgoing` is the tensor that crosses; :func:`transfer` copies it (or takes a copy made earlier) and reads it
by name (:class:`~lightning_gradhealth.stats.pack.PackValues`); :func:`layer_stats` turns the per-layer blocks into
:class:`~lightning_gradhealth.schema.record.LayerStats`. :meth:`~lightning_gradhealth.stats.engine.GradStatsEngine.
finish` puts them together into the step's record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_gradhealth.model.distributed import min_valid_over
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.schema.record import LayerStats
from lightning_gradhealth.stats.pack import PackValues
from lightning_gradhealth.stats.pending import PendingStats

__all__ = ["first_micro_batch_anywhere", "layer_stats", "outgoing", "transfer"]


def outgoing(pending: PendingStats) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The device tensor that goes to the host: the packed values with the extras appended (and their names)."""
    names = tuple(pending.extras)
    packed = pending.packed
    if names:
        extra = torch.stack([pending.extras[k].detach().to(packed.dtype).reshape(()) for k in names])
        packed = torch.cat([packed, extra])
    return packed, names


def transfer(pending: PendingStats, values: list[float] | None = None) -> tuple[PackValues, dict[str, float]]:
    """The one device-to-host copy (``values``: already copied), read back by name: ``(values, extras)``."""
    names = tuple(pending.extras)
    if values is None:
        values = outgoing(pending)[0].tolist()
    extras = dict(zip(names, values[len(values) - len(names) :], strict=True))
    return PackValues(pending.schema, values), extras


def layer_stats(
    layout: ParamLayout,
    host: PackValues,
    numels: Sequence[int],
    nonfinite: tuple[Sequence[int], Sequence[int]],
    units_l: Sequence[int | None],
    eps: float,
) -> list[LayerStats]:
    """The per-layer records of a step, from its per-layer blocks (layers without an element here are left out).

    Args:
        layout: The layout the statistics were computed for.
        host: The step's values, read back by name.
        numels: Per layer, the elements of its parameters that have a gradient.
        nonfinite: Per layer, the NaN and the Inf counts (zeros when not counted).
        units_l: Per layer, its units (rows), or ``None`` when it has none or they cannot be told.
        eps: Added to the parameter norm in the grad/param ratio.
    """
    n = layout.num_layers
    nan_l, inf_l = nonfinite
    g, p, nz = host.get("grad_norm"), host.get("param_norm"), host.get("nonzero")
    full = "max_abs" in host  # stats="full"
    dead = host.get("dead_units") if "dead_units" in host else [0.0] * n
    mx, mn, s, sq = (host.get(k) if full else [] for k in ("max_abs", "min_abs_nonzero", "sum", "sum_squares"))
    layers: list[LayerStats] = []
    for j in range(n):
        if numels[j] == 0:
            continue
        numel = numels[j]
        units = units_l[j]
        kwargs: dict[str, float | None] = {}
        if full:
            mean = s[j] / numel
            var = max(sq[j] / numel - mean * mean, 0.0)
            kwargs = {"max_abs": mx[j], "min_abs_nonzero": mn[j], "mean": mean, "std": math.sqrt(var)}
        layers.append(
            LayerStats(
                name=layout.layer_names[j],
                numel=numel,
                grad_norm=g[j],
                param_norm=p[j],
                ratio=g[j] / (p[j] + eps),
                zero_frac=(numel - nz[j]) / numel,
                nan_count=nan_l[j],
                inf_count=inf_l[j],
                units=units,
                dead_unit_frac=None if units is None else dead[j] / units,
                **kwargs,  # type: ignore[arg-type]
            )
        )
    return layers


def first_micro_batch_anywhere(micro: float | None, pending: PendingStats) -> float | None:
    """The first micro-batch that went non-finite on any rank (each rank saw its own gradient or shard go bad)."""
    device = pending.packed.device
    value = None if micro is None else int(micro)
    for group in (pending.reduction.shard_group, pending.reduction.replica_group):
        if group is not None:
            value = min_valid_over(value, group, device)
    return value
