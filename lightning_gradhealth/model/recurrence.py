"""How much gradient reaches the early time steps of a recurrent layer, against the late ones.

Bengio et al. (1994) and Pascanu et al. (2013, "On the difficulty of training recurrent neural networks", §2-3)
show that the gradient a loss sends back through time, ``∂L/∂h_k``, shrinks or grows exponentially in ``t - k``
with the recurrent Jacobians' norms: vanishing gradients make long-range dependencies unlearnable, exploding ones
make a step blow up. The gradients of the recurrent weights do not show it (``∂L/∂W_hh`` and ``∂L/∂W_ih`` are
sums over the same ``δ_t``, weighted by ``h_{t-1}`` and ``x_t``: their ratio tracks the sizes of states and
inputs, not the flow through time). What shows it directly is the gradient reaching each time step's *input*,
``∂L/∂x_t = W_ihᵀ δ_t``: :func:`watch_recurrence` hooks the input of every ``nn.RNN``/``nn.LSTM``/``nn.GRU`` and
keeps, on the device with no host synchronisation, a running mean of the gradient's norm over the first quarter
of the sequence and over its last quarter; :meth:`TimeProfile.early_over_late` is their ratio.

An input that does not require a gradient (raw features) is made to (a detached view of it: nothing upstream
changes), which adds the input gradient's one product ``W_ihᵀ δ`` to the backward pass of the first recurrent
layer. Packed sequences and modules run without gradients are not watched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["TimeProfile", "watch_recurrence"]

_DECAY = 0.9  # the running means' weight of the past (about the last 10 backward passes)


class TimeProfile:
    """Running means of the input gradient's norm over the first and the last quarter of a recurrent layer's steps.

    Args:
        ratio: A ratio read back from a report (then nothing is watched).
    """

    def __init__(self, ratio: float | None = None) -> None:
        self.early: torch.Tensor | None = None
        self.late: torch.Tensor | None = None
        self.samples = 0
        self.steps = 0  # sequence length of the latest sample
        self._ratio = ratio

    @torch.no_grad()
    def observe(self, grad: torch.Tensor, time_dim: int) -> None:
        """Fold in one backward pass's gradient of the input (time along ``time_dim``)."""
        steps = grad.shape[time_dim]
        if steps < 4 or not grad.is_floating_point():
            return
        per_step = grad.float().pow(2).sum(dim=[d for d in range(grad.dim()) if d != time_dim])
        quarter = max(1, steps // 4)
        early, late = per_step[:quarter].mean().sqrt(), per_step[-quarter:].mean().sqrt()
        if self.early is None or self.late is None:
            self.early, self.late = early, late
        else:
            ok = torch.isfinite(early) & torch.isfinite(late)  # (a non-finite step is the guard's; kept out here)
            had = torch.isfinite(self.early) & torch.isfinite(self.late)  # (else the first finite sample starts)
            self.early = torch.where(ok, torch.where(had, torch.lerp(early, self.early, _DECAY), early), self.early)
            self.late = torch.where(ok, torch.where(had, torch.lerp(late, self.late, _DECAY), late), self.late)
        self.samples += 1
        self.steps = steps

    def early_over_late(self) -> float | None:
        """The first quarter's gradient over the last quarter's (a host read), or None before any sample."""
        if self._ratio is not None:
            return self._ratio
        if self.early is None or self.late is None:
            return None
        early, late = float(self.early), float(self.late)
        if late > 0:
            return early / late
        return float("inf") if early > 0 else None


def watch_recurrence(
    model: nn.Module, profiles: dict[str, TimeProfile], name_of: Callable[[str], str]
) -> Callable[[], None]:
    """Watch the gradient through time of every ``nn.RNNBase`` module of ``model`` into ``profiles``.

    Args:
        model: The model.
        profiles: Filled with one :class:`TimeProfile` per recurrent module, under its layer name.
        name_of: The layer name of a module name (as the inventory names layers).

    Returns:
        A function removing the hooks.
    """
    handles: list[Any] = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.RNNBase):
            continue
        profile = profiles.setdefault(name_of(mod_name), TimeProfile())
        time_dim = 1 if module.batch_first else 0

        def pre_hook(
            mod: nn.Module, args: tuple[Any, ...], *, profile: TimeProfile = profile, time_dim: int = time_dim
        ) -> tuple[Any, ...] | None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not mod.training or not torch.is_grad_enabled() or x.dim() != 3:
                return None  # (a PackedSequence, an unbatched input, evaluation)
            changed = not x.requires_grad
            if changed:
                x = x.detach().requires_grad_(True)
            x.register_hook(lambda g: profile.observe(g, time_dim))
            return (x, *args[1:]) if changed else None

        handles.append(module.register_forward_pre_hook(pre_hook))

    def remove() -> None:
        for handle in handles:
            handle.remove()

    return remove
