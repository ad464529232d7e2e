"""The sync-free guard (``guard_mode="deferred"``): verdicts read one step late from a non-blocking copy, and a
non-finite update skipped on the device by fused optimizers (``optimizer.found_inf``). Every path runs on the CPU:
the CPU build of torch has the fused Adam/AdamW/SGD kernels and the same ``found_inf`` contract."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TinyMLP, assert_matches, loader, make_trainer, reference
from fabric_script import Net
from test_core import ListLogger, data, poison, snapshot
from torch import nn

from lightning_gradhealth import GradientHealth, TrainingHealthError
from lightning_gradhealth.guard.deferred import DeviceSkip, device_skip_supported, resolve_mode


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "fused_adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    if kind == "fused_sgd":
        return torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, fused=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def _run(health: GradientHealth, model: nn.Module, opt: torch.optim.Optimizer, bad: set[int], steps: int = 10):
    """Train; poison the gradient at the steps in ``bad``. Returns the weights around the first bad step."""
    weights = {}
    for i, (x, y) in zip(range(steps), data(n=8 * steps), strict=False):
        nn.functional.mse_loss(model(x), y).backward()
        if i in bad:
            poison(model)
            weights["before"] = [p.detach().clone() for p in model.parameters()]
        if health.step(opt, step=i):
            opt.step()
        opt.zero_grad()
        if i in bad:
            weights["after"] = [p.detach().clone() for p in model.parameters()]
            weights["steps"] = [s["step"].clone() for s in opt.state.values() if "step" in s]
    return weights


@pytest.mark.parametrize("kind", ["fused_adamw", "fused_sgd", "adamw"])  # fused SGD with momentum, step > 0
@pytest.mark.parametrize("bad_step", [5, 4])  # a guarded step, and a computed (logged) one
def test_a_nan_raises_one_step_late_and_fused_optimizers_skip_it_on_the_device(tmp_path, kind, bad_step):
    model = Net()
    opt = _optimizer(kind, model)
    sink = ListLogger()
    health = GradientHealth(model, loggers=sink, log_every_n_steps=5, guard_mode="deferred", report_dir=tmp_path)
    with pytest.raises(TrainingHealthError) as info:
        _run(health, model, opt, {bad_step})
    err = info.value
    assert err.context["step"] == bad_step and err.context["layers"] == ["net.2"]
    message = str(err)
    assert f"at step {bad_step} " in message.splitlines()[0]
    assert f"Read at step {bad_step + 1} without a host sync" in message
    assert "net.2: gradient norm nan" in message
    assert not hasattr(opt, "found_inf")  # the flag never outlives the step it was for
    clean = kind.startswith("fused")
    assert ("skipped that update on the device, so the weights are clean" in message) == clean
    assert ("the weights took one bad update" in message) == (not clean)
    assert err.record.step == bad_step and not err.record.counts_exact
    assert sink.calls[-1][0] == bad_step  # the failing step is logged before the raise
    assert (tmp_path / "gradient_health_report.md").exists()


def test_fused_adamw_leaves_weights_and_step_counter_untouched_on_a_nan_step():
    model = Net()
    opt = _optimizer("fused_adamw", model)
    health = GradientHealth(model, log_every_n_steps=50, guard_mode="deferred", on_nonfinite="skip", report=False)
    weights = _run(health, model, opt, {3}, steps=8)
    assert all(torch.equal(a, b) for a, b in zip(weights["before"], weights["after"], strict=True))
    assert all(int(s) == 3 for s in weights["steps"])  # steps 0, 1, 2 counted; 3 skipped on the device
    assert health.guard.policy.skipped_steps == 1  # learned at step 4, with no sync
    health.close()
    assert all(int(s["step"]) == 7 for s in opt.state.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_skip_without_a_device_skip_is_checked_synchronously_and_says_so(capfd):
    model = Net()
    opt = _optimizer("adamw", model)
    health = GradientHealth(model, log_every_n_steps=50, guard_mode="deferred", on_nonfinite="skip", report=False)
    weights = _run(health, model, opt, {3}, steps=5)
    assert all(torch.equal(a, b) for a, b in zip(weights["before"], weights["after"], strict=True))
    assert health.guard.policy.skipped_steps == 1  # the synchronous guard skipped it before the update
    assert "checks synchronously here: on_nonfinite='skip' needs a fused Adam/AdamW/SGD" in capfd.readouterr().err


def test_deferred_records_equal_synchronous_ones_and_the_float64_reference():
    runs = {}
    for mode in ("sync", "deferred"):
        torch.manual_seed(0)
        model = Net()
        opt = _optimizer("fused_adamw", model)
        sink = ListLogger()
        health = GradientHealth(model, loggers=sink, log_every_n_steps=3, guard_mode=mode, report=False)
        refs = {}
        for i, (x, y) in enumerate(data(n=80)):
            nn.functional.mse_loss(model(x), y).backward()
            refs[i] = reference(*snapshot(model))
            assert health.step(opt, step=i)
            opt.step()
            opt.zero_grad()
            if mode == "deferred" and i in (2, 5):  # published at the next step, not at its own
                assert health.last_record is None or health.last_record.step < i
        health.close()
        runs[mode] = sink.calls
        for step, _ in sink.calls:
            record_keys = sink.at(step)
            assert math.isclose(record_keys["grad_health/total_norm"], refs[step]["total_norm"], rel_tol=1e-4)
        assert health.last_record is not None
        assert_matches(health.last_record, refs[health.last_record.step])
    assert [s for s, _ in runs["sync"]] == [s for s, _ in runs["deferred"]] == [2, 5, 8]
    for (_, a), (_, b) in zip(runs["sync"], runs["deferred"], strict=True):
        assert a.keys() == b.keys()
        assert all(math.isclose(a[k], b[k], rel_tol=1e-6, abs_tol=1e-12) for k in a)


def test_spikes_are_found_one_step_late_without_a_sync():
    torch.manual_seed(0)
    model = Net()
    opt = _optimizer("fused_adamw", model)
    health = GradientHealth(
        model, log_every_n_steps=4, guard_mode="deferred", spike_warmup_steps=5, verbose=False, report=False
    )
    for i, (x, y) in zip(range(12), data(n=96), strict=False):
        nn.functional.mse_loss(model(x), y).backward()
        if i == 9:
            for p in model.parameters():
                p.grad.mul_(1e4)
        health.step(opt, step=i)
        opt.zero_grad()  # (no update: the norm stays on its level)
        if i == 9:
            assert health.history.spikes == []  # not read yet
    assert [s for s, _ in health.history.spikes] == [9]
    health.close()


def test_auto_is_synchronous_on_the_cpu_and_deferred_on_cuda():
    kw = {"on_nonfinite": "raise", "on_spike": "warn", "clipping": False, "can_skip": False, "amp": False}
    assert resolve_mode("auto", torch.device("cpu"), **kw) == (False, None)
    assert resolve_mode("auto", torch.device("cuda"), **kw) == (True, None)
    assert resolve_mode("sync", torch.device("cuda"), **kw) == (False, None)
    assert resolve_mode("deferred", torch.device("cpu"), **kw) == (True, None)
    assert resolve_mode("deferred", torch.device("cpu"), **{**kw, "clipping": True})[0] is False
    assert resolve_mode("auto", torch.device("cuda"), **{**kw, "on_spike": "skip"})[0] is False
    skip = {**kw, "on_nonfinite": "skip"}
    assert resolve_mode("auto", torch.device("cuda"), **skip)[0] is False
    assert resolve_mode("auto", torch.device("cuda"), **{**skip, "can_skip": True}) == (True, None)


def test_device_skip_is_offered_only_where_the_kernel_reads_found_inf():
    model = Net()
    assert device_skip_supported(torch.optim.Adam(model.parameters(), fused=True))
    assert device_skip_supported(torch.optim.SGD(model.parameters(), lr=0.1, fused=True))
    assert not device_skip_supported(torch.optim.Adam(model.parameters()))
    assert not device_skip_supported(torch.optim.Adam(model.parameters(), foreach=True))
    assert not device_skip_supported(torch.optim.RMSprop(model.parameters()))
    momentum = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    assert not device_skip_supported(momentum)  # its momentum buffers do not exist yet
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    momentum.step()
    assert device_skip_supported(momentum)


def test_the_flag_is_taken_back_after_the_step_and_a_scalers_own_is_left_alone():
    model = Net()
    opt = torch.optim.Adam(model.parameters(), fused=True)
    skip = DeviceSkip()
    skip.arm(opt, torch.tensor(True))
    assert float(opt.found_inf) == 1.0
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert not hasattr(opt, "found_inf")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    skip.arm(opt, torch.tensor(False))
    theirs = torch.zeros(())
    opt.found_inf = theirs  # a GradScaler replaced it before its step: not ours to remove
    opt.step()
    assert opt.found_inf is theirs
    del opt.found_inf
    skip.arm(opt, torch.tensor(True))
    skip.close()  # a flag armed for a step that never came
    assert not hasattr(opt, "found_inf")


def test_the_callback_defers_and_a_nan_stops_the_trainer_with_the_weights_clean(tmp_path):
    from lightning_gradhealth import GradientHealthMonitor

    # TinyMLP's poison: the 6th micro-batch's net.2.weight gradient gets a NaN (step 5 without accumulation)
    model = TinyMLP(optimizer="adam", fused=True, poison={5: ("net.2.weight", math.nan)})
    monitor = GradientHealthMonitor(guard_mode="deferred", log_every_n_steps=4)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_steps=10)
    with pytest.raises(TrainingHealthError) as info:
        trainer.fit(model, loader())
    assert info.value.context["step"] == 5 and info.value.context["layers"] == ["net.2"]
    assert "(fused) skipped that update on the device" in str(info.value)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert monitor.health.guard.steps_seen == 6  # steps 0-5 decided; step 6 raised before its update


def test_nothing_in_flight_is_lost_when_the_loop_fails_or_ends(tmp_path):
    model = Net()
    opt = _optimizer("fused_adamw", model)
    sink = ListLogger()
    with pytest.raises(RuntimeError, match="data loader broke"):
        with GradientHealth(model, loggers=sink, log_every_n_steps=3, guard_mode="deferred", report=False) as health:
            for i, (x, y) in enumerate(data(n=80)):
                if i == 3:
                    raise RuntimeError("data loader broke")
                nn.functional.mse_loss(model(x), y).backward()
                health.step(opt, step=i)
                opt.step()
                opt.zero_grad()
    assert [s for s, _ in sink.calls] == [2]  # step 2's record was still in flight when the loop failed
    assert not hasattr(opt, "found_inf")
    # a NaN at the very last step is read when the run closes
    health = GradientHealth(model, loggers=sink, log_every_n_steps=50, guard_mode="deferred", report=False)
    _run(health, model, opt, {2}, steps=3)
    with pytest.raises(TrainingHealthError, match="at step 2 "):
        health.close()


def test_a_grad_scaler_overflow_is_counted_one_step_late_and_the_scaler_skips_it():
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)  # the scaler hands it its own found_inf
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    logger = ListLogger()
    health = GradientHealth(
        model, scaler=scaler, loggers=logger, log_every_n_steps=2, guard_mode="deferred", report=False
    )
    for i, (x, y) in enumerate(data()):
        loss = nn.functional.mse_loss(model(x), y)
        if i == 2:
            loss = loss * 3e38  # times the loss scale: the scaled gradients overflow float32
        scaler.scale(loss).backward()
        weights = [p.detach().clone() for p in model.parameters()]
        assert health.step(opt, step=i) is True
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
        opt.zero_grad()
    health.close()
    counts = {step: m["grad_health/amp_overflow"] for step, m in logger.calls}
    assert counts == {1: 0.0, 2: 1.0, 3: 1.0, 5: 1.0}  # as in synchronous mode (test_core), read a step later
    assert logger.at(3)["grad_health/amp_scale"] == 2.0**11



def test_a_deferred_run_draws_the_figure_from_its_records(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = Net()
    opt = _optimizer("fused_adamw", model)
    with GradientHealth(model, loggers=tmp_path, log_every_n_steps=5, guard_mode="deferred", report=False) as health:
        for i, (x, y) in zip(range(40), data(n=320), strict=False):
            nn.functional.mse_loss(model(x), y).backward()
            health.step(opt, step=i)
            opt.step()
            opt.zero_grad()
    (events,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    steps = [image.step for image in acc.Images("grad_health/gradient_flow")]
    assert steps[0] == 9 and steps[-1] == 39  # as a synchronous run draws them (test_tensorboard_view)
    assert [e.step for e in acc.Scalars("grad_health/total_norm")] == list(range(4, 40, 5))
