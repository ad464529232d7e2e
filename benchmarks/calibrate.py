"""Calibration data for the diagnosis: every healthy architecture and pathology of ``tests/archs.py``, measured.

Run from the repository root::

    python benchmarks/calibrate.py                          # every run (~1 minute on 2 CPU cores)
    python benchmarks/calibrate.py resnet18 bert --out c.json
    python benchmarks/calibrate.py --activation-stats 10    # also the monitor's activation statistics

Each run trains under a real ``lightning.Trainer`` with a ``GradientHealthMonitor`` computing every step
(``log_every_n_steps=1``), as ``tests/test_trust.py`` does, and prints a compact table:

- the run: steps, seconds, what it raised, the loss (first / min / max / last) and the global gradient norm
  (first / median / max / last), the layer-norm ratio (median / max);
- per layer, in depth (definition) order: the module class (norms, embeddings and linears told apart), its
  number of gradient entries, the median gradient norm over the run and over its last quarter (the "recent" window
  the rules read), the median grad/param ratio, the median and max zero fraction, and the dead-unit fraction when
  the records carry one (``LayerStats.dead_units``/``units`` or ``dead_unit_frac``);
- for ReLU networks, the ground truth: the fraction of each ReLU's units that are zero on a whole batch of the
  trained network (measured by forward hooks, independently of the monitor);
- the findings (kind, severity, layers, first fix) and the alerts (kind, severity, count, first step, layers).

``--out`` writes the same, with the full series, to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import archs  # tests/archs.py

warnings.filterwarnings("ignore")


def _median(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.median(finite) if finite else math.nan


def _g(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}"
    return str(v)


def _dead_frac(lay: Any) -> float | None:
    """The dead-unit fraction a record carries for a layer, if any (fields being added to ``LayerStats``)."""
    dead, units = getattr(lay, "dead_units", None), getattr(lay, "units", None)
    if dead is not None and units:
        return float(dead) / float(units)
    frac = getattr(lay, "dead_unit_frac", None)
    return None if frac is None else float(frac)


def _class(module: Any) -> str:
    """The module's class; a long-named subclass of a torch.nn layer (``NonDynamicallyQuantizableLinear``) as
    ``Linear*``."""
    if module is None:
        return "?"
    name = type(module).__name__
    if len(name) > 18:
        base = next((c for c in type(module).__mro__[1:] if c.__module__.startswith("torch.nn")), None)
        if base is not None:
            return f"{base.__name__}*"
    return name


def measure(r: archs.RunResult, arch: archs.Arch) -> dict[str, Any]:
    """Everything calibration needs from one run, JSON-ready."""
    records = r.records
    finite = [rec for rec in records if rec.is_finite]
    modules = dict(r.module.named_modules())
    names: list[str] = []
    per_layer: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    numel: dict[str, int] = {}
    for rec in finite:
        for lay in rec.layers:
            if lay.name not in per_layer:
                names.append(lay.name)
            d = per_layer[lay.name]
            d["norm"].append(lay.grad_norm)
            d["ratio"].append(lay.ratio)
            d["zero"].append(lay.zero_frac)
            dead = _dead_frac(lay)
            if dead is not None:
                d["dead"].append(dead)
            numel[lay.name] = lay.numel
    recent_from = len(finite) - max(3, math.ceil(len(finite) / 4))
    layers = []
    for name in names:
        d = per_layer[name]
        recent = [lay.grad_norm for rec in finite[recent_from:] for lay in rec.layers if lay.name == name]
        layers.append(
            {
                "name": name,
                "class": _class(modules.get(name)),
                "numel": numel[name],
                "median_grad_norm": _median(d["norm"]),
                "recent_median_grad_norm": _median(recent),
                "median_ratio": _median(d["ratio"]),
                "median_zero_frac": _median(d["zero"]),
                "max_zero_frac": max(d["zero"]) if d["zero"] else math.nan,
                "median_dead_unit_frac": _median(d["dead"]) if d["dead"] else None,
                "recent_dead_unit_frac": d["dead"][-1] if d["dead"] else None,
            }
        )
    norms = [rec.total_norm for rec in records]
    lnr = [rec.layer_norm_ratio for rec in finite]
    alerts: dict[tuple[str, str], dict[str, Any]] = {}
    for a in r.alerts:
        new = {"kind": a.kind, "severity": a.severity.value, "count": 0, "held_back": 0, "first_step": a.step}
        s = alerts.setdefault((a.kind, a.severity.value), {**new, "layers": []})
        s["count"] += 1
        s["held_back"] += a.held_back
        if a.layer is not None and a.layer not in s["layers"]:
            s["layers"].append(a.layer)
    truth: dict[str, float] = {}
    model = getattr(r.module, "model", None)
    if model is not None and any(type(m).__name__ == "ReLU" for m in model.modules()) and r.probe is not None:
        truth = archs.dead_unit_fractions(model, r.probe[0])
    history = getattr(getattr(r.monitor.health, "output", None), "history", None)
    activations = {
        name: {"last_dead_frac": samples[-1][1], "last_zero_frac": samples[-1][2], "last_saturated": samples[-1][3]}
        for name, samples in getattr(history, "activations", {}).items()
        if samples
    }
    losses = r.losses
    return {
        "arch": arch.name,
        "healthy": arch.healthy,
        "expect": list(arch.expect),
        "description": " ".join(arch.description.split()),
        "seconds": r.seconds,
        "steps": len(losses),
        "raised": None if r.raised is None else f"{type(r.raised).__name__}: {str(r.raised).splitlines()[0]}",
        "first_nonfinite_step": r.first_nonfinite_step,
        "loss": {"first": losses[0] if losses else None, "min": min(losses, default=None),
                 "max": max(losses, default=None), "last": losses[-1] if losses else None, "series": losses},
        "total_norm": {"first": norms[0] if norms else None, "median": _median(norms),
                       "max": max((v for v in norms if math.isfinite(v)), default=None),
                       "last": norms[-1] if norms else None, "series": norms},
        "layer_norm_ratio": {"median": _median(lnr), "max": max(lnr, default=None), "series": lnr},
        "layers": layers,
        "ground_truth_dead_units": truth,
        "activations": activations,
        "findings": [f.to_dict() for f in r.findings],
        "alerts": list(alerts.values()),
        "alert_stream": [{"step": a.step, "kind": a.kind, "severity": a.severity.value, "layer": a.layer,
                          "value": a.value, "threshold": a.threshold, "held_back": a.held_back} for a in r.alerts],
    }  # fmt: skip


def show(m: dict[str, Any]) -> None:
    """Print one run's table."""
    tag = "healthy" if m["healthy"] else f"pathology, expect {'/'.join(m['expect'])}"
    print(f"\n=== {m['arch']} ({tag}) — {m['description']}")
    loss, tn, lnr = m["loss"], m["total_norm"], m["layer_norm_ratio"]
    bad = m["first_nonfinite_step"]
    print(f"steps {m['steps']} in {m['seconds']:.1f}s; raised: {m['raised'] or '-'}"
          + (f" (first non-finite step {bad})" if bad is not None else ""))  # fmt: skip
    print(f"loss   first {_g(loss['first'])}  min {_g(loss['min'])}  max {_g(loss['max'])}  last {_g(loss['last'])}")
    print(f"|g|    first {_g(tn['first'])}  median {_g(tn['median'])}  max {_g(tn['max'])}  last {_g(tn['last'])};"
          f"  layer-norm ratio median {_g(lnr['median'])}  max {_g(lnr['max'])}")  # fmt: skip
    has_dead = any(lay["median_dead_unit_frac"] is not None for lay in m["layers"])
    width = max([len(lay["name"]) for lay in m["layers"]] + [5])
    head = f"  {'#':>3} {'layer':<{width}} {'class':<18} {'numel':>7} {'med|g|':>9} {'rec|g|':>9} {'g/p':>9} " \
           f"{'zero':>5} {'zmax':>5}" + (" dead" if has_dead else "")  # fmt: skip
    print(head)
    for i, lay in enumerate(m["layers"]):
        line = (f"  {i:>3} {lay['name']:<{width}} {lay['class'][:18]:<18} {lay['numel']:>7} "
                f"{lay['median_grad_norm']:>9.2e} {lay['recent_median_grad_norm']:>9.2e} {lay['median_ratio']:>9.2e} "
                f"{lay['median_zero_frac']:>5.2f} {lay['max_zero_frac']:>5.2f}")  # fmt: skip
        if has_dead:
            line += f" {_g(lay['median_dead_unit_frac']):>4}"
        print(line)
    if m["ground_truth_dead_units"]:
        truth = "  ".join(f"{k} {v:.2f}" for k, v in m["ground_truth_dead_units"].items())
        print(f"ground truth, dead ReLU units on a batch: {truth}")
    if m["activations"]:
        acts = "  ".join(f"{k} dead {v['last_dead_frac']:.2f}" + (f" sat {v['last_saturated']:.2f}"
                         if v["last_saturated"] is not None else "") for k, v in m["activations"].items())  # fmt: skip
        print(f"monitor's activation statistics (last sample): {acts}")
    for f in m["findings"]:
        layers = ", ".join(f["layers"][:5]) + (f" (+{len(f['layers']) - 5})" if len(f["layers"]) > 5 else "")
        fix = f["fixes"][0] if f["fixes"] else "-"
        print(f"FINDING {f['kind']}/{f['severity']} [{layers}] {f['summary']}\n        first fix: {fix}")
    if not m["findings"]:
        print("FINDING none")
    for a in m["alerts"]:
        layers = ", ".join(a["layers"][:4]) + (f" (+{len(a['layers']) - 4})" if len(a["layers"]) > 4 else "")
        print(f"ALERT   {a['kind']}/{a['severity']} x{a['count']} (held back {a['held_back']}) first at step "
              f"{a['first_step']}" + (f" [{layers}]" if layers else ""))  # fmt: skip
    if not m["alerts"]:
        print("ALERT   none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"runs (default: all): {', '.join(archs.ARCHS)}")
    parser.add_argument("--out", type=Path, help="write the data (with full series) to this JSON file")
    parser.add_argument(
        "--activation-stats",
        type=int,
        default=None,
        metavar="N",
        help="also sample the monitor's activation statistics every N steps (changes the findings)",
    )
    args = parser.parse_args()
    unknown = [name for name in args.names if name not in archs.ARCHS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(archs.ARCHS)}")
    logging.getLogger("lightning_gradhealth").setLevel(logging.CRITICAL + 1)  # alerts are collected, not printed
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    monitor_kwargs = {}
    if args.activation_stats:
        monitor_kwargs["activation_stats_every_n_steps"] = args.activation_stats
    out = []
    start = time.perf_counter()
    for arch in archs.iter_archs(args.names or None):
        m = measure(archs.run(arch, monitor_kwargs=monitor_kwargs), arch)
        show(m)
        out.append(m)
    print(f"\n{len(out)} runs in {time.perf_counter() - start:.0f}s")
    false_alarms = [(m["arch"], sorted({f["kind"] for f in m["findings"]} | {a["kind"] for a in m["alerts"]}))
                    for m in out if m["healthy"]]  # fmt: skip
    print("healthy runs, kinds raised (findings or alerts): "
          + "; ".join(f"{a}: {', '.join(k) or 'none'}" for a, k in false_alarms))  # fmt: skip
    missed = [(m["arch"], m["expect"], [f["kind"] for f in m["findings"]]) for m in out if not m["healthy"]]
    print("pathologies, expected -> found: "
          + "; ".join(f"{a}: {'/'.join(e)} -> {', '.join(f) or 'none'}" for a, e, f in missed))  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(out, indent=1, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
