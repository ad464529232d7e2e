"""`gradhealth report` on hostile log directories (issue 22): every input an attacker or an accident can give ends
with exit code 2 and one line on stderr, or with its documented behaviour (docs/report.md, "Security"), quickly and
without writing anything outside the run directory. Every directory is built here, in `tmp_path`."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from lightning_gradhealth.cli.main import main
from lightning_gradhealth.cli.report import OFFLINE_DIR

ROOT = Path(__file__).resolve().parents[1]
EVIL = "L\nimport os; os.system('touch PWNED')\n#<script>alert(1)</script>"


def _record(data: bytes) -> bytes:
    head = struct.pack("<Q", len(data))
    return head + struct.pack("<I", masked_crc32c(head)) + data + struct.pack("<I", masked_crc32c(data))


def write_run(run: Path, layers: tuple[str, ...] = ("net.0", "net.2"), steps: int = 6, name: str = "1.host") -> Path:
    """A run as the monitor logs it (one event per step: total norm and per-layer norms), written by hand."""
    run.mkdir(parents=True, exist_ok=True)
    out = bytearray(_record(Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString()))
    for step in range(steps):
        values = [Summary.Value(tag="grad_health/total_norm", simple_value=1.0 + step)]
        values += [Summary.Value(tag=f"grad_norm/{layer}", simple_value=0.5 + j) for j, layer in enumerate(layers)]
        event = Event(wall_time=1.0 + step, step=step, summary=Summary(value=values))
        out += _record(event.SerializeToString())
    path = run / f"events.out.tfevents.{name}"
    path.write_bytes(bytes(out))
    return path


def _cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real command in its own process (an input that could hang it cannot hang the test)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "lightning_gradhealth.cli.main", "report", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("gradhealth report:")]
    assert "Traceback" not in err and len(lines) >= 1, err
    return lines[-1]


def test_symlinked_report_and_pth_payload_write_nothing_outside_the_run(tmp_path, capsys):
    """The attack of issue 22: report files planted as links into site-packages, a payload in a tag."""
    run, outside = tmp_path / "run", tmp_path / "site-packages"
    outside.mkdir()
    write_run(run, layers=("net.0", EVIL))
    (run / "gradient_health_report.md").symlink_to(outside / "evil.pth")  # the live report's name, dangling
    (run / "global_norm.png").symlink_to(outside / "evil2.pth")
    assert main(["report", str(run)]) == 0
    assert list(outside.iterdir()) == [] and (run / "gradient_health_report.md").is_symlink()
    md = (run / OFFLINE_DIR / "gradient_health_report.md").read_text()
    assert not any(line.lstrip().startswith("import") for line in md.splitlines())
    assert "<script>" not in md and "&lt;script&gt;" in md and "\\nimport os" in md
    capsys.readouterr()
    # the report's own folder, or a file in it, planted as a link: refused, nothing written through it
    (run / OFFLINE_DIR / "gradient_health_report.json").unlink()
    (run / OFFLINE_DIR / "gradient_health_report.json").symlink_to(outside / "evil3.pth")
    assert main(["report", str(run)]) == 2
    assert "is a symbolic link" in _one_line_error(capsys.readouterr().err)
    other = tmp_path / "run2"
    write_run(other)
    (other / OFFLINE_DIR).symlink_to(outside, target_is_directory=True)
    assert main(["report", str(other)]) == 2
    assert "is a symbolic link" in _one_line_error(capsys.readouterr().err)
    assert list(outside.iterdir()) == []


def test_the_live_report_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    (run / "gradient_health_report.md").write_text("the live report")
    assert main(["report", str(run)]) == 0
    assert (run / "gradient_health_report.md").read_text() == "the live report"
    assert (run / OFFLINE_DIR / "gradient_health_report.md").is_file()


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_device_or_fifo_as_model_file_or_event_file_exits_2(tmp_path, target):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    for which in ("gradient_health_model.json", "events.out.tfevents.2.host", "gradient_health_run.json"):
        run = tmp_path / which / "run"
        write_run(run)
        if target == "fifo":
            os.mkfifo(run / which)
        else:
            (run / which).symlink_to(target)
        proc = _cli(str(run), cwd=tmp_path, timeout=300)  # a hang or an endless read would end here
        assert proc.returncode == 2, (which, proc.stdout, proc.stderr)
        line = _one_line_error(proc.stderr)
        assert which in line and ("not a regular file" in line or "symbolic link" in line), line


def test_a_record_header_claiming_a_terabyte_exits_2_at_once(tmp_path, capsys):
    run = tmp_path / "run"
    path = write_run(run)
    head = struct.pack("<Q", 2**40)
    with path.open("ab") as fh:
        fh.write(head + struct.pack("<I", masked_crc32c(head)) + b"\0" * 64)
    assert main(["report", str(run)]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"claims {2**40:,} bytes" in line and "limit" in line


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests JSON deeper than"),
        (" " * (17 * 2**20) + "{}", "over the 16,777,216-byte limit"),
    ],
)
def test_deep_or_huge_json_exits_2(tmp_path, capsys, content, expected):
    run = tmp_path / "run"
    write_run(run)
    (run / "gradient_health_model.json").write_text(content)
    assert main(["report", str(run)]) == 2
    assert expected in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize(
    "saved",
    [
        {"inventory": {"layers": [{"name": 1}]}, "thresholds": {"warmup_steps": "x"}},
        {"inventory": {"layers": "abc"}, "thresholds": []},
        {"inventory": [1, 2], "thresholds": {"no_such_line": 1.0}},
        {"inventory": {"layers": [{"name": "net.0", "kind": {}, "module_class": "L", "numel": 1, "depth": 0}]}},
        [1, 2, 3],
        "not an object",
    ],
)
def test_wrong_typed_model_file_falls_back_with_a_warning(tmp_path, capsys, saved):
    run = tmp_path / "run"
    write_run(run)
    (run / "gradient_health_model.json").write_text(json.dumps(saved))
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("unusable" in err or "unreadable" in err), err
    assert (run / OFFLINE_DIR / "gradient_health_report.json").is_file()


def test_names_in_the_inventory_are_escaped(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, layers=("net.0",))
    layer = {"name": "net.0", "kind": "linear\n<script>x</script>", "module_class": "Lin|ear`", "numel": 1,
             "depth": 0, "params": ["net.0.weight"]}  # fmt: skip
    (run / "gradient_health_model.json").write_text(json.dumps({"inventory": {"layers": [layer]}}))
    assert main(["report", str(run)]) == 0
    md = (run / OFFLINE_DIR / "gradient_health_report.md").read_text()
    row = next(line for line in md.splitlines() if "net.0" in line and line.startswith("| 0"))
    assert "<script>" not in md and "linear\\n&lt;script&gt;" in row and row.count(" | ") == 6, row


def test_non_utf8_names_are_shown_escaped(tmp_path):
    base = os.fsencode(tmp_path)
    run = os.path.join(base, b"run\xff")
    os.mkdir(run)
    write_run(Path(os.fsdecode(run)), name="1.h\xdcfe")  # (an event file name with an undecodable byte too)
    proc = _cli(os.fsdecode(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "run\\xff" in proc.stdout and "Traceback" not in proc.stderr
    assert os.path.isfile(os.path.join(run, OFFLINE_DIR.encode(), b"gradient_health_report.md"))


def test_a_missing_end_marker_says_the_run_did_not_finish(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run, steps=5)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "The run did not finish" in out and "stop at step 4" in out
    (run / "gradient_health_run.json").write_text(json.dumps({"status": "running"}))
    assert main(["report", str(run)]) == 0
    assert "still running" in capsys.readouterr().out
    (run / "gradient_health_run.json").write_text(json.dumps({"status": "stopped", "reason": "KeyError\nat step 3"}))
    assert main(["report", str(run)]) == 0
    md = (run / OFFLINE_DIR / "gradient_health_report.md").read_text()
    assert "The run stopped before its end: KeyError\\nat step 3" in md


def test_a_tree_of_links_is_not_walked(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    (run / "loop").symlink_to(tmp_path, target_is_directory=True)  # a link cycle: not followed
    assert main(["report", str(tmp_path)]) == 0
    assert "run:" in capsys.readouterr().out


def test_reading_streams_across_chunks_with_bounded_history_and_shows_progress(tmp_path, capsys, monkeypatch):
    """Records that straddle the reading chunks come back whole; the history is the live run's bounded one."""
    from lightning_gradhealth.cli import report
    from lightning_gradhealth.output import tfrecord
    from lightning_gradhealth.output.eventfiles import history_from_events

    run = tmp_path / "run"
    write_run(run, layers=tuple(f"l{i}" for i in range(7)), steps=1500)
    monkeypatch.setattr(tfrecord, "CHUNK_BYTES", 1000)  # (a record is ~140 bytes: many straddle a boundary)
    history = history_from_events(run)
    assert history.records_seen == 1500 and len(history.steps) <= history.max_snapshots
    assert history.steps[0] == 0 and history.steps[-1] > 1400 and history.layer_names == [f"l{i}" for i in range(7)]
    assert set(history.layer_series("l3")) == {3.5}
    assert history.total_norm == [step + 1.0 for step in history.steps]
    monkeypatch.setattr(report, "_PROGRESS_FROM", 0)
    assert main(["report", str(run)]) == 0
    err = capsys.readouterr().err
    assert "gradhealth report: reading" in err and "100%" in err


def _same_scalars(fast, slow) -> bool:
    """Two ``(step, tags, values)`` alike, NaNs included (compared as float32 bit patterns up to NaN payloads)."""
    if fast is None or slow is None:
        return fast is None and slow is None
    same_values = all(a == b or (a != a and b != b) for a, b in zip(fast[2], slow[2], strict=True))
    return fast[0] == slow[0] and list(fast[1]) == list(slow[1]) and same_values


def test_the_fast_event_decoder_agrees_with_protobuf_on_every_event_it_accepts():
    """Plain scalar events are read from their bytes (a template per summary length); every other shape, and every
    corruption of a plain one, is either read the same as protobuf reads it or left to protobuf."""
    import random

    from lightning_gradhealth.output.eventdecode import GENERIC, ScalarDecoder
    from lightning_gradhealth.output.eventfiles import _scalars

    rng = random.Random(0)
    tags = [f"grad_norm/l{i}" for i in range(40)] + ["grad_health/total_norm", "é/ünïcode"]
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 3.4e38, 0.1]

    def plain(step: int, tag_list: list[str] = tags) -> bytes:
        values = [Summary.Value(tag=t, simple_value=rng.choice([rng.random(), *specials])) for t in tag_list]
        return Event(wall_time=1.5 + step, step=step, summary=Summary(value=values)).SerializeToString()

    decoder = ScalarDecoder()
    accepted = 0
    events = [plain(s) for s in (0, 1, 2, -5, 2**62, 7)]  # step 0 is not written at all; a negative one is 10 bytes
    events += [plain(3, [t.replace("l1", "m1") for t in tags])]  # same length as the template, other tags
    events += [plain(4, tags[:3])]  # a small summary (no template)
    for data in events:
        got = decoder.decode(data)
        assert got is not GENERIC and _same_scalars(got, _scalars(data, Event)), data[:40]
    tensor = Summary.Value(tag="t")
    tensor.metadata.plugin_data.plugin_name = "scalars"
    tensor.tensor.dtype = 1
    tensor.tensor.float_val.append(2.5)
    others = [
        plain(5, ["", *tags[:2]]),  # an empty tag is not written at all
        Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString(),
        Event(step=3, summary=Summary(value=[tensor])).SerializeToString(),
        plain(8, tags[:2]) + plain(9, tags[:2]),  # an event given twice: protobuf merges them
        b"\x2a\x05" + b"\x0a\x03\x0a\x01\xff",  # a tag that is not UTF-8
    ]
    for data in others:
        assert decoder.decode(data) is GENERIC
    # every corruption of a plain event (its checksum would hold: a crafted file) reads the same or goes to protobuf
    base = [plain(10), plain(11, tags[:4])]
    for trial in range(3000):
        data = bytearray(base[trial % 2])
        for _ in range(rng.choice((1, 1, 2, 3))):
            data[rng.randrange(len(data))] = rng.choice((rng.randrange(256), 0x0A, 0x15, 0x80, 0x00))
        got = decoder.decode(bytes(data))
        if got is not GENERIC:
            accepted += 1
            assert _same_scalars(got, _scalars(bytes(data), Event)), (trial, bytes(data))
    assert accepted > 300  # (the fast path is exercised, not only refused)


def test_the_history_read_back_is_the_one_every_step_decoded_in_full_gives(tmp_path):
    """The reader decodes in full only the steps the bounded history keeps: the history is the same as folding every
    step's record (NaN steps, spikes, a layer that joins late, the thinning of 1,300 steps included)."""
    from lightning_gradhealth.diagnosis.history import History
    from lightning_gradhealth.output.eventfiles import history_from_events
    from lightning_gradhealth.schema.metrics import metrics_to_record

    run = tmp_path / "run"
    run.mkdir()
    reference, spikes = History(), 0.0
    out = bytearray(_record(Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString()))
    for step in range(1300):
        metrics = {"grad_health/total_norm": float("nan") if step in (5, 600, 1001) else 1.0 + step % 13,
                   "grad_health/param_norm": 2.0, "grad_health/spikes": float(step // 400)}  # fmt: skip
        for i in range(12 if step < 700 else 13):
            metrics |= {f"grad_norm/l{i}": 0.1 * i + step * 1e-3, f"grad_ratio/l{i}": 1e-3,
                        f"grad_zero_frac/l{i}": 0.5 if i == 3 else 0.0}  # fmt: skip
        if step == 600:
            metrics["grad_nan/l2"] = 4.0
        values = [Summary.Value(tag=k, simple_value=v) for k, v in metrics.items()]
        out += _record(Event(wall_time=1.0, step=step, summary=Summary(value=values)).SerializeToString())
        metrics = {k: values[j].simple_value for j, k in enumerate(metrics)}  # (as float32, as written)
        reference.add(metrics_to_record(metrics, step))
        if metrics["grad_health/spikes"] > spikes:
            reference.add_spike(step, float("nan"))
        spikes = metrics["grad_health/spikes"]
    (run / "events.out.tfevents.1.host").write_bytes(bytes(out))
    history = history_from_events(run)
    assert history.records_seen == 1300 and len(history.steps) < 600 and history.layer_names[-1] == "l12"
    for name in vars(reference):
        assert repr(getattr(history, name)) == repr(getattr(reference, name)), name
