"""Overhead benchmark: what lightning_gradhealth costs, next to a one-kernel floor and the usual recipes.

Run from the repository root::

    python benchmarks/overhead.py           # full run, a few minutes on 2 CPU cores
    python benchmarks/overhead.py --quick   # fewer repetitions, under a minute

Everything runs on the CPU with ``torch.set_num_threads(1)``. Every candidate is warmed up, then timed
over repetitions; in each repetition the candidates of a table run one after another, round-robin, with the
starting candidate rotated, so that machine noise hits all of them alike. Medians are reported, with the
inter-quartile range as a noise estimate.

Three model shapes are measured:

- ``mlp``: 10 x ``Linear(1000, 1000)`` with ReLU between, batch 64, MSE loss (few large tensors).
- ``transformer``: ``nn.Embedding(4096, 352)``, a 16-layer ``nn.TransformerEncoder`` (d_model 352, 8 heads,
  feed-forward 1408, batch first) and a ``Linear(352, 4096)`` head; 8 x 128 tokens, cross-entropy loss.
- ``many``: 500 x ``Linear(64, 64)`` with ReLU between (1,000 parameter tensors), batch 64, MSE loss.

For each shape, one real forward and backward pass gives real gradients, and the kernel table times, as a
ratio to the FLOOR (``torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).sum().item()``: one
foreach kernel and one transfer):

1. ``GradStatsEngine.compute`` + ``finish`` + ``record_to_metrics`` with ``stats="basic"``;
2. the same with ``stats="full"``;
3. the callback on a step that is not logged (its gating only);
4. Lightning's ``grad_norm`` recipe with every value turned into a Python float (what ``log_dict`` does per
   key, minus ``log_dict``'s own bookkeeping);
5. a hand-written per-tensor monitor (five ``.item()`` per parameter).

The end-to-end table runs real training steps (forward, backward, ``AdamW.step``, ``zero_grad``; plain torch,
no Trainer) and calls the callback's hooks, with a stand-in Trainer, where Lightning calls them; the hooks (and,
in steps of their own, the floor) are timed inside the step, so they meet the caches a real step leaves. The
default settings (one logged step in 50, guard on the others) are reported as a percentage of a plain step. A
last table times writing one logged step's metrics to a real ``TensorBoardLogger`` as the callback does (one
event) and as Lightning's ``log_metrics`` does (one ``add_scalar`` per key), kept apart from the kernel ratios.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import lightning
import torch
from common import (  # (benchmarks/ is this script's directory)
    SHAPES,
    Holder,
    bench,
    build_shape,
    fmt_iqr,
    fmt_pct,
    fmt_ratio,
    fmt_t,
    med,
    verdict,
)
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import grad_norm

from lightning_gradhealth import GradientHealthMonitor
from lightning_gradhealth.model.layout import build_layout
from lightning_gradhealth.output.sinks import write_metrics
from lightning_gradhealth.schema.metrics import record_to_metrics
from lightning_gradhealth.stats.engine import GradStatsEngine, StepMeta, nonzero_counts
from lightning_gradhealth.stats.horizontal import _cpu_full_stats

EVERY = 50  # the default log_every_n_steps of the Trainer (and so of the callback)
LOG_DICT_MS_PER_KEY = 0.35  # measured elsewhere; NOT included in the grad_norm row

# Targets.
FULL_MAX_RATIO = 2.5
NOT_LOGGED_MAX_FRAC = 0.001  # "nothing measurable": below 0.1% of a plain step
DEFAULT_MAX_FRAC = {"transformer": 0.01, "many": 0.03}  # monitoring only (issue: core)
GUARD_DEFAULT_MAX_FRAC = {"transformer": 0.01, "many": 0.05}  # default settings, guard on (issue: safety)
GUARD_MAX_RATIO = 1.2
IN_STEP_MAX_RATIO = {"guard": 1.3, "basic": 4.0, "full": 6.0}  # issue 12: hooks inside real steps / in-step FLOOR
MONITOR_ONLY = {"on_nonfinite": None, "spike_z_thresh": None}  # no per-step guard: statistics on logged steps only


@dataclass(frozen=True)
class Settings:
    """How much to repeat."""

    kernel_reps: int
    kernel_min_sample_s: float
    e2e_reps: dict[str, int]
    e2e_warmup: int
    tb_reps: int


FULL = Settings(
    kernel_reps=25,
    kernel_min_sample_s=0.02,
    e2e_reps={"mlp": 21, "transformer": 7, "many": 21},
    e2e_warmup=2,
    tb_reps=9,
)
QUICK = Settings(
    kernel_reps=5,
    kernel_min_sample_s=0.005,
    e2e_reps={"mlp": 5, "transformer": 2, "many": 5},
    e2e_warmup=1,
    tb_reps=3,
)


# ---------------------------------------------------------------------------------------------- stand-ins
def stub_trainer(step: int, optimizer: torch.optim.Optimizer | None = None) -> SimpleNamespace:
    """The Trainer attributes the callback reads, with ``_batches_that_stepped = step``."""
    return SimpleNamespace(
        fast_dev_run=False,
        log_every_n_steps=EVERY,
        fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step)),
        accumulate_grad_batches=1,
        optimizers=[optimizer] if optimizer is not None else [],
        precision_plugin=SimpleNamespace(),
        global_step=step,
        current_epoch=0,
        gradient_clip_val=None,
        callback_metrics={},
        is_global_zero=True,
        global_rank=0,
        world_size=1,
        loggers=[],  # logger cost is measured separately (TensorBoard table)
        strategy=SimpleNamespace(),
        callbacks=[],
        default_root_dir=".",
    )


ZERO_SCRATCH: dict = {}  # the engine keeps its zero-counting buffer between steps; so does row c2
PLANS: dict = {}  # and its blocks of small tensors (stats="full"); so does row c3
LOGGED_STEP = EVERY - 1  # (step + 1) % EVERY == 0
NOT_LOGGED_STEP = 0


def all_hooks(
    monitor: GradientHealthMonitor, trainer: SimpleNamespace, module: LightningModule, opt: torch.optim.Optimizer
) -> None:
    """Every hook the callback implements for one training batch, gradients already present."""
    monitor.on_train_batch_start(trainer, module, None, 0)  # type: ignore[arg-type]
    monitor.on_after_backward(trainer, module)  # type: ignore[arg-type]
    monitor.on_before_optimizer_step(trainer, module, opt)  # type: ignore[arg-type]
    monitor.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]


def make_monitor(
    step: int, module: LightningModule, opt: torch.optim.Optimizer, **kwargs: object
) -> tuple[GradientHealthMonitor, SimpleNamespace]:
    monitor = GradientHealthMonitor(log_every_n_steps=EVERY, **kwargs)  # type: ignore[arg-type]
    trainer = stub_trainer(step, opt)
    monitor.setup(trainer, module, "fit")  # type: ignore[arg-type]
    monitor.on_fit_start(trainer, module)  # type: ignore[arg-type]
    return monitor, trainer


# ---------------------------------------------------------------------------------------------- per shape
@dataclass
class ShapeResult:
    """Numbers kept for the summary."""

    key: str
    ratios: dict[str, float]
    plain_step: float
    logged_hooks: float
    not_logged_hooks: float
    guard_in_step: float
    gating: float
    default_frac: float
    tb: dict[str, tuple[int, float]]
    guard_default_frac: float = 0.0
    basic_in_step: float = 0.0
    full_in_step: float = 0.0


def run_shape(key: str, cfg: Settings) -> ShapeResult:
    torch.manual_seed(0)
    net, loss_fn = build_shape(key)
    holder = Holder(net)
    loss_fn().backward()  # real gradients, kept fixed for the kernel table
    named = [(n, p) for n, p in holder.named_parameters() if p.grad is not None]
    grads = [p.grad for _, p in named]
    n_tensors = len(named)
    n_elems = sum(p.numel() for _, p in named)
    layout = build_layout(holder.named_parameters())

    eng_basic = GradStatsEngine(norm_type=2.0, stats="basic", per_layer=True)
    eng_full = GradStatsEngine(norm_type=2.0, stats="full", per_layer=True)

    def floor() -> float:
        return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).sum().item()

    def ours(eng: GradStatsEngine) -> Callable[[], dict[str, float]]:
        def run() -> dict[str, float]:
            pending = eng.compute(layout)
            assert pending is not None
            return record_to_metrics(eng.finish(pending, StepMeta()))

        return run

    # The callback's real hooks, on a logged and on a not-logged step (stand-in Trainer, no logger).
    hook_opt = torch.optim.AdamW(net.parameters(), lr=1e-4)  # never stepped: only identifies the params
    # 3. gating alone: the hook where a logged step would compute, on a step that is not logged
    gate_monitor, gate_trainer = make_monitor(NOT_LOGGED_STEP, holder, hook_opt, **MONITOR_ONLY)

    def gating() -> None:
        gate_monitor.on_before_optimizer_step(gate_trainer, holder, hook_opt)  # type: ignore[arg-type]

    mon_log, tr_log = make_monitor(LOGGED_STEP, holder, hook_opt)  # defaults
    mon_skip, tr_skip = make_monitor(NOT_LOGGED_STEP, holder, hook_opt, **MONITOR_ONLY)
    mon_guard, tr_guard = make_monitor(NOT_LOGGED_STEP, holder, hook_opt)  # defaults: guard on

    def guard_only() -> float:
        pending = eng_basic.guard(layout)
        assert pending is not None
        return eng_basic.read_guard(pending)[0]

    def hooks_guard() -> None:
        all_hooks(mon_guard, tr_guard, holder, hook_opt)

    def hooks_logged() -> None:
        all_hooks(mon_log, tr_log, holder, hook_opt)

    def hooks_not_logged() -> None:
        all_hooks(mon_skip, tr_skip, holder, hook_opt)

    def lightning_recipe() -> dict[str, float]:
        return {k: v.item() for k, v in grad_norm(holder, norm_type=2).items()}

    def naive() -> dict[str, tuple[float, ...]]:
        out = {}
        for name, p in named:
            g = p.grad
            out[name] = (
                g.norm().item(),
                p.data.norm().item(),
                (g == 0).sum().item(),
                torch.isnan(g).sum().item(),
                torch.isinf(g).sum().item(),
            )
        return out

    # Components of a logged step, to show where its cost goes (each a separate pass over memory on CPU).
    grads_list = [p.grad for _, p in named if p.grad is not None]
    params_list = [p.detach() for _, p in named if p.grad is not None]

    def comp_param_norms() -> float:
        return torch.stack(torch._foreach_norm(params_list, 2, dtype=torch.float32)).sum().item()

    def comp_zero_counts() -> int:
        return nonzero_counts(grads_list, ZERO_SCRATCH).sum().item()

    l2 = torch.stack(torch._foreach_norm(grads_list, 2.0, dtype=torch.float32)).double()

    def comp_min_nonzero() -> float:
        # the passes stats="full" adds: max |g|, min non-zero |g| and sum per tensor (the engine's own code)
        return torch.stack(_cpu_full_stats(grads_list, torch.float64, None, l2, ZERO_SCRATCH, PLANS)).sum().item()

    # Sanity checks before timing: the gating returns early, the logged hooks compute.
    gating()
    hooks_not_logged()
    assert gate_monitor.last_record is None and mon_skip.last_record is None, "gating computed on a skip step"
    hooks_logged()
    assert mon_log.last_record is not None, "logged step did not compute"
    keys_basic = len(ours(eng_basic)())
    keys_full = len(ours(eng_full)())
    n_recipe = len(lightning_recipe())

    rows: list[tuple[str, str, str]] = [
        ("floor", "FLOOR: stack(_foreach_norm).sum().item()", "1"),
        ("basic", "1. ours, logged step (basic)", "1"),
        ("full", "2. ours, logged step (full)", "1"),
        ("gating", "3. ours, step not logged, guard off (gating)", "0"),
        ("hooks_skip", "3b. ours, step not logged, guard off, all 4 hooks", "0"),
        ("guard", "6. guard only: global norm + 1 transfer (engine)", "1"),
        ("hooks_guard", "6b. step not logged, defaults (guard on), 4 hooks", "1"),
        ("hooks_log", "1b. ours, logged step, all 4 real hooks (basic)", "1"),
        ("recipe", f"4. Lightning grad_norm + .item() ({n_recipe} keys)", str(n_recipe)),
        ("naive", "5. naive per-tensor bundle (5 x .item()/tensor)", str(5 * n_tensors)),
        ("c_param", "c1. component: parameter norms (_foreach_norm)", "1"),
        ("c_zero", "c2. component: exact zero counts (engine.nonzero_counts)", "1"),
        ("c_minnz", "c3. component: stats=full passes (max, min non-zero |g|, sum)", "1"),
    ]
    cands: dict[str, Callable[[], object]] = {
        "floor": floor,
        "basic": ours(eng_basic),
        "full": ours(eng_full),
        "gating": gating,
        "hooks_skip": hooks_not_logged,
        "guard": guard_only,
        "hooks_guard": hooks_guard,
        "hooks_log": hooks_logged,
        "recipe": lightning_recipe,
        "naive": naive,
        "c_param": comp_param_norms,
        "c_zero": comp_zero_counts,
        "c_minnz": comp_min_nonzero,
    }
    gc.collect()
    samples = bench(cands, cfg.kernel_reps, cfg.kernel_min_sample_s)
    meds = {k: med(v) for k, v in samples.items()}
    f = meds["floor"]
    ratios = {k: v / f for k, v in meds.items()}

    print()
    print(f"=== {key}: {SHAPES[key]}")
    print(
        f"    {n_tensors} parameter tensors, {n_elems:,} elements, {layout.num_layers} layers; "
        f"metric keys per logged step: {keys_basic} (basic), {keys_full} (full)"
    )
    print(f"    kernel table: median of {cfg.kernel_reps} round-robin repetitions on fixed real gradients")
    print(f"    {'candidate':<56} {'median':>13} {'x FLOOR':>10} {'IQR':>7} {'host xfers':>11}")
    for k, label, xfers in rows:
        print(f"    {label:<56} {fmt_t(meds[k])} {fmt_ratio(ratios[k])} {fmt_iqr(samples[k]):>7} {xfers:>11}")
    print(
        f"    note: row 4 excludes self.log_dict's own per-key cost (~{LOG_DICT_MS_PER_KEY} ms/key "
        f"measured elsewhere, i.e. ~{LOG_DICT_MS_PER_KEY * n_recipe:.0f} ms more for {n_recipe} keys)."
    )
    print(
        "    note: rows 1b/3b are the callback's own hook bodies; Lightning's per-callback hook dispatch "
        "is not included."
    )

    # ------------------------------------------------------------------ end to end
    # Real training steps (forward, backward, AdamW.step, zero_grad) on a second copy of the network, with the
    # callback's hooks called where Lightning calls them. The hooks are timed INSIDE the step, so they see the
    # caches a real step leaves them (the gradients fresh from the backward pass); subtracting two whole-step
    # medians instead would drown a few per cent in the step's own noise. The floor is timed the same way, at
    # the same point of a step.
    torch.manual_seed(1)
    e2e_net, e2e_loss = build_shape(key)
    e2e_holder = Holder(e2e_net)
    opt = torch.optim.AdamW(e2e_net.parameters(), lr=1e-4)
    e2e_params = list(e2e_net.parameters())
    monitors = {
        "log": make_monitor(LOGGED_STEP, e2e_holder, opt),  # defaults, a logged step
        "log_full": make_monitor(LOGGED_STEP, e2e_holder, opt, stats="full"),  # stats="full", a logged step
        "log_mo": make_monitor(LOGGED_STEP, e2e_holder, opt, **MONITOR_ONLY),  # monitoring only, a logged step
        "guard": make_monitor(NOT_LOGGED_STEP, e2e_holder, opt),  # defaults, a step not logged: the guard
        "skip": make_monitor(NOT_LOGGED_STEP, e2e_holder, opt, **MONITOR_ONLY),  # monitoring only, not logged
    }
    inside: dict[str, list[float]] = {name: [] for name in [*monitors, "floor"]}

    def plain_step() -> None:
        e2e_loss().backward()
        opt.step()
        opt.zero_grad()

    def floor_step() -> None:
        e2e_loss().backward()
        t0 = time.perf_counter()
        torch.stack(torch._foreach_norm([p.grad for p in e2e_params], 2, dtype=torch.float32)).sum().item()
        inside["floor"].append(time.perf_counter() - t0)
        opt.step()
        opt.zero_grad()

    def hooked_step(name: str) -> Callable[[], None]:
        monitor, trainer = monitors[name]

        def run() -> None:
            t0 = time.perf_counter()
            monitor.on_train_batch_start(trainer, e2e_holder, None, 0)  # type: ignore[arg-type]
            spent = time.perf_counter() - t0
            e2e_loss().backward()
            t0 = time.perf_counter()
            monitor.on_after_backward(trainer, e2e_holder)  # type: ignore[arg-type]
            monitor.on_before_optimizer_step(trainer, e2e_holder, opt)  # type: ignore[arg-type]
            spent += time.perf_counter() - t0
            opt.step()
            opt.zero_grad()
            t0 = time.perf_counter()
            monitor.on_train_batch_end(trainer, e2e_holder, None, None, 0)  # type: ignore[arg-type]
            inside[name].append(spent + time.perf_counter() - t0)

        return run

    e2e_cands: dict[str, Callable[[], object]] = {
        "plain": plain_step,
        "floor": floor_step,
        **{name: hooked_step(name) for name in monitors},
    }
    gc.collect()
    reps = cfg.e2e_reps[key]
    es = bench(e2e_cands, reps, 0.0, warmup=cfg.e2e_warmup)
    plain = med(es["plain"])
    im = {name: med(times[-reps:]) for name, times in inside.items()}  # the timed repetitions, not the warm-up
    rec = monitors["log"][0].last_record
    if rec is None or not math.isfinite(rec.total_norm):
        print("    WARNING: the end-to-end model's gradients became non-finite; numbers are not representative")

    default = (im["log_mo"] + (EVERY - 1) * im["skip"]) / EVERY
    guard_default = (im["log"] + (EVERY - 1) * im["guard"]) / EVERY
    print(f"    end to end: plain step = forward + backward + AdamW.step + zero_grad (plain torch), median of {reps};")
    print("    hook and floor times measured inside real steps (median)")
    print(f"    {'plain step':<56} {fmt_t(plain)}  (IQR {fmt_iqr(es['plain'])})")

    def line(label: str, seconds: float, extra: str = "") -> None:
        print(f"    {label:<56} {fmt_t(seconds)}  = {fmt_pct(seconds / plain)} of a step{extra}")

    line("FLOOR inside a step (where the guard runs)", im["floor"])
    line("logged step, 4 hooks, defaults", im["log"], f", {im['log'] / im['floor']:.3f}x FLOOR")
    line('logged step, 4 hooks, stats="full"', im["log_full"], f", {im['log_full'] / im['floor']:.3f}x FLOOR")
    line("logged step, 4 hooks, monitoring only", im["log_mo"])
    line("step not logged, 4 hooks, defaults (guard on)", im["guard"], f", {im['guard'] / im['floor']:.3f}x FLOOR")
    line("step not logged, 4 hooks, monitoring only", im["skip"])
    line("DEFAULTS, guard on: (1 logged + 49 guarded) / 50", guard_default)
    line("MONITORING ONLY: (1 logged + 49 not logged) / 50", default)

    # ------------------------------------------------------------------ TensorBoard (separate)
    from lightning.pytorch.loggers import TensorBoardLogger

    metrics_basic = ours(eng_basic)()
    metrics_full = ours(eng_full)()
    tb: dict[str, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tb_logger = TensorBoardLogger(tmp, name="", version="")
        counter = [0]

        def write(metrics: dict[str, float], lightning_way: bool) -> Callable[[], None]:
            def run() -> None:
                counter[0] += 1
                if lightning_way:
                    tb_logger.log_metrics(metrics, step=counter[0])  # one add_scalar per key
                else:
                    write_metrics([tb_logger], metrics, counter[0])  # what the callback does: one event
                tb_logger.experiment.flush()  # the writer thread's share included

            return run

        ts = bench(
            {
                "basic": write(metrics_basic, False),
                "full": write(metrics_full, False),
                "basic_lightning": write(metrics_basic, True),
                "full_lightning": write(metrics_full, True),
            },
            cfg.tb_reps,
            0.0,
            warmup=1,
        )
        tb_logger.finalize("success")
    for level, metrics in (("basic", metrics_basic), ("full", metrics_full)):
        t, t_lightning = med(ts[level]), med(ts[f"{level}_lightning"])
        tb[level] = (len(metrics), t)
        print(
            f"    TensorBoard, {len(metrics):>4} keys ({level:<5}): ours (one event) {fmt_t(t)} = "
            f"{1e6 * t / len(metrics):5.1f} µs/key, {fmt_pct(t / EVERY / plain)} of a step amortised /50; "
            f"log_metrics {fmt_t(t_lightning)} = {1e6 * t_lightning / len(metrics):5.1f} µs/key"
        )

    return ShapeResult(
        key=key,
        ratios=ratios,
        plain_step=plain,
        logged_hooks=im["log"],
        not_logged_hooks=im["skip"],
        guard_in_step=im["guard"] / im["floor"],
        basic_in_step=im["log"] / im["floor"],
        full_in_step=im["log_full"] / im["floor"],
        gating=meds["gating"],
        default_frac=default / plain,
        tb=tb,
        guard_default_frac=guard_default / plain,
    )


def summary(results: list[ShapeResult]) -> None:
    print()
    print("=== Targets")
    print(f"    {'target':<58} {'shape':<12} {'measured':>12}  verdict")
    for r in results:
        ok = r.ratios["full"] <= FULL_MAX_RATIO
        print(
            f"    {f'full stats <= {FULL_MAX_RATIO}x FLOOR':<58} {r.key:<12} {r.ratios['full']:>11.2f}x  {verdict(ok)}"
        )
    for r in results:
        ok = r.ratios["basic"] <= FULL_MAX_RATIO
        print(
            f"    {f'(info) basic stats <= {FULL_MAX_RATIO}x FLOOR':<58} {r.key:<12} "
            f"{r.ratios['basic']:>11.2f}x  {verdict(ok)}"
        )
    for r in results:
        frac = r.not_logged_hooks / r.plain_step
        label = f"step not logged: nothing measurable (< {100 * NOT_LOGGED_MAX_FRAC:g}% of a step)"
        print(f"    {label:<58} {r.key:<12} {fmt_pct(frac):>12}  {verdict(frac < NOT_LOGGED_MAX_FRAC)}")
    for r in results:
        ok = r.ratios["guard"] <= GUARD_MAX_RATIO
        label = f"guard (every step) <= {GUARD_MAX_RATIO}x FLOOR (engine, kernel table)"
        print(f"    {label:<58} {r.key:<12} {r.ratios['guard']:>11.2f}x  {verdict(ok)}")
    for r in results:
        ok = r.guard_in_step <= GUARD_MAX_RATIO
        label = f"   the same, 4 hooks inside a real step <= {GUARD_MAX_RATIO}x FLOOR there"
        print(f"    {label:<58} {r.key:<12} {r.guard_in_step:>11.2f}x  {verdict(ok)}")
    for r in results:
        for what, ratio in (("guard", r.guard_in_step), ("basic", r.basic_in_step), ("full", r.full_in_step)):
            limit = IN_STEP_MAX_RATIO[what]
            label = f"{what}, 4 hooks inside a real step <= {limit}x FLOOR there (issue 12)"
            print(f"    {label:<58} {r.key:<12} {ratio:>11.2f}x  {verdict(ratio <= limit)}")
    for r in results:
        limit = GUARD_DEFAULT_MAX_FRAC.get(r.key)
        with_tb = r.guard_default_frac + r.tb["basic"][1] / EVERY / r.plain_step
        label = f"defaults (guard on) <= {100 * limit:g}% of a step" if limit else "defaults, guard on (no target)"
        print(f"    {label:<58} {r.key:<12} {fmt_pct(with_tb):>12}  {verdict(with_tb <= limit) if limit else '-'}")
        label = "   of which the callback itself (no logger write)"
        own = r.guard_default_frac
        print(f"    {label:<58} {r.key:<12} {fmt_pct(own):>12}  {verdict(own <= limit) if limit else '-'}")
    for r in results:
        limit = DEFAULT_MAX_FRAC.get(r.key)
        label = f"monitoring only <= {100 * limit:g}% of a step" if limit else "monitoring only (no target)"
        # judged with the TensorBoard write of the logged step's keys included: that is what a user pays
        with_tb = r.default_frac + r.tb["basic"][1] / EVERY / r.plain_step
        v = verdict(with_tb <= limit) if limit else "-"
        print(f"    {label:<58} {r.key:<12} {fmt_pct(with_tb):>12}  {v}")
        print(
            f"    {'   of which the callback itself (no logger write)':<58} {r.key:<12} {fmt_pct(r.default_frac):>12}"
        )
    print("    ('monitoring only' = on_nonfinite=None, spike_z_thresh=None; 'defaults' = the guard on every step.)")
    print("    (both = callback hooks, 1 logged step (basic, per-layer) + 49 not logged, plus the")
    print("     TensorBoard write of the logged step's keys, / 50, as a fraction of a plain forward+backward+AdamW")
    print("     step.)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    parser.add_argument(
        "--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="which shapes to run (default: all)"
    )
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    start = time.perf_counter()
    print("lightning_gradhealth overhead benchmark" + (" (--quick)" if args.quick else ""))
    print(
        f"torch {torch.__version__}, lightning {lightning.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, device cpu"
    )
    print(
        f"kernel reps {cfg.kernel_reps} (min {cfg.kernel_min_sample_s * 1e3:g} ms/sample), "
        f"end-to-end reps {cfg.e2e_reps}, TensorBoard reps {cfg.tb_reps}"
    )
    results = [run_shape(key, cfg) for key in args.shapes]
    summary(results)
    print(f"\ntotal wall time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
