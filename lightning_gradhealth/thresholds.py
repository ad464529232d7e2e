"""Alert thresholds: a frozen, validated dataclass whose defaults come from the seeds, calibrated on healthy runs.

Every check has a *warning* and a *critical* line. Where the seeds disagree, or where a seed's line fires on a
healthy baseline (a He-initialised ReLU MLP, a small pre-LayerNorm transformer, a pre-LayerNorm residual MLP,
each trained with AdamW and with SGD), the choice and its reason are in :data:`THRESHOLD_SOURCES` and in the
README.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum

__all__ = ["THRESHOLD_SOURCES", "Severity", "Thresholds"]


class Severity(str, Enum):
    """How bad a check's result is."""

    OK = "ok"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Thresholds:
    """Warning and critical lines of every gradient-health check.

    "High" checks fire when the value is *above* the line, "low" checks when it is *below*; a critical line
    is always further out than its warning line. Checks that depend on the parameters' scale (ratios, zero
    fractions, low norms) wait ``warmup_steps`` optimizer steps: freshly (often zero-) initialised layers have
    legitimately extreme values at the very start.

    Attributes:
        total_norm_high_warning: Global gradient norm above this: potentially exploding (seed 003: > 100).
        total_norm_high_critical: Global gradient norm above this: exploding (seed 003: > 1000).
        total_norm_low_warning: Global gradient norm below this: potentially vanishing (seed 003: < 0.001).
        total_norm_low_critical: Global gradient norm below this: no learning (seed 000: < 1e-8).
        layer_norm_low_warning: A layer's gradient norm below this: vanishing in that layer (seed 004: < 1e-5).
        layer_norm_low_critical: A layer's gradient norm below this: that layer does not learn (seed 000: 1e-7).
        layer_norm_ratio_warning: Largest / smallest layer norm above this: a gradient-flow problem (seed 002:
            "more than 3-4 orders of magnitude").
        layer_norm_ratio_critical: Largest / smallest layer norm above this (seed 002, 4 orders).
        zero_frac_warning: Fraction of exactly-zero gradient entries (embeddings excluded) above this: many dead
            parameters (seed 003: > 50%).
        zero_frac_critical: The same, critical (0.9: our line; see README).
        grad_param_ratio_high_warning: A layer's ``||g|| / ||θ||`` above this: updates too large, reduce the LR
            (seed 000 says 1; measured up to 23 on healthy nets, so 100).
        grad_param_ratio_high_critical: The same, critical (1e4).
        grad_param_ratio_low_warning: A layer's ``||g|| / ||θ||`` below this: gradients too small (seed 000: 1e-6).
        grad_param_ratio_low_critical: The same, critical (1e-9).
        dead_units_warning: Fraction of an activation module's units that are zero for a whole sampled batch
            (activation statistics; seeds 000, 001: > 20%).
        dead_units_critical: The same, critical (seed 000: > 50%).
        saturation_warning: Fraction of sigmoid/tanh outputs in the saturated range (ours: 20%, mirroring dead
            units; seed 001 gives no number).
        saturation_critical: The same, critical (50%).
        norm_growth_warning: The latest global norm over the run's own early level (the median of its first eighth)
            above this: the updates are unstable, whatever the absolute scale (ours: 30x; healthy runs of the
            real-architecture suite stay within 3x, an SGD step above the stability limit grows it ~1.3x a step).
        norm_growth_critical: The same, critical (1000x).
        loss_rise_warning: The latest training loss over its early level, together with a global norm grown as
            much, above this: training diverges (ours: 2x; the loss of a healthy run falls).
        loss_rise_critical: The same, critical (4x).
        warmup_steps: Optimizer steps before the scale-dependent checks start.
    """

    total_norm_high_warning: float = 100.0
    total_norm_high_critical: float = 1000.0
    total_norm_low_warning: float = 1e-3
    total_norm_low_critical: float = 1e-8
    layer_norm_low_warning: float = 1e-5
    layer_norm_low_critical: float = 1e-7
    layer_norm_ratio_warning: float = 1e3
    layer_norm_ratio_critical: float = 1e4
    zero_frac_warning: float = 0.5
    zero_frac_critical: float = 0.9
    grad_param_ratio_high_warning: float = 1e2
    grad_param_ratio_high_critical: float = 1e4
    grad_param_ratio_low_warning: float = 1e-6
    grad_param_ratio_low_critical: float = 1e-9
    dead_units_warning: float = 0.2
    dead_units_critical: float = 0.5
    saturation_warning: float = 0.2
    saturation_critical: float = 0.5
    norm_growth_warning: float = 30.0
    norm_growth_critical: float = 1000.0
    loss_rise_warning: float = 2.0
    loss_rise_critical: float = 4.0
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "warmup_steps":
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"`Thresholds.warmup_steps` must be an int >= 0, got {value!r}.")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"`Thresholds.{f.name}` must be a finite float > 0, got {value!r}.")
        for name in (
            "total_norm_high",
            "layer_norm_ratio",
            "zero_frac",
            "grad_param_ratio_high",
            "dead_units",
            "saturation",
            "norm_growth",
            "loss_rise",
        ):
            self._ordered(name, high=True)
        for name in ("total_norm_low", "layer_norm_low", "grad_param_ratio_low"):
            self._ordered(name, high=False)
        for name in ("zero_frac_critical", "dead_units_critical", "saturation_critical"):
            if getattr(self, name) > 1:
                raise ValueError(f"`Thresholds.{name}` must be <= 1, got {getattr(self, name)!r}.")

    def _ordered(self, name: str, *, high: bool) -> None:
        warning, critical = getattr(self, f"{name}_warning"), getattr(self, f"{name}_critical")
        if (warning >= critical) if high else (warning <= critical):
            relation = "<" if high else ">"
            raise ValueError(
                f"`Thresholds.{name}_warning` must be {relation} `Thresholds.{name}_critical` (a critical line is "
                f"further out than its warning line), got warning={warning!r}, critical={critical!r}."
            )

    def grade_high(self, name: str, value: float) -> Severity:
        """Severity of ``value`` against the ``<name>_warning`` / ``<name>_critical`` lines of a "high" check."""
        if value > getattr(self, f"{name}_critical"):
            return Severity.CRITICAL
        if value > getattr(self, f"{name}_warning"):
            return Severity.WARNING
        return Severity.OK

    def grade_low(self, name: str, value: float) -> Severity:
        """Severity of ``value`` against the lines of a "low" check."""
        if value < getattr(self, f"{name}_critical"):
            return Severity.CRITICAL
        if value < getattr(self, f"{name}_warning"):
            return Severity.WARNING
        return Severity.OK


#: Where each default comes from: (check, warning, critical, source and reason).
THRESHOLD_SOURCES: tuple[tuple[str, str, str, str], ...] = (
    (
        "global norm too large",
        "> 100",
        "> 1000",
        "seed 003's table (seed 000's 10-100 warning band fires on a "
        "healthy He-init MLP at initialisation: measured 21)",
    ),
    ("global norm too small", "< 1e-3", "< 1e-8", "seed 003 (warning), seed 000's `is_healthy` (critical)"),
    ("layer vanishing", "< 1e-5", "< 1e-7", "seed 004 (warning), seed 000 (critical)"),
    (
        "layer-norm ratio (weight matrices of the repeated blocks)",
        "> 1e3",
        "> 1e4",
        "seed 002 (3-4 orders of magnitude); seed 000's 10x / 100x fires on healthy nets: measured up to 513 on a "
        "pre-LayerNorm residual MLP, ~360 in BERT (query/key vs the feed-forward at init); over every layer a "
        "healthy BERT spans 1.4e4 (embeddings vs LayerNorm biases), so only like is compared with like",
    ),
    (
        "zero fraction (when no unit statistic: FSDP1 shards; convolutions and embeddings excluded)",
        "> 50%",
        "> 90%",
        "seed 003 (warning); seed 000's 5% / 20% fire on "
        "a healthy ReLU MLP (up to 30% per batch); 90% critical is ours",
    ),
    (
        "grad/param ratio too large",
        "> 100",
        "> 1e4",
        "seed 000 says > 1; measured up to 23 on a healthy MLP's output layer under AdamW, so ours",
    ),
    ("grad/param ratio too small", "< 1e-6", "< 1e-9", "seed 000 (warning); critical is ours"),
    (
        "dead units (gradient rows; activation statistics)",
        "> 20%",
        "> 50%",
        "seeds 001 (warning) and 000 (critical), counted as units: output rows or channels whose whole gradient is "
        "zero (0% on every healthy model of the suite, ResNet-18's layer4 on 1x1 maps included, where 89% of the "
        "entries are zero padding taps), or units zero for the whole sampled batch; seed 001's 'zero activations > "
        "20%' fires on every ReLU net (about half of ReLU outputs are zero)",
    ),
    ("saturated sigmoid/tanh outputs", "> 20%", "> 50%", "ours (seed 001 names the symptom, not a number)"),
    (
        "global norm grown over the run's early level",
        "> 30x",
        "> 1000x",
        "ours: healthy ResNet/GPT-2/BERT/ViT/LSTM runs stay within 3x; gradient descent above its stability limit "
        "2/λmax grows it geometrically (Cohen et al., 2021, 'Gradient Descent on Neural Networks Typically Occurs "
        "at the Edge of Stability')",
    ),
    (
        "loss risen with the gradient norm (diverging)",
        "> 2x",
        "> 4x",
        "ours: the loss of a healthy run falls; a learning rate far too large raises both (GPT-2 at Adam lr 1: 6x)",
    ),
    ("non-finite gradients", "-", "any NaN/Inf", "seeds 000, 003"),
)
