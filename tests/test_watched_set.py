"""The watched parameters follow the run: layers unfrozen or frozen mid-run, optimizers gaining parameter groups."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import pytest
import torch
from conftest import Capture, PostClipNorms, Records, assert_matches, loader, make_trainer, reference
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


@contextmanager
def watched_changes() -> Iterator[list[str]]:
    """The monitor's "watched parameters changed" announcements made inside the block.

    Lightning's ``rank_zero_info`` logger may not propagate to pytest's caplog, so a handler goes on it directly.
    """
    said: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "watched parameters changed" in record.getMessage():
                said.append(record.getMessage())

    handler = Collect(logging.INFO)
    rank_zero_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    rank_zero_logger.addHandler(handler)
    try:
        yield said
    finally:
        rank_zero_logger.removeHandler(handler)


def test_layers_unfrozen_by_backbone_finetuning_are_watched_from_that_epoch(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    records, capture = Records(monitor), Capture()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    trainer = make_trainer(tmp_path, callbacks=[monitor, finetuning, records, capture], max_epochs=2, max_steps=-1)
    with watched_changes() as joined:
        trainer.fit(Finetune(), loader())
    assert len(records.records) == 2 * BATCHES_PER_EPOCH
    assert _layers_by_epoch(records.records) == {0: {("head",)}, 1: {("backbone.0", "backbone.2", "head")}}
    _check_against_reference(records.records, capture)  # the global norm covers the backbone once it trains
    assert all(record.no_grad_count == 0 for record in records.records)
    assert len(joined) == 1 and f"at step {BATCHES_PER_EPOCH}: 4 joined (backbone.0.weight" in joined[0]


@pytest.mark.parametrize("restart", [True, False])
def test_spike_detection_restarts_when_the_watched_set_changes(tmp_path, monkeypatch, restart):
    # the backbone's gradients are 1,000x the head's: the global norm jumps when it is unfrozen
    if not restart:  # the control: without the restart, that jump IS a spike (so the test can fail)
        monkeypatch.setattr("lightning_gradhealth.guard.spikes.SpikeDetector.reset", lambda self: None)
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


class FrozenUntilEpoch(Callback):
    """Freezes the backbone at setup (resume-safe) and unfreezes it from epoch ``epoch`` on."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.backbone.requires_grad_(False)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch >= self.epoch:
            pl_module.backbone.requires_grad_(True)


class AllParams(Finetune):
    """The optimizer holds every parameter, frozen ones included (torch skips those without a gradient)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_resumed_run_decides_like_an_uninterrupted_one_across_an_unfreeze(tmp_path):
    def run(max_epochs: int, ckpt: str | None = None, save: str | None = None) -> tuple[Any, list[str]]:
        torch.manual_seed(0)
        model = AllParams()
        monitor = GradientHealthMonitor(
            log_every_n_steps=50, clip="zclip", zclip_warmup_steps=3, spike_warmup_steps=3, on_spike="warn"
        )
        trainer = make_trainer(tmp_path, callbacks=[FrozenUntilEpoch(1), monitor], max_epochs=max_epochs, max_steps=-1)
        with watched_changes() as said:
            trainer.fit(model, loader(), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return model, said

    straight, said_straight = run(4)
    path = str(tmp_path / "after_unfreeze.ckpt")
    run(2, save=path)
    resumed, said_resumed = run(4, ckpt=path)
    assert len(said_straight) == 1 and said_resumed == []  # the checkpoint knows what was watched
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class UnfreezeAtBatch(Callback):
    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.batch_idx:
            pl_module.backbone.requires_grad_(True)


def test_a_layer_unfrozen_mid_epoch_inside_the_optimizer_is_clipped_and_guarded_at_once(tmp_path):
    torch.manual_seed(0)
    model = AllParams(backbone_grad_gain=100.0)
    model.backbone.requires_grad_(False)
    monitor = GradientHealthMonitor(log_every_n_steps=50, clip="norm", max_norm=0.05)  # no logged step here
    post = PostClipNorms()
    trainer = make_trainer(tmp_path, callbacks=[UnfreezeAtBatch(3), monitor, post], max_steps=BATCHES_PER_EPOCH)
    trainer.fit(model, loader())
    assert post.norms == pytest.approx([0.05] * BATCHES_PER_EPOCH, rel=1e-5)


def test_parameters_unfrozen_outside_every_optimizer_change_nothing(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1, clip="zclip", zclip_warmup_steps=3)
    records = Records(monitor)
    trainer = make_trainer(tmp_path, callbacks=[FrozenUntilEpoch(1), monitor, records], max_epochs=2, max_steps=-1)
    with watched_changes() as said:
        trainer.fit(Finetune(head_only_optimizer=True), loader())
    assert _layers_by_epoch(records.records) == {0: {("head",)}, 1: {("head",)}}
    assert not said
    assert monitor.health.guard.clipper.mean is not None  # ZClip kept its statistics (its warm-up was not restarted)


class RecreateOptimizers(Callback):
    """At epoch ``epoch``, switches the module to an all-parameter optimizer and lets the strategy re-create it."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            pl_module.head_only_optimizer = False
            trainer.strategy.setup_optimizers(trainer)


def test_a_recreated_optimizer_is_a_change_of_the_watched_set(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1, spike_warmup_steps=3, on_spike="raise")
    records = Records(monitor)
    trainer = make_trainer(tmp_path, callbacks=[RecreateOptimizers(1), monitor, records], max_epochs=2, max_steps=-1)
    trainer.fit(Finetune(head_only_optimizer=True, backbone_grad_gain=1000.0), loader())  # no spike raised
    assert _layers_by_epoch(records.records) == {0: {("head",)}, 1: {("backbone.0", "backbone.2", "head")}}


def test_include_may_select_layers_that_are_frozen_at_the_start(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1, include="backbone")
    records = Records(monitor)
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    trainer = make_trainer(tmp_path, callbacks=[monitor, finetuning, records], max_epochs=2, max_steps=-1)
    trainer.fit(Finetune(), loader())
    assert _layers_by_epoch(records.records) == {1: {("backbone.0", "backbone.2")}}
    with pytest.raises(ValueError, match="watches no parameter"):  # a pattern that matches nothing is still an error
        make_trainer(tmp_path, callbacks=[GradientHealthMonitor(include="nothing_like_this")]).fit(Finetune(), loader())


def test_a_monitor_reused_across_fits_does_not_keep_old_models_alive(tmp_path):
    import gc
    import weakref

    monitor = GradientHealthMonitor(log_every_n_steps=1)
    refs = []
    for _ in range(3):
        model = Finetune()
        make_trainer(tmp_path, callbacks=[monitor], max_steps=2).fit(model, loader())
        refs.append(weakref.ref(model.head.weight))  # a parameter (and its .grad) of each model
        del model
    gc.collect()
    assert [ref() is None for ref in refs[:-1]] == [True, True]


def test_a_monitor_reused_for_a_second_fit_sees_what_changed_in_between(tmp_path):
    # stage 1 trains the head with the backbone frozen; stage 2 unfreezes it and fits again with the same monitor
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=50, spike_warmup_steps=3, on_spike="raise")
    model = AllParams(backbone_grad_gain=1000.0)
    model.backbone.requires_grad_(False)
    make_trainer(tmp_path, callbacks=[monitor], max_steps=BATCHES_PER_EPOCH).fit(model, loader())
    model.backbone.requires_grad_(True)
    with watched_changes() as changes:
        trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=BATCHES_PER_EPOCH)
        trainer.fit(model, loader())  # without the restart, the backbone's arrival is a 24-sigma "spike"
        # cross-validation: a new model with the same names is other tensors, not the same run going on
        trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=BATCHES_PER_EPOCH)
        trainer.fit(AllParams(), loader())
    assert len(changes) == 2
    assert "4 joined (backbone.0.weight" in changes[0] and "are other tensors" in changes[1]


class ReplaceHeadAtEpoch(Callback):
    """Replaces the head by a new Linear and points its parameter group at the new tensors (same sizes)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            pl_module.head = nn.Linear(16, 1)
            trainer.optimizers[0].param_groups[1]["params"] = list(pl_module.head.parameters())


class TwoGroups(Finetune):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            [{"params": list(self.backbone.parameters())}, {"params": list(self.head.parameters())}], lr=0.01
        )


def test_parameters_replaced_in_a_group_of_the_same_size_are_watched(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    records, capture = Records(monitor), Capture()
    trainer = make_trainer(
        tmp_path, callbacks=[ReplaceHeadAtEpoch(), monitor, records, capture], max_epochs=2, max_steps=-1
    )
    trainer.fit(TwoGroups(), loader())
    _check_against_reference(records.records, capture)  # the new head's gradients and weights, not the old ones


def test_a_checkpoint_without_the_watched_set_is_taken_to_describe_the_start(tmp_path):
    # written by an earlier version: no "watched" key; the run resumed from it unfreezes the backbone
    def run(max_epochs: int, ckpt: str | None = None) -> L.Trainer:
        torch.manual_seed(0)
        monitor = GradientHealthMonitor(log_every_n_steps=50, spike_warmup_steps=3, on_spike="raise")
        trainer = make_trainer(tmp_path, callbacks=[FrozenUntilEpoch(1), monitor], max_epochs=max_epochs, max_steps=-1)
        trainer.fit(AllParams(backbone_grad_gain=1000.0), loader(), ckpt_path=ckpt)
        return trainer

    path = tmp_path / "old.ckpt"
    run(1).save_checkpoint(str(path))
    checkpoint = torch.load(path, weights_only=False)
    states = [v for k, v in checkpoint["callbacks"].items() if "GradientHealthMonitor" in k]
    assert len(states) == 1 and states[0].pop("watched") == ["head.weight", "head.bias"]
    torch.save(checkpoint, path)
    assert run(2, ckpt=str(path)).global_step == 2 * BATCHES_PER_EPOCH  # no false spike at the unfreeze


def test_two_monitors_on_one_trainer_are_told_their_outputs_collide(tmp_path):
    first, second = GradientHealthMonitor(include="backbone"), GradientHealthMonitor(include="head")
    trainer = make_trainer(tmp_path, callbacks=[first, second], max_steps=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Finetune(), loader())
    said = [str(w.message) for w in caught if "GradientHealthMonitor callbacks share this Trainer" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("2 ")
    assert first.last_record.layers[0].name == "backbone.0" and second.last_record.layers[0].name == "head"
