"""What a user sees: a default run's TensorBoard, served on loopback, photographed by a headless Chromium.

Trains an unhealthy deep sigmoid MLP (vanishing gradients: Glorot & Bengio, 2010) with ``GradientHealthMonitor()``
at its default settings, serves its logs with a real ``tensorboard`` on 127.0.0.1 and saves a screenshot of the
Images dashboard (the gradient-flow figure) as a PNG::

    python tests/tensorboard_screenshot.py docs/images/tensorboard.png

Needs ``chromium`` (Debian: ``apt-get install -y chromium``) or ``google-chrome`` on the PATH.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealthMonitor

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def browser() -> str | None:
    """A headless-capable Chromium on the PATH, or ``None``."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class DeepSigmoid(L.LightningModule):
    """12 sigmoid layers, default init: the gradient shrinks ~4x per layer towards the input."""

    def __init__(self, depth: int = 12, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(16 if i == 0 else width, width), nn.Sigmoid()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def train(log_dir: Path, steps: int = 40) -> GradientHealthMonitor:
    """A default-settings run of :class:`DeepSigmoid`, logged to TensorBoard under ``log_dir``."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    data = DataLoader(TensorDataset(x, x[:, :1].sin()), batch_size=16)
    monitor = GradientHealthMonitor()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=5, callbacks=[monitor],
        logger=L.pytorch.loggers.TensorBoardLogger(str(log_dir), name="deep_sigmoid", version=""),
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(DeepSigmoid(), data)
    return monitor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def screenshot(log_dir: Path, out: Path, chrome: str, timeout: float = 90.0) -> Path:
    """Serve ``log_dir`` with TensorBoard on loopback and save the Images dashboard as ``out``."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(log_dir), "--port", str(port), "--host",
         "127.0.0.1", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout
        while True:  # until the server lists the figure
            try:
                url = f"http://127.0.0.1:{port}/data/plugin/images/tags"
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if any("grad_health/gradient_flow" in tags for tags in json.loads(resp.read()).values()):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("TensorBoard did not serve the gradient-flow figure")
            time.sleep(0.5)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run(
                [chrome, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
                 "--window-size=1000,620", "--force-device-scale-factor=2", "--virtual-time-budget=20000",
                 f"--screenshot={out}", f"http://127.0.0.1:{port}/?darkMode=false#images"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout,
            )  # fmt: skip
    finally:
        server.terminate()
        server.wait(timeout=30)
    return out


def main() -> None:
    """Train, serve, photograph: ``python tests/tensorboard_screenshot.py OUT.png``."""
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tensorboard.png")
    chrome = browser()
    if chrome is None:
        sys.exit(f"no browser: install one of {BROWSERS}")
    with tempfile.TemporaryDirectory() as log_dir:
        train(Path(log_dir))
        print(screenshot(Path(log_dir), out, chrome))


if __name__ == "__main__":
    main()
