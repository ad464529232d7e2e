"""The options of gradient health monitoring: one frozen, validated object for every front-end.

:class:`HealthOptions` holds what ``GradientHealthMonitor(...)`` and ``GradientHealth(model, ...)`` take. It is
validated once, in ``__post_init__`` (every error names the argument, what is allowed and what was received), and
normalised there (regexes compiled, paths made :class:`~pathlib.Path`, ``norm_type`` a float). Each clipper's
defaults live in :data:`CLIP_DEFAULTS`; :func:`~lightning_gradhealth.guard.clipping.make_clipper` builds the
chosen one.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from lightning_gradhealth.config.paths import check_writable_dir
from lightning_gradhealth.config.recovery import Recovery, recovery_from
from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.config.validation import (
    check_choice,
    check_float,
    check_group_by,
    check_int,
    check_norm_type,
    check_regex,
    check_type,
)
from lightning_gradhealth.schema.alert import Alert

__all__ = ["CLIP_DEFAULTS", "ClipKind", "HealthOptions"]

ClipKind = Literal["norm", "value", "agc", "autoclip", "zclip"]

#: Each clipper's parameters and their defaults (``None``: required). A parameter given with another ``clip`` is
#: refused, since it would do nothing.
CLIP_DEFAULTS: dict[str, dict[str, float | int | None]] = {
    "norm": {"max_norm": 1.0},
    "value": {"clip_value": None},
    "agc": {"agc_clip_factor": 0.01, "agc_eps": 1e-3},  # NFNets, timm
    "autoclip": {"autoclip_percentile": 10.0, "autoclip_history": 10_000},
    "zclip": {"zclip_alpha": 0.97, "zclip_z_thresh": 2.5, "zclip_warmup_steps": 25},
}


@dataclass(frozen=True)
class HealthOptions:
    """Everything that configures gradient health monitoring.

    Each field is an option, declared once here with its type, default and doc (``metadata["doc"]``, and
    ``metadata["group"]``: the section of docs/options.md). ``GradientHealthMonitor``'s signature repeats the
    fields (LightningCLI reads it; a test checks that they agree) and its ``Args`` section is made from the docs
    (:mod:`~lightning_gradhealth.config.reference`), as is the options table of docs/options.md.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument has an invalid value, or the arguments contradict each other.
    """

    log_every_n_steps: int | None = field(
        default=None,
        metadata={
            "group": "watched",
            "doc": "Compute and log every this many optimizer steps, on the same step values as the Trainer's own "
            "scalars. ``None`` follows ``Trainer(log_every_n_steps=...)`` (50 in plain loops).",
        },
    )
    group_by: Literal["module", "parameter"] | Callable[[str], str] = field(
        default="module",
        metadata={
            "group": "watched",
            "doc": "``\"module\"`` (a layer is the module that directly owns the parameters: ``net.0`` gathers "
            "``net.0.weight`` and ``net.0.bias``), ``\"parameter\"``, or a callable mapping a parameter name to a "
            "layer name. Layers are kept in model definition order.",
        },
    )
    norm_type: float = field(
        default=2.0,
        metadata={
            "group": "watched",
            "doc": "Norm order: any float ``>= 1`` or ``float(\"inf\")``; 2.0 with any ``clip``.",
        },
    )
    include: str | re.Pattern[str] | None = field(
        default=None,
        metadata={"group": "watched", "doc": "Only watch parameters whose name matches this regex (``re.search``)."},
    )
    exclude: str | re.Pattern[str] | None = field(
        default=None,
        metadata={"group": "watched", "doc": "Ignore parameters whose name matches this regex."},
    )
    per_layer: bool = field(
        default=True,
        metadata={
            "group": "watched",
            "doc": "``False`` logs only the global metrics (for very large models, where per-layer keys dominate the "
            "cost of logging).",
        },
    )
    stats: Literal["basic", "full"] = field(
        default="basic",
        metadata={
            "group": "watched",
            "doc": "``\"basic\"`` or ``\"full\"`` (adds max, min non-zero, mean and std of the gradient per layer; "
            "a few extra kernels and one ``|g|`` temporary per tensor).",
        },
    )
    thresholds: Thresholds | None = field(
        default_factory=Thresholds,
        metadata={
            "group": "alerts",
            "doc": "Alert thresholds (:class:`~lightning_gradhealth.config.thresholds.Thresholds`, one keyword per "
            "line); ``None``: no threshold alerts (the report then grades with the defaults).",
        },
    )
    on_alert: Callable[[Alert], Any] | None = field(
        default=None,
        metadata={
            "group": "alerts",
            "doc": "Called with each emitted :class:`~lightning_gradhealth.schema.alert.Alert` on rank zero (a pager "
            "or chat hook). Alerts also go to the ``lightning_gradhealth`` Python logger.",
        },
    )
    alert_window: int = field(
        default=100,
        metadata={
            "group": "alerts",
            "doc": "An alert of a given kind and layer is emitted at most once per this many steps; the others are "
            "counted and reported with the next one (a more severe one always goes out).",
        },
    )
    on_nonfinite: Literal["raise", "skip", "warn"] | None = field(
        default="raise",
        metadata={
            "group": "safety",
            "doc": "What a non-finite gradient does when no GradScaler is active: ``\"raise\"`` a "
            ":class:`~lightning_gradhealth.schema.errors.GradientHealthError` naming the layers (after logging the "
            "step and flushing the loggers), ``\"skip\"`` the update (gradients set to ``None``), or ``\"warn\"``. "
            "``None`` turns the per-step guard off: non-finite steps are then only seen (and recorded) on logged "
            "steps, and with ``clip=None`` and ``spike_z_thresh=None`` a step that is not logged runs no torch "
            "operation at all.",
        },
    )
    max_consecutive_skips: int = field(
        default=5,
        metadata={
            "group": "safety",
            "doc": "With ``\"skip\"`` (non-finite or spike), raise after this many skipped steps in a row.",
        },
    )
    amp_max_consecutive_overflows: int = field(
        default=20,
        metadata={
            "group": "safety",
            "doc": "Under a GradScaler, overflows are the scaler's business (it skips the step); raise after this "
            "many in a row.",
        },
    )
    amp_min_scale: float = field(
        default=1.0,
        metadata={
            "group": "safety",
            "doc": "Under a GradScaler, raise when an overflow happens with the loss scale below this (the unscaled "
            "gradients themselves overflow: an explosion, not an AMP transient).",
        },
    )
    clip: ClipKind | None = field(
        default=None,
        metadata={
            "group": "safety",
            "doc": "``None`` or the clipper applied after the statistics: ``\"norm\"`` (``max_norm``), ``\"value\"`` "
            "(``clip_value``), ``\"agc\"`` (unit-wise adaptive clipping), ``\"autoclip\"`` (percentile of the norm "
            "history), ``\"zclip\"`` (z-score against an EMA of the norm). A clipper's parameter given with another "
            "``clip`` is refused (it would do nothing).",
        },
    )
    max_norm: float | None = field(
        default=None,
        metadata={"group": "safety", "doc": "Global L2 norm for ``clip=\"norm\"`` (1.0)."},
    )
    clip_value: float | None = field(
        default=None,
        metadata={"group": "safety", "doc": "Bound on every entry for ``clip=\"value\"`` (required there)."},
    )
    agc_clip_factor: float | None = field(
        default=None,
        metadata={"group": "safety", "doc": "AGC's λ for ``clip=\"agc\"`` (NFNets, timm: 0.01)."},
    )
    agc_eps: float | None = field(
        default=None,
        metadata={"group": "safety", "doc": "AGC's floor on the unit weight norm (1e-3)."},
    )
    autoclip_percentile: float | None = field(
        default=None,
        metadata={"group": "safety", "doc": "AutoClip's percentile of the norm history, ``clip=\"autoclip\"`` (10)."},
    )
    autoclip_history: int | None = field(
        default=None,
        metadata={"group": "safety", "doc": "How many recent norms AutoClip keeps (10000)."},
    )
    zclip_alpha: float | None = field(
        default=None,
        metadata={"group": "safety", "doc": "ZClip's EMA factor, for ``clip=\"zclip\"`` (0.97)."},
    )
    zclip_z_thresh: float | None = field(
        default=None,
        metadata={"group": "safety", "doc": "ZClip's z-score threshold (2.5)."},
    )
    zclip_warmup_steps: int | None = field(
        default=None,
        metadata={"group": "safety", "doc": "Steps ZClip collects norms before clipping (25)."},
    )
    spike_z_thresh: float | None = field(
        default=6.0,
        metadata={
            "group": "safety",
            "doc": "Spike detection: a global norm whose log lies more than this many EMA standard deviations above "
            "the EMA mean is a spike (6, as OLMo-core's step skipping). ``None`` turns detection off.",
        },
    )
    spike_warmup_steps: int = field(
        default=50,
        metadata={"group": "safety", "doc": "Finite steps observed before spike detection starts."},
    )
    on_spike: Literal["warn", "skip", "raise"] = field(
        default="warn",
        metadata={"group": "safety", "doc": "``\"warn\"``, ``\"skip\"`` the update, or ``\"raise\"``."},
    )
    spike_dir: str | Path | None = field(
        default=None,
        metadata={
            "group": "safety",
            "doc": "If set, the batches of a spiking step are saved there (``torch.save``) to reproduce it.",
        },
    )
    guard_mode: Literal["auto", "sync", "deferred"] = field(
        default="auto",
        metadata={
            "group": "safety",
            "doc": "How the per-step guard reads its verdict. ``\"sync\"``: before the update (one host sync per "
            "step; exact NaN/Inf counts). ``\"deferred\"``: one step later, with no host sync (a non-blocking copy); "
            "fused Adam/AdamW/SGD skip a non-finite update on the device, other optimizers apply it and the run "
            "raises at the next step, saying so; steps that must be decided before their update (clipping, "
            "``on_spike`` other than ``\"warn\"``, ``on_nonfinite=\"skip\"`` without a fused optimizer) stay "
            "synchronous. ``\"auto\"`` (default): ``\"deferred\"`` on CUDA, where a sync costs ~4-11% of a step, "
            "and ``\"sync\"`` elsewhere.",
        },
    )
    report: bool = field(
        default=True,
        metadata={
            "group": "alerts",
            "doc": "At the end of fit (and when failing fast), diagnose the run (``findings``) and write "
            "``gradient_health_report.md`` / ``.json`` on rank zero, with a summary on the console.",
        },
    )
    report_dir: str | Path | None = field(
        default=None,
        metadata={
            "group": "alerts",
            "doc": "Where the report goes; default: the first logger's ``log_dir``, else ``default_root_dir``.",
        },
    )
    activation_stats_every_n_steps: int | None = field(
        default=None,
        metadata={
            "group": "watched",
            "doc": "Opt-in activation statistics every this many optimizer steps (e.g. 100): forward hooks on ReLU, "
            "LeakyReLU, GELU, SiLU, Sigmoid and Tanh modules for that step only (dead units, zero activations, "
            "saturation), summed across ranks with torchmetrics, one more transfer on those steps.",
        },
    )
    histogram_every_n_steps: int | None = field(
        default=None,
        metadata={
            "group": "watched",
            "doc": "Per-layer gradient histograms (``grad_hist/<layer>``, computed on the device) every this many "
            "optimizer steps (e.g. 500), to TensorBoard and W&B loggers; off by default (a pass over every gradient).",
        },
    )
    figure_every_n_steps: int | Literal["auto"] | None = field(
        default="auto",
        metadata={
            "group": "watched",
            "doc": "The gradient-flow figure (``grad_health/gradient_flow``: per-layer gradient norm against depth on "
            "a log axis, the unhealthy layers coloured and named), to TensorBoard, W&B and MLflow loggers. "
            "``\"auto\"`` (default): at the first computed step, then whenever the figures so far took at most 0.1% "
            "of the run's wall time, and for the last record at the end of fit, coloured by the diagnosis. An int: on "
            "computed steps that are multiples of it, and at the end. ``None``: no figure.",
        },
    )
    verbose: bool = field(
        default=True,
        metadata={
            "group": "alerts",
            "doc": "``False`` prints no alert line (alerts are still counted, passed to ``on_alert`` and reported).",
        },
    )
    replay_nonfinite: bool = field(
        default=True,
        metadata={
            "group": "safety",
            "doc": "On a failing step, re-run ``training_step`` on the failing (micro-)batch with the RNG state of its "
            "start and hooks on every module, and name the module where the NaN/Inf was born (automatic "
            "optimization, unsharded models).",
        },
    )
    update_ratio: bool = field(
        default=False,
        metadata={
            "group": "watched",
            "doc": "Log ``update_ratio/<layer>`` (``‖Δθ‖ / ‖θ‖`` of the step before each logged step; one copy of "
            "the watched parameters held for one step in every ``log_every_n_steps``).",
        },
    )
    grad_cosine: bool = field(
        default=False,
        metadata={
            "group": "watched",
            "doc": "Log ``grad_health/grad_cosine`` (cosine between consecutive steps' gradients; one copy of the "
            "gradients held for one step in every ``log_every_n_steps``).",
        },
    )
    noise_scale: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "group": "watched",
            "doc": "Log ``grad_health/noise_scale``, the gradient noise scale (McCandlish et al., 2018), with no "
            "extra backward. ``\"auto\"`` (default): under gradient accumulation, from the first micro-batch's "
            "gradient against the accumulated one (free). ``True``: also under DDP without accumulation, from each "
            "rank's gradient against the averaged one, read by a communication hook (a Python hook then replaces "
            "DDP's C++ all-reduce on every step). ``False``: off.",
        },
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={
            "group": "watched",
            "doc": "Examples per backward pass and rank, for the noise scale; ``None``: the first dimension of the "
            "batch's first tensor.",
        },
    )
    recover: bool | Recovery = field(
        default=False,
        metadata={
            "group": "safety",
            "doc": "Recovery without a restart: ``False`` (default), ``True`` or a "
            ":class:`~lightning_gradhealth.Recovery`. Snapshots of the training state are kept in host memory; a "
            "failure that skipping one update does not cure (non-finite steps again and again, an absurd update, a "
            "diverging loss) rolls back to the last trusted one, skips the batches in between and backs the learning "
            "rate off (``docs/recovery.md``).",
        },
    )
    pipeline_group: Any = field(
        default=None,
        metadata={
            "group": "watched",
            "doc": "Pipeline parallelism: the process group of the ranks holding the other stages of this rank's "
            "model (e.g. ``mesh[\"pp\"].get_group()``). The global norm, the guard and clipping then cover every "
            "stage, and rank zero logs every stage's layers (docs/distributed.md). ``None``: every rank holds the "
            "whole model.",
        },
    )

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        check_int("log_every_n_steps", self.log_every_n_steps, minimum=1, allow_none=True)
        set_(self, "group_by", check_group_by("group_by", self.group_by))
        set_(self, "norm_type", check_norm_type("norm_type", self.norm_type))
        set_(self, "include", check_regex("include", self.include))
        set_(self, "exclude", check_regex("exclude", self.exclude))
        check_type("per_layer", self.per_layer, bool, "a bool")
        check_choice("stats", self.stats, ("basic", "full"))
        if self.thresholds is not None:
            check_type("thresholds", self.thresholds, Thresholds, "a lightning_gradhealth.Thresholds or None")
        if self.on_alert is not None and not callable(self.on_alert):
            raise TypeError(f"`on_alert` must be None or a callable (alert) -> Any, got {self.on_alert!r}.")
        check_int("alert_window", self.alert_window, minimum=1)
        check_choice("on_nonfinite", self.on_nonfinite, ("raise", "skip", "warn", None))
        check_int("max_consecutive_skips", self.max_consecutive_skips, minimum=1)
        check_int("amp_max_consecutive_overflows", self.amp_max_consecutive_overflows, minimum=1)
        check_float("amp_min_scale", self.amp_min_scale, low=0)
        self._check_clip()
        if self.spike_z_thresh is None and (self.on_spike != "warn" or self.spike_dir is not None):
            raise ValueError(
                "`on_spike` and `spike_dir` need spike detection: got `spike_z_thresh=None` with "
                f"`on_spike={self.on_spike!r}`, `spike_dir={self.spike_dir!r}`."
            )
        check_float("spike_z_thresh", self.spike_z_thresh, low=0, low_open=True, allow_none=True)
        check_int("spike_warmup_steps", self.spike_warmup_steps, minimum=1)
        check_choice("on_spike", self.on_spike, ("warn", "skip", "raise"))
        check_choice("guard_mode", self.guard_mode, ("auto", "sync", "deferred"))
        for name in ("spike_dir", "report_dir"):
            value = getattr(self, name)
            if value is not None:
                check_type(name, value, (str, Path), "None, a str or a pathlib.Path")
                set_(self, name, check_writable_dir(name, value))
        check_type("report", self.report, bool, "a bool")
        check_type("verbose", self.verbose, bool, "a bool")
        noise = self.noise_scale
        if not isinstance(noise, bool) and not (isinstance(noise, str) and noise == "auto"):
            raise ValueError(f"`noise_scale` must be one of True | False | 'auto', got {self.noise_scale!r}.")
        for name in ("replay_nonfinite", "update_ratio", "grad_cosine"):
            check_type(name, getattr(self, name), bool, "a bool")
        check_int("micro_batch_size", self.micro_batch_size, minimum=1, allow_none=True)
        for name in ("activation_stats_every_n_steps", "histogram_every_n_steps"):
            check_int(name, getattr(self, name), minimum=1, allow_none=True)
        figures = self.figure_every_n_steps
        if figures != "auto" and figures is not None:
            check_type("figure_every_n_steps", figures, int, "'auto', an int >= 1 or None")
            if figures < 1:
                raise ValueError(f"`figure_every_n_steps` must be 'auto', an int >= 1 or None, got {figures!r}.")
        if recovery_from(self.recover) is not None and self.guard_mode == "deferred":
            raise ValueError(
                "`recover` rolls back before the update, which needs the verdict at once: `guard_mode` must be 'auto' "
                f"or 'sync' with it, got guard_mode={self.guard_mode!r}."
            )

    def _check_clip(self) -> None:
        check_choice("clip", self.clip, (None, *CLIP_DEFAULTS))
        check_float("max_norm", self.max_norm, low=0, low_open=True, allow_none=True)
        check_float("clip_value", self.clip_value, low=0, low_open=True, allow_none=True)
        check_float("agc_clip_factor", self.agc_clip_factor, low=0, low_open=True, allow_none=True)
        check_float("agc_eps", self.agc_eps, low=0, low_open=True, allow_none=True)
        check_float("autoclip_percentile", self.autoclip_percentile, low=0, high=100, allow_none=True)
        check_int("autoclip_history", self.autoclip_history, minimum=1, allow_none=True)
        check_float("zclip_alpha", self.zclip_alpha, low=0, high=1, low_open=True, allow_none=True)
        check_float("zclip_z_thresh", self.zclip_z_thresh, low=0, low_open=True, allow_none=True)
        check_int("zclip_warmup_steps", self.zclip_warmup_steps, minimum=1, allow_none=True)
        for owner, params in CLIP_DEFAULTS.items():
            for name in params:
                value = getattr(self, name)
                if value is not None and owner != self.clip:
                    raise ValueError(
                        f"`{name}` only applies to `clip={owner!r}`, got `{name}={value!r}` with `clip={self.clip!r}`."
                    )
        if self.clip == "value" and self.clip_value is None:
            raise ValueError("`clip_value` must be a float > 0 when `clip='value'`, got None.")
        if self.clip is not None and self.norm_type != 2.0:
            raise ValueError(
                f"`clip={self.clip!r}` needs `norm_type` 2.0: the clippers' thresholds, histories and the logged "
                f"`grad_health/clipped_norm` are L2 norms, and they come from the monitor's global norm; got "
                f"`norm_type`={self.norm_type!r}."
            )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in constructor order."""
        return tuple(f.name for f in fields(cls))

    @property
    def guards_every_step(self) -> bool:
        """Whether something must act on every optimizer step (the guard: one foreach norm, one transfer)."""
        return (
            self.on_nonfinite is not None
            or self.clip is not None
            or self.spike_z_thresh is not None
            or self.recovery is not None
        )

    @cached_property
    def recovery(self) -> Recovery | None:
        """``recover`` as a :class:`~lightning_gradhealth.config.recovery.Recovery`, or ``None`` when it is off."""
        return recovery_from(self.recover)

    def clip_args(self) -> dict[str, Any]:
        """The chosen clipper's parameters, defaults filled in (empty without ``clip``)."""
        if self.clip is None:
            return {}
        return {
            name: default if getattr(self, name) is None else getattr(self, name)
            for name, default in CLIP_DEFAULTS[self.clip].items()
        }

    def pattern(self, name: Literal["include", "exclude"]) -> str | None:
        """The regex source of ``include``/``exclude`` (for messages and keys)."""
        value = getattr(self, name)
        return getattr(value, "pattern", None)
