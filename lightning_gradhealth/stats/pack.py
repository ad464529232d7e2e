"""One named pack: a step's statistics in ONE tensor, by name.

The pack is combined across ranks in one collective, sent to the host in one transfer, and read back by name.

The device side adds entries (:meth:`Pack.add_sum`, :meth:`Pack.add_max`, :meth:`Pack.add`); :meth:`Pack.build`
gives the packed tensor and its schema; the host side reads values by name (:class:`PackValues`). A new statistic
is one ``add_*`` line where it is computed and one ``get`` where it is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_gradhealth.model.distributed import reduce_sum_max

__all__ = ["Pack", "PackSchema", "PackValues"]

PackSchema = tuple[tuple[str, int], ...]
"""Where each named entry lies in a packed tensor: ``(name, length)``, in order."""


class Pack:
    """The named device values of one step, combined across ranks in ONE collective, copied in ONE transfer.

    An entry is a scalar or a 1-D block in the accumulation dtype: this rank's partial sums (:meth:`add_sum`) or
    maxima (:meth:`add_max`), summed or maxed over the sharding group by :meth:`reduce`; or a value already
    combined (:meth:`add`, e.g. derived from reduced entries). ``pack[name]`` reads an entry on the device;
    :meth:`build` concatenates those added with ``send=True`` into the tensor for the host, where
    :class:`PackValues` reads them back by name.
    """

    def __init__(self) -> None:
        self._entries: dict[str, torch.Tensor] = {}
        self._kinds: dict[str, str] = {}
        self._sent: list[str] = []

    def _put(self, kind: str, name: str, values: torch.Tensor, send: bool) -> None:
        if name in self._entries:
            raise ValueError(f"pack entry {name!r} added twice")
        self._entries[name], self._kinds[name] = values, kind
        if send:
            self._sent.append(name)

    def add_sum(self, name: str, values: torch.Tensor, *, send: bool = True) -> None:
        """Add this rank's partial sums, summed over the sharding group (``send``: also copied to the host)."""
        self._put("sum", name, values, send)

    def add_max(self, name: str, values: torch.Tensor, *, send: bool = True) -> None:
        """Add this rank's maxima, maxed over the sharding group (NaN propagates; ``send``: copied to the host)."""
        self._put("max", name, values, send)

    def add(self, name: str, values: torch.Tensor, *, send: bool = True) -> None:
        """Add a value already combined across ranks (``send``: copied to the host)."""
        self._put("value", name, values, send)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._entries[name]

    def reduce(self, group: Any) -> None:
        """Sum the sum entries and max the max entries over ``group`` in ONE collective; nothing if ``None``."""
        sums = [k for k, kind in self._kinds.items() if kind == "sum"]
        maxes = [k for k, kind in self._kinds.items() if kind == "max"]
        if group is None or not (sums or maxes):
            return
        first = self._entries[(sums or maxes)[0]]
        sum_vec = torch.cat([self._entries[k].reshape(-1) for k in sums]) if sums else first.new_zeros(0)
        max_vec = torch.cat([self._entries[k].reshape(-1) for k in maxes]) if maxes else None
        sum_vec, max_vec = reduce_sum_max(sum_vec, max_vec, group)
        for names, vec in ((sums, sum_vec), (maxes, max_vec)):
            blocks = vec.split([self._entries[k].numel() for k in names]) if names else ()  # type: ignore[union-attr]
            for k, block in zip(names, blocks, strict=True):
                self._entries[k] = block.reshape(self._entries[k].shape)

    def build(self) -> tuple[torch.Tensor, PackSchema]:
        """The one tensor to copy to the host (the sent entries, concatenated) and where each entry lies in it."""
        flat = [self._entries[k].reshape(-1) for k in self._sent]
        schema = tuple((k, t.numel()) for k, t in zip(self._sent, flat, strict=True))
        return (flat[0] if len(flat) == 1 else torch.cat(flat)), schema


class PackValues:
    """The host copy of a packed tensor (``values``, beginning with it), read by name through its schema."""

    def __init__(self, schema: PackSchema, values: Sequence[float]) -> None:
        self._values: dict[str, list[float]] = {}
        pos = 0
        for name, length in schema:
            self._values[name], pos = list(values[pos : pos + length]), pos + length

    def get(self, name: str) -> list[float]:
        """The values of an entry (one for a scalar)."""
        return self._values[name]

    def scalar(self, name: str) -> float:
        """The value of a scalar entry."""
        (value,) = self._values[name]
        return value

    def __contains__(self, name: str) -> bool:
        return name in self._values
