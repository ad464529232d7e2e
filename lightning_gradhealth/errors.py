"""The package's one error class."""

from __future__ import annotations

from typing import Any

__all__ = ["GradientHealthError"]


class GradientHealthError(RuntimeError):
    """Raised when gradient health monitoring cannot go on, or when a run must stop.

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
        """The :class:`~lightning_gradhealth.record.StepStats` of the failing step, when there is one."""
        return self.context.get("record")
