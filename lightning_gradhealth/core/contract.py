"""The front-end contract: which calls a front-end makes on the core, and in which order.

A front-end (the Lightning callback, :meth:`GradientHealth.step` for loops, or a new one) drives the core through
:class:`Pipeline`, in the order :data:`CALL_ORDER` states:

1. ``attach`` once a run's model (and optimizers) are known, then ``start`` when training starts;
2. per batch: ``check_watched`` (optional: once an epoch, to see parameters frozen or unfrozen), ``before_batch``
   (before its forward pass), ``after_backward`` after each backward pass under accumulation, then at an optimizer
   step ``before_step`` and, only when it returned ``True``, ``on_step``; then ``end_batch`` after the update;
3. ``close`` at the end of the run, or ``abort`` when it ends on an exception.

:func:`check_call_order` checks a recorded sequence against it (the contract tests record the callback's and a
loop's calls in real runs).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch.optim import Optimizer

    from lightning_gradhealth.core.context import StepContext
    from lightning_gradhealth.output.pipeline import Frontend

__all__ = ["CALLS", "CALL_ORDER", "Pipeline", "check_call_order"]


@runtime_checkable
class Pipeline(Protocol):
    """What a front-end calls on the core (:class:`~lightning_gradhealth.core.health.GradientHealth`)."""

    def attach(self, frontend: Frontend, optimizers: Sequence[Optimizer] = (), ddp: Any = None) -> None:
        """Start a run on ``frontend.model``."""

    def start(self) -> None:
        """Training starts."""

    def check_watched(self, optimizers: Sequence[Optimizer], step: int) -> None:
        """Look for parameters frozen, unfrozen or replaced."""

    def before_batch(self, step: int) -> None:
        """Before a batch's forward pass."""

    def after_backward(self) -> None:
        """After each backward pass under accumulation."""

    def before_step(self, step: int, due: bool, loss: Any = None) -> bool:
        """The start of an optimizer step (with its loss); ``on_step`` follows only when it returns ``True``."""

    def on_step(self, optimizer: Optimizer, ctx: StepContext, optimizers: Sequence[Optimizer]) -> bool:
        """Check, measure, decide and clip; returns whether the update goes ahead."""

    def end_batch(self) -> None:
        """After the optimizer step (or a batch without one)."""

    def close(self) -> None:
        """The run ended: write what is buffered and the report."""

    def abort(self) -> None:
        """The run ends on an exception: write what was measured."""


#: Each call's letter in :data:`CALL_ORDER`.
CALLS: dict[str, str] = {
    "attach": "A",
    "start": "S",
    "check_watched": "W",
    "before_batch": "B",
    "after_backward": "K",
    "before_step": "P",
    "on_step": "O",
    "end_batch": "E",
    "close": "C",
    "abort": "X",
}

#: The calls of one run, one letter each (:data:`CALLS`): attach, start, then batches, then close or abort.
CALL_ORDER = re.compile(r"AS(?:W?B?K*(?:PO?)?E)*[CX]?")


def check_call_order(calls: Sequence[str]) -> None:
    """Check a run's front-end calls (method names, in order) against :data:`CALL_ORDER`.

    Raises:
        ValueError: A call is unknown or out of order; the message names the first one that breaks the order.
    """
    unknown = [name for name in calls if name not in CALLS]
    if unknown:
        raise ValueError(f"`calls` must name the contract's calls {sorted(CALLS)}, got {unknown[0]!r}.")
    letters = "".join(CALLS[name] for name in calls)
    if CALL_ORDER.fullmatch(letters):
        return
    good = max(
        (i for i in range(len(letters) + 1) if CALL_ORDER.fullmatch(letters[:i]) or _prefix_ok(letters[:i])),
        default=0,
    )
    raise ValueError(
        f"front-end call {good} ({calls[good] if good < len(calls) else 'end'!r}) breaks the order "
        f"attach, start, [check_watched] [before_batch] [after_backward...] [before_step [on_step]] end_batch..., "
        f"close | abort; the calls were {list(calls[max(0, good - 6) : good + 1])} (around it)."
    )


def _prefix_ok(letters: str) -> bool:
    """Whether ``letters`` can still be completed into a run (a prefix of :data:`CALL_ORDER`)."""
    return any(CALL_ORDER.fullmatch(letters + tail) for tail in ("", "E", "OE", "C"))
