"""One grading per kind: a per-step alert and an end-of-run finding are the same function on a window of records.

Pure Python, on synthetic records built with the package's own ``StepStats``/``LayerStats`` and ``History``: a run of
N identical records must be diagnosed with the kind and severity its every step is alerted with, and not at all where
the step is silent. A line moved on one side only, or a definition that differs between the two, fails here.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from lightning_gradhealth import Severity, Thresholds
from lightning_gradhealth.diagnosis.checks import check_global_norm, check_growth, check_record
from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.diagnosis.rules import diagnose
from lightning_gradhealth.schema.kinds import Kind
from lightning_gradhealth.schema.record import LayerStats, LossSummary, StepStats

#: The kinds graded both per step and at the end of the run.
GRADED = (Kind.EXPLODING, Kind.VANISHING, Kind.LAYER_IMBALANCE, Kind.DEAD, Kind.RATIO_HIGH, Kind.RATIO_LOW,
          Kind.DIVERGING)  # fmt: skip
N = 12  # records in the run
W, C = Severity.WARNING, Severity.CRITICAL


def _record(
    norms, *, total=None, param=10.0, units=None, dead=None, zero=None, loss=None, step=0
) -> StepStats:
    """A record of layers ``l0..`` in depth order with gradient norms ``norms`` (parameter norm ``param`` each)."""
    layers = tuple(
        LayerStats(name=f"l{j}", numel=640, grad_norm=g, param_norm=param, ratio=g / param,
                   zero_frac=0.0 if zero is None else zero[j],
                   units=units[j] if isinstance(units, list) else units,
                   dead_unit_frac=None if units is None else (0.0 if dead is None else dead[j]))
        for j, g in enumerate(norms)
    )  # fmt: skip
    positive = [g for g in norms if g > 0]
    return StepStats(step=step, global_step=step, epoch=0, batch_idx=step, optimizer_idx=0,
                     total_norm=math.sqrt(sum(g * g for g in norms)) if total is None else total, param_norm=20.0,
                     zero_frac=0.0, nan_count=0, inf_count=0,
                     layer_norm_ratio=max(positive) / min(positive) if positive else 1.0, no_grad_count=0,
                     layers=layers, loss_summary=loss)  # fmt: skip


def _rising(mean: float) -> LossSummary:
    """Every step's loss so far: started at 1, now ``mean`` (eight optimizer steps per record)."""
    return LossSummary(steps=8 * N, nonfinite=0, first=1.0, start=1.0, mean=mean, low=mean, high=mean, recent=mean,
                       window=8, peak=mean)  # fmt: skip


HEALTHY = [1.0, 0.8, 1.2, 0.9]
CASES = {  # name: (record, the run's early global norm or None, the kinds the step is alerted with)
    "healthy": (_record(HEALTHY), None, {}),
    "exploding": (_record(HEALTHY, total=500.0), None, {Kind.EXPLODING: W}),
    "exploding_critical": (_record(HEALTHY, total=5e3), None, {Kind.EXPLODING: C}),
    "grown_from_its_start": (_record(HEALTHY), 1.0 / 50, {Kind.EXPLODING: W}),
    "vanishing_global": (_record(HEALTHY, total=1e-4), None, {Kind.VANISHING: W}),
    "vanishing_layer": (_record([1.0, 1.0, 1.0, 1e-6]), None, {Kind.VANISHING: W, Kind.LAYER_IMBALANCE: C,
                                                              Kind.RATIO_LOW: W}),
    "vanishing_toward_the_input": (_record([1e-4, 1e-3, 1.0, 1.0]), None, {Kind.VANISHING: W}),
    "decay_worse_than_any_layer": (_record([5e-6, 1.0, 1.0, 1.0]), None, {Kind.VANISHING: C, Kind.RATIO_LOW: W}),
    "imbalance": (_record([1.0, 2e3, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0], total=10.0, param=1e2), None,
                  {Kind.LAYER_IMBALANCE: W}),
    "imbalance_critical": (_record([1.0, 2e4, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0], total=10.0, param=1e3), None,
                           {Kind.LAYER_IMBALANCE: C}),
    "dead_units": (_record(HEALTHY, units=64, dead=[0.3, 0.3, 0.3, 0.0]), None, {Kind.DEAD: W}),
    "dead_critical": (_record(HEALTHY, units=64, dead=[0.6, 0.6, 0.6, 0.3]), None, {Kind.DEAD: C}),
    "dead_weighted_by_units": (_record(HEALTHY, units=[200, 10, 10, 10], dead=[0.3, 0.0, 0.0, 0.0]), None,
                               {Kind.DEAD: W}),
    "one_dead_layer_of_many_units": (_record(HEALTHY, units=64, dead=[0.0, 0.6, 0.0, 0.0]), None, {}),
    "dead_inputs_not_units": (_record(HEALTHY, units=64, dead=[0.0, 1.0, 0.0, 0.0]), None, {}),
    "zero_entries": (_record(HEALTHY, zero=[0.7, 0.7, 0.7, 0.0]), None, {Kind.DEAD: W}),
    "ratio_high": (_record(HEALTHY, param=5e-3), None, {Kind.RATIO_HIGH: W}),
    "ratio_high_critical": (_record(HEALTHY, param=5e-5), None, {Kind.RATIO_HIGH: C}),
    "ratio_low": (_record([2e-5, 2e-5, 2e-5, 2e-5], total=1.0, param=1e2), None, {Kind.RATIO_LOW: W}),
    "diverging": (_record(HEALTHY, loss=_rising(3.0)), 1.0 / 50, {Kind.DIVERGING: W, Kind.EXPLODING: W}),
    "diverging_critical": (_record(HEALTHY, loss=_rising(6.0)), 1.0 / 50, {Kind.DIVERGING: C, Kind.EXPLODING: W}),
}


def _alerted(record: StepStats, early_norm: float | None, th: Thresholds) -> dict[str, Severity]:
    """The worst severity of each graded kind among the step's alerts (as the guard raises them)."""
    alerts = check_global_norm(record.total_norm, record.step, th, steps_seen=100)
    alerts += check_record(record, th, steps_seen=100)
    if early_norm is not None:
        summary = record.loss_summary
        loss, early_loss = (summary.mean, summary.first) if summary is not None else (None, None)
        alerts += check_growth(record.total_norm, loss, early_norm, early_loss, record, th)
    worst: dict[str, Severity] = {}
    for a in alerts:
        if a.kind in GRADED and a.severity.rank > worst.get(a.kind, Severity.OK).rank:
            worst[a.kind] = a.severity
    return worst


def _found(record: StepStats, early_norm: float | None, th: Thresholds) -> dict[str, Severity]:
    """The severity of each graded kind found over a run of ``N`` copies of ``record``."""
    history = History()
    history.early_norm = early_norm
    for step in range(N):
        history.add(replace(record, step=step, global_step=step, batch_idx=step))
    return {f.kind: f.severity for f in diagnose(history, th) if f.kind in GRADED}


@pytest.mark.parametrize("name", list(CASES))
def test_a_run_of_identical_records_is_found_as_its_every_step_is_alerted(name):
    record, early, expected = CASES[name]
    th = Thresholds()
    alerted = _alerted(record, early, th)
    assert alerted == expected, alerted  # the case is what it claims (the property below is not vacuous)
    assert _found(record, early, th) == alerted


def test_a_line_moved_on_one_side_shows():
    """The property can fail: a finding graded on other lines than the step's disagrees with it."""
    record, early, _ = CASES["dead_units"]
    assert _found(record, early, Thresholds(dead_units_warning=0.4)) == {}
    assert _alerted(record, early, Thresholds()) == {Kind.DEAD: W}


def test_a_state_must_last_through_the_window_to_be_found():
    """Persistence is the window's reduction: dead units in every other record alert on those steps, find nothing."""
    th = Thresholds()
    live, dying = _record(HEALTHY, units=64), _record(HEALTHY, units=64, dead=[0.0, 0.9, 0.9, 0.6])
    assert _alerted(dying, None, th) == {Kind.DEAD: C} and _alerted(live, None, th) == {}
    history = History()
    for step in range(N):
        history.add(replace(dying if step % 2 else live, step=step, global_step=step))
    assert [f for f in diagnose(history, th) if f.kind == Kind.DEAD] == []
    for step in range(N, 2 * N):  # dead from now on: in every recent record
        history.add(replace(dying, step=step, global_step=step))
    (finding,) = [f for f in diagnose(history, th) if f.kind == Kind.DEAD]
    assert finding.severity is C and finding.layers == ("l1", "l2", "l3")
    assert finding.evidence["dead_unit_frac"] == {"l1": 0.9, "l2": 0.9, "l3": 0.6}
