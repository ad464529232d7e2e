"""Run by test_parallel.py as `python tp_lightning_script.py OUT_DIR`: Lightning's ``ModelParallelStrategy`` with
``data_parallel_size=2, tensor_parallel_size=2`` on 4 CPU gloo processes (Lightning launches ranks 1-3), the model
of tp_script.py parallelised in ``configure_model`` (Colwise/Rowwise on "tensor_parallel", then ``fully_shard`` on
"data_parallel"), ``GradientHealthMonitor(stats="full")``. Every rank saves its batches and records; rank 0 saves the
whole gradients and parameters the optimizer receives (``full_tensor``, float64), the test's reference."""

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.data import DataLoader, TensorDataset
from tp_script import make_model

from lightning_gradhealth import GradientHealthMonitor

STEPS = 2


class Parallel(L.LightningModule):
    def __init__(self, out: Path) -> None:
        super().__init__()
        self.out = out
        self.model = make_model()

    def configure_model(self) -> None:
        tp, dp = self.device_mesh["tensor_parallel"], self.device_mesh["data_parallel"]
        for block in self.model.blocks.values():
            parallelize_module(block, tp, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
            fully_shard(block, mesh=dp)
        fully_shard(self.model, mesh=dp)

    def training_step(self, batch, batch_idx):
        x, y = batch
        torch.save((x, y), self.out / f"batch_rank{self.global_rank}_step{batch_idx}.pt")
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Keep(Callback):
    def __init__(self, monitor: GradientHealthMonitor) -> None:
        self.monitor, self.records = monitor, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # (after the monitor)
        grads = {n: p.grad.full_tensor().double() for n, p in pl_module.named_parameters()}  # every rank: collectives
        params = {n: p.detach().full_tensor().double() for n, p in pl_module.named_parameters()}
        if trainer.global_rank == 0:
            torch.save((grads, params), pl_module.out / f"full_step{trainer.global_step}.pt")

    def on_train_batch_end(self, trainer, *args) -> None:
        rec = self.monitor.last_record
        self.records.append({
            "total_norm": rec.total_norm, "param_norm": rec.param_norm, "zero_frac": rec.zero_frac,
            "layers": {lay.name: [lay.grad_norm, lay.param_norm, lay.zero_frac, lay.max_abs, lay.dead_unit_frac]
                       for lay in rec.layers},
        })  # fmt: skip


def main(out: Path) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(3)  # (every rank is its own process: the same data on each)
    data = TensorDataset(torch.randn(24, 4, generator=gen), torch.randn(24, 1, generator=gen))
    monitor = GradientHealthMonitor(log_every_n_steps=1, stats="full", report=False, figure_every_n_steps=None)
    keep = Keep(monitor)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2),
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[monitor, keep],
    )
    trainer.fit(Parallel(out), DataLoader(data, batch_size=6, shuffle=False))
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps({"records": keep.records}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
