"""How `gradhealth report` scales: a synthetic run of LAYERS layers x STEPS steps (4 per-layer scalars and the global
ones, one event per step, as the monitor writes them), then the command's wall time, CPU time and peak memory.

    python benchmarks/report_scale.py [LAYERS] [STEPS] [--baseline DIR]    (defaults: 1000 2000, 290 MiB of events)

With ``--baseline DIR`` (a checkout of another version, e.g. the main branch), the same run is also reported by that
version's package, in turn with this one, so that both figures come from the same machine under the same load.
Each command's CPU time and peak RSS are its own (``os.wait4``).

Measured (docs/report.md): 1000 x 2000 (290 MiB), on a shared 2-core machine under load 4-7: before (4a45c06)
47.4-48.2 s CPU, 72-94 s wall, 409 MB; now 18.7-20.7 s CPU, 28-39 s wall, 411 MB.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary

from lightning_gradhealth.output.tfrecord import _masked_crcs, masked_crc32c

HERE = Path(__file__).resolve().parents[1]


def write_run(run: Path, layers: int, steps: int) -> int:
    run.mkdir(parents=True)
    names = [f"model.block{i // 2}.{'conv' if i % 2 else 'fc'}" for i in range(layers)]
    with (run / "events.out.tfevents.1.bench").open("wb") as fh:
        for step in range(steps):
            values = [Summary.Value(tag="grad_health/total_norm", simple_value=1.0 + step % 7),
                      Summary.Value(tag="grad_health/zero_frac", simple_value=0.01)]  # fmt: skip
            for j, name in enumerate(names):
                for metric, v in (("grad_norm", 0.1 + j * 1e-3), ("grad_ratio", 1e-3), ("grad_zero_frac", 0.0),
                                  ("grad_max", 0.5)):  # fmt: skip
                    values.append(Summary.Value(tag=f"{metric}/{name}", simple_value=v))
            data = Event(wall_time=float(step), step=step, summary=Summary(value=values)).SerializeToString()
            head = struct.pack("<Q", len(data))
            crc = int(_masked_crcs(data, [(0, len(data))])[0])
            fh.write(head + struct.pack("<I", masked_crc32c(head)) + data + struct.pack("<I", crc))
        return fh.tell()


def report(package_root: Path, run: Path, out: Path) -> tuple[int, float, float, float, str]:
    """``gradhealth report`` of ``run`` with the package under ``package_root``.

    Returns:
        The exit code, wall and CPU seconds, peak RSS in MB, and the end of stderr.
    """
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        command = [sys.executable, "-m", "lightning_gradhealth.cli.main", "report", str(run), "--out", str(out),
                   "--format", "json"]  # fmt: skip
        # (run from the package's root: `python -m` puts the working directory first on the path)
        proc = subprocess.Popen(command, env=env, cwd=package_root, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, tail


if __name__ == "__main__":
    args = sys.argv[1:]
    baseline = None
    if "--baseline" in args:
        at = args.index("--baseline")
        baseline = Path(args[at + 1]).resolve()
        del args[at : at + 2]
    layers, steps = (int(a) for a in [*args, "1000", "2000"][:2]) if args else (1000, 2000)
    versions = [("this version", HERE)] + ([(f"baseline {baseline}", baseline)] if baseline else [])
    with tempfile.TemporaryDirectory() as tmp:
        size = write_run(Path(tmp) / "run", layers, steps)
        print(f"{layers} layers x {steps} steps, {size / 2**20:.0f} MB of events ({size:,} bytes):")
        for name, root in versions:
            code, wall, cpu, rss, tail = report(root, Path(tmp) / "run", Path(tmp) / f"out-{len(name)}")
            print(f"  {name}: exit {code}, {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss:.0f} MB", flush=True)
            if code:
                print(tail)
