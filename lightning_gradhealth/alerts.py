"""Alerts: structured, rate-limited messages about what a check found."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from lightning_gradhealth.thresholds import Severity

__all__ = ["Alert", "AlertManager"]

log = logging.getLogger("lightning_gradhealth")


@dataclass(frozen=True)
class Alert:
    """One thing a check found at one step.

    Attributes:
        kind: What was found, one of :data:`~lightning_gradhealth.kinds.ALERT_KINDS` (``"nonfinite"``,
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


class AlertManager:
    """Emit alerts at most once per kind and layer per window of steps, counting what is held back.

    Args:
        window: Steps during which a second alert of the same kind and layer is held back.
        on_alert: Called with every emitted :class:`Alert` (on rank zero), e.g. to page someone.
    """

    def __init__(self, window: int = 100, on_alert: Callable[[Alert], Any] | None = None) -> None:
        self.window = window
        self.on_alert = on_alert
        self.total = 0
        self._last: dict[tuple[str, str | None], int] = {}
        self._held: dict[tuple[str, str | None], int] = {}

    def __call__(self, alert: Alert, *, rank_zero: bool = True) -> bool:
        """Count ``alert`` and emit it unless rate-limited. Returns whether it was emitted."""
        self.total += 1
        key = (alert.kind, alert.layer)
        last = self._last.get(key)
        if last is not None and 0 <= alert.step - last < self.window:
            self._held[key] = self._held.get(key, 0) + 1
            return False
        self._last[key] = alert.step
        alert = replace(alert, held_back=self._held.pop(key, 0))
        if rank_zero:
            suffix = f" ({alert.held_back} similar alert(s) held back since step {last})" if alert.held_back else ""
            level = logging.ERROR if alert.severity is Severity.CRITICAL else logging.WARNING
            log.log(level, "[grad_health %s] step %d: %s%s", alert.severity.value, alert.step, alert.message, suffix)
            if self.on_alert is not None:
                self.on_alert(alert)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Counters and rate-limit state."""
        return {
            "total": self.total,
            "last": [[k, layer, step] for (k, layer), step in self._last.items()],
            "held": [[k, layer, n] for (k, layer), n in self._held.items()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.total = int(state.get("total", 0))
        self._last = {(k, layer): int(step) for k, layer, step in state.get("last", ())}
        self._held = {(k, layer): int(n) for k, layer, n in state.get("held", ())}
