"""Activation statistics on sampled steps: dead units, zero activations, saturation (opt-in).

Forward hooks are attached to the activation modules only for the micro-batches of a sampled step and removed
right after, so other steps pay nothing. The counts live in torchmetrics states, which torchmetrics sums across
ranks when they are read, so every rank sees the statistics of the global batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from torchmetrics import Metric

__all__ = ["ACTIVATION_MODULES", "ActivationStats", "UnitStats"]

#: Module types whose outputs are watched.
ACTIVATION_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh)


class UnitStats(Metric):
    """Per-unit activity and saturation of one activation module's outputs.

    A *unit* is a feature: dimension 1 of a 4-D (convolutional) output, else the last dimension. A unit is dead
    when it is exactly zero for every sample and position seen. Saturation: a sigmoid output below 0.01 or above
    0.99, a tanh output beyond ±0.99.

    Args:
        num_units: Number of units.
        saturating: ``"sigmoid"``, ``"tanh"`` or ``None``.
    """

    full_state_update = False

    def __init__(self, num_units: int, saturating: str | None = None) -> None:
        super().__init__()
        self.saturating = saturating
        self.add_state("active", default=torch.zeros(num_units, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("zeros", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("saturated", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @staticmethod
    def unit_dim(output: torch.Tensor) -> int:
        """The dimension that indexes units in ``output``."""
        return 1 if output.ndim == 4 else output.ndim - 1

    def update(self, output: torch.Tensor) -> None:
        """Add one output tensor."""
        y = output.detach()
        dim = self.unit_dim(y)
        nonzero = y != 0
        others = [d for d in range(y.ndim) if d != dim]
        self.active += nonzero.sum(dim=others).double() if others else nonzero.double()
        self.zeros += (~nonzero).sum()
        self.count += y.numel()
        if self.saturating == "sigmoid":
            self.saturated += ((y < 0.01) | (y > 0.99)).sum()
        elif self.saturating == "tanh":
            self.saturated += (y.abs() > 0.99).sum()

    def compute(self) -> torch.Tensor:
        """``[dead unit fraction, zero fraction, saturated fraction]`` (summed over ranks)."""
        count = self.count.clamp(min=1)
        return torch.stack([(self.active == 0).double().mean(), self.zeros / count, self.saturated / count])


class ActivationStats:
    """Attach hooks to a model's activation modules on demand and read their statistics in one transfer.

    Args:
        model: The model whose activation modules are watched (found by type, in definition order).
    """

    def __init__(self, model: nn.Module) -> None:
        self.modules: dict[str, nn.Module] = {
            name: m for name, m in model.named_modules() if isinstance(m, ACTIVATION_MODULES)
        }
        self.metrics: dict[str, UnitStats] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place."""
        return bool(self._handles)

    def attach(self) -> None:
        """Start watching the outputs of every activation module."""
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name, module)))

    def detach(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str, module: nn.Module):  # noqa: ANN202
        saturating = "sigmoid" if isinstance(module, nn.Sigmoid) else "tanh" if isinstance(module, nn.Tanh) else None

        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, torch.Tensor) or output.ndim == 0:
                return
            metric = self.metrics.get(name)
            if metric is None:
                units = output.shape[UnitStats.unit_dim(output)]
                metric = self.metrics[name] = UnitStats(units, saturating).to(output.device)
            metric.update(output)

        return hook

    def read(self) -> dict[str, tuple[float, float, float | None]]:
        """Every module's ``(dead_frac, zero_frac, saturated_frac or None)``, in one device-to-host transfer.

        Collective under distributed training (torchmetrics syncs the states): call it on every rank. The states
        are reset afterwards.
        """
        names = [n for n in self.modules if n in self.metrics]
        if not names:
            return {}
        values = torch.stack([self.metrics[n].compute() for n in names]).tolist()
        out = {}
        for name, (dead, zero, sat) in zip(names, values, strict=True):
            metric = self.metrics[name]
            out[name] = (dead, zero, sat if metric.saturating else None)
            metric.reset()
        return out
