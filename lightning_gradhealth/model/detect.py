"""Reading modules: what kind of layer a module is, its activation, its normalisation, residual connections.

The detection behind :func:`~lightning_gradhealth.model.inventory.take_inventory`: class names, attributes and the
source of ``forward`` are read, never a forward pass; :func:`traced_residual` traces with ``torch.fx`` where it can.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "ACTIVATION_ATTR",
    "BLOCK_CLASS",
    "COMPARABLE_KINDS",
    "CONFIG_ACTIVATION_ATTRS",
    "DOWNSAMPLE_SEGMENT",
    "EMBEDDING_PARAM",
    "INDEX_SEGMENT",
    "LAYER_KINDS",
    "NORMS",
    "PROJECTION_PARAM",
    "RESIDUAL_CLASSES",
    "SHORTCUT_SEGMENT",
    "ModuleKind",
    "activation_from_name",
    "activation_of_module",
    "activation_of_value",
    "module_kind",
    "norm_of_module",
    "param_numel",
    "param_shape",
    "source_activations",
    "transposed_weights",
    "unit_dim",
]

#: Every layer kind, in the order of :data:`LayerKind`.
LAYER_KINDS: Final[tuple[str, ...]] = ("linear", "conv", "embedding", "norm", "attention", "recurrent", "other")

#: The activation names an inventory can report.
ACTIVATIONS: Final[frozenset[str]] = frozenset(
    (
        "relu", "leaky_relu", "prelu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish",
        "softplus", "glu", "sigmoid", "hardsigmoid", "tanh", "hardtanh", "softmax",
    )
)  # fmt: skip

#: The normalisation names an inventory can report.
NORMS: Final[frozenset[str]] = frozenset(
    ("batchnorm", "layernorm", "groupnorm", "instancenorm", "rmsnorm", "weightnorm", "spectralnorm")
)

# Kinds whose weight matrices are compared with each other (see LayerInfo.comparable).
COMPARABLE_KINDS = frozenset(("linear", "conv", "attention"))

# ---------------------------------------------------------------------------------------------- activations
# Module classes of torch.nn -> activation (isinstance, so subclasses count).
_ACTIVATION_CLASSES: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.LeakyReLU, "leaky_relu"),
    (nn.PReLU, "prelu"),
    (nn.RReLU, "rrelu"),
    (nn.ReLU, "relu"),
    (nn.ReLU6, "relu"),
    (nn.SELU, "selu"),
    (nn.CELU, "celu"),
    (nn.ELU, "elu"),
    (nn.GELU, "gelu"),
    (nn.SiLU, "silu"),
    (nn.Mish, "mish"),
    (nn.Hardswish, "hardswish"),
    (nn.Softplus, "softplus"),
    (nn.GLU, "glu"),
    (nn.Hardsigmoid, "hardsigmoid"),
    (nn.Sigmoid, "sigmoid"),
    (nn.Hardtanh, "hardtanh"),
    (nn.Tanh, "tanh"),
    (nn.Softmax, "softmax"),
    (nn.LogSoftmax, "softmax"),
    (nn.Softmax2d, "softmax"),
)

# Names (of classes, functions, config strings) -> activation; first match wins, so the longer names come first
# ("gelu_pytorch_tanh" is a GELU, "hardswish" is not a SiLU, "leaky_relu" is not a ReLU).
_ACTIVATION_NAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), act)
    for pattern, act in (
        (r"leaky_?relu", "leaky_relu"),
        (r"^prelu|[^a-z]prelu", "prelu"),
        (r"rrelu", "rrelu"),
        (r"gelu|geglu", "gelu"),
        (r"hard_?swish", "hardswish"),
        (r"silu|swish|swiglu", "silu"),
        (r"mish", "mish"),
        (r"selu", "selu"),
        (r"celu", "celu"),
        (r"^elu|[^a-z]elu", "elu"),
        (r"relu", "relu"),
        (r"hard_?sigmoid", "hardsigmoid"),
        (r"sigmoid|logistic|expit", "sigmoid"),
        (r"hard_?tanh", "hardtanh"),
        (r"tanh", "tanh"),
        (r"softmax", "softmax"),
        (r"softplus", "softplus"),
        (r"^glu|[^a-z]glu", "glu"),
    )
)

# Attributes that hold an activation as a function, a class or a string (nn.TransformerEncoderLayer.activation,
# timm's act_layer, HF's act_fn / activation_function, ...).
ACTIVATION_ATTR = re.compile(r"^(act|activation|nonlinearity|non_linearity|hidden_act)(_fn|_func|_layer|_function)?$")
# The same in a HF-style config of the model.
CONFIG_ACTIVATION_ATTRS = ("hidden_act", "activation_function", "hidden_activation", "act_fn", "activation")

# Functional calls in the source of a module class: F.relu(...), torch.sigmoid(...), x.tanh(), ...
_FUNCTIONAL = re.compile(
    r"\b(?:F|torch|nn\.functional|torch\.nn\.functional|torch\.special)\.(leaky_relu|relu6|relu|prelu|rrelu|gelu|"
    r"silu|mish|selu|celu|elu|hardswish|softplus|glu|hardsigmoid|sigmoid|expit|hardtanh|tanh|log_softmax|softmax|"
    r"scaled_dot_product_attention)\s*\("
    r"|\.(relu|sigmoid|tanh|softmax|log_softmax)_?\(\s*[^\s)]?"
)
_COMMENT = re.compile(r"#[^\n]*")

# ---------------------------------------------------------------------------------------------- norms, residuals
_NORM_NAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), norm)
    for pattern, norm in (
        (r"rms_?norm", "rmsnorm"),
        (r"layer_?norm", "layernorm"),
        (r"group_?norm", "groupnorm"),
        (r"batch_?norm", "batchnorm"),
        (r"instance_?norm", "instancenorm"),
        (r"weight_?norm", "weightnorm"),
        (r"spectral_?norm", "spectralnorm"),
    )
)
# A class name that names a normalisation layer of another kind (ScaleNorm, L2Norm, LayerNorm2d, ...).
_NORM_CLASS = re.compile(r"Norm(\d[dD])?$|Norm(alization|alisation)(Layer)?$")
# Classes whose forward is known to add a residual connection.
RESIDUAL_CLASSES = re.compile(
    r"^(BasicBlock|Bottleneck|PreAct(Block|Bottleneck)|InvertedResidual|ResidualAttentionBlock)$"
    r"|Res(idual)?(Net|net)?(Block|Unit|Layer|Stage)(\d[dD])?$|^Residual"
)
BLOCK_CLASS = re.compile(r"(Block|Layer)$")
# Layers on a skip connection of a residual block, not on the main path.
SHORTCUT_SEGMENT = re.compile(r"(^|\.)(\w*shortcut\w*|skip|skip_connection|res_proj)(\.|$)")
DOWNSAMPLE_SEGMENT = re.compile(r"(^|\.)downsample(\.|$)")
PROJECTION_PARAM = re.compile(r"weight|proj", re.IGNORECASE)
EMBEDDING_PARAM = re.compile(r"(embed|token|pos_?emb|position)", re.IGNORECASE)



def activation_from_name(name: str) -> str | None:
    """The activation a name stands for (``"NewGELUActivation"`` -> ``"gelu"``), or None."""
    low = name.lower()
    for pattern, act in _ACTIVATION_NAMES:
        if pattern.search(low):
            return act
    return None


def activation_of_value(value: Any) -> str | None:
    """The activation held by an attribute: a string, a function, a partial, a class or a module."""
    if isinstance(value, str):
        return activation_from_name(value)
    if isinstance(value, functools.partial):
        return activation_of_value(value.func)
    if isinstance(value, nn.Module):
        return activation_of_module(value)
    if isinstance(value, type):
        return activation_from_name(value.__name__) if issubclass(value, nn.Module) else None
    name = getattr(value, "__name__", None)
    return activation_from_name(name) if callable(value) and isinstance(name, str) else None


def activation_of_module(module: nn.Module) -> str | None:
    """The activation a module is (nn.GELU, HF's NewGELUActivation), or None; only leaf modules count by name."""
    for cls, act in _ACTIVATION_CLASSES:
        if isinstance(module, cls):
            return act
    if next(iter(module.children()), None) is None and not module._parameters:
        return activation_from_name(type(module).__name__)
    return None


INDEX_SEGMENT = re.compile(r"(^|\.)\d+(\.|$)")  # a repeated block's index in a layer name

#: Frameworks whose classes are not read: their docstrings show activations the user's model may not have (every
#: LightningModule's methods mention ``F.relu`` in examples).
_FRAMEWORKS = ("torch.", "lightning.", "pytorch_lightning.", "lightning_fabric.", "torchmetrics.")
_STRING = re.compile(r'("""|\'\'\')(?:.|\n)*?\1')  # docstrings and other triple-quoted strings


@functools.lru_cache(maxsize=1024)
def source_activations(cls: type) -> tuple[frozenset[str], bool]:
    """The activations called functionally in the methods of a module class, and whether it computes attention.

    The methods the class and its bases define are read (``forward`` and its helpers), each with
    ``inspect.getsource`` (cheap for a function: no parse of the whole file). Classes of torch itself are not read
    (their activations are known by class or attribute), nor Lightning's; docstrings are left out. The source may
    be unavailable (a class defined in a REPL, a compiled extension): nothing is found then.
    """
    found: set[str] = set()
    attention = False
    for klass in cls.__mro__:
        if klass is object or (klass.__module__ or "").startswith(_FRAMEWORKS):
            continue
        for value in vars(klass).values():
            func = value.__func__ if isinstance(value, staticmethod | classmethod) else value
            if not inspect.isfunction(func):
                continue
            try:
                source = inspect.getsource(func)
            except (OSError, TypeError):
                continue
            for match in _FUNCTIONAL.finditer(_STRING.sub("", _COMMENT.sub("", source))):
                name = match.group(1) or match.group(2)
                if name == "scaled_dot_product_attention":
                    attention = True
                    found.add("softmax")
                elif (act := activation_from_name(name)) is not None:
                    found.add(act)
    return frozenset(found), attention


def norm_of_module(module: nn.Module) -> str | None:
    """The normalisation a module is (``"batchnorm"``, ``"rmsnorm"``, ...), ``"norm"`` for another kind, or None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "instancenorm"
    if isinstance(module, nn.LayerNorm):
        return "layernorm"
    if isinstance(module, nn.GroupNorm):
        return "groupnorm"
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None and isinstance(module, rms):
        return "rmsnorm"
    name = type(module).__name__
    for pattern, norm in _NORM_NAMES:
        if pattern.search(name):
            return norm
    if _NORM_CLASS.search(name) or isinstance(module, nn.LocalResponseNorm):
        return "norm"
    return None


# ---------------------------------------------------------------------------------------------- layer kinds
def param_shape(param: torch.Tensor) -> tuple[int, ...] | None:
    """The shape of a parameter, or None for a lazy one not materialised yet."""
    try:
        return tuple(param.shape)
    except (ValueError, RuntimeError):
        return None


def param_numel(param: torch.Tensor) -> int:
    """The number of entries of ``param`` (0 for a lazy, uninitialised one)."""
    shape = param_shape(param)
    return 0 if shape is None else int(torch.Size(shape).numel())


def _weight_ndim(module: nn.Module) -> int:
    weight = module._parameters.get("weight")
    shape = None if weight is None else param_shape(weight)
    return -1 if shape is None else len(shape)


@dataclass(frozen=True)
class ModuleKind:
    """What :func:`module_kind` found: the layer kind, its units and a convolution's kernel."""

    kind: str
    units: int | None = None
    kernel_size: tuple[int, ...] | None = None


def module_kind(module: nn.Module) -> ModuleKind:
    """The kind of a module, with its units and kernel size, by type first, then by duck typing."""
    name = type(module).__name__
    if isinstance(module, nn.modules.conv._ConvNd):
        return ModuleKind("conv", int(module.out_channels), tuple(int(k) for k in module.kernel_size))
    if isinstance(module, nn.Linear | nn.Bilinear):
        return ModuleKind("linear", int(module.out_features))
    if isinstance(module, nn.Embedding | nn.EmbeddingBag):
        return ModuleKind("embedding", int(module.num_embeddings))
    if isinstance(module, nn.MultiheadAttention):
        return ModuleKind("attention", int(module.embed_dim))
    if isinstance(module, nn.RNNBase | nn.RNNCellBase):
        return ModuleKind("recurrent", int(module.hidden_size))
    if norm_of_module(module) is not None:
        return ModuleKind("norm", _norm_units(module))
    ndim = _weight_ndim(module)
    weight = module._parameters.get("weight")
    shape = None if weight is None else param_shape(weight)
    if name == "Conv1D" and ndim == 2 and shape is not None:  # HF transformers (GPT-2): a linear, weight [in, out]
        return ModuleKind("linear", int(getattr(module, "nf", shape[1])))
    if "conv" in name.lower() and ndim >= 3 and shape is not None:
        kernel = getattr(module, "kernel_size", shape[2:])
        kernel = (kernel,) * (ndim - 2) if isinstance(kernel, int) else kernel
        return ModuleKind("conv", int(getattr(module, "out_channels", shape[0])), tuple(int(k) for k in kernel))
    if re.search(r"Linear|Dense", name) and ndim == 2 and shape is not None:  # LoRA, tensor-parallel, TE linears
        return ModuleKind("linear", int(getattr(module, "out_features", shape[0])))
    if "Embedding" in name and ndim == 2 and shape is not None:
        return ModuleKind("embedding", int(getattr(module, "num_embeddings", shape[0])))
    if re.search(r"LSTM|GRU|RNN", name) and hasattr(module, "hidden_size"):
        return ModuleKind("recurrent", int(module.hidden_size))
    if "Attention" in name and module._parameters:
        return ModuleKind("attention", getattr(module, "embed_dim", None))
    return ModuleKind("other")


def unit_dim(module: nn.Module, pname: str) -> int:
    """The dimension of parameter ``pname`` of ``module`` along which its units (output features) lie.

    1 for the weight of HF ``transformers.pytorch_utils.Conv1D`` (GPT-2's ``c_attn``/``c_fc``/``c_proj``), which
    stores it as (inputs, outputs) and computes ``x @ weight + bias``: recognised by its class name, a 2-D weight
    and, where it keeps one, ``nf`` (its number of outputs) equal to the weight's dim 1. 0 for everything else
    (``nn.Linear`` stores (outputs, inputs); convolutions (out_channels, ...)).
    """
    if pname != "weight" or type(module).__name__ != "Conv1D":
        return 0
    shape = param_shape(module._parameters["weight"]) if module._parameters.get("weight") is not None else None
    if shape is None or len(shape) != 2:
        return 0
    nf = getattr(module, "nf", None)
    return 1 if nf is None or nf == shape[1] else 0


def transposed_weights(model: nn.Module) -> list[torch.Tensor]:
    """The parameters of ``model`` whose units lie along dim 1 (:func:`unit_dim`), for the layout."""
    return [
        param
        for module in model.modules()
        for pname, param in module._parameters.items()
        if param is not None and unit_dim(module, pname) == 1
    ]


def _norm_units(module: nn.Module) -> int | None:
    for attr in ("num_features", "num_channels", "hidden_size", "dim"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, tuple | list) and shape:
        return int(shape[-1])
    weight = module._parameters.get("weight")
    weight_shape = None if weight is None else param_shape(weight)
    return int(weight_shape[0]) if weight_shape else None
