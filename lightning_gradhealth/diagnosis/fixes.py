"""Recommended fixes and code to add, by problem kind, fitted to the model when its inventory is known.

:data:`FIXES` and :data:`CODE` (:mod:`~lightning_gradhealth.diagnosis.remedies`, from the literature cited in
``docs/diagnosis.md``) are what to recommend when nothing is known about the model. :func:`fixes_for` and
:func:`code_for` fit them to a :class:`~lightning_gradhealth.model.inventory.ModelInventory`: a model is never told to
add what it already has (a GELU transformer is not told to use GELU, a ResNet is not told to add residual connections
and normalisation; it is told something useful instead), and the code matches its layers (initialisation code covers
its convolutions, with the nonlinearity of its activation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_gradhealth.diagnosis.remedies import CODE, FIXES
from lightning_gradhealth.schema.kinds import Kind

if TYPE_CHECKING:
    from lightning_gradhealth.model.inventory import ModelInventory

__all__ = ["CODE", "FIXES", "code_for", "fixes_for"]

_CLIP_CODE = "GradientHealthMonitor(clip='norm', max_norm={max_norm})"
_SATURATING = frozenset(("sigmoid", "tanh", "hardtanh", "hardsigmoid"))
_LEAKY = frozenset(("leaky_relu", "prelu", "rrelu", "elu", "selu", "celu"))
_SMOOTH = frozenset(("gelu", "silu", "mish", "softplus", "glu", "hardswish"))
_TORCH_CONVS = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")


@dataclass(frozen=True)
class _Traits:
    """What the fixes need to know about a model, read once from its inventory."""

    relu: bool
    leaky: bool
    smooth: frozenset[str]
    saturating: frozenset[str]
    hidden_saturating: bool  # sigmoid/tanh are the hidden activations (no ReLU-like activation besides)
    known_activations: bool
    main: str | None
    norm: bool
    residual: bool
    transformer: bool
    attention: bool
    convnet: bool
    conv_classes: tuple[str, ...]
    linear: bool
    hf_conv1d: bool
    recurrent: bool
    vanilla_rnn: bool
    embedding: bool
    pre_norm: bool | None
    tied: tuple[str, ...]

    @classmethod
    def of(cls, inv: ModelInventory) -> _Traits:
        acts = inv.activations - {"softmax"}
        saturating = acts & _SATURATING
        modern = acts - _SATURATING
        classes = {layer.module_class for layer in inv.layers if layer.kind == "conv"}
        convs = tuple(c for c in _TORCH_CONVS if c in classes) or (("Conv2d",) if classes else ())
        return cls(
            relu="relu" in acts,
            leaky=bool(acts & _LEAKY),
            smooth=acts & _SMOOTH,
            saturating=saturating,
            hidden_saturating=bool(saturating) and not modern,
            known_activations=bool(acts) or inv.is_recurrent,
            main=inv.main_activation,
            norm=bool(inv.norms - {"weightnorm", "spectralnorm"}),
            residual=inv.residual,
            transformer=inv.is_transformer,
            attention=inv.has_attention,
            convnet=inv.is_convnet,
            conv_classes=convs,
            linear=any(layer.kind == "linear" and layer.module_class != "Conv1D" for layer in inv.layers),
            hf_conv1d=any(layer.module_class == "Conv1D" for layer in inv.layers),
            recurrent=inv.is_recurrent,
            vanilla_rnn=bool(inv.recurrent_classes & {"RNN", "RNNCell"}),
            embedding="embedding" in inv.kinds,
            pre_norm=inv.pre_norm,
            tied=inv.tied,
        )

    @property
    def clip(self) -> str:
        """The clipping fix, with the max_norm of the model's family."""
        if self.recurrent:
            return "clip gradients: GradientHealthMonitor(clip='norm', max_norm=5.0), the usual bound for RNNs"
        if self.transformer:
            return "clip gradients: GradientHealthMonitor(clip='norm', max_norm=1.0), the usual bound for transformers"
        return "clip gradients: GradientHealthMonitor(clip='norm', max_norm=1.0) or Trainer(gradient_clip_val=1.0)"

    @property
    def max_norm(self) -> str:
        """The max_norm of the model's family, as code."""
        return "5.0" if self.recurrent else "1.0"

    @property
    def init_fix(self) -> str:
        """The initialisation fix for the model's main activation."""
        if self.hidden_saturating:
            return "use Xavier initialisation for sigmoid/tanh layers: nn.init.xavier_uniform_ with calculate_gain"
        if self.main == "selu":
            return "use LeCun initialisation for SELU: nn.init.kaiming_normal_(w, nonlinearity='linear')"
        if self.main in _LEAKY:
            return "use He initialisation: nn.init.kaiming_normal_(w, a=0.01, nonlinearity='leaky_relu')"
        if self.main in _SMOOTH:
            return (
                f"initialise with He init, nn.init.kaiming_normal_(w, nonlinearity='relu'), a stand-in for {self.main}"
            )
        if self.relu:
            return "use He initialisation: nn.init.kaiming_normal_(w, nonlinearity='relu')"
        return FIXES[Kind.VANISHING][2]


def _cut_path() -> str:
    return "check for frozen layers, .detach() or torch.no_grad() cutting the gradient path to the early layers"


def _architecture_fix(t: _Traits) -> str | None:
    """Add what the model lacks among residual connections and normalisation; None when it has both."""
    if t.residual and t.norm:
        return None
    if t.residual:
        return "add normalisation inside the residual blocks: " + (
            "BatchNorm after each convolution" if t.convnet else "LayerNorm before each block, x + f(norm(x))"
        )
    if t.norm:
        return "add residual connections around the deep blocks: x = x + block(x)"
    return "add residual connections and normalisation"


def _vanishing(t: _Traits) -> list[str]:
    out: list[str] = []
    if t.recurrent:
        if t.vanilla_rnn:
            out.append("use nn.LSTM or nn.GRU instead of a vanilla nn.RNN: their gates carry the gradient through time")
        out += [
            "shorten the path through time: truncated backpropagation (shorter sequences), or pool over all time "
            "steps instead of using the last state only",
            "initialise the recurrent weights orthogonally (nn.init.orthogonal_ on weight_hh) and the LSTM "
            "forget-gate bias to 1",
        ]
    if t.hidden_saturating:
        out.append(FIXES[Kind.VANISHING][0])
    if t.residual and t.norm:
        if t.transformer:
            if t.pre_norm is False:
                out.append(
                    "move the norms before the sublayers (pre-norm, nn.TransformerEncoderLayer(norm_first=True)): a "
                    "norm after the residual add shrinks the gradient toward the input in deep stacks"
                )
            out.append(
                "warm up the learning rate (linear over the first 1-5% of steps), essential for deep transformers"
            )
            out.append(
                "check the init scale of the residual branches: output projections at std 0.02/sqrt(2*n_layers), "
                "not larger"
            )
            if t.pre_norm is None:
                out.append(
                    "check for a norm placed after the residual add (post-norm): pre-norm x + f(norm(x)) keeps "
                    "the path to the input open"
                )
            out.append(_cut_path())
        else:
            out += [
                _cut_path(),
                "check the init scale of the residual branches: kaiming_normal_(mode='fan_out') for the convolutions "
                "and norm weights at 1 (zero_init_residual=True only zeroes the last norm of each block)"
                if t.convnet
                else "check the init scale of the residual branches: they should start small, not large",
                "warm up the learning rate (linear over the first 1-5% of steps)",
                "check for a norm placed after the residual add: it rescales the identity path too",
            ]
    else:
        if not t.recurrent or t.convnet or t.transformer:
            arch = _architecture_fix(t)
            if arch is not None:
                out.append(arch)
        else:
            out.append("add LayerNorm between stacked recurrent layers and on their outputs")
        if not t.recurrent or t.main is not None:
            out.append(t.init_fix)
        if not t.hidden_saturating and t.saturating:
            out.append(
                "keep sigmoid/tanh only where a bounded output is needed (gates, poolers, outputs); between "
                "hidden layers prefer the activation the rest of the model uses"
            )
        out.append(_cut_path())
    return out


def _dead(t: _Traits) -> list[str]:
    reach = (
        "check that every output and head reaches the loss and that no .detach(), torch.no_grad() or frozen "
        "parameter cuts the path"
    )
    if t.relu:
        first = (
            "replace the ReLUs with the smooth or leaky activation used elsewhere in the model"
            if t.smooth or t.leaky
            else FIXES[Kind.DEAD][0]
        )
        out = [first, FIXES[Kind.DEAD][1]]
        if not t.norm:
            out.append("add normalisation before the ReLUs (BatchNorm/LayerNorm) so that pre-activations stay centred")
        return out
    if t.hidden_saturating:
        return [
            "saturated sigmoid/tanh units have zero gradients: switch them to ReLU/GELU, or normalise their inputs",
            "lower the learning rate and use Xavier initialisation: large pre-activations saturate them",
            reach,
        ]
    if not t.known_activations:
        return list(FIXES[Kind.DEAD])
    units = "/".join(sorted(t.smooth | ({"leaky"} if t.leaky else set())))
    elsewhere = "the zeros come from elsewhere: masked or padded positions, outputs the loss does not use, or unused "
    out = [
        f"lower the learning rate (3-10x) or add warm-up: {units} units get an exactly-zero gradient only when their "
        "inputs are pushed far negative (the derivative underflows), the trace of updates that were too large; "
        f"else {elsewhere}parameters"
        if units
        else f"an LSTM/GRU has no ReLU units to die: {elsewhere}parameters (pack padded sequences)",
        reach,
    ]
    if t.embedding:
        out.append("leave embeddings out of the check (exclude='embed'): rows of tokens absent from a batch get zero "
                   "gradient by design")  # fmt: skip
    if t.saturating:
        out.append("saturated sigmoid/tanh units (gates, poolers, outputs) can give zero gradients too: see saturation")
    out.append("lower the learning rate if the zeros spread over training")
    return out


def _saturation(t: _Traits) -> list[str]:
    out: list[str] = []
    if t.hidden_saturating:
        out.append(FIXES[Kind.SATURATION][0])
    elif t.saturating:
        out.append(
            "keep sigmoid/tanh only where a bounded output is needed (gates, poolers, outputs); between hidden "
            "layers prefer the activation the rest of the model uses"
        )
    elif t.recurrent:
        out.append(
            "LSTM/GRU gates saturate by design: clip gradients (max_norm=5.0), keep the inputs normalised and "
            "lower the learning rate"
        )
    if t.recurrent and not t.saturating:
        return out
    if t.norm:
        out.append(
            "lower the learning rate and use Xavier initialisation for the layers feeding them: large "
            "pre-activations saturate them"
        )
    else:
        out.append(FIXES[Kind.SATURATION][1])
    return out


def _exploding(t: _Traits) -> list[str]:
    warmup = "reduce the learning rate or add warm-up"
    if t.transformer and t.pre_norm is False:
        warmup += " (post-norm transformers need it), or use pre-norm (norm_first=True)"
    out = [t.clip, warmup, FIXES[Kind.EXPLODING][2]]
    if not t.norm and not t.recurrent:
        out.append("add normalisation (BatchNorm for convolutions, LayerNorm otherwise) to bound the activations")
    return out


def _nonfinite(t: _Traits) -> list[str]:
    out = [FIXES[Kind.NONFINITE][0], t.clip, FIXES[Kind.NONFINITE][2]]
    if t.attention:
        out.append(
            "in attention, mask with torch.finfo(dtype).min instead of -inf (a fully masked row gives NaN) and keep "
            "the softmax in float32"
        )
    return out


def _layer_imbalance(t: _Traits) -> list[str]:
    arch = _architecture_fix(t)
    if arch is not None and not (t.recurrent and not (t.convnet or t.transformer)):
        if arch == "add residual connections and normalisation":
            return list(FIXES[Kind.LAYER_IMBALANCE])
        return [f"gradient norms differ by orders of magnitude across layers: {arch}", "use per-layer learning rates"]
    out = [
        "compare like with like: embeddings, norms and the head differ from the blocks by nature; if the blocks' "
        "weight matrices differ, use per-layer learning rates or a layer-wise adaptive optimizer (LAMB/LARS)"
    ]
    if t.tied:
        out.append(
            f"the tied weights ({', '.join(t.tied)}) get the gradients of both uses: a larger norm there is expected"
        )
    out.append("check for frozen, bypassed or rarely used layers (unused heads, conditional branches)")
    return out


def _spike(t: _Traits) -> list[str]:
    out = list(FIXES[Kind.SPIKE])
    if t.transformer:
        out.append("for transformers: lower Adam's beta2 to 0.95 and keep a warm-up")
    return out


def _diverging(t: _Traits) -> list[str]:
    out = [FIXES[Kind.DIVERGING][0], t.clip, FIXES[Kind.DIVERGING][2]]
    if t.transformer:
        out.append("for transformers: lower Adam's beta2 to 0.95 and add weight decay")
    return out


def _ratio_low(t: _Traits) -> list[str]:
    if t.residual and t.norm:
        return [
            "increase the learning rate of these layers (their own parameter group) or check that they are not "
            "frozen or bypassed"
        ]
    return list(FIXES[Kind.RATIO_LOW])


def _recurrent_vanishing(t: _Traits) -> list[str]:
    out = list(FIXES[Kind.RECURRENT_VANISHING])
    if not t.vanilla_rnn:  # already gated: the forget gate and the length of the path come first
        out[0] = (
            "initialise the LSTM forget-gate bias to 1 (Jozefowicz et al. 2015) so that the cell state carries the "
            "gradient, or shorten the sequences"
        )
    return out


_FITTED: dict[str, Callable[[_Traits], list[str]]] = {
    Kind.RECURRENT_VANISHING: _recurrent_vanishing,
    Kind.VANISHING: _vanishing,
    Kind.DEAD: _dead,
    Kind.SATURATION: _saturation,
    Kind.EXPLODING: _exploding,
    Kind.NONFINITE: _nonfinite,
    Kind.LAYER_IMBALANCE: _layer_imbalance,
    Kind.SPIKE: _spike,
    Kind.RISING_TREND: lambda t: [t.clip, *FIXES[Kind.RISING_TREND][1:]],
    Kind.DECAYING_TREND: lambda t: [FIXES[Kind.DECAYING_TREND][0], *_vanishing(t)[:2]],
    Kind.DIVERGING: _diverging,
    Kind.RATIO_LOW: _ratio_low,
}


_TRAITS: dict[int, tuple[ModelInventory, _Traits]] = {}  # (by identity: an inventory is frozen)


def _traits(inventory: ModelInventory) -> _Traits:
    """:meth:`_Traits.of` ``inventory``, read once per inventory (not once per alert: 1,000 layers, 1,000 alerts)."""
    cached = _TRAITS.get(id(inventory))
    if cached is None or cached[0] is not inventory:
        if len(_TRAITS) >= 8:
            _TRAITS.clear()
        cached = _TRAITS[id(inventory)] = (inventory, _Traits.of(inventory))
    return cached[1]


def fixes_for(kind: str, inventory: ModelInventory | None = None) -> tuple[str, ...]:
    """The fixes for a problem of ``kind``, fitted to the model.

    Args:
        kind: A :class:`~lightning_gradhealth.schema.kinds.Kind`.
        inventory: The model's inventory (:func:`~lightning_gradhealth.model.inventory.take_inventory`); None: the
            defaults of :data:`FIXES`.

    Returns:
        One-line fixes, most useful first. Never recommends what the model already has.

    Raises:
        KeyError: ``kind`` is not a kind.
    """
    defaults = FIXES[kind]
    if inventory is None or kind not in _FITTED:
        return defaults
    fitted = tuple(dict.fromkeys(_FITTED[kind](_traits(inventory))))
    return fitted or defaults


# ---------------------------------------------------------------------------------------------- code
def _init_code(t: _Traits) -> str:
    types = [*(["nn.Linear"] if t.linear or not t.conv_classes else []), *(f"nn.{c}" for c in t.conv_classes)]
    target = types[0] if len(types) == 1 else f"({', '.join(types)})"
    if t.hidden_saturating:
        gain = "tanh" if "tanh" in t.saturating or "hardtanh" in t.saturating else "sigmoid"
        init = f"nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain('{gain}'))"
    elif t.main == "selu":
        init = "nn.init.kaiming_normal_(m.weight, nonlinearity='linear')  # LeCun normal, for SELU"
    elif t.main in _LEAKY:
        init = "nn.init.kaiming_normal_(m.weight, a=0.01, nonlinearity='leaky_relu')"
    else:
        mode = "mode='fan_out', " if t.convnet else ""
        note = f"  # He init; 'relu' stands in for {t.main}" if t.main in _SMOOTH else ""
        init = f"nn.init.kaiming_normal_(m.weight, {mode}nonlinearity='relu'){note}"
    lines = [
        "def init_weights(m):",
        f"    if isinstance(m, {target}):",
        f"        {init}",
        "        if m.bias is not None:",
        "            nn.init.zeros_(m.bias)",
    ]
    if t.hf_conv1d:
        lines.insert(1, "    # HF Conv1D stores its weight as [in, out]: initialise it with fan_in = weight.shape[0]")
    return "\n".join([*lines, "", "model.apply(init_weights)"])


def _vanishing_code(t: _Traits) -> str:
    if t.recurrent and not (t.convnet or t.transformer):
        return (
            "for name, p in rnn.named_parameters():\n"
            "    if name.startswith('weight_hh'):\n"
            "        nn.init.orthogonal_(p)\n"
            "    elif name.startswith('bias_ih'):  # LSTM: gates in the order i, f, g, o\n"
            "        with torch.no_grad():\n"
            "            p[p.numel() // 4 : p.numel() // 2].fill_(1.0)  # forget gate"
        )
    if t.transformer and t.residual and t.norm:
        warmup = (
            "scheduler = torch.optim.lr_scheduler.LambdaLR(\n"
            "    optimizer, lambda step: min(1.0, (step + 1) / warmup_steps)  # linear warm-up\n)"
        )
        if t.pre_norm is False:
            return "nn.TransformerEncoderLayer(d_model, nhead, norm_first=True)  # pre-norm\n" + warmup
        return warmup
    return _init_code(t)


def _dead_code(t: _Traits) -> str:
    if t.relu or not t.known_activations:
        return CODE[Kind.DEAD]
    if t.hidden_saturating:
        return CODE[Kind.SATURATION]
    return (
        "for name, p in model.named_parameters():  # where are the exact zeros?\n"
        "    if p.grad is not None:\n"
        "        print(name, (p.grad == 0).float().mean().item())"
    )


def _saturation_code(t: _Traits) -> str:
    if t.recurrent and not t.saturating:
        return _CLIP_CODE.format(max_norm=t.max_norm)
    if t.hidden_saturating or not t.known_activations:
        return CODE[Kind.SATURATION]
    gain = "tanh" if "tanh" in t.saturating else "sigmoid"
    return f"nn.init.xavier_uniform_(layer.weight, gain=nn.init.calculate_gain('{gain}'))  # the layer feeding it"


def _layer_imbalance_code(t: _Traits) -> str:
    if t.residual and t.norm:
        return (
            "optimizer = torch.optim.AdamW([  # per-layer learning rates\n"
            "    {'params': model.embeddings.parameters(), 'lr': lr * 0.1},\n"
            "    {'params': model.blocks.parameters(), 'lr': lr},\n"
            "])"
        )
    if t.residual:
        return "x = x + block(norm(x))  # normalise inside the residual branch"
    if t.norm:
        return "x = x + block(x)  # residual connection around each block"
    return CODE[Kind.LAYER_IMBALANCE]


_FITTED_CODE: dict[str, Callable[[_Traits], str]] = {
    Kind.VANISHING: _vanishing_code,
    Kind.DEAD: _dead_code,
    Kind.SATURATION: _saturation_code,
    Kind.LAYER_IMBALANCE: _layer_imbalance_code,
    Kind.EXPLODING: lambda t: (
        _CLIP_CODE.format(max_norm=t.max_norm) + ("" if t.recurrent else "  # or Trainer(gradient_clip_val=1.0)")
    ),
    Kind.RISING_TREND: lambda t: _CLIP_CODE.format(max_norm=t.max_norm),
}


def code_for(kind: str, inventory: ModelInventory | None = None) -> str:
    """The code to add for a problem of ``kind``, fitted to the model's layers.

    Args:
        kind: A :class:`~lightning_gradhealth.schema.kinds.Kind`.
        inventory: The model's inventory; None: the defaults of :data:`CODE`.

    Returns:
        The code, or ``""`` for an unknown kind.
    """
    if inventory is None or kind not in _FITTED_CODE:
        return CODE.get(kind, "")
    return _FITTED_CODE[kind](_traits(inventory)) or CODE.get(kind, "")

