"""Metric names: turn a record into the flat ``{key: value}`` dict the loggers receive."""

from __future__ import annotations

from lightning_gradhealth.record import StepStats

__all__ = ["LAYER_KEYS", "SUMMARY_KEYS", "record_to_metrics", "summary_metrics"]

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
        out["grad_health/post_clip_norm" + sfx] = record.post_clip_norm
    if record.amp_scale is not None:
        out["grad_health/amp_scale" + sfx] = record.amp_scale
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
