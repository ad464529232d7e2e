"""Run by test_distributed.py as `python fsdp1_script.py OUT_DIR`: FSDP1 (Lightning's FSDPStrategy, flat local
shards, use_orig_params=True) in 2 gloo processes on CPU.

Lightning's FSDPStrategy refuses the CPU and passes ``device_id=None``, which FSDP1 rejects without an accelerator;
the subclass below only passes ``device_id=cpu``. Everything else (wrapping, shards, hooks) is Lightning's and torch's.
"""

import json
import math
import sys
from pathlib import Path

import torch
from conftest import Capture
from fsdp_script import Sharded, _trainer, make_data
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader

from lightning_gradhealth import GradientHealthMonitor


class CPUFSDP(FSDPStrategy):
    def _setup_model(self, model):
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class Flat(Sharded):
    def configure_model(self):  # FSDPStrategy wraps the model itself (auto_wrap_policy)
        pass


if __name__ == "__main__":
    out = Path(sys.argv[1])
    data = make_data()
    model = Flat(out)
    basic = GradientHealthMonitor(log_every_n_steps=1)
    full = GradientHealthMonitor(log_every_n_steps=1, stats="full")
    inf = GradientHealthMonitor(log_every_n_steps=1, norm_type=math.inf)
    guard = GradientHealthMonitor(log_every_n_steps=50, include=r"^net\.")
    # per parameter, with histograms: several parameters have no piece (hence no gradient) on one rank
    per_param = GradientHealthMonitor(
        log_every_n_steps=1, group_by="parameter", stats="full", histogram_every_n_steps=1
    )
    # rank 0 holds no piece of net.4.bias: it has no watched gradient at all, and must still take part
    narrow = GradientHealthMonitor(log_every_n_steps=1, include=r"^net\.4\.bias$")
    narrow_guard = GradientHealthMonitor(log_every_n_steps=50, include=r"net\.4\.bias$")
    capture = Capture()  # this rank's flat pieces, exactly as the monitors saw them (none of them clips)
    trainer = _trainer(
        out,
        [basic, full, inf, guard, per_param, narrow, narrow_guard, capture],
        max_steps=1,
        logger=TensorBoardLogger(str(out), name="tb", version=""),
        strategy=CPUFSDP(auto_wrap_policy=ModuleWrapPolicy({nn.Linear})),
    )
    trainer.fit(model, DataLoader(data, batch_size=8))
    b, f, i = basic.last_record, full.last_record, inf.last_record
    (step,) = capture.steps
    pieces = {
        kind: {n.replace("_fsdp_wrapped_module.", ""): t for n, t in step[kind].items()} for kind in ("grads", "params")
    }
    torch.save(pieces, out / f"pieces_rank{trainer.global_rank}.pt")  # float64 copies of the float32 pieces
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    result = {
        "shapes": shapes,  # the local flat shards this rank holds
        "no_grad": list(b.no_grad_params),
        "total_norm": b.total_norm,
        "param_norm": b.param_norm,
        "zero_frac": b.zero_frac,
        "layers": {lay.name: [lay.grad_norm, lay.param_norm, lay.zero_frac, lay.numel] for lay in b.layers},
        "full": {lay.name: [lay.max_abs, lay.min_abs_nonzero, lay.mean, lay.std] for lay in f.layers},
        "inf": i.total_norm,
        "guard_total_norm": math.exp(guard.health.guard.spikes.mean),
        "per_param": {
            lay.name: [lay.grad_norm, lay.min_abs_nonzero, lay.numel] for lay in per_param.last_record.layers
        },
        "narrow": narrow.last_record.total_norm,
        "narrow_guard": math.exp(narrow_guard.health.guard.spikes.mean),
    }
    # NO_SHARD: every parameter is whole on every rank (FSDP all-reduces the gradients): counted once, not twice
    data = make_data()
    no_shard_model = Flat()
    no_shard, no_shard_guard = GradientHealthMonitor(log_every_n_steps=1), GradientHealthMonitor(log_every_n_steps=50)
    _trainer(
        out,
        [no_shard, no_shard_guard],
        max_steps=1,
        strategy=CPUFSDP(auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), sharding_strategy="NO_SHARD"),
    ).fit(no_shard_model, DataLoader(data, batch_size=8))
    result["no_shard"] = [no_shard.last_record.total_norm, no_shard.last_record.zero_frac]
    result["no_shard_guard"] = math.exp(no_shard_guard.health.guard.spikes.mean)
    # AGC needs whole rows of each weight, which FSDP1's flat shards do not keep: refused at setup, on every rank
    agc = _trainer(
        out,
        [GradientHealthMonitor(clip="agc")],
        max_steps=1,
        strategy=CPUFSDP(auto_wrap_policy=ModuleWrapPolicy({nn.Linear})),
    )
    try:
        agc.fit(Flat(), DataLoader(data, batch_size=8))
    except ValueError as err:
        result["agc_refused"] = str(err)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
