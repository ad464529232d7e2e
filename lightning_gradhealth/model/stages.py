"""Pipeline parallelism: the stages' norms and records, combined over the group of ranks holding the other stages.

Each rank of a pipeline holds some layers of the model (a *stage*); the option ``pipeline_group`` names the process
group across the stages. :func:`stage_norm` makes the whole model's norm from each stage's (every guarded step, one
scalar collective), :func:`merge_stages` one record of every stage's layers (logged steps, one object all-gather).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist

from lightning_gradhealth.model.distributed import reduce_sum_max, sum_over
from lightning_gradhealth.schema.record import LayerStats, StepStats

__all__ = ["merge_stages", "stage_norm"]


def stage_norm(total: torch.Tensor, norm_type: float, group: Any) -> torch.Tensor:
    """The global norm over the pipeline stages from each stage's norm ``total`` (one scalar collective).

    The powered norms add up (maxima for ``inf``, gathered so that a NaN is kept); a non-finite stage makes the
    result non-finite on every rank.
    """
    value = total.detach().reshape(1).to(torch.float64 if total.device.type != "mps" else torch.float32)
    if math.isinf(norm_type):
        _, out = reduce_sum_max(value.new_zeros(0), value, group)
        return out.reshape(())  # type: ignore[union-attr]
    return sum_over(value.pow(norm_type), group).pow(1.0 / norm_type).reshape(()).to(total.dtype)


def merge_stages(record: StepStats, numel: int, norm_type: float, group: Any) -> StepStats:
    """Every stage's record of one step, made into one record of the whole model (one object all-gather).

    ``record`` already carries the global norm (:func:`stage_norm`); the layers of every stage are listed in the
    order of the ranks of ``group`` (stage 0 first), and the totals (parameter norm, zero fraction, NaN/Inf counts,
    parameters without a gradient, the largest ``|g|``) are combined. ``numel`` is this stage's element count.
    """
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (record, numel), group=group)
    records = [r for r, _ in parts]
    total_numel = sum(n for _, n in parts)
    zeros = sum(r.zero_frac * n for r, n in parts)
    layers: tuple[LayerStats, ...] = tuple(lay for r in records for lay in r.layers)
    if math.isinf(norm_type):
        param_norm = max(r.param_norm for r in records)
    else:
        param_norm = sum(r.param_norm**norm_type for r in records) ** (1.0 / norm_type)
    usable = [lay.grad_norm for lay in layers if math.isfinite(lay.grad_norm) and lay.grad_norm > 0]
    ratio = record.layer_norm_ratio
    if not math.isfinite(record.total_norm):
        ratio = math.nan
    elif layers:
        ratio = max(usable) / min(usable) if len(usable) >= 2 else 1.0
    micro = [r.first_nonfinite_micro_batch for r in records if r.first_nonfinite_micro_batch is not None]
    extremes = [r.grad_max_abs for r in records if r.grad_max_abs is not None]
    no_grad = tuple(name for r in records for name in r.no_grad_params)
    return dataclasses.replace(
        record,
        param_norm=param_norm,
        zero_frac=zeros / total_numel if total_numel else record.zero_frac,
        nan_count=sum(r.nan_count for r in records),
        inf_count=sum(r.inf_count for r in records),
        layer_norm_ratio=ratio,
        no_grad_count=len(no_grad),
        no_grad_params=no_grad,
        layers=layers,
        first_nonfinite_micro_batch=min(micro) if micro else None,
        grad_max_abs=max(extremes) if extremes else None,
        loss=next((r.loss for r in reversed(records) if r.loss is not None), None),
        counts_exact=all(r.counts_exact for r in records),
    )
