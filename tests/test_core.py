"""GradientHealth, the framework-free core, in plain PyTorch loops: every number against a float64 reference taken
from the gradients before the step; the same numbers from a plain loop, a Fabric loop and the Lightning callback;
the guard (raise, skip), a GradScaler, accumulation, loggers, the context manager and bad input."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Records, TinyMLP, assert_matches, make_trainer, reference, run_example
from fabric_script import Net  # the 8 → 16 → 16 → 1 ReLU MLP of conftest's TinyMLP, in plain torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gradhealth import GradientHealth, GradientHealthMonitor, TrainingHealthError

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["net.0", "net.2", "net.4"]


class ListLogger:
    """A real sink (anything with ``log_metrics(metrics, step)`` is a logger): keeps every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append((step, dict(metrics)))

    def at(self, step: int) -> dict[str, float]:
        (values,) = [m for s, m in self.calls if s == step]
        return values


def data(n: int = 48, batch_size: int = 8) -> DataLoader:
    """Regression batches whose first feature is always 0: the first layer's weight column 0 gets exactly-zero
    gradients, so zero fractions are non-trivial."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    x[:, 0] = 0.0
    y = x[:, 1:2] * 0.5 + 0.1 * torch.randn(n, 1, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """float64 copies of the gradients and parameters, taken before the step."""
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    return grads, params


def plain_loop(
    model: nn.Module, optimizer: torch.optim.Optimizer, health: GradientHealth, loader: DataLoader, backward: Any = None
) -> tuple[dict[int, Any], dict[int, dict[str, Any]]]:
    """Train one pass over ``loader``; return the records of the due steps and the float64 reference of every step."""
    records: dict[int, Any] = {}
    refs: dict[int, dict[str, Any]] = {}
    for i, (x, y) in enumerate(loader):
        loss = nn.functional.mse_loss(model(x), y)
        (backward or (lambda t: t.backward()))(loss)
        refs[i] = reference(*snapshot(model))
        before = health.last_record
        assert health.step(optimizer, step=i) is True
        if health.last_record is not before:
            records[i] = health.last_record
        optimizer.step()
        optimizer.zero_grad()
    return records, refs


def poison(model: nn.Module, value: float = math.nan) -> None:
    """One entry of net.2.weight's gradient goes bad."""
    model.net[2].weight.grad.view(-1)[5] = value


# --------------------------------------------------------------------------- numbers and schedule
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_due_steps_equal_the_float64_reference(optimizer):
    model = Net()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.05)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=1e-2)
    )
    health = GradientHealth(model, log_every_n_steps=3, report=False)
    assert health.last_record is None
    records, refs = plain_loop(model, opt, health, data(n=80))  # 10 steps
    assert list(records) == [2, 5, 8]  # (i + 1) % 3 == 0: Lightning's schedule
    for step, record in records.items():
        ref = refs[step]
        assert record.step == record.global_step == step
        assert [lay.name for lay in record.layers] == LAYERS
        assert ref["zero_frac"] > 0 and ref["layers"]["net.0"]["zero_frac"] > 0  # the check below can fail
        assert_matches(record, ref)
        assert record.nan_count == record.inf_count == record.no_grad_count == 0
    # the steps differ from each other: a record is not one step's numbers repeated
    assert len({round(r.total_norm, 6) for r in records.values()}) == 3


def test_default_schedule_is_every_50_steps():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, report=False)
    x, y = torch.randn(4, 8), torch.randn(4, 1)
    seen = []
    for i in range(100):
        nn.functional.mse_loss(model(x), y).backward()
        grads, params = snapshot(model)
        before = health.last_record
        health.step(opt)  # step=None: the count of calls, from 0
        if health.last_record is not before:
            seen.append(i)
            assert health.last_record.total_norm == pytest.approx(reference(grads, params)["total_norm"], rel=1e-5)
        opt.step()
        opt.zero_grad()
    assert seen == [49, 99]


def _fabric_records(init: dict[str, torch.Tensor], every: int) -> dict[int, Any]:
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1)
    model = Net()
    model.load_state_dict(init)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    health = GradientHealth(model, log_every_n_steps=every, report=False)
    records, _ = plain_loop(model, optimizer, health, data(), backward=fabric.backward)
    return records


def test_plain_fabric_and_lightning_give_the_same_numbers():
    init = {k: v.clone() for k, v in Net().state_dict().items()}
    every = 2
    # plain PyTorch
    model = Net()
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    plain, refs = plain_loop(model, opt, GradientHealth(model, log_every_n_steps=every, report=False), data())
    # Lightning Fabric
    fabric = _fabric_records(init, every)
    # the Lightning Trainer and its callback (TinyMLP: the same layers, SGD with lr=0.05, MSE)
    lit = TinyMLP(lr=0.05)
    lit.load_state_dict(init)
    monitor = GradientHealthMonitor()  # follows Trainer(log_every_n_steps=...)
    grabbed = Records(monitor)
    make_trainer(callbacks=[monitor, grabbed], max_steps=6, log_every_n_steps=every).fit(lit, data())
    lightning = {r.step: r for r in grabbed.records}

    assert list(plain) == list(fabric) == list(lightning) == [1, 3, 5]
    for step in plain:
        ref = refs[step]
        for front, record in (("plain", plain[step]), ("fabric", fabric[step]), ("lightning", lightning[step])):
            assert record.step == step, front
            assert_matches(record, ref)  # every front-end against the float64 reference
        a, b, c = plain[step], fabric[step], lightning[step]
        # the same float32 kernels on the same gradients: the front-ends agree with each other to the last bit
        assert a.total_norm == b.total_norm == c.total_norm
        assert a.param_norm == b.param_norm == c.param_norm
        assert a.zero_frac == b.zero_frac == c.zero_frac
        assert a.layers == b.layers == c.layers  # names, norms, ratios, zero fractions, counts


# --------------------------------------------------------------------------- the guard
def test_nan_raises_naming_the_layer_after_logging_and_writing_the_report(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logger = ListLogger()
    health = GradientHealth(model, loggers=logger, report_dir=tmp_path, log_every_n_steps=2)
    for i, (x, y) in enumerate(data()):
        nn.functional.mse_loss(model(x), y).backward()
        if i == 2:  # not a logged step: the per-step guard catches it
            poison(model)
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            with pytest.raises(TrainingHealthError) as caught:
                health.step(opt, step=i)
            break
        health.step(opt, step=i)
        opt.step()
        opt.zero_grad()
    err = caught.value
    assert err.context["layers"] == ["net.2"]
    assert err.context["step"] == 2
    assert err.record.nan_count == 1 and err.record.layer("net.2").nan_count == 1
    assert "Non-finite gradients at step 2" in str(err) and "net.2: 1 NaN, 0 Inf" in str(err)
    # logged before the raise, and the report is written
    assert logger.at(2)["grad_health/nan_count"] == 1.0
    assert logger.at(2)["grad_nan/net.2"] == 1.0
    assert (tmp_path / "gradient_health_report.md").is_file()
    report = json.loads((tmp_path / "gradient_health_report.json").read_text())
    assert "nonfinite" in json.dumps(report)
    # the raise came before the update: nothing changed the weights
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n


def test_skip_sets_the_gradients_to_none_and_the_weights_stay(tmp_path):
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # with momentum: a zero gradient would still move weights
    logger = ListLogger()
    health = GradientHealth(model, loggers=logger, on_nonfinite="skip", log_every_n_steps=1, report=False)
    outcomes = []
    for i, (x, y) in enumerate(data()):
        nn.functional.mse_loss(model(x), y).backward()
        if i == 3:
            poison(model, math.inf)
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        go = health.step(opt, step=i)
        outcomes.append(go)
        if i == 3:
            assert all(p.grad is None for p in model.parameters())
        opt.step()
        moved = [not torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters()]
        assert all(moved) if go else not any(moved)
        opt.zero_grad()
    assert outcomes == [True, True, True, False, True, True]
    assert logger.at(3)["grad_health/inf_count"] == 1.0
    assert [logger.at(i)["grad_health/skipped_steps"] for i in range(6)] == [0, 0, 0, 1, 1, 1]


# --------------------------------------------------------------------------- GradScaler
@pytest.mark.parametrize("unscaled_first", [True, False], ids=["unscale_-called", "still-scaled"])
def test_grad_scaler_norms_are_unscaled(unscaled_first):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    health = GradientHealth(model, scaler=scaler, log_every_n_steps=1, report=False)
    for i, (x, y) in enumerate(data(n=32)):
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        if unscaled_first:
            scaler.unscale_(opt)
        scale = scaler.get_scale()
        grads, params = snapshot(model)
        raw = reference(grads, params)["total_norm"]
        ref = reference(grads, params, scale=1.0 if unscaled_first else scale)
        assert health.step(opt, step=i) is True
        assert_matches(health.last_record, ref)
        assert health.last_record.amp_scale == scale
        assert health.last_record.total_norm == pytest.approx(raw / (1.0 if unscaled_first else scale), rel=1e-5)
        if not unscaled_first:  # the statistics divided the scale out without touching the gradients
            assert reference(*snapshot(model))["total_norm"] == raw
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()


def test_grad_scaler_overflow_is_counted_not_raised():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    logger = ListLogger()
    health = GradientHealth(model, scaler=scaler, loggers=logger, log_every_n_steps=2, report=False)
    scales = []
    for i, (x, y) in enumerate(data()):
        loss = nn.functional.mse_loss(model(x), y)
        if i == 2:
            loss = loss * 3e38  # times the loss scale: the scaled gradients overflow float32
        scaler.scale(loss).backward()
        scales.append(scaler.get_scale())
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert health.step(opt, step=i) is True  # the scaler decides: no TrainingHealthError
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert health.last_record.step == 2 and health.last_record.amp_overflow
            assert not health.last_record.is_finite
            assert all(torch.equal(p.detach(), weights[n]) for n, p in model.named_parameters())  # scaler skipped
        opt.zero_grad()
    assert scales == [2.0**12] * 3 + [2.0**11] * 3  # the scaler halved its scale after the overflow
    counts = {step: m["grad_health/amp_overflow"] for step, m in logger.calls}
    assert counts == {1: 0.0, 2: 1.0, 3: 1.0, 5: 1.0}  # the overflow step itself is recorded, and counted once
    assert logger.at(3)["grad_health/amp_scale"] == 2.0**11


# --------------------------------------------------------------------------- accumulation
def test_accumulation_names_the_micro_batch_that_went_non_finite():
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    health = GradientHealth(model, log_every_n_steps=50, report=False)
    micro = list(data(n=64))  # 8 micro-batches: 2 optimizer steps of 4
    weight = model.net[2].weight
    for step in range(2):
        for k in range(4):
            x, y = micro[step * 4 + k]
            handle = None
            if step == 1 and k == 2:  # the NaN appears in the backward pass of micro-batch 2 of 4
                handle = weight.register_hook(lambda g: g.index_fill(1, torch.tensor([3]), math.nan))
            (nn.functional.mse_loss(model(x), y) / 4).backward()
            if handle is not None:
                handle.remove()
            health.after_backward()
        if step == 0:
            assert health.step(opt, step=step) is True
            opt.step()
            opt.zero_grad()
    with pytest.raises(TrainingHealthError) as caught:
        health.step(opt, step=1)
    err = caught.value
    assert err.record.first_nonfinite_micro_batch == 2
    assert "last batch 1, micro-batch 2 (counted from 0) of the accumulated step" in str(err)
    assert err.context["layers"] == ["net.2"]
    assert err.record.layer("net.2").nan_count == 16  # one column of the 16x16 weight


# --------------------------------------------------------------------------- loggers
def _tb_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_directory_and_csv_logger_get_the_reference_values(tmp_path):
    from lightning.fabric.loggers import CSVLogger

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    health = GradientHealth(model, loggers=[str(tmp_path / "tb"), csv_logger], log_every_n_steps=2)
    records, refs = plain_loop(model, opt, health, data())
    health.close()

    tb = _tb_scalars(tmp_path / "tb")
    assert sorted(tb["grad_health/total_norm"]) == [1, 3, 5]
    for step in (1, 3, 5):
        assert tb["grad_health/total_norm"][step] == pytest.approx(refs[step]["total_norm"], rel=1e-5)
        assert tb["grad_health/param_norm"][step] == pytest.approx(refs[step]["param_norm"], rel=1e-5)
        for layer in LAYERS:
            r = refs[step]["layers"][layer]
            assert tb[f"grad_norm/{layer}"][step] == pytest.approx(r["grad_norm"], rel=1e-5), layer
            assert tb[f"grad_ratio/{layer}"][step] == pytest.approx(r["ratio"], rel=1e-5), layer
            assert tb[f"grad_zero_frac/{layer}"][step] == pytest.approx(r["zero_frac"], abs=1e-7), layer
    # the report goes to the first logger's directory
    assert (tmp_path / "tb" / "gradient_health_report.md").is_file()

    rows = _csv_rows(Path(csv_logger.log_dir) / "metrics.csv")
    assert set(rows[0]) - {"step"} == set(tb)  # the same keys
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    for row in rows:
        step = int(row["step"])
        assert float(row["grad_health/total_norm"]) == pytest.approx(refs[step]["total_norm"], rel=1e-5)
        assert float(row["grad_norm/net.2"]) == pytest.approx(refs[step]["layers"]["net.2"]["grad_norm"], rel=1e-5)
    assert records[5].total_norm == pytest.approx(refs[5]["total_norm"], rel=1e-5)


def test_context_manager_keeps_what_was_measured_when_the_loop_fails(tmp_path):
    from lightning.fabric.loggers import CSVLogger

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    refs = {}
    with pytest.raises(RuntimeError, match="data loader broke"):  # the exception goes through
        with GradientHealth(model, loggers=[str(tmp_path / "tb"), csv_logger], log_every_n_steps=2) as health:
            for i, (x, y) in enumerate(data()):
                if i == 5:
                    raise RuntimeError("data loader broke")
                nn.functional.mse_loss(model(x), y).backward()
                refs[i] = reference(*snapshot(model))
                health.step(opt, step=i)
                opt.step()
                opt.zero_grad()
    # nothing measured is lost: both logged steps are on disk, in both loggers, with the reference values
    tb = _tb_scalars(tmp_path / "tb")
    assert {s: pytest.approx(v, rel=1e-5) for s, v in tb["grad_health/total_norm"].items()} == {
        1: refs[1]["total_norm"],
        3: refs[3]["total_norm"],
    }
    rows = _csv_rows(Path(csv_logger.log_dir) / "metrics.csv")
    assert [(int(r["step"]), pytest.approx(float(r["grad_health/total_norm"]), rel=1e-5)) for r in rows] == [
        (1, refs[1]["total_norm"]),
        (3, refs[3]["total_norm"]),
    ]
    # the report of what was measured says that the run stopped, and why (issue 22)
    md = (tmp_path / "tb" / "gradient_health_report.md").read_text()
    assert "The run stopped before its end: RuntimeError after step 4: data loader broke" in md


def test_context_manager_writes_the_report_on_a_normal_exit(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with GradientHealth(model, report_dir=tmp_path / "report", log_every_n_steps=2) as health:
        plain_loop(model, opt, health, data())
        assert not (tmp_path / "report").exists()  # written at the exit, not before
    report = json.loads((tmp_path / "report" / "gradient_health_report.json").read_text())
    assert (tmp_path / "report" / "gradient_health_report.md").is_file()
    assert str(health.last_record.step) in json.dumps(report)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"log_every_n_steps": 0}, ValueError, "log_every_n_steps"),
        ({"on_nonfinite": "explode"}, ValueError, "on_nonfinite"),
        ({"per_layer": "yes"}, TypeError, "per_layer"),
        ({"max_norm": 1.0}, ValueError, "max_norm"),  # without clip="norm" it would do nothing
        ({"log_every_n_step": 5}, TypeError, "log_every_n_step"),  # a misspelt option
        ({"loggers": 42}, TypeError, "loggers"),
        ({"loggers": [42]}, TypeError, "loggers"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(kwargs, error, name):
    with pytest.raises(error, match=name):
        GradientHealth(Net(), **kwargs)


# --------------------------------------------------------------------------- the example
def test_plain_loop_example_runs(tmp_path):
    proc = run_example("plain_loop.py", tmp_path)
    assert "grad_health/total_norm at step 199" in proc.stdout
    report = tmp_path / "runs" / "plain" / "gradient_health_report.md"
    assert f"report: {report.relative_to(tmp_path)}" in proc.stdout
    assert report.is_file()
    assert "grad_health/total_norm" in _tb_scalars(tmp_path / "runs" / "plain")


# ---------------------------------------------------------------- a run that computed nothing, and the loss
def test_a_run_shorter_than_the_schedule_says_so_with_the_fix(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, log_every_n_steps=50, report_dir=tmp_path)
    for x, y in data(n=40):  # 5 optimizer steps, none of them due
        nn.functional.mse_loss(model(x), y).backward()
        assert health.step(opt)
        opt.step()
        opt.zero_grad()
    with pytest.warns(UserWarning, match=r"no step was computed.*5 optimizer step\(s\).*every 50.*log_every_n_steps=1"):
        health.close()
    assert health.last_record is None and not list(tmp_path.iterdir())


def test_a_trainer_fit_shorter_than_log_every_n_steps_says_so(tmp_path):
    monitor = GradientHealthMonitor()  # follows the Trainer's log_every_n_steps=50
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=32, accumulate_grad_batches=4, log_every_n_steps=50)
    with pytest.warns(
        UserWarning, match=r"no step was computed.*32 optimizer step\(s\).*every 50.*log_every_n_steps=8"
    ):
        trainer.fit(TinyMLP(), data(n=8 * 128))
    assert monitor.last_record is None and monitor.findings == []


def test_the_loss_is_read_on_computed_steps_with_the_statistics(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(model, log_every_n_steps=2)
    losses = []
    for i, (x, y) in enumerate(data()):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        health.step(opt, loss=loss)
        if i % 2 == 1:
            assert health.last_record.step == i
            assert health.last_record.loss == pytest.approx(losses[-1], rel=1e-6)
        opt.step()
        opt.zero_grad()
    assert health.history.loss == pytest.approx([losses[i] for i in range(1, len(losses), 2)], rel=1e-6)


def test_the_callback_reads_the_mean_loss_of_the_accumulated_micro_batches(tmp_path):
    seen: list[float] = []

    class Module(TinyMLP):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.append(float(loss.detach()))
            return loss

    monitor = GradientHealthMonitor(log_every_n_steps=1)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(Module(), data(n=8 * 6))
    mean_last = (seen[-2] + seen[-1]) / 2
    assert monitor.last_record.loss == pytest.approx(mean_last, rel=1e-5)


# --------------------------------------------------------------------------- FSDP2 in a plain loop
def test_plain_loop_fsdp2_matches_an_unsharded_reference_and_a_nan_stops_every_rank(tmp_path):
    """fully_shard on 2 gloo processes, no Lightning: the records are the unsharded model's (one collective), and a
    NaN in one rank's shard stops both ranks at that step, naming the layer."""
    script = Path(__file__).with_name("plain_fsdp2_script.py")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + str(script.parent)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["error"] == r1["error"] == {"step": 2, "layers": ["2"]}  # both ranks stop at step 2
    assert r0["records"] == r1["records"] and len(r0["records"]) == 2  # global numbers on every rank
    from plain_fsdp2_script import make_model

    model = make_model()  # the unsharded twin: same initialisation, the union of the ranks' batches
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step, rec in enumerate(r0["records"]):
        batches = [torch.load(tmp_path / f"batch_rank{r}_step{step}.pt") for r in (0, 1)]
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        nn.functional.mse_loss(model(x), y).backward()
        ref = reference({n: p.grad.double() for n, p in model.named_parameters()},
                        {n: p.detach().double() for n, p in model.named_parameters()})  # fmt: skip
        assert rec["total_norm"] == pytest.approx(ref["total_norm"], rel=1e-5)
        assert rec["param_norm"] == pytest.approx(ref["param_norm"], rel=1e-5)
        for name, (grad_norm, param_norm, zero_frac) in rec["layers"].items():
            assert grad_norm == pytest.approx(ref["layers"][name]["grad_norm"], rel=1e-5), name
            assert param_norm == pytest.approx(ref["layers"][name]["param_norm"], rel=1e-5), name
            assert zero_frac == pytest.approx(ref["layers"][name]["zero_frac"], abs=1e-12), name
        opt.step()
        opt.zero_grad()


# --------------------------------------------------------------------------- what a new user runs into
def test_two_optimizers_showing_up_one_by_one_are_not_a_change(capfd):
    model = Net()
    first = torch.optim.SGD([*model.net[0].parameters(), *model.net[2].parameters()], lr=0.01)
    second = torch.optim.SGD(model.net[4].parameters(), lr=0.01)
    health = GradientHealth(model, log_every_n_steps=1, report=False)
    for i, (x, y) in enumerate(data(n=24)):
        nn.functional.mse_loss(model(x), y).backward()
        for opt in (first, second):
            health.step(opt, step=i)
            opt.step()
            opt.zero_grad()
    health.close()
    assert "watched parameters changed" not in capfd.readouterr().err
    assert health.last_record.optimizer_idx == 1 and [lay.name for lay in health.last_record.layers] == ["net.4"]


def test_a_nan_born_in_the_forward_pass_puts_numerical_stability_first(tmp_path):
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    health = GradientHealth(model, log_every_n_steps=50, report_dir=tmp_path)
    with pytest.raises(TrainingHealthError) as err:
        for i, (x, y) in enumerate(data()):
            out = model(x)
            if i == 3:
                out = torch.log(out - 100.0)  # NaN from the forward pass, not from a too-large update
            loss = nn.functional.mse_loss(out, y)
            loss.backward()
            health.step(opt, loss=loss)
            opt.step()
            opt.zero_grad()
    fixes = str(err.value).split("Fixes:")[1]
    assert fixes.strip().startswith("1. make the loss numerically stable")
    health.close()  # after the failure the report is written already: nothing more, no error


def test_close_is_idempotent_and_step_before_backward_says_why_nothing_was_recorded(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    health = GradientHealth(model, log_every_n_steps=1, report_dir=tmp_path)
    health.step(opt)  # no backward yet: no gradient
    with pytest.warns(UserWarning, match=r"found no gradient.*after loss.backward\(\)"):
        health.close()
    health.close()  # a second close: nothing again


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: GradientHealth(Net(), options={"clip": "norm"}), "`options` must be"),
        (lambda: GradientHealth("model"), "`model` must be a torch.nn.Module"),
        (lambda: GradientHealth(Net(), scaler=object()), "`scaler` must be"),
        (lambda: GradientHealth(Net(), log_every_n_step=10), r"did you mean `log_every_n_steps`"),
        (lambda: GradientHealth(Net()).step(None), "`optimizer` must be"),
        (lambda: GradientHealth(Net()).step(torch.optim.SGD(Net().parameters(), lr=0.1), step="a"), "`step` must"),
    ],
)
def test_bad_calls_say_what_is_wrong(call, message):
    with pytest.raises((TypeError, RuntimeError), match=message):
        call()
