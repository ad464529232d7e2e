"""One vocabulary for what the monitor finds: the kinds of alerts, of findings, and the keys of the fixes.

An alert (a check on one step, :class:`~lightning_gradhealth.schema.alert.Alert`) and a finding (a rule over the run,
:class:`~lightning_gradhealth.diagnosis.rules.Finding`) about the same problem have the same kind, and that kind is the
key of its fixes in :data:`~lightning_gradhealth.diagnosis.fixes.FIXES`. The kinds are plain strings (they go into
checkpoints, JSON reports and log lines as they are).
"""

from __future__ import annotations

from typing import Final

__all__ = ["ALERT_KINDS", "KINDS", "Kind"]


class Kind:
    """The kinds, as string constants.

    Attributes:
        NONFINITE: NaN/Inf gradients (alert and finding).
        SPIKE: A gradient-norm spike (alert and finding).
        EXPLODING: Gradients too large: the global norm above the "too large" lines (alert and finding).
        VANISHING: Gradients too small: the global norm, or a layer's norm, below the "too small" lines; as a
            finding, also a decay of the layer norms toward the input (alert and finding).
        LAYER_IMBALANCE: Layer norms spread over more than the layer-norm-ratio lines (alert and finding).
        DEAD: Dead units: too many exactly-zero gradient entries, or activation units zero for whole batches
            (alert and finding).
        SATURATION: Saturated sigmoid/tanh outputs (finding).
        RATIO_HIGH: A layer's grad/param ratio above the lines (alert and finding).
        RATIO_LOW: A layer's grad/param ratio below the lines (alert and finding).
        RISING_TREND: The global norm rising steadily over the run (finding).
        DECAYING_TREND: The global norm decaying over the run (finding).
        NO_GRADIENT: Trainable parameters that never got a gradient (finding).
        DIVERGING: The training loss rising together with the gradient norm (alert and finding).
        RECURRENT_VANISHING: A recurrent layer's gradient vanishes through time: its first time steps get a tiny
            fraction of the gradient its last ones get (finding).
        RECURRENT_EXPLODING: A recurrent layer's gradient grows through time: its first time steps get far more
            gradient than its last ones (finding).
        STALL: The training loss stopped improving for a reason the run shows (the learning rate at zero, frozen
            layers, a loss at chance level), or frozen layers holding training back (finding).
    """

    NONFINITE: Final = "nonfinite"
    SPIKE: Final = "spike"
    EXPLODING: Final = "exploding"
    VANISHING: Final = "vanishing"
    LAYER_IMBALANCE: Final = "layer_imbalance"
    DEAD: Final = "dead"
    SATURATION: Final = "saturation"
    RATIO_HIGH: Final = "ratio_high"
    RATIO_LOW: Final = "ratio_low"
    RISING_TREND: Final = "rising_trend"
    DECAYING_TREND: Final = "decaying_trend"
    NO_GRADIENT: Final = "no_gradient"
    DIVERGING: Final = "diverging"
    RECURRENT_VANISHING: Final = "recurrent_vanishing"
    RECURRENT_EXPLODING: Final = "recurrent_exploding"
    STALL: Final = "stall"


#: Every kind, in the order of :class:`Kind`.
KINDS: tuple[str, ...] = tuple(value for name, value in vars(Kind).items() if name.isupper())

#: The kinds an :class:`~lightning_gradhealth.schema.alert.Alert` can have (the others are findings only).
ALERT_KINDS: frozenset[str] = frozenset(
    (
        Kind.NONFINITE,
        Kind.SPIKE,
        Kind.EXPLODING,
        Kind.VANISHING,
        Kind.LAYER_IMBALANCE,
        Kind.DEAD,
        Kind.RATIO_HIGH,
        Kind.RATIO_LOW,
        Kind.DIVERGING,
    )
)
