"""Read a run back from its TensorBoard event files into a :class:`~lightning_gradhealth.diagnosis.history.History`."""

from __future__ import annotations

import math
from pathlib import Path

from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.schema.errors import GradientHealthError
from lightning_gradhealth.schema.metrics import SPIKES, TOTAL_NORM, metrics_to_record

__all__ = ["find_runs", "history_from_events"]


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

    Each step with a global gradient norm becomes a record
    (:func:`~lightning_gradhealth.schema.metrics.metrics_to_record`),
    and each rise of the spike counter a spike.

    Args:
        run_dir: A directory holding the run's event files.

    Returns:
        The run's history.

    Raises:
        GradientHealthError: The run has no global-gradient-norm scalars (not made with the monitor).
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags().get("scalars", [])
    # a TensorBoardLogger(prefix="exp") writes "exp-<key>": read the run under its prefix
    heads = sorted(tag[: -len(TOTAL_NORM)] for tag in tags if tag.endswith(TOTAL_NORM))
    if not heads:
        raise GradientHealthError(
            f"{run_dir} has no '{TOTAL_NORM}' scalars: it was not logged with GradientHealthMonitor", run=str(run_dir)
        )
    head = heads[0]
    series = {tag[len(head) :]: {e.step: e.value for e in acc.Scalars(tag)} for tag in tags if tag.startswith(head)}
    history = History()
    previous_spikes = 0.0
    for step in sorted(series[TOTAL_NORM]):
        metrics = {key: values[step] for key, values in series.items() if step in values}
        history.add(metrics_to_record(metrics, step))
        spikes = metrics.get(SPIKES, previous_spikes)
        if spikes > previous_spikes:
            history.add_spike(step, math.nan)
        previous_spikes = spikes
    return history
