"""TensorBoard visuals: gradient histograms, a record's gradient-flow figure, a custom-scalars layout.

The figure itself is drawn by :mod:`~lightning_gradhealth.output.figures` (the report's PNG is the same figure).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.output.figures import flagged_from, gradient_flow, reference_lines, render
from lightning_gradhealth.schema.metrics import (
    HISTOGRAM,
    LAYER_METRICS,
    SUMMARY_KEYS,
    layer_key_pattern,
    metric_key,
    short_name,
)
from lightning_gradhealth.schema.record import StepStats

__all__ = [
    "LAYERS_PER_CHART",
    "custom_scalars_layout",
    "flagged_layers",
    "gradient_flow_figure",
    "reference_lines",
    "render",
    "write_histograms",
]


#: Lines per chart of the custom-scalars layout's per-layer charts (consecutive layers, in depth order).
LAYERS_PER_CHART = 8


def custom_scalars_layout(
    summary_keys: Sequence[str] = SUMMARY_KEYS, layer_names: Sequence[str] = ()
) -> dict[str, dict[str, list[Any]]]:
    """A layout for TensorBoard's Custom Scalars tab grouping the monitor's charts.

    The per-layer charts hold at most :data:`LAYERS_PER_CHART` consecutive layers each (``layers 1-8: net.0 ...
    net.14``), so that a deep model is not 50 lines on one linear axis; without ``layer_names`` there is one chart
    per metric.

    Args:
        summary_keys: The global keys to put in the "global" group, one chart each.
        layer_names: The watched layers in depth order.

    Returns:
        The layout, as ``SummaryWriter.add_custom_scalars`` takes it.
    """
    per_layer: dict[str, list[Any]] = {}
    for title, metric in ((m.title, m.key) for m in LAYER_METRICS if m.chart):  # (declared once: metrics.py)
        if not layer_names:
            per_layer[f"{title}s"] = ["Multiline", [layer_key_pattern(metric)]]
            continue
        for first in range(0, len(layer_names), LAYERS_PER_CHART):
            chunk = layer_names[first : first + LAYERS_PER_CHART]
            names = chunk[0] if len(chunk) == 1 else f"{chunk[0]} ... {chunk[-1]}"
            label = f"{title}, layers {first + 1}-{first + len(chunk)} ({names})"
            per_layer[label] = ["Multiline", [f"^{re.escape(metric_key(metric, name))}(/opt\\d+)?$" for name in chunk]]
    return {
        "gradient health: global": {short_name(key): ["Multiline", [key]] for key in summary_keys},
        "gradient health: per layer": per_layer,
    }


def gradient_flow_figure(
    record: StepStats,
    flagged: Mapping[str, tuple[str, str]] | None = None,
    lines: Mapping[str, float] | None = None,
) -> Any:
    """The gradient-flow figure of ``record`` (:func:`~lightning_gradhealth.output.figures.gradient_flow`).

    Args:
        record: The step's record: its layers, their norms and its step (the title's).
        flagged: ``{layer: (severity, kind)}`` (:func:`flagged_layers`): the unhealthy layers, coloured.
        lines: ``{label: value}``: horizontal reference lines (:func:`reference_lines`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    layers = record.layers
    return gradient_flow([lay.name for lay in layers], [lay.grad_norm for lay in layers], record.step, flagged, lines)


def flagged_layers(
    record: StepStats,
    thresholds: Thresholds | None = None,
    inventory: ModelInventory | None = None,
    *,
    graded: Iterable[Any] | None = None,
) -> dict[str, tuple[str, str]]:
    """The unhealthy layers of ``record``: ``{layer: (severity, kind)}``, what the figure colours.

    Layers with NaN/Inf gradient entries are critical (``"nonfinite"``); the others as ``graded`` says: the step's
    alerts, or the run's findings, as the caller already has them (nothing is graded twice). Without ``graded``
    (``None``), the record is graded here by :func:`~lightning_gradhealth.diagnosis.checks.check_record`, past its
    warm-up, as the guard grades a step.

    Args:
        record: The step's record.
        thresholds: The lines (only without ``graded``; default :class:`Thresholds`).
        inventory: What the model is made of (only without ``graded``).
        graded: Alerts (``.layer``) and/or findings (``.layers``).
    """
    if graded is None:
        from lightning_gradhealth.diagnosis.checks import check_record

        th = thresholds or Thresholds()
        graded = check_record(record, th, steps_seen=record.global_step + 1, inventory=inventory)
    return flagged_from(graded, nonfinite=[lay.name for lay in record.layers if lay.nan_count or lay.inf_count])


def write_histograms(writer: Any, histograms: dict[str, dict[str, Any]], step: int) -> None:
    """Write the engine's per-layer histograms with ``add_histogram_raw``, tagged ``metric_key(HISTOGRAM, layer)``.

    Args:
        writer: A TensorBoard ``SummaryWriter``.
        histograms: ``{layer: add_histogram_raw keyword arguments}``.
        step: The step to write them at.
    """
    for layer, h in histograms.items():
        writer.add_histogram_raw(metric_key(HISTOGRAM, layer), global_step=step, **h)
