"""What a front-end tells the core about one optimizer step, and Lightning's logging schedule."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.config.cadence import DEFAULT_LOG_EVERY_N_STEPS, due
from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.guard.birth import Replay
from lightning_gradhealth.stats.noise import batch_size_of

__all__ = ["DEFAULT_LOG_EVERY_N_STEPS", "StepContext", "check_step_call", "checked_options", "due", "still_scaled"]

@dataclass(frozen=True)
class StepContext:
    """A front-end's view of one optimizer step.

    Attributes:
        step: The loggers' x-axis value (counts optimizer steps).
        due: Whether this step is computed and logged.
        global_step: The framework's global step, for messages.
        epoch: The epoch.
        batch_idx: The batch that triggered the step (the last micro-batch under accumulation).
        optimizer_idx: The optimizer's index (keys get ``/opt<index>`` when ``several``).
        several: Whether the run has several optimizers.
        scaler: The active GradScaler, if any.
        grads_scaled: Whether the gradients still hold the scaler's loss scale (not yet unscaled).
        micro_batches: Whether the step accumulates several backward passes (messages name the first bad one).
        defer_publish: The framework clips the gradients after this call: the record is published at
            :meth:`GradientHealth.end_batch`, with the post-clip norm.
        batches: The step's batches, saved with a spike when ``spike_dir`` is set.
        loss: The step's training loss (a device scalar, unscaled; the mean over micro-batches), read on computed
            steps with the statistics' one transfer.
        replay: Recomputes the step's loss, to find where a NaN was born if the step fails
            (:class:`~lightning_gradhealth.guard.birth.Replays`).
        micro_batch_size: Examples per backward pass on this rank, for the noise scale.
    """

    step: int
    due: bool
    global_step: int = 0
    epoch: int = 0
    batch_idx: int = 0
    optimizer_idx: int = 0
    several: bool = False
    scaler: Any = None
    grads_scaled: bool = False
    micro_batches: bool = False
    defer_publish: bool = False
    batches: Sequence[Any] = ()
    loss: torch.Tensor | float | None = None
    replay: Replay | None = None
    micro_batch_size: int | None = None

    @classmethod
    def for_loop(
        cls,
        optimizer: Optimizer,
        optimizers: Sequence[Optimizer],
        *,
        step: int,
        count: int,
        every: int,
        epoch: int,
        scaler: Any,
        loss: torch.Tensor | float | None,
        batch: Any,
        replay: Replay | None,
        micro_batches: bool,
        noise_scale: bool,
    ) -> StepContext:
        """A plain or Fabric loop's step (:meth:`~lightning_gradhealth.core.health.GradientHealth.step`)."""
        is_due = due(step, every)
        return cls(
            step=step,
            due=is_due,
            global_step=count,
            epoch=epoch,
            batch_idx=step,
            optimizer_idx=next(i for i, opt in enumerate(optimizers) if opt is optimizer),
            several=len(optimizers) > 1,
            scaler=scaler,
            grads_scaled=scaler is not None and still_scaled(scaler, optimizer),
            micro_batches=micro_batches,
            batches=() if batch is None else (batch,),
            loss=loss,
            replay=replay,
            micro_batch_size=batch_size_of(batch) if noise_scale and is_due else None,
        )


def still_scaled(scaler: Any, optimizer: Optimizer) -> bool:
    """Whether ``optimizer``'s gradients still hold ``scaler``'s loss scale (``scaler.unscale_`` not called yet)."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is None:
        return False
    from torch.amp.grad_scaler import OptState

    return states[id(optimizer)]["stage"] is not OptState.UNSCALED


def check_step_call(model: Any, optimizer: Any, step: Any) -> None:
    """Refuse a plain loop's ``GradientHealth.step`` call that cannot be served, saying what is wrong."""
    if model is None:
        raise RuntimeError("GradientHealth(model=None) has no model to watch: pass the model to GradientHealth.")
    if not hasattr(optimizer, "param_groups"):
        raise TypeError(f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise TypeError(f"`step` must be None or an int >= 0, got {step!r}.")


def checked_options(model: Any, scaler: Any, options: Any, kwargs: dict[str, Any]) -> HealthOptions:
    """``GradientHealth``'s arguments checked, naming the argument; its options (given, or from ``kwargs``)."""
    if options is not None and kwargs:
        raise TypeError(f"Give `options` or keyword options, not both; got `options` and {sorted(kwargs)}.")
    if options is not None and not isinstance(options, HealthOptions):
        raise TypeError(f"`options` must be a lightning_gradhealth.HealthOptions or None, got {options!r}.")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if scaler is not None and not (callable(getattr(scaler, "is_enabled", None)) and hasattr(scaler, "scale")):
        raise TypeError(f"`scaler` must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}.")
    unknown = sorted(set(kwargs) - set(HealthOptions.names()))
    if unknown:
        close = {name: difflib.get_close_matches(name, HealthOptions.names(), n=1) for name in unknown}
        hints = "; ".join(f"`{n}`" + (f" (did you mean `{c[0]}`?)" if c else "") for n, c in close.items())
        raise TypeError(f"GradientHealth got unknown option(s): {hints}. The options are those of HealthOptions.")
    return options if options is not None else HealthOptions(**kwargs)
