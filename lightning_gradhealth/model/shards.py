"""Units (rows) of sharded gradients put back together, for the clippers that need them whole (AGC, value).

Adaptive gradient clipping (Brock et al., 2021, "High-Performance Large-Scale Image Recognition Without
Normalization") rescales each *unit* of a weight (its rows, dimension 0; a 0-/1-D tensor is one unit) from the
unit's gradient and weight norms. A rank holds a local piece of each DTensor; per mesh dimension of its placements:

- ``Shard(0)`` / ``_StridedShard(dim=0)`` of a 2-D+ tensor hands out whole rows: nothing to combine;
- a split along a dimension ``>= 1`` (RowwiseParallel's ``Shard(1)``), or any split of a 0-/1-D tensor, cuts every
  unit: the per-unit partial sums of squares (of the gradient and of the weight) are summed over that mesh
  dimension's process group, ONE all-reduce per such group for every tensor together;
- ``Replicate`` holds copies that agree: computed locally, and counted once in the post-clip norm (:func:`counted
  <lightning_gradhealth.model.distributed.counted>`);
- ``Partial`` is a pending sum, reduced before any clipper runs (``settle_partial``); one still pending here is
  refused (:attr:`Shards.refusal`), as is a gradient placed otherwise than its parameter (their rows would not
  pair up).

A unit cut along several mesh dimensions is summed over each in turn, in the order of the stage mesh's dimensions
(the same order on every rank, so the collectives pair up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_gradhealth.model.distributed import Reduction, counted, is_dtensor, is_split, sum_over

__all__ = ["Shards", "shards_of", "sum_cut_units", "unit_cuts"]


@dataclass(frozen=True)
class Shards:
    """How a list of (local) tensors is split across ranks, for clippers that need whole units or global sums.

    Attributes:
        group: The group over which this rank's partial sums are combined (every rank of the stage's device
            mesh; FSDP1's group), or ``None`` when the tensors are whole here (pipeline stages of plain tensors).
        counted: For each tensor, whether this rank counts it in sums over ``group`` (``None``: all).
        unit_groups: The process groups along which some unit is cut, in the order their sums are taken.
        cuts: For each tensor, the indices into ``unit_groups`` of the groups that cut its units.
        stage_group: Pipeline parallelism: the group across the stages (global sums are taken over it too).
        refusal: Why the units cannot be put together (a gradient still ``Partial``, or placed otherwise than its
            parameter), raised by the clippers that need them; ``None`` when they can.
    """

    group: Any
    counted: tuple[bool, ...] | None = None
    unit_groups: tuple[Any, ...] = ()
    cuts: tuple[tuple[int, ...], ...] = ()
    stage_group: Any = None
    refusal: str | None = None


def unit_cuts(tensor: torch.Tensor, stage: Any) -> tuple[int, ...]:
    """The dimensions of the stage mesh along which ``tensor``'s units are cut (none for a plain tensor).

    A unit is a row (dimension 0) of a 2-D+ tensor, the whole of a 0-/1-D tensor. ``tensor``'s own mesh may be a
    named part of ``stage`` (a smaller mesh sliced from it): its dimensions are matched by name.

    A ``Partial`` placement (local values that are terms of a sum) cuts nothing here: see :func:`shards_of`.
    """
    if not is_dtensor(tensor):
        return ()
    mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
    cut = [i for i, pl in enumerate(placements) if is_split(pl) and (tensor.ndim <= 1 or pl.dim != 0)]
    if not cut or mesh is stage or mesh == stage:
        return tuple(cut)
    names = list(stage.mesh_dim_names)
    return tuple(sorted(names.index(mesh.mesh_dim_names[i]) for i in cut))


def shards_of(
    tensors: Sequence[torch.Tensor], reduction: Reduction, params: Sequence[torch.Tensor] | None = None
) -> Shards | None:
    """How ``tensors`` are split over ``reduction``'s groups (``None`` when they are whole and not pipelined).

    DTensors: the mesh dimensions that cut their units (:func:`unit_cuts`). Plain tensors under a shard group
    without a mesh (FSDP1's flat shards) are flattened pieces of the original tensors: a 1-D piece is cut along
    the group, a tensor FSDP left whole is not. ``params`` (aligned with ``tensors``, the parameters of
    gradients): a DTensor gradient must have its parameter's placements, so that their local rows pair up; and
    FSDP1's parameters whole on every rank are then counted once (:func:`counted` knows the parameters).

    ``refusal`` says why the units cannot be put together: a gradient still ``Partial``, or placed otherwise than
    its parameter.
    """
    if reduction.shard_group is None:
        return None if reduction.stage_group is None else Shards(group=None, stage_group=reduction.stage_group)
    key = (id(reduction), len(tensors), None if params is None else tuple(map(id, params)))
    cached = _SHARDS.get(key)
    if cached is not None and cached[0] is reduction and params is not None:
        return cached[1]  # (the placements of a set of parameters' gradients do not change from step to step)
    shards = _shards_of(tensors, reduction, params)
    if len(_SHARDS) > 64:
        _SHARDS.clear()
    _SHARDS[key] = (reduction, shards)
    return shards


_SHARDS: dict[tuple[Any, ...], tuple[Reduction, Shards]] = {}


def _shards_of(
    tensors: Sequence[torch.Tensor], reduction: Reduction, params: Sequence[torch.Tensor] | None
) -> Shards:
    stage = reduction.mesh
    if stage is None:  # FSDP1
        whole = reduction.whole if params is not None else frozenset()
        raw = [(0,) if t.ndim <= 1 and (params is None or id(params[k]) not in whole) else ()
               for k, t in enumerate(tensors)]  # fmt: skip
        groups: tuple[Any, ...] = (reduction.shard_group,) if any(raw) else ()
        refusal = None
    else:
        refusal = _refusal(tensors, params)
        dims = [unit_cuts(t, stage) for t in tensors]
        used = sorted({d for cut in dims for d in cut})
        groups = tuple(stage.get_group(d) for d in used)
        raw = [tuple(used.index(d) for d in cut) for cut in dims]
    return Shards(
        group=reduction.shard_group,
        counted=counted(reduction, tensors if params is None else params),
        unit_groups=groups,
        cuts=tuple(raw),
        stage_group=reduction.stage_group,
        refusal=refusal,
    )


def _refusal(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor] | None) -> str | None:
    """Why the units of these DTensor gradients cannot be put together, or ``None``."""
    for k, g in enumerate(grads):
        if not is_dtensor(g):
            continue
        placed = tuple(g.placements)  # type: ignore[attr-defined]
        if any(pl.is_partial() for pl in placed):
            return (
                f"clip='agc': a gradient of shape {tuple(g.shape)} is still Partial {placed} when clipped, so the "
                "norms of its rows cannot be taken from the local pieces: reduce it first (redistribute to Replicate)"
            )
        p = None if params is None else params[k]
        if p is not None and is_dtensor(p) and tuple(p.placements) != placed:  # type: ignore[attr-defined]
            return (
                "clip='agc' pairs each row of a gradient with the same row of its parameter; a gradient of shape "
                f"{tuple(g.shape)} is placed {placed} but its parameter {tuple(p.placements)}: redistribute the "  # type: ignore[attr-defined]
                "gradient to its parameter's placements before the step, or use clip='norm', 'zclip' or 'autoclip'"
            )
    return None


def sum_cut_units(parts: Sequence[list[torch.Tensor]], shards: Shards) -> None:
    """Sum, in place, the per-unit partial sums of the tensors whose units are cut across ranks.

    ``parts`` holds lists aligned with the tensors (e.g. the squared unit norms of the gradients and of the
    weights); each list entry of a cut tensor is replaced by its sum over every group that cuts it. One all-reduce
    per group of ``shards.unit_groups``, of every cut tensor's entries of every list together.
    """
    for k, group in enumerate(shards.unit_groups):
        members = [i for i, cut in enumerate(shards.cuts) if k in cut]
        if not members:
            continue
        flat = sum_over(torch.cat([part[i].reshape(-1) for i in members for part in parts]), group)
        pos = 0
        for i in members:
            for part in parts:
                n = part[i].numel()
                part[i] = flat[pos : pos + n].view_as(part[i])
                pos += n
