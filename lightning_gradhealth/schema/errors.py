"""The package's errors: one base class, one for a run that must stop, one for a set-up it cannot watch."""

from __future__ import annotations

from typing import Any

__all__ = ["GradientHealthError", "TrainingHealthError", "UnsupportedSetupError"]


class GradientHealthError(RuntimeError):
    """The base of every error this package raises on its own account.

    ``except GradientHealthError`` catches both a run stopped for its gradients' health
    (:class:`TrainingHealthError`) and a set-up that cannot be watched (:class:`UnsupportedSetupError`).

    Args:
        message: What went wrong and what to do about it.
        context: Structured details (step, layer names, the offending record, ...), kept on the exception as
            ``error.context`` so that callers can act on them without parsing the message.
    """

    def __init__(self, message: str, **context: Any) -> None:
        super().__init__(message)
        self.context: dict[str, Any] = context

    @property
    def record(self) -> Any:
        """The :class:`~lightning_gradhealth.schema.record.StepStats` of the failing step, when there is one."""
        return self.context.get("record")


class TrainingHealthError(GradientHealthError):
    """The run must stop.

    Non-finite gradients (``on_nonfinite="raise"``, or too many skipped steps), a collapsing loss scale, or a
    gradient-norm spike with ``on_spike="raise"``. Raised after the failing step was logged, the loggers flushed
    and the report written.
    ``error.context`` holds ``record``, ``step`` and ``layers`` (the non-finite layers, in definition order).
    """


class UnsupportedSetupError(GradientHealthError, ValueError):
    """The set-up cannot be watched; raised before a step is spent.

    A strategy whose gradients are not on the parameters, a model only partly sharded, a clipper that cannot clip
    these gradients, ... Also a :class:`ValueError`, as these refusals were before this class existed.
    """
