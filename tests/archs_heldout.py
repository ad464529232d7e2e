"""Held-out architectures and natural pathologies (issue 19, item 7), apart from ``tests/archs.py``.

None of these is in ``tests/archs.py`` (ResNet-18, GPT-2, BERT, ViT, LSTM) nor among the issue's examples (a
Llama, a post-LN transformer, a DenseNet, GPT-2 at lr 1.0). Each is tiny, deterministic and CPU-fast, trained under a
real ``lightning.Trainer`` by :func:`archs.run` (or, for fp16 with a GradScaler, which Lightning only creates on
CUDA, a plain loop with :class:`~lightning_gradhealth.GradientHealth`).

The split into :data:`CALIBRATION` and :data:`CONFIRMATION` was fixed in this file before any rule was tuned;
rules and thresholds may be tuned on the calibration set only, and the confirmation set is then run as it is. Each
pathology names the finding kinds that describe it and a predicate on the first fix (``first_fix``): what a user
should do first.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import lightning as L
import torch
from archs import Arch, Task, _loader, markov_tokens, pattern_images, teacher_regression, warmup_cosine
from archs import _cls_loss as _cls
from archs import _mse_loss as _mse
from torch import nn
from torch.nn import functional as F

__all__ = ["CALIBRATION", "CONFIRMATION", "HELDOUT", "HeldOut", "run_fp16_loop"]


class BareTask(Task):
    """A LightningModule *without* ``forward``: ``training_step`` calls ``self.model`` (a common style).

    :class:`archs.Task` with the ``forward`` it adds taken away (LightningModule's own, unimplemented, is back).
    """

    forward = L.LightningModule.forward


def _adamw(lr: float, wd: float = 0.01) -> Callable[[nn.Module], torch.optim.Optimizer]:
    return lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)


# ====================================================================================================== Swin
def _windows(x: torch.Tensor, w: int) -> torch.Tensor:
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, c)


def _unwindow(x: torch.Tensor, w: int, b: int, h: int, wd: int) -> torch.Tensor:
    c = x.shape[-1]
    x = x.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, wd, c)


class WindowAttention(nn.Module):
    """Swin's window attention with a learned relative-position bias table."""

    def __init__(self, dim: int, heads: int, w: int) -> None:
        super().__init__()
        self.heads, self.w = heads, w
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * w - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("index", rel[..., 0] * (2 * w - 1) + rel[..., 1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.index.view(-1)].view(t, t, -1).permute(2, 0, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0))
        return self.proj(y.transpose(1, 2).reshape(n, t, c))


class SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, w: int, shift: int) -> None:
        super().__init__()
        self.w, self.shift = w, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, w)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, wd, c = x.shape
        y = torch.roll(self.norm1(x), (-self.shift, -self.shift), (1, 2)) if self.shift else self.norm1(x)
        y = _unwindow(self.attn(_windows(y, self.w)), self.w, b, h, wd)
        y = torch.roll(y, (self.shift, self.shift), (1, 2)) if self.shift else y
        x = x + y
        return x + self.mlp(self.norm2(x))


class TinySwin(nn.Module):
    def __init__(self, classes: int = 8, dim: int = 32) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.ModuleList([SwinBlock(dim, 2, 4, 0), SwinBlock(dim, 2, 4, 2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


def build_swin() -> tuple[L.LightningModule, Any]:
    """Swin-style windowed attention (shifted windows, relative-position bias), AdamW 1e-3 with warm-up."""
    torch.manual_seed(31)
    x, y = pattern_images(1024, 8, 16, seed=31)
    task = BareTask(TinySwin(), _cls, _adamw(1e-3, 0.05), warmup_cosine(10, 60))
    return task, _loader(x, y, batch_size=32, seed=31)


# ====================================================================================================== Perceiver
class Perceiver(nn.Module):
    """Latents cross-attend to the input array, then self-attend (Jaegle et al., 2021), pre-norm residuals."""

    def __init__(self, in_dim: int = 12, dim: int = 32, latents: int = 8, classes: int = 8) -> None:
        super().__init__()
        self.input_proj = nn.Linear(in_dim, dim)
        self.latents = nn.Parameter(torch.randn(latents, dim) * 0.02)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.self_layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
             for _ in range(2)]
        )  # fmt: skip
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.cross_norm(self.input_proj(x))
        z = self.latents.expand(x.shape[0], -1, -1)
        z = z + self.cross_attn(z, kv, kv, need_weights=False)[0]
        for layer in self.self_layers:
            z = layer(z)
        return self.head(self.norm(z).mean(1))


def _patches(x: torch.Tensor) -> torch.Tensor:  # (B, 3, 16, 16) -> (B, 64, 12): 2x2 patches as an input array
    return x.unfold(2, 2, 2).unfold(3, 2, 2).permute(0, 2, 3, 1, 4, 5).reshape(x.shape[0], 64, 12)


def build_perceiver() -> tuple[L.LightningModule, Any]:
    """A Perceiver (cross-attention latents over an input array), AdamW 1e-3 with warm-up."""
    torch.manual_seed(32)
    x, y = pattern_images(1024, 8, 16, seed=32)
    task = BareTask(Perceiver(), _cls, _adamw(1e-3), warmup_cosine(10, 60))
    return task, _loader(_patches(x), y, batch_size=32, seed=32)


# ====================================================================================================== GNN
def sbm_graphs(n: int, nodes: int, communities: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``n`` stochastic-block-model graphs: features = noisy community prototypes; label = community."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.randn(communities, 8, generator=gen)
    comm = torch.randint(communities, (n, nodes), generator=gen)
    same = comm[:, :, None] == comm[:, None, :]
    p = torch.where(same, 0.5, 0.05)
    adj = (torch.rand(n, nodes, nodes, generator=gen) < p).float()
    adj = ((adj + adj.transpose(1, 2)) > 0).float() + torch.eye(nodes)
    adj = adj / adj.sum(-1, keepdim=True)  # mean aggregation, self loops
    feats = protos[comm] + 2.0 * torch.randn(n, nodes, 8, generator=gen)
    return feats, adj, comm


class MessagePassing(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.message = nn.Linear(dim, dim)
        self.update = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        m = adj @ F.relu(self.message(h))
        return h + self.update(torch.cat([self.norm(h), m], -1))


class GNN(nn.Module):
    def __init__(self, dim: int = 32, layers: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.encode = nn.Linear(8, dim)
        self.layers = nn.ModuleList([MessagePassing(dim) for _ in range(layers)])
        self.readout = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = self.encode(x)
        for layer in self.layers:
            h = layer(h, adj)
        return self.readout(h)


def _node_cls(model: nn.Module, batch: Any) -> torch.Tensor:
    x, adj, y = batch
    logits = model(x, adj)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def build_gnn() -> tuple[L.LightningModule, Any]:
    """A message-passing GNN (node classification on stochastic-block-model graphs), Adam 3e-3."""
    torch.manual_seed(33)
    feats, adj, comm = sbm_graphs(512, 16, 4, seed=33)
    task = BareTask(GNN(), _node_cls, lambda m: torch.optim.Adam(m.parameters(), lr=3e-3))
    return task, _loader(feats, adj, comm, batch_size=16, seed=33)


# ====================================================================================================== U-Net
class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x))) + self.time(t)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, c)
        self.attn = nn.MultiheadAttention(c, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)
        y = self.attn(y, y, y, need_weights=False)[0]
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class TinyUNet(nn.Module):
    """A DDPM-style U-Net (Ho et al., 2020): residual blocks with a time embedding, attention at 8x8."""

    def __init__(self, c: int = 16, tdim: int = 32) -> None:
        super().__init__()
        self.tdim = tdim
        self.time_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.down1 = ResBlock(c, c, tdim)
        self.downsample = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.mid = ResBlock(2 * c, 2 * c, tdim)
        self.mid_attn = AttnBlock(2 * c)
        self.upsample = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.up1 = ResBlock(2 * c, c, tdim)
        self.out_norm = nn.GroupNorm(4, c)
        self.out = nn.Conv2d(c, 3, 3, padding=1)

    def embed(self, t: torch.Tensor) -> torch.Tensor:
        half = self.tdim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        args = t[:, None] * freqs[None]
        return self.time_mlp(torch.cat([args.sin(), args.cos()], -1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.embed(t)
        h1 = self.down1(self.stem(x), temb)
        h = self.mid_attn(self.mid(self.downsample(h1), temb))
        h = self.up1(torch.cat([self.upsample(h), h1], 1), temb)
        return self.out(F.silu(self.out_norm(h)))


def _diffusion(model: nn.Module, batch: Any) -> torch.Tensor:
    (x0,) = batch
    t = torch.randint(0, 100, (x0.shape[0],))
    alpha = torch.cos(t.float() / 100 * math.pi / 2)[:, None, None, None]
    noise = torch.randn_like(x0)
    return F.mse_loss(model(alpha * x0 + (1 - alpha**2).sqrt() * noise, t.float()), noise)


def build_unet() -> tuple[L.LightningModule, Any]:
    """A tiny diffusion U-Net with attention (noise prediction), AdamW 2e-3 with warm-up."""
    torch.manual_seed(34)
    x, _ = pattern_images(512, 8, 16, seed=34, noise=0.3)
    task = BareTask(TinyUNet(), _diffusion, _adamw(2e-3), warmup_cosine(10, 60))
    return task, _loader(x, batch_size=32, seed=34)


# ====================================================================================================== seq2seq
class Seq2Seq(nn.Module):
    """An LSTM encoder-decoder with dot-product (Luong) attention, teacher forcing."""

    def __init__(self, vocab: int = 16, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab + 1, dim)  # (+1: the start token)
        self.encoder = nn.LSTM(dim, dim, batch_first=True)
        self.decoder = nn.LSTM(dim, dim, batch_first=True)
        self.combine = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, vocab)
        self.start = vocab

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        enc, state = self.encoder(self.embed(src))
        dec, _ = self.decoder(self.embed(tgt_in), state)
        weights = torch.softmax(dec @ enc.transpose(1, 2), -1)
        return self.out(torch.tanh(self.combine(torch.cat([dec, weights @ enc], -1))))


def _reverse_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    (src,) = batch
    tgt = src.flip(1)
    tgt_in = torch.cat([torch.full_like(tgt[:, :1], model.start), tgt[:, :-1]], 1)
    logits = model(src, tgt_in)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1))


def build_seq2seq() -> tuple[L.LightningModule, Any]:
    """A seq2seq LSTM with attention reversing token sequences, Adam 3e-3, Trainer clips at 1.0."""
    torch.manual_seed(35)
    gen = torch.Generator().manual_seed(35)
    src = torch.randint(16, (1024, 8), generator=gen)
    task = BareTask(Seq2Seq(), _reverse_loss, lambda m: torch.optim.Adam(m.parameters(), lr=3e-3))
    return task, _loader(src, batch_size=32, seed=35)


# ====================================================================================================== MoE
class MoE(nn.Module):
    """A top-2 mixture-of-experts MLP (Shazeer et al., 2017), dense dispatch (tiny)."""

    def __init__(self, dim: int, experts: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, experts)
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)) for _ in range(experts)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.gate(x)
        top, idx = scores.topk(2, -1)
        weights = torch.zeros_like(scores).scatter(-1, idx, torch.softmax(top, -1))
        outs = torch.stack([e(x) for e in self.experts], -1)
        return (outs * weights.unsqueeze(-2)).sum(-1)


class MoENet(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.moe1 = MoE(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.moe2 = MoE(dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.moe1(self.norm1(h))
        h = h + self.moe2(self.norm2(h))
        return self.head(h)


def build_moe() -> tuple[L.LightningModule, Any]:
    """Two pre-norm residual mixture-of-experts layers on a teacher regression, AdamW 2e-3."""
    torch.manual_seed(36)
    x, y = teacher_regression(2048, 16, seed=36, hidden=32)
    task = BareTask(MoENet(), _mse, _adamw(2e-3))
    return task, _loader(x, y, batch_size=64, seed=36)


# ====================================================================================================== ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block (Liu et al., 2022): depthwise 7x7, LayerNorm, inverted MLP, layer scale ``gamma``."""

    def __init__(self, dim: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, dims: tuple[int, ...] = (16, 32), depths: tuple[int, ...] = (2, 2), classes: int = 8) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(3, dims[0], 2, stride=2), LayerNorm2d(dims[0]))
        self.downsample_layers = nn.ModuleList([stem])
        for a, b in pairwise(dims):
            self.downsample_layers.append(nn.Sequential(LayerNorm2d(a), nn.Conv2d(a, b, 2, stride=2)))
        self.stages = nn.ModuleList(
            [nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)]) for d, n in zip(dims, depths, strict=True)]
        )
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = stage(down(x))
        return self.head(self.norm(x.mean((2, 3))))


def build_convnext() -> tuple[L.LightningModule, Any]:
    """ConvNeXt with layer scale 1e-6, in a LightningModule without ``forward``; AdamW 2e-3 with warm-up."""
    torch.manual_seed(37)
    x, y = pattern_images(1024, 8, 16, seed=37)
    task = BareTask(ConvNeXt(), _cls, _adamw(2e-3, 0.05), warmup_cosine(10, 60))
    return task, _loader(x, y, batch_size=32, seed=37)


# ====================================================================================================== vanilla RNN
class RNNLM(nn.Module):
    def __init__(self, vocab: int = 24, dim: int = 32, nonlinearity: str = "tanh") -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = nn.RNN(dim, dim, batch_first=True, nonlinearity=nonlinearity)
        self.out = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.embed(x))[0])


def _lm(model: nn.Module, batch: Any) -> torch.Tensor:
    (seqs,) = batch
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), seqs[:, 1:].reshape(-1))


def build_rnn() -> tuple[L.LightningModule, Any]:
    """A vanilla tanh ``nn.RNN`` language model on short sequences (16 tokens), Adam 3e-3, Trainer clips at 1.0."""
    torch.manual_seed(38)
    seqs = markov_tokens(1024, 17, 24, seed=38)
    task = BareTask(RNNLM(), _lm, lambda m: torch.optim.Adam(m.parameters(), lr=3e-3))
    return task, _loader(seqs, batch_size=32, seed=38)


# ====================================================================================================== pathologies
class SeqClassifier(nn.Module):
    """A recurrent classifier reading the whole sequence, predicting from its last state."""

    def __init__(self, cell: str = "RNN", dim: int = 32, classes: int = 4, inputs: int = 8, **kw: Any) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(inputs, dim, batch_first=True, **kw)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def first_token_task(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The class is written in the *first* step of a long sequence of noise (a long-range dependency)."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(4, (n,), generator=gen)
    x = torch.randn(n, length, 8, generator=gen)
    x[:, 0, :4] = 3.0 * F.one_hot(y, 4).float()
    return x, y


def build_rnn_vanishing() -> tuple[L.LightningModule, Any]:
    """Vanilla tanh RNN over 200 steps, the label in the first: the gradient vanishes through time (chance loss)."""
    torch.manual_seed(41)
    x, y = first_token_task(512, 200, seed=41)
    task = BareTask(SeqClassifier("RNN"), _cls, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    return task, _loader(x, y, batch_size=32, seed=41)


def build_rnn_exploding() -> tuple[L.LightningModule, Any]:
    """A ReLU ``nn.RNN`` with recurrent weights of spectral radius ~1.6, 60 steps, no clipping: explodes in time."""
    torch.manual_seed(42)
    x, y = first_token_task(512, 60, seed=42)
    model = SeqClassifier("RNN", nonlinearity="relu")
    with torch.no_grad():
        nn.init.orthogonal_(model.rnn.weight_hh_l0, gain=1.6)
    task = BareTask(model, _cls, lambda m: torch.optim.SGD(m.parameters(), lr=0.05))
    return task, _loader(x, y, batch_size=32, seed=42)


class PatchTransformer(nn.Module):
    """A small pre-norm transformer LM (4 layers), GELU, as people write it with nn.TransformerEncoderLayer."""

    def __init__(self, vocab: int = 32, dim: int = 64, layers: int = 4, seq: int = 32) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)  # fmt: skip
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos[:t]
        return self.lm_head(self.norm(self.encoder(h, mask=self.mask[:t, :t], is_causal=True)))


def build_transformer_lr_high() -> tuple[L.LightningModule, Any]:
    """A pre-norm transformer LM at Adam lr 0.1 with no warm-up: blows up within a few steps."""
    torch.manual_seed(43)
    seqs = markov_tokens(1024, 33, 32, seed=43)
    task = BareTask(PatchTransformer(), _lm, lambda m: torch.optim.Adam(m.parameters(), lr=0.1))
    return task, _loader(seqs, batch_size=32, seed=43)


def build_lr_to_zero() -> tuple[L.LightningModule, Any]:
    """A GNN whose step schedule multiplies the LR by 0 at step 15 (a bad milestone/gamma): learning stops."""
    torch.manual_seed(44)
    feats, adj, comm = sbm_graphs(512, 16, 4, seed=44)
    task = BareTask(GNN(), _node_cls, lambda m: torch.optim.Adam(m.parameters(), lr=3e-3),
                    schedule=lambda step: 1.0 if step < 15 else 0.0)  # fmt: skip
    return task, _loader(feats, adj, comm, batch_size=16, seed=44)


def build_frozen_by_mistake() -> tuple[L.LightningModule, Any]:
    """A Swin-style net whose blocks and patch embedding are frozen by mistake (a leftover fine-tuning line)."""
    torch.manual_seed(45)
    x, y = pattern_images(1024, 8, 16, seed=45)
    model = TinySwin()
    for module in (model.patch_embed, model.blocks):
        module.requires_grad_(False)
    task = BareTask(model, _cls, _adamw(1e-3, 0.05), warmup_cosine(10, 60))
    return task, _loader(x, y, batch_size=32, seed=45)


class BiasedMLP(nn.Module):
    def __init__(self, bias: float = -2.0, width: int = 64) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1),
        )  # fmt: skip
        with torch.no_grad():
            for m in list(self.net)[:-1]:
                if isinstance(m, nn.Linear):
                    m.bias.fill_(bias)  # a "negative bias to sparsify" initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_dying_relu_bias() -> tuple[L.LightningModule, Any]:
    """A ReLU MLP whose hidden biases are initialised to -2: most units never activate (dying ReLU)."""
    torch.manual_seed(46)
    x, y = teacher_regression(2048, 16, seed=46, hidden=32)
    task = BareTask(BiasedMLP(), _mse, lambda m: torch.optim.Adam(m.parameters(), lr=1e-3))
    return task, _loader(x, y, batch_size=64, seed=46)


class SigmoidMLP(nn.Module):
    def __init__(self, depth: int = 8, width: int = 64) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(16, width), nn.Sigmoid()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 4))
        with torch.no_grad():
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=1.0)  # large weights: the sigmoids saturate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_saturated_sigmoid() -> tuple[L.LightningModule, Any]:
    """An 8-layer sigmoid MLP with N(0, 1) weights: saturated units, the gradient vanishes toward the input."""
    torch.manual_seed(47)
    gen = torch.Generator().manual_seed(47)
    x = torch.randn(2048, 16, generator=gen)
    y = (x[:, :2] > 0).long() @ torch.tensor([1, 2])
    task = BareTask(SigmoidMLP(), _cls, lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    return task, _loader(x, y, batch_size=64, seed=47)


# ====================================================================================================== fp16 (loop)
def run_fp16_loop(steps: int = 22, loss_scale: float = 1e6) -> dict[str, Any]:
    """A small convnet under fp16 autocast with a ``torch.amp.GradScaler`` on the CPU, its loss scaled x1e6.

    Lightning creates a GradScaler for ``precision="16-mixed"`` on CUDA only, so this is a plain loop with
    :class:`~lightning_gradhealth.GradientHealth` (which the Trainer path shares). Returns what it said: the
    exception raised (if any), the alerts and the findings.
    """
    from lightning_gradhealth import GradientHealth, TrainingHealthError

    torch.manual_seed(48)
    x, y = pattern_images(512, 8, 16, seed=48)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    alerts: list[Any] = []
    health = GradientHealth(model, scaler=scaler, log_every_n_steps=1, report=False, on_alert=alerts.append)
    raised: BaseException | None = None
    batches = [b for _ in range(math.ceil(steps / 16)) for b in _loader(x, y, batch_size=32, seed=48)][:steps]
    try:
        for i, (xb, yb) in enumerate(batches):
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(model(xb), yb) * loss_scale
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if health.step(opt, step=i, loss=loss.detach()):
                scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    except TrainingHealthError as err:
        raised = err
    health.close()
    return {"raised": raised, "alerts": alerts, "findings": list(health.findings), "health": health}


# ====================================================================================================== registry
def _about(*words: str) -> Callable[[str], bool]:
    return lambda fix: any(w in fix.lower() for w in words)


@dataclass(frozen=True)
class HeldOut:
    """One held-out case: an :class:`~archs.Arch` and, for a pathology, what its first fix must be about.

    Attributes:
        arch: The architecture as trained.
        first_fix: A predicate on the first fix of the first expected finding (pathologies).
        fix_words: What the first fix must mention (for the messages).
        loss_only: Only the loss reveals it (needs the loss evidence of the trust-loss work).
    """

    arch: Arch
    first_fix: Callable[[str], bool] = field(default=lambda _fix: True)
    fix_words: str = ""
    loss_only: bool = False


def _case(name: str, build: Any, steps: int, expect: tuple[str, ...] = (), words: tuple[str, ...] = (),
          loss_only: bool = False, **trainer: Any) -> HeldOut:  # fmt: skip
    arch = Arch(name, build, steps, not expect, expect=expect, trainer_kwargs=trainer, description=build.__doc__ or "")
    return HeldOut(arch, _about(*words) if words else (lambda _fix: True), " / ".join(words), loss_only)


LR_WORDS = ("learning rate", "lr", "warm-up", "warmup")
# Fixed before tuning (issue 19): calibrate on CALIBRATION only; CONFIRMATION is run as it is.
CALIBRATION: dict[str, HeldOut] = {
    h.arch.name: h
    for h in (
        _case("swin", build_swin, 60),
        _case("gnn", build_gnn, 60),
        _case("convnext_layer_scale", build_convnext, 60),
        _case("vanilla_rnn", build_rnn, 60, gradient_clip_val=1.0),
        _case("rnn_vanishing_in_time", build_rnn_vanishing, 40, ("recurrent_vanishing",), ("gru", "lstm", "gated")),
        _case("dying_relu_bias", build_dying_relu_bias, 60, ("dead",), ("leaky", "bias", "initiali")),
        _case("lr_to_zero", build_lr_to_zero, 60, ("stall", "stalled", "not_learning"), ("learning rate", "schedule"),
              loss_only=True),
        _case("transformer_lr_high", build_transformer_lr_high, 30, ("diverging", "exploding", "nonfinite"), LR_WORDS,
              loss_only=True),
    )
}  # fmt: skip
CONFIRMATION: dict[str, HeldOut] = {
    h.arch.name: h
    for h in (
        _case("perceiver", build_perceiver, 60),
        _case("unet_attention", build_unet, 60),
        _case("seq2seq_attention", build_seq2seq, 60, gradient_clip_val=1.0),
        _case("moe", build_moe, 60),
        _case("rnn_exploding_in_time", build_rnn_exploding, 40, ("recurrent_exploding", "exploding", "nonfinite"),
              ("clip",)),
        _case("saturated_sigmoid", build_saturated_sigmoid, 60, ("vanishing", "saturation"),
              ("relu", "gelu", "sigmoid")),
        _case("frozen_by_mistake", build_frozen_by_mistake, 60, ("stall", "stalled", "frozen", "not_learning"),
              ("frozen", "requires_grad"), loss_only=True),
    )
}  # fmt: skip
HELDOUT: dict[str, HeldOut] = {**CALIBRATION, **CONFIRMATION}
