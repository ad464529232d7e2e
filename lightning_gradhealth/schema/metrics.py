"""Metric names: the one place that spells the logged keys, builds them, and parses them back.

A key is ``<metric>`` for a global value (``grad_health/total_norm``) or ``<metric>/<layer>`` for a per-layer
one (``grad_norm/net.0``); with several optimizers the gradient keys end in ``/opt{idx}``. Every other module
builds keys with :func:`metric_key` and reads them with :func:`parse_key` or :func:`metrics_to_record`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from lightning_gradhealth.schema.record import LayerStats, StepStats

__all__ = [
    "ACT_DEAD_FRAC",
    "ACT_SATURATED_FRAC",
    "ACT_ZERO_FRAC",
    "ALERTS",
    "AMP_OVERFLOW",
    "AMP_SCALE",
    "CLIPPED_NORM",
    "CLIP_COEF",
    "CLIP_FRAC",
    "GLOBAL_KEYS",
    "GRADIENT_FLOW",
    "GRAD_COSINE",
    "GRAD_DEAD_UNITS",
    "GRAD_INF",
    "GRAD_MAX",
    "GRAD_MEAN",
    "GRAD_MIN",
    "GRAD_NAN",
    "GRAD_NORM",
    "GRAD_RATIO",
    "GRAD_STD",
    "GRAD_ZERO_FRAC",
    "HISTOGRAM",
    "INF_COUNT",
    "LAYER_KEYS",
    "LAYER_METRICS",
    "LAYER_NORM_RATIO",
    "LOSS",
    "LR_FACTOR",
    "NAN_COUNT",
    "NOISE_SCALE",
    "NO_GRAD_COUNT",
    "PARAM_NORM",
    "POST_CLIP_NORM",
    "ROLLBACKS",
    "SKIPPED_STEPS",
    "SPIKES",
    "SUMMARY_KEYS",
    "TOTAL_NORM",
    "UPDATE_RATIO",
    "ZERO_FRAC",
    "LayerMetric",
    "MetricKey",
    "activation_metrics",
    "layer_key_pattern",
    "metric_key",
    "metrics_to_record",
    "parse_key",
    "record_to_metrics",
    "short_name",
    "summary_metrics",
]

_NAMESPACE = "grad_health"

#: Summary keys, logged on every computed step.
TOTAL_NORM = "grad_health/total_norm"
PARAM_NORM = "grad_health/param_norm"
ZERO_FRAC = "grad_health/zero_frac"
NAN_COUNT = "grad_health/nan_count"
INF_COUNT = "grad_health/inf_count"
LAYER_NORM_RATIO = "grad_health/layer_norm_ratio"
NO_GRAD_COUNT = "grad_health/no_grad_count"
SUMMARY_KEYS: tuple[str, ...] = (
    TOTAL_NORM,
    PARAM_NORM,
    ZERO_FRAC,
    NAN_COUNT,
    INF_COUNT,
    LAYER_NORM_RATIO,
    NO_GRAD_COUNT,
)

#: Counters and per-step values of the safety features (only those that are on are logged).
ALERTS = "grad_health/alerts"
SKIPPED_STEPS = "grad_health/skipped_steps"
AMP_OVERFLOW = "grad_health/amp_overflow"
SPIKES = "grad_health/spikes"
CLIP_COEF = "grad_health/clip_coef"
CLIPPED_NORM = "grad_health/clipped_norm"
CLIP_FRAC = "grad_health/clip_frac"
#: Recovery (``recover=``): rollbacks so far, and the learning-rate factor applied on top of the schedule.
ROLLBACKS = "grad_health/rollbacks"
LR_FACTOR = "grad_health/lr_factor"
#: Logged when the Trainer clips gradients, and when a GradScaler is active.
POST_CLIP_NORM = "grad_health/post_clip_norm"
AMP_SCALE = "grad_health/amp_scale"
#: The step's training loss (:attr:`StepStats.loss`): never logged by this package (the training loop logs its
#: loss); named for the evidence of the "diverging" diagnosis, and read back by :func:`metrics_to_record`.
LOSS = "grad_health/loss"
#: Update size and batch-size advice (:mod:`~lightning_gradhealth.stats.updates`,
#: :mod:`~lightning_gradhealth.stats.noise`), on computed steps when measured: the cosine between consecutive steps'
#: gradients, and the gradient noise scale.
GRAD_COSINE = "grad_health/grad_cosine"
NOISE_SCALE = "grad_health/noise_scale"
#: TensorBoard-only: the gradient-flow figure's tag, and the per-layer histograms' prefix.
GRADIENT_FLOW = "grad_health/gradient_flow"
HISTOGRAM = "grad_hist"

#: Every global (not per-layer) key.
GLOBAL_KEYS: frozenset[str] = frozenset(
    (*SUMMARY_KEYS, ALERTS, SKIPPED_STEPS, AMP_OVERFLOW, SPIKES, CLIP_COEF, CLIPPED_NORM, CLIP_FRAC, POST_CLIP_NORM,
     AMP_SCALE, GRADIENT_FLOW, LOSS, GRAD_COSINE, NOISE_SCALE, ROLLBACKS, LR_FACTOR)
)  # fmt: skip

#: Per-layer gradient metrics (``<metric>/<layer>``).
GRAD_NORM = "grad_norm"
GRAD_RATIO = "grad_ratio"
GRAD_ZERO_FRAC = "grad_zero_frac"
GRAD_NAN = "grad_nan"
GRAD_INF = "grad_inf"
GRAD_MAX = "grad_max"
GRAD_MIN = "grad_min"
GRAD_MEAN = "grad_mean"
GRAD_STD = "grad_std"
#: Fraction of the layer's units (rows of its 2-D+ parameters) whose gradient is entirely zero.
GRAD_DEAD_UNITS = "grad_dead_units"
#: ``‖θ_after − θ_before‖ / ‖θ_before‖`` of the layer's latest update (when measured).
UPDATE_RATIO = "update_ratio"



@dataclass(frozen=True)
class LayerMetric:
    """One per-layer statistic, declared once: its key, the record field it logs, and where it shows.

    The loggers (:func:`record_to_metrics`), the event-file reader (:func:`metrics_to_record`), the history the
    rules and the report read (:class:`~lightning_gradhealth.diagnosis.history.History`), TensorBoard's layout and
    the report's per-layer table all follow :data:`LAYER_METRICS`: a new per-layer statistic is one line there,
    its :class:`~lightning_gradhealth.schema.record.LayerStats` field, and where the engine computes it.

    Attributes:
        key: The key prefix (``<key>/<layer>``).
        field: The :class:`~lightning_gradhealth.schema.record.LayerStats` attribute it logs (``None``: not logged).
        when: When it is logged: ``"always"``, ``"nonzero"`` (only non-zero values), ``"full"`` (``stats="full"``),
            ``"units"`` (layers with units), ``"update"`` (when measured); the groups of :data:`LAYER_KEYS`.
        title: Its name in charts and the report.
        history: Its series' name in the history (``History.layers[history]``), ``None``: not kept.
        chart: Whether TensorBoard's Custom Scalars layout gets per-layer charts of it.
        report: Whether the report's per-layer table shows its last value (column ``last_<history>``).
    """

    key: str
    field: str
    when: str
    title: str
    history: str | None = None
    chart: bool = False
    report: bool = False


#: Every per-layer statistic, in the order of the loggers' keys.
LAYER_METRICS: tuple[LayerMetric, ...] = (
    LayerMetric(GRAD_NORM, "grad_norm", "always", "gradient norm", history="norm", chart=True),
    LayerMetric(GRAD_RATIO, "ratio", "always", "grad / param ratio", history="ratio", chart=True),
    LayerMetric(GRAD_ZERO_FRAC, "zero_frac", "always", "zero fraction", history="zero_frac", chart=True),
    LayerMetric(GRAD_NAN, "nan_count", "nonzero", "NaN entries"),
    LayerMetric(GRAD_INF, "inf_count", "nonzero", "Inf entries"),
    LayerMetric(GRAD_DEAD_UNITS, "dead_unit_frac", "units", "dead units", history="dead_units"),
    LayerMetric(UPDATE_RATIO, "update_ratio", "update", "update ratio", history="update_ratio"),
    LayerMetric(GRAD_MAX, "max_abs", "full", "largest |g|"),
    LayerMetric(GRAD_MIN, "min_abs_nonzero", "full", "smallest non-zero |g|"),
    LayerMetric(GRAD_MEAN, "mean", "full", "mean"),
    LayerMetric(GRAD_STD, "std", "full", "standard deviation"),
)

#: Per-layer key prefixes: always, only on steps where the value is non-zero, with ``stats="full"``, for layers
#: that have units (a parameter with two dimensions or more: not for biases or norms alone), and when measured.
LAYER_KEYS: dict[str, tuple[str, ...]] = {
    group: tuple(m.key for m in LAYER_METRICS if m.when == group)
    for group in ("always", "nonzero", "full", "units", "update")
}

#: Per-module activation metrics (``<metric>/<module>``; never suffixed by an optimizer).
ACT_DEAD_FRAC = "act_dead_frac"
ACT_ZERO_FRAC = "act_zero_frac"
ACT_SATURATED_FRAC = "act_saturated_frac"

_GRAD_PREFIXES = frozenset((*(k for keys in LAYER_KEYS.values() for k in keys), HISTOGRAM))
_ACT_PREFIXES = frozenset((ACT_DEAD_FRAC, ACT_ZERO_FRAC, ACT_SATURATED_FRAC))
_OPTIMIZER = re.compile(r"^(?P<head>.+)/opt(?P<idx>\d+)$")


class MetricKey(NamedTuple):
    """A key taken apart by :func:`parse_key`.

    Attributes:
        metric: A global key (``TOTAL_NORM``, ``ALERTS``, ...) or a per-layer prefix (``GRAD_NORM``,
            ``ACT_DEAD_FRAC``, ``HISTOGRAM``, ...), without the optimizer suffix.
        layer: The layer (or activation module), or ``None`` for a global key.
        optimizer_idx: The ``/opt{idx}`` suffix, or ``None`` when there is none.
    """

    metric: str
    layer: str | None
    optimizer_idx: int | None


def metric_key(metric: str, layer: str | None = None, optimizer_idx: int | None = None) -> str:
    """Build a key: ``metric``, then ``/<layer>`` for a per-layer metric, then ``/opt{idx}`` with several optimizers.

    Args:
        metric: A global key (e.g. :data:`TOTAL_NORM`) or a per-layer prefix (e.g. :data:`GRAD_NORM`).
        layer: The layer or module; ``None`` for a global key.
        optimizer_idx: Appended as ``/opt{idx}`` when not ``None``.

    Returns:
        The key, as the loggers receive it.
    """
    key = metric if layer is None else f"{metric}/{layer}"
    return key if optimizer_idx is None else f"{key}/opt{optimizer_idx}"


@functools.lru_cache(maxsize=65536)  # (the same keys come back every step: gradhealth report reads millions)
def parse_key(key: str) -> MetricKey | None:
    """Take a key made by this module apart: the inverse of :func:`metric_key`.

    Layer names are module or parameter names, which hold no ``/``; the optimizer suffix is only read on
    gradient keys (activation keys never carry one).

    Args:
        key: A logged key, without a logger's prefix.

    Returns:
        ``(metric, layer, optimizer_idx)``, or ``None`` for a key this package does not log.
    """
    if key in GLOBAL_KEYS:
        return MetricKey(key, None, None)
    suffixed = _OPTIMIZER.match(key)
    if suffixed is not None and suffixed["head"] in GLOBAL_KEYS:
        return MetricKey(suffixed["head"], None, int(suffixed["idx"]))
    prefix, _, rest = key.partition("/")
    if not rest:
        return None
    if prefix in _ACT_PREFIXES:
        return MetricKey(prefix, rest, None)
    if prefix in _GRAD_PREFIXES:
        suffixed = _OPTIMIZER.match(rest)
        if suffixed is not None:
            return MetricKey(prefix, suffixed["head"], int(suffixed["idx"]))
        return MetricKey(prefix, rest, None)
    return None


def layer_key_pattern(metric: str) -> str:
    """A regular expression matching every layer's key of a per-layer ``metric`` (for TensorBoard's layouts)."""
    return rf"{re.escape(metric)}/.*"


def short_name(key: str) -> str:
    """A global key without the package's namespace: ``grad_health/total_norm`` -> ``total_norm``."""
    return key.removeprefix(f"{_NAMESPACE}/")


def summary_metrics(record: StepStats, optimizer_idx: int | None = None) -> dict[str, float]:
    """The summary (global) metrics of a record.

    Args:
        record: The step's record.
        optimizer_idx: Appended as ``/opt{idx}`` to every key when not ``None`` (several optimizers).

    Returns:
        ``{key: value}`` with the keys of :data:`SUMMARY_KEYS`, plus :data:`POST_CLIP_NORM` when the Trainer
        clips gradients and :data:`AMP_SCALE` when a GradScaler is active.
    """
    values = (
        record.total_norm,
        record.param_norm,
        record.zero_frac,
        float(record.nan_count),
        float(record.inf_count),
        record.layer_norm_ratio,
        float(record.no_grad_count),
    )
    out = {metric_key(key, None, optimizer_idx): value for key, value in zip(SUMMARY_KEYS, values, strict=True)}
    if record.post_clip_norm is not None:
        out[metric_key(POST_CLIP_NORM, None, optimizer_idx)] = record.post_clip_norm
    if record.amp_scale is not None:
        out[metric_key(AMP_SCALE, None, optimizer_idx)] = record.amp_scale
    if record.grad_cosine is not None:
        out[metric_key(GRAD_COSINE, None, optimizer_idx)] = record.grad_cosine
    if record.noise_scale is not None:
        out[metric_key(NOISE_SCALE, None, optimizer_idx)] = record.noise_scale
    return out


def record_to_metrics(record: StepStats, optimizer_idx: int | None = None) -> dict[str, float]:
    """All metrics of a record: the summary plus one group of keys per layer.

    Args:
        record: The step's record.
        optimizer_idx: Appended as ``/opt{idx}`` to every key when not ``None`` (several optimizers).

    Returns:
        ``{key: value}`` ready for ``logger.log_metrics``.
    """
    out = summary_metrics(record, optimizer_idx)
    for layer in record.layers:
        for m in LAYER_METRICS:
            value = getattr(layer, m.field)
            if value is None or (m.when == "nonzero" and not value):
                continue
            out[metric_key(m.key, layer.name, optimizer_idx)] = float(value)
    return out


def metrics_to_record(metrics: Mapping[str, float], step: int, optimizer_idx: int | None = None) -> StepStats:
    """Rebuild a record from one step's logged metrics: the inverse of :func:`record_to_metrics`, as far as it goes.

    What is not logged comes back as a neutral value: every layer's ``numel`` is 1, its ``param_norm`` NaN and its
    ``units`` ``None`` (its ``dead_unit_frac`` is read back); a missing summary value is NaN (norms, fractions)
    or 0 (counts), a missing layer-norm ratio 1.0; the loss is read when logged under :data:`LOSS`. A layer is
    in the record when its :data:`GRAD_NORM` key is, in the order of ``metrics``. Keys this package does not
    log, and those of other optimizers, are ignored.

    Args:
        metrics: ``{key: value}`` of one step (keys without a logger's prefix).
        step: The step (also used as the global step; epoch and batch index are 0).
        optimizer_idx: Read the keys suffixed ``/opt{idx}``; ``None`` for a run with one optimizer.

    Returns:
        The record.

    Raises:
        KeyError: ``metrics`` has no :data:`TOTAL_NORM` for this optimizer.
    """
    summary, layers = _reading(tuple(metrics), optimizer_idx)
    if TOTAL_NORM not in summary:
        raise KeyError(f"no {metric_key(TOTAL_NORM, None, optimizer_idx)!r} among the metrics of step {step}")
    values = list(metrics.values())
    got = {metric: values[i] for metric, i in summary.items()}
    stats: list[Any] = [None] * sum(len(at) for at, _ in layers)
    for at, columns in layers:  # (each group of layers read alike: one column per LayerStats field)
        made = map(LayerStats, *(_column(kind, data, values) for kind, data in columns))
        if len(layers) == 1:
            stats = list(made)
        else:
            for position, layer in zip(at, made, strict=True):
                stats[position] = layer
    return StepStats(
        step=step, global_step=step, epoch=0, batch_idx=0, optimizer_idx=optimizer_idx or 0,
        total_norm=got[TOTAL_NORM], param_norm=got.get(PARAM_NORM, math.nan),
        zero_frac=got.get(ZERO_FRAC, math.nan), nan_count=int(got.get(NAN_COUNT, 0)),
        inf_count=int(got.get(INF_COUNT, 0)), layer_norm_ratio=got.get(LAYER_NORM_RATIO, 1.0),
        no_grad_count=int(got.get(NO_GRAD_COUNT, 0)), layers=tuple(stats),
        post_clip_norm=got.get(POST_CLIP_NORM), amp_scale=got.get(AMP_SCALE), loss=got.get(LOSS),
        grad_cosine=got.get(GRAD_COSINE), noise_scale=got.get(NOISE_SCALE),
    )  # fmt: skip


_LAYER_PREFIXES = frozenset(m.key for m in LAYER_METRICS)
_FULL = tuple(m.key for m in LAYER_METRICS if m.when == "full")
#: What a layer read back holds where nothing is logged: numel 1, NaN parameter norm, ratio and zero fraction, and
#: LayerStats' own defaults.
_UNLOGGED: dict[str, Any] = {
    **{f.name: f.default for f in dataclasses.fields(LayerStats) if f.default is not dataclasses.MISSING},
    "numel": 1, "param_norm": math.nan, "ratio": math.nan, "zero_frac": math.nan,
}  # fmt: skip
#: One column of a group of layers: ``("name", names)``, ``("same", value)``, ``("float", indices)`` or
#: ``("int", indices)`` (the values at those indices, as integers).
_Column = tuple[str, Any]


def _column(kind: str, data: Any, values: list[float]) -> Any:
    """The values of one LayerStats field for a group of layers (an iterable, one per layer)."""
    if kind == "same":
        return itertools.repeat(data)
    if kind == "name":
        return data
    column = [values[i] for i in data]
    return column if kind == "float" else [int(v) for v in column]


@functools.lru_cache(maxsize=16)  # (a run logs the same keys in the same order on every step)
def _reading(
    keys: tuple[str, ...], optimizer_idx: int | None
) -> tuple[dict[str, int], list[tuple[tuple[int, ...], tuple[_Column, ...]]]]:
    """How :func:`metrics_to_record` reads a step's values, in the order of ``keys``, worked out once per ``keys``.

    Returns:
        ``{summary metric: index}``, and the layers with a :data:`GRAD_NORM` key (numbered in order of first
        appearance) in groups of layers that logged the same statistics: their numbers and one column per
        :class:`~lightning_gradhealth.schema.record.LayerStats` field (those of ``stats="full"`` only when all were
        logged; counts as integers). A later key taken apart the same way as an earlier one wins, as in a dict.
    """
    summary: dict[str, int] = {}
    layers: dict[str, dict[str, int]] = {}
    for i, key in enumerate(keys):
        parsed = parse_key(key)
        if parsed is None or parsed.optimizer_idx != optimizer_idx:
            continue
        if parsed.layer is None:
            summary[parsed.metric] = i
        elif parsed.metric in _LAYER_PREFIXES:
            layers.setdefault(parsed.layer, {})[parsed.metric] = i
    groups: dict[tuple[str, ...], list[tuple[int, str, dict[str, int]]]] = {}
    named = [(name, found) for name, found in layers.items() if GRAD_NORM in found]
    for at, (name, found) in enumerate(named):
        full = all(key in found for key in _FULL)
        read = tuple(m.key for m in LAYER_METRICS if m.key in found and (m.when != "full" or full))
        groups.setdefault(read, []).append((at, name, found))
    plans = []
    for read, members in groups.items():
        logged = {m.field: m for m in LAYER_METRICS if m.key in read}
        columns: list[_Column] = []
        for f in dataclasses.fields(LayerStats):
            if f.name == "name":
                columns.append(("name", tuple(name for _, name, _ in members)))
            elif f.name in logged:
                m = logged[f.name]
                where = tuple(found[m.key] for _, _, found in members)
                columns.append(("int" if m.when == "nonzero" else "float", where))
            else:
                columns.append(("same", _UNLOGGED[f.name]))
        plans.append((tuple(at for at, _, _ in members), tuple(columns)))
    return summary, plans


def activation_metrics(stats: dict[str, tuple[float, float, float | None]]) -> dict[str, float]:
    """The keys of the activation statistics: ``{module: (dead, zero, saturated or None)}`` to ``{key: value}``."""
    out: dict[str, float] = {}
    for name, (dead, zero, saturated) in stats.items():
        out[metric_key(ACT_DEAD_FRAC, name)] = dead
        out[metric_key(ACT_ZERO_FRAC, name)] = zero
        if saturated is not None:
            out[metric_key(ACT_SATURATED_FRAC, name)] = saturated
    return out
