"""Which parameters are watched, and how they are grouped into layers.

A *layout* is computed once per optimizer (it only depends on the model and the optimizer's parameter
groups) and fixes the order of everything downstream: layers are kept in model definition order, which is
what "depth" means for every later analysis.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["GroupBy", "ParamLayout", "build_layout", "clean_name", "layer_name"]

# Segments that wrappers insert into parameter names: FSDP1, activation checkpointing, torch.compile.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")

GroupBy = str | Callable[[str], str]


def clean_name(name: str) -> str:
    """``name`` without the segments wrappers insert (``net.0._fsdp_wrapped_module.weight`` -> ``net.0.weight``)."""
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


def layer_name(param_name: str, group_by: GroupBy) -> str:
    """Return the layer a parameter belongs to.

    Args:
        param_name: The parameter's qualified name, e.g. ``"net.0.weight"``.
        group_by: ``"module"`` (the module that directly owns the parameter: ``"net.0"``), ``"parameter"``
            (every parameter is its own layer) or a callable mapping the parameter name to a layer name.

    Returns:
        The layer name. A parameter registered on the root module is its own layer under ``"module"``.
    """
    if callable(group_by):
        return str(group_by(param_name))
    if group_by == "parameter":
        return param_name
    owner, sep, _ = param_name.rpartition(".")
    return owner if sep else param_name


@dataclass(frozen=True)
class ParamLayout:
    """The watched parameters of one optimizer, grouped into layers in definition order.

    Attributes:
        param_names: Qualified names of the watched parameters, in definition order.
        params: The parameters themselves, aligned with ``param_names``.
        layer_names: The layers, in order of their first parameter's definition.
        layer_of_param: For each parameter, the index of its layer in ``layer_names``.
        layer_numel: Number of elements of each layer.
        sparse: Indices (into ``params``) of the parameters whose gradients are sparse COO tensors
            (``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``).
        transposed: Indices (into ``params``) of the weights stored as (inputs, outputs), whose units (output
            features) lie along dim 1: HF ``Conv1D`` (:func:`~lightning_gradhealth.model.detect.transposed_weights`).
            The statistics read their gradients transposed (a view), so that rows are units for every layer.
    """

    param_names: tuple[str, ...]
    params: tuple[torch.Tensor, ...]
    layer_names: tuple[str, ...]
    layer_of_param: tuple[int, ...]
    layer_numel: tuple[int, ...]
    sparse: frozenset[int] = frozenset()
    transposed: frozenset[int] = frozenset()

    @property
    def num_layers(self) -> int:
        """Number of layers."""
        return len(self.layer_names)

    def __len__(self) -> int:
        return len(self.params)

    def with_grad(self) -> tuple[int, ...]:
        """Indices (into :attr:`params`) of the parameters that have a gradient now."""
        return tuple(i for i, p in enumerate(self.params) if p.grad is not None)


def build_layout(
    named_parameters: Iterable[tuple[str, torch.Tensor]],
    *,
    group_by: GroupBy = "module",
    include: re.Pattern[str] | None = None,
    exclude: re.Pattern[str] | None = None,
    restrict_to: Sequence[torch.Tensor] | None = None,
    sparse_grads: Iterable[torch.Tensor] = (),
    frozen: bool = False,
    transposed: Iterable[torch.Tensor] = (),
) -> ParamLayout:
    """Select the trainable parameters and group them into layers.

    Names are taken without the segments that wrappers insert (FSDP1, activation checkpointing, ``torch.compile``).
    Frozen parameters (``requires_grad=False``) are never watched. A parameter is watched when its name matches
    ``include`` (if given), does not match ``exclude`` (if given) and, when ``restrict_to`` is given, is one of
    those tensors (an optimizer's parameters).

    Args:
        named_parameters: ``model.named_parameters()``; shared parameters appear once.
        group_by: See :func:`layer_name`.
        include: Regex searched in each parameter name; non-matching parameters are ignored.
        exclude: Regex searched in each parameter name; matching parameters are ignored.
        restrict_to: Only keep these tensors (compared by identity), e.g. an optimizer's parameters.
        sparse_grads: The parameters whose gradients are sparse (compared by identity).
        frozen: Select the frozen parameters instead (those that would be watched if they were trainable).
        transposed: The weights whose units lie along dim 1 (compared by identity; HF ``Conv1D``).

    Returns:
        The layout, possibly empty.
    """
    allowed = None if restrict_to is None else {id(p) for p in restrict_to}
    names: list[str] = []
    params: list[torch.Tensor] = []
    layers: dict[str, int] = {}
    layer_of: list[int] = []
    numel: list[int] = []
    seen: set[int] = set()
    for raw_name, param in named_parameters:
        name = clean_name(raw_name)  # names as the user wrote the model, whatever wraps it
        if param.requires_grad == frozen or id(param) in seen:
            continue
        if allowed is not None and id(param) not in allowed:
            continue
        if include is not None and include.search(name) is None:
            continue
        if exclude is not None and exclude.search(name) is not None:
            continue
        seen.add(id(param))
        layer = layer_name(name, group_by)
        if layer not in layers:
            layers[layer] = len(layers)
            numel.append(0)
        idx = layers[layer]
        names.append(name)
        params.append(param)
        layer_of.append(idx)
        numel[idx] += param.numel()
    sparse_ids = {id(p) for p in sparse_grads}
    transposed_ids = {id(p) for p in transposed}
    return ParamLayout(
        param_names=tuple(names),
        params=tuple(params),
        layer_names=tuple(layers),
        layer_of_param=tuple(layer_of),
        layer_numel=tuple(numel),
        sparse=frozenset(k for k, p in enumerate(params) if id(p) in sparse_ids),
        transposed=frozenset(k for k, p in enumerate(params) if id(p) in transposed_ids and p.dim() == 2),
    )
