"""Recurrent layers judged through time: vanishing or exploding gradients along the sequence.

The signal is the input gradient of each time step of ``nn.RNN``/``LSTM``/``GRU`` layers
(:mod:`~lightning_gradhealth.model.recurrence`), its first quarter against its last (Bengio et al., 1994; Pascanu
et al., 2013).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from lightning_gradhealth.config.thresholds import Severity
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.schema.kinds import Kind

__all__ = ["TIME_EXPLODING", "TIME_VANISHING", "recurrence"]

#: Through time (issue 19): a recurrent layer's first quarter of time steps getting less than 1/1e3 (1/1e6) of the
#: input gradient its last quarter gets is vanishing (critical), more than 1e2 (1e4) times as much is exploding:
#: the exponential decay or growth of ∂L/∂h_k in t - k of Bengio et al. (1994) and Pascanu et al. (2013). Healthy
#: runs measure 0.1 to 2 (a loss at every step, attention over the states, short sequences).
TIME_VANISHING = (1e-3, 1e-6)
TIME_EXPLODING = (1e2, 1e4)


def recurrence(inventory: ModelInventory | None, find: Callable[..., Any], out: list[Any]) -> None:
    """Vanishing or exploding through time, per recurrent layer (:attr:`ModelInventory.time_profiles`).

    An explosion through time in a run that went non-finite is its cause: it leads, critical.
    """
    if inventory is None:
        return
    went_nonfinite = any(f.kind == Kind.NONFINITE for f in out)
    for name, profile in inventory.time_profiles.items():
        ratio = profile.early_over_late()
        if ratio is None or math.isnan(ratio):
            continue
        evidence = {"early_over_late": ratio, "time_steps": profile.steps, "samples": profile.samples}
        if ratio < TIME_VANISHING[0]:
            out.append(find(
                Kind.RECURRENT_VANISHING, Severity.CRITICAL if ratio < TIME_VANISHING[1] else Severity.WARNING,
                f"the gradient vanishes through time in {name}: its first time steps get {ratio:.1e} of the gradient "
                f"its last ones get (over {profile.steps} steps): it cannot learn long-range dependencies.",
                layers=(name,), evidence=evidence,
            ))  # fmt: skip
        elif ratio > TIME_EXPLODING[0]:
            critical = ratio > TIME_EXPLODING[1] or went_nonfinite
            out.insert(0 if critical else len(out), find(
                Kind.RECURRENT_EXPLODING, Severity.CRITICAL if critical else Severity.WARNING,
                f"the gradient grows through time in {name}: its first time steps get {ratio:.3g}x the gradient its "
                f"last ones get (over {profile.steps} steps)" + (", and the run went non-finite." if went_nonfinite
                                                                   else "."),
                layers=(name,), evidence=evidence,
            ))  # fmt: skip
