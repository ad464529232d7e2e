"""Typed records: what one computed optimizer step looked like."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LayerStats", "LossSummary", "StepStats"]


@dataclass(frozen=True)
class LayerStats:
    """Gradient statistics of one layer at one optimizer step.

    All gradient magnitudes are unscaled (a GradScaler's loss scale is divided out) and taken before any
    clipping. Norms use the monitor's ``norm_type``.

    Attributes:
        name: Layer name (see ``group_by``).
        numel: Number of gradient elements in the layer (parameters that got a gradient this step).
        grad_norm: Norm of the layer's gradient.
        param_norm: Norm of the layer's parameters (before the update).
        ratio: ``grad_norm / (param_norm + eps)``.
        zero_frac: Fraction of gradient entries that are exactly zero.
        nan_count: Number of NaN gradient entries (counted only on steps whose norms are non-finite).
        inf_count: Number of ±Inf gradient entries (same).
        max_abs: Largest ``|g|`` (``stats="full"`` only, else ``None``).
        min_abs_nonzero: Smallest non-zero ``|g|`` (``stats="full"``; ``inf`` when every entry is zero).
        mean: Mean of the gradient entries (``stats="full"``).
        std: Standard deviation of the gradient entries, population form (``stats="full"``).
        units: The layer's units: the rows along dim 0 of its parameters with two dimensions or more that got a
            gradient (a Linear weight's output features, a convolution's output channels, an embedding's rows).
            ``None`` when it has no such parameter (biases and norms only), when they cannot be told (a sparse
            gradient, an FSDP1 flat shard), with ``per_layer=False``, and in a record rebuilt from logged metrics
            (:func:`~lightning_gradhealth.schema.metrics.metrics_to_record`), which keep the fraction only.
        dead_unit_frac: Fraction of :attr:`units` whose gradient row is entirely exactly zero at this step (0..1);
            ``None`` when the units are not known. Unlike :attr:`zero_frac`, zeros scattered over live units (a
            convolution's padding taps, masked positions, untouched embedding rows) do not count: a unit is dead
            when nothing reaches it.
        update_ratio: ``‖θ_after − θ_before‖ / ‖θ_before‖`` of the update the optimizer applied at the step before
            this one (:mod:`~lightning_gradhealth.stats.updates`); ``None`` when not measured.
    """

    name: str
    numel: int
    grad_norm: float
    param_norm: float
    ratio: float
    zero_frac: float
    nan_count: int = 0
    inf_count: int = 0
    max_abs: float | None = None
    min_abs_nonzero: float | None = None
    mean: float | None = None
    std: float | None = None
    units: int | None = None
    dead_unit_frac: float | None = None
    update_ratio: float | None = None

    @property
    def dead_units(self) -> int | None:
        """Number of dead units (exact: ``dead_unit_frac * units`` rounded), or ``None`` when :attr:`units` is."""
        if self.units is None or self.dead_unit_frac is None:
            return None
        return round(self.dead_unit_frac * self.units)

    @property
    def is_finite(self) -> bool:
        """Whether the layer's gradient is finite: a finite norm and no NaN/Inf entry counted.

        Under DDP the counts include the other replicas', so a rank whose own copy is healthy still names the layer
        that broke.
        """
        return math.isfinite(self.grad_norm) and self.nan_count == 0 and self.inf_count == 0


@dataclass(frozen=True)
class LossSummary:
    """Every optimizer step's training loss up to a computed step, summed up on the device with no per-step sync.

    Attributes:
        steps: Steps whose loss was seen, since the run started.
        nonfinite: Of those, steps with a NaN/Inf loss.
        first: The run's own starting level: the median of its first few finite losses.
        start: The run's first finite loss (before any update could do damage).
        mean: The mean finite loss of the steps since the previous computed step (a smoothed loss).
        low: The smallest finite loss of those steps.
        high: The largest finite loss of those steps.
        recent: The mean finite loss of the last quarter of those steps (the level now).
        window: How many steps those are.
        peak: The largest :attr:`mean` of the run so far (the smoothed loss at its worst).
    """

    steps: int
    nonfinite: int
    first: float
    start: float
    mean: float
    low: float
    high: float
    recent: float
    window: int
    peak: float = math.nan


@dataclass(frozen=True)
class StepStats:
    """Everything the monitor knows about one optimizer step, produced from one device-to-host transfer.

    Attributes:
        step: The Trainer's logging step (the x axis of the loggers; counts optimizer steps).
        global_step: ``trainer.global_step`` when the statistics were taken.
        epoch: Current epoch.
        batch_idx: Index of the batch that triggered the optimizer step (the last micro-batch under
            gradient accumulation).
        optimizer_idx: Index of the optimizer in ``trainer.optimizers``.
        total_norm: True global gradient norm over all watched parameters (not a sum of layer norms).
        param_norm: Global parameter norm.
        zero_frac: Fraction of exactly-zero gradient entries over all watched parameters.
        nan_count: NaN gradient entries (exact; counted only when the norm is non-finite).
        inf_count: ±Inf gradient entries (same).
        layer_norm_ratio: Largest over smallest layer gradient norm, over layers with a finite non-zero norm
            (1.0 with fewer than two such layers).
        no_grad_count: Number of watched (trainable) parameters whose ``.grad`` was ``None``.
        no_grad_params: Their names.
        layers: Per-layer statistics in definition order (empty with ``per_layer=False``).
        amp_scale: The GradScaler's loss scale at this step, when a scaler is active.
        amp_overflow: ``True`` when a GradScaler is active and the gradients are non-finite: the scaler skips
            this update and lowers its scale. This is normal mixed-precision behaviour, not corruption.
        first_nonfinite_micro_batch: Under gradient accumulation (or manual backward calls), the index within
            the optimizer step of the first micro-batch after which the accumulated gradient was non-finite.
        post_clip_norm: Global norm after the Trainer's gradient clipping (``gradient_clip_val``), if any.
        grad_max_abs: Largest ``|g|`` over all layers (``stats="full"``).
        loss: The step's training loss (unscaled; under gradient accumulation the mean over the micro-batches),
            when the caller gave it (the callback does; ``GradientHealth.step(loss=...)``), read in the same
            transfer as the statistics.
        counts_exact: ``False`` on a non-finite step read without a host sync (``guard_mode="deferred"``): its
            gradients were gone when it was read, so the NaN/Inf entries were not counted (the non-finite layers
            are named from their norms, and parameter norms not taken are NaN).
        grad_cosine: Cosine between this step's gradient and the previous step's
            (:mod:`~lightning_gradhealth.stats.updates`).
        noise_scale: The gradient noise scale ``B_simple`` in examples, smoothed
            (:mod:`~lightning_gradhealth.stats.noise`).
        batch_size: Examples per optimizer step (micro-batch size x micro-batches x data-parallel ranks), known when the
            noise scale is measured.
        nonfinite_birth: On a failing step, where the replay found the NaN/Inf born
            (:mod:`~lightning_gradhealth.guard.birth`), or why it could not tell.
        loss_summary: Every step's training loss since the run started, summed up on the device
            (:mod:`~lightning_gradhealth.stats.loss`), read in the same transfer.
        lr: The largest learning rate of the optimizer's parameter groups at this step.
    """

    step: int
    global_step: int
    epoch: int
    batch_idx: int
    optimizer_idx: int
    total_norm: float
    param_norm: float
    zero_frac: float
    nan_count: int
    inf_count: int
    layer_norm_ratio: float
    no_grad_count: int
    no_grad_params: tuple[str, ...] = ()
    layers: tuple[LayerStats, ...] = field(default_factory=tuple)
    amp_scale: float | None = None
    amp_overflow: bool = False
    first_nonfinite_micro_batch: int | None = None
    post_clip_norm: float | None = None
    grad_max_abs: float | None = None
    loss: float | None = None
    counts_exact: bool = True
    grad_cosine: float | None = None
    noise_scale: float | None = None
    batch_size: int | None = None
    nonfinite_birth: str | None = None
    loss_summary: LossSummary | None = None
    lr: float | None = None

    @classmethod
    def assemble(
        cls,
        meta: Any,
        total_norm: float,
        layers: Sequence[LayerStats] = (),
        extras: Mapping[str, float] | None = None,
        *,
        param_norm: float = math.nan,
        zero_frac: float = math.nan,
        nan_count: int = 0,
        inf_count: int = 0,
        layer_norm_ratio: float = math.nan,
        no_grad_params: tuple[str, ...] = (),
        counts_exact: bool = True,
        **more: Any,
    ) -> StepStats:
        """The one place a record is built: from where the step is, what was measured and the extras that rode along.

        What follows from those is derived here, the same way for a computed step (the engine), a failing step read
        a step late (per-tensor norms only) and a step read back from logged metrics: the parameter count without a
        gradient, the loss scale and whether it overflowed, the loss, the first non-finite micro-batch (0 on a
        non-finite step of a single micro-batch) and the largest ``|g|``.

        Args:
            meta: Where the step is: ``step``, ``global_step``, ``epoch``, ``batch_idx``, ``optimizer_idx``.
            total_norm: The global gradient norm.
            layers: The per-layer statistics.
            extras: Scalars that rode with the step (``amp_scale``, ``loss``, ``first_nonfinite_micro_batch``).
            param_norm: The global parameter norm (NaN: not measured).
            zero_frac: The global zero fraction (NaN: not measured).
            nan_count: NaN gradient entries.
            inf_count: Inf gradient entries.
            layer_norm_ratio: Largest over smallest layer norm (NaN: not comparable).
            no_grad_params: Watched parameters without a gradient.
            counts_exact: Whether NaN/Inf entries were counted (a finite step's always are).
            **more: Other fields, as they are.
        """
        extras = extras or {}
        finite = math.isfinite(total_norm)
        scale = extras.get("amp_scale")
        micro = extras.get("first_nonfinite_micro_batch")
        # none tracked: a single micro-batch, the one that went non-finite; negative: tracked, none seen going bad
        first_bad = None if finite or (micro is not None and micro < 0) else (0 if micro is None else int(micro))
        return cls(
            step=meta.step, global_step=meta.global_step, epoch=meta.epoch, batch_idx=meta.batch_idx,
            optimizer_idx=meta.optimizer_idx, total_norm=total_norm, param_norm=param_norm, zero_frac=zero_frac,
            nan_count=nan_count, inf_count=inf_count, layer_norm_ratio=layer_norm_ratio,
            no_grad_count=len(no_grad_params), no_grad_params=no_grad_params, layers=tuple(layers),
            amp_scale=scale, amp_overflow=scale is not None and not finite, first_nonfinite_micro_batch=first_bad,
            grad_max_abs=max((lay.max_abs for lay in layers if lay.max_abs is not None), default=None),
            loss=extras.get("loss"), counts_exact=counts_exact or finite, **more,
        )  # fmt: skip

    @property
    def is_finite(self) -> bool:
        """Whether the global gradient norm is finite."""
        return math.isfinite(self.total_norm)

    @property
    def nonfinite_layers(self) -> tuple[LayerStats, ...]:
        """Layers with a non-finite gradient, in definition order."""
        return tuple(layer for layer in self.layers if not layer.is_finite)

    def layer(self, name: str) -> LayerStats:
        """Return the statistics of the layer called ``name``.

        Raises:
            KeyError: If there is no such layer in this record.
        """
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer {name!r} in this record; layers: {[lay.name for lay in self.layers]}")
