"""PNG plots of a run's history for the report (matplotlib, imported when they are drawn)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.output.figures import gradient_flow, save_png

__all__ = ["write_plots"]


def write_plots(
    history: History,
    directory: str | Path,
    flagged: Mapping[str, tuple[str, str]] | None = None,
    lines: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write the report's plots: global norm, layer heatmap, gradient flow.

    ``global_norm.png`` shows the global norm over steps with the healthy band of the thresholds (0.1-10),
    ``layer_heatmap.png`` the log10 layer norm (layer × step), ``gradient_flow.png`` the layer norm against depth
    at the last record kept: the figure TensorBoard shows (:func:`~lightning_gradhealth.output.figures.gradient_flow`).

    Args:
        history: The run's history.
        directory: Where the PNG files go.
        flagged: ``{layer: (severity, kind)}``: the unhealthy layers, coloured on the gradient flow
            (:func:`~lightning_gradhealth.output.figures.flagged_from` of the findings).
        lines: The gradient flow's reference lines (:func:`~lightning_gradhealth.output.figures.reference_lines`).

    Raises:
        ImportError: matplotlib is not installed.
    """
    # a bare Figure draws on its own Agg canvas: pyplot's backend (a notebook's inline one) is left alone
    from matplotlib.figure import Figure

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig = Figure(figsize=(8, 4), dpi=100)
    ax = fig.add_subplot()
    ax.axhspan(0.1, 10, color="tab:green", alpha=0.12, label="healthy band (0.1-10)")
    norms = [v if v > 0 and math.isfinite(v) else math.nan for v in history.total_norm]
    ax.semilogy(history.steps, norms, "-", label="global norm")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (log scale)")
    ax.set_title("Global gradient norm")
    ax.legend(loc="best")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    paths.append(out / "global_norm.png")
    fig.savefig(paths[-1])

    if history.layer_names:
        import numpy as np

        n = len(history.layer_names)
        grid = np.full((n, len(history.layer_norm)), np.nan)
        for i, row in enumerate(history.layer_norm):
            grid[: min(n, len(row)), i] = row[:n]
        with np.errstate(divide="ignore", invalid="ignore"):
            grid = np.where(np.isfinite(grid) & (grid > 0), np.log10(grid), np.nan)
        first, last_step = history.steps[0], history.steps[-1]
        if first == last_step:  # one record: a column one step wide
            first, last_step = first - 0.5, last_step + 0.5
        fig = Figure(figsize=(8, min(12.0, max(3.0, 0.2 * n))), dpi=100)
        ax = fig.add_subplot()
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(first, last_step, n - 0.5, -0.5))  # fmt: skip
        fig.colorbar(image, ax=ax, label="log10 gradient norm")
        ax.set_xlabel("step")
        ax.set_ylabel("layer (depth)")
        if n <= 40:
            ax.set_yticks(range(n), history.layer_names, fontsize=7)
        ax.set_title("Layer gradient norms over training")
        fig.tight_layout()
        paths.append(out / "layer_heatmap.png")
        fig.savefig(paths[-1])

        figure = gradient_flow(history.layer_names, history.layer_norm[-1], history.steps[-1], flagged, lines)
        paths.append(save_png(figure, out / "gradient_flow.png"))
    return paths
