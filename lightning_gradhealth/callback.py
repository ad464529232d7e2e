"""The Lightning callback: decides *when* statistics are taken, what is done about them and where they go.

No maths here: statistics come from :mod:`~lightning_gradhealth.engine`, checks from
:mod:`~lightning_gradhealth.checks`, decisions from :mod:`~lightning_gradhealth.safety`, clipping from
:mod:`~lightning_gradhealth.clipping` and spike tests from :mod:`~lightning_gradhealth.spikes`.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.activations import ActivationStats
from lightning_gradhealth.alerts import Alert, AlertManager
from lightning_gradhealth.checks import check_global_norm, check_record
from lightning_gradhealth.clipping import AGCClipper, AutoClipper, Clipper, NormClipper, ValueClipper, ZClipper
from lightning_gradhealth.distributed import (
    Reduction,
    check_sharding,
    fsdp1_reduction,
    local,
    resolve,
    shards_of,
)
from lightning_gradhealth.engine import GradStatsEngine, NonFiniteTracker, PendingStats, StepMeta, stat_grads
from lightning_gradhealth.errors import GradientHealthError
from lightning_gradhealth.fixes import FIXES
from lightning_gradhealth.history import History
from lightning_gradhealth.layout import ParamLayout, build_layout, clean_name, layer_name
from lightning_gradhealth.metrics import SUMMARY_KEYS, record_to_metrics, summary_metrics
from lightning_gradhealth.record import StepStats
from lightning_gradhealth.report import console_summary, write_report
from lightning_gradhealth.rules import Finding, diagnose
from lightning_gradhealth.safety import NonFinitePolicy, format_nonfinite_message
from lightning_gradhealth.sinks import write_metrics
from lightning_gradhealth.spikes import SpikeDetector
from lightning_gradhealth.thresholds import Severity, Thresholds
from lightning_gradhealth.validation import (
    check_choice,
    check_float,
    check_group_by,
    check_int,
    check_norm_type,
    check_regex,
    check_type,
)
from lightning_gradhealth.visuals import custom_scalars_layout, gradient_flow_figure, write_histograms

__all__ = ["GradientHealthMonitor"]

_SPARSE_MODULES = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class _OptimizerWatch:
    """What is watched of one optimizer's parameters, and what its layout was built from."""

    layout: ParamLayout
    groups: tuple[tuple[int, int], ...]  # its parameter groups' lists (by identity) and lengths
    param_ids: tuple[int, ...]  # its parameters, by identity
    optimizer: weakref.ReferenceType[Optimizer]  # (an id can be reused once an optimizer is gone)
    frozen: tuple[torch.Tensor, ...]  # its frozen parameters that would be watched once unfrozen


def _groups(optimizer: Optimizer) -> tuple[tuple[int, int], ...]:
    """Each parameter group's list (by identity) and length: cheap enough for every step."""
    return tuple((id(group["params"]), len(group["params"])) for group in optimizer.param_groups)


def _param_ids(optimizer: Optimizer) -> tuple[int, ...]:
    return tuple(id(p) for group in optimizer.param_groups for p in group["params"])


def _trainable_ids(pl_module: nn.Module) -> tuple[int, ...]:
    """The trainable parameters, by identity (the layouts hold the watched ones, so their ids are not reused)."""
    return tuple(id(p) for p in pl_module.parameters() if p.requires_grad)


ClipKind = Literal["norm", "value", "agc", "autoclip", "zclip"]


class GradientHealthMonitor(Callback):
    r"""Log correct, nearly free gradient statistics of every optimizer step to the trainer's loggers.

    Statistics are taken in ``on_before_optimizer_step``: gradients are accumulated over
    ``accumulate_grad_batches``, unscaled (a GradScaler's loss scale is divided out, also for fused optimizers
    that unscale inside their step) and taken *before* any clipping. Only steps that the Trainer logs are
    computed (``log_every_n_steps``), so a step that is not logged costs nothing. A computed step runs a few
    foreach kernels on the gradients' device and makes exactly one device-to-host transfer; exact NaN/Inf
    counts are taken only when the global norm is non-finite.

    Example::

        from lightning import Trainer
        from lightning_gradhealth import GradientHealthMonitor

        trainer = Trainer(callbacks=[GradientHealthMonitor()])

    Logged metrics (``<layer>`` is a layer name, see ``group_by``; with several optimizers every key ends in
    ``/opt<index>``):

    - ``grad_health/total_norm``: the true global gradient norm (not a sum of layer norms).
    - ``grad_health/param_norm``: the global parameter norm.
    - ``grad_health/zero_frac``: fraction of exactly-zero gradient entries.
    - ``grad_health/nan_count``, ``grad_health/inf_count``: NaN / ±Inf gradient entries.
    - ``grad_health/layer_norm_ratio``: largest over smallest layer gradient norm ("layer variance").
    - ``grad_health/no_grad_count``: trainable parameters that received no gradient.
    - ``grad_health/post_clip_norm``: global norm after the Trainer's ``gradient_clip_val`` (only when set).
    - ``grad_health/amp_scale``: the GradScaler's loss scale (only under ``16-mixed`` with a scaler).
    - ``grad_norm/<layer>``: the layer's gradient norm.
    - ``grad_ratio/<layer>``: ``||g|| / (||θ|| + 1e-8)`` for the layer.
    - ``grad_zero_frac/<layer>``: fraction of exactly-zero gradient entries in the layer.
    - ``grad_nan/<layer>``, ``grad_inf/<layer>``: NaN / Inf entries (only on steps where they are non-zero).
    - ``grad_max/<layer>``, ``grad_min/<layer>``, ``grad_mean/<layer>``, ``grad_std/<layer>``: largest
      ``|g|``, smallest non-zero ``|g|``, mean and standard deviation (only with ``stats="full"``).
    - ``grad_health/alerts``: alerts raised so far (including those held back by the rate limit).
    - ``grad_health/skipped_steps``: updates skipped so far (``on_nonfinite="skip"`` or ``on_spike="skip"``).
    - ``grad_health/amp_overflow``: GradScaler overflow steps so far (only with a scaler).
    - ``grad_health/spikes``: gradient-norm spikes detected so far (only with spike detection on).
    - ``grad_health/clip_coef``: the global clipping coefficient of the step (norm-based clippers).
    - ``grad_health/clipped_norm``: the global norm after our clipping.
    - ``grad_health/clip_frac``: fraction of optimizer steps clipped so far.
    - ``act_dead_frac/<module>``, ``act_zero_frac/<module>``: fraction of an activation module's units that are
      zero for the whole sampled batch, and of its outputs that are zero (``activation_stats_every_n_steps``).
    - ``act_saturated_frac/<module>``: fraction of a sigmoid/tanh module's outputs that are saturated (same).

    Safety, on *every* optimizer step (one foreach norm and one transfer on steps that are not logged): a
    non-finite gradient is caught at the step it appears (``on_nonfinite``), gradient-norm spikes are detected
    (``spike_z_thresh``), threshold checks raise rate-limited alerts (``thresholds``), and the gradient can be
    clipped (``clip``) after the statistics are taken. Parameters are checked through their gradients on every
    step (a non-finite weight makes the next gradient non-finite) and directly on logged and failing steps.

    The watched parameters follow the run: an optimizer that is new, gains or loses parameters, or has a frozen
    parameter unfrozen is seen at its next step; parameters frozen or unfrozen outside the optimizers (e.g. by
    ``BackboneFinetuning`` before it adds them) at the first batch of every epoch and on every logged step. A change
    is announced once, spike detection and adaptive clipping start their statistics over, and the checkpoint
    remembers what was watched.

    Distributed runs need nothing extra: under DDP the record is computed on every rank from the averaged gradient
    and decisions come from a global norm averaged over the ranks; under ``ModelParallelStrategy`` (FSDP2) and
    ``FSDPStrategy`` (FSDP1, ``use_orig_params=True``) the statistics of the local shards are combined with one
    collective per computed step, equal to an unsharded run. Only rank zero logs and writes. DeepSpeed ZeRO >= 1 is
    refused at setup (its gradients are not on the parameters).

    The summary keys (``grad_health/*``) also go into ``trainer.callback_metrics`` on every rank, so
    ``EarlyStopping(monitor="grad_health/total_norm")`` and ``ModelCheckpoint`` can use them. The latest record
    is :attr:`last_record`.

    Args:
        log_every_n_steps: Compute and log every this many optimizer steps, on the same step values as the
            Trainer's own scalars. ``None`` follows ``Trainer(log_every_n_steps=...)``.
        group_by: ``"module"`` (a layer is the module that directly owns the parameters: ``net.0`` gathers
            ``net.0.weight`` and ``net.0.bias``), ``"parameter"``, or a callable mapping a parameter name to a
            layer name. Layers are kept in model definition order.
        norm_type: Norm order: any float ``>= 1`` or ``float("inf")``.
        include: Only watch parameters whose name matches this regex (``re.search``).
        exclude: Ignore parameters whose name matches this regex.
        per_layer: ``False`` logs only the global metrics (for very large models, where per-layer keys
            dominate the cost of logging).
        stats: ``"basic"`` or ``"full"`` (adds max, min non-zero, mean and std of the gradient per layer; a few
            extra kernels and one ``|g|`` temporary per tensor).

        thresholds: Alert thresholds (:class:`~lightning_gradhealth.thresholds.Thresholds`); ``None``: no
            threshold alerts.
        on_alert: Called with each emitted :class:`~lightning_gradhealth.alerts.Alert` on rank zero (a pager or
            chat hook). Alerts also go to the ``lightning_gradhealth`` Python logger.
        alert_window: An alert of a given kind and layer is emitted at most once per this many steps; the
            others are counted and reported with the next one.
        on_nonfinite: What a non-finite gradient does when no GradScaler is active: ``"raise"`` a
            :class:`~lightning_gradhealth.errors.GradientHealthError` naming the layers (after logging the step and
            flushing the loggers), ``"skip"`` the update (gradients set to ``None``), or ``"warn"``. ``None`` turns
            the per-step guard off: non-finite steps are then only seen (and recorded) on logged steps, and with
            ``clip=None`` and ``spike_z_thresh=None`` a step that is not logged runs no torch operation at all.
        max_consecutive_skips: With ``"skip"``, raise after this many skipped steps in a row.
        amp_max_consecutive_overflows: Under a GradScaler, overflows are the scaler's business (it skips the
            step); raise after this many in a row.
        amp_min_scale: Under a GradScaler, raise when an overflow happens with the loss scale below this (the
            unscaled gradients themselves overflow: an explosion, not an AMP transient).
        clip: ``None`` or the clipper applied after the statistics: ``"norm"`` (``max_norm``), ``"value"``
            (``clip_value``), ``"agc"`` (unit-wise adaptive clipping), ``"autoclip"`` (percentile of the norm
            history), ``"zclip"`` (z-score against an EMA of the norm).
        max_norm: Global L2 norm for ``clip="norm"`` (1.0). Each clipper parameter is refused with another
            ``clip`` (it would do nothing).
        clip_value: Bound for ``clip="value"``.
        agc_clip_factor: AGC's λ (NFNets, timm: 0.01).
        agc_eps: AGC's floor on the unit weight norm (1e-3).
        autoclip_percentile: AutoClip's percentile of the norm history (10).
        autoclip_history: How many recent norms AutoClip keeps.
        zclip_alpha: ZClip's EMA factor (0.97).
        zclip_z_thresh: ZClip's z-score threshold (2.5).
        zclip_warmup_steps: Steps ZClip collects norms before clipping (25).
        spike_z_thresh: Spike detection: a global norm whose log lies more than this many EMA standard deviations
            above the EMA mean is a spike (6, as OLMo-core's step skipping). ``None`` turns detection off.
        spike_warmup_steps: Finite steps observed before spike detection starts.
        on_spike: ``"warn"``, ``"skip"`` the update, or ``"raise"``.
        spike_dir: If set, the batches of a spiking step are saved there (``torch.save``) to reproduce it.
        report: At the end of fit (and when failing fast), diagnose the run (:attr:`findings`) and write
            ``gradient_health_report.md`` / ``.json`` on rank zero, with a summary on the console.
        report_dir: Where the report goes; default: the first logger's ``log_dir``, else ``default_root_dir``.
        histogram_every_n_steps: Per-layer gradient histograms (``grad_hist/<layer>``, computed on the device) every
            this many optimizer steps, to TensorBoard loggers; off by default (a pass over every gradient).
        figure_every_n_steps: The gradient-flow figure (per-layer norm against depth, log scale;
            ``grad_health/gradient_flow``) on logged steps that are multiples of this; needs matplotlib.
        activation_stats_every_n_steps: Opt-in activation statistics every this many optimizer steps: forward hooks
            on ReLU, LeakyReLU, GELU, SiLU, Sigmoid and Tanh modules for that step only (dead units, zero
            activations, saturation), summed across ranks with torchmetrics, one more transfer on those steps.

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument has an invalid value, or the arguments contradict each other.
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        group_by: Literal["module", "parameter"] | Callable[[str], str] = "module",
        norm_type: float = 2.0,
        include: str | re.Pattern[str] | None = None,
        exclude: str | re.Pattern[str] | None = None,
        per_layer: bool = True,
        stats: Literal["basic", "full"] = "basic",
        thresholds: Thresholds | None = Thresholds(),  # noqa: B008 - frozen dataclass
        on_alert: Callable[[Alert], Any] | None = None,
        alert_window: int = 100,
        on_nonfinite: Literal["raise", "skip", "warn"] | None = "raise",
        max_consecutive_skips: int = 5,
        amp_max_consecutive_overflows: int = 20,
        amp_min_scale: float = 1.0,
        clip: ClipKind | None = None,
        max_norm: float | None = None,
        clip_value: float | None = None,
        agc_clip_factor: float | None = None,
        agc_eps: float | None = None,
        autoclip_percentile: float | None = None,
        autoclip_history: int | None = None,
        zclip_alpha: float | None = None,
        zclip_z_thresh: float | None = None,
        zclip_warmup_steps: int | None = None,
        spike_z_thresh: float | None = 6.0,
        spike_warmup_steps: int = 50,
        on_spike: Literal["warn", "skip", "raise"] = "warn",
        spike_dir: str | Path | None = None,
        report: bool = True,
        report_dir: str | Path | None = None,
        activation_stats_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | None = None,
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        self.group_by = check_group_by("group_by", group_by)
        self.norm_type = check_norm_type("norm_type", norm_type)
        self.include = check_regex("include", include)
        self.exclude = check_regex("exclude", exclude)
        check_type("per_layer", per_layer, bool, "a bool")
        check_choice("stats", stats, ("basic", "full"))
        if thresholds is not None:
            check_type("thresholds", thresholds, Thresholds, "a lightning_gradhealth.Thresholds or None")
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"`on_alert` must be None or a callable (alert) -> Any, got {on_alert!r}.")
        check_int("alert_window", alert_window, minimum=1)
        check_choice("on_nonfinite", on_nonfinite, ("raise", "skip", "warn", None))
        check_int("max_consecutive_skips", max_consecutive_skips, minimum=1)
        check_int("amp_max_consecutive_overflows", amp_max_consecutive_overflows, minimum=1)
        check_float("amp_min_scale", amp_min_scale, low=0)
        check_choice("clip", clip, (None, "norm", "value", "agc", "autoclip", "zclip"))
        check_float("max_norm", max_norm, low=0, low_open=True, allow_none=True)
        check_float("clip_value", clip_value, low=0, low_open=True, allow_none=True)
        check_float("agc_clip_factor", agc_clip_factor, low=0, low_open=True, allow_none=True)
        check_float("agc_eps", agc_eps, low=0, low_open=True, allow_none=True)
        check_float("autoclip_percentile", autoclip_percentile, low=0, high=100, allow_none=True)
        check_int("autoclip_history", autoclip_history, minimum=1, allow_none=True)
        check_float("zclip_alpha", zclip_alpha, low=0, high=1, low_open=True, allow_none=True)
        check_float("zclip_z_thresh", zclip_z_thresh, low=0, low_open=True, allow_none=True)
        check_int("zclip_warmup_steps", zclip_warmup_steps, minimum=1, allow_none=True)
        # a parameter of a clipper that is not the one chosen would silently do nothing: refuse it
        owners = {"max_norm": "norm", "clip_value": "value", "agc_clip_factor": "agc", "agc_eps": "agc",
                  "autoclip_percentile": "autoclip", "autoclip_history": "autoclip", "zclip_alpha": "zclip",
                  "zclip_z_thresh": "zclip", "zclip_warmup_steps": "zclip"}  # fmt: skip
        given = {"max_norm": max_norm, "clip_value": clip_value, "agc_clip_factor": agc_clip_factor,
                 "agc_eps": agc_eps, "autoclip_percentile": autoclip_percentile, "autoclip_history": autoclip_history,
                 "zclip_alpha": zclip_alpha, "zclip_z_thresh": zclip_z_thresh,
                 "zclip_warmup_steps": zclip_warmup_steps}  # fmt: skip
        for name, value in given.items():
            if value is not None and owners[name] != clip:
                raise ValueError(
                    f"`{name}` only applies to `clip={owners[name]!r}`, got `{name}={value!r}` with `clip={clip!r}`."
                )
        if spike_z_thresh is None and (on_spike != "warn" or spike_dir is not None):
            raise ValueError(
                "`on_spike` and `spike_dir` need spike detection: got `spike_z_thresh=None` with "
                f"`on_spike={on_spike!r}`, `spike_dir={spike_dir!r}`."
            )
        check_float("spike_z_thresh", spike_z_thresh, low=0, low_open=True, allow_none=True)
        check_int("spike_warmup_steps", spike_warmup_steps, minimum=1)
        check_choice("on_spike", on_spike, ("warn", "skip", "raise"))
        if spike_dir is not None:
            check_type("spike_dir", spike_dir, (str, Path), "None, a str or a pathlib.Path")
        check_type("report", report, bool, "a bool")
        check_int("activation_stats_every_n_steps", activation_stats_every_n_steps, minimum=1, allow_none=True)
        check_int("histogram_every_n_steps", histogram_every_n_steps, minimum=1, allow_none=True)
        check_int("figure_every_n_steps", figure_every_n_steps, minimum=1, allow_none=True)
        if report_dir is not None:
            check_type("report_dir", report_dir, (str, Path), "None, a str or a pathlib.Path")
        if clip == "value" and clip_value is None:
            raise ValueError("`clip_value` must be a float > 0 when `clip='value'`, got None.")
        if clip is not None and self.norm_type != 2.0:
            raise ValueError(
                f"`clip={clip!r}` needs `norm_type` 2.0: the clippers' thresholds, histories and the logged "
                f"`grad_health/clipped_norm` are L2 norms, and they come from the monitor's global norm; got "
                f"`norm_type`={self.norm_type!r}."
            )
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.stats = stats
        self.thresholds = thresholds
        self.on_nonfinite = on_nonfinite
        self.clip = clip
        self.on_spike = on_spike
        self.spike_dir = None if spike_dir is None else Path(spike_dir)
        self.report = report
        self.activation_stats_every_n_steps = activation_stats_every_n_steps
        self.histogram_every_n_steps = histogram_every_n_steps
        self.figure_every_n_steps = figure_every_n_steps
        self._act: ActivationStats | None = None
        self.report_dir = None if report_dir is None else Path(report_dir)
        self._history = History()
        self.findings: list[Finding] = []
        """The findings of the last report (filled at the end of fit, or when failing fast)."""
        self._engine = GradStatsEngine(norm_type=self.norm_type, stats=stats, per_layer=per_layer)
        self._tracker = NonFiniteTracker()
        self._alerts = AlertManager(window=alert_window, on_alert=on_alert)
        self._policy = NonFinitePolicy(
            on_nonfinite, max_consecutive_skips, amp_max_consecutive_overflows, amp_min_scale
        )
        self._spikes = (
            None if spike_z_thresh is None else SpikeDetector(spike_z_thresh, warmup_steps=spike_warmup_steps)
        )
        self._clipper: Clipper | None = {
            None: lambda: None,
            "norm": lambda: NormClipper(1.0 if max_norm is None else max_norm),
            "value": lambda: ValueClipper(clip_value),  # type: ignore[arg-type]
            "agc": lambda: AGCClipper(
                0.01 if agc_clip_factor is None else agc_clip_factor, 1e-3 if agc_eps is None else agc_eps
            ),
            "autoclip": lambda: AutoClipper(
                10.0 if autoclip_percentile is None else autoclip_percentile,
                10_000 if autoclip_history is None else autoclip_history,
            ),
            "zclip": lambda: ZClipper(
                0.97 if zclip_alpha is None else zclip_alpha,
                2.5 if zclip_z_thresh is None else zclip_z_thresh,
                25 if zclip_warmup_steps is None else zclip_warmup_steps,
            ),
        }[clip]()
        self._layouts: dict[int, _OptimizerWatch] = {}  # per optimizer (by id)
        self._model_layout: ParamLayout | None = None
        self._trainable: tuple[int, ...] | None = None  # ids of the trainable parameters when the layouts were built
        self._trainable_epoch = -1
        # what the running statistics (spikes, adaptive clipping) describe: names (checkpointed) and tensors
        self._watched_names: tuple[str, ...] | None = None
        self._watched_refs: tuple[weakref.ReferenceType[torch.Tensor], ...] | None = None
        self._trainable_at_wrap: frozenset[int] = frozenset()  # DDP: parameters it averages
        self._sparse_found: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()  # sparse grads of no sparse module
        self._sparse_checked: set[int] = set()  # layouts whose gradients were looked at for sparsity
        self._sparse_layers: frozenset[str] = frozenset()
        self._awaiting_clip: dict[int, tuple[StepStats, ParamLayout]] = {}
        self._unlogged: dict[int, dict[str, float]] = {}
        self._warned: set[str] = set()
        self._batch_idx = 0
        self._step_batches: list[Any] = []
        self._steps_seen = 0
        self._clipped_steps = 0
        self._clipped_dev: torch.Tensor | None = None
        self._spike_count = 0
        self._last_clip: dict[str, float] = {}
        self._reduction = Reduction()
        self._fsdp1: Reduction | None = None
        self._sharded = False
        self._trainer: Trainer | None = None
        self.last_record: StepStats | None = None
        """The most recent record (on every rank), or ``None`` before the first computed step."""

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that two monitors (e.g. on different parameter sets) can be checkpointed."""
        return self._generate_state_key(
            log_every_n_steps=self.log_every_n_steps,
            group_by=self.group_by if isinstance(self.group_by, str) else getattr(self.group_by, "__name__", "fn"),
            include=getattr(self.include, "pattern", None),
            exclude=getattr(self.exclude, "pattern", None),
            clip=self.clip,
            stats=self.stats,
            norm_type=self.norm_type,
        )

    # ------------------------------------------------------------------ when
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Reset per-run state; check the configuration against the Trainer's."""
        if stage != "fit":
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, GradientHealthMonitor)]
        if len(monitors) > 1 and monitors[0] is self:
            rank_zero_warn(
                f"{len(monitors)} GradientHealthMonitor callbacks share this Trainer: they log the same keys "
                "(grad_health/*, grad_norm/<layer>, ...) and write the same report file, so their values interleave "
                "in the loggers and the last report wins. Use one monitor (`include`/`exclude` choose what it watches)."
            )
        self._layouts.clear()
        self._model_layout = None
        self._trainable = None
        self._trainable_epoch = -1
        self._sparse_checked.clear()
        # _watched_names/_watched_refs survive: a second fit (or a checkpoint, restored after setup) is compared
        # with what the running statistics describe
        self._awaiting_clip.clear()
        self._unlogged.clear()
        self._tracker.reset()
        self._step_batches.clear()
        self._history = History()
        self.findings = []
        self._trainer = trainer
        if self.clip is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"GradientHealthMonitor(clip={self.clip!r}) and Trainer(gradient_clip_val={trainer.gradient_clip_val})"
                " would clip the gradients twice: keep one of them (set `gradient_clip_val=None` to let the monitor "
                "clip, or `clip=None` to keep Lightning's clipping)."
            )
        self._fsdp1 = None
        self._reduction = self._reduction_for(trainer)
        self._sharded = trainer.world_size > 1 and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def _reduction_for(self, trainer: Trainer) -> Reduction:
        """Which process groups per-rank statistics are combined over, from the Trainer's strategy."""
        strategy = trainer.strategy
        if isinstance(strategy, DeepSpeedStrategy) and (reason := _deepspeed_refusal(strategy)) is not None:
            raise ValueError(reason)
        if isinstance(strategy, FSDPStrategy) and self.clip == "agc":
            raise ValueError(
                "GradientHealthMonitor(clip='agc') needs whole units (rows) of each weight; FSDPStrategy (FSDP1) "
                "shards flattened parameters, so units are cut anywhere. Use ModelParallelStrategy (FSDP2), or another "
                "`clip`."
            )
        if trainer.world_size <= 1 or not torch.distributed.is_initialized():
            return Reduction()
        if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
            # FSDP1: found at the first step, once the model is wrapped (_reduction_at_step); FSDP2: DTensor
            # gradients name their groups in their placements
            return Reduction()
        # DDP and its relatives: every rank holds the same averaged gradient; decisions are averaged over ranks
        return Reduction(replica_group=torch.distributed.group.WORLD)

    def _reduction_at_step(self, trainer: Trainer) -> Reduction:
        if self._fsdp1 is None and isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
            self._fsdp1 = self._reduction = fsdp1_reduction(trainer.strategy.model)  # type: ignore[arg-type]
        return self._reduction

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check that something is watched; find the layers whose gradients are sparse by design (embeddings)."""
        self._model_layout = self._build_layout(pl_module, None)
        self._trainable = _trainable_ids(pl_module)
        self._trainable_at_wrap = frozenset(self._trainable)  # the strategy wrapped the model before this hook
        frozen = build_layout(
            pl_module.named_parameters(),
            include=self.include,
            exclude=self.exclude,
            sparse_grads=self._sparse_params(pl_module),
            frozen=True,
        )
        self._refuse_sparse(frozen)  # a frozen sparse embedding would be refused when it is unfrozen: now instead
        if not len(self._model_layout) and len(frozen):
            rank_zero_warn(
                "GradientHealthMonitor watches nothing yet: the parameters `include`/`exclude` select are all frozen "
                f"({', '.join(frozen.param_names[:5])}{' ...' if len(frozen) > 5 else ''}); they are watched once "
                "they are unfrozen."
            )
        elif not len(self._model_layout):
            names = [n for n, p in pl_module.named_parameters() if p.requires_grad][:5]
            raise ValueError(
                "GradientHealthMonitor watches no parameter: no trainable parameter passes `include`="
                f"{getattr(self.include, 'pattern', None)!r} and `exclude`={getattr(self.exclude, 'pattern', None)!r}"
                f" (trainable parameters start with {names})."
            )
        check_sharding(self._model_layout.param_names, self._model_layout.params)  # before a step is spent
        if self._watched_names is None and self._steps_seen > 0:
            # a checkpoint from before the watched set was saved: take what is watched now as what it described
            self._rebuild(trainer, pl_module)
        if self.activation_stats_every_n_steps is not None:
            self._act = ActivationStats(pl_module)
        sparse = set()
        for mod_name, module in pl_module.named_modules():
            if isinstance(module, _SPARSE_MODULES):
                for p_name, _ in module.named_parameters(recurse=False):
                    sparse.add(layer_name(clean_name(f"{mod_name}.{p_name}" if mod_name else p_name), self.group_by))
        self._sparse_layers = frozenset(sparse)

    def _every(self, trainer: Trainer) -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    @staticmethod
    def _log_step(trainer: Trainer) -> int:
        # The step value Lightning itself logs training scalars at (counts optimizer steps).
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)

    def _should_compute(self, trainer: Trainer) -> bool:
        if trainer.fast_dev_run:
            return True
        return _due(self._log_step(trainer), self._every(trainer))

    @property
    def _guards_every_step(self) -> bool:
        # The per-step guard (one foreach norm, one transfer) runs when something must act on every step.
        return self.on_nonfinite is not None or self._clipper is not None or self._spikes is not None

    def _tracks_micro_batches(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        return trainer.accumulate_grad_batches > 1 or not pl_module.automatic_optimization

    def _tensorboards(self, trainer: Trainer) -> list[Any]:
        """The SummaryWriters of the TensorBoard loggers (rank zero only)."""
        if not trainer.is_global_zero:
            return []
        return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give TensorBoard a custom-scalars layout grouping the monitor's charts."""
        for writer in self._tensorboards(trainer):
            writer.add_custom_scalars(custom_scalars_layout(list(SUMMARY_KEYS)))
        visuals = self.histogram_every_n_steps is not None or self.figure_every_n_steps is not None
        others = [type(lg).__name__ for lg in trainer.loggers if not isinstance(lg, TensorBoardLogger)]
        if visuals and others:
            rank_zero_info(
                f"GradientHealthMonitor: histograms and figures go to TensorBoard loggers only; skipped for {others}."
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the batch index (and, with ``spike_dir``, the batch) for the record."""
        self._batch_idx = batch_idx
        if trainer.current_epoch != self._trainable_epoch:  # after every callback's on_train_epoch_start
            self._check_trainable(trainer, pl_module)
        if self._act is not None and _due(self._log_step(trainer), self.activation_stats_every_n_steps):
            self._act.attach()
        if self.spike_dir is not None:
            self._step_batches.append(batch)

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Under accumulation, note on the device whether this micro-batch made the gradient non-finite."""
        if not self._tracks_micro_batches(trainer, pl_module):
            return
        if not (self._guards_every_step or self._should_compute(trainer)):
            return
        if self._model_layout is None:
            self._model_layout = self._build_layout(pl_module, None)
        self._tracker.observe(self._model_layout)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Check, measure, decide and clip, on the accumulated, unscaled, pre-clip gradient of this step."""
        self._flush_pending()
        if self._act is not None and self._act.attached:
            self._read_activations(trainer)
        logged = self._should_compute(trainer)
        if not (logged or self._guards_every_step):
            self._end_step()
            return
        opt_idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        if logged:
            self._check_trainable(trainer, pl_module)
        layout = self._layout_for(trainer, pl_module, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        grad_scale = scale if fused else None
        red = self._reduction_at_step(trainer)
        pending = (
            self._engine.compute(layout, grad_scale, red) if logged else self._engine.guard(layout, grad_scale, red)
        )
        if pending is None:
            if len(layout):
                self._warn_once(
                    "no-grad-at-all",
                    "GradientHealthMonitor: no watched parameter has a gradient at this "
                    "optimizer step; nothing is recorded for it.",
                )
            else:
                self._warn_once(
                    "nothing-watched",
                    "GradientHealthMonitor: this optimizer has no parameter to watch at this step (all frozen, or "
                    "left out by `include`/`exclude`); nothing is recorded for it until one trains.",
                )
            self._end_step()
            return
        self._add_extras(pending, scale)
        meta = StepMeta(
            step=self._log_step(trainer),
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            batch_idx=self._batch_idx,
            optimizer_idx=opt_idx,
        )
        record: StepStats | None = None
        if logged:
            record = self._engine.finish(pending, meta)
            total = record.total_norm
        else:
            total, _ = self._engine.read_guard(pending)
        self._steps_seen += 1
        self._visuals(trainer, layout, grad_scale, meta.step, record, red)
        skip = False

        def full_record() -> StepStats:
            # a guarded step that fails gets the full statistics with exact counts (rare: extra transfers)
            nonlocal record
            if record is None:
                full = self._engine.compute(layout, grad_scale, red)
                assert full is not None
                self._add_extras(full, scale)
                record = self._engine.finish(full, meta)
            return record

        if not math.isfinite(total):
            full_record()
            assert record is not None
            if self.on_nonfinite is not None or scaler is not None:
                skip = self._on_nonfinite(trainer, record, amp=scaler is not None)
        else:
            if self._spikes is not None:
                skip = self._on_spike(trainer, meta, total, full_record)
            if not skip:
                self._policy.finite()
            if self.thresholds is not None:
                for alert in check_global_norm(
                    total,
                    meta.step,
                    self.thresholds,
                    steps_seen=self._steps_seen,
                    epoch=meta.epoch,
                    batch_idx=meta.batch_idx,
                ):
                    self._alert(trainer, alert)
        if skip:
            for group in optimizer.param_groups:  # all of the optimizer's parameters, watched or not
                for p in group["params"]:
                    p.grad = None
        elif self._clipper is not None and math.isfinite(total):
            self._apply_clip(layout, grad_scale, total, logged, red)

        if record is not None:
            if self.thresholds is not None:
                for alert in check_record(
                    record, self.thresholds, steps_seen=self._steps_seen, sparse_layers=self._sparse_layers
                ):
                    self._alert(trainer, alert)
            self._hand_over(trainer, pl_module, optimizer, record, layout)
        self._end_step()

    def _visuals(
        self,
        trainer: Trainer,
        layout: ParamLayout,
        grad_scale: torch.Tensor | None,
        step: int,
        record: StepStats | None,
        reduction: Reduction,
    ) -> None:
        """Histograms and the gradient-flow figure, pre-clip, to TensorBoard on rank zero."""
        if self.histogram_every_n_steps is None and self.figure_every_n_steps is None:
            return  # the hot path: nothing to draw
        writers = self._tensorboards(trainer)
        # sharded: every rank takes part in the histograms' collectives (a condition the same on every rank)
        joins = self._sharded and any(isinstance(lg, TensorBoardLogger) for lg in trainer.loggers)
        if not (writers or joins):
            return
        if _due(step, self.histogram_every_n_steps):
            histograms = self._engine.histograms(layout, grad_scale=grad_scale, reduction=reduction)
            for writer in writers:
                write_histograms(writer, histograms, step)
        if not writers:
            return
        if record is not None and record.layers and _due(step, self.figure_every_n_steps):
            try:
                figure = gradient_flow_figure(record)
            except ImportError:
                self.figure_every_n_steps = None
                rank_zero_warn(
                    "GradientHealthMonitor: figures need matplotlib (pip install lightning-gradhealth[plots])."
                )
                return
            for writer in writers:
                writer.add_figure("grad_health/gradient_flow", figure, step, close=False)

    def _read_activations(self, trainer: Trainer) -> None:
        assert self._act is not None
        self._act.detach()
        stats = self._act.read()  # collective under DDP: every rank reads
        step = self._log_step(trainer)
        self._history.add_activations(step, stats)
        metrics: dict[str, float] = {}
        for name, (dead, zero, sat) in stats.items():
            metrics[f"act_dead_frac/{name}"] = dead
            metrics[f"act_zero_frac/{name}"] = zero
            if sat is not None:
                metrics[f"act_saturated_frac/{name}"] = sat
        self._unlogged.setdefault(step, {}).update(metrics)

    def _add_extras(self, pending: PendingStats, scale: torch.Tensor | None) -> None:
        if scale is not None:
            pending.extras["amp_scale"] = scale
        if self._tracker.first_bad is not None:
            pending.extras["first_nonfinite_micro_batch"] = self._tracker.first_bad
        # else: a single micro-batch; the engine reports micro-batch 0 for a non-finite step

    def _end_step(self) -> None:
        self._tracker.reset()
        self._step_batches.clear()

    def _hand_over(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer, record: StepStats, layout: ParamLayout
    ) -> None:
        clips = pl_module.automatic_optimization and (
            bool(trainer.gradient_clip_val) or is_overridden("configure_gradient_clipping", pl_module)
        )
        if clips:
            # The Trainer clips right after this hook, inside the optimizer's step; the clipped gradients stay on
            # the parameters until the next batch's zero_grad, so the post-clip norm is read at on_train_batch_end.
            self._awaiting_clip[id(optimizer)] = (record, layout)
        else:
            self._publish(record)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Write this batch's records to the loggers: one write per logger and step (:mod:`.sinks`)."""
        self._flush_pending()
        self._emit(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write anything still buffered, then the Gradient Health Report."""
        self._resolve_clip_count()
        self._flush_pending()
        self._emit(trainer)
        self._write_report(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Write what was computed before the failure, so that nothing already measured is lost."""
        if self._act is not None:
            self._act.detach()
        try:
            # sharded: no collective here (the other ranks may not be failing), so no post-clip norm either
            self._flush_pending(collectives=not self._sharded)
        finally:
            self._emit(trainer)

    # ------------------------------------------------------------------ decisions
    def _on_nonfinite(self, trainer: Trainer, record: StepStats, *, amp: bool) -> bool:
        """Act on a non-finite step. Returns whether to skip the update."""
        decision = self._policy.nonfinite(record.amp_scale if amp else None)
        if decision == "amp_overflow":
            return False  # the scaler skips the update and lowers its scale: normal mixed-precision behaviour
        if decision == "amp_collapse":
            reason = (
                f"GradScaler overflow persists ({self._policy.consecutive_overflows} overflow step(s) in a row, loss "
                f"scale now {record.amp_scale:g}): the gradients overflow fp16 even unscaled"
            )
            self._fail(trainer, record, reason)
        if decision in ("raise", "skip_limit"):
            reason = "Non-finite gradients"
            if decision == "skip_limit":
                reason += f" for {self._policy.consecutive_skips} steps in a row (on_nonfinite='skip')"
            self._fail(trainer, record, reason)
        names = ", ".join(lay.name for lay in record.nonfinite_layers[:5]) or "the global norm"
        action = "update skipped" if decision == "skip" else "update applied (on_nonfinite='warn')"
        what = (
            f"non-finite gradients ({record.nan_count} NaN, {record.inf_count} Inf)"
            if record.nan_count or record.inf_count
            else "finite gradients so large that their norm overflows float32 (exploding)"
        )
        msg = f"{what} in {names}; {action}. Fix: {FIXES['nonfinite'][0]}."
        self._alert_at(trainer, "nonfinite", Severity.CRITICAL, record, msg, float(record.nan_count + record.inf_count))
        return decision == "skip"

    def _on_spike(self, trainer: Trainer, meta: StepMeta, total: float, full_record: Callable[[], StepStats]) -> bool:
        """Test the step's global norm for a spike and act on it. Returns whether to skip the update."""
        assert self._spikes is not None
        z = self._spikes.observe(total)
        if z is None:
            return False
        self._spike_count += 1
        self._history.add_spike(meta.step, z)
        saved = self._save_spike_batches(trainer, meta, total, z)
        msg = (
            f"gradient-norm spike: {total:.3g} is {z:.1f} sigma above its running (log) mean, at step {meta.step} "
            f"(epoch {meta.epoch}, batch {meta.batch_idx})"
            + (f"; batch saved to {saved}" if saved else "")
            + ("; update skipped" if self.on_spike == "skip" else "")
            + f". Fix: {FIXES['spike'][0]}."
        )
        reason = None
        if self.on_spike == "raise":
            reason = f"Gradient-norm spike (z = {z:.1f}, norm {total:.3g})"
        elif self.on_spike == "skip" and self._policy.skipped() == "skip_limit":
            reason = (
                f"Gradient-norm spikes for {self._policy.consecutive_skips} steps in a row (on_spike='skip'; "
                f"norm {total:.3g}, z = {z:.1f}): the gradient scale changed for good"
            )
        if reason is not None:
            self._fail(trainer, full_record(), reason, kind="spike")
        self._alert_at(trainer, "spike", Severity.WARNING, meta, msg, total)
        return self.on_spike == "skip"

    def _save_spike_batches(self, trainer: Trainer, meta: StepMeta, total: float, z: float) -> Path | None:
        if self.spike_dir is None:
            return None
        self.spike_dir.mkdir(parents=True, exist_ok=True)
        path = self.spike_dir / f"spike_step{meta.step}_rank{trainer.global_rank}.pt"
        batches = [_to_cpu(b) for b in self._step_batches]
        torch.save(
            {
                "step": meta.step,
                "global_step": meta.global_step,
                "epoch": meta.epoch,
                "batch_idx": meta.batch_idx,
                "total_norm": total,
                "zscore": z,
                "batches": batches,
            },
            path,
        )
        return path

    def _apply_clip(
        self, layout: ParamLayout, grad_scale: torch.Tensor | None, total: float, logged: bool, reduction: Reduction
    ) -> None:
        assert self._clipper is not None
        present = [p for p in layout.params if p.grad is not None]
        grads: list[torch.Tensor] = [p.grad for p in present]  # type: ignore[misc]
        shards = shards_of(grads, resolve(grads, reduction))
        # sharded gradients are clipped shard by shard (in place, through the local views) with global numbers
        outcome = self._clipper.clip([local(g) for g in grads], [local(p) for p in present], total, grad_scale, shards)
        if outcome.clipped:
            self._clipped_steps += 1
        if outcome.clipped_device is not None:  # value / AGC: counted on the device, read on logged steps
            count = outcome.clipped_device.long()
            self._clipped_dev = count if self._clipped_dev is None else self._clipped_dev + count
        self._last_clip = {}
        if outcome.coef is not None:
            self._last_clip["grad_health/clip_coef"] = outcome.coef
        if outcome.clipped_norm is not None:
            self._last_clip["grad_health/clipped_norm"] = outcome.clipped_norm
        elif outcome.clipped_norm_device is not None and logged:  # value / AGC: one more transfer, logged steps
            post, count = torch.stack([outcome.clipped_norm_device.double(), self._clipped_dev.double()]).tolist()  # type: ignore[union-attr]
            self._last_clip["grad_health/clipped_norm"] = post
            self._clipped_steps += int(count)
            self._clipped_dev = None

    def _resolve_clip_count(self) -> None:
        if self._clipped_dev is not None:
            self._clipped_steps += int(self._clipped_dev.item())
            self._clipped_dev = None

    def _alert(self, trainer: Trainer, alert: Alert) -> None:
        self._alerts(alert, rank_zero=trainer.is_global_zero)

    def _alert_at(
        self,
        trainer: Trainer,
        kind: str,
        severity: Severity,
        at: StepMeta | StepStats,
        message: str,
        value: float | None = None,
    ) -> None:
        """An alert about the step ``at`` (its step, epoch and batch index)."""
        alert = Alert(kind=kind, severity=severity, step=at.step, epoch=at.epoch, batch_idx=at.batch_idx,
                      value=value, message=message)  # fmt: skip
        self._alert(trainer, alert)

    def _fail(self, trainer: Trainer, record: StepStats, reason: str, kind: str = "nonfinite") -> None:
        """Log the step, flush the loggers, raise :class:`GradientHealthError`."""
        trainer_accumulates = trainer.accumulate_grad_batches > 1 or not trainer.lightning_module.automatic_optimization
        message = format_nonfinite_message(record, reason, micro_batches=trainer_accumulates)
        self._alert_at(trainer, kind, Severity.CRITICAL, record, message.splitlines()[0])
        self._publish(record)
        self._emit(trainer)
        self._write_report(trainer)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()
                flush = getattr(getattr(logger, "experiment", None), "flush", None)
                if callable(flush):
                    flush()
        raise GradientHealthError(
            message,
            record=record,
            step=record.step,
            layers=[lay.name for lay in record.nonfinite_layers],
        )

    # ------------------------------------------------------------------ what is watched
    def _layout_for(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> ParamLayout:
        """The optimizer's layout; everything is rebuilt when what it should watch changed.

        Checked on every step, at the cost of the optimizer's parameter groups and of its frozen parameters that
        would be watched: a new optimizer, a parameter group added, removed or given a new list, a parameter
        unfrozen. The first step of a layout also looks for sparse gradients that no sparse module announced
        (``F.embedding(..., sparse=True)`` on a bare parameter).
        """
        watch = self._layouts.get(id(optimizer))
        if (
            watch is None
            or watch.optimizer() is not optimizer
            or watch.groups != _groups(optimizer)
            or any(p.requires_grad for p in watch.frozen)
        ):
            self._rebuild(trainer, pl_module, optimizer)
            watch = self._layouts[id(optimizer)]
        if id(watch.layout) not in self._sparse_checked:
            self._sparse_checked.add(id(watch.layout))
            found = [
                p
                for k, p in enumerate(watch.layout.params)
                if k not in watch.layout.sparse and p.grad is not None and p.grad.is_sparse
            ]
            if found:
                self._sparse_found.update(found)
                self._rebuild(trainer, pl_module, optimizer)
                watch = self._layouts[id(optimizer)]
                self._sparse_checked.add(id(watch.layout))
        return watch.layout

    def _check_trainable(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Rebuild the layouts if parameters were frozen, unfrozen or replaced (one pass over them).

        Runs at the first batch of every epoch (after every callback's epoch-start hook, e.g. Lightning's
        ``BackboneFinetuning``) and on every logged step, where it also compares every optimizer's parameters one
        by one. (Parameters unfrozen inside an optimizer are also seen at its next step, by :meth:`_layout_for`.)
        """
        self._trainable_epoch = trainer.current_epoch
        stale = _trainable_ids(pl_module) != self._trainable or any(
            w.optimizer() is not None and w.param_ids != _param_ids(w.optimizer())  # type: ignore[arg-type]
            for w in self._layouts.values()
        )
        if stale:
            self._rebuild(trainer, pl_module)

    def _rebuild(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer | None = None) -> None:
        """Build every layout afresh; say so, and restart what depended on the old set, when the set changed."""
        self._trainable = _trainable_ids(pl_module)
        self._sparse_checked.clear()  # (the new layouts are looked at on their first step)
        self._model_layout = self._build_layout(pl_module, None)
        check_sharding(self._model_layout.param_names, self._model_layout.params)
        optimizers = list(trainer.optimizers)
        if optimizer is not None and all(opt is not optimizer for opt in optimizers):
            optimizers.append(optimizer)
        self._layouts = {id(opt): self._watch(pl_module, opt) for opt in optimizers}
        watched = {
            id(p): (name, p)
            for w in self._layouts.values()
            for name, p in zip(w.layout.param_names, w.layout.params, strict=True)
        }
        names = tuple(name for name, _ in watched.values())
        tensors = [p for _, p in watched.values()]
        if self._watched_names is not None:
            refs = self._watched_refs
            same_tensors = refs is None or (  # (a checkpoint holds names, not tensors)
                len(refs) == len(tensors) and all(r() is p for r, p in zip(refs, tensors, strict=True))
            )
            if set(names) != set(self._watched_names) or not same_tensors:
                self._watched_changed(trainer, pl_module, self._watched_names, names)
        self._watched_names = names
        self._watched_refs = tuple(weakref.ref(p) for p in tensors)

    def _watch(self, pl_module: LightningModule, optimizer: Optimizer) -> _OptimizerWatch:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        frozen = build_layout(
            pl_module.named_parameters(), include=self.include, exclude=self.exclude, restrict_to=params, frozen=True
        )
        return _OptimizerWatch(
            layout=self._build_layout(pl_module, optimizer),
            groups=_groups(optimizer),
            param_ids=_param_ids(optimizer),
            optimizer=weakref.ref(optimizer),
            frozen=frozen.params,
        )

    def _watched_changed(
        self, trainer: Trainer, pl_module: LightningModule, old: tuple[str, ...], new: tuple[str, ...]
    ) -> None:
        """Say which parameters joined or left; restart the statistics that were about the previous set."""
        old_set, new_set = set(old), set(new)
        added = [name for name in new if name not in old_set]
        removed = [name for name in old if name not in new_set]

        def some(names: list[str]) -> str:
            return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

        changes = ([f"{len(added)} joined ({some(added)})"] if added else []) + (
            [f"{len(removed)} left ({some(removed)})"] if removed else []
        )
        why = "layers frozen or unfrozen, or an optimizer's parameters changed"
        if not changes:
            changes, why = [f"the {len(new)} parameters are other tensors"], "a new model, or layers replaced"
        restarted = (["spike detection"] if self._spikes is not None else []) + (
            [f"{self.clip} clipping"] if isinstance(self._clipper, (AutoClipper, ZClipper)) else []
        )
        rank_zero_info(
            f"GradientHealthMonitor: the watched parameters changed at step {self._log_step(trainer)}: "
            f"{'; '.join(changes)} ({why}). "
            "Every statistic covers the new set from this step"
            + (f"; the running statistics of {' and '.join(restarted)} start over." if restarted else ".")
        )
        added_set = set(added)
        late = [
            clean_name(name)
            for name, p in pl_module.named_parameters()
            if id(p) not in self._trainable_at_wrap and clean_name(name) in added_set
        ]
        if late and isinstance(trainer.strategy, DDPStrategy) and trainer.world_size > 1:
            rank_zero_warn(
                f"GradientHealthMonitor: {len(late)} parameter(s) started training after DistributedDataParallel "
                f"wrapped the model ({some(late)}). DDP only averages the gradients of the parameters that "
                "required a gradient when it wrapped the model, so these are not averaged across ranks: their "
                "replicas drift apart, and their per-layer statistics here are rank 0's own. Create the model with "
                "them trainable (and freeze them through the optimizer instead), or let the strategy wrap it again."
            )
        if self._spikes is not None:
            self._spikes.reset()
        if self._clipper is not None:
            self._clipper.reset()

    def _build_layout(self, pl_module: LightningModule, optimizer: Optimizer | None) -> ParamLayout:
        restrict = None
        if optimizer is not None:
            restrict = [p for group in optimizer.param_groups for p in group["params"]]
        layout = build_layout(
            pl_module.named_parameters(),
            group_by=self.group_by,
            include=self.include,
            exclude=self.exclude,
            restrict_to=restrict,
            sparse_grads=self._sparse_params(pl_module),
        )
        self._refuse_sparse(layout)
        return layout

    def _sparse_params(self, pl_module: LightningModule) -> list[torch.Tensor]:
        """Parameters with sparse gradients: of sparse embedding modules, and any found sparse at a step."""
        declared = [
            p
            for module in pl_module.modules()
            if isinstance(module, _SPARSE_MODULES) and getattr(module, "sparse", False)
            for p in module.parameters(recurse=False)
        ]
        return declared + list(self._sparse_found)

    def _refuse_sparse(self, layout: ParamLayout) -> None:
        if layout.sparse and self.clip in ("value", "agc"):
            names = [layout.param_names[i] for i in sorted(layout.sparse)]
            raise ValueError(
                f"GradientHealthMonitor(clip={self.clip!r}) does not clip sparse gradients (nn.Embedding/EmbeddingBag "
                f"with sparse=True: {names[:5]}): use clip='norm', 'autoclip' or 'zclip', or leave them out with "
                "`exclude`."
            )

    def _flush_pending(self, collectives: bool = True) -> None:
        while self._awaiting_clip:
            _, (record, layout) = self._awaiting_clip.popitem()
            present = layout.with_grad()
            params = [layout.params[i] for i in present]
            grads = stat_grads(layout, present)
            if grads and collectives:  # the second transfer of a step, only when the Trainer clips gradients
                norm = self._engine.global_norm(grads, self._reduction, params=params)  # type: ignore[arg-type]
                record = replace(record, post_clip_norm=norm.item())
            self._publish(record)

    def _publish(self, record: StepStats) -> None:
        self.last_record = record
        self._history.add(record)
        if record.no_grad_params:
            names = ", ".join(record.no_grad_params[:10])
            more = len(record.no_grad_params) - 10
            self._warn_once(
                "no-grad:" + ",".join(record.no_grad_params),
                f"GradientHealthMonitor: {record.no_grad_count} trainable parameter(s) got no gradient at step "
                f"{record.step}: {names}{f' and {more} more' if more > 0 else ''}. They are unused in the forward "
                "pass or detached from the loss; freeze them (requires_grad=False) or check the graph. Counted in "
                "grad_health/no_grad_count.",
            )
        trainer = self._trainer
        several = trainer is not None and len(trainer.optimizers) > 1
        opt_idx = record.optimizer_idx if several else None
        metrics = record_to_metrics(record, opt_idx) if self.per_layer else summary_metrics(record, opt_idx)
        summary = summary_metrics(record, opt_idx)
        safety = self._safety_metrics(trainer)
        metrics.update(safety)
        summary.update(safety)
        self._unlogged.setdefault(record.step, {}).update(metrics)
        if trainer is not None:
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in summary.items()})

    def _safety_metrics(self, trainer: Trainer | None) -> dict[str, float]:
        """Cumulative counters of the safety features (only those that are on)."""
        out = {"grad_health/alerts": float(self._alerts.total)}
        if self.on_nonfinite == "skip" or self.on_spike == "skip":
            out["grad_health/skipped_steps"] = float(self._policy.skipped_steps)
        if trainer is not None and getattr(trainer.precision_plugin, "scaler", None) is not None:
            out["grad_health/amp_overflow"] = float(self._policy.amp_overflows)
        if self._spikes is not None:
            out["grad_health/spikes"] = float(self._spike_count)
        if self._clipper is not None:
            out.update(self._last_clip)
            out["grad_health/clip_frac"] = self._clipped_steps / max(self._steps_seen, 1)
        return out

    def _emit(self, trainer: Trainer) -> None:
        if not self._unlogged:
            return
        batches, self._unlogged = self._unlogged, {}
        if not trainer.is_global_zero:
            return
        for step, metrics in sorted(batches.items()):
            write_metrics(trainer.loggers, metrics, step)

    def _write_report(self, trainer: Trainer) -> None:
        """Diagnose the run; on rank zero write the report next to the logs and print a summary."""
        if not self._history.records_seen:
            return
        self.findings = diagnose(self._history, self.thresholds or Thresholds(), sparse_layers=self._sparse_layers)
        if not self.report or not trainer.is_global_zero:
            return
        directory = self.report_dir
        if directory is None:
            log_dir = next((lg.log_dir for lg in trainer.loggers if getattr(lg, "log_dir", None)), None)
            directory = Path(log_dir if log_dir is not None else trainer.default_root_dir)
        path = write_report(directory, self._history, self.findings, self.thresholds or Thresholds())
        rank_zero_info(console_summary(self.findings, path))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """All running state, so that a resumed run makes the same decisions as an uninterrupted one."""
        self._resolve_clip_count()
        return {
            "warned": sorted(self._warned),
            "steps_seen": self._steps_seen,
            "clipped_steps": self._clipped_steps,
            "spike_count": self._spike_count,
            "policy": self._policy.state_dict(),
            "alerts": self._alerts.state_dict(),
            "spikes": None if self._spikes is None else self._spikes.state_dict(),
            "clipper": None if self._clipper is None else self._clipper.state_dict(),
            "clip": self.clip,
            "watched": None if self._watched_names is None else list(self._watched_names),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._warned = set(state_dict.get("warned", ()))
        watched = state_dict.get("watched")
        self._watched_names = None if watched is None else tuple(watched)
        self._steps_seen = int(state_dict.get("steps_seen", 0))
        self._clipped_steps = int(state_dict.get("clipped_steps", 0))
        self._spike_count = int(state_dict.get("spike_count", 0))
        self._policy.load_state_dict(state_dict.get("policy") or {})
        self._alerts.load_state_dict(state_dict.get("alerts") or {})
        if self._spikes is not None and state_dict.get("spikes") is not None:
            self._spikes.load_state_dict(state_dict["spikes"])
        if self._clipper is not None and state_dict.get("clipper") is not None:
            if state_dict.get("clip", self.clip) != self.clip:
                rank_zero_warn(
                    f"GradientHealthMonitor: the checkpoint was made with clip={state_dict.get('clip')!r}, this run "
                    f"uses clip={self.clip!r}; the clipper starts afresh."
                )
            else:
                self._clipper.load_state_dict(state_dict["clipper"])


def _deepspeed_refusal(strategy: Any) -> str | None:
    """Why the monitor cannot watch a DeepSpeed run (``None`` for ZeRO stage 0, where gradients stay on the params)."""
    config = getattr(strategy, "config", None) or {}
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    if stage < 1:
        return None
    return (
        f"GradientHealthMonitor does not support DeepSpeed ZeRO stage {stage}: under ZeRO >= 1 DeepSpeed moves the "
        "gradients into its own partitioned buffers and `param.grad` is None in `on_before_optimizer_step`. Reading "
        "them through `deepspeed.utils.safe_get_full_grad` would assemble every full gradient on every rank (a "
        "collective per parameter), which this monitor will not do behind your back. Use ZeRO stage 0, or "
        "ModelParallelStrategy (FSDP2) / FSDPStrategy, whose sharded gradients are reduced with one collective."
    )


def _due(step: int, every: int | None) -> bool:
    """Whether logging step ``step`` is one of every ``every`` steps, on the Trainer's own schedule."""
    return every is not None and every > 0 and (step + 1) % every == 0


def _to_cpu(batch: Any) -> Any:
    """A copy of ``batch`` with every tensor detached and on the CPU (for ``torch.save``)."""
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu()
    if isinstance(batch, (list, tuple)):
        return (
            type(batch)(_to_cpu(b) for b in batch)
            if not hasattr(batch, "_fields")
            else type(batch)(*(_to_cpu(b) for b in batch))
        )
    if isinstance(batch, dict):
        return {k: _to_cpu(v) for k, v in batch.items()}
    return batch
