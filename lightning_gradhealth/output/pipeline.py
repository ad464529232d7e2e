"""Where the results go: the loggers (one write per step), TensorBoard visuals, messages, history and the report.

A :class:`Frontend` says how a front-end connects the core to its framework (loggers, ranks, the reduction across
processes, how messages are shown); :class:`Output` turns records into metrics for the loggers, keeps the history
and writes the report. Nothing here decides anything.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_gradhealth.config.cadence import DEFAULT_LOG_EVERY_N_STEPS, due
from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.config.paths import check_writable_dir
from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.diagnosis.rules import Finding, diagnose
from lightning_gradhealth.model.distributed import Reduction
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.model.layout import ParamLayout
from lightning_gradhealth.output.report import MODEL_JSON, console_summary, write_report
from lightning_gradhealth.output.runstate import run_state, write_run_state
from lightning_gradhealth.output.safe_io import write_text
from lightning_gradhealth.output.sinks import (
    MEDIA_SUPPORT,
    DirectoryLogger,
    Media,
    SinkFailures,
    logger_kind,
    write_metrics,
)
from lightning_gradhealth.output.visuals import (
    custom_scalars_layout,
    flagged_layers,
    gradient_flow_figure,
    reference_lines,
    render,
)
from lightning_gradhealth.schema import metrics
from lightning_gradhealth.schema.alert import Alert
from lightning_gradhealth.schema.record import StepStats
from lightning_gradhealth.stats.histograms import layer_histograms

__all__ = ["FIGURE_SHARE", "Frontend", "Output"]

#: ``figure_every_n_steps="auto"``: the gradient-flow figures take at most this share of the run's wall time (the
#: figure of a 30-layer model takes ~0.2 s to draw on a CPU core: one every ~3 minutes; plus one at the end).
FIGURE_SHARE = 0.001


def _print(message: str) -> None:
    print(message, file=sys.stderr)


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)


@dataclass
class Frontend:
    """How a front-end connects the core to its framework.

    Attributes:
        model: The module whose ``named_parameters()`` name the layers (wrappers removed).
        name: How messages name the tool (``"GradientHealthMonitor"``, ``"GradientHealth"``).
        loggers: Lightning/Fabric loggers (anything with ``log_metrics(metrics, step)``).
        rank: This process's global rank.
        reduction: The process groups statistics and decisions are combined over.
        fsdp1_root: FSDP1: returns the wrapped root module, whose reduction is found at the first step.
        sharded: Whether gradients are sharded across processes (no collective is started on an exception).
        ddp: Whether a DistributedDataParallel wrapper averages the gradients (parameters unfrozen later are not).
        amp: Whether a GradScaler is in use (its overflow counter is logged).
        default_dir: Where the report goes without ``report_dir`` and without a logger ``log_dir``.
        info: Shows an informational message (rank zero only).
        warn: Shows a warning (rank zero only).
        on_summary: Receives the summary metrics of each published record, on every rank.
        log_every_n_steps: The schedule of computed steps (the option, or the framework's own).
    """

    model: nn.Module
    name: str = "GradientHealth"
    loggers: Sequence[Any] = ()
    rank: int = 0
    reduction: Reduction = field(default_factory=Reduction)
    fsdp1_root: Callable[[], nn.Module] | None = None
    sharded: bool = False
    ddp: bool = False
    amp: bool = False
    default_dir: Path = field(default_factory=Path.cwd)
    info: Callable[[str], None] = _print
    warn: Callable[[str], None] = _warn
    on_summary: Callable[[dict[str, float]], None] | None = None
    log_every_n_steps: int | None = None

    @property
    def rank_zero(self) -> bool:
        """Whether this process logs and writes."""
        return self.rank == 0

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        loggers: Any,
        *,
        amp: bool = False,
        every: int | None = None,
        name: str = "GradientHealth",
    ) -> Frontend:
        """The front-end of a plain or Fabric loop: ranks from ``torch.distributed``, wrappers found on ``model``.

        A Fabric module is unwrapped; a ``DistributedDataParallel`` module is unwrapped and its decisions averaged
        over the world; an FSDP1 module keeps its wrapper (its names are cleaned) and its reduction is found at the
        first step; FSDP2 gradients name their process groups themselves.
        """
        from torch.nn.parallel import DistributedDataParallel

        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        world = torch.distributed.get_world_size() if distributed else 1
        module = getattr(model, "_forward_module", model)  # Lightning Fabric's _FabricModule
        ddp = isinstance(module, DistributedDataParallel)
        frontend = cls(model=module.module if ddp else module, name=name, loggers=_loggers(loggers), rank=rank, amp=amp)
        frontend.log_every_n_steps = every
        if ddp and world > 1:
            frontend.ddp = True
            frontend.reduction = Reduction(replica_group=torch.distributed.group.WORLD)
        elif world > 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            if isinstance(module, FullyShardedDataParallel):
                frontend.fsdp1_root, frontend.sharded = (lambda: module), True
            elif any(type(p).__name__ == "DTensor" for p in module.parameters()):
                frontend.sharded = True
        return frontend


def _loggers(loggers: Any) -> list[Any]:
    """``None``, a logger, a list of loggers or a TensorBoard log directory, as a list of loggers."""
    if loggers is None:
        return []
    items = list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]
    for logger in items:  # (every item: one that is not a logger would fail at the first logged step)
        if not isinstance(logger, (str, Path)) and not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(
                "`loggers` must be None, a logger with `log_metrics(metrics, step)` (e.g. lightning.fabric.loggers."
                f"TensorBoardLogger), a list of them, or a TensorBoard log directory; got {logger!r}"
                + (f" in {loggers!r}." if logger is not loggers else ".")
            )
    for logger in items:  # a log directory: checked now, not at the first logged step
        if isinstance(logger, (str, Path)):
            check_writable_dir("loggers", logger)
    return [DirectoryLogger(lg) if isinstance(lg, (str, Path)) else lg for lg in items]


class Output:
    """Records to metrics, loggers, visuals, history and report.

    Args:
        options: The validated options.

    Attributes:
        history: The run's history (what the report is made from).
        findings: The findings of the last report.
        warned: Keys of the warnings already shown (checkpointed).
    """

    def __init__(self, options: HealthOptions) -> None:
        self.options = options
        self.history = History()
        self.findings: list[Finding] = []
        self.warned: set[str] = set()
        self.frontend = Frontend(model=nn.Module())
        self._unlogged: dict[int, dict[str, float]] = {}
        self._media: dict[int, Media] = {}
        self._figures = options.figure_every_n_steps
        self._inventory: ModelInventory | None = None
        self._last_figure: int | None = None  # the step of the last figure drawn
        self._last_record: StepStats | None = None
        self._figure_clock: float | None = None  # when the first figure was drawn
        self._takes: set[str] = set()  # what the loggers take besides scalars ("histograms", "figures")
        self._figure_seconds = 0.0  # what the figures took so far
        self.sinks = SinkFailures(lambda message: self.warn(message))  # loggers whose writes failed (sinks.py)

    def begin(self, frontend: Frontend) -> None:
        """A new run: fresh history and findings."""
        self.frontend = frontend
        self.history = History()
        self.findings = []
        self._unlogged.clear()
        self._media.clear()
        self._takes = {what for lg in frontend.loggers for what in MEDIA_SUPPORT[logger_kind(lg)]}
        self._last_figure = self._last_record = self._figure_clock = None
        self._figure_seconds = 0.0
        self.sinks = SinkFailures(lambda message: self.warn(message))

    # ------------------------------------------------------------------ messages
    def info(self, message: str) -> None:
        """An informational message, on rank zero."""
        if self.frontend.rank_zero:
            self.frontend.info(message)

    def warn(self, message: str) -> None:
        """A warning, on rank zero."""
        if self.frontend.rank_zero:
            self.frontend.warn(message)

    def warn_once(self, key: str, message: str) -> None:
        """A warning shown once per ``key`` for the whole run (resumed runs included)."""
        if key not in self.warned:
            self.warned.add(key)
            self.warn(message)

    # ------------------------------------------------------------------ metrics
    def start(self, inventory: ModelInventory | None = None) -> None:
        """At the start of training: the model's inventory and the thresholds next to the logs, TensorBoard's layout.

        ``gradhealth report`` reads both back (its report then knows the model and grades with the run's lines);
        visuals that cannot go to a logger are said once.
        """
        if not self.frontend.rank_zero:
            return
        if self.options.report and self.frontend.loggers:
            directory = self.report_dir()
            directory.mkdir(parents=True, exist_ok=True)
            saved = {
                "inventory": inventory.to_dict() if inventory is not None else None,
                "thresholds": (self.options.thresholds or Thresholds()).to_dict(),  # the report's lines
            }
            try:  # (never through a link; a disk that refuses it costs the offline report, not the run)
                write_text(directory / MODEL_JSON, json.dumps(saved) + "\n")
                write_run_state(directory, run_state("running"))
            except OSError as err:
                self.warn(f"{self.frontend.name}: could not write {directory / MODEL_JSON} ({err}); training goes on.")
        self._inventory = inventory
        layers = [layer.name for layer in inventory.layers] if inventory is not None else []
        for writer in self._writers():
            writer.add_custom_scalars(custom_scalars_layout(list(metrics.SUMMARY_KEYS), layers))
        wanted = {"histograms": self.options.histogram_every_n_steps, "figures": self._figures}
        skipped = {
            type(lg).__name__: missing
            for lg in self.frontend.loggers
            if (missing := [v for v, on in wanted.items() if on and v not in MEDIA_SUPPORT[logger_kind(lg)]])
        }
        if skipped:
            said = ", ".join(f"{' and '.join(what)} for {name}" for name, what in skipped.items())
            self.info(
                f"{self.frontend.name}: histograms go to TensorBoard and W&B loggers, the gradient-flow figure also to "
                f"MLflow; skipped: {said}."
            )

    def publish(self, record: StepStats, several: bool, counters: dict[str, float]) -> None:
        """Add ``record`` to the history and to the metrics of its step (written by :meth:`emit`)."""
        self.history.add(record)
        if record.layers:  # (a failing step's record is published, never drawn: the end-of-run figure shows it)
            self._last_record = record
        if record.no_grad_params:
            names = ", ".join(record.no_grad_params[:10])
            more = len(record.no_grad_params) - 10
            self.warn_once(
                "no-grad:" + ",".join(record.no_grad_params),
                f"{self.frontend.name}: {record.no_grad_count} trainable parameter(s) got no gradient at step "
                f"{record.step}: {names}{f' and {more} more' if more > 0 else ''}. They are unused in the forward "
                "pass or detached from the loss; freeze them (requires_grad=False) or check the graph. Counted in "
                f"{metrics.NO_GRAD_COUNT}.",
            )
        opt_idx = record.optimizer_idx if several else None
        summary = metrics.summary_metrics(record, opt_idx)
        values = metrics.record_to_metrics(record, opt_idx) if self.options.per_layer else dict(summary)
        values.update(counters)
        summary.update(counters)
        self._unlogged.setdefault(record.step, {}).update(values)
        if self.frontend.on_summary is not None:
            self.frontend.on_summary(summary)

    def add_activations(self, step: int, stats: dict[str, tuple[float, float, float | None]]) -> None:
        """The activation statistics of a sampled step."""
        self.history.add_activations(step, stats)
        self._unlogged.setdefault(step, {}).update(metrics.activation_metrics(stats))

    def emit(self) -> None:
        """Write the buffered metrics: one write per logger and step, on rank zero."""
        if not self._unlogged and not self._media:
            return
        batches, self._unlogged = self._unlogged, {}
        media, self._media = self._media, {}
        if not self.frontend.rank_zero:
            return
        for step in sorted(set(batches) | set(media)):
            write_metrics(self.frontend.loggers, batches.get(step, {}), step, media.get(step), self.sinks)

    def flush(self) -> None:
        """Make the loggers write what they hold (before a raise)."""
        if not self.frontend.rank_zero:
            return
        step = self.history.steps[-1] if self.history.steps else 0
        for logger in self.sinks.live(self.frontend.loggers):
            self.sinks.call(logger, step, lambda lg=logger: _flush_logger(lg))

    def close_loggers(self) -> None:
        """Close the event files the monitor opened itself (a loop's log directory): no writer thread is left."""
        for logger in self.frontend.loggers:
            if isinstance(logger, DirectoryLogger):
                self.sinks.call(logger, -1, logger.finalize)

    def _writers(self) -> list[Any]:
        """The SummaryWriters of the TensorBoard loggers (rank zero only)."""
        if not self.frontend.rank_zero:
            return []
        return [lg.experiment for lg in self.frontend.loggers if logger_kind(lg) == "tensorboard"]

    def visuals(
        self,
        layout: ParamLayout,
        grad_scale: torch.Tensor | None,
        step: int,
        record: StepStats | None,
        reduction: Reduction,
    ) -> None:
        """Histograms and the gradient-flow figure, pre-clip, for the loggers that take them (written by :meth:`emit`).

        The figure is drawn on the computed steps :meth:`_figure_due` picks, and once more at the end of the run
        (:meth:`write_report`) for the last record, coloured by the diagnosis.
        """
        if record is not None and record.layers:
            self._last_record = record
        histograms_every = self.options.histogram_every_n_steps
        if (histograms_every is None or (step + 1) % histograms_every) and (record is None or self._figures is None):
            return  # the hot path (a step that is not logged): nothing to draw
        takes = self._takes
        rank_zero = self.frontend.rank_zero

        # sharded: every rank takes part in the histograms' collectives (a condition the same on every rank)
        if due(step, histograms_every) and "histograms" in takes:
            if rank_zero or self.frontend.sharded:
                histograms = layer_histograms(layout, grad_scale=grad_scale, reduction=reduction)
                if rank_zero:
                    self._media.setdefault(step, Media()).histograms.update(histograms)
        if record is not None:
            self.figure(record)

    def figure(self, record: StepStats, alerts: Sequence[Alert] | None = None) -> None:
        """The gradient-flow figure of a computed step, when :meth:`_figure_due` picks it.

        A deferred step's record arrives a step late, after its histograms (:meth:`visuals` took those with the
        step's gradients). ``alerts``: the step's alerts, which colour the figure (``None``: graded for it).
        """
        if record.layers:
            self._last_record = record
        step = record.step
        if not self.frontend.rank_zero or "figures" not in self._takes or not record.layers or self._figures is None:
            return
        thresholds = self.options.thresholds or Thresholds()
        if self._figure_due(record, thresholds):
            drawn = self._figure(record, flagged_layers(record, thresholds, self._inventory, graded=alerts))
            if drawn is not None:
                media = self._media.setdefault(step, Media())
                media.figure, media.image = drawn.figure, drawn.image

    def _figure_due(self, record: StepStats, thresholds: Thresholds) -> bool:
        """Whether a computed step draws the figure.

        Every ``figure_every_n_steps``; under ``"auto"``, the first computed step past the checks' warm-up (whose
        figure can name unhealthy layers), then whenever the figures so far took at most :data:`FIGURE_SHARE` of the
        wall time since the first one.
        """
        if self._figures != "auto":

            return due(record.step, self._figures)
        if self._figure_clock is None:
            return record.global_step + 1 >= thresholds.warmup_steps
        return self._figure_seconds <= FIGURE_SHARE * (time.perf_counter() - self._figure_clock)

    def _figure(self, record: StepStats, flagged: dict[str, tuple[str, str]]) -> Media | None:
        """The gradient-flow figure of ``record``, drawn; ``None`` (said once) without matplotlib."""
        start = time.perf_counter()
        if self._figure_clock is None:
            self._figure_clock = start
        try:
            figure = gradient_flow_figure(record, flagged, reference_lines(self.options.thresholds or Thresholds()))
            image = render(figure)
        except ImportError:
            self._figures = None
            self.warn(
                f"{self.frontend.name}: the gradient-flow figure needs matplotlib, which is not installed: no figure "
                "will be drawn (pip install matplotlib)."
            )
            return None
        self._last_figure = record.step
        self._figure_seconds += time.perf_counter() - start
        return Media(figure=figure, image=image)

    def _final_figure(self) -> None:
        """At the end of the run: the last record's figure, coloured by the diagnosis, unless already drawn."""
        record = self._last_record
        if self._figures is None or record is None or self._last_figure == record.step or not self.frontend.rank_zero:
            return
        if "figures" not in self._takes:
            return
        media = self._figure(record, flagged_layers(record, graded=self.findings))
        if media is not None:
            write_metrics(self.frontend.loggers, {}, record.step, media, self.sinks)

    def nothing_to_watch(self, has_params: bool) -> None:
        """A step found nothing to measure (said once): no gradient on the watched parameters, or none watched."""
        name = self.frontend.name
        if has_params:
            self.warn_once(
                "no-grad-at-all",
                f"{name}: no watched parameter has a gradient at this optimizer step; nothing is recorded for it.",
            )
        else:
            self.warn_once(
                "nothing-watched",
                f"{name}: this optimizer has no parameter to watch at this step (all frozen, or left out by "
                "`include`/`exclude`); nothing is recorded for it until one trains.",
            )

    def no_report(self, due_steps: int, run_steps: int) -> None:
        """Why a run ends without a record (and so without a report), with the fix."""
        name = self.frontend.name
        if due_steps:
            self.warn(
                f"{name}: no record and no report: {due_steps} computed step(s) found no gradient on the watched "
                "parameters. Call step() after loss.backward(), before optimizer.zero_grad()."
            )
        elif run_steps:

            every = self.frontend.log_every_n_steps or DEFAULT_LOG_EVERY_N_STEPS
            self.warn(
                f"{name}: no step was computed, so there is no record and no report: the run made {run_steps} "
                f"optimizer step(s) and statistics are taken every {every} steps (steps {every - 1}, "
                f"{2 * every - 1}, ...). Fix: log more often, e.g. "
                f"`log_every_n_steps={max(1, min(every, run_steps) // 4)}`"
                + (" (on the monitor, or on the Trainer, whose value the monitor follows)." if name ==
                   "GradientHealthMonitor" else ".")
            )

    # ------------------------------------------------------------------ report
    def report_dir(self) -> Path:
        """``report_dir``, else the first logger's ``log_dir``, else the front-end's default directory."""
        if self.options.report_dir is not None:
            return Path(self.options.report_dir)
        log_dir = next((lg.log_dir for lg in self.frontend.loggers if getattr(lg, "log_dir", None)), None)
        return Path(log_dir) if log_dir is not None else self.frontend.default_dir

    def write_report(
        self, sparse_layers: frozenset[str], inventory: ModelInventory | None = None, stopped: str | None = None
    ) -> None:
        """Diagnose the run; on rank zero draw the last figure, write the report and show a summary.

        ``stopped``: why the run ended before its end (the report says so first). The run's state
        (:mod:`~lightning_gradhealth.output.runstate`) is saved beside the model file. A report that cannot be written
        is said, never raised: monitoring does not take a run down.
        """
        thresholds = self.options.thresholds or Thresholds()
        if self.history.records_seen:
            self.findings = diagnose(self.history, thresholds, sparse_layers=sparse_layers, inventory=inventory)
            self._final_figure()
        if not self.options.report or not self.frontend.rank_zero:
            return
        notes = ([f"The run stopped before its end: {stopped}"] if stopped else []) + self.sinks.notes()
        directory = self.report_dir()
        try:
            if self.history.records_seen:
                path = write_report(directory, self.history, self.findings, thresholds, inventory=inventory,
                                    notes=notes)  # fmt: skip
                self.info(console_summary(self.findings, path, self.history.alerts_raised))
            if self.frontend.loggers and (directory / MODEL_JSON).is_file():
                state = run_state("stopped" if stopped else "finished", self.history, self.findings, reason=stopped,
                                  sink_notes=self.sinks.notes())  # fmt: skip
                write_run_state(directory, state)
        except OSError as err:
            self.warn(f"{self.frontend.name}: the report could not be written to {directory} ({err}).")


def _flush_logger(logger: Any) -> None:
    """Make ``logger`` write what it holds (``save()``, its writer's ``flush()``)."""
    save = getattr(logger, "save", None)
    if callable(save):
        save()
    flush = getattr(getattr(logger, "experiment", None), "flush", None)
    if callable(flush):
        flush()
