"""Which parameters are watched, and what changed: plain torch, no training framework.

A :class:`WatchedSet` keeps one :class:`~lightning_gradhealth.model.layout.ParamLayout` per optimizer (its trainable
parameters that ``include``/``exclude`` select, grouped into layers) and notices, cheaply, when that set changes:
a new optimizer, a parameter group added, removed or replaced, a parameter frozen or unfrozen, gradients that turn
out to be sparse. A change is returned as a :class:`WatchChange` for the caller to announce; running statistics
about the previous set (spike detection, adaptive clipping) must then start over.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.model.detect import transposed_weights
from lightning_gradhealth.model.distributed import check_sharding
from lightning_gradhealth.model.layout import ParamLayout, build_layout, clean_name, layer_name
from lightning_gradhealth.schema.errors import UnsupportedSetupError

__all__ = ["WatchChange", "WatchedSet"]

_SPARSE_MODULES = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class WatchChange:
    """How the watched parameters changed.

    Attributes:
        added: Names of the parameters that joined, in definition order.
        removed: Names of the parameters that left.
        late: Of ``added``, those that were not trainable when the run started (a DDP wrapper does not average
            their gradients).
        total: How many parameters are watched now.
    """

    added: tuple[str, ...]
    removed: tuple[str, ...]
    late: tuple[str, ...] = ()
    total: int = 0

    def describe(self) -> str:
        """``"2 joined (a.weight, a.bias) (layers frozen or unfrozen, or ...)"``, for a message."""
        changes = ([f"{len(self.added)} joined ({some(self.added)})"] if self.added else []) + (
            [f"{len(self.removed)} left ({some(self.removed)})"] if self.removed else []
        )
        if not changes:
            return f"the {self.total} parameters are other tensors (a new model, or layers replaced)"
        return f"{'; '.join(changes)} (layers frozen or unfrozen, or an optimizer's parameters changed)"

    def announcement(self, name: str, step: int, restarted: Sequence[str]) -> str:
        """The message of the change (``restarted``: the running statistics that start over)."""
        return (
            f"{name}: the watched parameters changed at step {step}: {self.describe()}. "
            "Every statistic covers the new set from this step"
            + (f"; the running statistics of {' and '.join(restarted)} start over." if restarted else ".")
        )

    def ddp_warning(self, name: str) -> str | None:
        """Under DDP, the warning about parameters that started training after DDP wrapped the model."""
        if not self.late:
            return None
        return (
            f"{name}: {len(self.late)} parameter(s) started training after DistributedDataParallel "
            f"wrapped the model ({some(self.late)}). DDP only averages the gradients of the parameters that "
            "required a gradient when it wrapped the model, so these are not averaged across ranks: their "
            "replicas drift apart, and their per-layer statistics here are rank 0's own. Create the model with "
            "them trainable (and freeze them through the optimizer instead), or let the strategy wrap it again."
        )


def some(names: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` names and how many more."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class _OptimizerWatch:
    """What is watched of one optimizer's parameters, and what its layout was built from."""

    layout: ParamLayout
    groups: tuple[tuple[int, int], ...]  # its parameter groups' lists (by identity) and lengths
    param_ids: tuple[int, ...]  # its parameters, by identity
    optimizer: weakref.ReferenceType[Optimizer]  # (an id can be reused once an optimizer is gone)
    frozen: tuple[torch.Tensor, ...] = field(default=())  # its frozen parameters, watched once unfrozen


def _groups(optimizer: Optimizer) -> tuple[tuple[int, int], ...]:
    return tuple((id(group["params"]), len(group["params"])) for group in optimizer.param_groups)


def _params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _trainable_ids(model: nn.Module) -> tuple[int, ...]:
    return tuple(id(p) for p in model.parameters() if p.requires_grad)


class WatchedSet:
    """The watched parameters of a model, per optimizer, following the run.

    Args:
        options: ``include``, ``exclude``, ``group_by`` and ``clip`` (value and AGC clipping refuse sparse gradients)
            are read from it.

    Attributes:
        model: The module whose ``named_parameters()`` name the parameters (set by :meth:`start`).
        names: The watched parameter names (checkpointed: a resumed run compares against them), or ``None``.
        sparse_layers: Layers of embedding modules, whose gradients are sparse by design.
        waiting: When nothing is watched yet, the frozen parameters that will be once they are unfrozen.
    """

    def __init__(self, options: HealthOptions) -> None:
        self.options = options
        self.model: nn.Module | None = None
        self.names: tuple[str, ...] | None = None
        self.sparse_layers: frozenset[str] = frozenset()
        self.waiting: tuple[str, ...] = ()
        self._refs: tuple[weakref.ReferenceType[torch.Tensor], ...] | None = None
        self._layouts: dict[int, _OptimizerWatch] = {}
        self._model_layout: ParamLayout | None = None
        self._trainable: tuple[int, ...] | None = None
        self._at_start: frozenset[int] = frozenset()
        self._sparse_found: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
        self._sparse_checked: set[int] = set()

    # ------------------------------------------------------------------ set-up
    def start(self, model: nn.Module, optimizers: Sequence[Optimizer] = (), *, resumed: bool = False) -> None:
        """Begin watching ``model``: check that something is watched and that its sharding is supported.

        Sets :attr:`waiting` to the frozen parameters that will be watched once unfrozen, when nothing is watched
        yet.

        Args:
            model: The module to watch.
            optimizers: The optimizers known now.
            resumed: Whether statistics were already collected: a checkpoint from before the watched set was saved
                then describes what is watched now.

        Raises:
            ValueError: No trainable parameter is selected by ``include``/``exclude``.
            UnsupportedSetupError: Value or AGC clipping of sparse gradients, or a model only partly sharded.
        """
        self.model = model
        self._layouts.clear()
        self._sparse_checked.clear()
        self._model_layout = self.build(None)
        self._trainable = _trainable_ids(model)
        self._at_start = frozenset(self._trainable)
        frozen = build_layout(
            model.named_parameters(),
            include=self.options.include,  # type: ignore[arg-type]
            exclude=self.options.exclude,  # type: ignore[arg-type]
            sparse_grads=self._sparse_params(),
            frozen=True,
        )
        self._refuse_sparse(frozen)  # a frozen sparse embedding would be refused when it is unfrozen: now instead
        if not len(self._model_layout) and not len(frozen):
            names = [n for n, p in model.named_parameters() if p.requires_grad][:5]
            raise ValueError(
                "GradientHealthMonitor watches no parameter: no trainable parameter passes `include`="
                f"{self.options.pattern('include')!r} and `exclude`={self.options.pattern('exclude')!r}"
                f" (trainable parameters start with {names})."
            )
        check_sharding(self._model_layout.param_names, self._model_layout.params)  # before a step is spent
        sparse = set()
        for mod_name, module in model.named_modules():
            if isinstance(module, _SPARSE_MODULES):
                for p_name, _ in module.named_parameters(recurse=False):
                    full = clean_name(f"{mod_name}.{p_name}" if mod_name else p_name)
                    sparse.add(layer_name(full, self.options.group_by))
        self.sparse_layers = frozenset(sparse)
        self.waiting = () if len(self._model_layout) else frozen.param_names
        if self.names is None and resumed:
            self.rebuild(optimizers)

    @property
    def model_layout(self) -> ParamLayout:
        """Every watched parameter of the model, whatever optimizer holds it."""
        if self._model_layout is None:
            self._model_layout = self.build(None)
        return self._model_layout

    # ------------------------------------------------------------------ per step
    def layout_for(
        self, optimizer: Optimizer, optimizers: Sequence[Optimizer]
    ) -> tuple[ParamLayout, WatchChange | None]:
        """The optimizer's layout, rebuilt (with every other) when what it should watch changed.

        Checked on every step, at the cost of the optimizer's parameter groups and of its frozen parameters that
        would be watched. The first step of a layout also looks for sparse gradients that no sparse module
        announced (``F.embedding(..., sparse=True)`` on a bare parameter).

        Returns:
            The layout, and the change when the watched set changed.
        """
        change = None
        watch = self._layouts.get(id(optimizer))
        if (
            watch is None
            or watch.optimizer() is not optimizer
            or watch.groups != _groups(optimizer)
            or any(p.requires_grad for p in watch.frozen)
        ):
            change = self.rebuild(optimizers, optimizer)
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
                change = self.rebuild(optimizers, optimizer) or change
                watch = self._layouts[id(optimizer)]
                self._sparse_checked.add(id(watch.layout))
        return watch.layout, change

    def check(self, optimizers: Sequence[Optimizer]) -> WatchChange | None:
        """Rebuild if parameters were frozen, unfrozen or replaced anywhere in the model (one pass over them).

        Meant for the first batch of every epoch and for logged steps; it also compares every optimizer's
        parameters one by one.
        """
        assert self.model is not None
        stale = _trainable_ids(self.model) != self._trainable or any(
            w.optimizer() is not None and w.param_ids != tuple(map(id, _params(w.optimizer())))  # type: ignore[arg-type]
            for w in self._layouts.values()
        )
        return self.rebuild(optimizers) if stale else None

    def rebuild(self, optimizers: Sequence[Optimizer], optimizer: Optimizer | None = None) -> WatchChange | None:
        """Build every layout afresh; return the change when the watched set is not what it was."""
        assert self.model is not None
        self._trainable = _trainable_ids(self.model)
        self._sparse_checked.clear()  # (the new layouts are looked at on their first step)
        self._model_layout = self.build(None)
        check_sharding(self._model_layout.param_names, self._model_layout.params)
        optimizers = list(optimizers)
        if optimizer is not None and all(opt is not optimizer for opt in optimizers):
            optimizers.append(optimizer)
        self._layouts = {id(opt): self._watch(opt) for opt in optimizers}
        watched = {
            id(p): (name, p)
            for w in self._layouts.values()
            for name, p in zip(w.layout.param_names, w.layout.params, strict=True)
        }
        names = tuple(name for name, _ in watched.values())
        tensors = [p for _, p in watched.values()]
        change = None
        if self.names is not None:
            refs = self._refs
            same_tensors = refs is None or (  # (a checkpoint holds names, not tensors)
                len(refs) == len(tensors) and all(r() is p for r, p in zip(refs, tensors, strict=True))
            )
            if set(names) != set(self.names) or not same_tensors:
                change = self._change(self.names, names)
        self.names = names
        self._refs = tuple(weakref.ref(p) for p in tensors)
        return change

    def _change(self, old: tuple[str, ...], new: tuple[str, ...]) -> WatchChange:
        old_set, new_set = set(old), set(new)
        added = tuple(name for name in new if name not in old_set)
        assert self.model is not None
        added_set = set(added)
        late = tuple(
            clean_name(name)
            for name, p in self.model.named_parameters()
            if id(p) not in self._at_start and clean_name(name) in added_set
        )
        return WatchChange(
            added=added, removed=tuple(name for name in old if name not in new_set), late=late, total=len(new)
        )

    def _watch(self, optimizer: Optimizer) -> _OptimizerWatch:
        assert self.model is not None
        params = _params(optimizer)
        frozen = build_layout(
            self.model.named_parameters(),
            include=self.options.include,  # type: ignore[arg-type]
            exclude=self.options.exclude,  # type: ignore[arg-type]
            restrict_to=params,
            frozen=True,
        )
        return _OptimizerWatch(
            layout=self.build(optimizer),
            groups=_groups(optimizer),
            param_ids=tuple(map(id, params)),
            optimizer=weakref.ref(optimizer),
            frozen=frozen.params,
        )

    def build(self, optimizer: Optimizer | None) -> ParamLayout:
        """A layout of the watched parameters (of ``optimizer`` when given)."""
        assert self.model is not None
        layout = build_layout(
            self.model.named_parameters(),
            group_by=self.options.group_by,
            include=self.options.include,  # type: ignore[arg-type]
            exclude=self.options.exclude,  # type: ignore[arg-type]
            restrict_to=None if optimizer is None else _params(optimizer),
            sparse_grads=self._sparse_params(),
            transposed=transposed_weights(self.model),  # HF Conv1D: units along dim 1
        )
        self._refuse_sparse(layout)
        return layout

    def _sparse_params(self) -> list[torch.Tensor]:
        """Parameters with sparse gradients: of sparse embedding modules, and any found sparse at a step."""
        assert self.model is not None
        declared = [
            p
            for module in self.model.modules()
            if isinstance(module, _SPARSE_MODULES) and getattr(module, "sparse", False)
            for p in module.parameters(recurse=False)
        ]
        return declared + list(self._sparse_found)

    def _refuse_sparse(self, layout: ParamLayout) -> None:
        clip = self.options.clip
        if layout.sparse and clip in ("value", "agc"):
            names = [layout.param_names[i] for i in sorted(layout.sparse)]
            raise UnsupportedSetupError(
                f"GradientHealthMonitor(clip={clip!r}) does not clip sparse gradients (nn.Embedding/EmbeddingBag "
                f"with sparse=True: {names[:5]}): use clip='norm', 'autoclip' or 'zclip', or leave them out with "
                "`exclude`."
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> list[str] | None:
        """The watched names."""
        return None if self.names is None else list(self.names)

    def load_state_dict(self, names: Any) -> None:
        """Restore :meth:`state_dict`: the names a resumed run compares against."""
        self.names = None if names is None else tuple(names)
        self._refs = None
