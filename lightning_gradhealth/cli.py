"""The ``gradhealth`` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Sequence

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from lightning_gradhealth.demo import run_demo

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging|LeafSpec).*")
    print(f"Training two nets for {args.steps} steps each (CPU); logs go to {args.out}/ ...")
    runs = run_demo(args.out, steps=args.steps, log_every_n_steps=args.log_every_n_steps)
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
    args = parser.parse_args(argv)
    if args.steps < 1 or args.log_every_n_steps < 1:
        parser.error("--steps and --log-every-n-steps must be >= 1")
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
