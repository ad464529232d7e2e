"""What reaches the loggers: real TensorBoard event files read back, step alignment, call counts, costs."""

from __future__ import annotations

import inspect
import math
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import Records, TinyMLP, loader, make_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.overrides import TorchFunctionMode

import lightning_gradhealth
from lightning_gradhealth import SUMMARY_KEYS, GradientHealthMonitor

PKG_DIR = os.path.dirname(lightning_gradhealth.__file__)
METRICS_DOC = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def read_scalars(log_dir) -> dict[str, dict[int, float]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_on_trainer_steps(tmp_path):
    monitor = GradientHealthMonitor()
    records = Records(monitor)
    trainer = make_trainer(tmp_path, callbacks=[monitor, records], max_steps=8, log_every_n_steps=2)
    trainer.fit(TinyMLP(), loader())
    scalars = read_scalars(trainer.logger.log_dir)
    # our points land exactly on the steps of the Trainer's own scalars
    assert sorted(scalars["grad_health/total_norm"]) == sorted(scalars["train_loss"]) == [1, 3, 5, 7]
    for key in SUMMARY_KEYS:
        assert sorted(scalars[key]) == [1, 3, 5, 7], key
    for layer in ("net.0", "net.2", "net.4"):
        for prefix in ("grad_norm", "grad_ratio", "grad_zero_frac"):
            assert f"{prefix}/{layer}" in scalars
    assert not any(tag.startswith(("grad_nan/", "grad_inf/", "grad_max/")) for tag in scalars)
    by_step = {r.step: r for r in records.records}
    for step, value in scalars["grad_health/total_norm"].items():
        assert value == pytest.approx(by_step[step].total_norm, rel=1e-6)
    for step, value in scalars["grad_ratio/net.2"].items():
        assert value == pytest.approx(by_step[step].layer("net.2").ratio, rel=1e-6)


def test_own_interval_is_counted_in_optimizer_steps(tmp_path):
    monitor = GradientHealthMonitor(log_every_n_steps=3)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=6, log_every_n_steps=1, accumulate_grad_batches=2)
    trainer.fit(TinyMLP(), loader())
    scalars = read_scalars(trainer.logger.log_dir)
    assert sorted(scalars["grad_health/total_norm"]) == [2, 5]
    assert set(scalars["grad_health/total_norm"]) <= set(scalars["train_loss"])


class _CountCalls:
    """Mixin for a real logger: remembers the step and the keys of every log_metrics call."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, frozenset[str]]] = []

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, frozenset(metrics)))
        super().log_metrics(metrics, step)


class CountingTB(_CountCalls, TensorBoardLogger):
    pass


class CountingCSV(_CountCalls, CSVLogger):
    pass


def test_one_log_metrics_call_per_logged_step_to_every_logger(tmp_path):
    tb, csv = CountingTB(str(tmp_path), name="tb"), CountingCSV(str(tmp_path), name="csv")
    monitor = GradientHealthMonitor(log_every_n_steps=2)
    trainer = make_trainer(callbacks=[monitor], logger=[tb, csv], max_steps=6, log_every_n_steps=50)
    trainer.fit(TinyMLP(), loader())
    for logger in (tb, csv):
        ours = [(step, keys) for step, keys in logger.calls if "grad_health/total_norm" in keys]
        assert [step for step, _ in ours] == [1, 3, 5]
        assert all(keys >= set(SUMMARY_KEYS) and "grad_norm/net.0" in keys for _, keys in ours)
    csv_text = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert "grad_health/total_norm" in csv_text.splitlines()[0]


class LogMetricsTB(TensorBoardLogger):
    """Lightning's TensorBoard logger, forced onto its own ``log_metrics`` (one ``add_scalar`` per key)."""

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)


def _events_with(log_dir, tag: str) -> list[set[str]]:
    """The tags of every event in the run's event files that holds ``tag``."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            tags = {value.tag for value in event.summary.value}
            if tag in tags:
                out.append(tags)
    return out


@pytest.mark.parametrize("prefix", ["", "exp"])
def test_tensorboard_gets_one_event_per_logged_step_with_what_log_metrics_writes(tmp_path, prefix):
    runs = {}
    for kind, cls in (("fast", TensorBoardLogger), ("log_metrics", LogMetricsTB)):
        torch.manual_seed(0)
        model = TinyMLP()
        logger = cls(str(tmp_path), name=kind, version="", prefix=prefix)
        trainer = make_trainer(callbacks=[GradientHealthMonitor()], logger=logger, max_steps=6, log_every_n_steps=2)
        trainer.fit(model, loader())
        runs[kind] = logger.log_dir
    head = f"{prefix}-" if prefix else ""
    fast, reference = read_scalars(runs["fast"]), read_scalars(runs["log_metrics"])
    ours = {tag for tag in reference if "grad" in tag}
    assert f"{head}grad_health/total_norm" in ours and f"{head}grad_norm/net.0" in ours
    assert {tag for tag in fast if "grad" in tag} == ours
    for tag in ours:
        assert fast[tag] == reference[tag], tag  # same steps, same float32 values
    # the fast run wrote each logged step's keys as ONE event; log_metrics as one event per key
    events = _events_with(runs["fast"], f"{head}grad_health/total_norm")
    assert len(events) == 3 and all(tags == ours for tags in events)
    assert all(len(tags) == 1 for tags in _events_with(runs["log_metrics"], f"{head}grad_health/total_norm"))


def test_log_metrics_replaced_on_the_instance_or_a_writer_subclass_gets_log_metrics(tmp_path):
    from unittest import mock

    from torch.utils.tensorboard import SummaryWriter

    logger = TensorBoardLogger(str(tmp_path), name="patched", version="")
    with mock.patch.object(logger, "log_metrics", wraps=logger.log_metrics) as spy:
        make_trainer(callbacks=[GradientHealthMonitor()], logger=logger, max_steps=4, log_every_n_steps=2).fit(
            TinyMLP(), loader()
        )
    sent = [(call.args[0] if call.args else call.kwargs["metrics"], call.kwargs["step"]) for call in spy.call_args_list]
    steps = [step for metrics, step in sent if "grad_health/total_norm" in metrics]
    assert steps == [1, 3]

    scalars: list[str] = []

    class Writer(SummaryWriter):
        def add_scalar(self, tag, *args, **kwargs):
            scalars.append(tag)
            super().add_scalar(tag, *args, **kwargs)

    class CustomWriterTB(TensorBoardLogger):
        @property
        def experiment(self):
            if self._experiment is None:
                self._experiment = Writer(log_dir=self.log_dir)
            return self._experiment

    logger = CustomWriterTB(str(tmp_path), name="writer", version="")
    make_trainer(callbacks=[GradientHealthMonitor()], logger=logger, max_steps=4, log_every_n_steps=2).fit(
        TinyMLP(), loader()
    )
    assert scalars.count("grad_health/total_norm") == 2


def test_callback_metrics_feed_early_stopping():
    monitor = GradientHealthMonitor()
    stopper = EarlyStopping(monitor="grad_health/total_norm", stopping_threshold=1e9, check_on_train_epoch_end=True)
    trainer = make_trainer(callbacks=[monitor, stopper], max_epochs=5, max_steps=-1)
    trainer.fit(TinyMLP(), loader())
    assert trainer.current_epoch == 1  # stopped after the first epoch, on our key
    assert trainer.callback_metrics["grad_health/total_norm"].item() == pytest.approx(monitor.last_record.total_norm)


def test_early_stopping_without_the_monitor_fails_proving_the_key_comes_from_it():
    stopper = EarlyStopping(monitor="grad_health/total_norm", stopping_threshold=1e9, check_on_train_epoch_end=True)
    trainer = make_trainer(callbacks=[stopper], max_epochs=2, max_steps=-1)
    with pytest.raises(RuntimeError, match="grad_health/total_norm"):
        trainer.fit(TinyMLP(), loader())


# ---------------------------------------------------------------- cost: transfers and skipped work
SYNC_METHODS = {"tolist", "item", "numpy", "__bool__", "__float__", "__int__", "__index__", "cpu", "nonzero"}


class CallCounter(TorchFunctionMode):
    """Records every torch call made from this package's code, with the trainer's logging step."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer = trainer
        self.calls: list[tuple[int, str]] = []
        self.active = False  # set once training starts: setup work (building the layout) is not per-step cost

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.active:
            return func(*args, **kwargs)
        frame = inspect.currentframe().f_back
        ours = False
        while frame is not None:
            filename = frame.f_code.co_filename
            if filename.startswith(PKG_DIR):
                ours = True
                break
            frame = frame.f_back
        if ours:
            name = getattr(func, "__name__", str(func))
            if name == "to" and any(str(a) == "cpu" for a in [*args[1:], *kwargs.values()]):
                name = "cpu"
            self.calls.append((self.trainer.fit_loop.epoch_loop._batches_that_stepped, name))
        return func(*args, **kwargs)


class StartCounting(Callback):
    counter: CallCounter

    def on_train_start(self, trainer, pl_module):
        self.counter.active = True


MONITOR_ONLY = {"on_nonfinite": None, "spike_z_thresh": None}  # issue-2 behaviour: no per-step guard


def _count_calls(model, monitor_kwargs=MONITOR_ONLY, **kwargs):
    monitor = GradientHealthMonitor(log_every_n_steps=3, **monitor_kwargs)
    records = Records(monitor)
    start = StartCounting()
    trainer = make_trainer(callbacks=[start, monitor, records], **kwargs)
    counter = start.counter = CallCounter(trainer)
    with counter:
        trainer.fit(model, loader())
    return counter.calls, records.records


@pytest.mark.parametrize("accumulate", [1, 4])
def test_exactly_one_host_transfer_per_computed_step_and_nothing_on_other_steps(accumulate):
    calls, records = _count_calls(TinyMLP(), max_steps=6, accumulate_grad_batches=accumulate)
    computed = {r.step for r in records}
    assert computed == {2, 5}
    for step in range(6):
        step_calls = [name for s, name in calls if s == step]
        syncs = [name for name in step_calls if name in SYNC_METHODS]
        if step in computed:
            assert syncs == ["tolist"], (step, syncs)
            # exact NaN/Inf counts are not computed on a healthy step
            assert "isnan" not in step_calls and "isinf" not in step_calls
        else:  # a step that is not logged does no torch work at all, except that the first batch of an epoch
            # reads every parameter's requires_grad (is the watched set the same?): host attribute reads
            assert set(step_calls) <= {"__get__"}, (step, step_calls)
    epochs = math.ceil(6 / (8 // accumulate))  # 8 batches per epoch
    # (after the last step, at the end of fit, the report reads what is frozen: not a per-step cost)
    reads = [s for s, name in calls if name == "__get__" and s not in computed and s < 6]
    assert len(reads) <= 6 * epochs  # TinyMLP has 6 parameters: one read each, once per epoch


def test_guard_every_step_is_one_foreach_norm_and_one_transfer():
    calls, records = _count_calls(TinyMLP(), monitor_kwargs={}, max_steps=6)  # defaults: guard on
    assert {r.step for r in records} == {2, 5}
    for step in range(6):
        step_calls = [name for s, name in calls if s == step]
        assert [name for name in step_calls if name in SYNC_METHODS] == ["tolist"], step
        if step not in {2, 5}:
            assert step_calls.count("_foreach_norm") == 1
            assert not {"count_nonzero", "isnan", "isinf", "index_add_"} & set(step_calls), step_calls


def test_nonfinite_step_counts_exactly_with_one_more_transfer():
    # micro-batch 5 is optimizer step 5, a computed step with log_every_n_steps=3
    calls, records = _count_calls(
        TinyMLP(poison={5: ("net.0.bias", math.nan)}), monitor_kwargs={"on_nonfinite": "warn"}, max_steps=6
    )
    bad = [r for r in records if not r.is_finite]
    assert [r.step for r in bad] == [5]
    assert bad[0].nan_count == 1 and bad[0].layer("net.0").nan_count == 1
    assert bad[0].first_nonfinite_micro_batch == 0
    syncs = [name for s, name in calls if s == 5 and name in SYNC_METHODS]
    assert syncs == ["tolist", "tolist"]


def test_scaler_adds_no_transfer_and_trainer_clipping_adds_one_for_the_post_clip_norm():
    calls, records = _count_calls(
        TinyMLP(optimizer="adam", lr=1e-3), max_steps=6, plugins=[MixedPrecision("16-mixed", "cpu")]
    )
    assert all(r.amp_scale is not None for r in records)
    for step in {r.step for r in records}:
        assert [name for s, name in calls if s == step and name in SYNC_METHODS] == ["tolist"]
    # the post-clip norm can only be read after Lightning clips, inside the optimizer step: one more scalar
    calls, records = _count_calls(TinyMLP(), max_steps=6, gradient_clip_val=0.5)
    assert all(r.post_clip_norm is not None for r in records)
    for step in {r.step for r in records}:
        assert [name for s, name in calls if s == step and name in SYNC_METHODS] == ["tolist", "item"]


# ---------------------------------------------------------------- every key is documented
def _all_keys(tmp_path):
    keys: set[str] = set()
    configs = [
        ({"stats": "full"}, {"gradient_clip_val": 1e6, "plugins": [MixedPrecision("16-mixed", "cpu")]}),
        ({"on_nonfinite": "skip", "clip": "norm", "spike_warmup_steps": 1, "spike_z_thresh": 1e-3}, {}),
    ]
    for i, (monitor_kwargs, trainer_kwargs) in enumerate(configs):
        tb = CountingTB(str(tmp_path), name=f"tb{i}")
        trainer = make_trainer(
            callbacks=[GradientHealthMonitor(**monitor_kwargs)], logger=tb, max_steps=4, **trainer_kwargs
        )
        model = TinyMLP(optimizer="adam", poison={1: ("net.2.weight", math.nan), 2: ("net.2.weight", math.inf)})
        trainer.fit(model, loader())
        for _, k in tb.calls:
            keys |= {key for key in k if key.startswith(("grad_health/", "grad_"))}
    return {re.sub(r"/net\.\d$", "/<layer>", key) for key in keys}


def test_every_logged_key_is_in_the_docstring_and_the_metrics_page(tmp_path):
    keys = _all_keys(tmp_path)
    assert {"grad_nan/<layer>", "grad_inf/<layer>", "grad_max/<layer>", "grad_health/post_clip_norm"} <= keys
    assert {
        "grad_health/amp_overflow",
        "grad_health/skipped_steps",
        "grad_health/clip_frac",
        "grad_health/spikes",
    } <= keys
    doc = GradientHealthMonitor.__doc__
    page = METRICS_DOC.read_text()
    for key in keys:
        assert f"``{key}``" in doc, key
        assert f"`{key}`" in page, key
