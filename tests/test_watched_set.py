"""The watched parameters follow the run: layers unfrozen or frozen mid-run, optimizers gaining parameter groups."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import pytest
import torch
from conftest import Capture, Records, assert_matches, loader, make_trainer, reference
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn

from lightning_gradhealth import GradientHealthError, GradientHealthMonitor

BATCHES_PER_EPOCH = 8  # loader(): 64 samples, batch 8


class Finetune(L.LightningModule):
    """A backbone and a head; the optimizer gets the trainable parameters, or the head only."""

    def __init__(self, *, head_only_optimizer: bool = False, backbone_grad_gain: float = 1.0) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 1)
        self.head_only_optimizer = head_only_optimizer
        if backbone_grad_gain != 1.0:  # backbone gradients far larger than the head's, the head untouched
            for p in self.backbone.parameters():
                p.register_hook(lambda g: g * backbone_grad_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = (
            self.head.parameters() if self.head_only_optimizer else filter(lambda p: p.requires_grad, self.parameters())
        )
        return torch.optim.SGD(params, lr=0.01)


def _check_against_reference(records: list[Any], capture: Capture) -> None:
    by_step = {c["step"]: c for c in capture.steps}
    for record in records:
        c = by_step[record.step]
        assert_matches(record, reference(c["grads"], c["params"]))


def _layers_by_epoch(records: list[Any]) -> dict[int, set[tuple[str, ...]]]:
    out: dict[int, set[tuple[str, ...]]] = {}
    for record in records:
        out.setdefault(record.epoch, set()).add(tuple(lay.name for lay in record.layers))
    return out


class _Messages(logging.Handler):
    """Collects what Lightning's ``rank_zero_info`` says (its logger may not propagate to pytest's caplog)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_layers_unfrozen_by_backbone_finetuning_are_watched_from_that_epoch(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    records, capture = Records(monitor), Capture()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    trainer = make_trainer(tmp_path, callbacks=[monitor, finetuning, records, capture], max_epochs=2, max_steps=-1)
    said = _Messages()
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero_logger.addHandler(said)
    try:
        trainer.fit(Finetune(), loader())
    finally:
        rank_zero_logger.removeHandler(said)
    assert len(records.records) == 2 * BATCHES_PER_EPOCH
    assert _layers_by_epoch(records.records) == {0: {("head",)}, 1: {("backbone.0", "backbone.2", "head")}}
    _check_against_reference(records.records, capture)  # the global norm covers the backbone once it trains
    assert all(record.no_grad_count == 0 for record in records.records)
    joined = [m for m in said.messages if "watched parameters changed" in m]
    assert len(joined) == 1 and f"at step {BATCHES_PER_EPOCH}: 4 joined (backbone.0.weight" in joined[0]


@pytest.mark.parametrize("restart", [True, False])
def test_spike_detection_restarts_when_the_watched_set_changes(tmp_path, monkeypatch, restart):
    # the backbone's gradients are 1,000x the head's: the global norm jumps when it is unfrozen
    if not restart:  # the control: without the restart, that jump IS a spike (so the test can fail)
        monkeypatch.setattr("lightning_gradhealth.spikes.SpikeDetector.reset", lambda self: None)
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1, spike_warmup_steps=3, on_spike="raise")
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    trainer = make_trainer(tmp_path, callbacks=[monitor, finetuning], max_epochs=2, max_steps=-1)
    if restart:
        trainer.fit(Finetune(backbone_grad_gain=1000.0), loader())
        assert trainer.global_step == 2 * BATCHES_PER_EPOCH
    else:
        with pytest.raises(GradientHealthError, match=r"(?i)spike"):
            trainer.fit(Finetune(backbone_grad_gain=1000.0), loader())


class AddGroupAtEpoch(Callback):
    """Gives the optimizer the backbone's parameters at the start of epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.optimizers[0].add_param_group({"params": list(pl_module.backbone.parameters())})


def test_parameter_group_added_mid_run_is_watched(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    records = Records(monitor)
    trainer = make_trainer(
        tmp_path, callbacks=[AddGroupAtEpoch(1), monitor, records], max_epochs=2, max_steps=-1, log_every_n_steps=1
    )
    trainer.fit(Finetune(head_only_optimizer=True), loader())
    assert _layers_by_epoch(records.records) == {0: {("head",)}, 1: {("backbone.0", "backbone.2", "head")}}


class FreezeAtEpoch(Callback):
    """Freezes the first backbone layer at the start of epoch ``epoch`` (it stays in the optimizer)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            pl_module.backbone[0].requires_grad_(False)


@pytest.mark.parametrize("log_every", [1, 3])
def test_layers_frozen_mid_run_leave_without_no_gradient_warnings(tmp_path, log_every):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=log_every)
    records, capture = Records(monitor), Capture()
    trainer = make_trainer(
        tmp_path, callbacks=[FreezeAtEpoch(1), monitor, records, capture], max_epochs=2, max_steps=-1
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Finetune(), loader())
    assert not [w for w in caught if "got no gradient" in str(w.message)]
    assert _layers_by_epoch(records.records) == {0: {("backbone.0", "backbone.2", "head")}, 1: {("backbone.2", "head")}}
    assert all(record.no_grad_count == 0 for record in records.records)
    _check_against_reference(records.records, capture)
