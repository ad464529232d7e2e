"""The units of a layer: the rows (output units or channels) of its 2-D+ parameters, for the dead-unit fraction.

:class:`LayerUnits` tells, per parameter and per layer, how many rows there are and whether this rank's gradient
can tell them (a sparse gradient, an FSDP1 flat shard or a DTensor sharded along another dimension cannot); the
answers are cached per layout while it lives.
"""

from __future__ import annotations

import weakref
from typing import Any

from lightning_gradhealth.model.distributed import Reduction, column_dims, is_dtensor
from lightning_gradhealth.model.layout import ParamLayout

__all__ = ["LayerUnits"]


class LayerUnits:
    """Units (rows) per parameter and per layer of a :class:`ParamLayout`, cached while the layout lives."""

    def __init__(self) -> None:
        self._cache: dict[tuple[Any, ...], tuple[weakref.ReferenceType[ParamLayout], Any]] = {}

    def _cached(self, key: tuple[Any, ...], layout: ParamLayout, make: Any) -> Any:
        """``make()``, kept under ``key`` (which begins with ``id(layout)``) while ``layout`` lives."""
        cached = self._cache.get(key)
        if cached is not None and cached[0]() is layout:  # a weak reference: a freed layout's id may be reused
            return cached[1]
        if len(self._cache) > 64:
            self._cache.clear()
        value = make()
        self._cache[key] = (weakref.ref(layout), value)
        return value

    def rows(self, layout: ParamLayout, red: Reduction) -> tuple[int, ...]:
        """Per parameter, its units: rows along dim 0 with two dimensions or more (else 0), or -1 if unknowable.

        Unknowable from the gradient a rank holds: a sparse gradient (its coalesced rows only), an FSDP1 flat shard
        (rows cut anywhere), a DTensor sharded along another dimension than 0. A DTensor's shape is the whole one.
        """
        flat = red.shard_group is not None and red.mesh is None and bool(layout.params)  # FSDP1's flat shards

        def make() -> tuple[int, ...]:
            rows = []
            for i, q in enumerate(layout.params):
                cut = len(column_dims(q)) > 1  # (rows cut along one mesh dimension: cut_dead_rows)
                cut = cut or (i in layout.transposed and is_dtensor(q))  # (not read transposed: stat_grads)
                if i in layout.sparse or cut or (flat and id(q) not in red.whole):
                    rows.append(-1)
                else:  # a transposed weight (HF Conv1D) is read as (outputs, inputs): its units are its dim 1
                    dim = 1 if i in layout.transposed else 0
                    rows.append(int(q.shape[dim]) if q.ndim >= 2 and q.numel() > 0 else 0)
            return tuple(rows)

        return self._cached((id(layout), "rows", flat, red.whole), layout, make)  # type: ignore[no-any-return]

    def mask(self, layout: ParamLayout, present: tuple[int, ...], red: Reduction) -> tuple[bool, ...]:
        """Per present parameter, whether its gradient's dead rows are counted (:meth:`rows` > 0)."""
        rows = self.rows(layout, red)
        return self._cached(  # type: ignore[no-any-return]
            (id(layout), "mask", present, rows),
            layout,
            lambda: tuple(rows[i] > 0 and not column_dims(layout.params[i]) for i in present),
        )

    def per_layer(self, layout: ParamLayout, present: tuple[int, ...], red: Reduction) -> tuple[int | None, ...]:
        """Per layer, the units of its ``present`` parameters; ``None`` without any, or when some cannot be told."""
        rows = self.rows(layout, red)

        def make() -> tuple[int | None, ...]:
            units: list[int | None] = [0] * layout.num_layers
            for i in present:
                j = layout.layer_of_param[i]
                have = units[j]
                units[j] = None if have is None or rows[i] < 0 else have + rows[i]
            return tuple(u or None for u in units)

        return self._cached((id(layout), "layers", present, rows), layout, make)  # type: ignore[no-any-return]
