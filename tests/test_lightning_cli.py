"""The callback configured from a LightningCLI YAML file, with nested Thresholds."""

from __future__ import annotations

import textwrap

from conftest import TinyMLP, loader
from lightning.pytorch.cli import LightningCLI

from lightning_gradhealth import GradientHealthMonitor


class CLIModel(TinyMLP):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__(lr=lr)

    def train_dataloader(self):
        return loader()


def test_monitor_from_yaml_config(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            trainer:
              max_steps: 3
              logger: false
              enable_progress_bar: false
              enable_checkpointing: false
              enable_model_summary: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: lightning_gradhealth.GradientHealthMonitor
                  init_args:
                    log_every_n_steps: 1
                    on_nonfinite: skip
                    clip: norm
                    max_norm: 0.5
                    exclude: "bias$"
                    thresholds:
                      total_norm_high_warning: 50.0
            """
        )
    )
    cli = LightningCLI(CLIModel, args=["fit", "--config", str(config)], save_config_kwargs={"overwrite": True})
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientHealthMonitor)]
    assert (monitor.clip, monitor.health.guard.clipper.max_norm, monitor.on_nonfinite) == ("norm", 0.5, "skip")
    assert monitor.thresholds.total_norm_high_warning == 50.0
    assert monitor.thresholds.total_norm_high_critical == 1000.0  # the other lines keep their defaults
    assert [lay.name for lay in monitor.last_record.layers] == ["net.0", "net.2", "net.4"]
    assert monitor.last_record.no_grad_count == 0 and monitor.last_record.step == 2
    assert (tmp_path / "gradient_health_report.md").exists()
