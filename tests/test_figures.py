"""The one gradient-flow figure (TensorBoard and the report alike): readable at GPT-2 depth, the NaN step's own step.

Figures are drawn on matplotlib's Agg canvas and checked on their artists with the renderer's own text extents:
the title inside the canvas, no two labels overlapping, integer ticks named by layer, the worst layers named, a
legend mapping index to layer. A real Trainer run with a NaN checks the step on the figure TensorBoard and the report
get, and that both are the same picture; a fresh interpreter checks that matplotlib is imported only to draw.
"""

from __future__ import annotations

import io
import math
import random
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

mpl = pytest.importorskip("matplotlib")

import numpy as np  # noqa: E402
from conftest import TinyMLP, loader, make_trainer  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.text import Text  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightning_gradhealth import GradientHealthMonitor, TrainingHealthError  # noqa: E402
from lightning_gradhealth.config.thresholds import Thresholds  # noqa: E402
from lightning_gradhealth.output import figures, plots, visuals  # noqa: E402
from lightning_gradhealth.output.figures import (  # noqa: E402
    COLOURS,
    LEGEND_ROWS,
    NAMED_LAYERS,
    flagged_from,
    gradient_flow,
    reference_lines,
    save_png,
    short_names,
)
from lightning_gradhealth.schema.alert import Alert, Severity  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def gpt2_names(blocks: int = 12) -> list[str]:
    """The layers of Hugging Face's GPT-2 (``group_by="module"``): 2 + 6 per block + 2."""
    names = ["transformer.wte", "transformer.wpe"]
    for b in range(blocks):
        names += [f"transformer.h.{b}.{x}" for x in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc",
                                                      "mlp.c_proj")]  # fmt: skip
    return [*names, "transformer.ln_f", "lm_head"]


@dataclass
class Case:
    names: list[str]
    norms: list[float]
    step: int
    flagged: dict[str, tuple[str, str]]


def _alert(layer: str, severity: str, kind: str) -> Alert:
    return Alert(kind=kind, severity=Severity(severity), step=0, message="", layer=layer)


def _six() -> Case:  # the demo's size
    flagged = flagged_from([_alert("net.0", "critical", "vanishing"), _alert("net.2", "warning", "vanishing")])
    return Case([f"net.{2 * i}" for i in range(6)], [1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 0.1], 7, flagged)


def _gpt2_nan() -> Case:
    names = gpt2_names()
    rng = random.Random(0)
    norms = [10 ** rng.uniform(-3, 0) for _ in names]
    norms[52], norms[53], norms[10] = math.nan, math.inf, 0.0
    norms[3:6] = [1e-9, 2e-9, 3e-9]
    alerts = [_alert(names[i], "critical", "vanishing") for i in (3, 4, 5)]
    alerts += [_alert(names[i], "warning", "ratio_high") for i in range(20, 40, 3)]
    return Case(names, norms, 50, flagged_from(alerts, nonfinite=[names[52], names[53]]))


def _gpt2_decay() -> Case:  # 60 of 76 layers unhealthy: the legend and the index labels are full
    names = gpt2_names()
    alerts = [_alert(names[i], "critical" if i < 30 else "warning", "vanishing") for i in range(60)]
    return Case(names, [10 ** (-12 + i / 8) for i in range(len(names))], 1234, flagged_from(alerts))


def _deep() -> Case:  # 300 layers (50 Llama-like blocks): every k-th tick
    names = [f"model.layers.{b}.{x}" for b in range(50) for x in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]  # fmt: skip
    rng = random.Random(1)
    return Case(names, [10 ** rng.uniform(-4, 0) for _ in names], 99, {names[7]: ("critical", "dead")})


CASES = {
    "six layers": _six,
    "gpt2 with a NaN": _gpt2_nan,
    "gpt2 decaying": _gpt2_decay,
    "gpt2 healthy": lambda: Case(gpt2_names(), [0.1 + 0.01 * i for i in range(76)], 3, {}),
    "300 layers": _deep,
    "one layer": lambda: Case(["w"], [math.nan], 0, {"w": ("critical", "nonfinite")}),
}


def _labels(fig) -> list:
    """Every text the canvas shows (drawn first): titles, axis labels, tick labels in view, notes, the legend."""
    fig.canvas.draw()
    texts = [*fig.texts]
    for legend in fig.legends:
        texts += [legend.get_title(), *legend.get_texts()]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            for tick in (*axis.get_major_ticks(), *axis.get_minor_ticks()):
                if lo <= tick.get_loc() <= hi:
                    texts += [tick.label1, tick.label2]
    return [t for t in texts if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("case", list(CASES))
def test_the_figure_is_readable(case, tmp_path):
    c = CASES[case]()
    fig = gradient_flow(c.names, c.norms, c.step, c.flagged, reference_lines(Thresholds()))
    png = save_png(fig, tmp_path / "flow.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert isinstance(fig.canvas, FigureCanvasAgg)
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    ax = fig.axes[0]
    texts = _labels(fig)
    boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts]  # (a leader line aside)

    # the title fits the canvas, and leads with the step drawn
    title = ax.title.get_window_extent(renderer)
    assert canvas.x0 <= title.x0 and title.x1 <= canvas.x1 and canvas.y0 <= title.y0 and title.y1 <= canvas.y1
    assert ax.get_title().startswith(f"Gradient flow at step {c.step}")
    for text, box in boxes:
        assert canvas.x0 <= box.x0 and box.x1 <= canvas.x1 and canvas.y0 <= box.y0 and box.y1 <= canvas.y1, text
    # no two labels overlap
    for k, (text, box) in enumerate(boxes):
        for other, obox in boxes[k + 1 :]:
            assert not box.overlaps(obox), (text, other)

    # integer ticks, named by layer (every k-th on a deep model), the unhealthy ones always, in their colour
    n = len(c.names)
    ticks = ax.get_xticks()
    assert all(float(t).is_integer() and 0 <= t < n for t in ticks)
    assert sorted({*ticks, *ax.get_xticks(minor=True)}) == list(range(n))  # a tick mark for every layer
    short = short_names(c.names)
    shown = {int(t): label for t, label in zip(ticks, ax.get_xticklabels(), strict=True)}
    assert all(label.get_text() == short[i] for i, label in shown.items())
    assert {0, n - 1} <= set(shown) and len(shown) >= min(n, 25)
    for name, (severity, _) in c.flagged.items():
        i = c.names.index(name)
        if n <= 100:  # every layer has a tick on a model this size ...
            assert shown[i].get_color() == COLOURS[severity]
    assert any(c.names.index(name) in shown for name in c.flagged) or not c.flagged  # ... the worst one at any size
    (index,) = ax.child_axes  # the indices on top
    assert all(float(t).is_integer() for t in index.get_xticks())
    assert ax.get_yscale() == "log"

    # the worst layers named beside their point, the legend maps index -> layer -> problem
    notes = [t.get_text() for t in ax.texts]
    if c.flagged:
        worst = figures._worst_first(c.names, c.norms, c.flagged)
        assert f"{c.names[worst[0]]}: {c.flagged[c.names[worst[0]]][1]}" in notes
        assert len([t for t in notes if ": " in t]) <= NAMED_LAYERS
        rows = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
        for i in worst[:LEGEND_ROWS] if len(worst) > NAMED_LAYERS else ():  # (fewer are all named: no legend)
            assert any(row.startswith(f"{i}: ") and row.endswith(c.flagged[c.names[i]][1]) for row in rows)
        if len(worst) > LEGEND_ROWS:
            assert f"and {len(worst) - LEGEND_ROWS} more" in rows
    else:
        assert "no layer flagged" in ax.get_title() and not any(": " in t for t in notes)
    if case == "six layers":
        assert not fig.legends  # both unhealthy layers are named beside their point: no legend needed
    if case in ("six layers", "gpt2 with a NaN"):  # to look at: python -m pytest tests/test_figures.py --basetemp=...
        save_png(fig, tmp_path / f"{case.replace(' ', '_')}.png")


def test_a_nan_is_named_in_the_title_and_drawn_on_the_bottom_edge():
    c = _gpt2_nan()
    fig = gradient_flow(c.names, c.norms, c.step, c.flagged)
    ax = fig.axes[0]
    assert ax.get_title().startswith("Gradient flow at step 50: NaN/Inf gradients in 2 layers, first ")
    crosses = [col for col in ax.collections if col.get_offsets().shape[0] == 2]
    (cross,) = crosses
    xs = sorted(cross.get_offsets()[:, 0].tolist())
    assert xs == [52, 53] and cross.get_offsets()[0, 1] < min(v for v in c.norms if v > 0 and math.isfinite(v))


def test_short_names():
    assert short_names(["net.0", "net.2"]) == ["net.0", "net.2"]  # the prefix stays where a number would be left
    assert short_names(["transformer.h.11.mlp.c_proj", "lm_head"]) == ["…h.11.mlp.c_proj", "lm_head"]
    assert short_names(["a.b.encoder.x", "a.b.decoder.y"]) == ["encoder.x", "decoder.y"]
    assert short_names(["x" * 40]) == ["…" + "x" * 21]
    assert all(len(s) <= 22 for s in short_names(gpt2_names()))


def test_flagged_from_takes_what_was_graded():
    alerts = [_alert("a", "warning", "ratio_high"), _alert("a", "critical", "vanishing"), _alert("b", "warning", "dead"),
              Alert(kind="spike", severity=Severity.WARNING, step=0, message="")]  # fmt: skip

    @dataclass
    class Finding:  # a finding names several layers
        kind: str
        severity: Severity
        layers: tuple[str, ...]

    graded = [*alerts, Finding("layer_imbalance", Severity.WARNING, ("b", "c"))]
    assert flagged_from(graded, nonfinite=["b"]) == {
        "a": ("critical", "vanishing"),  # the worst severity wins
        "b": ("critical", "nonfinite"),  # NaN/Inf in the record: critical whatever was graded
        "c": ("warning", "layer_imbalance"),
    }


def test_flagged_layers_does_not_grade_again_what_was_graded(default_record):
    record = default_record
    everything = Thresholds(layer_norm_low_warning=1e6, layer_norm_low_critical=1e5, warmup_steps=1)
    graded_here = visuals.flagged_layers(record, everything)
    assert len(graded_here) == len(record.layers)  # without `graded`, the record is graded: every layer vanishes
    assert visuals.flagged_layers(record, everything, graded=[]) == {}  # with it, nothing more
    alerts = [_alert(record.layers[1].name, "warning", "dead")]
    assert visuals.flagged_layers(record, everything, graded=alerts) == {record.layers[1].name: ("warning", "dead")}


@pytest.fixture
def default_record(tmp_path):
    monitor = GradientHealthMonitor(figure_every_n_steps=None, report=False)
    make_trainer(callbacks=[monitor], max_steps=2).fit(TinyMLP(), loader())
    return monitor.last_record


# ---------------------------------------------------------------- a real run with a NaN
def test_the_nan_step_gets_its_own_figure_in_tensorboard_and_in_the_report(tmp_path, monkeypatch):
    drawn = []  # (step, title, figure) of every gradient-flow figure, TensorBoard's and the report's

    def spy(*args, **kwargs):
        fig = gradient_flow(*args, **kwargs)
        drawn.append(fig)
        return fig

    monkeypatch.setattr(visuals, "gradient_flow", spy)
    monkeypatch.setattr(plots, "gradient_flow", spy)
    monitor = GradientHealthMonitor(figure_every_n_steps=5)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=20, log_every_n_steps=5)
    with pytest.raises(TrainingHealthError) as err:
        trainer.fit(TinyMLP(poison={7: ("net.2.weight", float("nan"))}), loader())
    assert err.value.record.step == 7  # computed steps are 4, 9, ...: step 7 is not one of them

    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    images = acc.Images("grad_health/gradient_flow")
    assert [image.step for image in images] == [4, 7]
    titles = [fig.axes[0].get_title() for fig in drawn]
    assert len(drawn) == 3  # step 4, the NaN step at the end of the run, the report's PNG
    assert titles[0].startswith("Gradient flow at step 4\n")
    for title in titles[1:]:
        assert title.startswith("Gradient flow at step 7: NaN/Inf gradients in 1 layer, first net.2\n")
    # one figure: the report's PNG is TensorBoard's last image, pixel for pixel
    from PIL import Image

    tensorboard = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    report = np.asarray(Image.open(tmp_path / "gradient_flow.png").convert("RGB"))
    assert tensorboard.shape == report.shape and (tensorboard == report).all()


# ---------------------------------------------------------------- matplotlib only to draw
_HOOK = """
import builtins, sys
seen = []
_import = builtins.__import__
def _spy(name, globals=None, locals=None, fromlist=(), level=0):
    who = (globals or {}).get("__name__", "")
    if level == 0 and name.split(".")[0] == "matplotlib" and who.startswith("lightning_gradhealth"):
        seen.append((who, name))
    return _import(name, globals, locals, fromlist, level)
builtins.__import__ = _spy
"""


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                         cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_no_module_of_the_package_imports_matplotlib_until_a_figure_is_drawn():
    out = _run(_HOOK + """
import importlib, pkgutil
import lightning_gradhealth
from lightning_gradhealth import GradientHealthMonitor, GradientHealth
for mod in pkgutil.walk_packages(lightning_gradhealth.__path__, "lightning_gradhealth."):
    importlib.import_module(mod.name)
print(sorted(set(seen)))
from lightning_gradhealth.output.figures import gradient_flow
gradient_flow(["a", "b"], [1.0, 0.1], 3)
print(sorted({name for who, name in seen}), "matplotlib.pyplot" in {name for _, name in seen})
""")
    before, after = out.splitlines()[-2:]
    assert before == "[]"  # at import: none (Lightning's own torchmetrics may import matplotlib: not ours)
    drawn, pyplot = after.rsplit(" ", 1)
    assert "'matplotlib.figure'" in drawn and "'matplotlib.backends.backend_agg'" in drawn and pyplot == "False"


def test_the_output_layer_imports_no_matplotlib():
    out = _run("""
import sys
import lightning_gradhealth.output.figures, lightning_gradhealth.output.visuals, lightning_gradhealth.output.plots
import lightning_gradhealth.output.report, lightning_gradhealth.output.pipeline
print("matplotlib" in sys.modules)
""")
    assert out == "False"


def test_the_loop_api_imports_no_matplotlib():
    # (GradientHealthMonitor cannot promise it: `import lightning` imports torchmetrics, whose plot utilities import
    # matplotlib.pyplot; the loop API imports torchmetrics only with activation statistics on)
    assert _run("import sys\nfrom lightning_gradhealth import GradientHealth\nprint('matplotlib' in sys.modules)") == (
        "False"
    )


def test_an_empty_record_and_a_zero_norm_still_draw():
    assert gradient_flow([], [], 3).axes[0].get_title() == "Gradient flow at step 3\nno layer flagged"
    fig = gradient_flow(["a", "b"], [0.0, 1.0], 4)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["zero or no gradient"]
