"""Read a run back from its TensorBoard event files into a :class:`~lightning_gradhealth.history.History`."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_gradhealth.errors import GradientHealthError
from lightning_gradhealth.history import History
from lightning_gradhealth.record import LayerStats, StepStats

__all__ = ["find_runs", "history_from_events"]

_TOTAL = "grad_health/total_norm"


def find_runs(logdir: str | Path) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold TensorBoard event files.

    Raises:
        GradientHealthError: ``logdir`` does not exist or holds no event file.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise GradientHealthError(f"no such log directory: {root}", logdir=str(root))
    runs = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    if not runs:
        raise GradientHealthError(f"no TensorBoard event files under {root}", logdir=str(root))
    return runs


def history_from_events(run_dir: str | Path) -> History:
    """Rebuild the history of a run made with :class:`GradientHealthMonitor` from its event files.

    Raises:
        GradientHealthError: The run has no ``grad_health/total_norm`` scalars (not made with the monitor).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    # a TensorBoardLogger(prefix="exp") writes "exp-grad_health/total_norm": read the run under its prefix
    heads = sorted(tag[: -len(_TOTAL)] for tag in tags if tag.endswith(_TOTAL))
    if not heads:
        raise GradientHealthError(
            f"{run_dir} has no '{_TOTAL}' scalars: it was not logged with GradientHealthMonitor", run=str(run_dir)
        )
    head = heads[0]
    series = {tag[len(head) :]: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags if tag.startswith(head)}
    series = {tag: values for tag, values in series.items() if "/" in tag}
    layers = [tag.split("/", 1)[1] for tag in series if tag.startswith("grad_norm/")]
    history = History()
    previous_spikes = 0.0
    for step in sorted(series[_TOTAL]):

        def value(tag: str, default: float = 0.0, step: int = step) -> float:
            return series.get(tag, {}).get(step, default)

        stats = []
        for name in layers:
            norm = value(f"grad_norm/{name}", math.nan)
            if math.isnan(norm) and step not in series.get(f"grad_norm/{name}", {}):
                continue
            stats.append(
                LayerStats(name=name, numel=1, grad_norm=norm, param_norm=math.nan,
                           ratio=value(f"grad_ratio/{name}", math.nan),
                           zero_frac=value(f"grad_zero_frac/{name}", math.nan),
                           nan_count=int(value(f"grad_nan/{name}")), inf_count=int(value(f"grad_inf/{name}")))
            )  # fmt: skip
        history.add(
            StepStats(step=step, global_step=step, epoch=0, batch_idx=0, optimizer_idx=0,
                      total_norm=value(_TOTAL, math.nan), param_norm=value("grad_health/param_norm", math.nan),
                      zero_frac=value("grad_health/zero_frac", math.nan),
                      nan_count=int(value("grad_health/nan_count")), inf_count=int(value("grad_health/inf_count")),
                      layer_norm_ratio=value("grad_health/layer_norm_ratio", 1.0),
                      no_grad_count=int(value("grad_health/no_grad_count")), layers=tuple(stats))
        )  # fmt: skip
        spikes = value("grad_health/spikes", previous_spikes)
        if spikes > previous_spikes:
            history.add_spike(step, math.nan)
        previous_spikes = spikes
    return history
