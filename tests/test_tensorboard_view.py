"""TensorBoard at a glance with default settings: the gradient-flow figure names the unhealthy layers.

A default run of a deep sigmoid MLP (vanishing gradients) draws the figure at its first computed step and at the end,
coloured by the diagnosis; the per-layer custom-scalars charts hold a few layers each; and, where a browser is
installed, a real TensorBoard served on loopback is photographed (``tests/tensorboard_screenshot.py``).
"""

from __future__ import annotations

import re

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard_screenshot import browser, screenshot, train

from lightning_gradhealth.config.thresholds import Thresholds
from lightning_gradhealth.output.visuals import (
    LAYERS_PER_CHART,
    custom_scalars_layout,
    flagged_layers,
    gradient_flow_figure,
    reference_lines,
)
from lightning_gradhealth.schema.metrics import GRAD_NORM, GRAD_RATIO, metric_key

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("tb")
    monitor = train(log_dir, steps=40)  # log_every_n_steps=5: computed steps 4, 9, ..., 39
    return log_dir, monitor


def test_a_default_run_draws_the_figure_first_and_last(default_run):
    log_dir, monitor = default_run
    acc = EventAccumulator(str(log_dir / "deep_sigmoid"), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("grad_health/gradient_flow")
    # "auto": the first computed step past the warm-up (10 steps), then as the time share allows (none in a run this
    # short), then the last record
    assert images[0].step == 9 and images[-1].step == 39
    assert all(image.encoded_image_string[:8] == PNG for image in images)
    vanishing = next(f for f in monitor.findings if f.kind == "vanishing")
    assert "net.0" in vanishing.layers


def test_the_figure_names_and_colours_the_unhealthy_layers(default_run):
    _, monitor = default_run
    record = monitor.last_record
    flagged = flagged_layers(record, Thresholds())
    assert "net.0" in flagged and flagged["net.0"][0] == "critical"  # the first layer's gradient vanished
    assert "net.24" not in flagged  # the output layer is healthy
    figure = gradient_flow_figure(record, flagged, reference_lines(Thresholds()))
    ax = figure.axes[0]
    assert "unhealthy layer" in ax.get_title() and "net.0" in ax.get_title()
    colours = {t.get_text(): t.get_color() for t in ax.get_xticklabels()}
    assert colours["net.0"] == "tab:red" and colours["net.24"] == "black"
    assert ax.get_yscale() == "log"
    notes = " ".join(t.get_text() for t in ax.texts)
    assert "net.0: vanishing" in notes and "vanishing, critical (< 1e-07)" in notes


def test_a_healthy_record_flags_nothing(default_run):
    _, monitor = default_run
    assert flagged_layers(monitor.last_record, Thresholds(layer_norm_low_warning=1e-30, layer_norm_low_critical=1e-31,
                                                          grad_param_ratio_low_warning=1e-30,
                                                          grad_param_ratio_low_critical=1e-31)) == {}  # fmt: skip


def test_per_layer_charts_hold_a_few_layers_each():
    names = [f"blocks.{i}.fc" for i in range(27)]
    layout = custom_scalars_layout(layer_names=names)
    charts = layout["gradient health: per layer"]
    norm_charts = {title: spec for title, spec in charts.items() if title.startswith("gradient norm,")}
    assert len(norm_charts) == 4  # 27 layers, 8 a chart
    seen = []
    for kind, patterns in norm_charts.values():
        assert kind == "Multiline" and len(patterns) <= LAYERS_PER_CHART
        seen += [name for name in names if any(re.search(p, metric_key(GRAD_NORM, name)) for p in patterns)]
    assert seen == names  # every layer in exactly one chart, in depth order
    (first,) = [p for t, (_, ps) in norm_charts.items() if t.startswith("gradient norm, layers 1-8") for p in ps[:1]]
    assert re.search(first, "grad_norm/blocks.0.fc/opt1")  # several optimizers
    assert not re.search(first, "grad_norm/blocks.0.fc2") and not re.search(first, metric_key(GRAD_RATIO, names[0]))


@pytest.mark.skipif(browser() is None, reason="no chromium/google-chrome on the PATH")
def test_a_real_tensorboard_photographed(default_run, tmp_path):
    log_dir, _ = default_run
    out = screenshot(log_dir, tmp_path / "tensorboard.png", browser())
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 20_000  # a rendered page, not a blank one


@pytest.mark.parametrize(
    ("value", "error"), [("always", TypeError), (0, ValueError), (2.5, TypeError), (True, TypeError)]
)
def test_figure_every_n_steps_is_auto_an_int_or_none(value, error):
    from lightning_gradhealth import GradientHealthMonitor

    with pytest.raises(error, match=r"`figure_every_n_steps` must be 'auto', an int >= 1 or None, got "):
        GradientHealthMonitor(figure_every_n_steps=value)
    assert GradientHealthMonitor().figure_every_n_steps == "auto"
    assert GradientHealthMonitor(figure_every_n_steps=None).figure_every_n_steps is None
