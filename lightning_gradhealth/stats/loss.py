"""The training loss as evidence: every step's loss summed up on the device, read with the statistics' one transfer.

Each optimizer step's loss is copied into a small device buffer (one copy kernel, no host sync). On a computed step
the buffer is reduced on the device to a few scalars (count, non-finite count, sum, min, max, the last quarter's
mean and, at the start, the run's first losses) that ride in the engine's one transfer as extras
(:attr:`~lightning_gradhealth.stats.engine.PendingStats.extras`). On the host they become a
:class:`~lightning_gradhealth.schema.record.LossSummary` attached to the step's record: a blow-up between two computed
steps is seen, the baseline is taken from the run's first steps (before any damage), and a smoothed loss (the mean
since the previous computed step) is what the rules judge, not one noisy batch.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Any

import torch

from lightning_gradhealth.schema.record import LossSummary, StepStats

__all__ = ["FIRST", "LossTracker", "largest_lr"]

#: How many first losses make the run's own starting level (their median).
FIRST = 5
_PREFIX = "loss_window/"
_FIELDS = ("nonfinite", "sum", "count", "low", "high")


def largest_lr(optimizer: Any) -> float | None:
    """The largest learning rate of ``optimizer``'s parameter groups (host values only: a device tensor is skipped)."""
    rates = []
    for group in getattr(optimizer, "param_groups", ()):
        lr = group.get("lr")
        if isinstance(lr, torch.Tensor):
            if lr.device.type != "cpu":
                continue  # (a capturable optimizer's LR on the device: reading it would sync)
            lr = lr.item()
        if isinstance(lr, (int, float)):
            rates.append(float(lr))
    return max(rates) if rates else None


class LossTracker:
    """A device-side running summary of the per-step training loss.

    :meth:`observe` on every optimizer step (one copy into a device buffer), :meth:`extras` on computed steps (the
    window reduced on the device, for the one transfer), :meth:`landed` once the transfer is read,
    :meth:`apply` to the step's record.

    Args:
        capacity: Steps the buffer holds before it is reduced into a running partial on the device.
    """

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = max(8, capacity)
        self._buf: torch.Tensor | None = None
        self._n = 0  # values in the buffer
        self._partial: torch.Tensor | None = None  # a full buffer, reduced: nonfinite, sum, count, low, high
        self._partial_steps = 0
        self._seen = 0  # steps observed in this run
        self._first: list[float] = []  # the run's first finite losses (host)
        self._head: torch.Tensor | None = None  # the run's first FIRST losses, on the device
        self._head_sent = False
        self._windows: dict[int, int] = {}  # step -> steps in its window (launched, not landed yet)
        self._nonfinite = 0
        self._landed: dict[int, LossSummary] = {}
        self._lrs: dict[int, float] = {}
        self.optimizer: str | None = None
        """The optimizer's class name, once a computed step saw it."""
        self.last: LossSummary | None = None
        """The latest summary read back."""

    def reset(self) -> None:
        """A new run."""
        self.__init__(self.capacity)  # type: ignore[misc]

    def observe(self, loss: torch.Tensor | float | None) -> None:
        """Every step: copy the step's loss into the device buffer (no host sync)."""
        if loss is None:
            return
        x = loss.detach().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))
        if self._buf is None or self._buf.device != x.device:
            self._buf = torch.empty(self.capacity, dtype=torch.float32, device=x.device)
            self._n, self._partial, self._partial_steps = 0, None, 0
        if self._n == self.capacity:
            self._fold()
        if self._seen < FIRST:  # (the run's first losses: one more copy, on the first FIRST steps only)
            if self._head is None or self._head.device != x.device:
                self._head = torch.full((FIRST,), math.nan, dtype=torch.float32, device=x.device)
            self._head[self._seen].copy_(x)
        self._buf[self._n].copy_(x)
        self._n += 1
        self._seen += 1

    def _reduce(self, values: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(values)
        zeroed = torch.where(finite, values, torch.zeros_like(values))
        inf = torch.full_like(values, math.inf)
        return torch.stack((
            (~finite).sum().to(values.dtype), zeroed.sum(), finite.sum().to(values.dtype),
            torch.where(finite, values, inf).amin(), torch.where(finite, values, -inf).amax(),
        ))  # fmt: skip

    def _fold(self) -> None:
        """The buffer is full: reduce it into the running partial (on the device) and start it over."""
        assert self._buf is not None
        reduced = self._reduce(self._buf[: self._n])
        if self._partial is None:
            self._partial = reduced
        else:
            p = self._partial
            self._partial = torch.cat((p[:3] + reduced[:3], torch.minimum(p[3:4], reduced[3:4]),
                                       torch.maximum(p[4:5], reduced[4:5])))  # fmt: skip
        self._partial_steps += self._n
        self._n = 0

    def extras(self, step: int) -> dict[str, torch.Tensor]:
        """On a computed step: the window since the previous one, reduced on the device, for the one transfer."""
        if self._buf is None or (self._n == 0 and self._partial is None):
            return {}
        window = self._buf[: self._n]
        reduced = self._reduce(window) if self._n else None
        if self._partial is not None:
            p = self._partial
            reduced = p if reduced is None else torch.cat((
                p[:3] + reduced[:3], torch.minimum(p[3:4], reduced[3:4]), torch.maximum(p[4:5], reduced[4:5])
            ))  # fmt: skip
        assert reduced is not None
        out = {f"{_PREFIX}{name}": reduced[i] for i, name in enumerate(_FIELDS)}
        tail = window[-max(1, self._n // 4) :] if self._n else None
        if tail is not None:
            tail_reduced = self._reduce(tail)
            out[f"{_PREFIX}tail_sum"], out[f"{_PREFIX}tail_count"] = tail_reduced[1], tail_reduced[2]
        if self._head is not None and not self._head_sent:
            self._head_sent = True
            for i in range(min(FIRST, self._seen)):
                out[f"{_PREFIX}first{i}"] = self._head[i]
        self._windows[step] = self._n + self._partial_steps
        self._n, self._partial, self._partial_steps = 0, None, 0
        return out

    def landed(self, step: int, values: dict[str, float]) -> None:
        """The window of computed step ``step`` read back on the host: update the running summary."""
        if f"{_PREFIX}count" not in values:
            return
        window = self._windows.pop(step, 0)
        get = values.get
        for i in range(FIRST):
            v = get(f"{_PREFIX}first{i}")
            if v is not None and math.isfinite(v) and len(self._first) < FIRST:
                self._first.append(v)
        self._nonfinite += int(get(f"{_PREFIX}nonfinite", 0.0))
        count = get(f"{_PREFIX}count", 0.0)
        tail_count = get(f"{_PREFIX}tail_count", 0.0)
        mean = get(f"{_PREFIX}sum", 0.0) / count if count else math.nan
        steps = window + (self.last.steps if self.last is not None else 0)
        nan = math.nan
        self.last = LossSummary(
            steps=steps,
            nonfinite=self._nonfinite,
            first=statistics.median(self._first) if self._first else math.nan,
            start=self._first[0] if self._first else math.nan,
            mean=mean,
            low=get(f"{_PREFIX}low", math.nan) if count else math.nan,
            high=get(f"{_PREFIX}high", math.nan) if count else math.nan,
            recent=get(f"{_PREFIX}tail_sum", 0.0) / tail_count if tail_count else mean,
            window=window,
            peak=max((v for v in (mean, self.last.peak if self.last else math.nan) if math.isfinite(v)), default=nan),
        )
        self._landed[step] = self.last

    def note_lr(self, step: int, optimizer: Any) -> None:
        """The learning rate at computed step ``step``, read from ``optimizer``'s parameter groups (host values)."""
        self.optimizer = type(optimizer).__name__
        lr = largest_lr(optimizer)
        if lr is not None:
            self._lrs[step] = lr

    def apply(self, record: StepStats) -> StepStats:
        """``record`` with the loss summary and learning rate of its step."""
        summary = self._landed.pop(record.step, None)
        lr = self._lrs.pop(record.step, None)
        for old in [s for s in self._landed if s < record.step]:
            del self._landed[old]
        for old in [s for s in self._lrs if s < record.step]:
            del self._lrs[old]
        if summary is None and lr is None:
            return record
        return replace(record, loss_summary=summary or record.loss_summary, lr=lr if lr is not None else record.lr)
