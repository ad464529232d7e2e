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
:class:`DirectoryLogger`, which writes the same single events. Histograms and figures are routed by the kind of logger
(:func:`logger_kind`, from class names: either Lightning namespace). Nothing here imports Lightning, W&B or MLflow at
import time.
"""

from __future__ import annotations

import functools
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tensorboard.compat.proto.summary_pb2 import Summary

from lightning_gradhealth.schema.metrics import GRADIENT_FLOW, HISTOGRAM, metric_key

__all__ = [
    "GUARDED_METHODS",
    "MEDIA_SUPPORT",
    "DirectoryLogger",
    "LoggerKind",
    "Media",
    "SinkFailures",
    "guard_loggers",
    "logger_kind",
    "write_metrics",
]

_FABRIC_TENSORBOARD = ("lightning.fabric.loggers.tensorboard", "lightning_fabric.loggers.tensorboard")


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


@dataclass
class Media:
    """What a step draws besides its scalars.

    Attributes:
        histograms: ``{layer: add_histogram_raw keyword arguments}`` (the engine's per-layer histograms).
        figure: The gradient-flow figure (a matplotlib ``Figure``), or ``None``.
        image: The figure drawn: an ``(H, W, 3)`` uint8 array (given with ``figure``).
    """

    histograms: dict[str, dict[str, Any]] = field(default_factory=dict)
    figure: Any = None
    image: Any = None


LoggerKind = Literal["tensorboard", "wandb", "mlflow", "other"]

#: What each kind of logger receives besides the scalars.
MEDIA_SUPPORT: dict[str, tuple[str, ...]] = {
    "tensorboard": ("histograms", "figures"),
    "wandb": ("histograms", "figures"),
    "mlflow": ("figures",),
    "other": (),
}


def logger_kind(logger: Any) -> LoggerKind:
    """Which kind of logger ``logger`` is, from its class names (either Lightning namespace; nothing is imported)."""
    names = {cls.__name__ for cls in type(logger).__mro__}
    if "TensorBoardLogger" in names or "DirectoryLogger" in names:
        return "tensorboard"
    if "WandbLogger" in names:
        return "wandb"
    if "MLFlowLogger" in names:
        return "mlflow"
    return "other"


class SinkFailures:
    """Loggers whose writes failed (disk full, file too large, permission): each said once, then left out.

    Monitoring must never take a run down: a write that raises :class:`OSError` (also when TensorBoard's writer
    thread raises it on the next write) gives one warning naming the logger's directory and the error; the logger
    gets nothing more from the monitor, and the training and the guard go on. The report lists them (:meth:`notes`).
    Under a Trainer the framework's own writes to its loggers are guarded the same way (:func:`guard_loggers`).

    Args:
        warn: Shows the warning.
    """

    def __init__(self, warn: Any = None) -> None:
        self.warn = warn
        self.failed: dict[int, tuple[str, int, str]] = {}  # id(logger) -> (where, step, error)

    def live(self, loggers: Iterable[Any]) -> list[Any]:
        """The loggers that have not failed."""
        return [lg for lg in loggers if id(lg) not in self.failed]

    def stopped(self, logger: Any) -> bool:
        """Whether ``logger`` failed (and gets nothing more)."""
        return id(logger) in self.failed

    def call(self, logger: Any, step: int, action: Any) -> None:
        """Run ``action()`` for ``logger``; on an ``OSError``, stop that logger and say so once."""
        if id(logger) in self.failed:
            return
        try:
            action()
        except OSError as err:
            self.fail(logger, step, err)

    def fail(self, logger: Any, step: int, err: BaseException, via: str | None = None) -> None:
        """Mark ``logger`` failed at ``step`` with ``err`` and warn once (``via``: the framework's failed write)."""
        where = str(getattr(logger, "log_dir", None) or type(logger).__name__)
        error = f"{type(err).__name__}: {err}"
        self.failed[id(logger)] = (where, step, error)
        writer = getattr(logger, "_writer", None) or getattr(logger, "_experiment", None)
        close = getattr(writer, "close", None)
        if callable(close):  # (its writer thread is dead: closing re-raises, which is expected)
            try:
                close()
            except Exception:
                pass
        if self.warn is not None:
            self.warn(
                f"gradient health: writing to {type(logger).__name__} at {where} failed at step {step} "
                f"{f'in {via} ' if via else ''}({error}); nothing more is written there"
                f"{' by the monitor or the Trainer' if via else ''}. Training and the guard go on; the report names "
                "the failure."
            )

    def notes(self) -> list[str]:
        """One line per failed logger, for the report."""
        return [f"Logging to {where} failed from step {step} on ({error}): its metrics stop there."
                for where, step, error in self.failed.values()]  # fmt: skip


#: The write methods of a framework's logger that :func:`guard_loggers` wraps (those a logger lacks are left out).
GUARDED_METHODS = ("log_metrics", "log_hyperparams", "log_graph", "save", "finalize")


class _LoggerGuard:
    """What the guarded methods of one logger share: the failures of the current run, and its step."""

    def __init__(self, failures: SinkFailures, step: Callable[[], int]) -> None:
        self.failures = failures
        self.step = step


class _Guarded:
    """One write method of a logger that does nothing once the logger failed, and stops it on an ``OSError``.

    Pickled (a logger sent to another process), it is the method itself: the guard belongs to one run.
    """

    def __init__(self, guard: _LoggerGuard, logger: Any, name: str, method: Callable[..., Any]) -> None:
        self.guard, self.logger, self.name, self.method = guard, logger, name, method
        functools.update_wrapper(self, method)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        failures = self.guard.failures
        if failures.stopped(self.logger):
            return None
        try:
            return self.method(*args, **kwargs)
        except Exception as err:
            cause = _os_error(err)
            if cause is None:
                raise
            try:
                step = int(self.guard.step())
            except Exception:
                step = -1
            failures.fail(self.logger, step, cause, via=f"the Trainer's {self.name}")
            return None

    def __reduce__(self) -> tuple[Any, ...]:
        return (_same, (self.method,))


def _same(method: Any) -> Any:
    return method


def _os_error(err: BaseException) -> OSError | None:
    """``err``, or the error it was raised from, if that is an ``OSError``.

    (Lightning's ``TensorBoardLogger.log_metrics`` raises a ``ValueError`` from the writer's ``OSError``.)
    """
    seen = 0
    current: BaseException | None = err
    while current is not None and seen < 8:
        if isinstance(current, OSError):
            return current
        current, seen = current.__cause__, seen + 1
    return None


def guard_loggers(loggers: Iterable[Any], failures: SinkFailures, step: Callable[[], int]) -> None:
    """Guard the framework's own writes to ``loggers`` as the monitor's are (a full disk never stops training).

    Each logger's :data:`GUARDED_METHODS` are wrapped on the instance: an ``OSError`` raised by one (or an error
    raised from one, as Lightning's ``TensorBoardLogger.log_metrics`` does) marks the logger failed in ``failures``
    at ``step()``, with one warning, and returns; afterwards every guarded call does nothing. ``failures`` is shared
    with the monitor's own writes, so a logger that failed either way gets nothing more from either. A logger
    already guarded (a second fit) is bound to the new ``failures``, keeping its failure.
    """
    for logger in loggers:
        own = getattr(logger, "__dict__", {})
        wrapped = [m for name in GUARDED_METHODS if isinstance(m := own.get(name), _Guarded)]
        if wrapped:
            guard = wrapped[0].guard
            if guard.failures.stopped(logger) and not failures.stopped(logger):
                failures.failed[id(logger)] = guard.failures.failed[id(logger)]
            guard.failures, guard.step = failures, step
            continue
        guard = _LoggerGuard(failures, step)
        for name in GUARDED_METHODS:
            method = getattr(logger, name, None)
            if callable(method):
                try:
                    setattr(logger, name, _Guarded(guard, logger, name, method))
                except AttributeError:  # (a logger with __slots__ or read-only methods: left as it is)
                    break


def write_metrics(
    loggers: Iterable[Any],
    metrics: dict[str, float],
    step: int,
    media: Media | None = None,
    failures: SinkFailures | None = None,
) -> None:
    """Write ``metrics`` (and ``media``) at ``step`` to every logger: one ``log_metrics`` call, or one event, each.

    TensorBoard gets the scalars as one event and the histograms and figure as its own summaries; W&B gets all of
    them in one ``log_metrics`` call (one row: ``wandb.Histogram`` and ``wandb.Image`` values); MLflow gets the
    scalars and the figure (``log_figure``, an artifact per step; it has no histograms); other loggers the scalars.

    Args:
        loggers: The Trainer's loggers (call on rank zero only, as ``log_metrics`` requires).
        metrics: ``{key: value}``, values plain numbers (may be empty when only ``media`` is due).
        step: The x-axis value.
        media: Histograms and the figure of this step, if any.
        failures: Where a logger whose write raises ``OSError`` is stopped and said (else the error propagates).
    """
    for logger in loggers:
        if failures is not None:
            failures.call(logger, step, lambda lg=logger: _write_one(lg, metrics, step, media))
        else:
            _write_one(logger, metrics, step, media)


def _write_one(logger: Any, metrics: dict[str, float], step: int, media: Media | None) -> None:
    """:func:`write_metrics` for one logger."""
    kind = logger_kind(logger)
    values: dict[str, Any] = dict(metrics)
    if media is not None and kind == "wandb":
        values.update(_wandb_media(media))
    if values and not _write_one_event(logger, values, step):
        logger.log_metrics(values, step=step)
    if media is not None and kind == "tensorboard":
        writer = logger.experiment
        for layer, h in media.histograms.items():
            writer.add_histogram_raw(metric_key(HISTOGRAM, layer), global_step=step, **h)
        if media.image is not None:
            writer.add_image(GRADIENT_FLOW, media.image, step, dataformats="HWC")
    if media is not None and kind == "mlflow" and media.figure is not None:
        logger.experiment.log_figure(logger.run_id, media.figure, f"{GRADIENT_FLOW}/step_{step:08d}.png")


def _wandb_media(media: Media) -> dict[str, Any]:
    """``media`` as W&B values (``wandb`` is imported here: its logger already did)."""
    import wandb

    out: dict[str, Any] = {}
    for layer, h in media.histograms.items():
        edges = [h["min"], *h["bucket_limits"]]
        out[metric_key(HISTOGRAM, layer)] = wandb.Histogram(np_histogram=(list(h["bucket_counts"]), edges))
    if media.image is not None:
        out[GRADIENT_FLOW] = wandb.Image(media.image)
    return out


def _write_one_event(logger: Any, metrics: Mapping[str, float], step: int) -> bool:
    """Write ``metrics`` as one TensorBoard event when that is equivalent to ``log_metrics``; return whether."""
    TensorBoardLogger = _fabric_tensorboard_logger(logger)
    if TensorBoardLogger is None or type(logger).log_metrics is not TensorBoardLogger.log_metrics:
        return False  # not Lightning's TensorBoard logger, or a subclass with its own log_metrics
    own = vars(logger).get("log_metrics")
    if isinstance(own, _Guarded):  # (guard_loggers' wrapper: what counts is what it wraps)
        own = None if getattr(own.method, "__func__", None) is type(logger).log_metrics else own.method
    if own is not None:
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


def _fabric_tensorboard_logger(logger: Any) -> Any:
    """Fabric's ``TensorBoardLogger`` class of the namespace ``logger`` is from, if it is one; else ``None``.

    Lightning's and Fabric's TensorBoard loggers of the ``lightning`` package derive from
    ``lightning.fabric.loggers.TensorBoardLogger``; those of ``pytorch-lightning`` from
    ``lightning_fabric.loggers.TensorBoardLogger`` (a module is looked at only once a logger has imported it).
    """
    for name in _FABRIC_TENSORBOARD:
        module = sys.modules.get(name)
        if module is not None and isinstance(logger, module.TensorBoardLogger):
            return module.TensorBoardLogger
    return None


def _write_summary(writer: Any, metrics: Mapping[str, float], step: int, head: str) -> None:
    """All of ``metrics`` as one TensorBoard event of ``writer`` (a torch ``SummaryWriter``)."""
    summary = Summary(value=[Summary.Value(tag=head + key, simple_value=float(v)) for key, v in metrics.items()])
    writer._get_file_writer().add_summary(summary, step)
