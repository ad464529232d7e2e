"""Run by test_distributed.py as `python deepspeed_script.py OUT_DIR STAGES` (e.g. ``0,1,2,3``, one fit each) (needs deepspeed): one CPU process.

Lightning's DeepSpeedStrategy refuses the CPU; the subclass below only skips that check and passes a device rank,
as found by trying it (DeepSpeed 0.19, Lightning 2.6). ZeRO >= 1 must be refused at setup with a clear message;
ZeRO 0 keeps the gradients on the parameters and is watched like DDP.

No C++ op is built: DeepSpeed's CPU communication backend JIT-compiles its shared-memory op (``build_shm_op`` in
``deepspeed/comm/torch.py``, minutes of ``cc1plus`` into ``~/.cache/torch_extensions``) only when
``deepspeed.ops.__compatible_ops__`` says the op can be built; it is set to "none can" here, so DeepSpeed falls back
to plain torch.distributed (gloo) and the optimizer is torch's own (SGD). A test then never depends on a warm
compile cache, nor hangs on a lock left behind by a killed build.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from conftest import TinyMLP, loader
from lightning import Trainer
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.strategy import Strategy

from lightning_gradhealth import GradientHealthMonitor


class CPUDeepSpeed(DeepSpeedStrategy):
    def setup_environment(self):
        Strategy.setup_environment(self)
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        import deepspeed

        engine, opt, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=self.config,
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, opt


def no_op_builds() -> None:
    """Tell DeepSpeed that none of its C++ ops can be built here: it JIT-compiles none (see the module docstring)."""
    import deepspeed.ops
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    deepspeed.ops.__compatible_ops__ = dict.fromkeys(ALL_OPS, False)  # (read by build_shm_op before any build)


def fit(out: Path, stage: int) -> dict:
    """One fit under ZeRO ``stage``: the global norm it logged, or the refusal's message."""
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        strategy=CPUDeepSpeed(stage=stage, process_group_backend="gloo"),
        max_steps=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[monitor],
    )
    result = {}
    try:
        trainer.fit(TinyMLP(), loader())
        result["total_norm"] = monitor.last_record.total_norm if monitor.last_record else None
    except ValueError as err:
        result["refused"] = str(err)
    return result


if __name__ == "__main__":
    no_op_builds()
    out = Path(sys.argv[1])
    results = {stage: fit(out, int(stage)) for stage in sys.argv[2].split(",")}  # (one process: one import)
    (out / "rank0.json").write_text(json.dumps(results))
    (out / "rank1.json").write_text("{}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
