"""Recovery without a restart: when to snapshot, what rolls back, how the learning rate backs off and returns.

``recover=True`` (or a :class:`Recovery`) on ``GradientHealthMonitor``/``GradientHealth`` keeps snapshots of the
training state in host memory, rolls back to the last trusted one when a step shows a failure that skipping one
update does not cure, skips the batches in between (PaLM's practice, Chowdhery et al., 2022, §5.1), and lowers the
learning rate by a factor on top of the schedule (OPT-175B's practice, Zhang et al., 2022, "OPT: Open Pre-trained
Transformer Language Models", §2.5 and the metaseq logbook). See ``docs/recovery.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["Recovery", "recovery_from"]


@dataclass(frozen=True)
class Recovery:
    """When to snapshot, when to roll back and how the learning rate backs off.

    Attributes:
        every_n_steps: A snapshot every this many optimizer steps (50). A snapshot copies the parameters, the
            optimizer state, schedulers, GradScaler, RNG states and the monitor's running state to host memory.
        slots: Snapshots kept: the newest trusted one, and newer ones still being vetted. ``None`` (default): as
            few as vetting needs, ``1 + ceil(trust_after / every_n_steps)`` (2 with the defaults).
        trust_after: Healthy optimizer steps after a snapshot before it may be rolled back to (20). The first
            snapshot of a run (the state it started or resumed from) is trusted at once.
        lr_factor: Each rollback multiplies the learning rate by this factor, on top of the schedule; rollbacks
            compound (0.5).
        lr_return_steps: After this many healthy steps in a row the factor doubles back toward its ceiling (200);
            ``None`` keeps it backed off. Each rollback lowers the ceiling to the geometric mean of the factor that
            failed and the backed-off one (a bisection of the learning rate's scale), so the factor never returns to
            a value that failed.
        max_rollbacks: Rollbacks allowed in a run (10); the next trigger stops the run with a
            ``TrainingHealthError`` and the report.
        nonfinite_window: A non-finite step is skipped; a second within this many steps rolls back (20).
        spike_factor: A finite global gradient norm more than this many times the median of the recent healthy
            ones is an absurd update (a transient fault): roll back at once (100, far beyond the spike detector's
            6 sigma of the log norm).
        loss_rise: The loss above this many times its best level so far (the lowest median of ``window`` recent
            healthy losses; of the first ones, early in a run) is diverging (2).
        patience: Steps in a row the loss must be diverging to roll back (3): one noisy batch is not a divergence.
        window: Recent healthy norms and losses the medians are taken over (50).
    """

    every_n_steps: int = 50
    slots: int | None = None
    trust_after: int = 20
    lr_factor: float = 0.5
    lr_return_steps: int | None = 200
    max_rollbacks: int = 10
    nonfinite_window: int = 20
    spike_factor: float = 100.0
    loss_rise: float = 2.0
    patience: int = 3
    window: int = 50

    def __post_init__(self) -> None:
        for name in ("every_n_steps", "max_rollbacks", "nonfinite_window", "patience", "window"):
            _int(name, getattr(self, name), 1)
        _int("trust_after", self.trust_after, 0)
        if self.lr_return_steps is not None:
            _int("lr_return_steps", self.lr_return_steps, 1, "an int >= 1 or None")
        _float("lr_factor", self.lr_factor, "a float in (0, 1)", lambda v: 0 < v < 1)
        _float("spike_factor", self.spike_factor, "a finite float > 1", lambda v: v > 1)
        _float("loss_rise", self.loss_rise, "a finite float > 1", lambda v: v > 1)
        needed = 1 + math.ceil(self.trust_after / self.every_n_steps)
        if self.slots is not None:
            _int("slots", self.slots, 1, "an int >= 1 or None")
        if self.slots is not None and self.slots < needed:
            raise ValueError(
                f"`Recovery.slots` must be >= 1 + ceil(trust_after / every_n_steps) = {needed} (a snapshot must still "
                f"be kept when the next one is taken before it is trusted), got slots={self.slots!r} with "
                f"trust_after={self.trust_after!r}, every_n_steps={self.every_n_steps!r}."
            )

    @property
    def kept(self) -> int:
        """How many snapshots are kept (``slots``, or as few as vetting needs)."""
        return self.slots if self.slots is not None else 1 + math.ceil(self.trust_after / self.every_n_steps)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready mapping."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _int(name: str, value: Any, minimum: int, allowed: str | None = None) -> None:
    allowed = allowed or f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`Recovery.{name}` must be {allowed}, got {value!r} (type {type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"`Recovery.{name}` must be {allowed}, got {value!r}.")


def _float(name: str, value: Any, allowed: str, ok: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`Recovery.{name}` must be {allowed}, got {value!r} (type {type(value).__name__}).")
    if not math.isfinite(value) or not ok(value):
        raise ValueError(f"`Recovery.{name}` must be {allowed}, got {value!r}.")


def recovery_from(value: Any) -> Recovery | None:
    """``recover=``'s value as a :class:`Recovery` (``True``: the defaults) or ``None`` (``False``).

    Raises:
        TypeError: Anything else, naming the argument, what is allowed and what was received.
    """
    if isinstance(value, Recovery):
        return value
    if value is True:
        return Recovery()
    if value is False or value is None:
        return None
    raise TypeError(
        f"`recover` must be False, True or a lightning_gradhealth.Recovery, got {value!r} "
        f"(type {type(value).__name__})."
    )
