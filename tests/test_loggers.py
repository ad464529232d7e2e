"""W&B (offline) and MLflow (local SQLite store) receive what TensorBoard does, read back from their own files.

Each gets the monitor's scalars once per logged step, with the values of a float64 reference; W&B also the histograms
(``wandb.Histogram``) and the gradient-flow figure (``wandb.Image``) in the same row, MLflow the figure as an artifact
(``log_figure``; it has no histograms).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import Capture, TinyMLP, loader, make_trainer

from lightning_gradhealth import GradientHealthMonitor

wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")

STEPS = [1, 3, 5]  # max_steps=6, every 2 steps


def _reference_norms(capture: Capture) -> dict[int, float]:
    return {
        c["step"]: torch.cat([g.reshape(-1) for g in c["grads"].values()]).norm().item() for c in capture.steps
    }


def _wandb_rows(run_file: Path) -> list[dict]:
    """The history rows of an offline run's ``.wandb`` file (a LevelDB-style log of ``Record`` protos)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_gets_scalars_histograms_and_figures_once_per_logged_step(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="gradhealth-test")
    monitor = GradientHealthMonitor(log_every_n_steps=2, histogram_every_n_steps=2, figure_every_n_steps=4)
    capture = Capture()
    trainer = make_trainer(callbacks=[monitor, capture], logger=logger, max_steps=6, log_every_n_steps=2)
    trainer.fit(TinyMLP(), loader())
    wandb.finish()
    wandb.teardown()  # the service process writes the run file: stop it, so that everything is on disk
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    rows = [r for r in _wandb_rows(run_file) if "grad_health/total_norm" in r]
    # once per logged step, at the Trainer's step
    assert [r["trainer/global_step"] for r in rows] == STEPS
    reference = _reference_norms(capture)
    for row in rows:
        step = row["trainer/global_step"]
        assert row["grad_health/total_norm"] == pytest.approx(reference[step], rel=1e-5)
        assert "grad_norm/net.0" in row and "grad_ratio/net.4" in row
        # the histogram of the same step: every entry of the layer counted, in the layer's range
        grads = next(c["grads"] for c in capture.steps if c["step"] == step)
        flat = torch.cat([grads["net.2.weight"].reshape(-1), grads["net.2.bias"]])
        assert row["grad_hist/net.2/_type"] == "histogram"
        assert sum(row["grad_hist/net.2/values"]) == flat.numel()
        bins = row["grad_hist/net.2/bins"]
        assert len(bins) == len(row["grad_hist/net.2/values"]) + 1
        assert bins[0] == pytest.approx(flat.min().item(), rel=1e-5)
        assert bins[-1] == pytest.approx(flat.max().item(), rel=1e-5)
    # the figure: on step 3 (every 4 steps), then the last record's at the end of fit (step 5), in its own row
    figures = [r for r in _wandb_rows(run_file) if r.get("grad_health/gradient_flow/_type") == "image-file"]
    assert [r["trainer/global_step"] for r in figures] == [3, 5]
    for row in figures:
        image = run_file.parent / "files" / row["grad_health/gradient_flow/path"]
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mlflow_sqlite_beside_tensorboard_and_csv_gets_scalars_once_per_logged_step_and_the_figure(tmp_path):
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = MLFlowLogger(experiment_name="gradhealth", tracking_uri=uri, artifact_location=str(tmp_path / "art"))
    tb, csv = TensorBoardLogger(str(tmp_path), name="tb", version=""), CSVLogger(str(tmp_path), name="csv", version="")
    monitor = GradientHealthMonitor(log_every_n_steps=2, histogram_every_n_steps=2, figure_every_n_steps=4)
    capture = Capture()
    trainer = make_trainer(callbacks=[monitor, capture], logger=[tb, csv, logger], max_steps=6, log_every_n_steps=2)
    trainer.fit(TinyMLP(), loader())
    # beside it: TensorBoard gets the same figures and the histograms, CSV the scalars only
    acc = EventAccumulator(tb.log_dir, size_guidance={"images": 0, "histograms": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("grad_health/gradient_flow")] == [3, 5]
    assert [e.step for e in acc.Histograms("grad_hist/net.0")] == STEPS
    header = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "grad_health/total_norm" in header and not any(k.startswith(("grad_hist", "grad_health/gradient")) for k in header)
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, "grad_health/total_norm")
    assert sorted(m.step for m in history) == STEPS  # once per logged step: no duplicate
    reference = _reference_norms(capture)
    for m in history:
        assert m.value == pytest.approx(reference[m.step], rel=1e-5)
    assert Counter(m.step for m in client.get_metric_history(logger.run_id, "grad_norm/net.0")) == Counter(STEPS)
    run = client.get_run(logger.run_id)
    assert not any(key.startswith("grad_hist/") for key in run.data.metrics)  # MLflow has no histograms
    artifacts = [a.path for a in client.list_artifacts(logger.run_id, "grad_health/gradient_flow")]
    assert artifacts == ["grad_health/gradient_flow/step_00000003.png", "grad_health/gradient_flow/step_00000005.png"]
    local = Path(client.download_artifacts(logger.run_id, artifacts[0], str(tmp_path / "dl")))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
