"""The built-in demo: an unhealthy deep sigmoid MLP beside a healthy residual ReLU MLP.

The pair is the classic one: saturating sigmoids multiply the gradient by at most 0.25 per layer (Glorot & Bengio,
2010), while residual connections and He initialisation keep its scale through depth (He et al., 2015, 2016).
"""

from __future__ import annotations

import math
import shutil
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth.diagnosis.rules import Finding
from lightning_gradhealth.frontends.lightning import GradientHealthMonitor
from lightning_gradhealth.schema.errors import GradientHealthError
from lightning_gradhealth.schema.record import StepStats

__all__ = [
    "DEMO_MARKER",
    "DEMO_RUNS",
    "DeepSigmoidMLP",
    "DemoRun",
    "RegressionTask",
    "ResidualReLUMLP",
    "clear_previous_runs",
    "run_demo",
]

#: The demo's runs: sub-folders of its output directory, the unhealthy net first.
DEMO_RUNS = ("deep_sigmoid", "residual_relu")
#: The file the demo leaves in each run folder it writes: a re-run removes only the folders that hold it.
DEMO_MARKER = ".gradhealth_demo"


class DeepSigmoidMLP(nn.Module):
    """The vanishing-gradient net: ``depth`` × (Linear, Sigmoid), default PyTorch init."""

    def __init__(self, depth: int = 20, width: int = 100, in_dim: int = 100) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_dim if i == 0 else width, width), nn.Sigmoid()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network."""
        return self.net(x)


class _ResidualBlock(nn.Module):
    def __init__(self, dim: int, blocks: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")
        # a small residual branch at init (scaled by depth), so the sum of blocks keeps a stable scale
        nn.init.normal_(self.fc2.weight, std=1.0 / (dim * 2 * blocks) ** 0.5)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ResidualReLUMLP(nn.Module):
    """The healthy alternative: pre-LayerNorm residual ReLU blocks with He (Kaiming) initialisation."""

    def __init__(self, blocks: int = 10, width: int = 100, in_dim: int = 100) -> None:
        super().__init__()
        self.stem = nn.Linear(in_dim, width)
        self.blocks = nn.Sequential(*(_ResidualBlock(width, blocks) for _ in range(blocks)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the network."""
        return self.head(self.norm(self.blocks(self.stem(x))))


class RegressionTask(LightningModule):
    """Fit ``model`` to a fixed random regression target with MSE and Adam."""

    def __init__(self, model: nn.Module, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """MSE on one batch, logged as ``train_loss``."""
        x, y = batch
        loss = nn.functional.mse_loss(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam."""
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _Collect(Callback):
    def __init__(self, monitor: GradientHealthMonitor) -> None:
        self.monitor = monitor
        self.records: list[StepStats] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        rec = self.monitor.last_record
        if rec is not None and (not self.records or self.records[-1] is not rec):
            self.records.append(rec)


@dataclass(frozen=True)
class DemoRun:
    """What one demo run produced."""

    name: str
    log_dir: str
    records: tuple[StepStats, ...]
    final_loss: float
    findings: tuple[Finding, ...] = ()
    alerts: int = 0

    def summary(self) -> str:
        """A few lines: global norm, depth profile, zero fraction."""
        if not self.records:
            return f"{self.name}: no record (too few steps)"
        norms = [r.total_norm for r in self.records]
        last = self.records[-1]
        first_l, last_l = last.layers[0], last.layers[-1]
        depth_ratio = first_l.grad_norm / last_l.grad_norm if last_l.grad_norm > 0 else math.inf
        return "\n".join(
            [
                f"{self.name}  ({len(self.records)} records, final loss {self.final_loss:.4f})",
                f"  global grad norm: median {statistics.median(norms):.3g}, last {last.total_norm:.3g}",
                f"  first layer {first_l.name}: {first_l.grad_norm:.3g}   last layer {last_l.name}: "
                f"{last_l.grad_norm:.3g}   first/last = {depth_ratio:.2g}",
                f"  largest/smallest layer norm: {last.layer_norm_ratio:.3g}   zero fraction: {last.zero_frac:.1%}   "
                f"NaN/Inf: {last.nan_count}/{last.inf_count}",
                f"  alerts raised during the run: {self.alerts}",
                "  diagnosis: "
                + (
                    " ".join(f"[{f.severity.value}] {f.kind}: {f.summary}" for f in self.findings)
                    if self.findings
                    else "healthy, no issue detected"
                ),
                *([f"  fix: {self.findings[0].fixes[0]}"] if self.findings else []),
                f"  report: {Path(self.log_dir) / 'gradient_health_report.md'}",
            ]
        )


def _data(n: int, in_dim: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=gen)
    w = torch.randn(in_dim, 1, generator=gen) / math.sqrt(in_dim)
    y = torch.sin(x @ w) + 0.1 * torch.randn(n, 1, generator=gen)
    return TensorDataset(x, y)


def clear_previous_runs(out_dir: str | Path) -> list[Path]:
    """Remove the run folders a previous demo left in ``out_dir``, so that TensorBoard shows one run per net.

    Only folders holding :data:`DEMO_MARKER` are removed; nothing is removed unless every run folder present is one.

    Returns:
        The folders removed.

    Raises:
        GradientHealthError: A run folder exists that the demo did not write (it is left as it is).
    """
    present = [Path(out_dir) / name for name in DEMO_RUNS if (Path(out_dir) / name).exists()]
    for run in present:
        if not (run / DEMO_MARKER).is_file() and (not run.is_dir() or any(run.iterdir())):
            raise GradientHealthError(
                f"{run} exists and was not written by this demo (no {DEMO_MARKER} in it), so it is left as it is: "
                "choose another output directory (gradhealth demo --out DIR) or remove it",
                path=str(run),
            )
    cleared = [run for run in present if (run / DEMO_MARKER).is_file()]
    for run in cleared:
        shutil.rmtree(run)
    return cleared


def run_demo(out_dir: str | Path = "gradhealth_demo", steps: int = 200, log_every_n_steps: int = 5) -> list[DemoRun]:
    """Train the two demo nets with :class:`GradientHealthMonitor` and TensorBoard logs.

    Each run starts clean: the folders of a previous demo in ``out_dir`` are removed first
    (:func:`clear_previous_runs`), so TensorBoard does not overlay two runs.

    Args:
        out_dir: Where the TensorBoard logs go (``<out_dir>/deep_sigmoid``, ``<out_dir>/residual_relu``).
        steps: Optimizer steps per run.
        log_every_n_steps: Logging interval of the Trainer (and so of the monitor).

    Returns:
        One :class:`DemoRun` per net, the unhealthy one first.

    Raises:
        GradientHealthError: A run folder in ``out_dir`` was not written by the demo.
    """
    clear_previous_runs(out_dir)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    runs: list[DemoRun] = []
    for name, make in zip(DEMO_RUNS, (DeepSigmoidMLP, ResidualReLUMLP), strict=True):
        seed_everything(0, verbose=False)
        monitor = GradientHealthMonitor()
        collect = _Collect(monitor)
        logger = TensorBoardLogger(str(out_dir), name=name, version="")
        Path(logger.log_dir).mkdir(parents=True, exist_ok=True)
        (Path(logger.log_dir) / DEMO_MARKER).write_text("written by `gradhealth demo`: a re-run replaces this folder\n")
        trainer = Trainer(
            max_steps=steps,
            callbacks=[monitor, collect],
            logger=logger,
            log_every_n_steps=log_every_n_steps,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            accelerator="cpu",
            devices=1,
        )
        loader = DataLoader(_data(2048, 100, seed=1), batch_size=64, shuffle=True)
        trainer.fit(RegressionTask(make()), loader)
        loss = trainer.callback_metrics.get("train_loss")
        runs.append(
            DemoRun(
                name=name,
                log_dir=logger.log_dir,
                records=tuple(collect.records),
                final_loss=float(loss) if loss is not None else math.nan,
                findings=tuple(monitor.findings),
                alerts=monitor.health.alerts.total,
            )
        )
    return runs
