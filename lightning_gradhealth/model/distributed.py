"""Where per-rank statistics must be combined, and the collectives that combine them.

Three situations, described by :class:`Reduction`:

- **Sharded gradients** (DTensors on any device mesh: FSDP2, HSDP, tensor parallelism and their products; FSDP1 flat
  shards): every statistic is a sum (powered norms, zero counts, element counts, NaN/Inf counts) or a maximum
  (``norm_type=inf``, largest ``|g|``) over the elements, so per-rank partial sums are combined over the ranks that
  hold the rank's model (the *stage*: every rank of the device mesh) in ONE collective. Each tensor counts on
  exactly one copy of each of its elements: a rank whose coordinate is not 0 on a mesh dimension where the tensor is
  ``Replicate`` (or on a dimension of the stage's mesh that the tensor's own mesh lacks) multiplies its partial sums
  by 0, so that copies are not counted twice, while a NaN/Inf there still turns the sum non-finite
  (``0 * nan = nan``). ``Shard`` and ``_StridedShard`` split the elements among ranks, whatever the order: sums
  over them are exact. A ``Partial`` gradient (a pending sum) is reduced first (:func:`settle_partial`): the norm
  of a sum is not the sum of norms.
- **Replicated gradients** (DDP): every rank holds the same gradient, so nothing needs summing; only the *decision
  inputs* (the global norm) are averaged over the replicas, so that a gradient that went bad on one rank only (a
  fault after the all-reduce) is seen by every rank at the same step.
- **Pipeline stages** (``stage_group``): each rank holds some layers. The global norm is the powered sum over the
  stages (one scalar collective on every guarded step), and a logged step's record gathers every stage's layers
  (:mod:`~lightning_gradhealth.model.stages`, one object all-gather).

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
    "check_sharding",
    "column_dims",
    "counted",
    "cut_dead_rows",
    "fsdp1_reduction",
    "is_dtensor",
    "is_split",
    "local",
    "mean_over",
    "min_valid_over",
    "reduce_sum_max",
    "resolve",
    "settle_partial",
    "sum_over",
]


@dataclass(frozen=True)
class Reduction:
    """Process groups over which per-rank statistics are combined.

    Attributes:
        shard_group: Gradients are sharded across this group: partial statistics are summed (maxima maxed) over it.
            For DTensor gradients it is found from their placements (every rank of the stage's device mesh).
        replica_group: Gradients are replicated across this group: the global norm that every decision is taken
            from is averaged over it (one scalar all-reduce per step).
        whole: ``id()`` of the parameters that are whole (not sharded) on every rank of ``shard_group`` (FSDP1's
            ``NO_SHARD`` units and unmanaged parameters): counted on the group's first rank only.
        mesh: DTensors: the stage's device mesh (the largest mesh of the watched tensors), whose ranks form
            ``shard_group``.
        replicated: DTensors: some tensor is held in several copies within ``shard_group`` (a ``Replicate``
            placement, or a mesh smaller than the stage's): :func:`counted` weights them.
        stage_group: Pipeline parallelism: the group of ranks holding the other stages (the option
            ``pipeline_group``); ``None`` when every rank holds the whole model.
    """

    shard_group: Any = None
    replica_group: Any = None
    whole: frozenset[int] = frozenset()
    mesh: Any = None
    replicated: bool = False
    stage_group: Any = None

    def skips_whole(self) -> bool:
        """Whether this rank leaves some tensors out of its partial sums (see :func:`counted`)."""
        return self.replicated or (bool(self.whole) and dist.get_rank(self.shard_group) != 0)

    @property
    def empty(self) -> bool:
        """Whether nothing is combined across ranks."""
        return self.shard_group is None and self.replica_group is None and self.stage_group is None


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (without importing the DTensor module for plain tensors)."""
    return type(tensor).__name__ == "DTensor"


def is_split(placement: Any) -> bool:
    """Whether a DTensor placement splits the elements among the ranks of its mesh dimension.

    ``Shard`` and ``_StridedShard`` (FSDP2 over tensor parallelism: not a ``Shard`` subclass in every torch).
    """
    return bool(placement.is_shard()) or type(placement).__name__ == "_StridedShard"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (possibly empty; in-place changes reach the DTensor), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def settle_partial(params: Sequence[torch.Tensor]) -> None:
    """Reduce in place the gradients that are ``Partial`` on some mesh dimension (one all-reduce each).

    A ``Partial`` gradient is a sum still to be taken over that dimension: its local pieces' norms do not add up to
    the norm of the sum, so the sum is taken now (it would be at the optimizer's step anyway) and the gradient
    becomes ``Replicate`` there. Plain tensors and every other placement cost one type check per parameter.
    """
    if not params or not is_dtensor(params[0]):
        return
    for q in params:
        g = q.grad
        if g is not None and is_dtensor(g) and any(pl.is_partial() for pl in g.placements):  # type: ignore[attr-defined]
            from torch.distributed.tensor import Replicate

            placements = [Replicate() if pl.is_partial() else pl for pl in g.placements]  # type: ignore[attr-defined]
            q.grad = g.redistribute(g.device_mesh, placements)  # type: ignore[attr-defined]


_RESOLVED: dict[tuple[Any, ...], tuple[Any, Reduction]] = {}
_COUNTED: dict[tuple[Any, ...], tuple[bool, ...]] = {}
_MIXED = (
    "lightning_gradhealth needs the watched gradients either all sharded (DTensors, FSDP2) or all plain; this model "
    "is only partly under fully_shard: apply fully_shard to the root module too, or restrict the monitor with "
    "`include`/`exclude`"
)


def _check_initialised() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise UnsupportedSetupError("sharded gradients but torch.distributed is not initialised")


def _stage_mesh(meshes: Sequence[Any]) -> Any:
    """The mesh whose ranks hold this rank's model: the largest of ``meshes``, which must hold the others' dims."""
    stage = max(meshes, key=lambda m: (m.ndim, m.size()))
    names = set(stage.mesh_dim_names or ())
    for m in meshes:
        if m is stage or m == stage:
            continue
        if not m.mesh_dim_names or not set(m.mesh_dim_names) <= names:
            raise UnsupportedSetupError(
                "lightning_gradhealth combines DTensors of several device meshes by their dimension names; the mesh "
                f"{m} is not a named part of {stage}. Create the meshes with "
                "`init_device_mesh(..., mesh_dim_names=...)` and slice the smaller ones from the larger (mesh['dp'])"
            )
    return stage


def _mesh_group(mesh: Any) -> Any:
    """One process group over every rank of ``mesh``."""
    if mesh.ndim == 1:
        return mesh.get_group(0)
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    return mesh._flatten().get_group()  # (created once by every rank of the root mesh)


def _counted_here(tensor: torch.Tensor, stage: Any) -> bool:
    """Whether this rank holds the counted copy of ``tensor``'s local elements (coordinate 0 where it is copied)."""
    mesh = tensor.device_mesh  # type: ignore[attr-defined]
    coords = stage.get_coordinate()
    if mesh == stage or not stage.mesh_dim_names:
        sharded = {i for i, pl in enumerate(tensor.placements) if is_split(pl)}  # type: ignore[attr-defined]
        return all(c == 0 for i, c in enumerate(coords) if i not in sharded)
    names = mesh.mesh_dim_names
    sharded_names = {names[i] for i, pl in enumerate(tensor.placements) if is_split(pl)}  # type: ignore[attr-defined]
    return all(c == 0 for name, c in zip(stage.mesh_dim_names, coords, strict=True) if name not in sharded_names)


def counted(red: Reduction, params: Sequence[torch.Tensor]) -> tuple[bool, ...] | None:
    """Per tensor, whether this rank counts it in the sums over ``red.shard_group`` (``None``: every tensor).

    FSDP1: tensors whole on every rank count on the group's first rank only. DTensors: see :class:`Reduction`.
    """
    if red.replicated and red.mesh is not None:
        key = (id(red.mesh), tuple(map(id, params)))
        cached = _COUNTED.get(key)
        if cached is None:
            if len(_COUNTED) > 64:
                _COUNTED.clear()
            zero = all(c == 0 for c in red.mesh.get_coordinate())  # plain tensors: copies on every rank
            cached = _COUNTED[key] = tuple(_counted_here(q, red.mesh) if is_dtensor(q) else zero for q in params)
        return cached
    if red.whole and dist.get_rank(red.shard_group) != 0:
        return tuple(id(q) not in red.whole for q in params)
    return None


def column_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """The mesh dimensions along which a 2-D+ DTensor's rows are cut (split along a tensor dimension other than 0).

    Ranks that differ only there hold the same rows (its units), each with some of their columns.
    """
    if not is_dtensor(tensor) or tensor.ndim < 2:
        return ()
    return tuple(i for i, pl in enumerate(tensor.placements) if is_split(pl) and pl.dim != 0)  # type: ignore[attr-defined]


def cut_dead_rows(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Per tensor, the dead rows of the gradients whose rows are cut along one mesh dimension, else 0.

    A row is dead when it is zero on every rank that holds a piece of it: its local non-zero counts are summed over
    that mesh dimension (one all-reduce per distinct dimension, of one number per local row) and the rows left at 0
    counted, on the dimension's first rank only (the others hold the same rows). ``grads`` are the local shards,
    aligned with ``params``. ``None`` when no row is cut.
    """
    groups: dict[int, tuple[Any, list[int]]] = {}
    for k, q in enumerate(params):
        dims = column_dims(q)
        if len(dims) == 1:
            group = q.device_mesh.get_group(dims[0])  # type: ignore[attr-defined]
            groups.setdefault(id(group), (group, []))[1].append(k)
    if not groups:
        return None
    device = grads[0].device
    out = torch.zeros(len(params), dtype=torch.float64 if device.type != "mps" else torch.float32, device=device)
    for group, members in groups.values():
        counts = torch.cat([grads[k].ne(0).flatten(1).sum(1).to(out.dtype) for k in members])
        sum_over(counts, group)
        if dist.get_rank(group) != 0:
            continue  # (counted once)
        for k, rows in zip(members, counts.split([grads[k].shape[0] for k in members]), strict=True):
            out[k] = (rows == 0).sum()
    return out


def resolve(tensors: Sequence[torch.Tensor], given: Reduction | None) -> Reduction:
    """The reduction for ``tensors``: DTensor placements decide for DTensors, ``given`` for plain tensors.

    Any placement on any mesh is accepted (see :class:`Reduction`); ``given.stage_group`` is kept.

    Raises:
        UnsupportedSetupError: A mix of DTensors and plain tensors, DTensors on meshes that cannot be related, or
            torch.distributed is not initialised.
    """
    if not tensors or not (is_dtensor(tensors[0]) or is_dtensor(tensors[-1]) or _any_dtensor(tensors)):
        return given or Reduction()
    _check_initialised()
    stage_group = None if given is None else given.stage_group
    first = next(t for t in tensors if is_dtensor(t))
    ends = (is_dtensor(tensors[0]), is_dtensor(tensors[-1]))  # (another model on the same mesh: another key)
    key = (id(first.device_mesh), len(tensors), tuple(first.placements), id(stage_group), ends)  # type: ignore[attr-defined]
    cached = _RESOLVED.get(key)
    if cached is not None and cached[0] is first.device_mesh:  # type: ignore[attr-defined]
        return cached[1]  # checked in full once per set of gradients (a per-tensor loop costs ms per step)
    meshes: list[Any] = []
    for t in tensors:
        if is_dtensor(t) and not any(m is t.device_mesh for m in meshes):  # type: ignore[attr-defined]
            meshes.append(t.device_mesh)  # type: ignore[attr-defined]
    stage = _stage_mesh(meshes)
    group = _mesh_group(stage)
    plain = [t for t in tensors if not is_dtensor(t)]
    if plain and not _copies_agree(plain, group):
        raise UnsupportedSetupError(
            f"{_MIXED}: {len(plain)} plain gradients beside the DTensors differ between ranks, so they are not "
            "copies (tensor parallelism's unparallelised modules are) and cannot be combined"
        )
    replicated = bool(plain) or any(
        t.device_mesh.ndim < stage.ndim  # type: ignore[attr-defined]
        or not all(is_split(pl) for pl in t.placements)  # type: ignore[attr-defined]
        for t in tensors
        if is_dtensor(t)
    )
    resolved = Reduction(shard_group=group, mesh=stage, replicated=replicated, stage_group=stage_group)
    if len(_RESOLVED) > 64:
        _RESOLVED.clear()
    _RESOLVED[key] = (first.device_mesh, resolved)  # type: ignore[attr-defined]
    return resolved


def _any_dtensor(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether some tensor is a DTensor (a look at every tensor, in distributed runs only)."""
    return dist.is_available() and dist.is_initialized() and any(map(is_dtensor, tensors))


def _copies_agree(plain: Sequence[torch.Tensor], group: Any) -> bool:
    """Whether the plain tensors beside DTensors are copies on every rank of ``group`` (one all-gather, once).

    Tensor parallelism leaves the modules it does not parallelise as plain tensors, the same on every rank: they
    are counted once. A model only partly under ``fully_shard`` leaves plain gradients that differ from rank to
    rank (nothing averages them): refused.
    """
    norms = torch.stack([torch.linalg.vector_norm(t.detach().double()) for t in plain])
    world = dist.get_world_size(group)
    gathered = norms.new_empty(world * norms.numel())
    dist.all_gather_single(gathered, norms, group=group)
    rows = gathered.view(world, -1)
    spread = (rows.amax(0) - rows.amin(0)).abs()
    return bool((spread <= 1e-6 * rows.abs().amax(0) + 1e-30).all())


def check_sharding(names: Sequence[str], params: Sequence[torch.Tensor]) -> None:
    """Refuse, before training, a set of watched parameters whose gradients could not be combined.

    Every placement (``Shard``, ``_StridedShard``, ``Replicate``, ``Partial``) on any number of mesh dimensions is
    accepted; what is refused cannot be told apart from a mistake.

    Raises:
        UnsupportedSetupError: The DTensors lie on meshes that are not named parts of one device mesh. (Plain
            parameters beside DTensors are accepted here, as tensor parallelism leaves them, and checked at the
            first step to be copies on every rank: :func:`resolve`.)
    """
    dtensors = [(name, q) for name, q in zip(names, params, strict=True) if is_dtensor(q)]
    if not dtensors:
        return
    meshes: list[Any] = []
    for _, q in dtensors:
        if not any(m is q.device_mesh for m in meshes):  # type: ignore[attr-defined]
            meshes.append(q.device_mesh)  # type: ignore[attr-defined]
    _stage_mesh(meshes)


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

