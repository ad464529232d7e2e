"""Sparse gradients (``nn.Embedding(sparse=True)``): the statistics of the dense gradient, checked in real runs."""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import pytest
import torch
from conftest import Capture, PostClipNorms, assert_matches, make_trainer, reference
from lightning.pytorch import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealthError, GradientHealthMonitor

VOCAB = 50


class Bag(L.LightningModule):
    """A sparse embedding (bag of 4 tokens) and a dense head; every batch repeats some tokens."""

    def __init__(self, nan_at: int | None = None) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(VOCAB, 8, sparse=True, mode="sum")
        self.head = nn.Linear(8, 1)
        self.nan_at = nan_at
        self.micro = 0
        self.emb.weight.register_hook(self._poison)

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        if self.micro - 1 != self.nan_at:
            return grad
        values = grad._values().clone()
        values.view(-1)[3] = math.nan
        return torch.sparse_coo_tensor(grad._indices(), values, grad.shape)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, y = batch
        self.micro += 1
        return nn.functional.mse_loss(self.head(self.emb(tokens)).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def bag_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (64, 4), generator=gen)  # 256 lookups of 50 rows: repeats in every batch
    return DataLoader(TensorDataset(tokens, torch.randn(64, generator=gen)), batch_size=8)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_sparse_gradients_give_the_dense_statistics(tmp_path, accumulate):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1, stats="full", histogram_every_n_steps=1)
    capture = Capture()
    trainer = make_trainer(tmp_path, callbacks=[monitor, capture], max_steps=2, accumulate_grad_batches=accumulate)
    model = Bag()
    trainer.fit(model, bag_loader())
    last = capture.steps[-1]
    assert model.emb.weight.grad is None or model.emb.weight.grad.is_sparse
    record = monitor.last_record
    assert record.step == last["step"]
    assert_matches(record, reference(last["grads"], last["params"]), full=True)
    emb = record.layer("emb")
    dense = last["grads"]["emb.weight"]
    assert (
        emb.zero_frac == pytest.approx((dense == 0).double().mean().item(), abs=1e-12) and emb.zero_frac > 0.1
    )  # untouched rows
    # a float32 sum that cancels, against float64: to 1e-5 of the entries' size (as conftest.assert_matches)
    assert emb.mean == pytest.approx(dense.mean().item(), rel=1e-5, abs=1e-5 * dense.std(unbiased=False).item())
    # the histogram counts the rows the sparse gradient does not store, as zeros
    acc = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0})
    acc.Reload()
    h = {e.step: e.histogram_value for e in acc.Histograms("grad_hist/emb")}[last["step"]]
    flat = dense.reshape(-1)
    assert h.num == flat.numel() == sum(h.bucket)
    assert h.min == pytest.approx(flat.min().item(), rel=1e-6) and h.max == pytest.approx(flat.max().item(), rel=1e-6)
    assert h.sum == pytest.approx(flat.sum().item(), rel=1e-5, abs=1e-7)
    edges = torch.linspace(flat.min().item(), flat.max().item(), len(h.bucket) + 1, dtype=torch.float64)
    assert list(h.bucket) == pytest.approx(torch.histogram(flat, bins=edges).hist.tolist(), abs=1)


def test_nan_in_a_sparse_gradient_stops_the_run_naming_the_layer(tmp_path):
    monitor = GradientHealthMonitor(log_every_n_steps=50)  # step 2 is not logged: the guard catches it
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=5)
    with pytest.raises(GradientHealthError, match="emb") as err:
        trainer.fit(Bag(nan_at=2), bag_loader())
    assert err.value.context["step"] == 2 and err.value.context["layers"] == ["emb"]
    assert err.value.record.layer("emb").nan_count == 1


def test_norm_clipping_scales_sparse_gradients_too(tmp_path):
    monitor = GradientHealthMonitor(log_every_n_steps=1, clip="norm", max_norm=0.05)
    records, post = [], PostClipNorms()

    class Grab(Callback):
        def on_before_optimizer_step(self, *args: Any) -> None:
            records.append(monitor.last_record)

    trainer = make_trainer(tmp_path, callbacks=[monitor, Grab(), post], max_steps=4)
    trainer.fit(Bag(), bag_loader())
    assert all(r.total_norm > 0.05 for r in records)  # every step needed clipping
    assert post.norms == pytest.approx([0.05] * 4, rel=1e-5)


@pytest.mark.parametrize("clip", ["value", "agc"])
def test_elementwise_clippers_refuse_sparse_gradients_before_training(tmp_path, clip):
    kwargs = {"clip_value": 0.1} if clip == "value" else {}
    monitor = GradientHealthMonitor(clip=clip, **kwargs)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=2)
    model = Bag()
    before = model.emb.weight.detach().clone()
    with pytest.raises(ValueError, match=rf"clip='{clip}'.*sparse.*emb\.weight"):
        trainer.fit(model, bag_loader())
    assert torch.equal(model.emb.weight.detach(), before)


class Table(L.LightningModule):
    """A bare parameter looked up with ``F.embedding(..., sparse=True)``: no sparse module announces it."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, 8))
        self.head = nn.Linear(8, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, y = batch
        rows = nn.functional.embedding(tokens, self.table, sparse=True).sum(1)
        return nn.functional.mse_loss(self.head(rows).squeeze(-1), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_sparse_gradients_of_a_functional_lookup_are_found_at_the_first_step(tmp_path):
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1, stats="full")
    capture = Capture()
    trainer = make_trainer(tmp_path, callbacks=[monitor, capture], max_steps=3)
    trainer.fit(Table(), bag_loader())
    last = capture.steps[-1]
    assert_matches(monitor.last_record, reference(last["grads"], last["params"]), full=True)


def test_a_frozen_sparse_embedding_is_refused_by_elementwise_clipping_at_fit_start(tmp_path):
    model = Bag()
    model.emb.requires_grad_(False)  # unfrozen later, it would be refused in the middle of the run
    trainer = make_trainer(tmp_path, callbacks=[GradientHealthMonitor(clip="agc")], max_steps=2)
    with pytest.raises(ValueError, match=r"clip='agc'.*sparse.*emb\.weight"):
        trainer.fit(model, bag_loader())
    assert trainer.global_step == 0
