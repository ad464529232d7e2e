"""``gradhealth report``: the report of a run, from its log directory, which is treated as untrusted input.

What it guarantees for a directory someone sent you (docs/report.md, "Security"):

- It writes only its own files, only into ``<run>/gradhealth_report/`` (or under ``--out``), never through a
  symbolic link, and never over the live run's report (:mod:`~lightning_gradhealth.output.safe_io`).
- It reads only regular files, never follows a link to one, never blocks on a FIFO or a device, and caps sizes:
  event records (:data:`~lightning_gradhealth.output.tfrecord.MAX_RECORD_BYTES`), JSON files (size and depth) and the
  number of entries it walks. Event files are streamed: memory does not grow with the number of steps.
- Every name it shows (layer names, kinds, file names, undecodable bytes included) is escaped: none can start a line,
  none reaches the Markdown as HTML.
- Every bad input ends with exit code 2 and one line on stderr, never a traceback; a damaged but partly readable
  input is reported with a warning.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_gradhealth.cli.inputs import MODEL_FILE_ERRORS, read_model_file, valid_inventory, valid_thresholds

__all__ = ["OFFLINE_DIR", "report_command"]

#: Where ``gradhealth report`` writes without ``--out``: a folder of its own inside the run (the live report stays).
OFFLINE_DIR = "gradhealth_report"
_EVENTS = "events.out.tfevents.*"
_PROGRESS_FROM = 16 * 2**20  # bytes of event files from which reading shows its progress


class InputError(Exception):
    """The command line's input cannot be used (said on stderr in one line, exit code 2)."""


def report_command(args: argparse.Namespace) -> int:
    """Run ``gradhealth report``; every bad input is one line on stderr and exit code 2."""
    from lightning_gradhealth.output.safe_io import UnsafePathError, clean

    try:
        return _report(args)
    except (InputError, UnsafePathError) as err:
        message = str(err)
    except (OSError, ValueError, MemoryError, RecursionError) as err:  # (an input no check above anticipated)
        message = f"cannot use {clean(str(args.logdir))}: {type(err).__name__}: {clean(str(err))}"
    print(f"gradhealth report: {message}", file=sys.stderr)
    return 2


def _problem_text(path: Path, problem: Any) -> str:
    """The warning for an event file read only in part (or the refusal of an oversized record)."""
    from lightning_gradhealth.output.safe_io import shown
    from lightning_gradhealth.output.tfrecord import MAX_RECORD_BYTES

    where, size, records = problem.offset, problem.size, problem.records
    kept = f"the {records} record(s) before it are read, nothing after" if records else "nothing in it is read"
    if problem.kind == "oversized":
        return (f"{shown(path)}: the record at byte {where} claims {problem.claimed:,} bytes, over the "
                f"{MAX_RECORD_BYTES:,}-byte limit: not an event file this tool reads")  # fmt: skip
    if problem.kind == "truncated":
        return (f"{shown(path)} is truncated: it ends inside a record (byte {where} of {size}); {kept} "
                "(a run still writing, or a copy cut short)")  # fmt: skip
    return f"{shown(path)} is corrupt: the record at byte {where} of {size} fails its checksum; {kept}"


def _runs(logdir: str) -> list[Path]:
    """The run directories under ``logdir``, or an :class:`InputError` saying what is wrong with it."""
    from lightning_gradhealth.output.eventfiles import find_runs
    from lightning_gradhealth.output.safe_io import shown
    from lightning_gradhealth.schema.errors import GradientHealthError

    root = Path(logdir)
    hint = f"give the run's log directory, the folder that holds its event files ({_EVENTS})"
    if not root.exists():
        raise InputError(f"no such log directory: {shown(root)} does not exist; {hint}")
    if not root.is_dir():
        parent = root.parent if root.name.startswith("events.out.tfevents.") else None
        raise InputError(
            f"{shown(root)} is a file, not a directory: {hint}"
            + (f", here: gradhealth report {shown(parent)}" if parent is not None else "")
        )
    try:
        return find_runs(root)
    except GradientHealthError as err:
        if "more than" in str(err):
            raise InputError(str(err)) from None
        raise InputError(f"no TensorBoard event files ({_EVENTS}) under {shown(root)}: {hint}") from None


def _progress(run: Path) -> Callable[[int], None] | None:
    """A progress line on stderr while a large run is read (``None`` for a small one)."""
    from lightning_gradhealth.output.eventfiles import event_files
    from lightning_gradhealth.output.safe_io import shown

    total = 0
    for path in event_files(run):
        try:
            info = os.lstat(path)
        except OSError:
            continue
        total += info.st_size if os.path.isfile(path) and not os.path.islink(path) else 0
    if total < _PROGRESS_FROM:
        return None
    tty = sys.stderr.isatty()
    state = {"shown": -1.0, "clock": time.perf_counter()}

    def show(done: int) -> None:
        share = min(1.0, done / total) if total else 1.0
        step = 0.01 if tty else 0.1
        if share - state["shown"] < step and share < 1.0:
            return
        state["shown"] = share
        bar = "#" * int(share * 30)
        line = (f"gradhealth report: reading {shown(run)} [{bar:<30}] {share:4.0%} ({done / 2**20:,.0f} of "
                f"{total / 2**20:,.0f} MB, {time.perf_counter() - state['clock']:.0f} s)")  # fmt: skip
        print(("\r" + line) if tty else line, end="\n" if (not tty or share >= 1.0) else "", file=sys.stderr)
        sys.stderr.flush()

    return show


def _read_runs(runs: Sequence[Path]) -> tuple[list[tuple[Path, Any]], dict[Path, list[str]]]:
    """Each run's history (runs not made with the monitor are left out) and the warnings per run."""
    from lightning_gradhealth.output.eventfiles import history_from_events
    from lightning_gradhealth.output.safe_io import UnsafePathError
    from lightning_gradhealth.schema.errors import GradientHealthError

    histories, warnings = [], {}
    for run in runs:
        problems: dict[Path, Any] = {}
        try:
            history = history_from_events(run, problems=problems, progress=_progress(run))
        except UnsafePathError as err:
            raise InputError(str(err)) from None
        except GradientHealthError:
            history = None  # another run in the same tree, not made with the monitor
        for path, problem in problems.items():
            text = _problem_text(path, problem)
            if problem.kind == "oversized":
                raise InputError(text)
            warnings.setdefault(run, []).append(text)
            print(f"gradhealth report: warning: {text}", file=sys.stderr)
        if history is not None:
            histories.append((run, history))
    return histories, warnings


def _thresholds(run: Path, model: dict[str, Any] | None, overrides: dict[str, float | int]) -> tuple[Any, str]:
    """The thresholds the run used (saved beside its event files), with the command line's overrides on top."""
    from lightning_gradhealth.config.thresholds import Thresholds
    from lightning_gradhealth.output.report import MODEL_JSON
    from lightning_gradhealth.output.safe_io import clean, shown

    path = shown(run / MODEL_JSON)
    base, source = Thresholds(), f"the defaults (no thresholds saved in {path})"
    saved = model.get("thresholds") if model is not None else None
    if saved is not None:
        try:
            base = Thresholds.from_dict(valid_thresholds(saved))
            source = f"the run's own (saved in {path})"
        except (TypeError, ValueError) as err:
            print(f"gradhealth report: the thresholds in {path} are unreadable ({clean(str(err))}); using the "
                  "defaults", file=sys.stderr)  # fmt: skip
    if not overrides:
        return base, source
    try:
        th = Thresholds.from_dict({**base.to_dict(), **overrides})
    except (TypeError, ValueError) as err:
        raise InputError(f"--threshold: {err}") from None
    return th, source + ", with " + ", ".join(f"{k}={v:g}" for k, v in overrides.items()) + " from --threshold"


def _inventory(run: Path, model: dict[str, Any] | None) -> Any:
    """The model's inventory saved with the run, validated, or None (with a warning when it is unusable)."""
    from lightning_gradhealth.output.report import MODEL_JSON
    from lightning_gradhealth.output.safe_io import clean, shown

    if model is None or model.get("inventory") is None:
        return None
    try:
        data = valid_inventory(model["inventory"])
        from lightning_gradhealth.model.inventory import ModelInventory  # (imports torch: only when there is one)

        return ModelInventory.from_dict(data)
    except MODEL_FILE_ERRORS as err:
        print(f"gradhealth report: the inventory in {shown(run / MODEL_JSON)} is unusable ({clean(str(err))}); the "
              "model is unknown here", file=sys.stderr)  # fmt: skip
        return None


def _overrides(items: Sequence[str]) -> dict[str, float | int]:
    """``--threshold NAME=VALUE`` arguments as a mapping."""
    out: dict[str, float | int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = int(value) if name.strip() == "warmup_steps" else float(value)
        except ValueError:
            raise InputError(f"--threshold takes NAME=VALUE (e.g. total_norm_high_warning=50), got {item!r}") from None
    return out


def _out_dir(chosen: str | None, root: Path, run: Path) -> Path:
    """Where a run's report goes.

    Under ``--out`` (followed: the user's choice), in the run's relative path (the untrusted tree's names: no link
    followed); else the run's own :data:`OFFLINE_DIR` (no link followed).
    """
    from lightning_gradhealth.output.safe_io import safe_dir

    if chosen is None:
        return safe_dir(run / OFFLINE_DIR)
    base = Path(chosen)
    base.mkdir(parents=True, exist_ok=True)
    out = base
    for part in run.relative_to(root).parts:
        out = safe_dir(out / part)
    return out


def _report(args: argparse.Namespace) -> int:
    from lightning_gradhealth.cli.live import live_knowledge
    from lightning_gradhealth.diagnosis.rules import diagnose
    from lightning_gradhealth.output.report import MODEL_JSON, REPORT_JSON, REPORT_MD, console_summary, write_report
    from lightning_gradhealth.output.safe_io import UnsafePathError, read_json, shown

    overrides = _overrides(args.threshold or ())
    histories, problems = _read_runs(_runs(args.logdir))
    if not histories:
        raise InputError(
            f"no run under {shown(args.logdir)} was logged with GradientHealthMonitor (no 'grad_health/total_norm' "
            "scalars)" + ("; some event files are unreadable, see the warnings above" if problems else "")
        )
    jobs = []
    for run, history in histories:
        model, why = read_model_file(run / MODEL_JSON)
        if why is not None:
            print(f"gradhealth report: {why}; the model and its thresholds are unknown here", file=sys.stderr)
        jobs.append((run, history, model, *_thresholds(run, model, overrides)))
    root = Path(args.logdir)
    for run, history, model, th, source in jobs:
        inventory = _inventory(run, model)
        merge, notes = live_knowledge(run, history, saved_model=model is not None)
        own_lines = source.startswith("the run's own") and not overrides
        findings = merge(diagnose(history, th, inventory=inventory), own_lines)
        notes = [f"Read with warnings: {p}" for p in problems.get(run, [])] + notes
        try:
            out = _out_dir(args.out, root, run)
            md = write_report(out, history, findings, th, inventory=inventory, notes=notes)
        except UnsafePathError as err:
            raise InputError(f"{err}; use --out to write elsewhere") from None
        plots = read_json(out / REPORT_JSON).get("plots", [])  # (written with the report)
        unwanted = {"md": REPORT_JSON, "json": REPORT_MD}.get(args.format)
        if unwanted:
            (out / unwanted).unlink()
        path = md if args.format != "json" else out / REPORT_JSON
        print(f"{shown(run)}:")
        print(console_summary(findings, Path(shown(path))))
        print(f"  Thresholds: {source}.")
        for note in notes:
            if not note.startswith("Read with warnings"):
                print(f"  ⚠️ {note}")
        if problems.get(run):
            print(f"  ⚠️ {len(problems[run])} event file(s) could not be read whole: the report covers what could "
                  "(see above).")  # fmt: skip
        if inventory is None:
            print(f"  (no {MODEL_JSON} beside the event files: the model is unknown here, so every layer is compared "
                  "and the fixes are generic; the report written during training knows the model)")  # fmt: skip
        if plots:
            print("  Plots: " + ", ".join(shown(out / str(p)) for p in plots))
        else:
            print("  (no PNG plots: matplotlib could not draw them)")
    return 0
