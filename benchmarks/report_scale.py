"""How `gradhealth report` scales: a synthetic run of LAYERS layers x STEPS steps (4 per-layer scalars and the global
ones, one event per step, as the monitor writes them), then the command's wall time and peak memory.

    python benchmarks/report_scale.py [LAYERS] [STEPS]    (defaults: 1000 2000, ~240 MB of events)
"""

from __future__ import annotations

import resource
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary

from lightning_gradhealth.output.tfrecord import _masked_crcs, masked_crc32c


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


if __name__ == "__main__":
    layers, steps = (int(a) for a in [*sys.argv[1:], "1000", "2000"][:2]) if len(sys.argv) > 1 else (1000, 2000)
    with tempfile.TemporaryDirectory() as tmp:
        size = write_run(Path(tmp) / "run", layers, steps)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lightning_gradhealth.cli.main", "report", str(Path(tmp) / "run"),
                               "--format", "json"], capture_output=True, text=True)  # fmt: skip
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(f"{layers} layers x {steps} steps, {size / 2**20:.0f} MB of events: exit {proc.returncode}, "
              f"{wall:.1f} s wall, {usage.ru_utime + usage.ru_stime:.1f} s CPU, "
              f"peak RSS {usage.ru_maxrss / 1024:.0f} MB")
        if proc.returncode:
            print(proc.stderr[-2000:])
