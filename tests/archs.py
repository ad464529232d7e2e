"""Real architectures, trained as people train them, to judge the diagnosis on (issue 11).

Every builder is deterministic (its own seed), tiny but architecturally faithful, and trains on the CPU in a few
seconds on synthetic but learnable data (a Markov chain of tokens, class templates under noise, a teacher
regression), so that the gradients look like those of a real run.

Healthy runs (:data:`HEALTHY`) must end with no finding and no alert. Pathologies (:data:`PATHOLOGIES`) are
produced naturally, by a configuration people really get wrong (a learning rate above the stability limit, a
schedule that jumps, a deep sigmoid stack, one huge step), never by editing gradients.

:func:`run` trains one of them under a real ``lightning.Trainer`` with a ``GradientHealthMonitor`` and returns a
:class:`RunResult` (findings, alerts, records, the exception the run raised, the losses).

Used by ``tests/test_trust.py`` (the acceptance tests) and ``benchmarks/calibrate.py`` (the calibration data).
"""

from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import Alert, GradientHealthMonitor

warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging|LeafSpec).*")
warnings.filterwarnings("ignore", message=".*GPU available but not used.*")

__all__ = [
    "ARCHS",
    "HEALTHY",
    "PATHOLOGIES",
    "Arch",
    "RunResult",
    "dead_unit_fractions",
    "run",
]


# ====================================================================================================== data


def markov_tokens(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """``n`` token sequences of a sparse random Markov chain: each token has three likely successors.

    The next token is predictable from the current one (entropy ~0.9 nats against ``log(vocab)`` for a
    uniform guess), so a language model's loss falls quickly, as on real text.
    """
    gen = torch.Generator().manual_seed(seed)
    succ = torch.stack([torch.randperm(vocab, generator=gen)[:3] for _ in range(vocab)])  # (vocab, 3)
    probs = torch.tensor([0.6, 0.3, 0.1])
    seqs = torch.empty(n, seq_len, dtype=torch.long)
    seqs[:, 0] = torch.randint(vocab, (n,), generator=gen)
    for t in range(1, seq_len):
        pick = torch.multinomial(probs.expand(n, 3), 1, generator=gen).squeeze(1)
        seqs[:, t] = succ[seqs[:, t - 1], pick]
    return seqs


def pattern_images(
    n: int, classes: int, size: int, seed: int, noise: float = 1.0, label_noise: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` RGB images of ``classes`` smooth random templates under Gaussian noise and random shifts.

    A fraction ``label_noise`` of the labels is random, as in real data: the loss keeps a floor instead of
    reaching zero (a convnet separates the templates themselves within a few dozen steps).
    """
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(classes, 3, 4, 4, generator=gen)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    templates = templates / templates.std(dim=(1, 2, 3), keepdim=True)
    y = torch.randint(classes, (n,), generator=gen)
    x = templates[y]
    shifts = torch.randint(-2, 3, (n, 2), generator=gen)
    x = torch.stack([torch.roll(img, (int(s[0]), int(s[1])), dims=(1, 2)) for img, s in zip(x, shifts, strict=True)])
    x = x + noise * torch.randn(x.shape, generator=gen)
    flip = torch.rand(n, generator=gen) < label_noise
    return x, torch.where(flip, torch.randint(classes, (n,), generator=gen), y)


def teacher_regression(n: int, dim: int, seed: int, noise: float = 0.1, hidden: int = 0) -> tuple[torch.Tensor, ...]:
    """``x ~ N(0, I)``, ``y`` from a random teacher (linear, or a tanh MLP with ``hidden`` units) plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    if hidden:
        w1 = torch.randn(dim, hidden, generator=gen) / math.sqrt(dim)
        w2 = torch.randn(hidden, 1, generator=gen) / math.sqrt(hidden)
        y = torch.tanh(x @ w1) @ w2
    else:
        y = x @ (torch.randn(dim, 1, generator=gen) / math.sqrt(dim))
    return x, y + noise * torch.randn(n, 1, generator=gen)


def _loader(*tensors: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=gen, drop_last=True)


# ====================================================================================================== training


def warmup_cosine(warmup: int, total: int, floor: float = 0.1) -> Callable[[int], float]:
    """The usual schedule of transformers: linear warm-up, then cosine decay to ``floor`` × the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups as nanoGPT / HF do it: no weight decay on biases, norms and 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Task(L.LightningModule):
    """A model, its loss and its optimizer (and an optional per-step LR schedule), as a LightningModule.

    Args:
        model: The network (its layers are named ``model.<...>`` in the records).
        loss: ``loss(model, batch) -> scalar``.
        optimizer: ``optimizer(model) -> torch.optim.Optimizer``.
        schedule: ``schedule(step) -> factor`` of the learning rate (``LambdaLR``, stepped every optimizer step),
            or a callable ``optimizer -> scheduler``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: Callable[[nn.Module, Any], torch.Tensor],
        optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        schedule: Callable[[int], float] | None = None,
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss
        self.make_optimizer = optimizer
        self.schedule = schedule
        self.make_scheduler = scheduler

    def forward(self, *args: Any) -> Any:
        return self.model(*args)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.loss_fn(self.model, batch)

    def configure_optimizers(self) -> Any:
        opt = self.make_optimizer(self.model)
        if self.make_scheduler is not None:
            sched = self.make_scheduler(opt)
        elif self.schedule is not None:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    (seqs,) = batch
    logits = model(seqs[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), seqs[:, 1:].reshape(-1))


def _cls_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def _mse_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


# ====================================================================================================== ResNet-18


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) identity, then ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (7x7/2 stem, max-pool, 4 stages of 2 BasicBlocks, avg-pool, fc) and init.

    With ``widths=(16, 32, 64, 128)`` and 32x32 inputs, the stages see 8x8, 4x4, 2x2 and 1x1 maps.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(widths[0], 2)
        self.layer2 = self._make_layer(widths[1], 2, stride=2)
        self.layer3 = self._make_layer(widths[2], 2, stride=2)
        self.layer4 = self._make_layer(widths[3], 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet18() -> tuple[L.LightningModule, DataLoader]:
    """ResNet-18 (widths 16-32-64-128) at 32x32, SGD momentum 0.9, lr 0.05, wd 5e-4, cosine; batch 64."""
    torch.manual_seed(0)
    model = ResNet18(widths=(16, 32, 64, 128))
    x, y = pattern_images(2048, classes=10, size=32, seed=1)

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)

    return Task(model, _cls_loss, opt, warmup_cosine(1, 80, floor=0.0)), _loader(x, y, batch_size=64, seed=2)


# ====================================================================================================== GPT-2


class CausalSelfAttention(nn.Module):
    """GPT-2's attention: one ``c_attn`` projection to q, k, v; causal scaled dot-product; ``c_proj``."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, d)))


class GPTMLP(nn.Module):
    """GPT-2's MLP: ``c_fc`` to 4d, GELU (tanh approximation), ``c_proj`` back."""

    def __init__(self, d: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class GPTBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = GPTMLP(d, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT-2: token + position embeddings, pre-LN blocks, final LN, ``lm_head`` tied to ``wte``."""

    def __init__(self, vocab: int = 64, ctx: int = 32, d: int = 64, layers: int = 4, heads: int = 4,
                 dropout: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList([GPTBlock(d, heads, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as GPT-2
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * layers))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build_gpt2(lr: float = 1e-3, horizon: int = 800) -> tuple[L.LightningModule, DataLoader]:
    """GPT-2 style LM (4 layers, d 64, vocab 64, ctx 32): AdamW(0.9, 0.95), wd 0.1, warm-up 10 + cosine; batch 16.

    ``horizon``: the steps the cosine schedule spans; trained for 80 steps, the run is the start of a longer one
    (where a wrong learning rate shows).
    """
    torch.manual_seed(0)
    model = GPT()
    seqs = markov_tokens(1024, 33, vocab=64, seed=3)

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(m, 0.1), lr=lr, betas=(0.9, 0.95))

    return Task(model, _lm_loss, opt, warmup_cosine(10, horizon)), _loader(seqs, batch_size=16, seed=4)


# ====================================================================================================== BERT


class BertEmbeddings(nn.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, vocab: int, ctx: int, d: int, dropout: float) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, d)
        self.position_embeddings = nn.Embedding(ctx, d)
        self.token_type_embeddings = nn.Embedding(2, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.size(1), device=ids.device)
        x = (
            self.word_embeddings(ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings(torch.zeros_like(ids))
        )
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """HF BERT's self-attention: separate ``query``, ``key`` and ``value`` projections, softmax(QK^T/sqrt(d_h))V."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for proj in (self.query, self.key, self.value))  # fmt: skip
        probs = self.dropout(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1))
        return (probs @ v).transpose(1, 2).reshape(b, t, d)


class BertAddNorm(nn.Module):
    """HF BERT's ``*Output``: ``LayerNorm(dropout(dense(h)) + residual)`` (post-LN)."""

    def __init__(self, d_in: int, d: int, dropout: float) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d)
        self.LayerNorm = nn.LayerNorm(d, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertAttention(nn.Module):
    """Self-attention, then its output projection, residual and LayerNorm."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self = BertSelfAttention(d, heads, dropout)
        self.output = BertAddNorm(d, d, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x), x)


class BertLayer(nn.Module):
    """HF BERT's post-LN layer: ``LN(x + attn(x))``, then ``LN(x + W2 GELU(W1 x))``."""

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attention = BertAttention(d, heads, dropout)
        self.intermediate = nn.Linear(d, ffn)
        self.intermediate_act_fn = nn.GELU()
        self.output = BertAddNorm(ffn, d, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x)
        return self.output(self.intermediate_act_fn(self.intermediate(x)), x)


class Bert(nn.Module):
    """BERT for masked-LM: embeddings with LayerNorm, post-LN layers, an MLM head tied to the word embeddings."""

    def __init__(self, vocab: int = 65, ctx: int = 32, d: int = 64, layers: int = 4, heads: int = 4,
                 ffn: int = 256, dropout: float = 0.1) -> None:  # fmt: skip
        super().__init__()
        self.embeddings = BertEmbeddings(vocab, ctx, d, dropout)
        self.encoder = nn.ModuleList([BertLayer(d, heads, ffn, dropout) for _ in range(layers)])
        self.transform = nn.Linear(d, d)
        self.transform_act = nn.GELU()
        self.transform_norm = nn.LayerNorm(d, eps=1e-12)
        self.decoder = nn.Linear(d, vocab)
        self.decoder.weight = self.embeddings.word_embeddings.weight  # tied, as BERT's MLM head
        for m in self.modules():  # BERT's init: N(0, 0.02), zero biases, unit LayerNorms
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        for layer in self.encoder:
            x = layer(x)
        return self.decoder(self.transform_norm(self.transform_act(self.transform(x))))


def _mlm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    (seqs,) = batch
    ids, labels = seqs[:, 0], seqs[:, 1]
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def build_bert() -> tuple[L.LightningModule, DataLoader]:
    """BERT-style MLM (post-LN, 4 layers, d 64): 15% masked (80/10/10), AdamW lr 1e-4, wd 0.01, warm-up; batch 16."""
    torch.manual_seed(0)
    vocab, mask_id = 64, 64
    model = Bert(vocab=vocab + 1)
    seqs = markov_tokens(1024, 32, vocab=vocab, seed=5)
    gen = torch.Generator().manual_seed(6)
    chosen = torch.rand(seqs.shape, generator=gen) < 0.15
    labels = torch.where(chosen, seqs, torch.full_like(seqs, -100))
    roll = torch.rand(seqs.shape, generator=gen)
    ids = torch.where(chosen & (roll < 0.8), torch.full_like(seqs, mask_id), seqs)
    ids = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), torch.randint(vocab, seqs.shape, generator=gen), ids)

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(m, 0.01), lr=1e-4)

    data = torch.stack([ids, labels], dim=1)  # (n, 2, T)
    return Task(model, _mlm_loss, opt, warmup_cosine(8, 80, floor=0.0)), _loader(data, batch_size=16, seed=7)


# ====================================================================================================== ViT


class ViTBlock(nn.Module):
    """timm's pre-LN ViT block: ``x + attn(norm1(x))``, ``x + mlp(norm2(x))`` (GELU MLP, ratio 4)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """ViT-tiny layout: patch-embedding conv, cls token, learned positions, pre-LN blocks, final LN, head on cls."""

    def __init__(self, size: int = 32, patch: int = 8, d: int = 64, depth: int = 4, heads: int = 4,
                 num_classes: int = 10) -> None:  # fmt: skip
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, (size // patch) ** 2 + 1, d))
        self.blocks = nn.ModuleList([ViTBlock(d, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.weight)  # timm's default head init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.size(0), -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def build_vit() -> tuple[L.LightningModule, DataLoader]:
    """ViT-tiny (patch 8 at 32x32, d 64, depth 4): AdamW lr 1e-3, wd 0.05, warm-up 10 + cosine; batch 64."""
    torch.manual_seed(0)
    model = ViT()
    x, y = pattern_images(2048, classes=10, size=32, seed=8)

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(decay_groups(m, 0.05), lr=1e-3)

    return Task(model, _cls_loss, opt, warmup_cosine(10, 80)), _loader(x, y, batch_size=64, seed=9)


# ====================================================================================================== LSTM


class LSTMLM(nn.Module):
    """Embedding, a 2-layer LSTM, a linear decoder: the classic word-level LM (PyTorch's example)."""

    def __init__(self, vocab: int = 64, d: int = 64, hidden: int = 128, layers: int = 2) -> None:
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.rnn = nn.LSTM(d, hidden, layers, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.encoder(idx))
        return self.decoder(out)


def build_lstm() -> tuple[L.LightningModule, DataLoader]:
    """LSTM LM (2 x 128): Adam lr 2e-3, gradient clipping at 1.0 (the Trainer's); batch 32."""
    torch.manual_seed(0)
    model = LSTMLM()
    seqs = markov_tokens(1024, 33, vocab=64, seed=10)

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Adam(m.parameters(), lr=2e-3)

    return Task(model, _lm_loss, opt), _loader(seqs, batch_size=32, seed=11)


# ====================================================================================================== pathologies


def _top_eigenvalue(x: torch.Tensor) -> float:
    """The largest eigenvalue of the Hessian of ``mean((x @ w + b - y) ** 2)`` in ``(w, b)``."""
    xb = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    return float(torch.linalg.eigvalsh(2.0 * xb.T @ xb / len(x))[-1])


def build_exploding_linear() -> tuple[L.LightningModule, DataLoader]:
    """Linear regression, full batch, SGD at 1.15x the stability limit 2/λmax: the norm grows x1.3 a step to NaN."""
    torch.manual_seed(0)
    x, y = teacher_regression(256, 16, seed=12)
    lr = 1.15 * 2.0 / _top_eigenvalue(x)  # |1 - lr * λmax| = 1.3
    model = nn.Sequential(nn.Linear(16, 1))

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=lr)

    return Task(model, _mse_loss, opt), _loader(x, y, batch_size=256, seed=13, shuffle=False)


def build_gpt2_lr1() -> tuple[L.LightningModule, DataLoader]:
    """The GPT-2 above with AdamW at lr 1 (1000x too large): the loss rises 4 -> ~30, the gradients stay finite."""
    return build_gpt2(lr=1.0)


class SigmoidConvNet(nn.Module):
    """A plain (non-residual, unnormalised) stack of 3x3 convs with sigmoids, default init, pooled into a linear."""

    def __init__(self, depth: int = 8, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.Sigmoid()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_sigmoid_conv() -> tuple[L.LightningModule, DataLoader]:
    """8 sigmoid conv layers at 16x16, default init, SGD momentum 0.9 lr 0.05: gradients vanish toward the input."""
    torch.manual_seed(0)
    model = SigmoidConvNet()
    x, y = pattern_images(2048, classes=10, size=16, seed=14)

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    return Task(model, _cls_loss, opt), _loader(x, y, batch_size=64, seed=15)


#: The step of the dead-ReLU run whose learning rate is huge.
DEAD_RELU_KILL_STEP = 20


def pixel_classes(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST-like data: ``dim`` "pixels" in [0, 1], a random template per class under noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(classes, dim, generator=gen)
    y = torch.randint(classes, (n,), generator=gen)
    return (templates[y] + 0.3 * torch.randn(n, dim, generator=gen)).clamp(0, 1), y


def build_dead_relu() -> tuple[L.LightningModule, DataLoader]:
    """A ReLU MLP classifier on pixels in [0, 1], SGD momentum 0.9 lr 0.05, one step (20) at 300x: units die.

    80-97% of the units of every hidden layer are zero on every input afterwards; the survivors keep learning.
    """
    torch.manual_seed(0)
    x, y = pixel_classes(2048, 64, 10, seed=16)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )  # fmt: skip

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

    def schedule(step: int) -> float:
        return 300.0 if step == DEAD_RELU_KILL_STEP else 1.0

    return Task(model, _cls_loss, opt, schedule), _loader(x, y, batch_size=64, seed=17)


#: The step at which the lr-jump run's learning rate jumps.
LR_JUMP_STEP = 60


def build_lr_jump() -> tuple[L.LightningModule, DataLoader]:
    """Linear regression, SGD lr 0.6; at step 60 a step schedule with ``gamma=10`` (meant: 0.1) makes it 6.

    The gradient norm goes from ~2 to ~5e8 in eight steps (x12 a step); the run ends there (``max_steps``),
    still finite.
    """
    torch.manual_seed(0)
    x, y = teacher_regression(4096, 8, seed=18, noise=1.5)
    model = nn.Sequential(nn.Linear(8, 1))

    def opt(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.6)

    def scheduler(o: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.MultiStepLR(o, milestones=[LR_JUMP_STEP], gamma=10.0)

    return Task(model, _mse_loss, opt, scheduler=scheduler), _loader(x, y, batch_size=64, seed=19)


# ====================================================================================================== registry


@dataclass(frozen=True)
class Arch:
    """One architecture (healthy) or pathology, as trained.

    Attributes:
        name: Short name.
        build: ``() -> (LightningModule, DataLoader)``, deterministic.
        steps: Optimizer steps to train (a pathology that goes non-finite stops earlier, raising).
        healthy: Whether the run is healthy (must end with no finding and no alert).
        expect: For a pathology, the finding kinds that describe it (any one of them).
        trainer_kwargs: Extra ``Trainer`` arguments as people use them (e.g. ``gradient_clip_val``).
        description: One line.
    """

    name: str
    build: Callable[[], tuple[L.LightningModule, DataLoader]]
    steps: int
    healthy: bool
    expect: tuple[str, ...] = ()
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


HEALTHY: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("resnet18", build_resnet18, 80, True, description=build_resnet18.__doc__ or ""),
        Arch("gpt2", build_gpt2, 80, True, trainer_kwargs={"gradient_clip_val": 1.0},
             description=(build_gpt2.__doc__ or "") + " Trainer clips at 1.0 (nanoGPT)."),
        Arch("bert", build_bert, 80, True, description=build_bert.__doc__ or ""),
        Arch("vit", build_vit, 80, True, description=build_vit.__doc__ or ""),
        Arch("lstm", build_lstm, 80, True, trainer_kwargs={"gradient_clip_val": 1.0},
             description=build_lstm.__doc__ or ""),
    )
}  # fmt: skip

PATHOLOGIES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("exploding_linear", build_exploding_linear, 500, False, expect=("exploding",),
             description=build_exploding_linear.__doc__ or ""),
        Arch("gpt2_lr1", build_gpt2_lr1, 80, False, expect=("diverging", "exploding"),
             trainer_kwargs={"gradient_clip_val": 1.0}, description=build_gpt2_lr1.__doc__ or ""),
        Arch("sigmoid_conv", build_sigmoid_conv, 60, False, expect=("vanishing",),
             description=build_sigmoid_conv.__doc__ or ""),
        Arch("dead_relu", build_dead_relu, 60, False, expect=("dead",), description=build_dead_relu.__doc__ or ""),
        Arch("lr_jump", build_lr_jump, LR_JUMP_STEP + 9, False, expect=("exploding",),
             description=build_lr_jump.__doc__ or ""),
    )
}  # fmt: skip

ARCHS: dict[str, Arch] = {**HEALTHY, **PATHOLOGIES}


# ====================================================================================================== harness


@dataclass
class RunResult:
    """What one run produced.

    Attributes:
        arch: The architecture's name.
        findings: ``monitor.findings`` at the end of fit (or when it failed fast).
        alerts: Every :class:`~lightning_gradhealth.Alert` passed to ``on_alert`` (rate-limited, as a pager sees).
        records: ``monitor.last_record`` of every computed step, in order (distinct records).
        raised: The exception ``trainer.fit`` raised, or ``None``.
        losses: The training loss of every optimizer step that ran (the last micro-batch's under accumulation).
        module: The trained LightningModule (its ``model`` attribute is the network).
        monitor: The monitor.
        probe: One batch of the training data (to probe the trained network, e.g. for dead units).
        seconds: Wall time of the fit.
    """

    arch: str
    findings: list[Any]
    alerts: list[Alert]
    records: list[Any]
    raised: BaseException | None
    losses: list[float]
    module: L.LightningModule
    monitor: GradientHealthMonitor
    probe: Any = None
    seconds: float = 0.0

    def kinds(self) -> dict[str, Any]:
        """Findings by kind (the first of each kind)."""
        out: dict[str, Any] = {}
        for f in self.findings:
            out.setdefault(f.kind, f)
        return out

    @property
    def first_nonfinite_step(self) -> int | None:
        """The first step whose record is non-finite, if any."""
        return next((r.step for r in self.records if not r.is_finite), None)


class _Collect(Callback):
    """Collects the monitor's distinct records and the loss of every optimizer step (place after the monitor)."""

    def __init__(self, monitor: GradientHealthMonitor) -> None:
        self.monitor = monitor
        self.records: list[Any] = []
        self.losses: list[float] = []
        self._last_loss: float | None = None

    def _grab(self) -> None:
        rec = self.monitor.last_record
        if rec is not None and (not self.records or self.records[-1] is not rec):
            if all(rec is not r for r in self.records[-4:]):
                self.records.append(rec)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._grab()
        if self._last_loss is not None:
            self.losses.append(self._last_loss)

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        value = float(loss.detach()) * trainer.accumulate_grad_batches
        self._last_loss = value / float(scaler.get_scale()) if scaler is not None else value

    def on_train_batch_end(self, *args: Any) -> None:
        self._grab()

    def on_train_end(self, *args: Any) -> None:
        self._grab()

    def on_exception(self, *args: Any) -> None:
        self._grab()


def run(
    arch: Arch | str,
    *,
    steps: int | None = None,
    monitor_kwargs: dict[str, Any] | None = None,
    precision: str = "32-true",
    accumulate: int = 1,
    log_every_n_steps: int = 1,
) -> RunResult:
    """Train ``arch`` under a real ``lightning.Trainer`` with a ``GradientHealthMonitor`` and collect what it said.

    Args:
        arch: An :class:`Arch` or the name of one in :data:`ARCHS`.
        steps: Optimizer steps (default: the architecture's own).
        monitor_kwargs: Extra ``GradientHealthMonitor`` arguments (``report=False`` and ``on_alert`` are set here
            unless given).
        precision: The Trainer's precision.
        accumulate: ``accumulate_grad_batches``.
        log_every_n_steps: The Trainer's (and so the monitor's) logging interval; 1 records every step.

    Returns:
        The :class:`RunResult`. An exception raised by ``fit`` (e.g. the monitor failing fast on NaN) is caught
        and kept in ``raised``.
    """
    import time

    a = ARCHS[arch] if isinstance(arch, str) else arch
    module, data = a.build()
    alerts: list[Alert] = []
    kwargs: dict[str, Any] = {"report": False, "on_alert": alerts.append}
    kwargs.update(monitor_kwargs or {})
    monitor = GradientHealthMonitor(**kwargs)
    collect = _Collect(monitor)
    root = tempfile.mkdtemp(prefix=f"gradhealth-trust-{a.name}-")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps if steps is not None else a.steps,
        max_epochs=-1,
        precision=precision,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=log_every_n_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=[monitor, collect],
        **a.trainer_kwargs,
    )
    torch.manual_seed(1234)  # dropout
    raised: BaseException | None = None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only spins (and the CPU is shared with other runs)
    start = time.perf_counter()
    try:
        trainer.fit(module, data)
    except Exception as err:  # kept for the caller to judge
        raised = err
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    return RunResult(
        arch=a.name,
        findings=list(monitor.findings),
        alerts=alerts,
        records=collect.records,
        raised=raised,
        losses=collect.losses,
        module=module,
        monitor=monitor,
        probe=next(iter(data)),
        seconds=seconds,
    )


def dead_unit_fractions(model: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """Ground truth, independent of the monitor: per ReLU call, the fraction of units zero on every input.

    A unit is a channel (dimension 1) of the ReLU's output. Keys are the names of the ReLU modules' *producing*
    layers where the model is an ``nn.Sequential`` (``"0"`` for the ReLU at ``"1"``), else the ReLU modules' own
    names; a module called more than once per forward (torchvision's ``BasicBlock.relu``) gets ``"#2"``, ... keys.
    """
    out: dict[str, float] = {}
    hooks = []
    names = dict(model.named_modules())
    order = list(names)

    def hook(name: str) -> Callable[..., None]:
        key = order[order.index(name) - 1] if isinstance(model, nn.Sequential) else name

        def fn(_m: nn.Module, _i: Any, o: torch.Tensor) -> None:
            alive = (o.detach() != 0).reshape(o.shape[0], o.shape[1], -1).any(dim=2).any(dim=0)
            k, n = key, 1
            while k in out:
                n += 1
                k = f"{key}#{n}"
            out[k] = 1.0 - alive.float().mean().item()

        return fn

    for name, m in names.items():
        if isinstance(m, nn.ReLU):
            hooks.append(m.register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()  # BatchNorm on its running statistics, as at inference
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return out


def iter_archs(names: list[str] | None = None) -> Iterator[Arch]:
    """The architectures named (all by default), healthy ones first."""
    for name in names or list(ARCHS):
        yield ARCHS[name]
