"""Shared fixtures: tiny real models, a real Trainer factory, a grad-capturing callback and a float64 reference."""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth.model.layout import layer_name

warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging|LeafSpec).*")


class TinyMLP(L.LightningModule):
    """In 8 → 16 → 16 → 1 ReLU MLP with an optional frozen and an optional unused layer."""

    def __init__(
        self,
        *,
        frozen: bool = False,
        unused: bool = False,
        lr: float = 0.05,
        optimizer: str = "sgd",
        fused: bool = False,
        poison: dict[int, tuple[str, float]] | None = None,
        loss_scale_at: dict[int, float] | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
        if frozen:
            self.frozen = nn.Linear(8, 8)
            self.frozen.requires_grad_(False)
        if unused:
            self.unused = nn.Linear(4, 4)
        self.lr = lr
        self.optimizer = optimizer
        self.fused = fused
        # poison: {micro_batch_counter: (param_name, value)} -> that param's grad gets `value` in one entry
        self.poison = poison or {}
        self.loss_scale_at = loss_scale_at or {}
        self.micro = 0
        self._armed: tuple[str, float] | None = None
        for name, p in self.named_parameters():
            if p.requires_grad:
                p.register_hook(self._make_hook(name))

    def _make_hook(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self._armed is not None and self._armed[0] == name:
                grad = grad.clone()
                grad.view(-1)[0] = self._armed[1]
            return grad

        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self._armed = self.poison.get(self.micro)
        if self.micro in self.loss_scale_at:
            loss = loss * self.loss_scale_at[self.micro]
        self.micro += 1
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.fused)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


# One CPU thread per process, for this process and every process a test starts (inherited through the
# environment): the models here are tiny, so a second intra-op thread buys nothing, and on a 2-core machine running
# 2- and 4-process runs (or two test workers) OpenMP's threads wait on each other spinning, which multiplies CPU time.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> Any:
    torch.manual_seed(0)
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)  # (a test that raised it, e.g. the demo's two threads, does not slow the next)
    yield
    from lightning_gradhealth.core.at_exit import OPEN_RUNS

    OPEN_RUNS.clear()  # (a test's unclosed loop run is not closed at the suite's exit: no stray report files)


@pytest.fixture(autouse=True)
def _rank_zero_logger() -> Any:
    """Importing ``pytorch_lightning`` (the namespace tests do, in this process) points the rank-zero logger that both
    namespaces share at its own: put it back, so later tests read Lightning's messages where Lightning logs them."""
    from lightning_utilities.core import rank_zero

    log = rank_zero.log
    yield
    rank_zero.log = log


def loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = x[:, :1] * 0.5 + 0.1 * torch.randn(n, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def make_trainer(tmp_path: Any = None, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": 6,
        "log_every_n_steps": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": False
        if tmp_path is None
        else L.pytorch.loggers.TensorBoardLogger(str(tmp_path), name="", version=""),
        # never write into the working tree (checkpoints of trainers without a logger go here)
        "default_root_dir": str(tmp_path) if tmp_path is not None else tempfile.mkdtemp(prefix="gradhealth-test-"),
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class Capture(Callback):
    """Captures float64 copies of grads and params in on_before_optimizer_step (place it after the monitor)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.steps.append(
            {
                "step": trainer.fit_loop.epoch_loop._batches_that_stepped,
                "optimizer": optimizer,
                "scale": None if scaler is None else float(scaler.get_scale()),
                "grads": {  # dense: a sparse gradient (nn.Embedding(sparse=True)) as the dense one it stands for
                    n: p.grad.detach().to_dense().to(torch.float64).clone()
                    for n, p in pl_module.named_parameters()
                    if p.requires_grad and p.grad is not None
                },
                "params": {n: p.detach().to(torch.float64).clone() for n, p in pl_module.named_parameters()},
            }
        )


class PostClipNorms(Callback):
    """The global norm of the gradients the optimizer receives (place it after the monitor, which clips)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad.to_dense().double().reshape(-1) for p in pl_module.parameters() if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())


def reference(
    grads: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    group_by: Any = "module",
    norm_type: float = 2.0,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Independent float64 reference: flatten and concatenate per layer, then one vector norm."""
    layers: dict[str, list[str]] = {}
    for name in grads:
        layers.setdefault(layer_name(name, group_by), []).append(name)

    def vnorm(ts: Sequence[torch.Tensor]) -> float:
        flat = torch.cat([t.reshape(-1) for t in ts])
        if math.isinf(norm_type):
            return flat.abs().max().item()
        return flat.abs().pow(norm_type).sum().pow(1.0 / norm_type).item()

    out: dict[str, Any] = {"layers": {}}
    all_g = [grads[n] / scale for n in grads]
    out["total_norm"] = vnorm(all_g)
    out["param_norm"] = vnorm([params[n] for n in grads])
    flat = torch.cat([g.reshape(-1) for g in all_g])
    out["zero_frac"] = (flat == 0).sum().item() / flat.numel()
    out["max_abs"] = flat.abs().max().item()
    for layer, names in layers.items():
        g = [grads[n] / scale for n in names]
        cat = torch.cat([t.reshape(-1) for t in g])
        gn, pn = vnorm(g), vnorm([params[n] for n in names])
        nz = cat[cat != 0].abs()
        out["layers"][layer] = {
            "grad_norm": gn,
            "param_norm": pn,
            "ratio": gn / (pn + 1e-8),
            "zero_frac": (cat == 0).sum().item() / cat.numel(),
            "max_abs": cat.abs().max().item(),
            "min_abs_nonzero": nz.min().item() if nz.numel() else math.inf,
            "mean": cat.mean().item(),
            "std": cat.std(unbiased=False).item(),
            "nan": torch.isnan(cat).sum().item(),
            "inf": torch.isinf(cat).sum().item(),
        }
    finite = [v["grad_norm"] for v in out["layers"].values() if math.isfinite(v["grad_norm"]) and v["grad_norm"] > 0]
    out["layer_norm_ratio"] = max(finite) / min(finite) if len(finite) >= 2 else 1.0
    return out


def assert_matches(record: Any, ref: dict[str, Any], rel: float | None = None, full: bool = False) -> None:
    """Every statistic of a record equals the float64 reference.

    ``rel`` defaults to 1e-5 for norms and ratios, 1e-6 for max / min non-zero ``|g|``. The monitor accumulates
    float32 gradients' norms in float32, in the order of the CPU's vector kernels (another on AVX-512 than on AVX2):
    a few float32 ulps (6e-8) times log2(n) relative, which 1e-6 does not bound for every CPU. Maxima and minima
    select one of the same float32 values: exact, the 1e-6 is slack.
    """
    norm_rel = 1e-5 if rel is None else rel
    extreme_rel = 1e-6 if rel is None else rel
    assert record.total_norm == pytest.approx(ref["total_norm"], rel=norm_rel)
    assert record.param_norm == pytest.approx(ref["param_norm"], rel=norm_rel)
    assert record.zero_frac == pytest.approx(ref["zero_frac"], abs=1e-12)
    assert record.layer_norm_ratio == pytest.approx(ref["layer_norm_ratio"], rel=norm_rel)
    assert [lay.name for lay in record.layers] == list(ref["layers"])
    for lay in record.layers:
        r = ref["layers"][lay.name]
        assert lay.grad_norm == pytest.approx(r["grad_norm"], rel=norm_rel), lay.name
        assert lay.param_norm == pytest.approx(r["param_norm"], rel=norm_rel), lay.name
        assert lay.ratio == pytest.approx(r["ratio"], rel=norm_rel), lay.name
        assert lay.zero_frac == pytest.approx(r["zero_frac"], abs=1e-12), lay.name
        if full:
            assert lay.max_abs == pytest.approx(r["max_abs"], rel=extreme_rel), lay.name
            assert lay.min_abs_nonzero == pytest.approx(r["min_abs_nonzero"], rel=extreme_rel), lay.name
            # a float32 sum that cancels: its error is relative to the entries' size (~ the std), not to the mean
            assert lay.mean == pytest.approx(r["mean"], rel=1e-5, abs=1e-5 * r["std"]), lay.name
            assert lay.std == pytest.approx(r["std"], rel=1e-5), lay.name


class Records(Callback):
    """Collects every distinct record the monitor produced (read after each batch)."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.records: list[Any] = []

    def _grab(self) -> None:
        rec = self.monitor.last_record
        if rec is not None and all(rec is not r for r in self.records):
            self.records.append(rec)

    def on_before_optimizer_step(self, *args: Any) -> None:
        self._grab()

    def on_train_batch_end(self, *args: Any) -> None:
        self._grab()

    def on_train_end(self, *args: Any) -> None:
        self._grab()


def run_example(name: str, cwd: Any) -> Any:
    """Run ``examples/<name>`` as a user would (a subprocess in ``cwd``); the completed process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / name
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
