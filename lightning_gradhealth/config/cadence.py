"""Lightning's logging schedule: which optimizer steps are computed and logged."""

from __future__ import annotations

__all__ = ["DEFAULT_LOG_EVERY_N_STEPS", "due"]

#: ``log_every_n_steps`` when a loop does not say (Lightning's default).
DEFAULT_LOG_EVERY_N_STEPS = 50


def due(step: int, every: int | None) -> bool:
    """Whether logging step ``step`` is one of every ``every`` steps (Lightning's schedule)."""
    return every is not None and every > 0 and (step + 1) % every == 0
