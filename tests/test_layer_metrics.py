"""Per-layer statistics are declared once (schema/metrics.py LAYER_METRICS): the loggers' keys, the event-file
reader and the history follow that table, so a new statistic cannot go out of line in one of them."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from lightning_gradhealth import GradStatsEngine, build_layout
from lightning_gradhealth.diagnosis.history import LAYER_SERIES, History
from lightning_gradhealth.schema.metrics import LAYER_KEYS, LAYER_METRICS, metrics_to_record, record_to_metrics
from lightning_gradhealth.schema.record import LayerStats
from lightning_gradhealth.stats.engine import StepMeta


def full_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].weight[0].zero_()  # a dead unit (its row's gradient is exactly zero)
        model[0].bias[0] = -10.0
    model(torch.randn(16, 6)).pow(2).mean().backward()
    engine = GradStatsEngine(stats="full")
    pending = engine.compute(build_layout(model.named_parameters()))
    return engine.finish(pending, StepMeta(step=3, global_step=3, epoch=0, batch_idx=3))


def test_every_layer_field_the_table_names_exists_and_the_groups_are_its_own() -> None:
    fields = {f.name for f in dataclasses.fields(LayerStats)}
    assert all(m.field in fields for m in LAYER_METRICS)
    assert sorted(k for keys in LAYER_KEYS.values() for k in keys) == sorted(m.key for m in LAYER_METRICS)
    assert len({m.key for m in LAYER_METRICS}) == len(LAYER_METRICS)


def test_logged_keys_read_back_into_the_same_layer_values() -> None:
    record = dataclasses.replace(
        full_record(), layers=tuple(dataclasses.replace(lay, update_ratio=0.01 * (i + 1))
                                    for i, lay in enumerate(full_record().layers))
    )
    logged = record_to_metrics(record)
    back = metrics_to_record(logged, step=record.step)
    assert [lay.name for lay in back.layers] == [lay.name for lay in record.layers]
    checked = 0
    for got, want in zip(back.layers, record.layers, strict=True):
        for m in LAYER_METRICS:
            value = getattr(want, m.field)
            if value is None or (m.when == "nonzero" and not value):
                assert f"{m.key}/{want.name}" not in logged
                continue
            assert logged[f"{m.key}/{want.name}"] == float(value)
            assert getattr(got, m.field) == value
            checked += 1
    assert checked >= 2 * 9  # norm, ratio, zeros, dead units (one layer), update, the four of stats="full"


def test_the_history_keeps_one_series_per_kept_statistic() -> None:
    record = full_record()
    history = History()
    history.add(record)
    assert set(history.layers) == set(LAYER_SERIES) == {m.history for m in LAYER_METRICS if m.history}
    for name, field_name in LAYER_SERIES.items():
        row = history.layers[name][-1]
        for j, lay in enumerate(record.layers):
            value = getattr(lay, field_name)
            assert (math.isnan(row[j]) and value is None) or row[j] == value
    assert history.layer_dead_units is history.layers["dead_units"]
    assert history.layer_series(record.layers[0].name, "dead_units") == [record.layers[0].dead_unit_frac]


def test_the_layout_and_the_report_follow_the_table(monkeypatch) -> None:
    """Marking a statistic `chart=True, report=True` in LAYER_METRICS alone gives it TensorBoard charts and a column."""
    from lightning_gradhealth.output import layer_table, visuals
    from lightning_gradhealth.schema import metrics

    record = full_record()
    history = History()
    history.add(record)
    before = visuals.custom_scalars_layout(layer_names=["0", "2"])["gradient health: per layer"]
    assert not any("dead units" in title for title in before)
    assert "last_dead_units" not in layer_table.layer_rows(history, [])[0]
    marked = tuple(dataclasses.replace(m, chart=True, report=True) if m.key == metrics.GRAD_DEAD_UNITS else m
                   for m in LAYER_METRICS)
    monkeypatch.setattr(visuals, "LAYER_METRICS", marked)
    monkeypatch.setattr(layer_table, "LAYER_METRICS", marked)
    after = visuals.custom_scalars_layout(layer_names=["0", "2"])["gradient health: per layer"]
    assert any(title.startswith("dead units") for title in after)
    rows = layer_table.layer_rows(history, [])
    assert rows[0]["last_dead_units"] == record.layers[0].dead_unit_frac
    table = "\n".join(layer_table.layer_table(history, [], None))
    assert "Dead units (last)" in table
