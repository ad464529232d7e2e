"""Reduction of sharded (DTensor) gradient statistics: local shards in, global numbers out, one collective.

Only mesh dimensions where the placement is ``Shard`` are summed over: a ``Replicate`` dimension holds copies
(FSDP2's hybrid sharding replicates across one dimension), and summing over it would count them twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from lightning_gradhealth.errors import GradientHealthError

__all__ = ["is_dtensor", "local", "shard_group"]


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (without importing the DTensor module for plain tensors)."""
    return type(tensor).__name__ == "DTensor"


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (possibly empty), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def shard_group(tensors: Sequence[torch.Tensor]) -> Any:
    """The process group to sum local statistics over: the mesh dimension on which the tensors are sharded.

    Raises:
        GradientHealthError: The tensors are not all sharded the same way over one mesh dimension (tensor
            parallelism and other layouts are not supported yet), or torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise GradientHealthError("sharded gradients but torch.distributed is not initialised")
    first = tensors[0]
    mesh = first.device_mesh  # type: ignore[attr-defined]
    dims = {i for i, placement in enumerate(first.placements) if placement.is_shard()}  # type: ignore[attr-defined]
    for t in tensors:
        t_dims = {i for i, placement in enumerate(t.placements) if placement.is_shard()}  # type: ignore[attr-defined]
        if t.device_mesh != mesh or t_dims != dims:  # type: ignore[attr-defined]
            raise GradientHealthError(
                "lightning_gradhealth supports gradients sharded the same way over one mesh dimension (FSDP2, "
                f"HSDP); got placements {first.placements} and {t.placements}",  # type: ignore[attr-defined]
            )
    if len(dims) != 1:
        raise GradientHealthError(
            f"lightning_gradhealth supports gradients sharded over exactly one mesh dimension, got placements "
            f"{first.placements}"  # type: ignore[attr-defined]
        )
    return mesh.get_group(next(iter(dims)))
