"""The ``gradhealth`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from lightning_gradhealth.demo import run_demo

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


def _report(args: argparse.Namespace) -> int:
    from lightning_gradhealth.errors import GradientHealthError
    from lightning_gradhealth.eventfiles import find_runs, history_from_events
    from lightning_gradhealth.report import MODEL_JSON, REPORT_JSON, REPORT_MD, console_summary, write_report
    from lightning_gradhealth.rules import diagnose
    from lightning_gradhealth.thresholds import Thresholds

    try:
        runs = find_runs(args.logdir)
        histories = []
        for run in runs:
            try:
                histories.append((run, history_from_events(run)))
            except GradientHealthError:
                continue  # another run in the same tree, not made with the monitor
        if not histories:
            raise GradientHealthError(
                f"no run under {args.logdir} was logged with GradientHealthMonitor "
                "(no 'grad_health/total_norm' scalars)"
            )
    except GradientHealthError as err:
        print(f"gradhealth report: {err}", file=sys.stderr)
        return 2
    root = Path(args.logdir)
    for run, history in histories:
        out = Path(args.out) / run.relative_to(root) if args.out else run
        inventory = _inventory(run)
        findings = diagnose(history, Thresholds(), inventory=inventory)
        md = write_report(out, history, findings, Thresholds(), inventory=inventory)
        plots = json.loads((out / REPORT_JSON).read_text()).get("plots", [])  # (written with the report)
        unwanted = {"md": REPORT_JSON, "json": REPORT_MD}.get(args.format)
        if unwanted:
            (out / unwanted).unlink()
        path = md if args.format != "json" else out / REPORT_JSON
        print(f"{run}:")
        print(console_summary(findings, path))
        if inventory is None:
            print(f"  (no {MODEL_JSON} beside the event files: the model is unknown here, so every layer is compared "
                  "and the fixes are generic; the report written during training knows the model)")  # fmt: skip
        if plots:
            print("  Plots: " + ", ".join(str(out / p) for p in plots))
        else:
            print("  (no PNG plots: pip install lightning-gradhealth[plots] for matplotlib)")
    return 0


def _inventory(run: Path) -> Any:
    """The model's inventory saved with the run (:data:`~lightning_gradhealth.output.MODEL_JSON`), or None."""
    from lightning_gradhealth.report import MODEL_JSON

    path = run / MODEL_JSON
    if not path.is_file():
        return None
    from lightning_gradhealth.inventory import ModelInventory  # (imports torch: only when there is one to read)

    try:
        return ModelInventory.from_dict(json.loads(path.read_text())["inventory"])
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
    args = parser.parse_args(argv)
    if args.command == "report":
        return _report(args)
    if args.steps < 1 or args.log_every_n_steps < 1:
        parser.error("--steps and --log-every-n-steps must be >= 1")
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
