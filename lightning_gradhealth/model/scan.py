"""The one pass over a model's modules behind :func:`~lightning_gradhealth.model.inventory.take_inventory`.

:class:`InventoryScan` reads each module once (its activations, norm, attention, residual class and the parameters it
owns directly) and then groups the parameters into layers, as the layout does; no forward pass.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_gradhealth.model.detect import (
    ACTIVATION_ATTR,
    BLOCK_CLASS,
    COMPARABLE_KINDS,
    CONFIG_ACTIVATION_ATTRS,
    DOWNSAMPLE_SEGMENT,
    EMBEDDING_PARAM,
    PROJECTION_PARAM,
    RESIDUAL_CLASSES,
    SHORTCUT_SEGMENT,
    ModuleKind,
    activation_from_name,
    activation_of_module,
    activation_of_value,
    module_kind,
    norm_of_module,
    param_numel,
    param_shape,
    source_activations,
)
from lightning_gradhealth.model.layout import GroupBy, clean_name, layer_name

__all__ = ["InventoryScan"]


class InventoryScan:
    """What :func:`take_inventory` gathers in its one pass over the modules."""

    def __init__(self, model: nn.Module, group_by: GroupBy) -> None:
        self.model = model
        self.group_by = group_by
        self.modules: dict[str, nn.Module] = {}
        # per layer: its parameter names, {id: numel}, trainable, (largest numel, module, kind, class), a matrix
        self.params_of: dict[str, list[str]] = {}
        self.numel_of: dict[str, dict[int, int]] = {}
        self.trainable: dict[str, bool] = {}
        self.owner: dict[str, tuple[int, str, ModuleKind, str]] = {}
        self.matrix: dict[str, bool] = {}
        self.alias_only: dict[str, bool] = {}
        self.layers_of_param: dict[int, list[str]] = {}
        self.first_name: dict[int, str] = {}
        self.name_count: dict[int, int] = {}
        self.act_counts: dict[str, int] = {}
        self.norms: set[str] = set()
        self.has_attention = False
        self.pre_norm: bool | None = None
        self.residual_evidence = ""
        self._configs: set[int] = set()

    def count(self, act: str | None) -> None:
        """Count one use of activation ``act`` (None: nothing)."""
        if act is not None:
            self.act_counts[act] = self.act_counts.get(act, 0) + 1

    def module(self, raw_prefix: str, module: nn.Module) -> None:
        """Read one module: its activations, norm, attention, residual class, then its own parameters."""
        prefix = clean_name(raw_prefix)
        self.modules.setdefault(prefix, module)
        cls = type(module)
        config = vars(module).get("config")  # a HF-style config (PreTrainedModel and its modules keep one)
        if config is not None and id(config) not in self._configs:
            self._configs.add(id(config))
            for attr in CONFIG_ACTIVATION_ATTRS:
                value = getattr(config, attr, None)
                if isinstance(value, str):
                    self.count(activation_from_name(value))
        # activations: the module itself, its activation attributes, the functional calls of its class
        own = activation_of_module(module)
        self.count(own)
        for attr, value in () if isinstance(module, nn.RNNBase | nn.RNNCellBase) else vars(module).items():
            if ACTIVATION_ATTR.match(attr) and not isinstance(value, nn.Module):
                self.count(activation_of_value(value))
        # an activation module's own formula (NewGELU's tanh) is not another activation of the model
        functional, attends = (frozenset(), False) if own is not None else source_activations(cls)
        for act in functional:
            self.count(act)
        norm = norm_of_module(module)
        if norm is not None and norm != "norm":
            self.norms.add(norm)
        if isinstance(module, nn.MultiheadAttention) or "Attention" in cls.__name__ or attends:
            self.has_attention = True
        if isinstance(module, nn.MultiheadAttention):
            self.count("softmax")
        self._residual_class(prefix, module)
        if module._parameters:
            self._parameters(raw_prefix, prefix, module)

    def _residual_class(self, prefix: str, module: nn.Module) -> None:
        cls = type(module)
        if isinstance(module, nn.TransformerEncoderLayer | nn.TransformerDecoderLayer):
            self.has_attention = True
            first = bool(getattr(module, "norm_first", False))
            self.pre_norm = first if self.pre_norm is None else self.pre_norm and first
            self.residual_evidence = self.residual_evidence or f"class {cls.__name__}"
        elif not self.residual_evidence and RESIDUAL_CLASSES.search(cls.__name__):
            self.residual_evidence = f"class {cls.__name__}"
        elif not self.residual_evidence and BLOCK_CLASS.search(cls.__name__) and prefix:
            subs = list(module.modules())[1:]
            if any(norm_of_module(m) for m in subs) and any(
                isinstance(m, nn.MultiheadAttention) or "Attention" in type(m).__name__ for m in subs
            ):
                self.residual_evidence = f"class {cls.__name__}"

    def _parameters(self, raw_prefix: str, prefix: str, module: nn.Module) -> None:
        """The parameters the module owns directly (a parametrized weight is owned by its ParametrizationList)."""
        kind_module = module
        if type(module).__name__ == "ParametrizationList":
            base_name = raw_prefix.rsplit(".parametrizations", 1)[0] if ".parametrizations" in raw_prefix else ""
            try:
                kind_module = self.model.get_submodule(base_name) if base_name else self.model
            except AttributeError:
                kind_module = module
        mkind = module_kind(kind_module)
        for pname, param in module._parameters.items():
            if param is None:
                continue
            name = clean_name(f"{raw_prefix}.{pname}" if raw_prefix else pname)
            layer = layer_name(name, self.group_by)
            kind = mkind
            shape = param_shape(param)
            if kind.kind == "other" and EMBEDDING_PARAM.search(pname):  # pos_embed, cls_token of a ViT root
                kind = ModuleKind("embedding", shape[-2] if shape and len(shape) >= 2 else None)
            pid = id(param)
            is_alias = pid in self.first_name
            self.first_name.setdefault(pid, name)
            self.name_count[pid] = self.name_count.get(pid, 0) + 1
            if layer not in self.params_of:
                self.params_of[layer], self.numel_of[layer] = [], {}
                self.trainable[layer] = self.matrix[layer] = False
                self.alias_only[layer] = True
            self.params_of[layer].append(name)
            n = param_numel(param)
            self.numel_of[layer][pid] = n
            self.trainable[layer] = self.trainable[layer] or param.requires_grad
            self.alias_only[layer] = self.alias_only[layer] and is_alias
            if (
                shape is not None
                and len(shape) >= 2
                and kind.kind in COMPARABLE_KINDS
                and (kind.kind != "attention" or PROJECTION_PARAM.search(pname) is not None)
            ):  # a weight matrix; not an attention's relative-position table
                self.matrix[layer] = True
            if layer not in self.owner or n > self.owner[layer][0]:
                self.owner[layer] = (n, prefix, kind, type(kind_module).__name__)
            holders = self.layers_of_param.setdefault(pid, [])
            if layer not in holders:
                holders.append(layer)

    def layers(self, branches: dict[str, str]) -> list[dict[str, Any]]:
        """The fields of each layer's ``LayerInfo``, in definition order; inside a scaled branch: not comparable."""
        tied_with: dict[str, set[str]] = {layer: set() for layer in self.params_of}
        shared: set[str] = set()
        for pid, holders in self.layers_of_param.items():
            if self.name_count[pid] > 1:  # registered under two names or more: tied
                shared.update(holders)
                for layer in holders:
                    tied_with[layer].update(h for h in holders if h != layer)
        order = list(self.params_of)
        comparable = {layer: self.matrix[layer] and self.owner[layer][2].kind in COMPARABLE_KINDS for layer in order}
        head_module = next((self.owner[layer][1] for layer in reversed(order) if comparable[layer]), None)
        infos: list[dict[str, Any]] = []
        for depth, layer in enumerate(order):
            _, module_name, kind, module_class = self.owner[layer]
            shortcut = bool(kind.kind in ("linear", "conv") and SHORTCUT_SEGMENT.search(module_name))
            if not shortcut and kind.kind in ("linear", "conv") and (m := DOWNSAMPLE_SEGMENT.search(module_name)):
                block = self.modules.get(module_name[: m.start()])
                shortcut = block is not None and bool(RESIDUAL_CLASSES.search(type(block).__name__))
            scaled = not shortcut and any(module_name == b or module_name.startswith(f"{b}.") for b in branches)
            infos.append(
                dict(
                    name=layer,
                    kind=kind.kind,
                    module_class=module_class,
                    params=tuple(self.params_of[layer]),
                    numel=sum(self.numel_of[layer].values()),
                    depth=depth,
                    units=kind.units,
                    kernel_size=kind.kernel_size,
                    comparable=comparable[layer] and not scaled,
                    tied=layer in shared,
                    tied_with=tuple(sorted(tied_with[layer], key=order.index)),
                    alias=self.alias_only[layer],
                    is_head=head_module is not None and module_name == head_module,
                    shortcut=shortcut,
                    trainable=self.trainable[layer],
                    scaled=scaled and comparable[layer],
                )
            )
        return infos
