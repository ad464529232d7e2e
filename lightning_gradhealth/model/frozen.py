"""What the loss can be judged against: which parts of the model are frozen, and the loss of a chance-level guess."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["TrainingFacts", "training_facts"]

#: Below this share of trainable parameters, frozen weights around trained ones read as adapter-style fine-tuning
#: (LoRA, BitFit, prompt tuning), an intended freeze.
ADAPTER_SHARE = 0.1


@dataclass(frozen=True)
class TrainingFacts:
    """Facts about the model that the loss is judged against.

    Attributes:
        total: Parameters (elements) of the model.
        frozen: Of those, elements with ``requires_grad=False``.
        frozen_modules: The largest wholly frozen modules, in definition order (``""``: the whole model).
        intended: Whether the freeze reads as intended: the frozen weights all come before the trained ones (a frozen
            backbone with a trained head), or only a small share trains (adapters).
        classes: Output units of the model's last ``nn.Linear`` (a classifier's classes), when it has one.
        frontend: How the tool is used (``"GradientHealthMonitor"``, ``"GradientHealth"``): fixes name it.
        optimizer: The optimizer's class name (``"AdamW"``), when known.
    """

    total: int = 0
    frozen: int = 0
    frozen_modules: tuple[str, ...] = ()
    intended: bool = True
    classes: int | None = None
    frontend: str | None = None
    optimizer: str | None = None

    @property
    def frozen_frac(self) -> float:
        """The frozen share of the model's parameters."""
        return self.frozen / self.total if self.total else 0.0

    @property
    def chance_loss(self) -> float | None:
        """The cross-entropy of a uniform guess over :attr:`classes` (``log(classes)``), when known."""
        return math.log(self.classes) if self.classes and self.classes >= 2 else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "parameters": self.total,
            "frozen_parameters": self.frozen,
            "frozen_frac": self.frozen_frac,
            "frozen_modules": list(self.frozen_modules),
            "freeze_intended": self.intended,
            "classes": self.classes,
            "chance_loss": self.chance_loss,
        }


def _frozen_subtrees(module: nn.Module, prefix: str, out: list[str]) -> None:
    """The largest wholly frozen modules under ``module`` (with parameters), in definition order."""
    params = list(module.parameters())
    if not params:
        return
    if not any(p.requires_grad for p in params):
        out.append(prefix)
        return
    for name, child in module.named_children():
        _frozen_subtrees(child, f"{prefix}.{name}" if prefix else name, out)


def training_facts(model: nn.Module | None, frontend: str | None = None, optimizer: str | None = None) -> TrainingFacts:
    """Which parts of ``model`` are frozen (and whether that reads as intended), and its classifier's classes."""
    if model is None:
        return TrainingFacts(frontend=frontend, optimizer=optimizer)
    order = [(p.numel(), p.requires_grad) for p in model.parameters()]
    total = sum(n for n, _ in order)
    frozen = sum(n for n, trains in order if not trains)
    modules: list[str] = []
    if frozen:
        _frozen_subtrees(model, "", modules)
    last_frozen = max((i for i, (_, trains) in enumerate(order) if not trains), default=-1)
    first_trained = min((i for i, (_, trains) in enumerate(order) if trains), default=len(order))
    prefix = last_frozen < first_trained  # every frozen weight before every trained one: a frozen backbone
    intended = not frozen or prefix or (total - frozen) / total < ADAPTER_SHARE or frozen == total
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    classes = last[-1].out_features if last and last[-1].out_features >= 2 else None
    return TrainingFacts(total, frozen, tuple(modules), intended, classes, frontend, optimizer)
