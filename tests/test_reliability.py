"""Issue 22, the loop API: nothing is lost at exit, a failing logger never takes a run down, paths are checked when
given. Real runs (subprocesses where the interpreter's exit is what is tested), real event files read back."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_gradhealth import GradientHealth
from lightning_gradhealth.output.eventfiles import history_from_events

ROOT = Path(__file__).resolve().parents[1]
FSIZE_LIMIT = 24_000  # bytes: more than any report file, less than the event file of the full-disk fit

SCRIPT = """
import sys, torch
from lightning_gradhealth import GradientHealth
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01)
mode = sys.argv[2]
health = GradientHealth(model, loggers=sys.argv[1], guard_mode="deferred", log_every_n_steps=1)
def loop():
    for i in range(5):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        if mode == "nan" and i == 4:
            loss = loss * float("nan")
        loss.backward()
        if health.step(opt, loss=loss):
            opt.step()
        opt.zero_grad()
        if mode == "raise" and i == 3:
            raise KeyError("data loader broke")
if mode == "raise":
    with health:
        loop()
else:
    loop()  # close() is never called
print("loop done")
"""


def _script(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run"), mode], capture_output=True,
                          text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip


def test_a_forgotten_close_under_the_deferred_guard_keeps_every_step_and_reports_a_nan_at_the_last(tmp_path):
    proc = _script(tmp_path, "nan")
    assert proc.returncode == 0 and "loop done" in proc.stdout, proc.stderr[-2000:]
    assert "closed at exit: close() was not called" in proc.stderr and "Non-finite gradients at step 4" in proc.stderr
    run = tmp_path / "run"
    assert history_from_events(run).steps == [0, 1, 2, 3, 4]  # the last logged step is on disk
    report = json.loads((run / "gradient_health_report.json").read_text())
    assert [f["kind"] for f in report["findings"]] == ["nonfinite"]
    assert json.loads((run / "gradient_health_run.json").read_text())["status"] == "finished"
    # offline, the report keeps what the live run knew (where the NaN was born) and leaves the live report alone
    from lightning_gradhealth.cli.main import main
    from lightning_gradhealth.cli.report import OFFLINE_DIR

    live = (run / "gradient_health_report.md").read_text()
    assert main(["report", str(run)]) == 0
    assert (run / "gradient_health_report.md").read_text() == live
    offline = json.loads((run / OFFLINE_DIR / "gradient_health_report.json").read_text())
    (nonfinite,) = [f for f in offline["findings"] if f["kind"] == "nonfinite"]
    assert nonfinite["summary"].startswith("Where it was born") and offline["warnings"] == []


def test_a_with_block_left_by_an_exception_writes_the_report_saying_why(tmp_path):
    proc = _script(tmp_path, "raise")
    assert proc.returncode == 1 and "KeyError" in proc.stderr
    run = tmp_path / "run"
    md = (run / "gradient_health_report.md").read_text()
    assert "The run stopped before its end: KeyError after step 3: 'data loader broke'" in md
    state = json.loads((run / "gradient_health_run.json").read_text())
    assert state["status"] == "stopped" and "data loader broke" in state["reason"]
    assert history_from_events(run).steps == [0, 1, 2, 3]


def _loop(health: GradientHealth, model: nn.Module, steps: int) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    done = 0
    for _ in range(steps):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        if health.step(opt):
            opt.step()
        opt.zero_grad()
        done += 1
    return done


class FullDisk:
    """A logger whose disk is full (what TensorBoard's writer thread raises on the next write)."""

    log_dir = "/mnt/full/run"

    def __init__(self) -> None:
        self.calls = 0

    def log_metrics(self, metrics, step):
        self.calls += 1
        if step >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failing_logger_is_said_once_and_stopped_and_training_goes_on_with_the_guard(tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    full = FullDisk()
    said = []
    health = GradientHealth(model, loggers=full, log_every_n_steps=1, report_dir=tmp_path)
    health.output.frontend.warn = said.append
    assert _loop(health, model, 6) == 6
    health.close()
    failures = [m for m in said if "failed at step 2" in m]
    assert len(failures) == 1 and "/mnt/full/run" in failures[0] and "No space left on device" in failures[0]
    assert full.calls == 3  # steps 0, 1 and the failing 2: nothing more was tried
    assert health.guard.steps_seen == 6  # the guard kept watching every step
    report = json.loads((tmp_path / "gradient_health_report.json").read_text())
    assert any("Logging to /mnt/full/run failed from step 2" in w for w in report["warnings"])


def test_a_file_size_limit_on_the_event_file_does_not_stop_training(tmp_path):
    """ulimit -f: TensorBoard's writer thread gets EFBIG; the run finishes its steps with one warning."""
    code = SCRIPT.replace("mode = sys.argv[2]", "mode = sys.argv[2]\nimport resource\n"
                          "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))")  # fmt: skip
    code = code.replace("range(5)", "range(40)").replace('loop()  # close() is never called', "loop(); health.close()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run"), "ok"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0 and "loop done" in proc.stdout, proc.stderr[-3000:]
    assert proc.stderr.count("failed at step") == 1, proc.stderr[-3000:]
    assert "File too large" in proc.stderr


def test_close_closes_the_event_files_it_opened(tmp_path):
    def writers() -> int:
        return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())

    before = writers()
    for i in range(5):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        health = GradientHealth(model, loggers=str(tmp_path / f"run{i}"), log_every_n_steps=1)
        _loop(health, model, 2)
        health.close()
    assert writers() == before


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"report_dir": "/dev/null/x"}, "report_dir"), ({"spike_dir": "/dev/null/x"}, "spike_dir"),
     ({"loggers": ""}, "loggers"), ({"loggers": "/dev/null/x"}, "loggers"), ({"report_dir": ""}, "report_dir")],
)  # fmt: skip
def test_directories_are_checked_when_given(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be a directory that exists or can be created"):
        GradientHealth(nn.Linear(2, 2), **kwargs)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (TensorBoard's writer thread)
def test_a_full_disk_under_a_trainer_ends_the_fit_with_one_warning_naming_the_logger(tmp_path):
    """ulimit -f on the Trainer's TensorBoard event file (writes fail with EFBIG, as on a full disk): the module's own
    `self.log` writes and the monitor's go to that file. The fit runs all its steps, the guard on each; one warning
    names the logger, its directory and the error; the report says from which step."""
    import re
    import resource
    import signal
    import warnings

    from conftest import TinyMLP, loader, make_trainer

    from lightning_gradhealth import GradientHealthMonitor

    steps = 60
    monitor = GradientHealthMonitor(report_dir=tmp_path / "report", figure_every_n_steps=None)
    trainer = make_trainer(tmp_path / "tb", max_steps=steps, callbacks=[monitor])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, hard))  # (the soft limit only: put back below)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(TinyMLP(), loader(n=64))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert trainer.global_step == steps and monitor.health.guard.steps_seen == steps
    said = [str(w.message) for w in caught if "failed at step" in str(w.message)]
    assert len(said) == 1, said
    assert f"TensorBoardLogger at {tmp_path / 'tb'}" in said[0] and "File too large" in said[0], said[0]
    report = json.loads((tmp_path / "report" / "gradient_health_report.json").read_text())
    (note,) = [w for w in report["warnings"] if w.startswith(f"Logging to {tmp_path / 'tb'}")]
    assert 0 < int(re.search(r"from step (\d+)", note)[1]) < steps and "File too large" in note
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # stopped: no new event file was begun


class Flaky:
    """A framework logger whose writes fail as asked (Lightning's TensorBoard logger wraps the OSError)."""

    log_dir = "/mnt/flaky/run"

    def __init__(self, error: BaseException | None = None) -> None:
        self.error, self.calls = error, []

    def log_metrics(self, metrics, step=None):
        self.calls.append(("log_metrics", step))
        if self.error is not None:
            raise ValueError("you tried to log ...") from self.error

    def save(self):
        self.calls.append(("save", None))


def test_guarded_logger_methods_stop_on_oserror_only_and_survive_pickling_and_a_second_fit():
    import pickle

    from lightning_gradhealth.output.sinks import SinkFailures, guard_loggers

    said: list[str] = []
    full, broken = Flaky(OSError(errno.ENOSPC, "No space left on device")), Flaky(KeyError("a bug"))
    failures = SinkFailures(said.append)
    guard_loggers([full, broken], failures, lambda: 7)
    full.log_metrics({"a": 1.0}, step=7)
    full.log_metrics({"a": 1.0}, step=8)
    full.save()
    assert full.calls == [("log_metrics", 7)] and failures.stopped(full)  # stopped: nothing more reaches it
    assert len(said) == 1 and "Flaky at /mnt/flaky/run failed at step 7 in the Trainer's log_metrics" in said[0]
    assert "No space left on device" in said[0]
    with pytest.raises(ValueError, match="you tried to log"):  # not a write failure: the error goes through
        broken.log_metrics({"a": 1.0})
    assert not failures.stopped(broken)
    again = SinkFailures(said.append)  # a second fit: the same loggers, a new run's failures
    guard_loggers([full, broken], again, lambda: 9)
    assert again.stopped(full) and not again.stopped(broken) and len(said) == 1
    copy = pickle.loads(pickle.dumps(full))  # (a logger sent to another process: its own methods, unguarded)
    assert copy.log_metrics.__func__ is Flaky.log_metrics and copy.log_metrics.__self__ is copy
