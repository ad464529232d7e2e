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
from pathlib import Path
from typing import Any, Literal

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
    """Everything that configures gradient health monitoring (see ``GradientHealthMonitor`` for each argument).

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument has an invalid value, or the arguments contradict each other.
    """

    log_every_n_steps: int | None = None
    group_by: Literal["module", "parameter"] | Callable[[str], str] = "module"
    norm_type: float = 2.0
    include: str | re.Pattern[str] | None = None
    exclude: str | re.Pattern[str] | None = None
    per_layer: bool = True
    stats: Literal["basic", "full"] = "basic"
    thresholds: Thresholds | None = field(default_factory=Thresholds)
    on_alert: Callable[[Alert], Any] | None = None
    alert_window: int = 100
    on_nonfinite: Literal["raise", "skip", "warn"] | None = "raise"
    max_consecutive_skips: int = 5
    amp_max_consecutive_overflows: int = 20
    amp_min_scale: float = 1.0
    clip: ClipKind | None = None
    max_norm: float | None = None
    clip_value: float | None = None
    agc_clip_factor: float | None = None
    agc_eps: float | None = None
    autoclip_percentile: float | None = None
    autoclip_history: int | None = None
    zclip_alpha: float | None = None
    zclip_z_thresh: float | None = None
    zclip_warmup_steps: int | None = None
    spike_z_thresh: float | None = 6.0
    spike_warmup_steps: int = 50
    on_spike: Literal["warn", "skip", "raise"] = "warn"
    spike_dir: str | Path | None = None
    guard_mode: Literal["auto", "sync", "deferred"] = "auto"
    report: bool = True
    report_dir: str | Path | None = None
    activation_stats_every_n_steps: int | None = None
    histogram_every_n_steps: int | None = None
    figure_every_n_steps: int | Literal["auto"] | None = "auto"
    verbose: bool = True
    replay_nonfinite: bool = True
    update_ratio: bool = False
    grad_cosine: bool = False
    noise_scale: bool | Literal["auto"] = "auto"
    micro_batch_size: int | None = None
    pipeline_group: Any = None  # pipeline parallelism: the process group across the stages (docs/distributed.md)

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
                set_(self, name, Path(value))
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
        return self.on_nonfinite is not None or self.clip is not None or self.spike_z_thresh is not None

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
