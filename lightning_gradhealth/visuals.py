"""TensorBoard visuals: gradient histograms, the gradient-flow figure, and a custom-scalars layout."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from lightning_gradhealth.metrics import (
    GRAD_NORM,
    GRAD_RATIO,
    GRAD_ZERO_FRAC,
    HISTOGRAM,
    SUMMARY_KEYS,
    layer_key_pattern,
    metric_key,
    short_name,
)
from lightning_gradhealth.record import StepStats

__all__ = ["custom_scalars_layout", "gradient_flow_figure", "write_histograms"]


def custom_scalars_layout(summary_keys: Sequence[str] = SUMMARY_KEYS) -> dict[str, dict[str, list[Any]]]:
    """A layout for TensorBoard's Custom Scalars tab grouping the monitor's charts.

    Args:
        summary_keys: The global keys to put in the "global" group, one chart each.

    Returns:
        The layout, as ``SummaryWriter.add_custom_scalars`` takes it.
    """
    return {
        "gradient health: global": {short_name(key): ["Multiline", [key]] for key in summary_keys},
        "gradient health: per layer": {
            "gradient norms": ["Multiline", [layer_key_pattern(GRAD_NORM)]],
            "grad / param ratios": ["Multiline", [layer_key_pattern(GRAD_RATIO)]],
            "zero fractions": ["Multiline", [layer_key_pattern(GRAD_ZERO_FRAC)]],
        },
    }


def gradient_flow_figure(record: StepStats) -> Any:
    """Per-layer gradient norm against depth, log scale (seed 002's plot), as a matplotlib figure.

    Raises:
        ImportError: matplotlib is not installed (``pip install lightning-gradhealth[plots]``).
    """
    from matplotlib.figure import Figure  # (a Figure needs no backend: the notebook's is left alone)

    fig = Figure(figsize=(max(6.0, 0.25 * len(record.layers)), 4.0), dpi=100)
    ax = fig.add_subplot()
    norms = [lay.grad_norm if lay.grad_norm > 0 and math.isfinite(lay.grad_norm) else math.nan for lay in record.layers]
    ax.semilogy(range(len(norms)), norms, "o-")
    ax.set_xlabel("layer (definition order = depth)")
    ax.set_ylabel("gradient norm (log scale)")
    ax.set_title(f"Gradient flow at step {record.step}")
    ax.grid(True, alpha=0.3)
    if len(record.layers) <= 40:
        ax.set_xticks(range(len(norms)), [lay.name for lay in record.layers], rotation=90, fontsize=7)
    fig.tight_layout()
    return fig


def write_histograms(writer: Any, histograms: dict[str, dict[str, Any]], step: int) -> None:
    """Write the engine's per-layer histograms with ``add_histogram_raw``, tagged ``metric_key(HISTOGRAM, layer)``.

    Args:
        writer: A TensorBoard ``SummaryWriter``.
        histograms: ``{layer: add_histogram_raw keyword arguments}``.
        step: The step to write them at.
    """
    for layer, h in histograms.items():
        writer.add_histogram_raw(metric_key(HISTOGRAM, layer), global_step=step, **h)
