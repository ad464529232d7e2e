"""Metric names: turn a record into the flat ``{key: value}`` dict the loggers receive."""

from __future__ import annotations

from lightning_gradhealth.record import StepStats

__all__ = [
    "ALERTS",
    "AMP_OVERFLOW",
    "AMP_SCALE",
    "CLIPPED_NORM",
    "CLIP_COEF",
    "CLIP_FRAC",
    "GRADIENT_FLOW",
    "HISTOGRAM",
    "LAYER_KEYS",
    "POST_CLIP_NORM",
    "SKIPPED_STEPS",
    "SPIKES",
    "SUMMARY_KEYS",
    "activation_metrics",
    "record_to_metrics",
    "summary_metrics",
]

#: Summary keys, logged on every computed step.
SUMMARY_KEYS: tuple[str, ...] = (
    "grad_health/total_norm",
    "grad_health/param_norm",
    "grad_health/zero_frac",
    "grad_health/nan_count",
    "grad_health/inf_count",
    "grad_health/layer_norm_ratio",
    "grad_health/no_grad_count",
)

#: Counters and per-step values of the safety features (only those that are on are logged).
ALERTS = "grad_health/alerts"
SKIPPED_STEPS = "grad_health/skipped_steps"
AMP_OVERFLOW = "grad_health/amp_overflow"
SPIKES = "grad_health/spikes"
CLIP_COEF = "grad_health/clip_coef"
CLIPPED_NORM = "grad_health/clipped_norm"
CLIP_FRAC = "grad_health/clip_frac"
#: Logged when the Trainer clips gradients, and when a GradScaler is active.
POST_CLIP_NORM = "grad_health/post_clip_norm"
AMP_SCALE = "grad_health/amp_scale"
#: TensorBoard-only: the gradient-flow figure's tag, and the per-layer histograms' prefix.
GRADIENT_FLOW = "grad_health/gradient_flow"
HISTOGRAM = "grad_hist"

#: Per-layer key prefixes: always, only on steps where the value is non-zero, and with ``stats="full"``.
LAYER_KEYS: dict[str, tuple[str, ...]] = {
    "always": ("grad_norm", "grad_ratio", "grad_zero_frac"),
    "nonzero": ("grad_nan", "grad_inf"),
    "full": ("grad_max", "grad_min", "grad_mean", "grad_std"),
}


def _suffix(optimizer_idx: int | None) -> str:
    return "" if optimizer_idx is None else f"/opt{optimizer_idx}"


def summary_metrics(record: StepStats, optimizer_idx: int | None = None) -> dict[str, float]:
    """The summary (global) metrics of a record.

    Args:
        record: The step's record.
        optimizer_idx: Appended as ``/opt{idx}`` to every key when not ``None`` (several optimizers).

    Returns:
        ``{key: value}`` with the keys of :data:`SUMMARY_KEYS`, plus ``grad_health/post_clip_norm`` when the
        Trainer clips gradients and ``grad_health/amp_scale`` when a GradScaler is active.
    """
    sfx = _suffix(optimizer_idx)
    values = (
        record.total_norm,
        record.param_norm,
        record.zero_frac,
        float(record.nan_count),
        float(record.inf_count),
        record.layer_norm_ratio,
        float(record.no_grad_count),
    )
    out = {key + sfx: value for key, value in zip(SUMMARY_KEYS, values, strict=True)}
    if record.post_clip_norm is not None:
        out[POST_CLIP_NORM + sfx] = record.post_clip_norm
    if record.amp_scale is not None:
        out[AMP_SCALE + sfx] = record.amp_scale
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
    sfx = _suffix(optimizer_idx)
    for layer in record.layers:
        name = layer.name + sfx
        out[f"grad_norm/{name}"] = layer.grad_norm
        out[f"grad_ratio/{name}"] = layer.ratio
        out[f"grad_zero_frac/{name}"] = layer.zero_frac
        if layer.nan_count:
            out[f"grad_nan/{name}"] = float(layer.nan_count)
        if layer.inf_count:
            out[f"grad_inf/{name}"] = float(layer.inf_count)
        if layer.max_abs is not None:
            out[f"grad_max/{name}"] = layer.max_abs
            out[f"grad_min/{name}"] = layer.min_abs_nonzero  # type: ignore[assignment]
            out[f"grad_mean/{name}"] = layer.mean  # type: ignore[assignment]
            out[f"grad_std/{name}"] = layer.std  # type: ignore[assignment]
    return out


def activation_metrics(stats: dict[str, tuple[float, float, float | None]]) -> dict[str, float]:
    """The keys of the activation statistics: ``{module: (dead, zero, saturated or None)}`` to ``{key: value}``."""
    out: dict[str, float] = {}
    for name, (dead, zero, saturated) in stats.items():
        out[f"act_dead_frac/{name}"] = dead
        out[f"act_zero_frac/{name}"] = zero
        if saturated is not None:
            out[f"act_saturated_frac/{name}"] = saturated
    return out
