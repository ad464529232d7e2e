"""One grading for alerts and findings: the helpers both use, so that a kind is judged once, the same way.

The per-step checks (:mod:`~lightning_gradhealth.diagnosis.checks`) and the end-of-run rules
(:mod:`~lightning_gradhealth.diagnosis.rules`) compare the same layers (:func:`compared_layers`), with the same
spread (:func:`layer_spread`) and depth profile (:func:`depth_decay`), the same early baseline (:func:`baseline`,
:func:`norm_growth`) and the same per-layer medians (:func:`recent_medians`, which the report shows as they are).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence

from lightning_gradhealth.config.thresholds import Severity
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.model.inventory import ModelInventory

__all__ = [
    "EARLY",
    "baseline",
    "compared_layers",
    "depth_decay",
    "layer_spread",
    "layers_of",
    "median",
    "norm_growth",
    "rank",
    "recent_medians",
    "series",
    "worst_of",
]


def median(values: Sequence[float]) -> float:
    """The median of the finite ``values`` (``nan`` if none)."""
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def layers_of(names: Sequence[str], inventory: ModelInventory | None, *, main_path: bool | str) -> list[int]:
    """Indices of the layers a rule compares.

    The weight matrices when the inventory knows them, else every layer: ``main_path=True`` keeps those along the
    main path (embeddings, norms, biases, the head and shortcut projections left out), ``"blocks"`` those inside
    the repeated blocks (like with like), ``False`` every weight matrix.
    """
    if inventory is None:
        return list(range(len(names)))
    if main_path == "blocks":
        keep = set(inventory.blocks(names))
    else:
        keep = set(inventory.main_path(names) if main_path else inventory.comparable(names))
    picked = [j for j, name in enumerate(names) if name in keep]
    return picked if len(picked) >= 2 else list(range(len(names)))


def series(rows: Sequence[Sequence[float]], j: int) -> list[float]:
    """Column ``j`` of ``rows``, finite values only."""
    return [row[j] for row in rows if j < len(row) and math.isfinite(row[j])]


#: How many first values make a run's own baseline (here and in the guard's alerts).
EARLY = 3


def baseline(values: Sequence[float], first: int = EARLY) -> float:
    """The run's own early level: the median of its first ``first`` finite values.

    The first records, not a fraction of the run: a learning rate far too large shows within a few steps.
    """
    return median([v for v in values if math.isfinite(v)][:first])


def norm_growth(latest: float, early: float) -> float:
    """The global norm's growth over the run's early level (``nan`` when either is unknown)."""
    return latest / early if early > 0 and math.isfinite(latest) and math.isfinite(early) else math.nan


def recent_medians(history: History, which: str) -> list[float]:
    """Per layer (depth order), the median of ``which`` (a :meth:`History.layer_series` name) over the recent records.

    What the rules judge and the report shows: computed here, once.
    """
    rows = {"norm": history.layer_norm, "ratio": history.layer_ratio, "update_ratio": history.layer_update_ratio}[which]
    recent = rows[history.recent()]
    return [median(series(recent, j)) for j in range(len(history.layer_names))]


def depth_decay(norms: Sequence[float]) -> tuple[float, float, float]:
    """A depth profile's first quarter against its last: ``(early, late, early / late)`` of the median norms.

    ``norms`` are finite and positive, in depth order (at least two).
    """
    k = max(1, len(norms) // 4)
    early, late = median(norms[:k]), median(norms[-k:])
    return early, late, early / late if late > 0 else math.inf


def compared_layers(names: Sequence[str], inventory: ModelInventory | None) -> list[int]:
    """Indices of the layers whose norms the layer-imbalance check compares (the repeated blocks' weights)."""
    return layers_of(names, inventory, main_path="blocks")


def layer_spread(norms: Sequence[float], indices: Sequence[int]) -> float | None:
    """Largest over smallest of ``norms[indices]`` (finite, positive); ``None`` with fewer than two such."""
    values = [norms[j] for j in indices if j < len(norms) and math.isfinite(norms[j]) and norms[j] > 0]
    return max(values) / min(values) if len(values) >= 2 else None


def worst_of(severities: Iterable[Severity]) -> Severity:
    """The worst of ``severities``."""
    return max(severities, key=rank)


def rank(severity: Severity) -> int:
    """``ok`` 0, ``warning`` 1, ``critical`` 2."""
    return (Severity.OK, Severity.WARNING, Severity.CRITICAL).index(severity)
