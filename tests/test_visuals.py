"""TensorBoard visuals checked in a real TensorBoard: histograms, the gradient-flow figure, the custom-scalars layout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from conftest import Capture, TinyMLP, loader, make_trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_gradhealth import GradientHealthMonitor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture
def run_dir(tmp_path):
    monitor = GradientHealthMonitor(histogram_every_n_steps=2, figure_every_n_steps=2)
    capture = Capture()
    trainer = make_trainer(tmp_path, callbacks=[monitor, capture], max_steps=4, log_every_n_steps=2)
    trainer.fit(TinyMLP(), loader())
    return tmp_path, capture


def test_histograms_match_the_gradients(run_dir):
    log_dir, capture = run_dir
    acc = EventAccumulator(str(log_dir), size_guidance={"histograms": 0})
    acc.Reload()
    assert "grad_hist/net.2" in acc.Tags()["histograms"]
    events = {e.step: e.histogram_value for e in acc.Histograms("grad_hist/net.2")}
    assert sorted(events) == [1, 3]
    grads = capture.steps[3]["grads"]
    flat = torch.cat([grads["net.2.weight"].reshape(-1), grads["net.2.bias"].reshape(-1)])
    h = events[3]
    assert h.num == flat.numel() == sum(h.bucket)
    assert h.min == pytest.approx(flat.min().item(), rel=1e-6) and h.max == pytest.approx(flat.max().item(), rel=1e-6)
    assert h.sum == pytest.approx(flat.sum().item(), rel=1e-5, abs=1e-7)
    assert h.sum_squares == pytest.approx(flat.square().sum().item(), rel=1e-6)
    edges = torch.linspace(flat.min().item(), flat.max().item(), len(h.bucket) + 1, dtype=torch.float64)
    reference = torch.histogram(flat, bins=edges).hist
    assert list(h.bucket) == pytest.approx(reference.tolist(), abs=1)  # edge entries may fall either side


def test_tags_in_a_real_tensorboard(run_dir):
    log_dir, capture = run_dir
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(log_dir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--reload_interval",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                scalars = _get(port, "/data/plugin/scalars/tags")
                if scalars:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("TensorBoard did not start within 60 s")
            time.sleep(0.5)
        (run,) = scalars
        assert "grad_health/total_norm" in scalars[run] and "grad_norm/net.0" in scalars[run]
        # the server takes the one-event-per-step writes apart: every logged step's value, per tag
        points = _get(port, f"/data/plugin/scalars/scalars?run={run}&tag=grad_norm/net.0")
        grads = {c["step"]: c["grads"] for c in capture.steps}
        assert [p[1] for p in points] == [1, 3]
        for _, step, value in points:
            reference = torch.cat([grads[step]["net.0.weight"].reshape(-1), grads[step]["net.0.bias"]]).norm().item()
            assert value == pytest.approx(reference, rel=1e-5)  # a float32 norm (CPU's kernel order) vs float64
        assert "grad_hist/net.0" in _get(port, "/data/plugin/histograms/tags")[run]
        assert "grad_health/gradient_flow" in _get(port, "/data/plugin/images/tags")[run]
        layout = _get(port, "/data/plugin/custom_scalars/layout")
        titles = {c["title"] for c in layout["category"]}
        assert titles == {"gradient health: global", "gradient health: per layer"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_visuals_are_skipped_for_other_loggers(tmp_path, caplog):
    monitor = GradientHealthMonitor(histogram_every_n_steps=1)
    trainer = make_trainer(callbacks=[monitor], logger=[CSVLogger(str(tmp_path)), TensorBoardLogger(str(tmp_path))])
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        trainer.fit(TinyMLP(), loader())
    assert caplog.text.count("skipped: histograms and figures for CSVLogger.") == 1


def test_without_matplotlib_the_run_goes_on_and_says_so_once(tmp_path, monkeypatch, recwarn):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure -> ImportError
    monitor = GradientHealthMonitor(figure_every_n_steps=1)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=4, log_every_n_steps=1)
    trainer.fit(TinyMLP(), loader())
    said = [w for w in recwarn if "the gradient-flow figure needs matplotlib" in str(w.message)]
    assert len(said) == 1 and "pip install matplotlib" in str(said[0].message)
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["images"] == [] and "grad_health/total_norm" in acc.Tags()["scalars"]


def test_a_plain_loop_logging_to_a_directory_gets_the_figure_by_default(tmp_path):
    from torch import nn

    from lightning_gradhealth import GradientHealth

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with GradientHealth(model, loggers=str(tmp_path), log_every_n_steps=5, report=False) as health:
        for i in range(20):
            model(torch.randn(8, 4)).square().mean().backward()
            health.step(opt, step=i)
            opt.step()
            opt.zero_grad()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    # "auto": the first computed step once the checks have seen their 10 warm-up steps (9), the last record at close
    assert [e.step for e in acc.Images("grad_health/gradient_flow")] == [9, 19]
