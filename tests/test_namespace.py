"""Both Lightning namespaces: ``lightning.pytorch`` and ``pytorch_lightning`` (the ``pytorch-lightning`` package).

A real fit with each namespace's Trainer, LightningModule and TensorBoard logger; the logged global norm is checked
against a float64 reference of the gradients the optimizer received.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradhealth import GradientHealthMonitor


def _module_class(pl):
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
            self.reference: dict[int, float] = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            self.log("train_loss", loss)
            return loss

        def on_before_optimizer_step(self, optimizer) -> None:  # after the callbacks' hook: the same gradients
            step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
            grads = [p.grad.detach().double().reshape(-1) for p in self.parameters()]
            self.reference[step] = torch.cat(grads).norm().item()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    return Net


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_a_real_fit_with_each_namespace(tmp_path, namespace):
    pl = pytest.importorskip(namespace)
    loggers = importlib.import_module(f"{namespace}.loggers")
    model = _module_class(pl)()
    monitor = GradientHealthMonitor(log_every_n_steps=2)
    assert isinstance(monitor, pl.Callback)
    logger = loggers.TensorBoardLogger(str(tmp_path), name="", version="")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=4, log_every_n_steps=2, callbacks=[monitor], logger=logger,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(model, loader())
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("grad_health/total_norm")}
    assert sorted(logged) == [1, 3]
    for step, value in logged.items():
        assert value == pytest.approx(model.reference[step], rel=1e-5)
    assert "grad_norm/net.0" in acc.Tags()["scalars"]
    assert float(trainer.callback_metrics["grad_health/total_norm"]) == pytest.approx(logged[3], rel=1e-6)
    assert (tmp_path / "gradient_health_report.md").exists()
    # the namespace's TensorBoard logger is recognised: each logged step's keys are ONE event, and the figure is there
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    events = [
        {v.tag for v in event.summary.value}
        for path in tmp_path.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
    ]
    ours = [tags for tags in events if "grad_health/total_norm" in tags]
    assert len(ours) == 2 and all({"grad_norm/net.0", "grad_ratio/net.2"} <= tags for tags in ours)
    assert any("grad_health/gradient_flow" in tags for tags in events)


@pytest.mark.parametrize("namespace", ["lightning.pytorch", "pytorch_lightning"])
def test_the_loggers_of_each_namespace_are_recognised(tmp_path, namespace):
    pytest.importorskip(namespace)
    from lightning_gradhealth.output.sinks import logger_kind

    loggers = importlib.import_module(f"{namespace}.loggers")
    assert logger_kind(loggers.TensorBoardLogger(str(tmp_path))) == "tensorboard"
    assert logger_kind(loggers.CSVLogger(str(tmp_path))) == "other"
    assert logger_kind(object.__new__(loggers.WandbLogger)) == "wandb"  # (classes only: nothing is started)
    assert logger_kind(object.__new__(loggers.MLFlowLogger)) == "mlflow"


def test_the_namespace_of_the_trainer_picks_its_strategies():
    pytest.importorskip("pytorch_lightning")
    import pytorch_lightning
    from lightning.pytorch import Trainer

    from lightning_gradhealth.frontends.lightning import _lightning

    assert _lightning(pytorch_lightning.Trainer(logger=False), "strategies").__name__ == "pytorch_lightning.strategies"
    assert _lightning(Trainer(logger=False), "strategies").__name__ == "lightning.pytorch.strategies"

    class MyTrainer(pytorch_lightning.Trainer):  # a subclass defined elsewhere: its base's namespace
        pass

    assert _lightning(MyTrainer(logger=False)).__name__ == "pytorch_lightning"


_FIRST_OURS = """
import sys
from lightning_gradhealth import GradientHealthMonitor
assert "pytorch_lightning" not in sys.modules, "importing the monitor imported pytorch_lightning"
import lightning.pytorch as L
assert GradientHealthMonitor.__bases__ == (L.Callback,), GradientHealthMonitor.__bases__

class Mine(GradientHealthMonitor):  # a user's subclass, defined before the other namespace is imported
    pass

import pytorch_lightning as pl
assert issubclass(GradientHealthMonitor, pl.Callback) and issubclass(Mine, pl.Callback)
assert GradientHealthMonitor.__bases__ == (L.Callback, pl.Callback), GradientHealthMonitor.__bases__
assert not any(type(f).__name__ == "_AdoptPytorchLightning" for f in sys.meta_path)  # a one-shot hook
"""

_FIRST_PL = """
import sys
import pytorch_lightning as pl
from lightning_gradhealth import GradientHealthMonitor
import lightning.pytorch as L
assert GradientHealthMonitor.__bases__ == (L.Callback, pl.Callback), GradientHealthMonitor.__bases__
assert not any(type(f).__name__ == "_AdoptPytorchLightning" for f in sys.meta_path)  # nothing left to watch
"""

_FIT = """
import torch
from torch import nn
{imports}
class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=4)
monitor = Mine(log_every_n_steps=1, report=False, figure_every_n_steps=None)
trainer = pl.Trainer(accelerator="cpu", max_steps=2, logger=False, callbacks=[monitor], enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)
trainer.fit(Net(), data)
assert monitor.last_record is not None and monitor.last_record.step == 1, monitor.last_record
print("fit ok")
"""


def _run(code: str) -> str:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("first", ["ours", "pytorch_lightning"])
def test_only_the_namespace_in_use_is_imported_and_both_orders_give_a_callback_of_both(first):
    """In a fresh interpreter: the monitor imports ``lightning`` only; ``pytorch_lightning``, imported before or
    after it, makes it (and a subclass defined earlier) a ``pytorch_lightning.Callback`` that its Trainer runs."""
    pytest.importorskip("pytorch_lightning")
    if first == "ours":
        code = _FIRST_OURS + _FIT.format(imports="")
    else:
        code = _FIRST_PL + _FIT.format(imports="class Mine(GradientHealthMonitor):\n    pass\n")
    assert "fit ok" in _run(code)
