"""GPU benchmark: what lightning_gradhealth costs in a real Trainer on an accelerator, and its kernels' table.

Run from the repository root (no install needed)::

    PYTHONPATH=. python benchmarks/gpu.py --device cuda --out gpu.json           # the issue's workloads
    PYTHONPATH=. python benchmarks/gpu.py --device cuda --quick --out gpu.json   # fewer windows
    PYTHONPATH=. python benchmarks/gpu.py --device cpu --quick --out cpu.json    # tiny sizes: the script works

Method (issue 12): every variant trains the same workload in a real Lightning ``Trainer`` (``bf16-mixed``, fused
``AdamW``, progress bar off, a ``TensorBoardLogger`` in a temporary directory). Variants take turns, round-robin
with the first one rotated; each turn is one window of ``--steps`` optimizer steps after ``--warmup`` untimed
ones, synchronised (``torch.cuda.synchronize``) only at the window's two ends. Medians over the windows are
reported, with each variant's cost as a percentage of the step without a monitor.

Workloads: ``lm350m`` (d 1024, 24 layers, ff 4096, vocab 32768, 8 x 1024 tokens; 291 parameter tensors) and
``lm_small`` (d 352, 16 layers, ff 1408, vocab 4096, 8 x 128 tokens). Variants: no monitor; defaults; monitoring
only (``on_nonfinite=None, spike_z_thresh=None``); every step logged (``log_every_n_steps=1``); ``stats="full"``
every step; Lightning's ``grad_norm`` + ``self.log_dict`` every step (no monitor).

Kernel table, on one backward pass's real gradients (``lm350m``, and 500 x ``Linear(64, 64)``), in windows of
calls synchronised at their ends, as multiples of the FLOOR (one ``_foreach_norm`` of the gradients, stacked and
summed, no host copy): the guard (norm + one transfer), a logged step (``compute`` + ``finish`` +
``record_to_metrics``) with ``stats="basic"`` and ``"full"``, on the multi-tensor path the engine takes on CUDA
and on the per-tensor one, Lightning's ``grad_norm`` with ``.item()`` per key, and the bandwidth limit: the
bytes of the gradients and parameters, each read once, at the copy bandwidth measured on the device.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader

from lightning_gradhealth import GradientHealthMonitor
from lightning_gradhealth.model.layout import build_layout
from lightning_gradhealth.schema.metrics import record_to_metrics
from lightning_gradhealth.stats import horizontal
from lightning_gradhealth.stats.engine import GradStatsEngine, StepMeta

# Targets of issue 12 (H200, lm350m)
TARGETS = {"defaults_pct": 1.0, "every_step_pct": 5.0, "basic_x": 2.5, "full_x": 4.0, "guard_x": 1.2}
AGREE_REL = 1e-4  # fused / eager multi-tensor / per-tensor: float32 sums in another order (counts, extremes: exact)


@dataclass(frozen=True)
class Workload:
    """A language model and its batch."""

    vocab: int
    d_model: int
    layers: int
    ff: int
    heads: int
    batch: int
    tokens: int


WORKLOADS = {
    "cuda": {
        "lm350m": Workload(32768, 1024, 24, 4096, 16, 8, 1024),
        "lm_small": Workload(4096, 352, 16, 1408, 8, 8, 128),
    },
    "cpu": {  # tiny: that the script runs, not what it measures
        "lm350m": Workload(512, 64, 2, 256, 4, 2, 32),
        "lm_small": Workload(256, 32, 2, 64, 4, 2, 16),
    },
}
MANY = {"cuda": (500, 64), "cpu": (50, 16)}  # n x Linear(width, width)
MONITOR_ONLY: dict[str, Any] = {"on_nonfinite": None, "spike_z_thresh": None}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "defaults": {},  # guard_mode="auto": deferred on CUDA (no host sync; fused AdamW skips on the device)
    "defaults_sync": {"guard_mode": "sync"},  # the guard read before the update: one host sync per step
    "monitoring_only": MONITOR_ONLY,
    "every_step": {"log_every_n_steps": 1},
    "full_every_step": {"log_every_n_steps": 1, "stats": "full"},
    "lightning_recipe": None,  # grad_norm + log_dict in the module, every step
}


class LM(LightningModule):
    """Embedding, TransformerEncoder, vocabulary head, trained on one fixed random batch."""

    def __init__(self, w: Workload) -> None:
        super().__init__()
        self.emb = nn.Embedding(w.vocab, w.d_model)
        layer = nn.TransformerEncoderLayer(w.d_model, w.heads, w.ff, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, w.layers, enable_nested_tensor=False)
        self.head = nn.Linear(w.d_model, w.vocab)
        self.vocab = w.vocab
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("x", torch.randint(0, w.vocab, (w.batch, w.tokens), generator=gen), persistent=False)
        self.register_buffer("y", torch.randint(0, w.vocab, (w.batch, w.tokens), generator=gen), persistent=False)
        self.recipe = False  # Lightning's grad_norm + log_dict on every step

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.emb(tokens)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(self.x).reshape(-1, self.vocab), self.y.reshape(-1))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.recipe:
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-5, fused=True)


class WindowTimer(Callback):
    """Time the steps ``warmup .. warmup + steps - 1`` of a fit, synchronised at the window's two ends only."""

    def __init__(self, warmup: int, steps: int, sync: Callable[[], None]) -> None:
        self.warmup, self.steps, self.sync = warmup, steps, sync
        self.t0 = 0.0
        self.seconds: float | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            self.sync()
            self.t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup + self.steps - 1:
            self.sync()
            self.seconds = time.perf_counter() - self.t0


def sync_of(device: str) -> Callable[[], None]:
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def make_logger(root: str, name: str) -> Logger:
    """A TensorBoardLogger, as in the issue's measurements; a CSVLogger where tensorboard is not installed."""
    try:
        logger: Logger = TensorBoardLogger(root, name=name)
        logger.experiment  # noqa: B018 - builds the writer: fails here without tensorboard
    except ModuleNotFoundError:
        logger = CSVLogger(root, name=name)
    return logger


def one_window(model: LM, variant: str, device: str, warmup: int, steps: int, root: str) -> float:
    """One fit of ``warmup + steps`` steps with ``variant``; the timed steps' mean, in seconds."""
    options = VARIANTS[variant]
    timer = WindowTimer(warmup, steps, sync_of(device))
    callbacks: list[Callback] = [] if options is None else [GradientHealthMonitor(**options)]
    model.recipe = variant == "lightning_recipe"
    trainer = Trainer(
        accelerator=device,
        devices=1,
        precision="bf16-mixed",
        max_steps=warmup + steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=make_logger(root, variant),
        log_every_n_steps=1 if variant == "lightning_recipe" else 50,
        callbacks=[*callbacks, timer],  # the timer last: its window closes after the monitor's hooks
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, DataLoader([0] * (warmup + steps), batch_size=1))
    assert timer.seconds is not None, "the window was not timed"
    return timer.seconds / steps


def run_workload(key: str, w: Workload, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LM(w)
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    names = list(VARIANTS)
    windows: dict[str, list[float]] = {v: [] for v in names}
    with tempfile.TemporaryDirectory() as root:
        for rep in range(args.windows):
            k = rep % len(names)
            for variant in names[k:] + names[:k]:
                windows[variant].append(one_window(model, variant, args.device, args.warmup, args.steps, root))
    step = statistics.median(windows["none"])
    out: dict[str, Any] = {"params": n_params, "tensors": n_tensors, "step_ms": 1e3 * step, "variants": {}}
    print(f"\n=== {key}: {w}\n    {n_params:,} parameters in {n_tensors} tensors; {args.windows} windows of "
          f"{args.steps} steps per variant, round-robin")  # fmt: skip
    for v in names:
        m = statistics.median(windows[v])
        pct = 100.0 * (m - step) / step
        out["variants"][v] = {"step_ms": 1e3 * m, "overhead_pct": pct, "windows_ms": [1e3 * x for x in windows[v]]}
        print(f"    {v:<18} {1e3 * m:10.3f} ms/step  {pct:+8.2f}%")
    return out


def windowed(fn: Callable[[], object], sync: Callable[[], None], calls: int, windows: int) -> float:
    """Median over ``windows`` of the mean time of ``calls`` calls, synchronised at each window's ends."""
    fn()
    sync()
    times = []
    for _ in range(windows):
        sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def copy_bandwidth(device: str, sync: Callable[[], None]) -> float:
    """Bytes per second of a large device copy (read + write counted)."""
    n = (1 << 28) if device == "cuda" else (1 << 24)
    a = torch.empty(n, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    t = windowed(lambda: b.copy_(a), sync, 10, 5)
    return 2 * a.numel() * a.element_size() / t


EXACT_KINDS = (  # integer counts and picked values: every path gives the same number
    "grad_health/zero_frac",
    "grad_health/nan_count",
    "grad_health/inf_count",
    "grad_zero_frac",
    "grad_dead_units",
    "grad_max",
    "grad_min",
)


def agreement(*runs: Callable[[], object]) -> dict[str, float]:
    """The largest relative differences between the metrics of several ways to compute one step, per kind.

    The paths (fused, eager multi-tensor, per tensor) must agree: counts and extremes exactly (:data:`EXACT_KINDS`),
    norms and sums to float32 accumulation in another order (a mean relative to the layer's largest ``|g|``, as
    it may cancel to ~0). Printed and kept in the JSON: the device run is where the CUDA branches are checked.
    """
    metrics: list[dict[str, float]] = [run() for run in runs]  # type: ignore[misc]
    worst: dict[str, float] = {}
    for other in metrics[1:]:
        for key, value in metrics[0].items():
            ref = other[key]
            if math.isnan(value) and math.isnan(ref):
                continue
            kind, _, layer = key.partition("/")
            kind = key if kind == "grad_health" else kind  # per layer: by statistic
            scale = max(abs(ref), metrics[0].get(f"grad_max/{layer}", 0.0) if kind == "grad_mean" else 0.0)
            diff = 0.0 if value == ref else abs(value - ref) / max(scale, 1e-30)
            worst[kind] = max(worst.get(kind, 0.0), diff)
    exact = {k: v for k, v in worst.items() if k in EXACT_KINDS}
    print(f"    paths agree (largest relative difference): exact kinds {exact}; all {len(worst)} kinds <= "
          f"{max(worst.values(), default=0.0):.2e}")  # fmt: skip
    return worst


def kernel_table(key: str, module: nn.Module, loss: Callable[[], torch.Tensor], args: argparse.Namespace) -> dict:
    device = args.device
    sync = sync_of(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss().backward()
    holder = LightningModule()
    holder.net = module
    layout = build_layout(holder.named_parameters())
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    params = [p for p in module.parameters() if p.grad is not None]
    engines = {
        name: GradStatsEngine(stats=stats) for name, stats in (("basic", "basic"), ("full", "full"), ("guard", "basic"))
    }
    per_tensor = {stats: GradStatsEngine(stats=stats) for stats in ("basic", "full")}
    for eng in per_tensor.values():
        eng._horizontal = False  # the CPU's path, on this device

    def floor() -> torch.Tensor:
        return torch.stack(torch._foreach_norm(grads, 2.0, dtype=torch.float32)).sum()

    def logged(eng: GradStatsEngine) -> Callable[[], object]:
        return lambda: record_to_metrics(eng.finish(eng.compute(layout), StepMeta()))  # type: ignore[arg-type]

    def guard() -> float:
        return engines["guard"].read_guard(engines["guard"].guard(layout))[0]  # type: ignore[arg-type]

    def eager(fn: Callable[[], object]) -> Callable[[], object]:  # without the fused Triton kernel
        def run() -> object:
            horizontal._FUSED["disabled"] = True
            try:
                return fn()
            finally:
                horizontal._FUSED["disabled"] = False

        return run

    cands: dict[str, Callable[[], object]] = {
        "floor": floor,
        "floor_item": lambda: floor().item(),
        "guard": guard,
        "basic": logged(engines["basic"]),
        "full": logged(engines["full"]),
        "full_eager": eager(logged(engines["full"])),
        "basic_per_tensor": logged(per_tensor["basic"]),
        "full_per_tensor": logged(per_tensor["full"]),
        "lightning_recipe": lambda: {k: v.item() for k, v in grad_norm(holder, norm_type=2).items()},
    }
    checks = agreement(cands["full"], eager(logged(engines["full"])), logged(per_tensor["full"]))
    names = list(cands)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.kernel_windows):  # round-robin, the first one rotated
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(windowed(cands[name], sync, args.kernel_calls, 1))
    meds = {k: statistics.median(v) for k, v in samples.items()}
    bw = copy_bandwidth(device, sync)
    nbytes = sum(t.numel() * t.element_size() for t in grads + params)
    limit = nbytes / bw
    f = meds["floor"]
    print(f"\n=== kernel table, {key}: {len(grads)} tensors, {nbytes / 2**30:.2f} GiB of grads + params; "
          f"copy bandwidth {bw / 1e9:.0f} GB/s")  # fmt: skip
    for name in names:
        print(f"    {name:<20} {1e3 * meds[name]:10.3f} ms  {meds[name] / f:8.2f}x floor")
    print(f"    {'bandwidth limit':<20} {1e3 * limit:10.3f} ms  {limit / f:8.2f}x floor")
    return {
        "agreement": checks,
        "triton": horizontal.fused_available(torch.device(device)),
        "tensors": len(grads),
        "bytes": nbytes,
        "copy_bandwidth_Bps": bw,
        "bandwidth_limit_ms": 1e3 * limit,
        "ms": {k: 1e3 * v for k, v in meds.items()},
        "x_floor": {k: v / f for k, v in meds.items()},
    }


def lm_table(args: argparse.Namespace) -> dict[str, Any]:
    """The kernel table of ``lm350m`` (the model is freed on return)."""
    torch.manual_seed(0)
    lm = LM(WORKLOADS[args.device]["lm350m"]).to(args.device)
    return kernel_table("lm350m", lm, lambda: lm.training_step(None, 0), args)


def kernels(args: argparse.Namespace) -> dict[str, Any]:
    device = args.device
    out = {"lm350m": lm_table(args)}
    n, width = MANY[device]
    mods: list[nn.Module] = []
    for i in range(n):
        mods += [nn.Linear(width, width)] + ([nn.ReLU()] if i < n - 1 else [])
    net = nn.Sequential(*mods).to(device)
    x, y = torch.randn(64, width, device=device), torch.randn(64, width, device=device)
    out["many"] = kernel_table(
        f"{n} x Linear({width},{width})", net, lambda: nn.functional.mse_loss(net(x).float(), y), args
    )
    return out


def targets(results: dict[str, Any]) -> dict[str, Any]:
    lm = results["workloads"].get("lm350m")
    table = results["kernels"]["lm350m"]["x_floor"]
    measured = {
        "defaults_pct": lm["variants"]["defaults"]["overhead_pct"] if lm else math.nan,
        "every_step_pct": lm["variants"]["every_step"]["overhead_pct"] if lm else math.nan,
        "basic_x": table["basic"],
        "full_x": table["full"],
        "guard_x": table["guard"],
    }
    print("\n=== targets (issue 12; lm350m on an H200)")
    out = {}
    for k, limit in TARGETS.items():
        ok = measured[k] <= limit
        out[k] = {"measured": measured[k], "target": limit, "pass": ok}
        print(f"    {k:<16} {measured[k]:9.2f}  <= {limit:<5}  {'PASS' if ok else 'MISS'}")
    for key, table in results["kernels"].items():  # the device's paths against each other (correctness)
        worst = table["agreement"]
        exact = all(v == 0.0 for k, v in worst.items() if k in EXACT_KINDS)
        close = all(v <= AGREE_REL for v in worst.values())
        out[f"agreement_{key}"] = {"exact": exact, "close": close, "pass": exact and close}
        verdict = "PASS" if exact and close else "FAIL"
        print(f"    paths agree ({key}): counts and extremes exact, the rest within {AGREE_REL:g}: {verdict}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="fewer windows (and, on the CPU, tiny steps)")
    parser.add_argument("--out", default=None, help="write the figures to this JSON file")
    parser.add_argument("--workloads", nargs="*", default=["lm350m", "lm_small"], choices=["lm350m", "lm_small"])
    parser.add_argument("--windows", type=int, default=None, help="timed windows per variant")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per window (50-100)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps at the start of each window's fit")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    quick = args.quick
    args.windows = args.windows or (3 if quick else 7)
    args.steps = args.steps or (2 if quick and args.device == "cpu" else 50)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.device == "cpu" else 5)
    args.kernel_windows = 3 if quick else 9
    args.kernel_calls = 2 if args.device == "cpu" else 20
    warnings.filterwarnings("ignore")
    if args.device == "cpu":
        torch.set_num_threads(1)  # as benchmarks/overhead.py: no oversubscribed thread pools
    start = time.perf_counter()
    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "windows": args.windows,
        "steps": args.steps,
        "warmup": args.warmup,
        "quick": quick,
    }
    with tempfile.TemporaryDirectory() as probe:
        meta["logger"] = type(make_logger(probe, "probe")).__name__
    print(f"lightning_gradhealth GPU benchmark: {meta}")
    results: dict[str, Any] = {"meta": meta, "workloads": {}}
    results["kernels"] = kernels(args)
    for key in args.workloads:
        results["workloads"][key] = run_workload(key, WORKLOADS[args.device][key], args)
    results["targets"] = targets(results)
    results["meta"]["wall_s"] = time.perf_counter() - start
    print(f"\ntotal wall time {results['meta']['wall_s']:.1f} s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"figures written to {args.out}")


if __name__ == "__main__":
    main()
