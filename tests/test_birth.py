"""Where a NaN was born: a failing step is replayed with hooks, and the module that produced the NaN is named.

Every case makes a NaN in the middle of the model (forward: a log of a negative; backward: a custom autograd function;
the loss: a square root of a negative), so that *every* layer's gradient is NaN and the definition-order message names
the first layer (``stem``), a bystander; the replay must name ``mid`` or the loss. The NaN is triggered by the data
(a marked example), so replaying the wrong batch does not reproduce it.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealth, GradientHealthMonitor
from lightning_gradhealth.guard.birth import Birthplace, NoBirthplace, find_birthplace, rng_state
from lightning_gradhealth.schema.errors import TrainingHealthError

MARK = 1000.0  # an example whose first feature is this triggers the fault
BAD_BATCH = 3


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


class Mid(nn.Module):
    """Parameter-free: passes its input through, unless armed (``log`` of a negative, or a NaN gradient)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.armed or self.kind not in ("forward", "backward"):
            return x
        return torch.log(x - 2.0) if self.kind == "forward" else _NaNGrad.apply(x)  # tanh output - 2 < 0


class Net(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.act = nn.Tanh()
        self.mid = Mid(kind)
        self.hidden = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mid.armed = bool((x[:, 0] == MARK).any())
        return self.head(torch.relu(self.hidden(self.mid(self.act(self.stem(x))))))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.mse_loss(self(x), y)
        if self.kind == "loss" and bool((x[:, 0] == MARK).any()):
            return torch.sqrt(loss - 1e6)  # NaN, and so is its gradient
        if self.kind == "finite_grad_loss" and bool((x[:, 0] == MARK).any()):
            return loss + torch.log(-loss)  # NaN, but its gradient (1 + 1/loss) d(loss) is finite
        return loss


def data(n_batches: int = 6, batch_size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * batch_size, 4, generator=gen)
    x[BAD_BATCH * batch_size + 1, 0] = MARK
    y = torch.randn(n_batches * batch_size, 1, generator=gen)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


EXPECTED = {
    "forward": "Born in `mid` (forward): output NaN from finite input.",
    "backward": "Born in `mid` (backward): input gradient NaN from a finite output gradient.",
    "loss": "Born in the loss (forward): the loss is NaN while every module's output is finite.",
}


def _check(err: TrainingHealthError, kind: str) -> None:
    message = str(err)
    lines = message.splitlines()
    assert lines[1] == EXPECTED[kind], message  # it leads, right after the step line
    assert err.record is not None and err.record.nonfinite_birth == EXPECTED[kind]
    # the definition-order list still follows, and its first layer is the bystander
    assert lines[2].startswith("First offending layers") and lines[3].lstrip().startswith("stem:"), message
    # the first fix is about the module where it was born, not the learning rate
    first_fix = message.split("Fixes:\n")[1].splitlines()[0]
    expected_fix = {"forward": "guard the operation in `mid`", "backward": "`mid`'s backward produced it"}
    if kind in expected_fix:
        assert first_fix.startswith("  1. " + expected_fix[kind]), message
    else:  # born in the loss: numerical stability first
        assert "numerically stable" in first_fix, message


@pytest.mark.parametrize("kind", ["forward", "backward", "loss"])
def test_plain_loop_names_the_module_where_the_nan_was_born(kind):
    torch.manual_seed(0)
    model = Net(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, log_every_n_steps=2, report=False, verbose=False)
    with pytest.raises(TrainingHealthError) as info:
        for x, y in data():
            model.loss(x, y).backward()
            if health.step(opt, batch=(x, y), replay=lambda x=x, y=y: model.loss(x, y)):
                opt.step()
            opt.zero_grad()
    assert info.value.record.step == BAD_BATCH
    _check(info.value, kind)


@pytest.mark.parametrize("every", [2, 5])  # the failing step is due, or only guarded
def test_a_nan_loss_with_finite_gradients_fails_the_step_and_is_born_in_the_loss(every):
    model = Net("finite_grad_loss")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, log_every_n_steps=every, report=False, verbose=False)
    with pytest.raises(TrainingHealthError) as info:
        for x, y in data():
            loss = model.loss(x, y)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in model.parameters())
            if health.step(opt, loss=loss, replay=lambda x=x, y=y: model.loss(x, y)):
                opt.step()
            opt.zero_grad()
    lines = str(info.value).splitlines()
    assert info.value.record.step == BAD_BATCH
    assert lines[0].startswith(f"Non-finite loss at step {BAD_BATCH} ")  # not "gradients": they are finite
    assert lines[1] == EXPECTED["loss"]
    assert lines[2].startswith("No gradient entry is NaN or Inf: the loss itself is nan")


def test_plain_loop_without_a_replay_says_so_and_keeps_the_layers():
    model = Net("forward")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, log_every_n_steps=2, report=False, verbose=False)
    with pytest.raises(TrainingHealthError) as info:
        for x, y in data():
            model.loss(x, y).backward()
            health.step(opt)
            opt.zero_grad()
    lines = str(info.value).splitlines()
    assert lines[1].startswith("Where it was born: unknown (no replay: pass `replay=") and "stem:" in lines[3]


def test_a_replay_that_does_not_reproduce_says_so():
    model = Net("forward")
    x, y = data()[0]  # a healthy batch: nothing is born
    result = find_birthplace(model, lambda: model.loss(x, y), rng_state())
    assert isinstance(result, NoBirthplace) and "the replayed step is finite" in result.reason
    assert all(p.grad is None for p in model.parameters())  # the replay never writes .grad


def test_the_rng_state_of_the_step_is_restored_for_the_replay():
    class Coin(nn.Module):  # NaN on a random draw: only the step's own RNG state reproduces it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.where(torch.rand(()) < 0.5, float("nan"), 1.0)

    model = nn.Sequential(nn.Linear(2, 2), Coin(), nn.Linear(2, 1))
    x = torch.randn(3, 2)
    torch.manual_seed(1)
    while True:  # find a state whose first draw is a NaN, then move the generator on
        state = rng_state()
        if torch.isnan(model(x)).any():
            break
    for _ in range(5):
        torch.rand(())
    after = torch.get_rng_state()
    result = find_birthplace(model, lambda: model(x).sum(), state)
    assert result == Birthplace("1", "forward", "output NaN from finite input")
    assert torch.equal(torch.get_rng_state(), after)  # the caller's generator is left where it was


class LitNet(L.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = Net(kind)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.net.loss(*batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize(
    ("kind", "accumulate"), [("forward", 1), ("backward", 2), ("loss", 1), ("finite_grad_loss", 1)]
)
def test_lightning_callback_names_the_module_where_the_nan_was_born(kind, accumulate, tmp_path):
    x = torch.cat([b[0] for b in data()])
    y = torch.cat([b[1] for b in data()])
    trainer = make_trainer(
        max_steps=6, log_every_n_steps=2, accumulate_grad_batches=accumulate,
        callbacks=[GradientHealthMonitor(report=False, verbose=False)],
    )  # fmt: skip
    with pytest.raises(TrainingHealthError) as info:
        trainer.fit(LitNet(kind), DataLoader(TensorDataset(x, y), batch_size=4))
    err = info.value
    message = str(err).replace("`net.", "`")  # the LightningModule's names start with `net.`
    lines = message.splitlines()
    assert lines[1] == EXPECTED["loss" if kind == "finite_grad_loss" else kind], message
    if accumulate > 1:  # batch 3 is micro-batch 1 of optimizer step 1: that micro-batch was replayed
        assert err.record.first_nonfinite_micro_batch == 1 and err.record.step == 1
    if kind == "finite_grad_loss":  # finite gradients: no layer to list, the loss is named instead
        assert "the loss itself is nan" in lines[2]
    else:
        assert "net.stem:" in lines[3]


@pytest.mark.parametrize("kind", ["forward", "finite_grad_loss"])
def test_deferred_guard_replays_the_failing_step_not_the_one_it_was_read_at(kind):
    # guard_mode="deferred" reads step 3's verdict at step 4; the fused optimizer skipped step 3's update on the
    # device, so the weights are those step 3 ran with, and the replay of step 3's own batch finds the module
    torch.manual_seed(0)
    model = Net(kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, fused=True)
    health = GradientHealth(model, log_every_n_steps=2, report=False, verbose=False, guard_mode="deferred")
    with pytest.raises(TrainingHealthError) as info:
        for x, y in data():
            loss = model.loss(x, y)
            loss.backward()
            if health.step(opt, loss=loss, replay=lambda x=x, y=y: model.loss(x, y)):
                opt.step()
            opt.zero_grad()
    lines = str(info.value).splitlines()
    assert info.value.record.step == BAD_BATCH  # (read at step 4: the message says so before the birthplace)
    assert EXPECTED["loss" if kind == "finite_grad_loss" else kind] in lines[1:4], lines


def test_the_report_leads_with_the_birthplace(tmp_path):
    model = Net("forward")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, log_every_n_steps=2, report_dir=tmp_path, verbose=False)
    with pytest.raises(TrainingHealthError):
        for x, y in data():
            model.loss(x, y).backward()
            health.step(opt, replay=lambda x=x, y=y: model.loss(x, y))
            opt.zero_grad()
    finding = next(f for f in health.findings if f.kind == "nonfinite")
    assert finding.summary.startswith(EXPECTED["forward"] + " Non-finite gradients at step 3")
    assert finding.evidence["born"] == EXPECTED["forward"]
    assert EXPECTED["forward"] in (tmp_path / "gradient_health_report.md").read_text()
