"""Where the metrics go: one write per logger and step, a single event for Lightning's TensorBoard logger.

Lightning's (and Fabric's) ``TensorBoardLogger.log_metrics`` calls ``SummaryWriter.add_scalar`` once per key, and
each call builds, frames and queues its own event: 55–70 µs a key, so ~0.1 s for the 1,500 keys of a 500-layer model on
every logged step. A TensorBoard ``Summary`` may hold any number of values (TensorFlow's ``merge_all`` writes
them that way, and every TensorBoard reader takes them apart), so the same scalars written as ONE event cost
~5 µs a key. The written values, tags, steps and files are the ones ``log_metrics`` would have produced.

The one-event path is taken only where it is known to be equivalent: a logger of Lightning's own
``TensorBoardLogger`` class whose ``log_metrics`` is not overridden (in a subclass or on the instance), writing
through torch's own ``SummaryWriter`` (not a subclass), with plain numbers. Every other logger (CSV, W&B, MLflow,
subclasses, tensorboardX) gets ``log_metrics``. A plain loop may give a log directory instead of a logger: it gets a
:class:`DirectoryLogger`, which writes the same single events. Nothing here imports Lightning.
"""

from __future__ import annotations

import numbers
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tensorboard.compat.proto.summary_pb2 import Summary

__all__ = ["DirectoryLogger", "write_metrics"]


class DirectoryLogger:
    """A minimal TensorBoard logger for a log directory: what ``GradientHealth(model, loggers="runs/x")`` writes to.

    Args:
        log_dir: The directory of the event files (created when the first event is written).
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = str(log_dir)
        self._writer: Any = None

    @property
    def experiment(self) -> Any:
        """The ``torch.utils.tensorboard.SummaryWriter``, created on first use."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Write ``metrics`` at ``step`` as one event."""
        _write_summary(self.experiment, metrics, step, "")

    def save(self) -> None:
        """Flush the event file."""
        if self._writer is not None:
            self._writer.flush()

    def finalize(self, status: str = "success") -> None:
        """Close the event file."""
        if self._writer is not None:
            self._writer.close()


def write_metrics(loggers: Iterable[Any], metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` at ``step`` to every logger: one ``log_metrics`` call, or one TensorBoard event, each.

    Args:
        loggers: The Trainer's loggers (call on rank zero only, as ``log_metrics`` requires).
        metrics: ``{key: value}``, values plain numbers.
        step: The x-axis value.
    """
    for logger in loggers:
        if not _write_one_event(logger, metrics, step):
            logger.log_metrics(metrics, step=step)


def _write_one_event(logger: Any, metrics: Mapping[str, float], step: int) -> bool:
    """Write ``metrics`` as one TensorBoard event when that is equivalent to ``log_metrics``; return whether."""
    tensorboard = sys.modules.get("lightning.fabric.loggers.tensorboard")  # (a Lightning logger imported it)
    if tensorboard is None:
        return False
    TensorBoardLogger = tensorboard.TensorBoardLogger
    if not isinstance(logger, TensorBoardLogger) or type(logger).log_metrics is not TensorBoardLogger.log_metrics:
        return False  # a subclass with its own log_metrics
    if "log_metrics" in vars(logger):
        return False  # log_metrics replaced on the instance (a wrapper, a mock)
    prefix = getattr(logger, "_prefix", None)
    join = getattr(logger, "LOGGER_JOIN_CHAR", None)
    if not isinstance(prefix, str) or not isinstance(join, str):
        return False  # a Lightning whose logger internals differ from the ones this mirrors
    if not all(isinstance(v, numbers.Real) for v in metrics.values()):
        return False  # tensors, dicts: log_metrics' own conversions apply
    from torch.utils.tensorboard import SummaryWriter

    writer = logger.experiment
    if type(writer) is not SummaryWriter or not callable(getattr(writer, "_get_file_writer", None)):
        return False  # tensorboardX, a SummaryWriter subclass, or a torch without the writer this mirrors
    _write_summary(writer, metrics, step, f"{prefix}{join}" if prefix else "")  # as Lightning's _add_prefix
    return True


def _write_summary(writer: Any, metrics: Mapping[str, float], step: int, head: str) -> None:
    """All of ``metrics`` as one TensorBoard event of ``writer`` (a torch ``SummaryWriter``)."""
    summary = Summary(value=[Summary.Value(tag=head + key, simple_value=float(v)) for key, v in metrics.items()])
    writer._get_file_writer().add_summary(summary, step)
