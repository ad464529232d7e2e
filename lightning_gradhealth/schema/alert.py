"""What a check found at one step (:class:`Alert`), and how bad it is (:class:`Severity`, ranked once here)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Alert", "Severity"]


class Severity(str, Enum):
    """How bad a check's result is (``ok`` < ``warning`` < ``critical``: :attr:`rank`)."""

    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        """0, 1, 2 for ``ok``, ``warning``, ``critical``: the one ordering of severities."""
        return _RANK[self]

    @classmethod
    def worst(cls, severities: object) -> Severity:
        """The worst of ``severities`` (an iterable of :class:`Severity` or their values), ``ok`` when empty."""
        return max((cls(s) for s in severities), key=lambda s: s.rank, default=cls.OK)  # type: ignore[attr-defined]


_RANK = {Severity.OK: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


@dataclass(frozen=True)
class Alert:
    """One thing a check found at one step.

    Attributes:
        kind: What was found, one of :data:`~lightning_gradhealth.schema.kinds.ALERT_KINDS` (``"nonfinite"``,
            ``"spike"``, ``"exploding"``, ``"vanishing"``, ``"layer_imbalance"``, ``"dead"``, ``"ratio_high"``,
            ``"ratio_low"``): the same kind as the finding about the same problem, and the key of its fixes.
        severity: ``warning`` or ``critical``.
        step: The Trainer's logging step.
        message: A human-readable sentence, with the fix.
        layer: The layer concerned, or ``None`` for a global check.
        value: The measured value.
        threshold: The line it crossed.
        epoch: Epoch of the step.
        batch_idx: Batch index of the step.
        held_back: How many alerts of the same kind and layer were suppressed since the last one was emitted.
    """

    kind: str
    severity: Severity
    step: int
    message: str
    layer: str | None = None
    value: float | None = None
    threshold: float | None = None
    epoch: int = 0
    batch_idx: int = 0
    held_back: int = 0
