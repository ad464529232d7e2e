"""The per-layer blocks of a step: what each rank contributes, what is derived once combined, how the host reads them.

A statistic of a layer is a block of ``num_layers`` numbers in the step's
:class:`~lightning_gradhealth.stats.pack.Pack`: :func:`contributions` adds this rank's sums and maxima (combined over
the sharding group by name), :func:`derive` the values computed from the combined blocks (norms, the global ones), and
:func:`layer_stats` reads the blocks back on the host into :class:`~lightning_gradhealth.schema.record.LayerStats`.
A new per-layer statistic is one ``add_sum`` or ``add_max`` line here, one ``get`` below, its field in
:mod:`~lightning_gradhealth.schema.record` and its key in :mod:`~lightning_gradhealth.schema.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from lightning_gradhealth.model.distributed import Reduction, mean_over
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.model.stages import stage_norm
from lightning_gradhealth.schema.record import LayerStats
from lightning_gradhealth.stats.kernels import accum_dtype, layer_maxes, layer_sums
from lightning_gradhealth.stats.pack import Pack, PackValues

__all__ = ["contributions", "derive", "layer_stats"]


def contributions(
    layout: ParamLayout,
    present: tuple[int, ...],
    sharded: bool,
    local_g: list[torch.Tensor],
    layers: tuple[torch.Tensor, torch.Tensor | None],
    per_tensor: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, Any],
    norm_type: float,
    per_layer: bool,
) -> Pack:
    """This rank's per-layer contributions (blocks of ``num_layers`` numbers), to combine over the shards by name.

    Args:
        layout: The parameters looked at.
        present: Indices (into the layout) of the parameters with a gradient.
        sharded: Whether the gradients are sharded (element counts and presence are then combined too).
        local_g: This rank's gradients (or shards), aligned with ``present``.
        layers: Each present tensor's layer, and its weight (``None``: 1 for all; tensors whole on every rank of
            the sharding group count on their first rank only).
        per_tensor: The gradients' (unscaled) and parameters' norms, nonzero counts, dead rows and the
            ``stats="full"`` extremes and sums, per present tensor.
        norm_type: Order of the norms.
        per_layer: Whether the per-layer blocks go to the host (else only the global values derived from them).
    """
    g_norm, p_norm, nonzero, dead_rows, full = per_tensor
    index, weight = layers
    device, n, p, layer = index.device, layout.num_layers, norm_type, per_layer
    acc = accum_dtype(device)
    layer_sum = partial(layer_sums, index=index, num_layers=n, weight=weight)
    layer_max = partial(layer_maxes, index=index, num_layers=n)  # a layer with nothing here: the neutral value
    pack = Pack()
    if math.isinf(p):
        pack.add_max("grad_norm", layer_max(g_norm), send=layer)
        pack.add_max("param_norm", layer_max(p_norm), send=layer)
    else:
        pack.add_sum("grad_norm_pow", layer_sum(g_norm.pow(p)), send=False)
        pack.add_sum("param_norm_pow", layer_sum(p_norm.pow(p)), send=False)
    pack.add_sum("nonzero", layer_sum(nonzero), send=layer)
    if dead_rows is not None:  # FSDP2 shards hold whole rows: the ranks' dead rows add up
        pack.add_sum("dead_units", layer_sum(dead_rows.to(acc)))
    if sharded:  # element counts of the local shards (FSDP1's are flat pieces, FSDP2's may be empty)
        numel = torch.tensor([float(g.numel()) for g in local_g], dtype=acc).to(device, non_blocking=True)
        pack.add_sum("numel", layer_sum(numel), send=layer)
        # which parameters have a gradient on some rank (FSDP1: not an empty shard)
        at = torch.tensor(present, dtype=torch.long).to(device, non_blocking=True)  # may be empty
        pack.add_sum("presence", torch.zeros(len(layout.params), dtype=acc, device=device).index_fill_(0, at, 1.0))
    if full is not None:
        max_abs, neg_min_abs, g_sum, g_sq = full
        pack.add_sum("sum", layer_sum(g_sum), send=layer)
        pack.add_sum("sum_squares", layer_sum(g_sq), send=layer)
        pack.add_max("max_abs", layer_max(max_abs), send=layer)
        pack.add_max("neg_min_abs_nonzero", layer_max(neg_min_abs, neutral=-math.inf), send=False)
    return pack


def derive(pack: Pack, red: Reduction, norm_type: float, per_layer: bool, full: bool) -> None:
    """Add the values derived from the combined blocks: layer and global norms, the layer-norm ratio's terms."""
    p, layer = norm_type, per_layer
    if math.isinf(p):
        layer_g, layer_p = pack["grad_norm"], pack["param_norm"]
        total, p_total = layer_g.amax(), layer_p.amax()
    else:
        pw_g, pw_p = pack["grad_norm_pow"], pack["param_norm_pow"]
        root = (lambda x: x.sqrt()) if p == 2.0 else (lambda x: x.pow(1.0 / p))
        layer_g, layer_p = root(pw_g), root(pw_p)
        total, p_total = root(pw_g.sum()), root(pw_p.sum())
        pack.add("grad_norm", layer_g, send=layer)
        pack.add("param_norm", layer_p, send=layer)
    if full:
        pack.add("min_abs_nonzero", -pack["neg_min_abs_nonzero"], send=layer)
    if red.stage_group is not None:  # pipeline: the whole model's norm, over every stage
        total = stage_norm(total, p, red.stage_group)
    if red.replica_group is not None:
        total = mean_over(total, red.replica_group)  # decisions agree on every replica
    acc = accum_dtype(layer_g.device)
    usable = torch.isfinite(layer_g) & (layer_g > 0)
    inf = torch.tensor(math.inf, dtype=acc, device=layer_g.device)
    pack.add("total_norm", total)
    pack.add("total_param_norm", p_total)
    pack.add("total_nonzero", pack["nonzero"].sum())
    pack.add("max_layer_norm", torch.where(usable, layer_g, -inf).amax())
    pack.add("min_layer_norm", torch.where(usable, layer_g, inf).amin())
    pack.add("num_ratio_layers", usable.sum().to(acc))
    if red.shard_group is not None:  # unsharded, the element count is known on the host
        pack.add("total_numel", pack["numel"].sum())


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
