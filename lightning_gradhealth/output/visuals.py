"""Visuals: gradient histograms, the gradient-flow figure (which layers are unhealthy), a custom-scalars layout."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.schema.metrics import (
    GRAD_NORM,
    GRAD_RATIO,
    GRAD_ZERO_FRAC,
    HISTOGRAM,
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
    for title, metric in (("gradient norm", GRAD_NORM), ("grad / param ratio", GRAD_RATIO),
                          ("zero fraction", GRAD_ZERO_FRAC)):  # fmt: skip
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


_COLOURS = {"critical": "tab:red", "warning": "tab:orange"}


def gradient_flow_figure(
    record: StepStats,
    flagged: Mapping[str, tuple[str, str]] | None = None,
    lines: Mapping[str, float] | None = None,
) -> Any:
    """Per-layer gradient norm against depth, log scale, unhealthy layers coloured and named, as a matplotlib figure.

    The plot of Glorot & Bengio (2010, "Understanding the difficulty of training deep feedforward neural
    networks"): layers in definition order on x, the gradient norm on a log axis on y, so that a decay with depth
    or a dead layer stands out at once. Layers whose norm is exactly zero or non-finite sit on the bottom edge.

    Args:
        record: The step's record.
        flagged: ``{layer: (severity, what)}``: the unhealthy layers (``"critical"`` in red, ``"warning"`` in
            orange), named on the figure with ``what`` (e.g. ``"vanishing"``).
        lines: ``{label: value}``: horizontal reference lines (e.g. the vanishing thresholds).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure  # (a Figure needs no backend: the notebook's is left alone)

    flagged = dict(flagged or {})
    layers = record.layers
    n = len(layers)
    fig = Figure(figsize=(min(16.0, max(7.0, 0.22 * n + 3.0)), 5.0), dpi=100)
    ax = fig.add_subplot()
    norms = [lay.grad_norm if lay.grad_norm > 0 and math.isfinite(lay.grad_norm) else math.nan for lay in layers]
    finite = [v for v in norms if not math.isnan(v)]
    for label, value in (lines or {}).items():
        finite.append(value)
        ax.axhline(value, color="0.5", linestyle="--", linewidth=0.8)
        ax.annotate(label, (0, value), xytext=(2, 2), textcoords="offset points", fontsize=7, color="0.35",
                    xycoords=("axes fraction", "data"))  # fmt: skip
    bottom = min(finite) / 10 if finite else 1e-12
    ax.semilogy(range(n), norms, "-", color="0.6", linewidth=1, zorder=1)
    shown = [v if not math.isnan(v) else bottom for v in norms]
    colours = [_COLOURS.get(flagged[lay.name][0], "tab:orange") if lay.name in flagged else "tab:blue"
               for lay in layers]  # fmt: skip
    ax.scatter(range(n), shown, c=colours, s=28, zorder=2)
    ax.set_ylim(bottom=bottom / 2)
    named = [i for i, lay in enumerate(layers) if lay.name in flagged]
    marked = named[:: max(1, math.ceil(len(named) / 20))]  # the flagged layers named on a dense axis
    for k, i in enumerate((named if n <= 80 else marked)[:8]):
        severity, what = flagged[layers[i].name]
        ax.annotate(f"{layers[i].name}: {what}", (i, shown[i]), xytext=(4, 6 + 9 * (k % 3)), textcoords="offset points",
                    fontsize=7, color=_COLOURS.get(severity, "tab:orange"), rotation=20)  # fmt: skip
    ax.set_xlabel("layer (definition order = depth)")
    ax.set_ylabel("gradient norm (log scale)")
    worst = "critical" if any(sev == "critical" for sev, _ in flagged.values()) else "warning"
    title = f"Gradient flow at step {record.step}"
    if named:
        listed = ", ".join(layers[i].name for i in named[:5]) + (f" and {len(named) - 5} more" * (len(named) > 5))
        title += f"\n{len(named)} unhealthy layer{'s' * (len(named) > 1)} ({worst}): {listed}"
    else:
        title += "\nno layer flagged"
    ax.set_title(title, fontsize=9, color=_COLOURS[worst] if named else "black")
    ax.grid(True, alpha=0.3)
    # at most 40 tick labels (text layout is what a figure costs): the flagged layers first, then evenly spaced
    spaced = range(0, n, max(1, math.ceil(n / (40 - len(marked)))))
    ticks = sorted(set(spaced) | set(marked))
    ax.set_xticks(ticks, [layers[i].name for i in ticks], rotation=90, fontsize=7)
    for tick, i in zip(ax.get_xticklabels(), ticks, strict=True):
        if layers[i].name in flagged:
            tick.set_color(_COLOURS.get(flagged[layers[i].name][0], "tab:orange"))
    longest = max((len(layers[i].name) for i in ticks), default=0)
    fig.subplots_adjust(left=0.1, right=0.98, top=0.88, bottom=min(0.6, 0.14 + 0.012 * longest))  # (no tight_layout)
    return fig


def render(figure: Any) -> Any:
    """``figure`` drawn once, as an ``(H, W, 3)`` uint8 array (what TensorBoard and W&B take)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def flagged_layers(
    record: StepStats, thresholds: Thresholds, inventory: ModelInventory | None = None
) -> dict[str, tuple[str, str]]:
    """The unhealthy layers of ``record``, as the alert checks see them: ``{layer: (severity, kind)}``.

    Layers with NaN/Inf gradient entries are critical (``"nonfinite"``); the others are graded by
    :func:`~lightning_gradhealth.diagnosis.checks.check_record` (vanishing, grad/param ratio), past its warm-up.
    """
    from lightning_gradhealth.diagnosis.checks import check_record

    out = {lay.name: ("critical", "nonfinite") for lay in record.layers if lay.nan_count or lay.inf_count}
    alerts = check_record(record, thresholds, steps_seen=record.global_step + 1, inventory=inventory)
    for alert in alerts:
        if alert.layer is not None and out.get(alert.layer, ("",))[0] != "critical":
            out[alert.layer] = (str(getattr(alert.severity, "value", alert.severity)), str(alert.kind))
    return out


def reference_lines(thresholds: Thresholds) -> dict[str, float]:
    """The horizontal lines of the gradient-flow figure: the layer-vanishing thresholds."""
    return {
        f"vanishing, warning (< {thresholds.layer_norm_low_warning:g})": thresholds.layer_norm_low_warning,
        f"vanishing, critical (< {thresholds.layer_norm_low_critical:g})": thresholds.layer_norm_low_critical,
    }


def write_histograms(writer: Any, histograms: dict[str, dict[str, Any]], step: int) -> None:
    """Write the engine's per-layer histograms with ``add_histogram_raw``, tagged ``metric_key(HISTOGRAM, layer)``.

    Args:
        writer: A TensorBoard ``SummaryWriter``.
        histograms: ``{layer: add_histogram_raw keyword arguments}``.
        step: The step to write them at.
    """
    for layer, h in histograms.items():
        writer.add_histogram_raw(metric_key(HISTOGRAM, layer), global_step=step, **h)
