"""Read a run back from its TensorBoard event files into a :class:`~lightning_gradhealth.diagnosis.history.History`.

The files are read as untrusted input (what ``gradhealth report`` may be given): streamed record by record
(:mod:`~lightning_gradhealth.output.tfrecord`, every checksum verified), regular files only, no link followed
(:mod:`~lightning_gradhealth.output.safe_io`), and folded into the same bounded :class:`History` the live run keeps, so
memory does not grow with the number of steps. Names (tags) are escaped as they are read
(:func:`~lightning_gradhealth.output.safe_io.clean`): none can carry a line break or a control character further.

Plain scalar events are taken apart from their bytes (:mod:`~lightning_gradhealth.output.eventdecode`), others with
protobuf. A step is rebuilt into a full record only when the history keeps it (:meth:`History.keeps_next`): one it
would thin out is offered with its global norms alone, which is all the history reads of it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.output.eventdecode import GENERIC, ScalarDecoder
from lightning_gradhealth.output.safe_io import clean, open_regular, shown
from lightning_gradhealth.output.tfrecord import RecordProblem, iter_records
from lightning_gradhealth.schema.errors import GradientHealthError
from lightning_gradhealth.schema.metrics import PARAM_NORM, SPIKES, TOTAL_NORM, metrics_to_record
from lightning_gradhealth.schema.record import StepStats

__all__ = [
    "EVENTS_PREFIX",
    "MAX_EVENT_FILE_BYTES",
    "MAX_SCANNED",
    "event_files",
    "find_runs",
    "history_from_events",
]

EVENTS_PREFIX = "events.out.tfevents."
#: The largest event file read (a 1,000-layer model logged every step for 2,000 steps writes ~250 MB).
MAX_EVENT_FILE_BYTES = 16 * 2**30
#: The most directory entries looked at under a log directory (a tree larger than this is refused, not walked).
MAX_SCANNED = 200_000
#: Steps held back while their scalars may still come in other events (Lightning's logger writes one per key).
_PENDING_STEPS = 8
_MAX_TAGS = 200_000  # tags whose stripped, escaped key is remembered


def find_runs(logdir: str | Path) -> list[Path]:
    """Directories under ``logdir`` (itself included) that hold TensorBoard event files, symbolic links not followed.

    Raises:
        GradientHealthError: ``logdir`` does not exist, holds no event file, or holds more than :data:`MAX_SCANNED`
            entries.
    """
    root = Path(logdir)
    if not root.is_dir():
        raise GradientHealthError(f"no such log directory: {shown(root)}", logdir=str(root))
    runs: set[Path] = set()
    seen = 0
    for folder, dirs, files in os.walk(root):  # (os.walk does not descend into linked directories)
        seen += len(dirs) + len(files)
        if seen > MAX_SCANNED:
            raise GradientHealthError(
                f"{shown(root)} holds more than {MAX_SCANNED:,} files and folders: give the run's own directory",
                logdir=str(root),
            )
        dirs.sort()
        if any(name.startswith(EVENTS_PREFIX) for name in files):
            runs.add(Path(folder))
    if not runs:
        raise GradientHealthError(f"no TensorBoard event files under {shown(root)}", logdir=str(root))
    return sorted(runs)


def event_files(run_dir: str | Path) -> list[Path]:
    """The event files directly in ``run_dir`` (whatever their type: reading them checks that), sorted by name."""
    with os.scandir(run_dir) as entries:
        return sorted(Path(run_dir) / e.name for e in entries if e.name.startswith(EVENTS_PREFIX))


def _scalars(data: bytes, event_cls: type) -> tuple[int, list[str], list[float]] | None:
    """The step, tags and scalar values of one serialized ``Event`` (``None``: not one with scalars, or undecodable).

    The generic decoder (protobuf's classes), for the events :class:`ScalarDecoder` leaves to it.
    """
    try:
        event = event_cls.FromString(data)
    except Exception:  # (protobuf's DecodeError: a record whose checksum holds but whose content is no Event)
        return None
    if not event.HasField("summary"):
        return None
    tags, values = [], []
    for value in event.summary.value:
        kind = value.WhichOneof("value")
        if kind == "simple_value":
            number = value.simple_value
        elif kind == "tensor" and (value.tensor.float_val or value.tensor.double_val):
            number = (value.tensor.float_val or value.tensor.double_val)[0]
        else:
            continue
        tags.append(value.tag)
        values.append(float(number))
    return (event.step, tags, values) if values else None


def _thinned(step: int, total_norm: float, param_norm: float) -> StepStats:
    """The record of a finite step the history only counts (it reads its norms, never its layers)."""
    return StepStats(
        step=step, global_step=step, epoch=0, batch_idx=0, optimizer_idx=0, total_norm=total_norm,
        param_norm=param_norm, zero_frac=math.nan, nan_count=0, inf_count=0, layer_norm_ratio=1.0, no_grad_count=0,
        layers=(),
    )  # fmt: skip


class _Fold:
    """Scalars grouped by step and folded, step by step, into a :class:`History`."""

    def __init__(self) -> None:
        self.history = History()
        self.pending: dict[int, dict[str, float]] = {}
        self.head: str | None = None
        self.last_step: int | None = None
        self.previous_spikes = 0.0
        self.late = 0  # values of steps already folded (a resumed run's overlap): left out
        self.keys: dict[str, str] = {}  # tag -> key without the prefix, escaped ("": another run's tag)
        self.plain: set[str] = set()  # tags that are their own key (no prefix, nothing escaped)

    def key(self, tag: str) -> str:
        """``tag`` without the run's prefix, escaped (:func:`clean`); computed once per tag."""
        key = self.keys.get(tag)
        if key is None:
            head = self.head or ""
            key = clean(tag[len(head) :]) if tag.startswith(head) else ""
            if len(self.keys) < _MAX_TAGS:
                self.keys[tag] = key
                if key == tag:
                    self.plain.add(tag)
        return key

    def metrics(self, tags: dict[str, float]) -> dict[str, float]:
        """``{key: value}`` of one step's ``{tag: value}``, another run's tags left out (``tags``: all are keys)."""
        if self.plain.issuperset(tags):
            return tags
        return {key: v for tag, v in tags.items() if (key := self.key(tag))}

    def add(self, step: int, tags: Sequence[str], numbers: Sequence[float]) -> None:
        if self.last_step is not None and step <= self.last_step:
            self.late += 1
            return
        self.pending.setdefault(step, {}).update(zip(tags, numbers, strict=True))
        while len(self.pending) > _PENDING_STEPS:
            self.flush_one()

    def flush_one(self) -> None:
        step = min(self.pending)
        tags = self.pending.pop(step)
        self.last_step = step
        if self.head is None:
            heads = sorted(tag[: -len(TOTAL_NORM)] for tag in tags if tag.endswith(TOTAL_NORM))
            if not heads:
                return
            self.head = heads[0]  # a TensorBoardLogger(prefix="exp") writes "exp-<key>": the run under its prefix
        head = self.head
        if head + TOTAL_NORM not in tags:
            return
        # (a key of printable text is one tag's only: head + key; so these are the values metrics_to_record reads)
        total = tags[head + TOTAL_NORM]
        if math.isfinite(total) and not self.history.keeps_next():  # thinned out: its layers are never read
            self.history.add(_thinned(step, total, tags.get(head + PARAM_NORM, math.nan)))
        else:
            self.history.add(metrics_to_record(self.metrics(tags), step))
        spikes = tags.get(head + SPIKES, self.previous_spikes)
        if spikes > self.previous_spikes:
            self.history.add_spike(step, math.nan)
        self.previous_spikes = spikes

    def finish(self) -> History:
        while self.pending:
            self.flush_one()
        return self.history


def history_from_events(
    run_dir: str | Path,
    *,
    problems: dict[Path, RecordProblem] | None = None,
    progress: Callable[[int], None] | None = None,
) -> History:
    """Rebuild the history of a run made with :class:`GradientHealthMonitor` from its event files, streaming.

    Each step with a global gradient norm becomes a record
    (:func:`~lightning_gradhealth.schema.metrics.metrics_to_record`; without its layers when the history thins it
    out), and each rise of the spike counter a spike. The
    files are read in name order (a resumed run's steps that come again are read once). Memory is bounded: the
    history thins itself out as the live run's does.

    Args:
        run_dir: A directory holding the run's event files.
        problems: Receives, per event file read only in part, why (truncated, corrupt, oversized record).
        progress: Called with the bytes read so far, after each chunk.

    Returns:
        The run's history.

    Raises:
        GradientHealthError: The run has no global-gradient-norm scalars (not made with the monitor).
        UnsafePathError: An event file is a link, not a regular file, or over :data:`MAX_EVENT_FILE_BYTES`.
    """
    from tensorboard.compat.proto.event_pb2 import Event

    fold = _Fold()
    decoder = ScalarDecoder()
    done = [0]
    for path in event_files(run_dir):
        fh, size = open_regular(path, MAX_EVENT_FILE_BYTES)
        found: list[RecordProblem] = []
        counter = [0]
        with fh:
            for data in iter_records(fh, size, found, counter):
                got = decoder.decode(data)
                if got is GENERIC:
                    got = _scalars(data, Event)
                if got is not None:
                    fold.add(*cast("tuple[int, Sequence[str], Sequence[float]]", got))
                if progress is not None and counter[0]:
                    done[0] += counter[0]
                    counter[0] = 0
                    progress(done[0])
        done[0] += counter[0]
        if found and problems is not None:
            problems[path] = found[0]
    if progress is not None:
        progress(done[0])
    history = fold.finish()
    if not history.records_seen:
        raise GradientHealthError(
            f"{shown(run_dir)} has no '{TOTAL_NORM}' scalars: it was not logged with GradientHealthMonitor",
            run=str(run_dir),
        )
    return history
