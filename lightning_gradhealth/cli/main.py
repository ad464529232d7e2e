"""The ``gradhealth`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

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


def _report(args: argparse.Namespace) -> int:
    from lightning_gradhealth.cli.report import report_command

    return report_command(args)


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
    report.add_argument(
        "--out", default=None,
        help="where to write the report (default: a gradhealth_report/ folder in each run; the live report stays)",
    )  # fmt: skip
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
