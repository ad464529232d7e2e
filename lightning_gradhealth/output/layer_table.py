"""The report's per-layer table: one row per layer in depth order, with the statistics ``LAYER_METRICS`` shows."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_gradhealth.config.thresholds import Severity
from lightning_gradhealth.diagnosis.grading import recent_medians
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.diagnosis.rules import Finding
from lightning_gradhealth.output.safe_io import md_code, md_text
from lightning_gradhealth.schema.metrics import LAYER_METRICS

__all__ = ["ICON", "LAYER_ROWS", "extra_columns", "layer_rows", "layer_table", "num"]

#: Layers shown at each end of a long table (the middle is elided).
LAYER_ROWS = 20
ICON = {Severity.OK: "✅", Severity.WARNING: "⚠️", Severity.CRITICAL: "❌"}


def _kinds_by_layer(inventory: Any) -> dict[str, str]:
    """Layer name -> kind label.

    From a :class:`~lightning_gradhealth.model.inventory.ModelInventory` (``"linear (Linear)"``), or from a mapping of
    layer name to a kind or to a dict with a ``"kind"`` or ``"type"`` key.
    """
    if inventory is None:
        return {}
    layers = getattr(inventory, "layers", None)
    if layers is not None and not isinstance(inventory, Mapping):  # a ModelInventory (duck-typed: no torch here)
        out = {}
        maps = getattr(inventory, "feature_maps", {})
        for info in layers:
            kind, cls = getattr(info, "kind", ""), getattr(info, "module_class", "")
            kernel, size = getattr(info, "kernel_size", None), maps.get(info.name)
            if kernel:  # "conv 3x3 on 1x1 maps": padding taps are structure there
                kind += " " + "x".join(map(str, kernel)) + (f" on {'x'.join(map(str, size))} maps" if size else "")
            out[info.name] = f"{kind} ({cls})" if kind and cls else str(kind or cls)
        return out
    out = {}
    for name, entry in inventory.items():
        if isinstance(entry, Mapping):
            entry = entry.get("kind", entry.get("type"))
        out[name] = "" if entry is None else str(entry)
    return out


def layer_rows(history: History, findings: Sequence[Finding], inventory: Any = None) -> list[dict[str, Any]]:
    """One row per layer, in depth (definition) order.

    Each row: ``layer``, ``kind`` (from ``inventory``: a :class:`~lightning_gradhealth.model.inventory.ModelInventory`,
    giving ``"linear (Linear)"``, or a mapping of layer name to its kind or to a dict with a ``"kind"`` or
    ``"type"`` key; ``""`` for a layer it does not name), ``last_grad_norm`` (the last kept record;
    ``nan`` where the layer had no gradient), ``median_ratio`` (grad/param, over the recent records the rules
    look at), ``zero_frac`` (last record) and ``status``: the worst severity of the findings naming the layer,
    else ``ok``.
    """
    kinds = _kinds_by_layer(inventory)
    worst: dict[str, Severity] = {}
    for f in findings:
        for name in f.layers:
            worst[name] = Severity.worst((worst.get(name, Severity.OK), f.severity))
    norms = history.layer_norm[-1] if history.layer_norm else []
    zeros = history.layer_zero_frac[-1] if history.layer_zero_frac else []
    ratios = recent_medians(history, "ratio")
    extra = extra_columns(history)
    return [
        {
            "layer": name,
            "kind": kinds.get(name, ""),
            "last_grad_norm": norms[j] if j < len(norms) else math.nan,
            "median_ratio": ratios[j],
            "zero_frac": zeros[j] if j < len(zeros) else math.nan,
            **{key: last[j] if j < len(last) else math.nan for key, (_, last) in extra.items()},
            "status": worst.get(name, Severity.OK),
        }
        for j, name in enumerate(history.layer_names)
    ]


def extra_columns(history: History) -> dict[str, tuple[str, list[float]]]:
    """The per-layer statistics whose last value the table shows (``report=True`` in ``LAYER_METRICS``).

    Returns:
        ``{"last_<series>": (title, last row)}``.
    """
    return {
        f"last_{m.history}": (m.title, rows[-1] if (rows := history.layers.get(m.history)) else [])
        for m in LAYER_METRICS
        if m.report and m.history is not None
    }


def num(v: float, spec: str = ".3g") -> str:
    """``v`` formatted for a table (``n/a`` for NaN)."""
    return "n/a" if math.isnan(v) else format(v, spec)


def layer_table(history: History, findings: Sequence[Finding], inventory: Any) -> list[str]:
    """The Markdown lines of the per-layer table (the middle of a long one elided)."""
    rows = layer_rows(history, findings, inventory)
    if not rows:
        return []
    with_kind = inventory is not None
    extra = extra_columns(history)
    head = ["#", "Layer", *(["Kind"] if with_kind else []), "Last grad norm", "Median grad/param ratio (recent)",
            "Zero fraction (last)", *(f"{title} (last)".capitalize() for title, _ in extra.values()),
            "Status"]  # fmt: skip
    lines = [
        "",
        "### Layers (depth order)",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    shown: list[int | None] = list(range(len(rows)))
    if len(rows) > 2 * LAYER_ROWS:
        shown = [*range(LAYER_ROWS), None, *range(len(rows) - LAYER_ROWS, len(rows))]
    for i in shown:
        if i is None:
            more = len(rows) - 2 * LAYER_ROWS
            lines.append("| … | " + " | ".join([f"… {more} more layers …", *[""] * (len(head) - 2)]) + " |")
            continue
        r = rows[i]
        status = f"{ICON[r['status']]} {r['status'].value}"
        cells = [str(i), md_code(r["layer"]), *([md_text(r["kind"])] if with_kind else []), num(r["last_grad_norm"]),
                 num(r["median_ratio"]), num(r["zero_frac"], ".1%"), *(num(r[k]) for k in extra),
                 status]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines
