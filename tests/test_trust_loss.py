"""The loss as evidence: real small runs whose loss diverges, stalls or is held back by frozen layers, and healthy ones.

Each run is a real training loop (or a real ``Trainer``) on CPU; every step's loss reaches the monitor, which keeps a
device-side summary of it (``stats/loss.py``) and judges the run's learning with it (``diagnosis/learning.py``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gradhealth import GradientHealth
from lightning_gradhealth.config.options import HealthOptions
from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.stats.loss import FIRST, LossTracker

# ---------------------------------------------------------------------------------------------- models and data


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _rope(x: torch.Tensor) -> torch.Tensor:
    t, d = x.shape[-2:]
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv[None]
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()), -1).flatten(-2)


class LlamaBlock(nn.Module):
    """Pre-norm block: RMSNorm, causal attention with RoPE, RMSNorm, SwiGLU."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate, self.up = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(_rope(q), _rope(k), v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyLlama(nn.Module):
    def __init__(self, vocab: int = 64, d: int = 32, layers: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(LlamaBlock(d, heads) for _ in range(layers))
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def _lm_batch(g: torch.Generator, vocab: int = 64, b: int = 8, t: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic sequences (a random start and stride): a next-token rule a small model learns."""
    start = torch.randint(0, vocab, (b, 1), generator=g)
    stride = torch.randint(1, 4, (b, 1), generator=g)
    seq = (start + stride * torch.arange(t + 1)) % vocab
    return seq[:, :-1], seq[:, 1:]


class ConvNet(nn.Module):
    """Four conv blocks and a linear head (10 classes)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        chans = [1, width, width, width, width]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU())
            for i in range(4)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean((2, 3)))


def _image_task(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """10 classes of 8x8 images: a class-specific pattern plus noise (learnable in a few dozen steps)."""
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randn(10, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return patterns[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=g), y


def _run(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn=F.cross_entropy,
    *,
    every: int = 5,
    sched=None,
    tmp_path: Path | None = None,
    **kwargs,
) -> tuple[GradientHealth, list]:
    alerts: list = []
    health = GradientHealth(
        model,
        log_every_n_steps=every,
        report=tmp_path is not None,
        report_dir=tmp_path,
        on_alert=alerts.append,
        **kwargs,
    )
    for i, (x, y) in enumerate(batches):
        out = model(x)
        loss = loss_fn(out.flatten(0, -2) if out.dim() > 2 else out, y.flatten())
        loss.backward()
        if health.step(opt, loss=loss, step=i):
            opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
    health.close()
    return health, alerts


def _lm_run(lr: float, steps: int = 40, **kwargs) -> tuple[GradientHealth, list]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = TinyLlama()
    return _run(model, torch.optim.Adam(model.parameters(), lr=lr), [_lm_batch(g) for _ in range(steps)], **kwargs)


def _image_batches(steps: int, batch: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _image_task(seed=seed)
    return [(x[(i * batch) % len(x) :][:batch], y[(i * batch) % len(y) :][:batch]) for i in range(steps)]


def _kinds(health: GradientHealth) -> list[str]:
    return [f.kind for f in health.findings]


def _advice(health: GradientHealth, alerts: list) -> str:
    return "\n".join([*(fix for f in health.findings for fix in f.fixes), *(f.code for f in health.findings),
                      *(a.message for a in alerts)])  # fmt: skip


# ---------------------------------------------------------------------------------------------- the device summary


def test_loss_summary_matches_a_float64_reference_and_never_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows (a buffer folded twice), NaN/Inf steps, the first losses: all against float64 on the host."""
    g = torch.Generator().manual_seed(3)
    values = (torch.rand(70, generator=g, dtype=torch.float64) * 5).tolist()
    values[2], values[33], values[50] = math.nan, math.inf, 40.0  # NaN, Inf among them, a blow-up between reads
    tracker = LossTracker(capacity=16)  # 30 steps between reads: the buffer is folded on the device
    reads = [29, 59, 69]

    def forbidden(*_a, **_k):
        raise AssertionError("a host sync in observe()")

    start = 0
    for read in reads:
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", forbidden)
            m.setattr(torch.Tensor, "tolist", forbidden)
            m.setattr(torch.Tensor, "__float__", forbidden)
            for v in values[start : read + 1]:
                tracker.observe(torch.tensor(v, dtype=torch.float32))
        extras = tracker.extras(read)
        tracker.landed(read, {k: float(v) for k, v in extras.items()})
        window = [v for v in values[start : read + 1]]
        finite = [float(torch.tensor(v, dtype=torch.float32)) for v in window if math.isfinite(v)]
        summary = tracker.last
        assert summary is not None and summary.window == len(window) and summary.steps == read + 1
        assert summary.mean == pytest.approx(math.fsum(finite) / len(finite), rel=1e-6)
        assert summary.low == pytest.approx(min(finite)) and summary.high == pytest.approx(max(finite))
        tail = window[-max(1, len(window) // 4) :]  # (the last window fits the buffer)
        if tail is not None and read == 69:
            ft = [float(torch.tensor(v, dtype=torch.float32)) for v in tail if math.isfinite(v)]
            assert summary.recent == pytest.approx(math.fsum(ft) / len(ft), rel=1e-6)
        start = read + 1
    first = [float(torch.tensor(v, dtype=torch.float32)) for v in values[:FIRST] if math.isfinite(v)]
    assert tracker.last.start == pytest.approx(first[0])
    assert tracker.last.first == pytest.approx(
        sorted(first)[len(first) // 2]
        if len(first) % 2
        else (sorted(first)[len(first) // 2 - 1] + sorted(first)[len(first) // 2]) / 2
    )
    assert tracker.last.nonfinite == 2
    assert max(v for v in values[30:60] if math.isfinite(v)) == 40.0  # the blow-up between reads is in the window


# ---------------------------------------------------------------------------------------------- pathologies


def test_lr_too_high_on_a_llama_style_transformer_leads_with_instability() -> None:
    """Adam lr 0.3, no warm-up: the loss rises in the first steps, before the first computed step."""
    health, alerts = _lm_run(0.3)
    kinds = _kinds(health)
    assert kinds and kinds[0] == Kind.DIVERGING, [(f.kind, f.summary) for f in health.findings]
    lead = health.findings[0]
    assert "before the first computed step" in lead.summary
    assert "100x" in lead.fixes[0] and "0.3" in lead.fixes[0]  # sized to an lr far out of range, not "3-10x"
    assert Kind.LAYER_IMBALANCE not in kinds and Kind.RATIO_LOW not in kinds
    advice = _advice(health, alerts).lower()
    assert "increase the learning rate" not in advice and "raise the learning rate" not in advice
    assert "lamb" not in advice and "per-layer learning rate" not in advice


def test_lr_schedule_to_zero_mid_run_is_a_stall_naming_the_learning_rate(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / 20))  # 0 from step 20 of 60
    health, _ = _run(model, opt, _image_batches(60), sched=sched, tmp_path=tmp_path)
    stalls = [f for f in health.findings if f.kind == Kind.STALL]
    assert stalls and "learning rate fell to 0" in stalls[0].summary, [(f.kind, f.summary) for f in health.findings]
    report = (tmp_path / "gradient_health_report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| Learning rate (largest group"))
    assert "0.04 (step 4)" in row and "0 (steps" in row  # the trajectory, down to 0


def test_half_a_convnet_frozen_by_mistake_is_named() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    for block in (model.blocks[1], model.blocks[2]):
        block.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    health, _ = _run(model, opt, _image_batches(40))
    stalls = [f for f in health.findings if f.kind == Kind.STALL]
    assert stalls, [(f.kind, f.summary) for f in health.findings]
    assert set(stalls[0].layers) == {"blocks.1", "blocks.2"} and "frozen" in stalls[0].summary


def test_a_frozen_backbone_with_a_trained_head_is_said_in_words_not_alarmed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvNet()
    model.blocks.requires_grad_(False)
    opt = torch.optim.SGD(model.head.parameters(), lr=0.05, momentum=0.9)
    health, alerts = _run(model, opt, _image_batches(40), tmp_path=tmp_path)
    assert Kind.STALL not in _kinds(health)
    report = (tmp_path / "gradient_health_report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| Frozen parameters"))
    assert "intended freeze" in row and "blocks" in row and "✅" in row


@pytest.mark.parametrize("every", [3, 10])
def test_one_noisy_batch_in_a_falling_run_is_not_divergence(every: int) -> None:
    """SGD 0.1 at batch 16: one batch's loss at 2.5x the early level (and a gradient as large) while the run falls."""
    torch.manual_seed(0)
    model = ConvNet()
    calls = iter(range(10**6))

    def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, y)
        return loss * 2.5 * 2.3 / loss.detach() if next(calls) == 45 else loss  # one noisy batch, late

    health, alerts = _run(model, torch.optim.SGD(model.parameters(), lr=0.1), _image_batches(60, batch=16), loss_fn,
                          every=every)  # fmt: skip
    summary = health.history.loss_summary
    assert summary is not None and summary.mean < 0.8 * summary.first  # the run falls
    assert max(health.history.loss_high) >= 2.4 * summary.first  # the noisy batch was seen...
    assert Kind.DIVERGING not in _kinds(health)  # ...and is not a divergence
    assert all(a.kind != Kind.DIVERGING for a in alerts)


# ---------------------------------------------------------------------------------------------- healthy runs, front-ends


def test_a_healthy_transformer_run_has_no_finding_and_no_alert() -> None:
    health, alerts = _lm_run(3e-3)
    assert health.findings == [] and alerts == []
    assert health.history.loss_summary.steps == 40


def test_a_healthy_convnet_run_has_no_finding_and_no_alert() -> None:
    torch.manual_seed(0)
    model = ConvNet()
    health, alerts = _run(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), _image_batches(40))
    assert health.findings == [] and alerts == []


def test_plain_loop_fixes_never_name_the_trainer_or_the_callback() -> None:
    th = Thresholds(total_norm_high_warning=1e-3, total_norm_high_critical=1e-2)  # every norm "exploding"
    health, alerts = _lm_run(0.3, thresholds=th)
    advice = _advice(health, alerts)
    assert alerts and any("clip" in fix for f in health.findings for fix in f.fixes)
    assert "Trainer(" not in advice and "GradientHealthMonitor" not in advice
    assert "GradientHealth(model, clip='norm'" in advice


def test_the_callback_fixes_name_the_callback(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from lightning_gradhealth import GradientHealthMonitor

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyLlama()

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self.net(x).flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.3)

    g = torch.Generator().manual_seed(1)
    x, y = _lm_batch(g, b=320)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(report=False, verbose=False)
    trainer = pl.Trainer(max_steps=40, log_every_n_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
                         default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(Module(), data)
    assert monitor.health.history.loss_summary.steps == 40  # every step's loss, not only the logged ones
    assert monitor.findings and monitor.findings[0].kind == Kind.DIVERGING
    assert any("GradientHealthMonitor(" in fix for f in monitor.findings for fix in f.fixes)


# ---------------------------------------------------------------------------------------------- docs


def test_every_documented_default_equals_the_code() -> None:
    table = Path(__file__).parents[1] / "docs" / "options.md"
    defaults = {
        f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        for f in dataclasses.fields(HealthOptions)
    }
    # (a clipper's parameter defaults to None, its clipper's own default: the table's text says which)
    checked = 0
    for line in table.read_text().splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 3 or not cells[0].startswith("`") or cells[1] in ("default", "---"):
            continue
        names = re.findall(r"`(\w+)`", cells[0])
        values = [v.strip().strip("`") for v in cells[1].split("`,")] if len(names) > 1 else [cells[1].strip("`")]
        for name, text in zip(names, values, strict=True):
            assert name in defaults, f"docs/options.md documents {name!r}, which HealthOptions does not have"
            expected = defaults[name]
            if text == "required":
                assert expected is None, (name, expected)  # (clip_value: required with clip='value')
                continue
            value = eval(text.replace("_", ""), {"Thresholds": Thresholds})  # (the docs' own literals)
            assert value == expected, f"docs/options.md: {name} defaults to {text}, HealthOptions to {expected!r}"
            checked += 1
    assert checked >= 30
