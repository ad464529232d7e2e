"""The `gradhealth` console script and the examples, run for real."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_logging import read_scalars

from lightning_gradhealth.cli.main import main
from lightning_gradhealth.cli.report import OFFLINE_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo_logs(tmp_path_factory):
    """One short demo run (30 steps, logged every 5) and what it printed, read by the tests below."""
    tmp_path = tmp_path_factory.mktemp("demo")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--out", str(tmp_path), "--steps", "30", "--log-every-n-steps", "5"]) == 0
    return tmp_path, printed.getvalue()


def test_demo_trains_both_nets_and_writes_tensorboard_logs(demo_logs):
    tmp_path, out = demo_logs
    assert "deep_sigmoid" in out and "residual_relu" in out
    # the broken net's diagnosis beside the healthy net's clean report
    assert "diagnosis: [critical] vanishing" in out and "diagnosis: healthy, no issue detected" in out
    assert (tmp_path / "deep_sigmoid" / "gradient_health_report.md").exists()
    assert f"tensorboard --logdir {tmp_path}" in out
    sick = read_scalars(tmp_path / "deep_sigmoid")
    healthy = read_scalars(tmp_path / "residual_relu")
    assert sorted(sick["grad_health/total_norm"]) == [4, 9, 14, 19, 24, 29]
    # the point of the demo: the sigmoid net's first layer gets orders of magnitude less gradient
    first, last = sick["grad_norm/model.net.0"][29], sick["grad_norm/model.net.40"][29]
    assert first / last < 1e-6
    h_first, h_last = healthy["grad_norm/model.stem"][29], healthy["grad_norm/model.head"][29]
    assert h_first / h_last > 1e-2


def test_demo_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--steps", "0"])
    assert exc.value.code == 2
    assert "--steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("quickstart.py", "grad_health/total_norm"),
        ("amp_accumulation.py", "grad_health/total_norm"),
        ("fsdp2.py", "global grad norm"),  # 2 gloo processes on CPU
    ],
)
def test_examples_run(script, expected, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout


def test_report_from_event_files(demo_logs, tmp_path, capsys):
    logs = demo_logs[0]
    out = tmp_path / "out"
    assert main(["report", str(logs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vanishing" in printed and "no issue detected" in printed
    sick = json.loads((out / "deep_sigmoid" / "gradient_health_report.json").read_text())
    vanishing = [f for f in sick["findings"] if f["kind"] == "vanishing"]
    assert vanishing and vanishing[0]["severity"] == "critical" and vanishing[0]["layers"][0] == "model.net.0"
    healthy = json.loads((out / "residual_relu" / "gradient_health_report.json").read_text())
    assert healthy["findings"] == []
    assert (out / "deep_sigmoid" / "gradient_health_report.md").read_text().startswith("## Gradient Health Report")
    for name in ("global_norm.png", "layer_heatmap.png", "gradient_flow.png"):
        png = (out / "deep_sigmoid" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, name
    # --format json writes only the JSON (and the plots)
    assert main(["report", str(logs / "deep_sigmoid"), "--out", str(tmp_path / "j"), "--format", "json"]) == 0
    written = sorted(p.name for p in (tmp_path / "j").iterdir() if p.suffix != ".png")
    assert written == ["gradient_health_report.json"]


def test_a_re_run_demo_starts_clean_and_leaves_foreign_folders_alone(tmp_path, capsys):
    logs = tmp_path / "logs"
    for _ in range(2):
        assert main(["demo", "--out", str(logs), "--steps", "6", "--log-every-n-steps", "5"]) == 0
    out = capsys.readouterr().out
    assert f"Removed the previous demo's runs: {logs / 'deep_sigmoid'}, {logs / 'residual_relu'}" in out
    for name in ("deep_sigmoid", "residual_relu"):  # one event file per run: TensorBoard overlays nothing
        assert len(list((logs / name).glob("events.out.tfevents.*"))) == 1, name
        assert sorted(read_scalars(logs / name)["grad_health/total_norm"]) == [4]
    # a folder the demo did not write is neither removed nor written into
    other = tmp_path / "other"
    (other / "residual_relu").mkdir(parents=True)
    (other / "residual_relu" / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(other), "--steps", "6"]) == 2
    assert f"{other / 'residual_relu'} exists and was not written by this demo" in capsys.readouterr().err
    assert sorted(p.name for p in other.rglob("*")) == ["mine.txt", "residual_relu"]


def test_report_refuses_what_it_cannot_read(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert f"no such log directory: {tmp_path / 'missing'} does not exist" in err and "events.out.tfevents" in err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert f"no TensorBoard event files (events.out.tfevents.*) under {tmp_path / 'empty'}" in capsys.readouterr().err
    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    assert main(["report", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "was logged with GradientHealthMonitor" in err and "unreadable" not in err
    # a file, not a directory: said as such, with the directory to give instead
    event_file = next((tmp_path / "other").glob("events.out.tfevents.*"))
    assert main(["report", str(event_file)]) == 2
    err = capsys.readouterr().err
    assert f"{event_file} is a file, not a directory" in err and f"gradhealth report {tmp_path / 'other'}" in err
    (tmp_path / "notes.txt").write_text("x")
    assert main(["report", str(tmp_path / "notes.txt")]) == 2
    err = capsys.readouterr().err
    assert "is a file, not a directory" in err and "here:" not in err
    # a malformed or unknown --threshold: exit 2 before reading anything
    assert main(["report", str(tmp_path / "other"), "--threshold", "total_norm_high_warning"]) == 2
    assert "--threshold takes NAME=VALUE" in capsys.readouterr().err


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory):
    """A real short run with its own thresholds: a "too large" line below its global norm (an exploding finding
    that the default lines do not give)."""
    from conftest import TinyMLP, loader, make_trainer

    from lightning_gradhealth import GradientHealthMonitor, Thresholds

    root = tmp_path_factory.mktemp("custom")
    th = Thresholds(total_norm_high_warning=1e-3, total_norm_high_critical=1e-2, warmup_steps=2)
    trainer = make_trainer(root / "run", callbacks=[GradientHealthMonitor(thresholds=th, verbose=False)],
                           max_steps=16, log_every_n_steps=1)  # fmt: skip
    trainer.fit(TinyMLP(), loader(n=128))
    return root / "run", th


def _kinds(report_json: Path) -> list[str]:
    return [f["kind"] for f in json.loads(report_json.read_text())["findings"]]


def test_report_grades_with_the_thresholds_the_run_used(custom_run, tmp_path, capsys):
    from lightning_gradhealth.config.thresholds import Thresholds

    run, th = custom_run
    saved = json.loads((run / "gradient_health_model.json").read_text())
    assert Thresholds.from_dict(saved["thresholds"]) == th
    live = json.loads((run / "gradient_health_report.json").read_text())
    assert "exploding" in [f["kind"] for f in live["findings"]] and live["thresholds"] == th.to_dict()

    assert main(["report", str(run), "--out", str(tmp_path / "saved")]) == 0
    assert "Thresholds: the run's own (saved in" in capsys.readouterr().out
    offline = json.loads((tmp_path / "saved" / "gradient_health_report.json").read_text())
    assert [(f["kind"], f["severity"]) for f in offline["findings"]] == [
        (f["kind"], f["severity"]) for f in live["findings"]
    ]
    assert offline["thresholds"] == th.to_dict()

    # an explicit --threshold wins over the saved line; the other saved lines stay
    line = ["--threshold", "total_norm_high_warning=1e5", "--threshold", "total_norm_high_critical=1e6"]
    assert main(["report", str(run), "--out", str(tmp_path / "override"), *line]) == 0
    assert "with total_norm_high_warning=100000, total_norm_high_critical=1e+06 from --threshold" in (
        capsys.readouterr().out
    )
    overridden = json.loads((tmp_path / "override" / "gradient_health_report.json").read_text())
    assert "exploding" not in [f["kind"] for f in overridden["findings"]]
    assert overridden["thresholds"] == {**th.to_dict(), "total_norm_high_warning": 1e5, "total_norm_high_critical": 1e6}
    assert main(["report", str(run), "--out", str(tmp_path / "x"), "--threshold", "no_such_line=1"]) == 2
    assert "no line named 'no_such_line'" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(tmp_path / "x"), "--threshold", "total_norm_high_warning=1e9"]) == 2
    assert "total_norm_high_warning` must be <" in capsys.readouterr().err

    # without the saved file: the defaults, and it says so
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / "gradient_health_model.json").unlink()
    assert main(["report", str(bare)]) == 0
    assert "Thresholds: the defaults (no thresholds saved in" in capsys.readouterr().out
    assert "exploding" not in _kinds(bare / OFFLINE_DIR / "gradient_health_report.json")


def test_report_warns_about_truncated_and_corrupt_event_files(custom_run, tmp_path, capsys):
    run, _ = custom_run
    (event_file,) = run.glob("events.out.tfevents.*")
    assert main(["report", str(run), "--out", str(tmp_path / "whole")]) == 0
    assert "warning" not in capsys.readouterr().err
    whole = json.loads((tmp_path / "whole" / "gradient_health_report.json").read_text())
    assert whole["records"] == 16 and whole["warnings"] == []

    # half the file: a partial report, said on stderr, on the console and in the report itself
    cut = tmp_path / "cut"
    shutil.copytree(run, cut)
    (cut_file,) = cut.glob("events.out.tfevents.*")
    size = cut_file.stat().st_size
    with cut_file.open("r+b") as fh:
        fh.truncate(size // 2)
    assert main(["report", str(cut)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {cut_file} is truncated: it ends inside a record" in captured.err
    assert "could not be read whole" in captured.out
    partial = json.loads((cut / OFFLINE_DIR / "gradient_health_report.json").read_text())
    assert 0 < partial["records"] < 16 and str(cut_file) in partial["warnings"][0]
    assert "truncated" in (cut / OFFLINE_DIR / "gradient_health_report.md").read_text().split("### Summary")[0]

    # a byte flipped in the middle: the records after it are lost, and it says so
    flipped = tmp_path / "flipped"
    shutil.copytree(run, flipped)
    (flipped_file,) = flipped.glob("events.out.tfevents.*")
    data = bytearray(flipped_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped_file.write_bytes(bytes(data))
    assert main(["report", str(flipped)]) == 0
    assert f"warning: {flipped_file} is corrupt: the record at byte" in capsys.readouterr().err
    assert json.loads((flipped / OFFLINE_DIR / "gradient_health_report.json").read_text())["records"] < 16

    # a corrupt file next to a good one: the good one is read whole, the corrupt one named
    beside = tmp_path / "beside"
    shutil.copytree(run, beside)
    junk = beside / (event_file.name + ".junk")
    junk.write_bytes(bytes(range(256)) * 8)
    assert main(["report", str(beside)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {junk} is corrupt: the record at byte 0 of 2048 fails its checksum; nothing in it is read" in err
    assert json.loads((beside / OFFLINE_DIR / "gradient_health_report.json").read_text())["records"] == 16

    # nothing readable at all: refused, pointing at the warnings
    only_junk = tmp_path / "only_junk"
    only_junk.mkdir()
    (only_junk / event_file.name).write_bytes(b"\x00" * 5)
    assert main(["report", str(only_junk)]) == 2
    err = capsys.readouterr().err
    assert "is truncated" in err and "some event files are unreadable, see the warnings above" in err


def test_report_reads_a_run_logged_with_a_logger_prefix(tmp_path, capsys):
    from conftest import TinyMLP, loader, make_trainer
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_gradhealth import GradientHealthMonitor
    from lightning_gradhealth.output.eventfiles import history_from_events

    logger = TensorBoardLogger(str(tmp_path), name="run", version="", prefix="exp")
    trainer = make_trainer(callbacks=[GradientHealthMonitor()], logger=logger, max_steps=6, log_every_n_steps=2)
    trainer.fit(TinyMLP(), loader())
    history = history_from_events(logger.log_dir)
    assert history.steps == [1, 3, 5]
    assert history.layer_names == ["net.0", "net.2", "net.4"]
    assert all(math.isfinite(v) and v > 0 for v in history.layer_series("net.2"))
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "out")]) == 0


def test_package_and_cli_help_import_neither_lightning_nor_torch():
    """`import lightning_gradhealth` is lazy (PEP 562) and the command line imports what a subcommand needs when it
    runs: `gradhealth report --help` answers without the seconds Lightning and torch take to import."""
    code = """
import sys

def heavy():
    return sorted(m for m in ("lightning", "torch") if m in sys.modules)

import lightning_gradhealth
assert heavy() == [], ("import lightning_gradhealth", heavy())
assert lightning_gradhealth.__version__ and "GradientHealthMonitor" in dir(lightning_gradhealth)
from lightning_gradhealth.cli.main import main
assert heavy() == [], ("import lightning_gradhealth.cli.main", heavy())
for argv in (["--help"], ["report", "--help"], ["demo", "--help"]):
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 0, (argv, exc.code)
    assert heavy() == [], (argv, heavy())
from lightning_gradhealth import GradientHealthMonitor  # the callback really is there, on first use
assert "lightning" in sys.modules and GradientHealthMonitor.__module__ == "lightning_gradhealth.frontends.lightning"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_demo_alerts_fit_on_a_screen_and_the_healthy_net_raises_none(tmp_path):
    """What a new user sees: the unhealthy net's alerts as a few grouped lines, none for the healthy net."""
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_gradhealth.cli.main", "demo", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[grad_health ")]
    assert 1 <= len(lines) <= 10, "\n".join(lines)
    sick, healthy = proc.stdout.split("residual_relu  (")
    assert "alerts raised during the run: 0" in healthy and "diagnosis: healthy, no issue detected" in healthy
    assert "alerts raised during the run: 0" not in sick


def test_report_reads_the_model_saved_with_the_run_and_says_so_without_it(tmp_path, capsys):
    """Offline, the findings and fixes are the live run's: the model's inventory is saved beside the event files."""
    import lightning as L
    import torch
    from conftest import make_trainer
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gradhealth import GradientHealthMonitor

    class DeepSigmoid(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers = [m for _ in range(10) for m in (nn.Linear(16, 16), nn.Sigmoid())]
            self.net = nn.Sequential(*layers, nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(256, 16), torch.randn(256, 1)), batch_size=16)
    run = tmp_path / "run"
    trainer = make_trainer(run, callbacks=[GradientHealthMonitor(log_every_n_steps=4)], max_steps=40)
    trainer.fit(DeepSigmoid(), data)
    live = json.loads((run / "gradient_health_report.json").read_text())["findings"]
    assert (run / "gradient_health_model.json").is_file() and live

    assert main(["report", str(run), "--out", str(tmp_path / "offline")]) == 0
    offline = json.loads((tmp_path / "offline" / "gradient_health_report.json").read_text())["findings"]
    assert [(f["kind"], f["layers"], f["fixes"], f["code"]) for f in offline] == [
        (f["kind"], f["layers"], f["fixes"], f["code"]) for f in live
    ]
    assert "the model is unknown here" not in capsys.readouterr().out

    (run / "gradient_health_model.json").unlink()
    assert main(["report", str(run), "--out", str(tmp_path / "generic")]) == 0
    assert "the model is unknown here, so every layer is compared and the fixes are generic" in capsys.readouterr().out
