"""The model inventory (layer kinds, activations, norms, residuals, head, tied weights) and the fixes fitted to it.

The architectures are built here, small but faithful to the real ones (no downloads): a torchvision-style
ResNet-18, a GPT-2-style decoder (HF ``Conv1D``, tied embeddings, NewGELU), a BERT-style encoder
(``nn.TransformerEncoderLayer(activation="gelu")``, post-norm), a ViT-tiny, an LSTM classifier, a deep sigmoid
MLP and a ReLU MLP.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from archs import ResNet18
from torch import nn
from torch.nn import functional as F

from lightning_gradhealth.diagnosis.fixes import CODE, FIXES, code_for, fixes_for
from lightning_gradhealth.model.inventory import ACTIVATIONS, LAYER_KINDS, ModelInventory, take_inventory
from lightning_gradhealth.model.layout import build_layout
from lightning_gradhealth.schema.kinds import KINDS, Kind


# ---------------------------------------------------------------------------------------------- ResNet-18
def ResNet() -> nn.Module:
    """The suite's torchvision-style ResNet-18 (tests/archs.py), narrower."""
    return ResNet18(widths=(8, 16, 32, 64))


# ---------------------------------------------------------------------------------------------- GPT-2
class Conv1D(nn.Module):
    """HF transformers' Conv1D: a linear layer whose weight is [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class NewGELUActivation(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = Conv1D(3 * d, d)
        self.c_proj = Conv1D(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d // self.n_head)
        att = nn.functional.softmax(att, dim=-1)
        return self.c_proj(torch.matmul(att, v).transpose(1, 2).reshape(b, t, d))


class GPT2MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)
        self.act = NewGELUActivation()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = GPT2Attention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = GPT2MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    def __init__(self, vocab=50, ctx=16, d=16, n_layer=2, n_head=2):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, d),
                "wpe": nn.Embedding(ctx, d),
                "h": nn.ModuleList(GPT2Block(d, n_head) for _ in range(n_layer)),
                "ln_f": nn.LayerNorm(d),
            }
        )
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------------------------------------- BERT
class BertClassifier(nn.Module):
    def __init__(self, vocab=50, ctx=16, d=16, n_layer=2, n_head=2, num_classes=3):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(ctx, d)
        self.emb_norm = nn.LayerNorm(d)
        layer = nn.TransformerEncoderLayer(d, n_head, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layer, enable_nested_tensor=False)
        self.pooler = nn.Linear(d, d)
        self.pooler_act = nn.Tanh()
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.encoder(self.emb_norm(self.word_embeddings(idx) + self.position_embeddings(pos)))
        return self.classifier(self.pooler_act(self.pooler(x[:, 0])))


# ---------------------------------------------------------------------------------------------- ViT
class PatchEmbed(nn.Module):
    def __init__(self, patch=4, d=16):
        super().__init__()
        self.proj = nn.Conv2d(3, d, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.n_head, d // self.n_head).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d, n_head)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = Mlp(d)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, img=16, patch=4, d=16, depth=2, n_head=2, num_classes=10):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img // patch) ** 2 + 1, d))
        self.blocks = nn.Sequential(*(Block(d, n_head) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


# ---------------------------------------------------------------------------------------------- the rest
class LSTMClassifier(nn.Module):
    def __init__(self, vocab=50, d=16, hidden=32, num_classes=4):
        super().__init__()
        self.embedding = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, hidden, num_layers=2, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, idx):
        out, _ = self.lstm(self.embedding(idx))
        return self.fc(out[:, -1])


def sigmoid_mlp(depth=8, width=16):
    layers: list[nn.Module] = [nn.Linear(8, width), nn.Sigmoid()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


def relu_mlp(depth=4, width=16):
    layers: list[nn.Module] = [nn.Linear(8, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 2))


ARCHS = {
    "resnet18": ResNet,
    "gpt2": GPT2LMHeadModel,
    "bert": BertClassifier,
    "vit": VisionTransformer,
    "lstm": LSTMClassifier,
    "sigmoid_mlp": sigmoid_mlp,
    "relu_mlp": relu_mlp,
}
GELU_MODELS = ("gpt2", "bert", "vit")
RESIDUAL_NORMED = ("resnet18", "gpt2", "bert", "vit")


@pytest.fixture(scope="module")
def inventories() -> dict[str, ModelInventory]:
    torch.manual_seed(0)
    return {name: take_inventory(build()) for name, build in ARCHS.items()}


# ---------------------------------------------------------------------------------------------- inventory
def test_names_agree_with_the_layout():
    for name, build in ARCHS.items():
        model = build()
        for group_by in ("module", "parameter", lambda n: n.split(".")[0]):
            inv = take_inventory(model, group_by, trace=False)
            layout = build_layout(model.named_parameters(), group_by=group_by)
            assert [n for n in inv.names if not inv[n].alias] == list(layout.layer_names), (name, group_by)
            assert [layer.depth for layer in inv] == list(range(len(inv)))
            assert {layer.kind for layer in inv} <= set(LAYER_KINDS)


def test_resnet18(inventories):
    inv = inventories["resnet18"]
    assert inv.activations == {"relu"} and inv.norms == {"batchnorm"} and inv.main_activation == "relu"
    assert inv.residual and inv.residual_evidence == "class BasicBlock"
    assert inv.is_convnet and not inv.is_transformer and not inv.is_recurrent and not inv.has_attention
    conv1, fc = inv["conv1"], inv["fc"]
    assert (conv1.kind, conv1.module_class, conv1.kernel_size, conv1.units) == ("conv", "Conv2d", (7, 7), 8)
    assert conv1.comparable and not conv1.is_head and conv1.depth == 0
    assert (fc.kind, fc.units, fc.is_head, fc.comparable) == ("linear", 10, True, True) and inv.head == "fc"
    bn = inv["layer1.0.bn1"]
    assert (bn.kind, bn.module_class, bn.comparable, bn.units) == ("norm", "BatchNorm2d", False, 8)
    shortcut = inv["layer2.0.downsample.0"]
    assert shortcut.kind == "conv" and shortcut.shortcut and shortcut.kernel_size == (1, 1)
    path = inv.main_path()
    assert path[0] == "conv1" and path[-1] == "layer4.1.conv2" and len(path) == 17
    assert not any("downsample" in n or "bn" in n for n in path) and "fc" not in path
    assert inv.comparable()[-1] == "fc" and not inv.tied


def test_gpt2_tied_embeddings_and_hf_conv1d(inventories):
    inv = inventories["gpt2"]
    assert inv.activations == {"gelu", "softmax"} and inv.main_activation == "gelu"
    assert inv.norms == {"layernorm"} and inv.residual and inv.is_transformer and not inv.is_convnet
    wte, lm_head = inv["transformer.wte"], inv["lm_head"]
    assert wte.kind == "embedding" and not wte.comparable and wte.units == 50
    assert wte.tied and wte.tied_with == ("lm_head",) and not wte.alias
    assert lm_head.tied and lm_head.alias and lm_head.is_head and lm_head.kind == "linear" and inv.head == "lm_head"
    assert inv.tied == ("transformer.wte", "lm_head")
    c_attn = inv["transformer.h.0.attn.c_attn"]
    assert (c_attn.kind, c_attn.module_class, c_attn.units, c_attn.comparable) == ("linear", "Conv1D", 48, True)
    assert inv.main_path() == tuple(
        f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    )
    # the layout (named_parameters dedups) has no lm_head: the main path of its names is the same
    layout = build_layout(GPT2LMHeadModel().named_parameters())
    assert "lm_head" not in layout.layer_names and inv.main_path(layout.layer_names) == inv.main_path()


def test_bert_encoder(inventories):
    inv = inventories["bert"]
    assert inv.activations == {"gelu", "tanh", "softmax"} and inv.main_activation == "gelu"
    assert inv.norms == {"layernorm"} and inv.residual and inv.residual_evidence == "class TransformerEncoderLayer"
    assert inv.is_transformer and inv.pre_norm is False  # post-norm, as BERT
    attn = inv["encoder.layers.0.self_attn"]
    assert (attn.kind, attn.module_class, attn.units, attn.comparable) == ("attention", "MultiheadAttention", 16, True)
    assert attn.params == ("encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.0.self_attn.in_proj_bias")
    assert inv["encoder.layers.0.self_attn.out_proj"].kind == "linear"
    assert inv.head == "classifier" and inv["word_embeddings"].kind == "embedding"
    path = inv.main_path()
    assert path[0] == "encoder.layers.0.self_attn" and path[-1] == "pooler"
    assert "encoder.layers.1.linear2" in path and not any("norm" in n or "embeddings" in n for n in path)


def test_vit(inventories):
    inv = inventories["vit"]
    assert inv.activations == {"gelu", "softmax"} and inv.norms == {"layernorm"} and inv.residual
    assert inv.is_transformer and inv.has_conv and not inv.is_convnet and inv.pre_norm is None
    assert inv["patch_embed.proj"].kind == "conv" and inv["patch_embed.proj"].kernel_size == (4, 4)
    assert inv["cls_token"].kind == "embedding" and inv["pos_embed"].kind == "embedding"
    assert not inv["cls_token"].comparable and inv.head == "head"
    assert inv.main_path()[:3] == ("patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj")


def test_lstm(inventories):
    inv = inventories["lstm"]
    lstm = inv["lstm"]
    assert (lstm.kind, lstm.module_class, lstm.units, lstm.comparable) == ("recurrent", "LSTM", 32, False)
    assert inv.is_recurrent and not inv.is_transformer and not inv.residual and inv.head == "fc"
    assert inv.activations == frozenset() and inv.norms == frozenset()  # the LSTM's own gates are not counted
    assert inv.main_path() == ()


def test_mlps(inventories):
    sig, relu = inventories["sigmoid_mlp"], inventories["relu_mlp"]
    assert sig.activations == {"sigmoid"} and relu.activations == {"relu"}
    assert not sig.residual and not relu.residual and not sig.norms
    assert sig.main_path() == tuple(str(2 * i) for i in range(7)) and sig.head == "14"
    assert relu.main_path() == ("0", "2", "4") and relu.head == "6"


def test_group_by_parameter_and_callable():
    model = ResNet()
    inv = take_inventory(model, "parameter", trace=False)
    assert inv["conv1.weight"].comparable and inv["fc.weight"].is_head and inv["fc.bias"].is_head
    assert not inv["fc.bias"].comparable and inv["layer1.0.bn1.weight"].kind == "norm"
    assert inv.main_path()[0] == "conv1.weight" and "fc.weight" not in inv.main_path()
    blocks = take_inventory(model, lambda n: ".".join(n.split(".")[:2]), trace=False)
    assert blocks["layer1.0"].kind == "conv" and blocks["layer1.0"].comparable and blocks.group_by == "callable"
    assert blocks.head == "fc.weight" or blocks["fc.weight"].is_head


def test_activations_from_attributes_config_and_source():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act_fn = F.silu

        def forward(self, x):
            return self.act_fn(self.fc(x)) * torch.sigmoid(self.fc(x))  # F.relu in a comment is not counted

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"hidden_act": "gelu_pytorch_tanh"})()
            self.body = Gated()
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(x.relu())

    inv = take_inventory(Model())
    assert inv.activations == {"silu", "sigmoid", "gelu", "relu"}
    layer = nn.TransformerEncoderLayer(8, 2, 16, activation=F.gelu)
    assert take_inventory(layer).activations == {"gelu", "softmax"}


def test_residual_by_tracing_and_not_by_a_gelu_formula():
    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return x + torch.relu(self.fc(x))

    inv = take_inventory(nn.Sequential(nn.Linear(8, 8), Stage(), nn.Linear(8, 2)))
    assert inv.residual and inv.residual_evidence.startswith("traced add")
    assert not take_inventory(nn.Sequential(nn.Linear(8, 8), NewGELUActivation(), nn.Linear(8, 2))).residual
    assert not take_inventory(nn.Sequential(nn.Linear(8, 8), Stage(), nn.Linear(8, 2)), trace=False).residual

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    assert not take_inventory(Untraceable()).residual


def test_wrappers_frozen_lazy_and_parametrized():
    class Wrapper(nn.Module):  # like torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    inner = relu_mlp()
    inner[0].weight.requires_grad_(False)
    inv = take_inventory(Wrapper(inner))
    assert inv.names == ("0", "2", "4", "6") and inv.head == "6" and inv["0"].trainable
    inner[0].bias.requires_grad_(False)
    assert not take_inventory(inner)["0"].trainable
    lazy = take_inventory(nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2)))
    assert lazy["0"].kind == "linear" and lazy["0"].numel == 0
    lin = nn.utils.parametrizations.weight_norm(nn.Linear(4, 4))
    inv = take_inventory(nn.Sequential(lin, nn.Tanh(), nn.Linear(4, 1)))
    assert inv["0.parametrizations.weight"].kind == "linear" and inv["0.parametrizations.weight"].comparable
    assert "weightnorm" in inv.norms


def test_to_dict_is_json(inventories):
    for inv in inventories.values():
        d = json.loads(json.dumps(inv.to_dict()))
        assert d["main_path"] == list(inv.main_path()) and len(d["layers"]) == len(inv)
    d = inventories["gpt2"].to_dict()
    assert (
        d["tied"] == ["transformer.wte", "lm_head"] and d["is_transformer"] and d["activations"] == ["gelu", "softmax"]
    )


# ---------------------------------------------------------------------------------------------- fixes
SUGGESTS_GELU = re.compile(r"(?i)\b(use|using|switch\w*|instead of)\b[^;:]*\b(gelu|leaky_?relu|silu)\b|leakyrelu")
ADDS_RESIDUAL_OR_NORM = re.compile(r"(?i)\badd\b[^;:]*\b(residual|normali[sz]ation|layernorm|batchnorm)")


def test_every_kind_has_fixes_and_code(inventories):
    assert FIXES.keys() == CODE.keys() == set(KINDS)
    assert FIXES[Kind.DIVERGING][0].startswith("lower the learning rate (")
    for kind in KINDS:
        assert fixes_for(kind) == FIXES[kind] and code_for(kind) == CODE[kind]
        for name, inv in inventories.items():
            fixes = fixes_for(kind, inv)
            assert fixes and all(isinstance(f, str) and f and "\n" not in f for f in fixes), (name, kind)
            assert len(set(fixes)) == len(fixes) and code_for(kind, inv), (name, kind)
    with pytest.raises(KeyError):
        fixes_for("no such kind")
    assert code_for("no such kind") == ""


@pytest.mark.parametrize("name", GELU_MODELS)
def test_gelu_models_are_never_told_to_use_gelu_or_leaky_relu(inventories, name):
    inv = inventories[name]
    for kind in KINDS:
        for fix in fixes_for(kind, inv):
            assert not SUGGESTS_GELU.search(fix), (kind, fix)
        assert "LeakyReLU" not in code_for(kind, inv) and "nn.GELU()" not in code_for(kind, inv), kind
    dead = fixes_for(Kind.DEAD, inv)
    # a GELU unit's gradient is exactly zero only far below zero (it underflows): after too large updates
    assert dead[0].startswith("lower the learning rate") and "underflows" in dead[0] and "masked" in dead[0]
    x = torch.tensor([-10.0, -1.0], requires_grad=True)
    F.gelu(x).sum().backward()
    assert x.grad[0] == 0 and x.grad[1] != 0  # (why "no GELU unit can die" was wrong)


@pytest.mark.parametrize("name", RESIDUAL_NORMED)
def test_residual_normalised_models_are_not_told_to_add_them(inventories, name):
    inv = inventories[name]
    for kind in KINDS:
        for fix in fixes_for(kind, inv):
            assert not ADDS_RESIDUAL_OR_NORM.search(fix), (kind, fix)
    vanishing = " ".join(fixes_for(Kind.VANISHING, inv))
    assert "init scale of the residual branches" in vanishing and "warm up the learning rate" in vanishing
    assert "frozen layers" in vanishing


def test_post_norm_transformer_is_told_pre_norm(inventories):
    assert "norm_first=True" in fixes_for(Kind.VANISHING, inventories["bert"])[0]
    assert "norm_first=True" in code_for(Kind.VANISHING, inventories["bert"])
    assert fixes_for(Kind.VANISHING, inventories["vit"])[0].startswith("warm up the learning rate")
    assert "LambdaLR" in code_for(Kind.VANISHING, inventories["gpt2"])


def test_convnet_vanishing_code_handles_conv2d(inventories):
    code = code_for(Kind.VANISHING, inventories["resnet18"])
    assert "isinstance(m, (nn.Linear, nn.Conv2d))" in code and "nonlinearity='relu'" in code
    model = ResNet()
    namespace = {"nn": nn, "model": model}
    exec(code, namespace)  # the code runs as given
    assert fixes_for(Kind.VANISHING, inventories["resnet18"])[0].startswith("check for frozen layers")
    conv_only = take_inventory(nn.Sequential(nn.Conv1d(2, 4, 3), nn.Tanh(), nn.Conv1d(4, 4, 3), nn.Tanh()))
    code = code_for(Kind.VANISHING, conv_only)
    assert "isinstance(m, nn.Conv1d)" in code and "calculate_gain('tanh')" in code


def test_sigmoid_mlp_is_told_relu_gelu_and_residual_normalisation(inventories):
    inv = inventories["sigmoid_mlp"]
    fixes = fixes_for(Kind.VANISHING, inv)
    assert fixes[:2] == FIXES[Kind.VANISHING][:2]  # ReLU/GELU first, then residual connections and normalisation
    assert "xavier" in fixes[2].lower() and "calculate_gain('sigmoid')" in code_for(Kind.VANISHING, inv)
    assert fixes_for(Kind.SATURATION, inv)[0] == FIXES[Kind.SATURATION][0]
    assert fixes_for(Kind.LAYER_IMBALANCE, inv) == FIXES[Kind.LAYER_IMBALANCE]


def test_relu_models(inventories):
    relu = inventories["relu_mlp"]
    assert fixes_for(Kind.DEAD, relu)[0] == "use LeakyReLU or GELU instead of ReLU"
    assert "LeakyReLU" in code_for(Kind.DEAD, relu)
    assert not any("sigmoid/tanh" in f for f in fixes_for(Kind.VANISHING, relu))
    assert fixes_for(Kind.VANISHING, relu)[0] == "add residual connections and normalisation"
    assert "kaiming_normal_" in code_for(Kind.VANISHING, relu) and "Conv" not in code_for(Kind.VANISHING, relu)
    resnet = inventories["resnet18"]
    assert fixes_for(Kind.DEAD, resnet)[0] == "use LeakyReLU or GELU instead of ReLU"  # a ReLU net may use either
    assert not any("normalisation before the ReLUs" in f for f in fixes_for(Kind.DEAD, resnet))


def test_lstm_fixes(inventories):
    inv = inventories["lstm"]
    assert "max_norm=5.0" in fixes_for(Kind.EXPLODING, inv)[0] and "max_norm=5.0" in code_for(Kind.EXPLODING, inv)
    vanishing = fixes_for(Kind.VANISHING, inv)
    assert vanishing[0].startswith("shorten the path through time") and not any("sigmoid/tanh" in f for f in vanishing)
    assert "orthogonal_" in code_for(Kind.VANISHING, inv)
    vanilla = take_inventory(nn.RNN(4, 8))
    assert fixes_for(Kind.VANISHING, vanilla)[0].startswith("use nn.LSTM or nn.GRU")


def test_tied_weights_explain_imbalance(inventories):
    fixes = fixes_for(Kind.LAYER_IMBALANCE, inventories["gpt2"])
    assert any("transformer.wte, lm_head" in f for f in fixes)
    assert "per-layer learning rates" in code_for(Kind.LAYER_IMBALANCE, inventories["gpt2"])


def test_edge_cases():
    class WindowAttention(nn.Module):  # Swin: owns a relative-position table, not a weight matrix
        def __init__(self):
            super().__init__()
            self.relative_position_bias_table = nn.Parameter(torch.zeros(49, 2))
            self.qkv = nn.Linear(8, 24)

    class ResnetBlock2D(nn.Module):  # diffusers: the shortcut projection is called conv_shortcut
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(4, 8, 3)
            self.norm1 = nn.GroupNorm(2, 8)
            self.conv_shortcut = nn.Conv2d(4, 8, 1)
            self.act = nn.SiLU()

    class HFModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"activation_function": "gelu_new"})()
            self.block = ResnetBlock2D()
            self.attn = WindowAttention()
            self.out = nn.Linear(8, 2)

    class LightningLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = HFModel()

    inv = take_inventory(LightningLike())
    assert inv.activations == {"gelu", "silu"} and inv.norms == {"groupnorm"}
    assert inv["model.attn"].kind == "attention" and not inv["model.attn"].comparable
    assert inv["model.block.conv_shortcut"].shortcut and "model.block.conv_shortcut" not in inv.main_path()
    assert inv.main_path() == ("model.block.conv1", "model.attn.qkv") and inv.head == "model.out"
    assert inv.residual and inv.residual_evidence == "class ResnetBlock2D"
    assert inv.activations <= ACTIVATIONS

    shared = nn.Linear(4, 4)  # one module used twice (ALBERT-style sharing)
    inv = take_inventory(nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(4, 1)))
    assert inv.tied == ("0", "2") and inv["2"].alias and not inv["0"].alias and inv["0"].tied_with == ("2",)
    assert inv.main_path() == ("0",)
    with pytest.raises(ValueError, match="group_by"):
        take_inventory(shared, "layer")
    assert take_inventory(nn.ReLU()).layers == () and take_inventory(nn.ReLU()).head is None


def test_a_lightning_module_is_not_taken_for_a_relu_model():
    """LightningModule's own methods show ``F.relu`` in their docstrings: that is not the user's model."""
    import lightning as L

    class SigmoidNet(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """Example in a docstring: ``F.relu(x)`` is not called."""
            return self.net(x)

    inventory = take_inventory(SigmoidNet())
    assert inventory.activations == {"sigmoid"}


def test_feature_maps_are_seen_at_the_first_forward_and_shown_in_the_report(tmp_path):
    """ResNet-18 at 32x32: layer4's 3x3 convolutions see 1x1 maps (8 of 9 taps are padding: structure)."""
    from lightning_gradhealth import GradientHealth

    model = ResNet()
    health = GradientHealth(model, log_every_n_steps=1, report_dir=tmp_path)
    assert health.inventory.feature_maps == {}  # not seen before a forward pass
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        health.step(opt)
        opt.step()
        opt.zero_grad()
    maps = health.inventory.feature_maps
    assert maps["conv1"] == (32, 32) and maps["layer1.0.conv1"] == (8, 8)  # stride 2, then max-pooling
    assert maps["layer4.0.conv1"] == (2, 2) and maps["layer4.1.conv2"] == (1, 1)
    assert all(not m._forward_pre_hooks for m in model.modules())  # one-shot hooks: gone
    health.close()
    assert "conv 3x3 on 1x1 maps (Conv2d)" in (tmp_path / "gradient_health_report.md").read_text()


# ---------------------------------------------------------------------------------------------- issue 19
def _bare(model: nn.Module) -> nn.Module:
    """A LightningModule holding ``model`` as ``self.model``, with no ``forward`` of its own."""
    import lightning as L

    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(batch).sum()

    return Bare()


class SkipMLP(nn.Module):
    """A plain residual MLP block (no class name the inventory knows)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class ReZeroBlock(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.alpha = nn.Parameter(torch.zeros(1))  # ReZero (Bachlechner et al., 2021)

    def forward(self, x):
        return x + self.alpha * F.relu(self.fc(x))


class ZeroNormBlock(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        nn.init.zeros_(self.bn2.weight)  # torchvision's zero_init_residual (Goyal et al., 2017)

    def forward(self, x):
        return x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


def test_residuals_are_found_without_a_forward_on_the_lightning_module():
    """Issue 19: a LightningModule without ``forward`` hides nothing: its children are traced."""
    plain = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    assert not take_inventory(_bare(plain)).residual  # (no addition anywhere: not residual)
    inv = take_inventory(_bare(nn.Sequential(SkipMLP(), SkipMLP(), nn.Linear(8, 2))))
    assert inv.residual and "traced add" in inv.residual_evidence and "`model`" in inv.residual_evidence
    assert not take_inventory(_bare(nn.Sequential(SkipMLP())), trace=False).residual
    assert "add residual connections" not in " ".join(fixes_for(Kind.LAYER_IMBALANCE, inv))


def test_scaled_residual_branches_are_recognised_and_not_compared():
    """Layer scale 1e-6 (ConvNeXt), ReZero's alpha 0 and a zero-initialised last BatchNorm mark their blocks."""
    from archs_heldout import ConvNeXt

    inv = take_inventory(_bare(ConvNeXt()), trace=False)  # (classes and parameters only: no tracing needed)
    assert inv.residual and "model.stages.0.0.gamma" in inv.residual_evidence
    assert len(inv.scaled_branches) == 4  # one per block
    scaled = {layer.name for layer in inv.layers if layer.scaled}
    assert scaled == {f"model.stages.{s}.{b}.{m}" for s in (0, 1) for b in (0, 1) for m in ("dwconv", "pwconv1", "pwconv2")}
    assert not any(inv[name].comparable for name in scaled)
    assert {"model.downsample_layers.0.0", "model.downsample_layers.1.1", "model.head"} <= set(inv.comparable())
    assert set(inv.blocks()).isdisjoint(scaled) and set(inv.main_path()).isdisjoint(scaled)
    back = ModelInventory.from_dict(json.loads(json.dumps(inv.to_dict())))
    assert back.scaled_branches == inv.scaled_branches and {x.name for x in back.layers if x.scaled} == scaled

    rezero = take_inventory(nn.Sequential(ReZeroBlock(), ReZeroBlock(), nn.Linear(8, 2)))
    assert [layer.name for layer in rezero.layers if layer.scaled] == ["0.fc", "1.fc"] and rezero.residual
    zero_bn = take_inventory(nn.Sequential(nn.Conv2d(3, 4, 3), ZeroNormBlock(), ZeroNormBlock()))
    assert {layer.name for layer in zero_bn.layers if layer.scaled} == {"1.conv1", "1.conv2", "2.conv1", "2.conv2"}
    assert zero_bn.comparable() == ("0",)


def test_gains_that_are_not_tiny_do_not_scale_a_branch():
    block = ReZeroBlock()
    with torch.no_grad():
        block.alpha.fill_(0.5)  # a trained ReZero gain
    assert not take_inventory(nn.Sequential(block, nn.Linear(8, 2)), trace=False).scaled_branches
    root = nn.BatchNorm1d(8)
    nn.init.zeros_(root.weight)  # a zero norm at the root is no branch
    assert not take_inventory(root).scaled_branches


@pytest.mark.parametrize("batch_first", [True, False])
def test_time_profile_is_the_input_gradient_through_time(batch_first):
    """The profile against an independent float64 reference: ``∂L/∂x_t`` by autograd, first vs last quarter."""
    from lightning_gradhealth.model.recurrence import TimeProfile, watch_recurrence

    torch.manual_seed(0)
    rnn = nn.RNN(3, 5, batch_first=batch_first)
    head = nn.Linear(5, 2)
    x = torch.randn(4, 12, 3) if batch_first else torch.randn(12, 4, 3)

    def loss_of(mod: nn.Module, lin: nn.Module, inp: torch.Tensor) -> torch.Tensor:
        out = mod(inp)[0]
        return lin(out[:, -1] if batch_first else out[-1]).square().sum()

    ref_rnn, ref_head = (nn.RNN(3, 5, batch_first=batch_first).double(), nn.Linear(5, 2).double())
    ref_rnn.load_state_dict({k: v.double() for k, v in rnn.state_dict().items()})
    ref_head.load_state_dict({k: v.double() for k, v in head.state_dict().items()})
    xd = x.double().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_of(ref_rnn, ref_head, xd), xd)
    per_step = g.pow(2).sum(dim=(0, 2) if batch_first else (1, 2))
    expected = float(per_step[:3].mean().sqrt() / per_step[-3:].mean().sqrt())

    profiles: dict[str, TimeProfile] = {}
    remove = watch_recurrence(nn.ModuleDict({"rnn": rnn}), profiles, lambda name: name)
    loss_of(rnn, head, x).backward()
    assert x.grad is None  # (the caller's tensor is untouched: a detached view was watched)
    assert profiles["rnn"].early_over_late() == pytest.approx(expected, rel=1e-4)
    assert profiles["rnn"].steps == 12 and profiles["rnn"].samples == 1
    grads = [p.grad.clone() for p in rnn.parameters()]
    remove()
    rnn.zero_grad()
    loss_of(rnn, head, x).backward()  # the same gradients without the hook
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, rnn.parameters(), strict=True))
    with torch.no_grad():
        rnn(x)
    assert profiles["rnn"].samples == 1  # (removed; and never under no_grad)


def test_recurrence_rule_and_its_fixes():
    """Issue 19: vanishing through time names gated cells for nn.RNN, the forget gate for an LSTM; exploding clips."""
    from lightning_gradhealth.config.thresholds import Thresholds
    from lightning_gradhealth.diagnosis.history import History
    from lightning_gradhealth.diagnosis.rules import diagnose
    from lightning_gradhealth.model.recurrence import TimeProfile

    for cell, first in ((nn.RNN, "gated cells"), (nn.LSTM, "forget-gate bias")):
        inv = take_inventory(nn.ModuleDict({"rnn": cell(3, 5), "head": nn.Linear(5, 2)}))
        inv.time_profiles["rnn"] = TimeProfile(1e-8)
        (finding,) = diagnose(History(), Thresholds(), inventory=inv)
        assert finding.kind == Kind.RECURRENT_VANISHING and finding.severity.value == "critical"
        assert first in finding.fixes[0] and finding.layers == ("rnn",)
        inv.time_profiles["rnn"] = TimeProfile(1e-4)
        assert diagnose(History(), Thresholds(), inventory=inv)[0].severity.value == "warning"
        inv.time_profiles["rnn"] = TimeProfile(0.4)  # healthy
        assert diagnose(History(), Thresholds(), inventory=inv) == []
        inv.time_profiles["rnn"] = TimeProfile(5e2)
        (finding,) = diagnose(History(), Thresholds(), inventory=inv)
        assert finding.kind == Kind.RECURRENT_EXPLODING and "clip" in finding.fixes[0]
        assert ModelInventory.from_dict(inv.to_dict()).time_profiles["rnn"].early_over_late() == 5e2


def test_a_zero_weight_that_is_not_a_last_norm_scales_nothing():
    """Gemma's RMSNorm keeps a zero weight for ``x * (1 + weight)``; a zero first norm does not end a branch."""

    class GemmaRMSNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(d))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1 + self.weight)

    class Layer(nn.Module):
        def __init__(self, d: int = 8) -> None:
            super().__init__()
            self.input_layernorm = nn.LayerNorm(d)
            nn.init.zeros_(self.input_layernorm.weight)  # first, not last
            self.fc = nn.Linear(d, d)
            self.post_norm = GemmaRMSNorm(d)

        def forward(self, x):
            return x + self.post_norm(self.fc(self.input_layernorm(x)))

    inv = take_inventory(nn.Sequential(Layer(), Layer(), nn.Linear(8, 2)))
    assert not inv.scaled_branches and inv.comparable() == ("0.fc", "1.fc", "2")
