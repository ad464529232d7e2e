"""Activation statistics (opt-in): exact against outputs captured independently; dead and saturation rules."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import TinyMLP, loader, make_trainer
from test_logging import read_scalars
from test_safety import Regression, he_mlp, regression_data
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradhealth import GradientHealthMonitor


class CaptureOutputs(L.Callback):
    """Its own forward hooks on the ReLUs: every micro-batch's outputs, by logging step."""

    def __init__(self, names):
        self.names = names
        self.outputs: dict[int, dict[str, list[torch.Tensor]]] = {}

    def on_train_start(self, trainer, pl_module):
        modules = dict(pl_module.named_modules())
        for name in self.names:
            modules[name].register_forward_hook(self._hook(trainer, name))

    def _hook(self, trainer, name):
        def hook(module, inputs, output):
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            self.outputs.setdefault(step, {}).setdefault(name, []).append(output.detach().double().clone())

        return hook


@pytest.mark.parametrize("accumulate", [1, 3])
def test_activation_stats_match_outputs_captured_independently(accumulate, tmp_path):
    monitor = GradientHealthMonitor(activation_stats_every_n_steps=2)
    capture = CaptureOutputs(["net.1", "net.3"])
    trainer = make_trainer(tmp_path, callbacks=[monitor, capture], max_steps=4, accumulate_grad_batches=accumulate)
    with torch.no_grad():
        model = TinyMLP()
        model.net[2].bias[:6] = -50.0  # six of the 16 units of the second ReLU are off for every input
    trainer.fit(model, loader(n=8 * 4 * accumulate))
    scalars = read_scalars(tmp_path)
    assert sorted(scalars["act_dead_frac/net.3"]) == [1, 3]  # sampled steps only
    for step in (1, 3):
        for name in ("net.1", "net.3"):
            out = torch.cat(capture.outputs[step][name])  # all micro-batches of the step
            dead = ((out != 0).sum(dim=0) == 0).double().mean().item()
            zero = (out == 0).double().mean().item()
            assert scalars[f"act_dead_frac/{name}"][step] == pytest.approx(dead, abs=1e-7)
            assert scalars[f"act_zero_frac/{name}"][step] == pytest.approx(zero, abs=1e-7)
    assert scalars["act_dead_frac/net.3"][3] >= 6 / 16
    assert "act_saturated_frac/net.1" not in scalars  # ReLU: no saturation metric
    assert not monitor.health.activations.attached  # hooks only live during sampled steps
    assert all(not m._forward_hooks or m in (model.net[1], model.net[3]) for m in model.modules())


def test_saturated_sigmoids_are_diagnosed(tmp_path):
    net = nn.Sequential(nn.Linear(32, 64), nn.Sigmoid(), nn.Linear(64, 64), nn.Sigmoid(), nn.Linear(64, 1))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.normal_(0, 5.0)  # far too large: pre-activations of tens, outputs pinned at 0 or 1
    monitor = GradientHealthMonitor(activation_stats_every_n_steps=1)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=6)
    trainer.fit(Regression(net), DataLoader(regression_data(), batch_size=64))
    scalars = read_scalars(tmp_path)
    assert scalars["act_saturated_frac/model.1"][5] > 0.5
    saturation = [f for f in monitor.findings if f.kind == "saturation"]
    assert saturation and saturation[0].layers[0] == "model.1"


def test_dead_units_are_diagnosed_from_activations(tmp_path):
    net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    with torch.no_grad():
        net[2].bias[:40].fill_(-50.0)  # 40 of 64 units never fire
    monitor = GradientHealthMonitor(activation_stats_every_n_steps=2)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=12)
    trainer.fit(Regression(net), DataLoader(regression_data(), batch_size=64))
    dead = [f for f in monitor.findings if f.kind == "dead" and "dead_unit_frac" in f.evidence]
    assert dead and dead[0].layers == ("model.3",) and dead[0].severity.value == "critical"
    assert dead[0].evidence["dead_unit_frac"]["model.3"] >= 40 / 64


def test_healthy_relu_net_has_no_activation_findings(tmp_path):
    monitor = GradientHealthMonitor(activation_stats_every_n_steps=5)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=100, log_every_n_steps=5)
    trainer.fit(Regression(he_mlp()), DataLoader(regression_data(), batch_size=64, shuffle=True))
    assert monitor.findings == [], [f.summary for f in monitor.findings]
    scalars = read_scalars(tmp_path)
    assert max(scalars["act_dead_frac/model.1"].values()) < 0.2
