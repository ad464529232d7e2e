"""The Lightning callback: a thin adapter that maps the ``Trainer``'s state onto :class:`~.core.GradientHealth`.

It decides *when* (the Trainer's hooks, its logging schedule, accumulation, ranks) and what the Trainer's state
means (precision plugin, clipping, loggers, log directory, strategy); the core does the rest.
"""

from __future__ import annotations

import importlib
import importlib.abc
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.optim import Optimizer

from lightning_gradhealth.config.options import ClipKind, HealthOptions
from lightning_gradhealth.config.recovery import Recovery
from lightning_gradhealth.config.reference import with_args
from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.core.health import GradientHealth, StepContext, due
from lightning_gradhealth.diagnosis.rules import Finding
from lightning_gradhealth.guard.birth import rng_state
from lightning_gradhealth.model.distributed import Reduction
from lightning_gradhealth.output.pipeline import Frontend
from lightning_gradhealth.output.sinks import guard_loggers
from lightning_gradhealth.schema.alert import Alert
from lightning_gradhealth.schema.errors import UnsupportedSetupError
from lightning_gradhealth.schema.record import StepStats
from lightning_gradhealth.stats.noise import batch_size_of

__all__ = ["GradientHealthMonitor"]

#: The Lightning namespaces a Trainer may come from: the ``lightning`` package's and the ``pytorch-lightning`` one's.
_NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def _callback_bases() -> tuple[type, ...]:
    """``lightning.pytorch.Callback``, and ``pytorch_lightning.Callback`` when that namespace is already imported.

    Each Trainer accepts only callbacks of its own namespace (``pytorch_lightning.Trainer`` raises ``ValueError:
    Expected a parent`` for a ``lightning.pytorch`` one), so the monitor is a callback of both; its hooks are the
    same in both. ``pytorch_lightning`` is never imported here: when it is imported later,
    :class:`_AdoptPytorchLightning` adds its ``Callback`` to the monitor's bases.
    """
    other = getattr(sys.modules.get("pytorch_lightning"), "Callback", None)
    return (Callback,) if other is None or other is Callback else (Callback, other)


class _AdoptPytorchLightning(importlib.abc.MetaPathFinder):
    """A one-shot import hook: once ``pytorch_lightning`` is imported, its ``Callback`` joins the monitor's bases.

    It finds nothing itself: it asks the other finders for the package's spec and wraps that spec's loader's
    ``exec_module`` (an instance attribute of that one loader), then leaves ``sys.meta_path``.
    """

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        """The other finders' spec of ``pytorch_lightning``, its loader wrapped; ``None`` for any other module."""
        if fullname != "pytorch_lightning":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        specs = (getattr(finder, "find_spec", lambda *_: None)(fullname, path, target) for finder in sys.meta_path)
        spec = next((found for found in specs if found is not None), None)
        run = getattr(getattr(spec, "loader", None), "exec_module", None)
        if run is not None:

            def exec_module(module: ModuleType) -> None:
                run(module)
                if module.__name__ == fullname:  # (a loader shared by several modules runs the others as before)
                    _adopt(getattr(module, "Callback", None))

            spec.loader.exec_module = exec_module  # type: ignore[union-attr]
        return spec


def _adopt(other: type | None) -> None:
    """Make the monitor (and its subclasses) a ``pytorch_lightning.Callback`` as well."""
    monitor = GradientHealthMonitor
    if isinstance(other, type) and other is not Callback and not issubclass(monitor, other):
        monitor.__bases__ = (*monitor.__bases__, other)


def _lightning(trainer: Any, module: str = "") -> ModuleType:
    """Module ``module`` of the namespace ``trainer`` is from: ``lightning.pytorch`` or ``pytorch_lightning``."""
    for cls in type(trainer).__mro__:
        for namespace in _NAMESPACES:
            if cls.__module__ == namespace or cls.__module__.startswith(namespace + "."):
                return importlib.import_module(f"{namespace}.{module}" if module else namespace)
    return importlib.import_module(f"lightning.pytorch.{module}" if module else "lightning.pytorch")


class GradientHealthMonitor(*_callback_bases()):  # type: ignore[misc]
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
    - ``grad_dead_units/<layer>``: fraction of the layer's units (output rows or channels of its 2-D+ parameters)
      whose gradient is entirely zero; not logged for layers without such a parameter.
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
    - ``update_ratio/<layer>``, ``grad_health/grad_cosine``: the relative size of the layer's latest update, and the
      cosine between consecutive steps' gradients (``update_ratio=True``, ``grad_cosine=True``).
    - ``grad_health/noise_scale``: the gradient noise scale under gradient accumulation (and under DDP with
      ``noise_scale=True``).

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

    The callback is a thin adapter: it maps the Trainer's state onto :class:`~lightning_gradhealth.GradientHealth`
    (:attr:`health`), which does the work and also serves plain PyTorch and Fabric loops.

    The arguments are the fields of :class:`~lightning_gradhealth.config.options.HealthOptions`, in the same order,
    with the same types and defaults; the ``Args`` section is made from their docs when this module is imported
    (:func:`~lightning_gradhealth.config.reference.with_args`), so that ``help()`` and LightningCLI show it.

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
        guard_mode: Literal["auto", "sync", "deferred"] = "auto",
        report: bool = True,
        report_dir: str | Path | None = None,
        activation_stats_every_n_steps: int | None = None,
        histogram_every_n_steps: int | None = None,
        figure_every_n_steps: int | Literal["auto"] | None = "auto",
        verbose: bool = True,
        replay_nonfinite: bool = True,
        update_ratio: bool = False,
        grad_cosine: bool = False,
        noise_scale: bool | Literal["auto"] = "auto",
        micro_batch_size: int | None = None,
        recover: bool | Recovery = False,
        pipeline_group: Any = None,
    ) -> None:
        self.options = HealthOptions(**{name: value for name, value in locals().items() if name in _OPTIONS})
        self.health = GradientHealth(None, options=self.options)
        """The core that does the work (:class:`~lightning_gradhealth.core.health.GradientHealth`)."""
        self._batch_idx = 0
        self._batches: list[Any] = []
        self._checked_epoch = -1
        self._loss: torch.Tensor | None = None
        self._replays: list[tuple[Callable[[], Any], Any]] = []  # this step's micro-batches, to replay a failure
        self._micro_batch_size: int | None = None

    def __getattr__(self, name: str) -> Any:
        # the options read as attributes (monitor.clip, monitor.on_nonfinite, ...), as before they had one object
        if name in _OPTIONS and "options" in vars(self):
            return getattr(self.options, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def last_record(self) -> StepStats | None:
        """The most recent record (on every rank), or ``None`` before the first computed step."""
        return self.health.last_record

    @property
    def findings(self) -> list[Finding]:
        """The findings of the last report (filled at the end of fit, or when failing fast)."""
        return self.health.findings

    @property
    def state_key(self) -> str:
        """Unique per configuration, so that two monitors (e.g. on different parameter sets) can be checkpointed."""
        opts = self.options
        return self._generate_state_key(
            log_every_n_steps=opts.log_every_n_steps,
            group_by=opts.group_by if isinstance(opts.group_by, str) else getattr(opts.group_by, "__name__", "fn"),
            include=opts.pattern("include"),
            exclude=opts.pattern("exclude"),
            clip=opts.clip,
            stats=opts.stats,
            norm_type=opts.norm_type,
        )

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check the configuration against the Trainer's."""
        if stage != "fit":
            return
        monitors = [cb for cb in trainer.callbacks if isinstance(cb, GradientHealthMonitor)]
        if len(monitors) > 1 and monitors[0] is self:
            _lightning(trainer, "utilities").rank_zero_warn(
                f"{len(monitors)} GradientHealthMonitor callbacks share this Trainer: they log the same keys "
                "(grad_health/*, grad_norm/<layer>, ...) and write the same report file, so their values interleave "
                "in the loggers and the last report wins. Use one monitor (`include`/`exclude` choose what it watches)."
            )
        self._checked_epoch = -1
        self._batches.clear()
        clip = self.options.clip
        if clip is not None and trainer.gradient_clip_val:
            raise ValueError(
                f"GradientHealthMonitor(clip={clip!r}) and Trainer(gradient_clip_val={trainer.gradient_clip_val})"
                " would clip the gradients twice: keep one of them (set `gradient_clip_val=None` to let the monitor "
                "clip, or `clip=None` to keep Lightning's clipping)."
            )
        strategy, strategies = trainer.strategy, _lightning(trainer, "strategies")
        if isinstance(strategy, strategies.DeepSpeedStrategy) and (reason := _deepspeed_refusal(strategy)) is not None:
            raise UnsupportedSetupError(reason)
        if isinstance(strategy, strategies.FSDPStrategy) and clip == "agc":
            raise UnsupportedSetupError(
                "GradientHealthMonitor(clip='agc') needs whole units (rows) of each weight; FSDPStrategy (FSDP1) "
                "shards flattened parameters, so units are cut anywhere. Use ModelParallelStrategy (FSDP2), or another "
                "`clip`."
            )

    def _frontend(self, trainer: Trainer, pl_module: LightningModule) -> Frontend:
        """The Trainer's state, as the core needs it."""
        strategy, strategies = trainer.strategy, _lightning(trainer, "strategies")
        utilities = _lightning(trainer, "utilities")
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        sharded = distributed and isinstance(strategy, (strategies.FSDPStrategy, strategies.ModelParallelStrategy))
        fsdp1 = sharded and isinstance(strategy, strategies.FSDPStrategy)
        # DDP and its relatives: every rank holds the same averaged gradient; decisions are averaged over ranks.
        # FSDP2: DTensor gradients name their groups; FSDP1: found at the first step, once the model is wrapped.
        replicas = distributed and not sharded
        return Frontend(
            model=pl_module,
            name="GradientHealthMonitor",
            loggers=trainer.loggers,
            rank=trainer.global_rank,
            reduction=Reduction(replica_group=torch.distributed.group.WORLD) if replicas else Reduction(),
            fsdp1_root=(lambda: strategy.model) if fsdp1 else None,  # type: ignore[arg-type,return-value]
            sharded=sharded,
            ddp=distributed and isinstance(strategy, strategies.DDPStrategy),
            amp=getattr(trainer.precision_plugin, "scaler", None) is not None,
            default_dir=Path(trainer.default_root_dir),
            info=utilities.rank_zero_info,
            warn=utilities.rank_zero_warn,
            log_every_n_steps=self._every(trainer),
            on_summary=lambda summary: trainer.callback_metrics.update(
                {k: torch.tensor(v) for k, v in summary.items()}
            ),
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start watching the (wrapped) model: check what is watched; find the sparse-by-design layers."""
        ddp = getattr(trainer.strategy, "model", None)  # (the DDP wrapper, once the strategy set up: noise.py)
        self.health.attach(self._frontend(trainer, pl_module), trainer.optimizers, ddp=ddp)
        # the Trainer's own writes to its loggers fail as the monitor's do: one warning, training goes on (sinks.py)
        guard_loggers(trainer.loggers, self.health.output.sinks, lambda: self._log_step(trainer))
        if self.health.recovery is not None:  # what a rollback restores besides the model and optimizers
            schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
            self.health.recovery.bind(schedulers, getattr(trainer.precision_plugin, "scaler", None))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Give TensorBoard a custom-scalars layout grouping the monitor's charts."""
        self.health.start()

    # ------------------------------------------------------------------ when
    def _every(self, trainer: Trainer) -> int:
        every = self.options.log_every_n_steps
        return trainer.log_every_n_steps if every is None else every

    @staticmethod
    def _log_step(trainer: Trainer) -> int:
        # The step value Lightning itself logs training scalars at (counts optimizer steps).
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)

    def _due(self, trainer: Trainer) -> bool:
        return bool(trainer.fast_dev_run) or due(self._log_step(trainer), self._every(trainer))

    @staticmethod
    def _accumulates(trainer: Trainer, pl_module: LightningModule) -> bool:
        return trainer.accumulate_grad_batches > 1 or not pl_module.automatic_optimization

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the batch index (and, with ``spike_dir``, the batch); check the watched set once an epoch."""
        self._batch_idx = batch_idx
        if trainer.current_epoch != self._checked_epoch:  # after every callback's on_train_epoch_start
            self._checked_epoch = trainer.current_epoch
            self.health.check_watched(trainer.optimizers, self._log_step(trainer))
        self.health.before_batch(self._log_step(trainer))
        if self.options.spike_dir is not None:
            self._batches.append(batch)
        if self.options.noise_scale and self._due(trainer):  # (the step this batch belongs to is logged)
            self._micro_batch_size = batch_size_of(batch)
        if self.options.replay_nonfinite and pl_module.automatic_optimization:
            self._replays.append((_replay(trainer, pl_module, batch, batch_idx), rng_state()))

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        """Keep the loss on the device (summed over micro-batches).

        Every step's loss goes into a device-side running summary (stats/loss.py), read with the statistics on
        computed steps, and is folded into the guard's norm on every guarded step (a non-finite loss fails the step,
        with no extra sync).
        """
        if self._due(trainer) or self.options.guards_every_step:  # (guard off: a step not logged runs no torch op)
            self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Under accumulation, note on the device whether this micro-batch made the gradient non-finite."""
        if self._accumulates(trainer, pl_module) and (self.options.guards_every_step or self._due(trainer)):
            self.health.after_backward()

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Check, measure, decide and clip, on the accumulated, unscaled, pre-clip gradient of this step."""
        step, due_now = self._log_step(trainer), self._due(trainer)
        loss, self._loss = self._loss, None
        replays, self._replays = self._replays, []
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if loss is not None and scaler is not None and getattr(scaler, "_scale", None) is not None:
            loss = loss / scaler._scale  # the precision plugin scaled it before on_before_backward
        if not self.health.before_step(step, due_now, loss):  # the hot path: nothing to do at this step
            self._batches.clear()
            return
        ctx = StepContext(
            step=step,
            due=due_now,
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            batch_idx=self._batch_idx,
            optimizer_idx=next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0),
            several=len(trainer.optimizers) > 1,
            scaler=scaler,
            # Lightning unscales before this hook, except for fused optimizers, which unscale inside their step
            grads_scaled=scaler is not None and bool(getattr(optimizer, "_step_supports_amp_scaling", False)),
            micro_batches=self._accumulates(trainer, pl_module),
            defer_publish=pl_module.automatic_optimization
            and (bool(trainer.gradient_clip_val) or _overridden("configure_gradient_clipping", trainer, pl_module)),
            batches=tuple(self._batches),
            loss=loss,
            replay=replays or None,
            micro_batch_size=self._micro_batch_size,
        )
        self._batches.clear()
        self.health.on_step(optimizer, ctx, trainer.optimizers)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Write this batch's records to the loggers: one write per logger and step."""
        self.health.end_batch()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write anything still buffered, then the Gradient Health Report."""
        self.health.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Write what was computed before the failure, so that nothing already measured is lost."""
        self.health.abort()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """All running state, so that a resumed run makes the same decisions as an uninterrupted one."""
        return self.health.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.health.load_state_dict(state_dict)


_OPTIONS = frozenset(HealthOptions.names())
GradientHealthMonitor.__doc__ = with_args(GradientHealthMonitor.__doc__)
if "pytorch_lightning" not in sys.modules:
    sys.meta_path.insert(0, _AdoptPytorchLightning())


def _replay(trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> Callable[[], Any]:
    """Re-runs ``training_step`` on a batch, in the precision plugin's context (for :mod:`~.birth`)."""

    def run() -> Any:
        with trainer.precision_plugin.train_step_context():
            return pl_module.training_step(batch, batch_idx)

    return run


def _overridden(hook: str, trainer: Trainer, pl_module: LightningModule) -> bool:
    """Whether ``pl_module`` overrides ``hook`` of the LightningModule of the Trainer's namespace."""
    return bool(_lightning(trainer, "utilities.model_helpers").is_overridden(hook, pl_module))


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
