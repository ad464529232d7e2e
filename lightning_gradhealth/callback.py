"""The Lightning callback: decides *when* statistics are taken and where they go. No maths here."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer

from lightning_gradhealth.engine import GradStatsEngine, NonFiniteTracker, StepMeta
from lightning_gradhealth.layout import ParamLayout, build_layout
from lightning_gradhealth.metrics import record_to_metrics, summary_metrics
from lightning_gradhealth.record import StepStats
from lightning_gradhealth.validation import (
    check_choice,
    check_group_by,
    check_int,
    check_norm_type,
    check_regex,
    check_type,
)

__all__ = ["GradientHealthMonitor"]

_SHARDED_STRATEGIES = ("FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy")


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
        stats: ``"basic"`` or ``"full"`` (adds max, min non-zero, mean and std of the gradient per layer; one
            extra small kernel per tensor).

    Raises:
        TypeError: An argument has the wrong type.
        ValueError: An argument has an invalid value.
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
    ) -> None:
        check_int("log_every_n_steps", log_every_n_steps, minimum=1, allow_none=True)
        self.group_by = check_group_by("group_by", group_by)
        self.norm_type = check_norm_type("norm_type", norm_type)
        self.include = check_regex("include", include)
        self.exclude = check_regex("exclude", exclude)
        check_type("per_layer", per_layer, bool, "a bool")
        check_choice("stats", stats, ("basic", "full"))
        self.log_every_n_steps = log_every_n_steps
        self.per_layer = per_layer
        self.stats = stats
        self._engine = GradStatsEngine(norm_type=self.norm_type, stats=stats, per_layer=per_layer)
        self._tracker = NonFiniteTracker()
        self._layouts: dict[int, ParamLayout] = {}
        self._model_layout: ParamLayout | None = None
        self._awaiting_clip: dict[int, tuple[StepStats, ParamLayout]] = {}
        self._unlogged: dict[int, dict[str, float]] = {}
        self._warned: set[str] = set()
        self._batch_idx = 0
        self._disabled = False
        self._trainer: Trainer | None = None
        self.last_record: StepStats | None = None
        """The most recent record (on every rank), or ``None`` before the first computed step."""

    # ------------------------------------------------------------------ when
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Reset per-run state; refuse sharded strategies (their local gradients are not the global ones)."""
        if stage != "fit":
            return
        self._layouts.clear()
        self._model_layout = None
        self._awaiting_clip.clear()
        self._unlogged.clear()
        self._tracker.reset()
        self._trainer = trainer
        strategy = type(trainer.strategy).__name__
        self._disabled = strategy in _SHARDED_STRATEGIES
        if self._disabled:
            rank_zero_warn(
                f"GradientHealthMonitor does not support the sharded strategy {strategy} yet and is disabled for "
                "this run: per-rank gradient shards would give wrong norms. DDP and single-device runs are "
                "supported."
            )

    def _every(self, trainer: Trainer) -> int:
        return trainer.log_every_n_steps if self.log_every_n_steps is None else self.log_every_n_steps

    @staticmethod
    def _log_step(trainer: Trainer) -> int:
        # The step value Lightning itself logs training scalars at (counts optimizer steps).
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)

    def _should_compute(self, trainer: Trainer) -> bool:
        if self._disabled:
            return False
        if trainer.fast_dev_run:
            return True
        every = self._every(trainer)
        return every > 0 and (self._log_step(trainer) + 1) % every == 0

    def _tracks_micro_batches(self, trainer: Trainer, pl_module: LightningModule) -> bool:
        return trainer.accumulate_grad_batches > 1 or not pl_module.automatic_optimization

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Remember the batch index for the record."""
        self._batch_idx = batch_idx

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Under accumulation, note on the device whether this micro-batch made the gradient non-finite."""
        if not self._tracks_micro_batches(trainer, pl_module) or not self._should_compute(trainer):
            return
        if self._model_layout is None:
            self._model_layout = self._build_layout(pl_module, None)
        self._tracker.observe(self._model_layout.params)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Optimizer) -> None:
        """Launch the statistics of this step on the device (accumulated, unscaled, pre-clip gradients)."""
        self._flush_pending()
        if not self._should_compute(trainer):
            self._tracker.reset()
            return
        opt_idx = next((i for i, opt in enumerate(trainer.optimizers) if opt is optimizer), 0)
        layout = self._layouts.get(id(optimizer))
        if layout is None:
            layout = self._layouts[id(optimizer)] = self._build_layout(pl_module, optimizer)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        scale = getattr(scaler, "_scale", None) if scaler is not None else None
        fused = bool(getattr(optimizer, "_step_supports_amp_scaling", False))
        pending = self._engine.compute(layout, grad_scale=scale if fused else None)
        if pending is None:
            self._warn_once(
                "no-grad-at-all",
                "GradientHealthMonitor: no watched parameter has a gradient at this "
                "optimizer step; nothing is recorded for it.",
            )
            self._tracker.reset()
            return
        if scale is not None:
            pending.extras["amp_scale"] = scale
        if self._tracker.first_bad is not None:
            pending.extras["first_nonfinite_micro_batch"] = self._tracker.first_bad
        else:  # a single micro-batch: it is micro-batch 0 that went non-finite, if any
            pending.extras["first_nonfinite_micro_batch"] = (~torch.isfinite(pending.packed[0])).long() - 1
        self._tracker.reset()
        meta = StepMeta(
            step=self._log_step(trainer),
            global_step=trainer.global_step,
            epoch=trainer.current_epoch,
            batch_idx=self._batch_idx,
            optimizer_idx=opt_idx,
        )
        record = self._engine.finish(pending, meta)
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
        """Write this batch's records to the loggers: one ``log_metrics`` call per logger and step."""
        self._flush_pending()
        self._emit(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write anything still buffered."""
        self._flush_pending()
        self._emit(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Write what was computed before the failure, so that nothing already measured is lost."""
        try:
            self._flush_pending()
        finally:
            self._emit(trainer)

    # ------------------------------------------------------------------ where
    def _build_layout(self, pl_module: LightningModule, optimizer: Optimizer | None) -> ParamLayout:
        restrict = None
        if optimizer is not None:
            restrict = [p for group in optimizer.param_groups for p in group["params"]]
        return build_layout(
            pl_module.named_parameters(),
            group_by=self.group_by,
            include=self.include,
            exclude=self.exclude,
            restrict_to=restrict,
        )

    def _flush_pending(self) -> None:
        while self._awaiting_clip:
            _, (record, layout) = self._awaiting_clip.popitem()
            grads = [p.grad for p in layout.params if p.grad is not None]
            if grads:  # the second transfer of a step, only when the Trainer clips gradients
                record = replace(record, post_clip_norm=self._engine.global_norm(grads).item())
            self._publish(record)

    def _publish(self, record: StepStats) -> None:
        self.last_record = record
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
        self._unlogged.setdefault(record.step, {}).update(metrics)
        if trainer is not None:
            summary = summary_metrics(record, opt_idx)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in summary.items()})

    def _emit(self, trainer: Trainer) -> None:
        if not self._unlogged:
            return
        batches, self._unlogged = self._unlogged, {}
        if not trainer.is_global_zero:
            return
        for step, metrics in sorted(batches.items()):
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Callback state for checkpoints (which warnings were already given)."""
        return {"warned": sorted(self._warned)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._warned = set(state_dict.get("warned", ()))
