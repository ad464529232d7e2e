"""The gradient-flow figure, drawn by one function for TensorBoard (W&B, MLflow) and for the report's PNG.

The plot of Glorot & Bengio (2010, "Understanding the difficulty of training deep feedforward neural networks"):
layers in definition order on x, the gradient norm on a log axis on y, so that a decay with depth or a dead layer
stands out at once. It colours the layers that were already graded (the step's alerts, the run's findings: nothing is
graded here) and stays readable at the depth of GPT-2 (~75 layers with names like ``transformer.h.11.mlp.c_proj``):

- the title is wrapped to the canvas and leads with the step of the record drawn (a NaN step's own step);
- the x ticks are layer indices (integers), labelled with the layer names (the common prefix left out, long names
  shortened from the left), every k-th where they would not fit, the unhealthy layers' always;
- the few worst layers are named next to their point, the other unhealthy ones get their index, and a legend maps
  index → layer → problem; a label that would overlap another is left out (the legend still has it).

matplotlib is imported only when a figure is drawn, and without pyplot: a :class:`~matplotlib.figure.Figure` on its
own :class:`~matplotlib.backends.backend_agg.FigureCanvasAgg` (no global state, a notebook's backend left alone).
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.schema.alert import Severity

__all__ = [
    "COLOURS",
    "LEGEND_ROWS",
    "NAMED_LAYERS",
    "flagged_from",
    "gradient_flow",
    "reference_lines",
    "render",
    "save_png",
    "short_names",
]

#: Colours of the unhealthy layers by severity (the healthy ones are ``"tab:blue"``).
COLOURS = {"critical": "tab:red", "warning": "tab:orange"}
#: How many of the worst layers are named next to their point.
NAMED_LAYERS = 3
#: How many unhealthy layers the legend lists (the worst first; a last row says how many more).
LEGEND_ROWS = 12

_HEALTHY = "tab:blue"
_DPI = 100
_TICK_FONT = 7  # points
_LONGEST = 22  # characters of a tick label
_PLOT = 300  # the plot's height, pixels


def flagged_from(graded: Iterable[Any] = (), nonfinite: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """The unhealthy layers, from what was already graded: ``{layer: (severity, kind)}``.

    Args:
        graded: Alerts (``.layer``) and/or findings (``.layers``), each with ``.severity`` and ``.kind``; a layer
            keeps its worst severity (the first kind graded so).
        nonfinite: Layers whose gradient holds NaN/Inf (a fact of the record): critical, ``"nonfinite"``.

    Returns:
        ``{layer: (severity, kind)}``, with severity ``"critical"`` or ``"warning"``.
    """
    out = {name: ("critical", "nonfinite") for name in nonfinite}
    for item in graded:
        layer = getattr(item, "layer", None)
        layers = tuple(getattr(item, "layers", ())) or ((layer,) if layer is not None else ())
        severity = Severity(getattr(item, "severity", "warning"))
        if severity is Severity.OK:
            continue
        for name in layers:
            if name not in out or severity.rank > Severity(out[name][0]).rank:
                out[name] = (severity.value, str(item.kind))
    return out


def reference_lines(thresholds: Thresholds) -> dict[str, float]:
    """The horizontal lines of the gradient-flow figure: the layer-vanishing thresholds."""
    return {
        f"vanishing, warning (< {thresholds.layer_norm_low_warning:g})": thresholds.layer_norm_low_warning,
        f"vanishing, critical (< {thresholds.layer_norm_low_critical:g})": thresholds.layer_norm_low_critical,
    }


def short_names(names: Sequence[str], longest: int = _LONGEST) -> list[str]:
    """Tick labels for ``names``: their common dotted prefix left out, shortened from the left to ``longest``.

    The prefix goes only where every name keeps a part that is not a number (``net.0`` stays ``net.0``);
    ``transformer.h.11.mlp.c_proj`` beside ``lm_head`` becomes ``…h.11.mlp.c_proj``: the tail names the layer.
    """
    parts = [name.split(".") for name in names]
    common = 0
    while len(parts) > 1 and all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    while common and any(all(s.isdigit() for s in p[common:]) for p in parts):
        common -= 1
    out = []
    for p in parts:
        name = ".".join(p[common:])
        if len(name) > longest:  # whole trailing parts, else the last part's tail
            tail = p[-1]
            for part in reversed(p[common:-1]):
                if len(part) + len(tail) + 2 > longest:
                    break
                tail = f"{part}.{tail}"
            name = "…" + tail[max(0, len(tail) - longest + 1) :]
        out.append(name)
    return out


def _worst_first(names: Sequence[str], norms: Sequence[float], flagged: Mapping[str, tuple[str, str]]) -> list[int]:
    """Indices of the flagged layers, worst first.

    Critical before warning, non-finite first, then the norms farthest from the median on the log axis.
    """
    finite = [v for v in norms if v > 0 and math.isfinite(v)]
    centre = math.log10(statistics.median(finite)) if finite else 0.0

    def badness(i: int) -> tuple[float, ...]:
        severity, kind = flagged[names[i]]
        v = norms[i]
        spread = abs(math.log10(v) - centre) if v > 0 and math.isfinite(v) else math.inf
        return (-Severity(severity).rank, kind != "nonfinite", -spread, i)

    return sorted((i for i, name in enumerate(names) if name in flagged), key=badness)


def _title(step: int, names: Sequence[str], norms: Sequence[float], flagged: Mapping[str, tuple[str, str]],
           worst: Sequence[int]) -> list[str]:  # fmt: skip
    """The title's lines (before wrapping): the step, the non-finite layers, the unhealthy layers worst first."""
    head = f"Gradient flow at step {step}"
    bad = [i for i, v in enumerate(norms) if not math.isfinite(v)]
    if bad:
        head += f": NaN/Inf gradients in {len(bad)} layer{'s' * (len(bad) > 1)}, first {names[bad[0]]}"
    if not worst:
        return [head, "no layer flagged"]
    severity = flagged[names[worst[0]]][0]
    listed = ", ".join(names[i] for i in worst[:NAMED_LAYERS])
    more = len(worst) - NAMED_LAYERS
    s = "s" * (len(worst) > 1)
    return [head, f"{len(worst)} unhealthy layer{s} (worst: {severity}): {listed}" + f" and {more} more" * (more > 0)]


def _ticks(n: int, priority: Sequence[int], every: int) -> list[int]:
    """The labelled ticks, none closer than ``every`` to one taken before it.

    Taken in this order: the first and last layers, the unhealthy ones worst first, then every ``every``-th.
    """
    taken: list[int] = []
    for i in (0, n - 1, *priority, *range(0, n, every)):
        if all(abs(i - j) >= every for j in taken):
            taken.append(i)
    return sorted(taken)


def _fit_title(ax: Any, renderer: Any, lines: Sequence[str], width: float) -> None:
    """Set the title, each line wrapped so that the title is at most ``width`` pixels wide."""
    # placed above the index labels by hand: matplotlib's own placement measures every tick label (~20% of a figure)
    title = ax.set_title("\n".join(lines), fontsize=9, y=1 + 8 / _PLOT)
    chars = max(len(line) for line in lines)
    for _ in range(6):
        wide = title.get_window_extent(renderer).width
        if wide <= width:
            return
        chars = max(20, int(chars * width / wide) - 2)
        title.set_text("\n".join(textwrap.fill(line, chars, subsequent_indent="  ") for line in lines))


def _place(ax: Any, renderer: Any, taken: list[Any], text: str, xy: tuple[float, float],
           offsets: Sequence[tuple[int, int]], **style: Any) -> bool:  # fmt: skip
    """Annotate ``xy`` with ``text`` at the first offset (points) where it fits; whether one did.

    A label fits where its box is inside the axes and overlaps nothing in ``taken`` (the boxes of the labels and
    points placed so far, to which it is added); where none fits, nothing is added. A label more than 12 points away
    gets a leader line to its point.
    """
    from matplotlib.text import Text

    inside = ax.get_window_extent(renderer).padded(-2)
    for dx, dy in offsets:
        leader = {"arrowstyle": "-", "color": style.get("color", "0.3"), "lw": 0.5} if abs(dy) > 12 else None
        note = ax.annotate(text, xy, xytext=(dx, dy), textcoords="offset points", arrowprops=leader, **style)
        note.update_positions(renderer)
        box = Text.get_window_extent(note, renderer)  # (the text: a leader line may cross a point)
        if (inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
                and not any(box.overlaps(other) for other in taken)):  # fmt: skip
            taken.append(box.padded(3))
            return True
        note.remove()
    return False


def _legend(fig: Any, names: Sequence[str], flagged: Mapping[str, tuple[str, str]], worst: Sequence[int],
            markers: Sequence[str]) -> Any:  # fmt: skip
    """The legend mapping index → layer → problem (worst first), then what the bottom edge's markers mean.

    The layers are listed only when there are more than :data:`NAMED_LAYERS` (fewer are all named on the plot and
    in the title).
    """
    from matplotlib.lines import Line2D

    handles, labels = [], []
    listed = worst if len(worst) > NAMED_LAYERS else []
    for i in listed[:LEGEND_ROWS]:
        severity, kind = flagged[names[i]]
        handles.append(Line2D([], [], marker=markers[i], linestyle="", color=COLOURS.get(severity, "tab:orange")))
        labels.append(f"{i}: {short_names([names[i]], 30)[0]}, {kind}")
    if len(listed) > LEGEND_ROWS:
        handles.append(Line2D([], [], linestyle=""))
        labels.append(f"and {len(worst) - LEGEND_ROWS} more")
    for marker, meaning, colour in (("X", "NaN/Inf norm (bottom edge)", "tab:red"), ("v", "zero or no gradient",
                                                                                     "0.5")):  # fmt: skip
        if marker in markers:
            handles.append(Line2D([], [], marker=marker, linestyle="", color=colour))
            labels.append(meaning)
    title = "unhealthy layers (index: layer, problem)" if listed else None
    return fig.legend(handles, labels, loc="upper right", fontsize=7, title=title, title_fontsize=7, frameon=False,
                      handletextpad=0.2, borderaxespad=0.3)  # fmt: skip


def _step(n: int, pixels: float, room: float) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that leaves ``room`` pixels between ticks of ``n`` layers."""
    need = room * n / max(pixels, 1.0)
    return next(k * 10**e for e in range(12) for k in (1, 2, 5) if k * 10**e >= need)


def gradient_flow(
    names: Sequence[str],
    norms: Sequence[float],
    step: int,
    flagged: Mapping[str, tuple[str, str]] | None = None,
    lines: Mapping[str, float] | None = None,
) -> Any:
    """Per-layer gradient norm against depth, log scale, unhealthy layers coloured, as a matplotlib ``Figure``.

    Layers whose norm is zero (or missing: ``nan`` and not flagged) sit on the bottom edge as grey triangles, those
    with a non-finite norm as crosses. The bottom axis names the layers, the top one gives their indices.

    Args:
        names: The layers, in definition order (= depth).
        norms: Their gradient norms.
        step: The step of the record drawn (the title's).
        flagged: ``{layer: (severity, kind)}`` (:func:`flagged_from`): ``"critical"`` in red, ``"warning"`` in
            orange.
        lines: ``{label: value}``: horizontal reference lines (:func:`reference_lines`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(len(names), len(norms))
    names, norms = list(names[:n]), [float(v) for v in norms[:n]]
    known = set(names)
    flagged = {name: flag for name, flag in (flagged or {}).items() if name in known}
    worst = _worst_first(names, norms, flagged)
    markers = _markers(names, norms, flagged)
    fig = Figure(figsize=(min(16.0, max(7.5, 0.12 * n + 6.0)), 5.0), dpi=_DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()
    ax = fig.add_subplot()
    wanted = len(worst) > NAMED_LAYERS or set(markers) - {"o"}
    legend = _legend(fig, names, flagged, worst, markers) if wanted else None
    right = 1.0 - (legend.get_window_extent(renderer).width + 12) / fig.bbox.width if legend is not None else 0.98
    left = 80 / fig.bbox.width
    axes_px = (right - left) * fig.bbox.width
    ticks = _ticks(n, worst, max(1, math.ceil(14 * n / axes_px))) if n else []  # a 7-point label: ~10 px across
    labels = short_names(names)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=90, fontsize=_TICK_FONT)
    ax.set_xticks(sorted(set(range(n)) - set(ticks)), minor=True)  # a tick mark for every layer (each costs)
    for text, i in zip(ax.get_xticklabels(), ticks, strict=True):
        if names[i] in flagged:
            text.set_color(COLOURS.get(flagged[names[i]][0], "tab:orange"))
    ax.set_xlim(-0.6, n - 0.4)
    index = ax.secondary_xaxis("top")
    index.set_xticks(range(0, n, _step(n, axes_px, 36)))
    index.tick_params(labelsize=_TICK_FONT - 1, length=2, pad=1)
    ax.set_xlabel("layer (definition order = depth; its index on top)", fontsize=8)
    ax.set_ylabel("gradient norm (log scale)", fontsize=8)
    ax.tick_params(axis="y", labelsize=_TICK_FONT)
    tall = max((t.get_window_extent(renderer).height for t in ax.get_xticklabels()), default=0.0)
    # the title is centred on the axes: as wide as the canvas on the narrower side allows
    _fit_title(ax, renderer, _title(step, names, norms, flagged, worst), min(left + right, 2 - left - right)
               * fig.bbox.width - 16)  # fmt: skip
    if worst and flagged[names[worst[0]]][0] == "critical":
        ax.title.set_color(COLOURS["critical"])
    head = ax.title.get_window_extent(renderer).height + 30  # the title, the index labels and the pads
    foot = tall + 50  # the tick labels, the axis label and the pads
    total = _PLOT + head + foot
    fig.set_size_inches(fig.get_figwidth(), total / _DPI)
    fig.subplots_adjust(left=left, right=right, bottom=foot / total, top=1 - head / total)
    if legend is not None:  # beside the axes, below the title
        legend.set_bbox_to_anchor((1.0, 1 - head / total), transform=fig.transFigure)
    _plot(ax, renderer, names, norms, flagged, worst, markers, lines or {})
    return fig


def _markers(names: Sequence[str], norms: Sequence[float], flagged: Mapping[str, tuple[str, str]]) -> list[str]:
    """Each layer's marker: ``o`` a positive norm, ``X`` a non-finite one, ``v`` zero or missing (unflagged ``nan``)."""
    return ["o" if v > 0 and math.isfinite(v) else "v" if v == 0 or (math.isnan(v) and name not in flagged) else "X"
            for name, v in zip(names, norms, strict=True)]  # fmt: skip


def _plot(ax: Any, renderer: Any, names: Sequence[str], norms: Sequence[float], flagged: Mapping[str, tuple[str, str]],
          worst: Sequence[int], markers: Sequence[str], lines: Mapping[str, float]) -> None:  # fmt: skip
    """The points, the reference lines and the labels (placed so that none overlaps another or a point)."""
    finite = [v for v in norms if v > 0 and math.isfinite(v)] + [v for v in lines.values() if v > 0]
    low, high = (min(finite), max(finite)) if finite else (1e-12, 1.0)
    bottom = low / 10
    ax.set_yscale("log")
    ax.set_ylim(bottom / 2, high * 3)
    ax.grid(True, which="major", alpha=0.3)
    n = len(names)
    shown = [v if m == "o" else bottom for v, m in zip(norms, markers, strict=True)]
    ax.plot(range(n), [v if m == "o" else math.nan for v, m in zip(norms, markers, strict=True)], "-", color="0.6",
            linewidth=1, zorder=1)  # fmt: skip
    colours = [COLOURS.get(flagged[name][0], "tab:orange") if name in flagged else _HEALTHY for name in names]
    for marker in ("o", "X", "v"):
        idx = [i for i in range(n) if markers[i] == marker]
        if idx:
            grey = marker == "v"  # (a zero norm: grey unless graded)
            ax.scatter(idx, [shown[i] for i in idx], c=[colours[i] if not grey or names[i] in flagged else "0.5"
                                                        for i in idx], marker=marker, s=40 if marker == "X" else 28,
                       zorder=2)  # fmt: skip
    points = ax.transData.transform(list(zip(range(n), shown, strict=True))) if n else []
    taken: list[Any] = [_box(x, y, 5) for x, y in points]
    for k, (label, value) in enumerate(lines.items()):
        ax.axhline(value, color="0.5", linestyle="--", linewidth=0.8)
        _place(ax, renderer, taken, label, (0.0, value), [(3, 2), (3, -10), (120 * (k + 1), 2), (120 * (k + 1), -10)],
               fontsize=7, color="0.35", xycoords=("axes fraction", "data"))  # fmt: skip
    # beside the point first, then farther up or down (with a leader line), right before left
    near = [(6, 6), (6, -14), (10, 24), (10, -32), (-6, 6), (-6, -14), (-10, 24), (-10, -32)]
    near += [(sign * dx, dy) for dy in (44, -52, 66, -74, 90, -98, 120, -128) for dx in (14, 60) for sign in (1, -1)]
    for k, i in enumerate(worst[:LEGEND_ROWS]):  # (the index of the legend's layers: each text costs)
        severity, kind = flagged[names[i]]
        style = {"fontsize": 7, "color": COLOURS.get(severity, "tab:orange")}
        if k < NAMED_LAYERS:
            text = f"{names[i]}: {kind}"
            for dx, dy in near:
                if _place(ax, renderer, taken, text, (i, shown[i]), [(dx, dy)], ha="left" if dx > 0 else "right",
                          **style):  # fmt: skip
                    break
        else:
            _place(ax, renderer, taken, str(i), (i, shown[i]), [(0, 5), (0, -13), (7, 0), (-7, 0)], ha="center",
                   **style)  # fmt: skip


def _box(x: float, y: float, r: float) -> Any:
    """The square of half-side ``r`` pixels around ``(x, y)``."""
    from matplotlib.transforms import Bbox

    return Bbox([[x - r, y - r], [x + r, y + r]])


def render(figure: Any) -> Any:
    """``figure`` drawn once, as an ``(H, W, 3)`` uint8 array (what TensorBoard and W&B take)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(figure: Any, path: str | Path) -> Path:
    """Write ``figure`` as a PNG at ``path`` (its own Agg canvas: pyplot's backend is left alone)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.print_png(str(path))
    return Path(path)
