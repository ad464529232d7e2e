"""Run by test_distributed.py as `python ddp_unfreeze_script.py OUT_DIR MODE` on 2 gloo processes. MODE "frozen": a
layer frozen when DDP wraps the model, unfrozen at epoch 1. MODE "optimizer": the layer trainable when DDP wraps the
model but left out of the optimizer, added to it at epoch 1 (DDP averages it all along)."""

import json
import sys
import warnings
from pathlib import Path

import torch
from conftest import TinyMLP, loader, make_trainer
from lightning.pytorch import Callback

from lightning_gradhealth import GradientHealthMonitor


class UnfreezeFirstLayer(Callback):
    def setup(self, trainer, pl_module, stage):
        pl_module.net[0].requires_grad_(False)  # before the strategy wraps the model in DDP

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.net[0].requires_grad_(True)


class AddFirstLayer(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.optimizers[0].add_param_group({"params": list(pl_module.net[0].parameters())})


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    monitor = GradientHealthMonitor(log_every_n_steps=1)
    layers: list[list[str]] = []

    class Layers(Callback):
        def on_train_batch_end(self, *args):
            layers.append([lay.name for lay in monitor.last_record.layers])

    model = TinyMLP()
    if mode == "frozen":
        model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.05)  # frozen params included
        change = UnfreezeFirstLayer()
    else:
        model.configure_optimizers = lambda: torch.optim.SGD(
            [p for n, p in model.named_parameters() if not n.startswith("net.0.")], lr=0.05
        )
        change = AddFirstLayer()
    trainer = make_trainer(
        callbacks=[change, monitor, Layers()],
        strategy="ddp",
        devices=2,
        max_epochs=2,
        max_steps=-1,
        limit_train_batches=3,
        default_root_dir=str(out),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, loader(n=128))
    result = {
        "rank": trainer.global_rank,
        "steps": trainer.global_step,
        "layers": layers,
        "ddp_warnings": [str(w.message) for w in caught if "DistributedDataParallel" in str(w.message)],
        "net0_weights": model.net[0].weight.detach().reshape(-1)[:4].tolist(),
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
