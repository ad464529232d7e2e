"""Alert thresholds: a frozen, validated dataclass whose defaults come from the literature, calibrated on healthy runs.

Every check has a *warning* and a *critical* line. Where the literature gives no number, or where a published
rule of thumb fires on a healthy baseline (the real-architecture suite of ``tests/archs.py``, a He-initialised ReLU
MLP, a small pre-LayerNorm transformer, a pre-LayerNorm residual MLP, each trained with AdamW and with SGD), the
choice and its reason are in :data:`THRESHOLD_SOURCES` (shown in ``docs/diagnosis.md``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from lightning_gradhealth.schema.alert import Severity

__all__ = ["THRESHOLD_SOURCES", "Severity", "Thresholds"]




@dataclass(frozen=True)
class Thresholds:
    """Warning and critical lines of every gradient-health check.

    "High" checks fire when the value is *above* the line, "low" checks when it is *below*; a critical line
    is always further out than its warning line. Checks that depend on the parameters' scale (ratios, zero
    fractions, low norms) wait ``warmup_steps`` optimizer steps: freshly (often zero-) initialised layers have
    legitimately extreme values at the very start.

    Attributes:
        total_norm_high_warning: Global gradient norm above this: potentially exploding (100).
        total_norm_high_critical: Global gradient norm above this: exploding (1000).
        total_norm_low_warning: Global gradient norm below this: potentially vanishing (1e-3).
        total_norm_low_critical: Global gradient norm below this: no learning (1e-8).
        layer_norm_low_warning: A layer's gradient norm below this: vanishing in that layer (1e-5).
        layer_norm_low_critical: A layer's gradient norm below this: that layer does not learn (1e-7).
        layer_norm_ratio_warning: Largest / smallest layer norm (weight matrices of the repeated blocks) above
            this: a gradient-flow problem (1e3).
        layer_norm_ratio_critical: The same, critical (1e4).
        zero_frac_warning: Fraction of exactly-zero gradient entries (embeddings excluded) above this: many dead
            parameters (50%).
        zero_frac_critical: The same, critical (0.9).
        grad_param_ratio_high_warning: A layer's ``||g|| / ||θ||`` above this: updates too large, reduce the LR
            (100: measured up to 23 on healthy nets).
        grad_param_ratio_high_critical: The same, critical (1e4).
        grad_param_ratio_low_warning: A layer's ``||g|| / ||θ||`` below this: gradients too small (1e-6).
        grad_param_ratio_low_critical: The same, critical (1e-9).
        dead_units_warning: Fraction of an activation module's units that are zero for a whole sampled batch
            (activation statistics; 20%).
        dead_units_critical: The same, critical (50%).
        saturation_warning: Fraction of sigmoid/tanh outputs in the saturated range (ours: 20%, mirroring dead
            units).
        saturation_critical: The same, critical (50%).
        norm_growth_warning: The latest global norm over the run's own early level (the median of its first eighth)
            above this: the updates are unstable, whatever the absolute scale (ours: 30x; healthy runs of the
            real-architecture suite stay within 3x, an SGD step above the stability limit grows it ~1.3x a step).
        norm_growth_critical: The same, critical (1000x).
        loss_rise_warning: The latest training loss over its early level, together with a global norm grown as
            much, above this: training diverges (ours: 2x; the loss of a healthy run falls).
        loss_rise_critical: The same, critical (4x).
        update_ratio_high_warning: A layer's update ratio ``‖Δθ‖ / ‖θ‖`` per step (median over the recent records)
            above this: that layer's learning rate is too high (0.1, 100x the ~1e-3 rule of thumb: Karpathy, CS231n
            2016; per-layer update/weight ratios, You et al., 2017, 'Large Batch Training of Convolutional Networks'
            (LARS); healthy ResNet/GPT-2/BERT/ViT/LSTM runs stay below 0.025).
        update_ratio_high_critical: The same, critical (1.0: each step moves the weights by their own size).
        update_ratio_low_warning: Below this, the layer barely trains (1e-7; healthy runs stay above 2e-6, LayerNorms
            included).
        update_ratio_low_critical: The same, critical (1e-9).
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
    update_ratio_high_warning: float = 0.1
    update_ratio_high_critical: float = 1.0
    update_ratio_low_warning: float = 1e-7
    update_ratio_low_critical: float = 1e-9
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
            "update_ratio_high",
        ):
            self._ordered(name, high=True)
        for name in ("total_norm_low", "layer_norm_low", "grad_param_ratio_low", "update_ratio_low"):
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

    def to_dict(self) -> dict[str, float | int]:
        """The lines as a JSON-ready mapping (saved with a run; :meth:`from_dict` reads it back)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Thresholds from a mapping of line names to values; lines it does not name keep their defaults.

        Raises:
            ValueError: A name that is not a line, or an invalid value.
        """
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"`Thresholds` has no line named {', '.join(map(repr, unknown))}.")
        return cls(**data)

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


#: Where each default comes from: (check, warning, critical, source and reason). "Ours" marks a line the literature
#: gives no number for, set from measurements on healthy runs (``tests/test_trust.py``, ``benchmarks/calibrate.py``).
THRESHOLD_SOURCES: tuple[tuple[str, str, str, str], ...] = (
    (
        "global norm too large",
        "> 100",
        "> 1000",
        "exploding gradients (Pascanu, Mikolov & Bengio, 2013, 'On the difficulty of training recurrent neural "
        "networks'); the numbers are ours: a healthy He-init MLP measures 21 at initialisation, so the warning sits "
        "above the 10-100 band often quoted, and critical an order of magnitude further",
    ),
    (
        "global norm too small",
        "< 1e-3",
        "< 1e-8",
        "vanishing gradients (Bengio, Simard & Frasconi, 1994, 'Learning long-term dependencies with gradient "
        "descent is difficult'); critical at Adam's default epsilon, 1e-8 (Kingma & Ba, 2015), below which an "
        "adaptive update is mostly epsilon; warning ours",
    ),
    (
        "layer vanishing",
        "< 1e-5",
        "< 1e-7",
        "gradients shrinking towards the input layers (Glorot & Bengio, 2010, 'Understanding the difficulty of "
        "training deep feedforward neural networks'); critical at float32's machine epsilon (1.2e-7), below which "
        "a step on weights of order 1 is lost to rounding; warning two orders above it, ours",
    ),
    (
        "layer-norm ratio (weight matrices of the repeated blocks)",
        "> 1e3",
        "> 1e4",
        "initialisations that keep gradient variance equal across layers (Glorot & Bengio, 2010; He et al., 2015, "
        "'Delving Deep into Rectifiers'); the numbers are ours: healthy nets measure up to 513 (a pre-LayerNorm "
        "residual MLP) and ~360 (BERT, query/key against the feed-forward at init); over every layer a healthy BERT "
        "spans 1.4e4 (embeddings against LayerNorm biases), so only like is compared with like",
    ),
    (
        "zero fraction (when no unit statistic: FSDP1 shards; convolutions and embeddings excluded)",
        "> 50%",
        "> 90%",
        "dying ReLUs (Maas, Hannun & Ng, 2013, 'Rectifier Nonlinearities Improve Neural Network Acoustic Models'; "
        "Lu et al., 2020, 'Dying ReLU and Initialization'); the numbers are ours: a healthy ReLU MLP has up to 30% "
        "zero entries per batch",
    ),
    (
        "grad/param ratio too large",
        "> 100",
        "> 1e4",
        "layer-wise ratio of gradient to weight norm (You, Gitman & Ginsburg, 2017, 'Large Batch Training of "
        "Convolutional Networks', LARS); the numbers are ours: a healthy MLP's output layer measures up to 23 under "
        "AdamW",
    ),
    (
        "grad/param ratio too small",
        "< 1e-6",
        "< 1e-9",
        "the same ratio (You, Gitman & Ginsburg, 2017): three orders below the ~1e-3 of a healthy layer the "
        "warning, six the critical; ours",
    ),
    (
        "dead units (gradient rows; activation statistics)",
        "> 20%",
        "> 50%",
        "dying ReLUs (Lu et al., 2020, 'Dying ReLU and Initialization'), counted as units: output rows or channels "
        "whose whole gradient is zero (0% on every healthy model of the suite, ResNet-18's layer4 on 1x1 maps "
        "included, where 89% of the entries are zero padding taps), or units zero for a whole sampled batch; the "
        "numbers are ours (about half of a ReLU's outputs are zero, so zero outputs alone are no symptom)",
    ),
    (
        "saturated sigmoid/tanh outputs",
        "> 20%",
        "> 50%",
        "saturation stalls learning (Glorot & Bengio, 2010; LeCun et al., 1998, 'Efficient BackProp'); the numbers "
        "are ours, mirroring dead units",
    ),
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
    (
        "update ratio ‖Δθ‖ / ‖θ‖ too large (a layer's median over the recent records)",
        "> 0.1",
        "> 1",
        "the ~1e-3 rule of thumb for update / weight ratios (Karpathy, CS231n, 2016) and per-layer ratios (You, Gitman "
        "& Ginsburg, 2017, LARS): warning 100x above it (healthy ResNet/GPT-2/BERT/ViT/LSTM runs stay below 0.025), "
        "critical when a step moves the weights by their own size",
    ),
    (
        "update ratio too small",
        "< 1e-7",
        "< 1e-9",
        "ours: the layer barely trains; healthy runs stay above 2e-6, LayerNorms included",
    ),
    (
        "non-finite gradients",
        "-",
        "any NaN/Inf",
        "one NaN or Inf poisons every weight it updates; under fp16 loss scaling an overflow step is skipped "
        "instead (Micikevicius et al., 2018, 'Mixed Precision Training')",
    ),
)
