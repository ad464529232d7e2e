"""One grading function per kind, shared by the per-step alerts and the end-of-run findings.

Each function takes a :class:`Window` of observations (the per-layer and global values of one or more records, in
depth order, with the layers' names and the model's inventory) and the :class:`~lightning_gradhealth.config.thresholds.
Thresholds`, and returns a :class:`Verdict` (the kind, every line crossed and by what, the layers concerned, the
evidence) or ``None``. A per-step alert is the function on a window of ONE record
(:meth:`Window.of_record`, :mod:`~lightning_gradhealth.diagnosis.checks`); a finding is the same function on the
recent records of the history (:meth:`Window.of_history`, :mod:`~lightning_gradhealth.diagnosis.rules`): per-layer
values are reduced over the window by their median (the minimum where a state must hold in every record, as dead
units must), and a per-layer series needs :attr:`Window.min_records` values to be judged at all.

The kinds graded here: :func:`exploding`, :func:`vanishing`, :func:`imbalance`, :func:`dead`, :func:`ratio` (high
and low) and :func:`diverging`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_gradhealth.config.thresholds import Severity, Thresholds
from lightning_gradhealth.diagnosis.grading import (
    baseline,
    depth_decay,
    layer_spread,
    layers_of,
    median,
    norm_growth,
    series,
    worst_of,
)
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.model.inventory import ModelInventory
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.schema.record import StepStats

__all__ = [
    "DEPTH_DECAY",
    "Hit",
    "Verdict",
    "Window",
    "dead",
    "diverging",
    "exploding",
    "imbalance",
    "ratio",
    "vanishing",
]

#: The check name of a depth profile decaying toward the input (its lines: ``1 / layer_norm_ratio_*``).
DEPTH_DECAY = "depth_decay"

Rows = tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class Window:
    """The observations a kind is graded on: one record (an alert) or the recent records of a run (a finding).

    Attributes:
        names: The layers, in depth (definition) order.
        norm: Per record, each layer's gradient norm (``nan``: no gradient).
        ratio: Per record, each layer's grad/param ratio (``nan`` where undefined: no parameter norm).
        dead_units: Per record, each layer's dead-unit fraction (``nan`` where its units are not known).
        zero_frac: Per record, each layer's fraction of exactly-zero gradient entries.
        spread: Per record, its own largest over smallest layer norm (what a record without comparable layers shows).
        total_norm: Per record, the global gradient norm (empty: the global norm is graded elsewhere).
        total_zero_frac: Per record, the global zero fraction (what a record without layers shows).
        latest_norm: The global norm of the latest records (the smallest of the last three: all above a line).
        early_norm: The run's own early global norm (its baseline).
        growth: ``latest_norm / early_norm`` (``nan`` when either is unknown).
        loss: The smoothed training loss of the records a rise must last over (the rise is their minimum).
        early_loss: The run's early loss.
        steps: The steps of the records.
        sizes: Per layer, its units and gradient entries (``None`` where unknown): its weight in the model's dead
            fraction.
        inventory: What the model is made of (``None``: every layer is compared).
        sparse: Layers whose gradients are sparse by design (embeddings): never dead.
        min_records: How many values a per-layer series needs to be judged (1 for a record).
    """

    names: tuple[str, ...] = ()
    norm: Rows = ()
    ratio: Rows = ()
    dead_units: Rows = ()
    zero_frac: Rows = ()
    spread: tuple[float, ...] = ()
    total_norm: tuple[float, ...] = ()
    total_zero_frac: tuple[float, ...] = ()
    latest_norm: float = math.nan
    early_norm: float = math.nan
    growth: float = math.nan
    loss: tuple[float, ...] = ()
    early_loss: float = math.nan
    steps: tuple[int, ...] = ()
    sizes: tuple[tuple[int | None, int | None], ...] = ()
    inventory: ModelInventory | None = None
    sparse: frozenset[str] = frozenset()
    min_records: int = 1

    @classmethod
    def of_record(
        cls, record: StepStats, inventory: ModelInventory | None = None, sparse: frozenset[str] = frozenset()
    ) -> Window:
        """The per-layer values of one record (its global norm is graded on every step, by the caller)."""
        lays = record.layers
        units = tuple(math.nan if lay.dead_unit_frac is None else lay.dead_unit_frac for lay in lays)
        return cls(
            names=tuple(lay.name for lay in lays),
            norm=(tuple(lay.grad_norm for lay in lays),),
            ratio=(tuple(lay.ratio if lay.param_norm > 0 else math.nan for lay in lays),),
            dead_units=(units,),
            zero_frac=(tuple(lay.zero_frac for lay in lays),),
            spread=(record.layer_norm_ratio,),
            total_zero_frac=(record.zero_frac,),
            steps=(record.step,),
            sizes=tuple((lay.units, lay.numel) for lay in lays),
            inventory=inventory,
            sparse=sparse,
        )

    @classmethod
    def of_norms(
        cls, total_norm: float, early_norm: float = math.nan, loss: float | None = None, early_loss: float | None = None
    ) -> Window:
        """The global norm of one step (or the median of the latest), against the run's early levels when known."""
        finite_loss = loss is not None and math.isfinite(loss)
        return cls(
            total_norm=(total_norm,),
            latest_norm=total_norm,
            early_norm=early_norm,
            growth=norm_growth(total_norm, early_norm),
            loss=(loss,) if finite_loss else (),  # type: ignore[arg-type]
            early_loss=early_loss if early_loss is not None and finite_loss else math.nan,
        )

    @classmethod
    def of_history(
        cls,
        history: History,
        inventory: ModelInventory | None = None,
        sparse: frozenset[str] = frozenset(),
        min_records: int = 3,
    ) -> Window:
        """The recent records of ``history`` (:meth:`History.recent`); the latest level from its last three norms."""
        recent = history.recent()
        finite = [v for v in history.total_norm if math.isfinite(v)]
        latest = min(finite[-3:]) if len(finite) >= 3 else math.nan  # the last records all above it: now
        # the guard's baseline (the run's first steps, computed once), else the first records' (a run read back)
        early = history.early_norm if history.early_norm is not None else baseline(history.total_norm)

        def rows(which: list[list[float]]) -> Rows:
            return tuple(tuple(row) for row in which[recent])

        return cls(
            names=tuple(history.layer_names),
            norm=rows(history.layer_norm),
            ratio=rows(history.layer_ratio),
            dead_units=rows(history.layer_dead_units),
            zero_frac=rows(history.layer_zero_frac),
            spread=tuple(history.layer_norm_ratio[recent]),
            total_norm=tuple(history.total_norm[recent]),
            total_zero_frac=tuple(history.zero_frac[recent]),
            latest_norm=latest,
            early_norm=early,
            growth=norm_growth(latest, early),
            steps=tuple(history.steps[recent]),
            sizes=tuple(history.sizes.get(name, (None, None)) for name in history.layer_names),
            inventory=inventory,
            sparse=sparse,
            min_records=min_records,
        )

    def column(self, which: Rows, j: int) -> list[float]:
        """Layer ``j``'s finite values over the window's records (``which``: one of the per-layer tables)."""
        return series(which, j)

    def medians(self, which: Rows) -> list[float]:
        """Per layer, the median of its finite values over the window (``nan`` where none)."""
        return [median(series(which, j)) for j in range(len(self.names))]


@dataclass(frozen=True)
class Hit:
    """One line crossed.

    Attributes:
        check: The line's name (a :class:`Thresholds` check such as ``layer_norm_low``, or :data:`DEPTH_DECAY`).
        severity: ``warning`` or ``critical``.
        value: The value that crossed it.
        line: The line crossed.
        layer: The layer it is about (``None``: the whole model).
    """

    check: str
    severity: Severity
    value: float
    line: float
    layer: str | None = None


@dataclass(frozen=True)
class Verdict:
    """One kind's grade on a window.

    Attributes:
        kind: A :class:`~lightning_gradhealth.schema.kinds.Kind`.
        hits: Every line crossed (global ones first, then per layer in depth order).
        layers: The layers concerned, in depth order.
        evidence: The numbers behind the grade.
    """

    kind: str
    hits: tuple[Hit, ...]
    layers: tuple[str, ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def worst(self) -> Hit:
        """The first of the most severe hits."""
        return max(self.hits, key=lambda h: h.severity.rank)

    @property
    def severity(self) -> Severity:
        """The worst severity of the hits: the kind's severity."""
        return worst_of(h.severity for h in self.hits)

    @property
    def value(self) -> float:
        """The worst hit's value."""
        return self.worst.value

    @property
    def line(self) -> float:
        """The line the worst hit crossed."""
        return self.worst.line

    def of(self, *checks: str) -> list[Hit]:
        """The hits of ``checks``."""
        return [h for h in self.hits if h.check in checks]


def _hit(th: Thresholds, check: str, value: float, *, high: bool, layer: str | None = None) -> Hit | None:
    """``value`` against the ``<check>_warning`` / ``<check>_critical`` lines; ``None`` when it crosses neither."""
    sev = th.grade_high(check, value) if high else th.grade_low(check, value)
    if sev is Severity.OK:
        return None
    return Hit(check, sev, value, getattr(th, f"{check}_{sev.value}"), layer)


def _verdict(kind: str, hits: Sequence[Hit | None], **kw: Any) -> Verdict | None:
    kept = tuple(h for h in hits if h is not None)
    return Verdict(kind, kept, **kw) if kept else None


def exploding(w: Window, th: Thresholds) -> Verdict | None:
    """The global norm too large now (the window's median, or its latest level), or grown far above the run's own.

    Lines: ``total_norm_high`` on the larger of the median and the latest level (for one record, its norm), and
    ``norm_growth`` on :attr:`Window.growth`.
    """
    level, latest = median(w.total_norm), w.latest_norm
    finite = [v for v in (level, latest) if math.isfinite(v)]
    value = max(finite) if finite else math.nan
    hits = [_hit(th, "total_norm_high", value, high=True), _hit(th, "norm_growth", w.growth, high=True)]
    if not any(hits):
        return None
    norms = [(n, name) for n, name in zip(w.medians(w.norm), w.names, strict=True) if math.isfinite(n)]
    top = [name for _, name in sorted(norms, reverse=True)[:3]]  # largest first
    return _verdict(
        Kind.EXPLODING, hits, layers=tuple(name for name in w.names if name in top),
        evidence={"median_total_norm": level, "latest_total_norm": latest, "early_total_norm": w.early_norm,
                  "growth": w.growth, "value": value, "largest_layers": top},
    )  # fmt: skip


def _depth(w: Window) -> tuple[list[tuple[str, float]], tuple[float, float, float] | None]:
    """The main path's layers with a positive median norm, and their depth decay (``None`` with fewer than two)."""
    path = layers_of(w.names, w.inventory, main_path=True)
    norms = w.medians(w.norm)
    present = [(w.names[j], norms[j]) for j in path if math.isfinite(norms[j]) and norms[j] > 0]
    return present, depth_decay([n for _, n in present]) if len(present) >= 2 else None


def _decay_hit(decay: float, th: Thresholds) -> Hit | None:
    """The first layers' share of the last layers' gradient against ``1 / layer_norm_ratio_*``."""
    for sev in (Severity.CRITICAL, Severity.WARNING):
        line = 1.0 / getattr(th, f"layer_norm_ratio_{sev.value}")
        if decay < line:
            return Hit(DEPTH_DECAY, sev, decay, line)
    return None


def vanishing(w: Window, th: Thresholds) -> Verdict | None:
    """Gradients too small: the global norm, a main-path layer, or the depth profile decaying toward the input.

    Lines: ``total_norm_low`` on the median global norm; ``layer_norm_low`` on each main-path layer's median norm
    (exactly zero is dead units or no gradient, not vanishing); :data:`DEPTH_DECAY`, the median norms' first quarter
    over their last, on ``1 / layer_norm_ratio_*``.
    """
    total = median(w.total_norm)
    present, profile = _depth(w)
    decay_hit = _decay_hit(profile[2], th) if profile is not None else None
    tiny = [_hit(th, "layer_norm_low", n, high=False, layer=name) for name, n in present]
    hits = [_hit(th, "total_norm_low", total, high=False), decay_hit, *tiny]
    if not any(hits):
        return None
    small = tuple(h.layer for h in tiny if h is not None and h.layer is not None)
    evidence: dict[str, Any] = {"median_total_norm": total}
    layers = small
    if profile is not None:
        early, late, decay = profile
        evidence |= {"early_over_late": decay, "early_norm": early, "late_norm": late, "layer_norms": dict(present)}
        if decay_hit is not None:
            layers = tuple(name for name, n in present if n < late / th.layer_norm_ratio_warning) or small
    return _verdict(Kind.VANISHING, hits, layers=layers, evidence=evidence)


def imbalance(w: Window, th: Thresholds) -> Verdict | None:
    """Comparable layers (the repeated blocks' weight matrices) whose gradient norms span too large a factor.

    Line: ``layer_norm_ratio`` on the median over the window of each record's spread (its own layer-norm ratio
    where fewer than two comparable layers have a norm). A depth profile decaying toward the input is vanishing,
    not an imbalance: then ``None``.
    """
    _, profile = _depth(w)
    if profile is not None and _decay_hit(profile[2], th) is not None:
        return None
    blocks = layers_of(w.names, w.inventory, main_path="blocks")
    spreads = []
    for i, own in enumerate(w.spread):
        spread = layer_spread(w.norm[i], blocks) if i < len(w.norm) and w.names else None
        spreads.append(own if spread is None else spread)
    value = median(spreads)
    hit = _hit(th, "layer_norm_ratio", value, high=True)
    if hit is None:
        return None
    norms = w.medians(w.norm)
    compared = [(w.names[j], norms[j]) for j in blocks if j < len(norms) and math.isfinite(norms[j])]
    ends = (min(compared, key=lambda p: p[1])[0], max(compared, key=lambda p: p[1])[0]) if compared else ()
    return Verdict(Kind.LAYER_IMBALANCE, (hit,), layers=ends,
                   evidence={"median_layer_norm_ratio": value, "layers_compared": len(blocks)})  # fmt: skip


def _sizes(w: Window, j: int) -> tuple[float, float]:
    """Layer ``j``'s weight in the model's dead fraction: its units and its entries (1 where unknown)."""
    units, numel = w.sizes[j] if j < len(w.sizes) else (None, None)
    return float(units or 1), float(numel or 1)


def _dead_rows(w: Window, candidates: list[int]) -> tuple[str, list[float]]:
    """Per record, the model's dead fraction: over the units where a unit statistic is known, else over the entries.

    Units: a candidate's dead-unit fraction weighted by its units (a layer whose every row is zero while its bias
    lives has dead inputs, upstream, not dead units). Without a unit statistic (FSDP1 shards), the exactly-zero
    entries of the candidates that are no convolution (padding taps are zeros) weighted by their entries; without
    layers, the record's own zero fraction.
    """
    inv = w.inventory
    by_units: list[float] = []
    by_entries: list[float] = []
    for i in range(len(w.norm)):
        row, norms = w.dead_units[i], w.norm[i]
        alive = [j for j in candidates
                 if j < len(row) and math.isfinite(row[j]) and not (row[j] >= 1.0 and norms[j] > 0)]  # fmt: skip
        if alive:
            total = sum(_sizes(w, j)[0] for j in alive)
            by_units.append(sum(row[j] * _sizes(w, j)[0] for j in alive) / total)
            continue
        dense = [j for j in candidates if (inv is None or inv.kind_of(w.names[j]) != "conv")
                 and math.isfinite(w.zero_frac[i][j])]  # fmt: skip
        total = sum(_sizes(w, j)[1] for j in dense)
        by_entries.append(sum(w.zero_frac[i][j] * _sizes(w, j)[1] for j in dense) / total if total else 0.0)
    if by_units:
        return "dead_units", by_units
    if w.names:
        return "zero_frac", by_entries
    return "zero_frac", [v for v in w.total_zero_frac if math.isfinite(v)]


def dead(w: Window, th: Thresholds) -> Verdict | None:
    """Dead units: output rows or channels whose whole gradient is exactly zero, in every record of the window.

    Line: ``dead_units`` on the model's dead-unit fraction (:func:`_dead_rows`: the weight matrices but embeddings and
    sparse layers, weighted by their units), or ``zero_frac`` on its exactly-zero entries where no unit statistic is
    known; the smallest over the window (a state that lasts). The layers named: each above the line in every record.
    """
    inv = w.inventory
    embeddings = set(w.sparse) | (set(inv.of_kind("embedding")) if inv is not None else set())
    weights = set(inv.comparable(w.names) if inv is not None else w.names)
    candidates = [j for j, name in enumerate(w.names) if name in weights and name not in embeddings]
    check, rows = _dead_rows(w, candidates)
    if not rows or len(rows) < min(w.min_records, max(len(w.norm), len(w.total_zero_frac))):
        return None
    hit = _hit(th, check, min(rows), high=True)
    if hit is None:
        return None
    line = getattr(th, f"{check}_warning")
    named: dict[str, float] = {}
    for j in candidates:
        values = w.column(w.dead_units if check == "dead_units" else w.zero_frac, j)
        if len(values) < w.min_records or min(values) <= line:
            continue
        if check == "dead_units" and min(values) >= 1.0 and min(w.column(w.norm, j), default=0.0) > 0:
            continue  # dead inputs (upstream), not dead units
        if check == "zero_frac" and inv is not None and inv.kind_of(w.names[j]) == "conv":
            continue
        named[w.names[j]] = math.fsum(values) / len(values)  # (statistics.mean: exact fractions, 20 µs a call)
    return Verdict(Kind.DEAD, (hit,), layers=tuple(named), evidence={"dead_unit_frac": named, check: hit.value})


def ratio(w: Window, th: Thresholds, *, high: bool) -> Verdict | None:
    """A weight matrix's grad/param ratio (its median over the window) too large (``high``) or too small.

    Lines: ``grad_param_ratio_high`` / ``grad_param_ratio_low``; a ratio of exactly zero (no gradient) is not low.
    """
    check = "grad_param_ratio_high" if high else "grad_param_ratio_low"
    hits = []
    for j in layers_of(w.names, w.inventory, main_path=False):
        values = w.column(w.ratio, j)
        if len(values) < w.min_records or not values:
            continue
        m = statistics.median(values)
        if m > 0 or high:
            hits.append(_hit(th, check, m, high=high, layer=w.names[j]))
    kept = [h for h in hits if h is not None]
    return _verdict(Kind.RATIO_HIGH if high else Kind.RATIO_LOW, kept,
                    layers=tuple(h.layer for h in kept if h.layer is not None),
                    evidence={"median_ratio": {h.layer: h.value for h in kept}})  # fmt: skip


def diverging(w: Window, th: Thresholds) -> Verdict | None:
    """Training diverges: the smoothed loss risen ``loss_rise`` times its early level, with the global norm grown.

    Line: ``loss_rise`` on the smallest of the window's losses over :attr:`Window.early_loss` (a rise that lasts
    through the window), when the norm grew at least ``loss_rise_warning`` times too (or its growth is unknown).
    """
    losses = [v for v in w.loss if math.isfinite(v)]
    if not losses or not (w.early_loss > 0):
        return None
    rise = min(losses) / w.early_loss
    if math.isfinite(w.growth) and w.growth < th.loss_rise_warning:
        return None
    return _verdict(
        Kind.DIVERGING, [_hit(th, "loss_rise", rise, high=True)],
        evidence={"loss_rise": rise, "early_loss": w.early_loss, "late_loss": losses[-1], "norm_growth": w.growth},
    )  # fmt: skip
