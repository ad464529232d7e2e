"""Where per-rank statistics must be combined, and the collectives that combine them.

Two situations, described by :class:`Reduction`:

- **Sharded gradients** (FSDP2 DTensors, FSDP1 flat shards): each rank holds a disjoint part of every gradient,
  so per-rank partial sums (powered norms, zero counts, element counts, NaN/Inf counts) are *summed* over the
  sharding group, and maxima (``norm_type=inf``, largest ``|g|``) are *maxed*. Only the sharding dimension is
  reduced over: a ``Replicate`` dimension (FSDP2's hybrid sharding) holds copies, and summing over it would count
  them twice.
- **Replicated gradients** (DDP, the replicas of hybrid sharding): every rank holds the same gradient, so nothing
  needs summing; only the *decision inputs* (the global norm) are averaged over the replicas, so that a gradient
  that went bad on one rank only (a fault after the all-reduce) is seen by every rank at the same step.

Every function here is one collective; :func:`reduce_sum_max` packs sums and maxima into one all-gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_gradhealth.schema.errors import UnsupportedSetupError

__all__ = [
    "Reduction",
    "Shards",
    "check_sharding",
    "fsdp1_reduction",
    "is_dtensor",
    "local",
    "mean_over",
    "min_valid_over",
    "reduce_sum_max",
    "resolve",
    "shards_of",
    "sum_over",
]


@dataclass(frozen=True)
class Reduction:
    """Process groups over which per-rank statistics are combined.

    Attributes:
        shard_group: Gradients are sharded across this group: partial statistics are summed (maxima maxed) over it.
            For DTensor gradients it is found from their placements and need not be given.
        replica_group: Gradients are replicated across this group: the global norm that every decision is taken
            from is averaged over it (one scalar all-reduce per step).
        whole: ``id()`` of the parameters that are whole (not sharded) on every rank of ``shard_group`` (FSDP1's
            ``NO_SHARD`` units and unmanaged parameters): counted on the group's first rank only.
    """

    shard_group: Any = None
    replica_group: Any = None
    whole: frozenset[int] = frozenset()

    def skips_whole(self) -> bool:
        """Whether this rank leaves out the tensors in :attr:`whole` (every rank of the group but the first)."""
        return bool(self.whole) and dist.get_rank(self.shard_group) != 0

    @property
    def empty(self) -> bool:
        """Whether nothing is combined across ranks."""
        return self.shard_group is None and self.replica_group is None


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (without importing the DTensor module for plain tensors)."""
    return type(tensor).__name__ == "DTensor"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (possibly empty; in-place changes reach the DTensor), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


_RESOLVED: dict[tuple[Any, ...], tuple[Any, Reduction]] = {}
_MIXED = (
    "lightning_gradhealth needs the watched gradients either all sharded (DTensors, FSDP2) or all plain; this model "
    "is only partly under fully_shard: apply fully_shard to the root module too, or restrict the monitor with "
    "`include`/`exclude`"
)


def _check_initialised() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise UnsupportedSetupError("sharded gradients but torch.distributed is not initialised")


def _mesh_dims(tensor: torch.Tensor) -> tuple[set[int], set[int]]:
    placements = tensor.placements  # type: ignore[attr-defined]
    shard = {i for i, pl in enumerate(placements) if pl.is_shard()}
    replicate = {i for i, pl in enumerate(placements) if pl.is_replicate()}
    return shard, replicate


def resolve(tensors: Sequence[torch.Tensor], given: Reduction | None) -> Reduction:
    """The reduction for ``tensors``: DTensor placements decide for DTensors, ``given`` for plain tensors.

    Raises:
        UnsupportedSetupError: The DTensors are not all sharded the same way over exactly one mesh dimension (tensor
            parallelism and other layouts are not supported yet), or torch.distributed is not initialised.
    """
    if not tensors or not is_dtensor(tensors[0]):
        if tensors and is_dtensor(tensors[-1]):  # a cheap look at the other end: a model partly under FSDP2
            raise UnsupportedSetupError(_MIXED)
        return given or Reduction()
    _check_initialised()
    first = tensors[0]
    mesh = first.device_mesh  # type: ignore[attr-defined]
    key = (id(mesh), len(tensors), tuple(first.placements))  # type: ignore[attr-defined]
    cached = _RESOLVED.get(key)
    if cached is not None and cached[0] is mesh:  # the mesh is kept alive in the cache: its id cannot be reused
        return cached[1]  # checked in full once per set of gradients (a per-tensor loop costs ms per step)
    dims, replicas = _mesh_dims(first)
    for t in tensors:
        if not is_dtensor(t):
            raise UnsupportedSetupError(_MIXED)
        if t.device_mesh != mesh or _mesh_dims(t) != (dims, replicas):  # type: ignore[attr-defined]
            raise UnsupportedSetupError(
                "lightning_gradhealth supports gradients sharded the same way over one mesh dimension (FSDP2, "
                f"HSDP); got placements {first.placements} and {t.placements}",  # type: ignore[attr-defined]
            )
    if len(dims) != 1:
        raise UnsupportedSetupError(
            f"lightning_gradhealth supports gradients sharded over exactly one mesh dimension, got placements "
            f"{first.placements}"  # type: ignore[attr-defined]
        )
    replica_group = mesh.get_group(next(iter(replicas))) if len(replicas) == 1 else None
    resolved = Reduction(shard_group=mesh.get_group(next(iter(dims))), replica_group=replica_group)
    if len(_RESOLVED) > 64:
        _RESOLVED.clear()
    _RESOLVED[key] = (mesh, resolved)
    return resolved


@dataclass(frozen=True)
class Shards:
    """How a list of (local) tensors is split across ranks, for operations that need whole units (AGC).

    Attributes:
        group: The sharding process group.
        dims: For each tensor, the dimension along which it is split across ``group``.
    """

    group: Any
    dims: tuple[int, ...]


def check_sharding(names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
    """Refuse, before training, a set of watched parameters whose gradients could not be combined.

    Raises:
        UnsupportedSetupError: Some parameters are DTensors and some are not (a model only partly under
            ``fully_shard``), or the DTensors are not all sharded over the same single mesh dimension (tensor
            parallelism: ``Shard`` on other dimensions, or ``Replicate`` parameters beside sharded ones).
    """
    dtensors = [(name, q) for name, q in zip(names, params, strict=True) if is_dtensor(q)]
    if not dtensors:
        return
    first_name, first = dtensors[0]
    for name, q in dtensors:
        if q.device_mesh != first.device_mesh or _mesh_dims(q) != _mesh_dims(first):  # type: ignore[attr-defined]
            raise UnsupportedSetupError(
                "lightning_gradhealth combines sharded gradients over one mesh dimension (FSDP2 / HSDP data "
                "parallelism); tensor parallelism is not supported yet: parameters are placed differently, "
                f"`{first_name}` {first.placements} and `{name}` {q.placements}. Restrict the monitor to the "  # type: ignore[attr-defined]
                "data-parallel parameters with `include`/`exclude`, or leave it out of tensor-parallel runs",
                parameter=name,
            )
    if len(_mesh_dims(first)[0]) != 1:
        raise UnsupportedSetupError(
            "lightning_gradhealth combines sharded gradients over exactly one mesh dimension; tensor parallelism "
            f"is not supported yet: `{first_name}` is placed {first.placements}",  # type: ignore[attr-defined]
            parameter=first_name,
        )
    if len(dtensors) != len(params):
        plain = next(name for name, q in zip(names, params, strict=True) if not is_dtensor(q))
        raise UnsupportedSetupError(f"{_MIXED} (e.g. `{first_name}` is a DTensor, `{plain}` is not)", parameter=plain)


def shards_of(tensors: Sequence[torch.Tensor], reduction: Reduction) -> Shards | None:
    """How ``tensors`` are split over ``reduction.shard_group`` (``None`` when they are whole on every rank).

    DTensors: the dimension of their ``Shard`` placement. Plain tensors under a shard group (FSDP1's flat shards)
    are flattened pieces of the original tensors: dimension 0 of a 1-D view.
    """
    if reduction.shard_group is None:
        return None
    dims = []
    for t in tensors:
        shard = next((pl for pl in t.placements if pl.is_shard()), None) if is_dtensor(t) else None  # type: ignore[attr-defined]
        dims.append(0 if shard is None else int(shard.dim))
    return Shards(group=reduction.shard_group, dims=tuple(dims))


def sum_over(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum ``tensor`` in place over ``group`` (one all-reduce; NaN and Inf propagate)."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def reduce_sum_max(
    sums: torch.Tensor, maxes: torch.Tensor | None, group: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sum ``sums`` and take the maximum of ``maxes`` over ``group``, in ONE collective.

    Without maxima this is one all-reduce. With maxima it is one all-gather of the packed vector followed by a
    local sum and max: a single collective for both, and, unlike a MAX all-reduce (gloo drops NaN), the maximum
    propagates NaN. The vectors are a few numbers per layer, so gathering them costs what reducing them does.
    """
    if maxes is None or maxes.numel() == 0:
        return sum_over(sums, group), maxes
    n = sums.numel()
    packed = torch.cat([sums, maxes.to(sums.dtype)])
    world = dist.get_world_size(group)
    gathered = packed.new_empty(world * packed.numel())
    dist.all_gather_single(gathered, packed, group=group)
    rows = gathered.view(world, -1)
    return rows[:, :n].sum(0), rows[:, n:].amax(0)


def mean_over(value: torch.Tensor, group: Any) -> torch.Tensor:
    """The mean of a device scalar over ``group`` (one all-reduce). A non-finite value on any rank stays so."""
    out = value.detach().reshape(1).clone()
    sum_over(out, group)
    return (out / dist.get_world_size(group)).reshape(())


def min_valid_over(value: int | None, group: Any, device: torch.device) -> int | None:
    """The smallest non-negative ``value`` over the ranks of ``group`` (``None``/negative: no value on that rank).

    One all-gather of one number; used on failing steps only (which micro-batch first went non-finite, when the
    ranks saw it at different micro-batches).
    """
    mine = torch.tensor([-1.0 if value is None or value < 0 else float(value)], dtype=torch.float64, device=device)
    world = dist.get_world_size(group)
    gathered = mine.new_empty(world)
    dist.all_gather_single(gathered, mine, group=group)
    valid = [v for v in gathered.tolist() if v >= 0]
    return int(min(valid)) if valid else None


def fsdp1_reduction(root: torch.nn.Module) -> Reduction:
    """The reduction for a model wrapped in FSDP1 (``FullyShardedDataParallel``), as its ``clip_grad_norm_`` does it.

    Parameters of sharded units are flat pieces of the original tensors on each rank: their statistics are summed
    over the FSDP process group (the intra-node group under hybrid sharding, whose inter-node group holds
    replicas). Parameters of ``NO_SHARD`` units and parameters FSDP does not manage are whole on every rank and
    counted once.

    Raises:
        UnsupportedSetupError: The model is wrapped with ``use_orig_params=False`` (the original parameters, and
            with them the layers, are hidden in flat parameters).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in FullyShardedDataParallel.fsdp_modules(root) if getattr(m, "_handle", None) is not None]
    if not units:
        return Reduction()
    sharded: set[int] = set()
    for unit in units:
        handle = unit._handle
        if not handle._use_orig_params:
            raise UnsupportedSetupError(
                "FSDP1 with use_orig_params=False hides the model's parameters in flat parameters, so per-layer "
                "statistics cannot be taken: use FSDPStrategy(use_orig_params=True) (Lightning's default) or "
                "ModelParallelStrategy (FSDP2)",
                module=type(unit.module).__name__,
            )
        if handle.uses_sharded_strategy:
            sharded.update(id(p) for p in handle.flat_param._params)
    whole = frozenset(id(p) for p in root.parameters() if id(p) not in sharded)
    first = units[0]
    return Reduction(
        shard_group=first.process_group,
        replica_group=getattr(first, "_inter_node_pg", None),
        whole=whole,
    )
