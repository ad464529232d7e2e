"""Residual connections: traced additions, and residual branches scaled down by design.

:func:`traced_residual` traces a model's ``forward`` (or, for a module without one of its own, such as a
LightningModule that only holds ``self.model``, its children's) with ``torch.fx`` and finds an addition joining a
value with one computed from it through a layer. :func:`scaled_branches` reads the modules and parameters, no
forward pass, for residual branches whose output is multiplied by a tiny gain at initialisation: layer scale
(ConvNeXt, Liu et al. 2022; CaiT, Touvron et al. 2021: a per-channel ``gamma`` of 1e-6 to 1e-5), ReZero (Bachlechner
et al. 2021: a scalar ``alpha`` at 0), SkipInit (De & Smith 2020) and zero-initialised last norms (Goyal et al.
2017, torchvision's ``zero_init_residual``). The layers inside such a branch get gradients scaled by that gain:
small by design, not a vanishing or imbalanced flow.
"""

from __future__ import annotations

import operator
import re
import warnings

import torch
from torch import nn

from lightning_gradhealth.model.detect import norm_of_module, param_shape
from lightning_gradhealth.model.layout import clean_name

__all__ = ["GAIN_MAX", "scaled_branches", "traced_residual"]

_ADD_FUNCTIONS = frozenset((operator.add, operator.iadd, torch.add))
_MAX_TRACE_MODULES = 20_000
#: A gain parameter of a residual branch, by name: ConvNeXt's ``gamma``, timm's ``LayerScale.gamma``/``ls1``,
#: ReZero's ``alpha``/``resweight``, SkipInit's ``alpha``/``skip_gain``.
_GAIN_PARAM = re.compile(
    r"^(gamma(_?\d)?|ls_?\d*|layer_?scale\w*|alpha|res_?weight|rezero\w*|skip_?(init|gain)\w*|res_?scale|"
    r"branch_?(scale|gain)|residual_?(scale|gain))$",
    re.IGNORECASE,
)
_GAIN_CLASS = re.compile(r"LayerScale|ReZero|SkipInit", re.IGNORECASE)
GAIN_MAX = 1e-2
"""A gain whose largest entry is at most this (zero included) scales its branch down by design."""
#: Frameworks whose ``forward`` is not the model's own (a LightningModule that only holds ``self.model``).
_NO_FORWARD = ("_forward_unimplemented", "LightningModule.forward")
_ZEROABLE_NORMS = frozenset(("batchnorm", "groupnorm", "instancenorm", "layernorm"))


def _unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP / DataParallel / ``torch.compile`` / Fabric wrappers (for tracing only)."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "_forward_module", None)
        if inner is None and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
    return model


#: Wrappers whose ``forward`` keeps state (FSDP1 initialises its root lazily at the first call, FSDP2 registers its
#: hooks): never run on proxies.
_STATEFUL_WRAPPERS = frozenset(("FullyShardedDataParallel", "FSDPModule", "DistributedDataParallel"))


def _hooked(module: nn.Module) -> bool:
    if any(cls.__name__ in _STATEFUL_WRAPPERS for cls in type(module).__mro__):
        return True
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks)


def _has_forward(module: nn.Module) -> bool:
    """Whether ``module`` has a ``forward`` of its own (not nn.Module's placeholder nor LightningModule's)."""
    return getattr(type(module).forward, "__qualname__", "") not in _NO_FORWARD


def traced_residual(model: nn.Module) -> str:
    """Trace ``model`` symbolically and return where an addition joins a value with one computed from it.

    A module without a ``forward`` of its own (a LightningModule holding ``self.model``, an ``nn.Module`` used as
    a container such as ``nn.ModuleList``) is not traced itself: its children are, in order. Returns ``""`` when none
    is found, or when nothing can be traced (data-dependent control flow, unsupported calls: the common case for
    big models).
    """
    root = _unwrap(model)
    if _has_forward(root):
        return _trace(root)
    for name, child in root.named_children():
        found = _trace(child) if _has_forward(child) else traced_residual(child)
        if found:
            return f"{found} in `{name}`"
    return ""


def _trace(root: nn.Module) -> str:
    """:func:`traced_residual` of one module with a ``forward``.

    The path between the two operands must go through a layer (a module with parameters, or a parameter read in
    the forward), so that ``x + 0.044715 * x**3`` inside a GELU is not a residual.
    """
    modules = list(root.modules())
    if len(modules) > _MAX_TRACE_MODULES or any(_hooked(m) for m in modules):
        return ""  # a module with hooks (FSDP2's, the user's) must not run them on proxies: they may keep state
    if any(type(p).__name__ == "DTensor" for p in root.parameters()):
        return ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(root).graph
    except Exception:  # tracing arbitrary user code fails in arbitrary ways
        return ""
    nodes = list(graph.nodes)
    index = {node: i for i, node in enumerate(nodes)}
    with_params: dict[str, bool] = {}

    def is_layer(node: torch.fx.Node) -> bool:
        if node.op == "call_module":
            target = str(node.target)
            if target not in with_params:
                try:
                    sub = root.get_submodule(target)
                except AttributeError:
                    sub = None
                with_params[target] = sub is not None and next(sub.parameters(), None) is not None
            return with_params[target]
        return any(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in node.all_input_nodes)

    for node in nodes:
        is_add = (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
            node.op == "call_method" and node.target in ("add", "add_")
        )
        args = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)] if is_add else []
        if len(args) != 2 or args[0] is args[1]:
            continue
        early, late = sorted(args, key=index.__getitem__)
        # ancestors of `late` defined after `early`, then those of them reachable from `early`
        between: set[torch.fx.Node] = set()
        stack = [late]
        while stack:
            cur = stack.pop()
            if cur in between or index[cur] <= index[early]:
                continue
            between.add(cur)
            stack.extend(cur.all_input_nodes)
        reached: set[torch.fx.Node] = set()
        stack = [u for u in early.users if u in between]
        while stack:
            cur = stack.pop()
            if cur in reached:
                continue
            reached.add(cur)
            stack.extend(u for u in cur.users if u in between)
        if late in reached and any(is_layer(n) for n in reached):
            return f"traced add {node.name}({early.name}, {late.name})"
    return ""


def _largest(param: torch.Tensor) -> float | None:
    """``max |param|`` of a plain, materialised tensor (read once, at the start), else None."""
    data = param.detach()
    if type(data) not in (torch.Tensor, nn.Parameter) or data.is_meta or data.numel() == 0:
        return None
    with torch.no_grad():
        return float(data.abs().max())


def _last_in_parent(modules: dict[str, nn.Module], raw: str) -> bool:
    """Whether ``raw`` is the last child with parameters of its parent module (a branch's last norm)."""
    parent_name, _, own = raw.rpartition(".")
    parent = modules.get(parent_name)
    if parent is None or not raw:
        return False
    with_params = [name for name, child in parent.named_children() if next(child.parameters(), None) is not None]
    return bool(with_params) and with_params[-1] == own


def scaled_branches(model: nn.Module) -> dict[str, str]:
    """The residual branches scaled down at initialisation, by the module that holds each one.

    A branch is the module that owns a tiny gain (a parameter named like a layer scale, ReZero or SkipInit gain,
    or any parameter of a ``LayerScale``-like class, whose entries are all at most :data:`GAIN_MAX` in magnitude),
    or its parent when the gain's module holds nothing else (timm's ``LayerScale`` beside the attention it scales);
    or the parent of a batch, group, instance or layer norm whose weight is all zeros and which is the last module
    with parameters in that parent (a zero-initialised last norm; not an RMSNorm, whose zero weight stands for 1 in
    Gemma's ``x * (1 + weight)``). The model's root is never a branch.

    Returns:
        ``{block name: evidence}``, block names cleaned as layer names (no wrapper segments).
    """
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for raw, module in modules.items():
        norm = norm_of_module(module) in _ZEROABLE_NORMS and _last_in_parent(modules, raw)
        for pname, param in module._parameters.items():
            shape = None if param is None else param_shape(param)  # (None: a lazy parameter)
            if shape is None or len(shape) > 1:
                continue
            gain = bool(_GAIN_PARAM.search(pname) or _GAIN_CLASS.search(type(module).__name__))
            named = pname == "weight" if norm else gain
            largest = _largest(param) if named else None
            if largest is None or largest > (0.0 if norm else GAIN_MAX):
                continue
            alone = not any(p is not param for p in module.parameters())
            block = raw.rpartition(".")[0] if norm or alone else raw
            if block:
                what = "zero-initialised norm" if norm else "residual gain"
                out.setdefault(clean_name(block), f"{what} `{clean_name(f'{raw}.{pname}')}` ({largest:.0e})")
    return out
