"""A compact, bounded history of records on the host, for the rules and the report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lightning_gradhealth.model.frozen import TrainingFacts
from lightning_gradhealth.schema.metrics import LAYER_METRICS
from lightning_gradhealth.schema.record import LossSummary, StepStats

__all__ = ["GLOBAL_SERIES", "LAYER_SERIES", "History"]

#: History series of the whole step -> the :class:`~lightning_gradhealth.schema.record.StepStats` field it keeps
#: (dotted: a field of a field; ``None`` kept as ``nan``). :meth:`History.add` and thinning read this table: a
#: series is added here (and as a History field), nowhere else.
GLOBAL_SERIES: dict[str, str] = {
    "steps": "step",
    "total_norm": "total_norm",
    "zero_frac": "zero_frac",
    "layer_norm_ratio": "layer_norm_ratio",
    "loss": "loss",
    "grad_cosine": "grad_cosine",
    "noise_scale": "noise_scale",
    "loss_mean": "loss_summary.mean",
    "loss_high": "loss_summary.high",
    "lr": "lr",
}

#: Per-layer series (one row per kept record, one column per layer): ``History.layers[name]``, one for each per-layer
#: statistic that :data:`~lightning_gradhealth.schema.metrics.LAYER_METRICS` keeps, by its ``history`` name -> the
#: :class:`~lightning_gradhealth.schema.record.LayerStats` field it holds.
LAYER_SERIES: dict[str, str] = {m.history: m.field for m in LAYER_METRICS if m.history is not None}


def _value(value: float | None) -> float:
    return math.nan if value is None else value


def _field(record: object, path: str) -> float | None:
    """``record``'s field at a dotted ``path`` (``None`` where a part is ``None``)."""
    value: object = record
    for name in path.split("."):
        value = None if value is None else getattr(value, name)
    return value  # type: ignore[return-value]


@dataclass
class History:
    """Global series and per-layer snapshots of the computed steps, bounded in memory.

    When more than ``max_snapshots`` records have been kept, every other one is dropped (the first and the
    non-finite ones are always kept), so a run of any length keeps an evenly thinned picture of itself.

    Attributes:
        max_snapshots: Upper bound on the number of records kept.
        layer_names: Every layer seen, in definition order of first appearance.
        steps: Step of each kept record.
        total_norm: Global gradient norm of each kept record.
        zero_frac: Global zero fraction of each kept record.
        layer_norm_ratio: Largest / smallest layer norm of each kept record.
        layers: Per-layer series by name (:data:`LAYER_SERIES`): per kept record, each layer's value (``nan``
            where the layer had no gradient or the value is ``None``). :attr:`layer_norm`, :attr:`layer_zero_frac`,
            :attr:`layer_ratio`, :attr:`layer_dead_units` and :attr:`layer_update_ratio` name the series the rules
            read.
        loss: The training loss of each kept record (``nan`` where the record has none).
        grad_cosine: The gradient cosine of each kept record (``nan`` where not measured).
        noise_scale: The gradient noise scale of each kept record (``nan`` where not measured).
        batch_size: The examples per optimizer step of the latest record with a noise scale.
        first_nonfinite: The first non-finite record, if any.
        last_nonfinite: The latest non-finite record, if any.
        nonfinite_records: How many records offered to :meth:`add` were non-finite.
        worst_nonfinite_layers: The most layers with a non-finite gradient in one record.
        nonfinite_params_step: The first step whose record shows a NaN parameter norm (the weights themselves
            are corrupt), if any.
        no_grad_params: Parameters that never got a gradient in any kept record.
        spikes: ``(step, z)`` of every spike reported to :meth:`add_spike`.
        rollbacks: Every rollback of recovery (``recover=``), as a dict (step, to_step, trigger, reason, factor,
            skipped).
        records_seen: Records offered to :meth:`add`, kept or not.
        loss_mean: Per kept record, the mean loss of every step since the previous record (a smoothed loss).
        loss_high: Per kept record, the largest loss of those steps.
        lr: Per kept record, the largest learning rate of its optimizer (``nan`` where unknown).
        loss_summary: The latest loss summary (:class:`~lightning_gradhealth.schema.record.LossSummary`).
        alerts_raised: How many alerts the run raised (set before a report).
        early_norm: The run's early global norm as the guard measured it (its first steps), when known.
        sizes: Per layer, its units and gradient entries in the latest record that had it (``units`` ``None``
            where not known): how much each layer weighs in the dead-unit fraction of the whole model.
        facts: What the loss is judged against (:class:`~lightning_gradhealth.model.frozen.TrainingFacts`), set
            before a report.
    """

    max_snapshots: int = 512
    layer_names: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    total_norm: list[float] = field(default_factory=list)
    zero_frac: list[float] = field(default_factory=list)
    layer_norm_ratio: list[float] = field(default_factory=list)
    layers: dict[str, list[list[float]]] = field(default_factory=lambda: {name: [] for name in LAYER_SERIES})
    grad_cosine: list[float] = field(default_factory=list)
    noise_scale: list[float] = field(default_factory=list)
    batch_size: int | None = None
    loss: list[float] = field(default_factory=list)
    first_nonfinite: StepStats | None = None
    last_nonfinite: StepStats | None = None
    nonfinite_records: int = 0
    worst_nonfinite_layers: int = 0
    nonfinite_params_step: int | None = None
    no_grad_params: set[str] | None = None
    spikes: list[tuple[int, float]] = field(default_factory=list)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    activations: dict[str, list[tuple[int, float, float, float | None]]] = field(default_factory=dict)
    records_seen: int = 0
    loss_mean: list[float] = field(default_factory=list)
    loss_high: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    loss_summary: LossSummary | None = None
    facts: TrainingFacts | None = None
    early_norm: float | None = None
    sizes: dict[str, tuple[int | None, int]] = field(default_factory=dict)  # layer -> (units, numel), latest
    alerts_raised: int = 0
    _keep_every: int = 1
    _index: dict[str, int] = field(default_factory=dict)  # layer name -> column

    def add(self, record: StepStats) -> None:
        """Keep ``record`` (or thin it out), in the order the steps come."""
        self.records_seen += 1
        finite = record.is_finite
        if not finite:
            if self.first_nonfinite is None:
                self.first_nonfinite = record
            self.last_nonfinite = record
            self.nonfinite_records += 1
            self.worst_nonfinite_layers = max(self.worst_nonfinite_layers, len(record.nonfinite_layers))
        # NaN only: a norm can overflow to inf on finite weights (float32, large norm_type), never to NaN
        # (a failing step read without a host sync has no parameter norms: NaN there means "not measured")
        if self.nonfinite_params_step is None and math.isnan(record.param_norm) and record.counts_exact:
            self.nonfinite_params_step = record.step
        names = set(record.no_grad_params)
        self.no_grad_params = names if self.no_grad_params is None else self.no_grad_params & names
        if finite and (self.records_seen - 1) % self._keep_every:
            return
        if any(lay.name not in self._index for lay in record.layers):
            self._merge_layers([lay.name for lay in record.layers])
        index = self._index
        n = len(self.layer_names)
        for series, field_name in LAYER_SERIES.items():
            row = [math.nan] * n
            for lay in record.layers:
                row[index[lay.name]] = _value(getattr(lay, field_name))
            self.layers[series].append(row)
        for series, field_name in GLOBAL_SERIES.items():
            value = _field(record, field_name)
            getattr(self, series).append(value if series == "steps" else _value(value))
        self.sizes.update({lay.name: (lay.units, lay.numel) for lay in record.layers})
        self.batch_size = record.batch_size or self.batch_size
        self.loss_summary = record.loss_summary or self.loss_summary
        if len(self.steps) > self.max_snapshots:
            self._thin()

    def keeps_next(self) -> bool:
        """Whether the next finite record offered to :meth:`add` is kept.

        One that is not is only counted (its norms are read, its layers never: a reader may offer it without them).
        """
        return self.records_seen % self._keep_every == 0

    def _merge_layers(self, names: list[str]) -> None:
        """Add layers that join mid-run (e.g. unfrozen) at their place in definition order ("depth")."""
        # a linear merge of two lists in definition order: the known layers and this record's
        old = {name: i for i, name in enumerate(self.layer_names)}
        order: list[str] = []
        placed: set[str] = set()
        k = 0  # the known layers before position k are placed
        for name in names:
            if name in old:
                for known in self.layer_names[k : old[name] + 1]:
                    if known not in placed:
                        order.append(known)
                        placed.add(known)
                k = max(k, old[name] + 1)
            elif name not in placed:
                order.append(name)
                placed.add(name)
        order += [known for known in self.layer_names[k:] if known not in placed]
        source = [old.get(name) for name in order]
        for rows in self.layers.values():
            rows[:] = [[row[j] if j is not None and j < len(row) else math.nan for j in source] for row in rows]
        self.layer_names = order
        self._index = {name: i for i, name in enumerate(order)}

    def add_activations(self, step: int, stats: dict[str, tuple[float, float, float | None]]) -> None:
        """Keep one sample of activation statistics (the most recent ``max_snapshots`` per module)."""
        for name, (dead, zero, sat) in stats.items():
            samples = self.activations.setdefault(name, [])
            samples.append((step, dead, zero, sat))
            del samples[: max(0, len(samples) - self.max_snapshots)]

    def add_spike(self, step: int, z: float) -> None:
        """Note a spike (kept in full: spikes are rare)."""
        self.spikes.append((step, z))

    def _thin(self) -> None:
        keep = [i for i in range(len(self.steps)) if i % 2 == 0 or not math.isfinite(self.total_norm[i])]
        for name in GLOBAL_SERIES:
            series = getattr(self, name)
            setattr(self, name, [series[i] for i in keep])
        for name, rows in self.layers.items():
            self.layers[name] = [rows[i] for i in keep]
        self._keep_every *= 2

    @property
    def layer_norm(self) -> list[list[float]]:
        """Per kept record, the gradient norm of each layer (``nan`` where the layer had no gradient)."""
        return self.layers["norm"]

    @property
    def layer_zero_frac(self) -> list[list[float]]:
        """Per kept record, the zero fraction of each layer."""
        return self.layers["zero_frac"]

    @property
    def layer_ratio(self) -> list[list[float]]:
        """Per kept record, the grad/param ratio of each layer."""
        return self.layers["ratio"]

    @property
    def layer_dead_units(self) -> list[list[float]]:
        """Per kept record, the dead-unit fraction of each layer.

        ``nan`` where it is ``None``: no gradient, or no units, see
        :attr:`~lightning_gradhealth.schema.record.LayerStats.dead_unit_frac`.
        """
        return self.layers["dead_units"]

    @property
    def layer_update_ratio(self) -> list[list[float]]:
        """Per kept record, the update ratio of each layer (``nan`` where not measured)."""
        return self.layers["update_ratio"]

    def layer_series(self, name: str, which: str = "norm") -> list[float]:
        """One layer's values over the kept records.

        ``which``: a series of :data:`LAYER_SERIES`: ``"norm"``, ``"zero_frac"``, ``"ratio"``, ``"dead_units"`` (the
        dead-unit fraction), ``"update_ratio"``.
        """
        j = self.layer_names.index(name)
        rows = self.layers[which]
        return [row[j] if j < len(row) else math.nan for row in rows]

    def recent(self, fraction: float = 0.25, minimum: int = 3) -> slice:
        """The slice of the most recent kept records (the last ``fraction``, at least ``minimum``)."""
        n = len(self.steps)
        k = min(n, max(minimum, math.ceil(n * fraction)))
        return slice(n - k, n)
