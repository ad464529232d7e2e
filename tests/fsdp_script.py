"""Run by test_ddp.py as `python fsdp_script.py OUT_DIR MODE`: FSDP2 (ModelParallelStrategy + fully_shard), 2 gloo
processes on CPU.

- ``stats``: monitors with basic and full statistics, ``norm_type=inf``, histograms and a guard-only one watch the
  same steps; each rank saves its batch and records; rank 0 saves the full (all-gathered) gradients.
- ``clip``: one short fit per clipper; rank 0 saves the full gradients before and after the monitor at every step.
- ``nan``: one entry of rank 1's shard turns NaN (after the reduce-scatter): every rank must stop at that step.
The test rebuilds every number from an unsharded float64 reference.
"""

import json
import math
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed._composable.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealthMonitor

CLIPPERS = {
    "norm": {"max_norm": 0.2},
    "value": {"clip_value": 0.05},
    "agc": {"agc_clip_factor": 0.01},
    "autoclip": {"autoclip_percentile": 10.0},
    "zclip": {"zclip_warmup_steps": 3},
}
SPIKE_AT = 4  # the loss (hence the gradient) of this step is multiplied by 30: ZClip must clip it


def make_data():
    torch.manual_seed(0)
    return TensorDataset(torch.randn(64, 8), torch.randn(64, 1))


class Sharded(L.LightningModule):
    """Linear(3, 1) has one output row: one rank's shard of it is empty."""

    def __init__(self, out: Path | None = None) -> None:
        super().__init__()
        self.out = out
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 1))

    def configure_model(self):
        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.out is not None and batch_idx == 0:
            torch.save((x, y), self.out / f"batch_rank{self.global_rank}.pt")
        loss = nn.functional.mse_loss(self.net(x), y)
        return loss * 30.0 if self.trainer.global_step == SPIKE_AT else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class PartlySharded(Sharded):
    def configure_model(self):
        fully_shard(self.net[4], mesh=self.device_mesh["data_parallel"])  # the rest stays plain


class TensorParallel(Sharded):
    def configure_model(self):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(
            self.net, self.device_mesh["tensor_parallel"], {"0": ColwiseParallel(), "2": RowwiseParallel()}
        )


class FullCapture(Callback):
    """All-gathers every gradient and parameter (DTensor.full_tensor, float64) at each optimizer step."""

    def __init__(self) -> None:
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.full_tensor().double() for n, p in pl_module.named_parameters()}
        params = {n: p.detach().full_tensor().double() for n, p in pl_module.named_parameters()}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("grad_health/clip")}
        self.steps.append({"grads": grads, "params": params, "metrics": metrics})


def _trainer(out, callbacks, max_steps, logger=False, strategy=None):
    """A 2-process CPU Trainer writing under ``out``; FSDP2 over both ranks unless ``strategy`` says otherwise."""
    return L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy or ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=max_steps,
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=callbacks,
    )


def _layers(rec, full=False):
    out = {}
    for lay in rec.layers:
        row = [lay.grad_norm, lay.param_norm, lay.zero_frac]
        if full:
            row += [lay.max_abs, lay.min_abs_nonzero, lay.mean, lay.std]
        out[lay.name] = row
    return out


def stats(out: Path) -> int:
    data = make_data()
    model = Sharded(out)  # initialised right after the data, as the test's reference
    basic = GradientHealthMonitor(log_every_n_steps=1)
    full = GradientHealthMonitor(log_every_n_steps=1, stats="full")
    inf = GradientHealthMonitor(log_every_n_steps=1, norm_type=math.inf)
    hist = GradientHealthMonitor(log_every_n_steps=1, histogram_every_n_steps=1, include=r"^net\.2\.")
    # step 0 is not logged: the per-step guard takes the sharded path; the spike detector's first observation is
    # the guard's global norm
    guard = GradientHealthMonitor(log_every_n_steps=50, include=r"^net\.")
    capture = FullCapture()
    logger = TensorBoardLogger(str(out), name="tb", version="")
    trainer = _trainer(out, [basic, full, inf, hist, guard, capture], max_steps=1, logger=logger)
    trainer.fit(model, DataLoader(data, batch_size=8))
    b, f, i = basic.last_record, full.last_record, inf.last_record
    result = {
        "total_norm": b.total_norm,
        "param_norm": b.param_norm,
        "zero_frac": b.zero_frac,
        "layer_norm_ratio": b.layer_norm_ratio,
        "layers": _layers(b),
        "full": {"total_norm": f.total_norm, "grad_max_abs": f.grad_max_abs, "layers": _layers(f, full=True)},
        "inf": {"total_norm": i.total_norm, "param_norm": i.param_norm, "layers": _layers(i)},
        "guard_total_norm": math.exp(guard.health.guard.spikes.mean),
        "guard_records": guard.last_record is not None,
    }
    # a model only partly under fully_shard (the root is not): DTensor and plain gradients mixed, a clear error
    from lightning_gradhealth import GradientHealthError

    try:
        _trainer(out, [GradientHealthMonitor(log_every_n_steps=1)], max_steps=1).fit(
            PartlySharded(), DataLoader(data, batch_size=8)
        )
    except GradientHealthError as err:
        result["mixed"] = str(err)
    # tensor parallelism (net.4 left plain: copies on both ranks) runs; its numbers are tested in test_parallel.py
    tp = _trainer(
        out,
        [GradientHealthMonitor(log_every_n_steps=1)],
        max_steps=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2),
    )
    tp.fit(TensorParallel(), DataLoader(data, batch_size=8))
    result["tp"] = [None, tp.global_step]
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if trainer.global_rank == 0:
        torch.save(capture.steps, out / "capture.pt")
    return trainer.global_rank


def clip(out: Path) -> int:
    rank = 0
    results = {}
    for kind, kwargs in CLIPPERS.items():
        data = make_data()
        model = Sharded()
        pre, post = FullCapture(), FullCapture()
        monitor = GradientHealthMonitor(log_every_n_steps=1, clip=kind, spike_z_thresh=None, **kwargs)
        trainer = _trainer(out, [pre, monitor, post], max_steps=6)
        trainer.fit(model, DataLoader(data, batch_size=8))
        rank = trainer.global_rank
        results[kind] = {"pre": pre.steps, "post": post.steps}
    if rank == 0:
        torch.save(results, out / "clip.pt")
    (out / f"rank{rank}.json").write_text(json.dumps({"done": True}))
    return rank


class ShardPoison(Callback):
    """Placed before the monitor: one entry of rank 1's local shard of net.2.weight turns NaN at step 1."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_rank == 1 and trainer.global_step == 1:
            pl_module.net[2].weight.grad.to_local().view(-1)[0] = float("nan")


def nan(out: Path) -> int:
    from lightning_gradhealth import GradientHealthError

    make_data()
    monitor = GradientHealthMonitor(log_every_n_steps=50)  # the per-step guard catches it
    trainer = _trainer(out, [ShardPoison(), monitor], max_steps=4)
    result = {"error_step": None}
    try:
        trainer.fit(Sharded(), DataLoader(make_data(), batch_size=8))
    except GradientHealthError as err:
        result = {"error_step": err.record.step, "layers": err.context["layers"], "global_step": trainer.global_step}
        result["nan"] = err.record.nan_count
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    return trainer.global_rank


if __name__ == "__main__":
    out = Path(sys.argv[1])
    {"stats": stats, "clip": clip, "nan": nan}[sys.argv[2]](out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
