"""What the model is made of: the kind of every layer, its activations, norms and residual connections.

An *inventory* is taken once per model, in one pass over its modules (no forward pass), so that the rules can
compare like with like (the weight matrices of linear and convolution layers, not embeddings against norm biases),
read a depth profile along the main path, and so that the fixes fit the model (a GELU transformer is not told to
use GELU; a ResNet is not told to add residual connections).

Layer names are those of :class:`~lightning_gradhealth.model.layout.ParamLayout`: the parameter names without the
segments wrappers insert (:func:`~lightning_gradhealth.model.layout.clean_name`), grouped by
:func:`~lightning_gradhealth.model.layout.layer_name`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

from lightning_gradhealth.model.detect import ACTIVATIONS, INDEX_SEGMENT, LAYER_KINDS, NORMS
from lightning_gradhealth.model.layout import GroupBy, clean_name
from lightning_gradhealth.model.recurrence import TimeProfile, watch_recurrence
from lightning_gradhealth.model.residual import scaled_branches, traced_residual
from lightning_gradhealth.model.scan import InventoryScan

__all__ = [
    "ACTIVATIONS",
    "LAYER_KINDS",
    "NORMS",
    "LayerInfo",
    "LayerKind",
    "ModelInventory",
    "take_inventory",
    "watch_feature_maps",
]

LayerKind = Literal["linear", "conv", "embedding", "norm", "attention", "recurrent", "other"]


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class LayerInfo:
    """One layer, as the monitor groups parameters into layers.

    Attributes:
        name: The layer's name, as in :attr:`~lightning_gradhealth.model.layout.ParamLayout.layer_names`.
        kind: ``"linear"``, ``"conv"``, ``"embedding"``, ``"norm"``, ``"attention"`` (the projections a
            ``nn.MultiheadAttention`` owns itself), ``"recurrent"`` (LSTM/GRU/RNN) or ``"other"``. A layer that
            groups the parameters of several modules takes the kind of the module owning its largest parameter.
        module_class: The class name of that module (``"Linear"``, ``"Conv1D"``, ``"BatchNorm2d"``).
        params: The names of its parameters, including the names under which a shared parameter is registered
            again (which ``named_parameters()`` drops).
        numel: Number of elements of its distinct parameters.
        depth: Its position among the inventory's layers, in definition order (the order of
            ``named_parameters(remove_duplicate=False)``).
        units: Output features, output channels, embeddings, hidden size or normalised features, where known.
        kernel_size: The kernel of a convolution, else None.
        comparable: A weight matrix of a linear, convolution or attention projection (a parameter of 2 or more
            dimensions): the layers whose gradient norms are compared with each other. Embeddings, norms,
            recurrent weights and layers of 1-D parameters only (biases) are not comparable.
        tied: One of its parameters is also registered under another layer (GPT-2's ``wte``/``lm_head``).
        tied_with: The other layers sharing its parameters.
        alias: Every parameter is registered first under another name: ``named_parameters()`` (and so the
            layout) does not list this layer; its gradient is accumulated in the first one.
        is_head: The output head: the module owning the last comparable layer.
        shortcut: A projection on the skip connection of a residual block (ResNet's ``downsample``), off the
            main path.
        trainable: At least one of its parameters requires a gradient.
        scaled: A weight matrix inside a residual branch scaled down by design at initialisation (layer scale,
            ReZero, SkipInit, a zero-initialised last norm: :func:`~.residual.scaled_branches`): its gradients are
            small by design, so it is not :attr:`comparable` with the others.
    """

    name: str
    kind: str
    module_class: str
    params: tuple[str, ...]
    numel: int
    depth: int
    units: int | None = None
    kernel_size: tuple[int, ...] | None = None
    comparable: bool = False
    tied: bool = False
    tied_with: tuple[str, ...] = ()
    alias: bool = False
    is_head: bool = False
    shortcut: bool = False
    trainable: bool = True
    scaled: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "kind": self.kind,
            "module_class": self.module_class,
            "params": list(self.params),
            "numel": self.numel,
            "depth": self.depth,
            "units": self.units,
            "kernel_size": None if self.kernel_size is None else list(self.kernel_size),
            "comparable": self.comparable,
            "tied": self.tied,
            "tied_with": list(self.tied_with),
            "alias": self.alias,
            "is_head": self.is_head,
            "shortcut": self.shortcut,
            "trainable": self.trainable,
            "scaled": self.scaled,
        }


_LAYER_FIELDS = frozenset(f.name for f in fields(LayerInfo))


@dataclass(frozen=True)
class ModelInventory:
    """What a model is made of (:func:`take_inventory`).

    Attributes:
        layers: Every layer, in definition order (``layers[i].depth == i``).
        activations: The activations found (:data:`ACTIVATIONS`): activation modules, activation attributes
            (``nn.TransformerEncoderLayer(activation="gelu")``, ``act_layer``), the model's HF-style config
            (``hidden_act``) and the functional calls visible in the source of its module classes (``F.relu``,
            ``torch.sigmoid``, ``x.tanh()``). The gates inside LSTM/GRU cells are not counted (see
            :attr:`is_recurrent`).
        norms: The normalisations found (:data:`NORMS`), parameters or not.
        residual: The model adds residual connections: a known residual block or transformer layer class, or,
            in a traced forward, an addition joining a value with one computed from it through a layer.
        residual_evidence: What showed it (``"class BasicBlock"``, ``"traced add in layer1.0"``), or ``""``.
        has_attention: The model computes attention (``nn.MultiheadAttention``, a class named ``*Attention*``,
            ``F.scaled_dot_product_attention``).
        pre_norm: For models built of ``nn.TransformerEncoderLayer``/``DecoderLayer``: True when every one of
            them normalises before its sublayers (``norm_first=True``), False when one does after (post-norm);
            None when unknown.
        main_activation: The most frequent hidden activation (softmax aside), or None.
        group_by: How parameters were grouped into layers: ``"module"``, ``"parameter"`` or ``"callable"``.
        feature_maps: The input feature-map size of each convolution layer, once seen (:func:`watch_feature_maps`:
            the first forward pass after the inventory was taken).
        time_profiles: Per recurrent layer, how much gradient reaches its first time steps against its last ones
            (:class:`~.recurrence.TimeProfile`, watched from the first forward pass on by :func:`watch_feature_maps`).
        scaled_branches: What showed each residual branch scaled down by design (``"residual gain
            `stages.0.0.gamma` (1e-06)"``); their layers are :attr:`LayerInfo.scaled`, and such a model is residual.
    """

    layers: tuple[LayerInfo, ...]
    activations: frozenset[str] = frozenset()
    norms: frozenset[str] = frozenset()
    residual: bool = False
    residual_evidence: str = ""
    has_attention: bool = False
    pre_norm: bool | None = None
    main_activation: str | None = None
    group_by: str = "module"
    feature_maps: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)
    scaled_branches: tuple[str, ...] = ()
    time_profiles: dict[str, TimeProfile] = field(default_factory=dict, compare=False)
    _by_name: dict[str, LayerInfo] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_name.update((layer.name, layer) for layer in self.layers)

    # ---------------------------------------------------------------------------------- look-up
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerInfo]:
        return iter(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> LayerInfo:
        return self._by_name[name]

    def get(self, name: str) -> LayerInfo | None:
        """The layer called ``name``, or None."""
        return self._by_name.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        """The layer names, in definition order."""
        return tuple(layer.name for layer in self.layers)

    def kind_of(self, name: str) -> str:
        """The kind of layer ``name``; ``"other"`` for a name the inventory does not know."""
        layer = self._by_name.get(name)
        return "other" if layer is None else layer.kind

    def _select(self, names: Iterable[str] | None) -> list[LayerInfo]:
        if names is None:
            return list(self.layers)
        return sorted((self._by_name[n] for n in dict.fromkeys(names) if n in self._by_name), key=lambda x: x.depth)

    def of_kind(self, *kinds: str, names: Iterable[str] | None = None) -> tuple[str, ...]:
        """The layers of the given kinds, in depth order, among ``names`` if given."""
        return tuple(layer.name for layer in self._select(names) if layer.kind in kinds)

    def comparable(self, names: Iterable[str] | None = None) -> tuple[str, ...]:
        """The comparable layers (weight matrices; head included), in depth order, among ``names`` if given."""
        return tuple(layer.name for layer in self._select(names) if layer.comparable)

    def main_path(self, names: Iterable[str] | None = None) -> tuple[str, ...]:
        """The layers along the main path, for a depth profile.

        Args:
            names: Keep only these layers (e.g. a layout's or a history's layer names; unknown names are
                dropped). None: every layer of the inventory.

        Returns:
            The comparable layers (linear, convolution and attention weight matrices) in depth order, without
            embeddings, norms, recurrent layers, the output head, shortcut projections and aliases of tied
            parameters.
        """
        return tuple(
            layer.name
            for layer in self._select(names)
            if layer.comparable and not layer.is_head and not layer.shortcut and not layer.alias
        )

    def blocks(self, names: Iterable[str] | None = None) -> tuple[str, ...]:
        """The main path's layers inside repeated blocks, to compare like with like.

        A layer is in a repeated block when its name has an index segment (``encoder.3.attention.self.query``,
        ``layer2.0.conv1``, ``h.11.mlp.c_fc``, ``features.4``): stems, heads and the layers around the blocks
        (an MLM head's transform, a patch embedding) are left out. Falls back to :meth:`main_path` when fewer than
        two layers are in blocks.
        """
        path = self.main_path(names)
        inside = tuple(name for name in path if INDEX_SEGMENT.search(name))
        return inside if len(inside) >= 2 else path

    @property
    def head(self) -> str | None:
        """The first layer of the output head, or None when the model has no comparable layer."""
        return next((layer.name for layer in self.layers if layer.is_head), None)

    @property
    def tied(self) -> tuple[str, ...]:
        """The layers sharing a parameter with another layer, in depth order."""
        return tuple(layer.name for layer in self.layers if layer.tied)

    @property
    def kinds(self) -> frozenset[str]:
        """The layer kinds present."""
        return frozenset(layer.kind for layer in self.layers)

    # ---------------------------------------------------------------------------------- model-level flags
    @property
    def has_conv(self) -> bool:
        """The model has convolution layers."""
        return "conv" in self.kinds

    @property
    def has_linear(self) -> bool:
        """The model has linear layers (HF ``Conv1D`` included)."""
        return "linear" in self.kinds

    @property
    def is_transformer(self) -> bool:
        """Attention with layer or RMS normalisation."""
        return self.has_attention and bool(self.norms & {"layernorm", "rmsnorm"})

    @property
    def is_convnet(self) -> bool:
        """Convolutions, and not a transformer (a ViT's patch embedding does not make it a convnet)."""
        return self.has_conv and not self.is_transformer

    @property
    def is_recurrent(self) -> bool:
        """LSTM/GRU/RNN layers."""
        return "recurrent" in self.kinds

    @property
    def recurrent_classes(self) -> frozenset[str]:
        """The classes of the recurrent layers (``"LSTM"``, ``"GRU"``, ``"RNN"``)."""
        return frozenset(layer.module_class for layer in self.layers if layer.kind == "recurrent")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInventory:
        """The inventory :meth:`to_dict` wrote (``gradhealth report`` reads it back with the run).

        Raises:
            KeyError: A field is missing.
        """
        layers = tuple(
            LayerInfo(
                **{
                    **{k: v for k, v in layer.items() if k in _LAYER_FIELDS},
                    "params": tuple(layer["params"]),
                    "kernel_size": None if layer.get("kernel_size") is None else tuple(layer["kernel_size"]),
                    "tied_with": tuple(layer.get("tied_with", ())),
                }
            )
            for layer in data["layers"]
        )
        return cls(
            layers=layers,
            activations=frozenset(data.get("activations", ())),
            norms=frozenset(data.get("norms", ())),
            residual=bool(data.get("residual", False)),
            residual_evidence=str(data.get("residual_evidence", "")),
            has_attention=bool(data.get("has_attention", False)),
            pre_norm=data.get("pre_norm"),
            main_activation=data.get("main_activation"),
            group_by=str(data.get("group_by", "module")),
            feature_maps={k: tuple(v) for k, v in data.get("feature_maps", {}).items()},
            scaled_branches=tuple(data.get("scaled_branches", ())),
            time_profiles={k: TimeProfile(float(v)) for k, v in data.get("time_profiles", {}).items()},
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, for the report."""
        return {
            "group_by": self.group_by,
            "activations": sorted(self.activations),
            "main_activation": self.main_activation,
            "norms": sorted(self.norms),
            "residual": self.residual,
            "residual_evidence": self.residual_evidence,
            "has_attention": self.has_attention,
            "pre_norm": self.pre_norm,
            "is_transformer": self.is_transformer,
            "is_convnet": self.is_convnet,
            "is_recurrent": self.is_recurrent,
            "head": self.head,
            "tied": list(self.tied),
            "main_path": list(self.main_path()),
            "layers": [layer.to_dict() for layer in self.layers],
            "feature_maps": {name: list(size) for name, size in self.feature_maps.items()},
            "scaled_branches": list(self.scaled_branches),
            "time_profiles": {
                name: ratio for name, p in self.time_profiles.items() if (ratio := p.early_over_late()) is not None
            },
        }


def watch_feature_maps(inventory: ModelInventory, model: nn.Module) -> Callable[[], None]:
    """Record each convolution's input feature-map size at the next forward pass, and watch recurrent layers.

    A 3x3 convolution on 1x1 maps only ever sees zero padding in 8 of its 9 taps: the report shows the size beside
    the kernel, so such zero gradient entries read as structure. Those hooks remove themselves after their first
    call. The recurrent layers' gradient through time is watched into :attr:`ModelInventory.time_profiles` for as
    long as the monitor runs (:func:`~.recurrence.watch_recurrence`). The returned function removes every hook.
    """
    handles: list[Any] = []

    def layer_of(mod_name: str, pname: str) -> str:
        return clean_name(mod_name) if inventory.group_by == "module" else clean_name(f"{mod_name}.{pname}")

    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        name = layer_of(mod_name, "weight")
        if inventory.get(name) is None:
            continue

        def hook(_module: nn.Module, args: tuple[Any, ...], *, name: str = name, index: int = len(handles)) -> None:
            if args and isinstance(args[0], torch.Tensor):
                spatial = _module.weight.dim() - 2  # type: ignore[union-attr,operator]
                inventory.feature_maps[name] = tuple(int(d) for d in args[0].shape[-spatial:])
            handles[index].remove()

        handles.append(module.register_forward_pre_hook(hook))
    unwatch = watch_recurrence(model, inventory.time_profiles, lambda mod_name: layer_of(mod_name, "weight_ih_l0"))

    def remove() -> None:
        for handle in handles:
            handle.remove()
        unwatch()

    return remove


# ---------------------------------------------------------------------------------------------- taking it


def _group_key(group_by: GroupBy) -> str:
    return "callable" if callable(group_by) else str(group_by)


def take_inventory(model: nn.Module, group_by: GroupBy = "module", *, trace: bool = True) -> ModelInventory:
    """Take the inventory of ``model``: one pass over its modules, no forward pass.

    Args:
        model: The model (wrappers are seen through: names are cleaned as in the layout).
        group_by: How parameters are grouped into layers, as for the monitor (see
            :func:`~lightning_gradhealth.model.layout.layer_name`).
        trace: When no known residual block is found by class, trace the forward symbolically
            (:func:`~lightning_gradhealth.model.residual.traced_residual`: the children's when the model has no
            ``forward`` of its own; guarded: a model that cannot be traced is just not known to be residual) to
            find residual additions. False: classes and scaled branches only.

    Returns:
        The inventory. Layers include frozen parameters (see :attr:`LayerInfo.trainable`) and the aliases of
        shared parameters (see :attr:`LayerInfo.alias`).
    """
    if group_by not in ("module", "parameter") and not callable(group_by):
        raise ValueError(f"group_by must be 'module', 'parameter' or a callable, got {group_by!r}")
    scan = InventoryScan(model, group_by)
    for raw_prefix, module in model.named_modules(remove_duplicate=False):
        scan.module(raw_prefix, module)
    branches = scaled_branches(model)
    evidence = scan.residual_evidence or next(iter(branches.values()), "")
    if not evidence and trace:
        evidence = traced_residual(model)
    hidden = {a: c for a, c in scan.act_counts.items() if a != "softmax"}
    main_activation = max(hidden, key=lambda a: (hidden[a], a in ("relu", "gelu", "silu"))) if hidden else None
    return ModelInventory(
        layers=tuple(LayerInfo(**fields) for fields in scan.layers(branches)),
        activations=frozenset(scan.act_counts),
        norms=frozenset(scan.norms),
        residual=bool(evidence),
        residual_evidence=evidence,
        has_attention=scan.has_attention,
        pre_norm=scan.pre_norm,
        main_activation=main_activation,
        group_by=_group_key(group_by),
        scaled_branches=tuple(branches.values()),
    )
