"""The ``gradhealth`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import struct
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from lightning_gradhealth.cli.demo import clear_previous_runs, run_demo
    from lightning_gradhealth.schema.errors import GradientHealthError

    try:  # a re-run starts clean: TensorBoard would overlay the old and the new event files
        cleared = clear_previous_runs(args.out)
    except GradientHealthError as err:
        print(f"gradhealth demo: {err}", file=sys.stderr)
        return 2
    if cleared:
        print("Removed the previous demo's runs: " + ", ".join(map(str, cleared)))
    quiet = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in quiet]
    print(f"Training two nets for {args.steps} steps each (CPU); logs go to {args.out}/ ...")
    try:  # Lightning's banners off while the demo trains (restored after: main() may be called from Python)
        for lg in quiet:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*(does not have many workers|smaller than the logging|LeafSpec).*"
            )
            runs = run_demo(args.out, steps=args.steps, log_every_n_steps=args.log_every_n_steps)
    finally:
        for lg, level in zip(quiet, levels, strict=True):
            lg.setLevel(level)
    print()
    for run in runs:
        print(run.summary())
        print()
    sick, healthy = runs[0], runs[1]
    if sick.records and healthy.records:
        s_last, h_last = sick.records[-1], healthy.records[-1]
        print(
            "The deep sigmoid net's first layer gets "
            f"{s_last.layers[0].grad_norm / s_last.layers[-1].grad_norm:.1e} of its last layer's gradient "
            "(vanishing gradients: each sigmoid multiplies the gradient by at most 0.25); the residual ReLU net "
            f"keeps {h_last.layers[0].grad_norm / h_last.layers[-1].grad_norm:.2g} of it."
        )
    print(f"\nView the curves:  tensorboard --logdir {args.out}")
    return 0


_EVENTS = "events.out.tfevents.*"


class _InputError(Exception):
    """The command line's input cannot be read (said on stderr, exit code 2)."""


def _check_event_file(path: Path) -> str | None:
    """What is wrong with a TensorBoard event file, or None when every record is whole and passes its checksums.

    An event file is a TFRecord file: each record is its length (8 bytes) and that length's masked CRC-32C, the data
    and the data's masked CRC-32C. TensorBoard's reader stops silently at the first record that is cut short or fails
    a checksum, so a truncated or corrupt file would otherwise give a partial report without a word.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    size = path.stat().st_size
    records = 0
    with path.open("rb") as fh:
        while True:
            offset = fh.tell()
            head = fh.read(12)
            if not head:
                return None
            if len(head) < 12:
                cut = True
                break
            (length,) = struct.unpack("<Q", head[:8])
            if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                cut = False
                break
            if offset + 16 + length > size:
                cut = True
                break
            body = fh.read(length + 4)
            if struct.unpack("<I", body[length:])[0] != masked_crc32c(body[:length]):
                cut = False
                break
            records += 1
    kept = f"the {records} record(s) before it are read, nothing after" if records else "nothing in it is read"
    if cut:
        return (f"{path} is truncated: it ends inside a record (byte {offset} of {size}); {kept} "
                "(a run still writing, or a copy cut short)")  # fmt: skip
    return f"{path} is corrupt: the record at byte {offset} of {size} fails its checksum; {kept}"


def _runs(logdir: str) -> list[Path]:
    """The run directories under ``logdir``, or an :class:`_InputError` saying what is wrong with it."""
    from lightning_gradhealth.output.eventfiles import find_runs
    from lightning_gradhealth.schema.errors import GradientHealthError

    root = Path(logdir)
    hint = f"give the run's log directory, the folder that holds its event files ({_EVENTS})"
    if not root.exists():
        raise _InputError(f"no such log directory: {root} does not exist; {hint}")
    if not root.is_dir():
        parent = root.parent if root.name.startswith("events.out.tfevents.") else None
        raise _InputError(
            f"{root} is a file, not a directory: {hint}"
            + (f", here: gradhealth report {parent}" if parent is not None else "")
        )
    try:
        return find_runs(root)
    except GradientHealthError:
        raise _InputError(f"no TensorBoard event files ({_EVENTS}) under {root}: {hint}") from None


def _thresholds(run: Path, overrides: dict[str, float | int]) -> tuple[Any, str]:
    """The thresholds the run used (saved beside its event files), with the command line's overrides on top."""
    from lightning_gradhealth.config.thresholds import Thresholds
    from lightning_gradhealth.output.report import MODEL_JSON

    saved, source = None, f"the defaults (no thresholds saved in {run / MODEL_JSON})"
    try:
        saved = json.loads((run / MODEL_JSON).read_text()).get("thresholds")
    except (OSError, ValueError, AttributeError):
        pass
    if saved is not None:
        try:
            base = Thresholds.from_dict(saved)
            source = f"the run's own (saved in {run / MODEL_JSON})"
        except (TypeError, ValueError) as err:
            print(f"gradhealth report: the thresholds in {run / MODEL_JSON} are unreadable ({err}); using the defaults",
                  file=sys.stderr)  # fmt: skip
            base = Thresholds()
    else:
        base = Thresholds()
    if not overrides:
        return base, source
    try:
        th = Thresholds.from_dict({**base.to_dict(), **overrides})
    except (TypeError, ValueError) as err:
        raise _InputError(f"--threshold: {err}") from None
    return th, source + ", with " + ", ".join(f"{k}={v:g}" for k, v in overrides.items()) + " from --threshold"


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
            raise _InputError(
                f"--threshold takes NAME=VALUE (e.g. total_norm_high_warning=50), got {item!r}"
            ) from None
    return out


def _report(args: argparse.Namespace) -> int:
    from lightning_gradhealth.diagnosis.rules import diagnose
    from lightning_gradhealth.output.eventfiles import history_from_events
    from lightning_gradhealth.output.report import MODEL_JSON, REPORT_JSON, REPORT_MD, console_summary, write_report
    from lightning_gradhealth.schema.errors import GradientHealthError

    try:
        overrides = _overrides(args.threshold or ())
        runs = _runs(args.logdir)
        problems: dict[Path, list[str]] = {}
        for run in runs:
            for path in sorted(run.glob(_EVENTS)):
                problem = _check_event_file(path)
                if problem is not None:
                    problems.setdefault(run, []).append(problem)
                    print(f"gradhealth report: warning: {problem}", file=sys.stderr)
        histories = []
        for run in runs:
            try:
                histories.append((run, history_from_events(run)))
            except GradientHealthError:
                continue  # another run in the same tree, not made with the monitor
        if not histories:
            raise _InputError(
                f"no run under {args.logdir} was logged with GradientHealthMonitor (no 'grad_health/total_norm' "
                "scalars)" + ("; some event files are unreadable, see the warnings above" if problems else "")
            )
        jobs = [(run, history, *_thresholds(run, overrides)) for run, history in histories]
    except _InputError as err:
        print(f"gradhealth report: {err}", file=sys.stderr)
        return 2
    root = Path(args.logdir)
    for run, history, th, source in jobs:
        out = Path(args.out) / run.relative_to(root) if args.out else run
        inventory = _inventory(run)
        findings = diagnose(history, th, inventory=inventory)
        notes = [f"Read with warnings: {p}" for p in problems.get(run, [])]
        md = write_report(out, history, findings, th, inventory=inventory, notes=notes)
        plots = json.loads((out / REPORT_JSON).read_text()).get("plots", [])  # (written with the report)
        unwanted = {"md": REPORT_JSON, "json": REPORT_MD}.get(args.format)
        if unwanted:
            (out / unwanted).unlink()
        path = md if args.format != "json" else out / REPORT_JSON
        print(f"{run}:")
        print(console_summary(findings, path))
        print(f"  Thresholds: {source}.")
        if notes:
            print(f"  ⚠️ {len(notes)} event file(s) could not be read whole: the report covers what could (see above).")
        if inventory is None:
            print(f"  (no {MODEL_JSON} beside the event files: the model is unknown here, so every layer is compared "
                  "and the fixes are generic; the report written during training knows the model)")  # fmt: skip
        if plots:
            print("  Plots: " + ", ".join(str(out / p) for p in plots))
        else:
            print("  (no PNG plots: matplotlib could not be imported; pip install matplotlib)")
    return 0


def _inventory(run: Path) -> Any:
    """The model's inventory saved with the run (:data:`~lightning_gradhealth.output.pipeline.MODEL_JSON`), or None."""
    from lightning_gradhealth.output.report import MODEL_JSON

    path = run / MODEL_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())["inventory"]
        if data is None:  # saved without one
            return None
        from lightning_gradhealth.model.inventory import (
            ModelInventory,  # (imports torch: only when there is one to read)
        )

        return ModelInventory.from_dict(data)
    except (KeyError, TypeError, ValueError) as err:
        print(f"gradhealth report: {path} is unreadable ({err}); the model is unknown here", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gradhealth``.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code.
    """
    parser = argparse.ArgumentParser(prog="gradhealth", description="Gradient health for PyTorch Lightning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train an unhealthy and a healthy net and log their gradient health")
    demo.add_argument("--out", default="gradhealth_demo", help="log directory (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=200, help="optimizer steps per net (default: %(default)s)")
    demo.add_argument("--log-every-n-steps", type=int, default=5, help="logging interval (default: %(default)s)")
    report = sub.add_parser("report", help="diagnose a run from its TensorBoard event files and write the report")
    report.add_argument("logdir", help="the run's log directory (searched recursively for event files)")
    report.add_argument("--out", default=None, help="where to write the report (default: next to the events)")
    report.add_argument("--format", choices=("md", "json", "both"), default="both", help="(default: %(default)s)")
    report.add_argument(
        "--threshold",
        action="append",
        metavar="NAME=VALUE",
        help="change one line of the thresholds the run used (saved with it; else the defaults), e.g. "
        "total_norm_high_warning=50; repeatable",
    )
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args)
    if args.steps < 1 or args.log_every_n_steps < 1:
        parser.error("--steps and --log-every-n-steps must be >= 1")
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
