"""Spike detection on the global gradient norm: an EMA of the log-norm with a z-score threshold."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SpikeDetector"]


class SpikeDetector:
    """Flag a global norm whose log lies more than ``z_thresh`` EMA standard deviations above the EMA mean.

    Working in log space makes the test scale-free (a norm that jumps 10x is as surprising at 0.01 as at 10).
    The first ``warmup_steps`` finite norms only feed the statistics. A spike does not enter the EMA (one outlier
    must not raise the bar for the next), nor does any non-finite norm.

    Args:
        z_thresh: Threshold in standard deviations (OLMo-core skips steps at 6 sigma).
        alpha: EMA decay: ``mean = alpha * mean + (1 - alpha) * x``.
        warmup_steps: Finite norms observed before the first decision.
        min_std: Floor on the standard deviation of the log-norm, so that a perfectly flat history does not
            turn noise into spikes (0.05: a 5% change is one sigma at most).
        rebaseline_after: After this many spikes in a row the jump is a new level, not a spike: the statistics
            restart from the current norm (a new warm-up), so that a lasting change does not flag every later step.
    """

    def __init__(
        self,
        z_thresh: float = 6.0,
        alpha: float = 0.98,
        warmup_steps: int = 50,
        min_std: float = 0.05,
        rebaseline_after: int = 10,
    ) -> None:
        self.z_thresh = z_thresh
        self.alpha = alpha
        self.warmup_steps = warmup_steps
        self.min_std = min_std
        self.rebaseline_after = rebaseline_after
        self.consecutive = 0
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def zscore(self, total_norm: float) -> float | None:
        """The z-score of ``total_norm`` against the current statistics, or ``None`` during warm-up."""
        if self.count < self.warmup_steps or not math.isfinite(total_norm) or total_norm <= 0:
            return None
        std = max(math.sqrt(self.var), self.min_std)
        return (math.log(total_norm) - self.mean) / std

    def observe(self, total_norm: float) -> float | None:
        """Test ``total_norm`` and update the statistics. Returns its z-score if it is a spike, else ``None``."""
        if not math.isfinite(total_norm) or total_norm <= 0:
            return None
        z = self.zscore(total_norm)
        if z is not None and z > self.z_thresh:
            self.consecutive += 1
            if self.consecutive >= self.rebaseline_after:  # a new level: restart the statistics from it
                self.consecutive = 0
                self.count = 0
                self._update(total_norm)
            return z
        self.consecutive = 0
        self._update(total_norm)
        return None

    def _update(self, total_norm: float) -> None:
        x = math.log(total_norm)
        if self.count == 0:
            self.mean, self.var = x, 0.0
        elif self.count < self.warmup_steps:  # exact running mean/variance during warm-up (Welford)
            delta = x - self.mean
            self.mean += delta / (self.count + 1)
            self.var += (delta * (x - self.mean) - self.var) / (self.count + 1)
        else:
            delta = x - self.mean
            self.mean += (1 - self.alpha) * delta
            self.var = self.alpha * (self.var + (1 - self.alpha) * delta * delta)
        self.count += 1

    def state_dict(self) -> dict[str, Any]:
        """Running statistics."""
        return {"count": self.count, "mean": self.mean, "var": self.var, "consecutive": self.consecutive}

    def reset(self) -> None:
        """Forget the statistics: the next norms start a new warm-up (they measure other parameters)."""
        self.load_state_dict({})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.count = int(state.get("count", 0))
        self.mean = float(state.get("mean", 0.0))
        self.var = float(state.get("var", 0.0))
        self.consecutive = int(state.get("consecutive", 0))
