"""Recovery without a restart (``recover=``): snapshots restored bit for bit, a transient fault survived in a plain
loop, a warmup overshoot survived in a Trainer (and a healthy run untouched), a resume that keeps the backed-off
learning rate, and 2-process DDP / FSDP2 runs that roll back on every rank at the same step."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from archs import GPT, Task, _lm_loss, _loader, markov_tokens
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_gradhealth import GradientHealth, GradientHealthMonitor, HealthOptions, Recovery, TrainingHealthError
from lightning_gradhealth.guard.snapshot import Targets, restore, take
from lightning_gradhealth.schema import metrics

HERE = Path(__file__).parent
warnings.filterwarnings("ignore", message=".*(does not have many workers|smaller than the logging).*")


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"every_n_steps": 0}, ValueError, ("Recovery.every_n_steps", "an int >= 1", "0")),
        ({"every_n_steps": 2.5}, TypeError, ("Recovery.every_n_steps", "an int >= 1", "2.5")),
        ({"lr_factor": 1.0}, ValueError, ("Recovery.lr_factor", "(0, 1)", "1.0")),
        ({"lr_factor": True}, TypeError, ("Recovery.lr_factor", "(0, 1)", "True")),
        ({"spike_factor": math.inf}, ValueError, ("Recovery.spike_factor", "> 1", "inf")),
        ({"lr_return_steps": 0}, ValueError, ("Recovery.lr_return_steps", "or None", "0")),
        ({"trust_after": 60, "slots": 2}, ValueError, ("Recovery.slots", ">= 1 + ceil", "slots=2")),
    ],
)
def test_recovery_arguments_are_validated_naming_argument_allowed_and_received(kwargs, error, words):
    with pytest.raises(error) as info:
        Recovery(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_recover_option():
    assert HealthOptions().recovery is None
    assert HealthOptions(recover=True).recovery == Recovery()
    assert HealthOptions(recover=Recovery(every_n_steps=7)).recovery.every_n_steps == 7
    assert HealthOptions(recover=True, on_nonfinite=None, spike_z_thresh=None).guards_every_step
    with pytest.raises(TypeError, match=r"`recover` must be False, True or a lightning_gradhealth.Recovery, got 'y'"):
        HealthOptions(recover="y")
    with pytest.raises(ValueError, match=r"`guard_mode` must be 'auto' or 'sync' with it, got guard_mode='deferred'"):
        GradientHealthMonitor(recover=True, guard_mode="deferred")
    assert GradientHealthMonitor(recover=True).recover is True


# --------------------------------------------------------------------------- snapshots, bit for bit
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)  # buffers: running statistics and the batch counter
        self.drop = nn.Dropout(0.3)  # draws from the RNG
        self.b = nn.Linear(12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.bn(self.a(x)))))


def _train(model, opts, scheds, scaler, gen, steps):
    for _ in range(steps):
        x = torch.randn(16, 6, generator=gen)
        loss = model(x).pow(2).mean() + 0.01 * random.random()
        scaler.scale(loss).backward()
        for opt in opts:
            scaler.step(opt)
            opt.zero_grad()
        scaler.update()
        for sched in scheds:
            sched.step()


def test_restored_state_equals_the_snapshot_bit_for_bit():
    """Parameters, buffers, optimizer moments and step counters (fused AdamW's too), param-group learning rates,
    schedulers, the GradScaler, the torch and Python RNGs: all back to the snapshot, in the same tensors."""
    torch.manual_seed(0)
    model = _Net()
    adam = torch.optim.Adam([*model.a.parameters(), *model.bn.parameters()], lr=1e-2)
    fused = torch.optim.AdamW(model.b.parameters(), lr=1e-2, fused=True)
    opts = [adam, fused]
    scheds = [torch.optim.lr_scheduler.LambdaLR(adam, lambda s: 1 / (1 + s)), torch.optim.lr_scheduler.StepLR(fused, 2)]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    _train(model, opts, scheds, scaler, gen, 3)
    targets = Targets(schedulers=scheds, scaler=scaler)
    snap = take(None, 3, model, opts, targets)
    expected = {
        "model": copy.deepcopy(model.state_dict()),
        "opts": [copy.deepcopy(opt.state_dict()) for opt in opts],
        "scheds": [copy.deepcopy(s.state_dict()) for s in scheds],
        "scale": (scaler._scale.clone(), scaler._growth_tracker.clone()),
        "rng": (torch.get_rng_state(), random.getstate()),
    }
    identity = [id(t) for t in (*model.parameters(), *(v for s in adam.state.values() for v in s.values()))]
    _train(model, opts, scheds, scaler, gen, 4)
    torch.rand(5)
    assert not torch.equal(model.a.weight, expected["model"]["a.weight"])  # (it moved)
    restore(snap, model, opts, targets)
    for key, value in expected["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    for opt, state in zip(opts, expected["opts"], strict=True):
        now = opt.state_dict()
        assert now["param_groups"] == state["param_groups"]
        for index, moments in state["state"].items():
            assert set(now["state"][index]) == set(moments)
            for name, value in moments.items():
                assert torch.equal(now["state"][index][name], value), (index, name)
                assert now["state"][index][name].dtype == value.dtype
    assert fused.state[model.b.weight]["step"].item() == 3  # fused AdamW's step tensor
    assert [s.state_dict() for s in scheds] == expected["scheds"]
    assert torch.equal(scaler._scale, expected["scale"][0]) and torch.equal(
        scaler._growth_tracker, expected["scale"][1]
    )
    assert torch.equal(torch.get_rng_state(), expected["rng"][0]) and random.getstate() == expected["rng"][1]
    assert [id(t) for t in (*model.parameters(), *(v for s in adam.state.values() for v in s.values()))] == identity
    # the next snapshot in this slot reuses its host buffers
    pointers = [b.data_ptr() for b in snap.buffers]
    assert [b.data_ptr() for b in take(snap, 9, model, opts, targets).buffers] == pointers
    assert snap.nbytes == sum(b.numel() * b.element_size() for b in snap.buffers) > 0


# --------------------------------------------------------------------------- a plain loop
def _plain(tmp_path: Path | None = None, fault: dict[int, float] | None = None, steps: int = 150, **kwargs: Any):
    """An MLP regression with SGD + momentum; ``fault``: step -> a value written into one gradient entry."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 1, generator=gen)
    loggers = CSVLogger(str(tmp_path), name="csv") if tmp_path is not None else None
    health = GradientHealth(model, loggers=loggers, log_every_n_steps=10, report=tmp_path is not None,
                            report_dir=tmp_path, **kwargs)  # fmt: skip
    losses = []
    for step in range(steps):
        x = torch.randn(32, 8, generator=gen)
        loss = nn.functional.mse_loss(model(x), x @ teacher)
        loss.backward()
        if fault and step in fault:
            model[2].weight.grad.view(-1)[3] = fault[step]
        if health.step(opt, step=step, loss=loss.detach()):
            opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    health.close()
    return losses, health, model


def _tail(losses: list[float], n: int = 20) -> float:
    return sum(losses[-n:]) / n


def _csv(tmp_path: Path) -> list[dict[str, str]]:
    (path,) = tmp_path.glob("csv/*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def test_a_transient_fault_that_stops_the_run_today_is_survived(tmp_path, capfd):
    """One gradient entry set to 1e12 at step 100: today the next step goes non-finite and the run stops; with
    recover=True (the defaults) the run rolls back to the snapshot of step 50 and ends near the unfaulted loss."""
    clean, _, _ = _plain()
    with pytest.raises(TrainingHealthError, match="Non-finite gradients at step 101"):
        _plain(fault={100: 1e12})
    losses, health, _ = _plain(tmp_path, fault={100: 1e12}, recover=True)
    (event,) = health.recovery.events
    assert event == {"step": 100, "to_step": 50, "trigger": "absurd update", "factor": 0.5, "skipped": [50, 100],
                     "reason": event["reason"]}  # fmt: skip
    assert all(math.isfinite(v) for v in losses)
    assert _tail(losses) < 1.5 * _tail(clean)
    assert _tail(losses) > 0  # (a regression that learns: the clean run's tail is ~0.015)
    err = capfd.readouterr().err
    assert "rollback 1/10 at step 100 to the snapshot of step 50 (absurd update" in err
    assert "batches 50-100 skipped, learning-rate factor now 0.5" in err
    logged = {int(r["step"]): (float(r[metrics.ROLLBACKS]), float(r[metrics.LR_FACTOR]))
              for r in _csv(tmp_path) if r.get(metrics.ROLLBACKS)}  # fmt: skip
    assert (logged[99], logged[109], logged[149]) == ((0.0, 1.0), (1.0, 0.5), (1.0, 0.5))  # (logged steps: 9, 19, ...)
    report = json.loads((tmp_path / "gradient_health_report.json").read_text())
    assert report["recovery"] == [event]
    assert "### Recovery" in (tmp_path / "gradient_health_report.md").read_text()


def test_a_healthy_run_with_recovery_is_untouched():
    clean, _, model = _plain(steps=120)
    same, health, twin = _plain(steps=120, recover=Recovery(every_n_steps=10, trust_after=5))
    assert same == clean  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    assert health.recovery.rollbacks == 0 and health.recovery.factor == 1.0
    assert len(health.recovery.snapshots) == 2 and health.recovery.snapshots[0].trusted


def test_a_nonfinite_step_is_skipped_and_a_second_one_rolls_back(capfd):
    rec = Recovery(every_n_steps=10, trust_after=5)
    losses, health, _ = _plain(fault={40: math.nan}, steps=60, recover=rec)  # once: skipped, no rollback
    assert health.recovery.rollbacks == 0 and "non-finite step 40 skipped" in capfd.readouterr().err
    assert all(math.isfinite(v) for v in losses)
    _, health, _ = _plain(fault={40: math.nan, 45: math.inf}, steps=60, recover=rec)
    (event,) = health.recovery.events
    assert (event["step"], event["to_step"], event["trigger"]) == (45, 30, "nonfinite")


def test_too_many_rollbacks_stop_the_run_with_the_report(tmp_path):
    rec = Recovery(every_n_steps=10, trust_after=5, max_rollbacks=1)
    with pytest.raises(TrainingHealthError, match=r"Recovery gave up after 1 rollbacks, at another absurd update"):
        _plain(tmp_path, fault={60: 1e12, 80: 1e12}, steps=100, recover=rec)
    assert json.loads((tmp_path / "gradient_health_report.json").read_text())["recovery"][0]["step"] == 60


def test_the_lr_factor_rides_on_top_of_the_schedule_and_comes_back():
    """After a rollback the update is lr(schedule) x factor exactly; the scheduler never sees the factor; after
    lr_return_steps healthy steps the factor doubles back, up to the ceiling that the rollback lowered."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + 0.01 * s))
    health = GradientHealth(model, log_every_n_steps=50, report=False, schedulers=[sched],
                            recover=Recovery(every_n_steps=5, trust_after=2, lr_return_steps=6))  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(30):
        x = torch.randn(8, 4, generator=gen)
        model(x).pow(2).mean().backward()
        if step == 13:
            model.weight.grad[0, 0] = 1e9
        before = model.weight.detach().clone()
        grad = model.weight.grad.clone()
        if health.step(opt, step=step):
            scheduled = sched.get_last_lr()[0]
            opt.step()
            applied = (before - model.weight.detach()) / grad
            seen.append((step, health.recovery.factor, scheduled, applied.mean().item()))
            assert opt.param_groups[0]["lr"] == scheduled  # the post-hook put the schedule's value back
        else:
            assert step == 13
            assert sched.last_epoch == 10  # restored with the snapshot of step 10
        opt.zero_grad()
        sched.step()
    for step, factor, scheduled, applied in seen:
        assert applied == pytest.approx(scheduled * factor, rel=1e-5), step
    factors = {step: factor for step, factor, _, _ in seen}
    assert factors[12] == 1.0 and factors[14] == 0.5 and factors[18] == 0.5
    assert factors[19] == pytest.approx(math.sqrt(0.5))  # 6 healthy steps (14-19): doubled, capped at the ceiling
    assert factors[29] == pytest.approx(math.sqrt(0.5))
    state = health.state_dict()["recovery"]
    assert state["rollbacks"] == 1 and state["factor"] == pytest.approx(math.sqrt(0.5))


# --------------------------------------------------------------------------- a Trainer: a warmup overshoot
class _Losses(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []
        self.lrs: list[tuple[float, float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # (after the monitor's hook)
        self.lrs.append((optimizer.param_groups[0]["lr"], trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _gpt(peak: float) -> tuple[L.LightningModule, Any]:
    """A 2-layer GPT on a Markov chain; AdamW warmed up linearly to ``peak`` over 100 steps."""
    torch.manual_seed(0)
    model = GPT(vocab=32, ctx=16, d=32, layers=2, heads=2)
    seqs = markov_tokens(512, 17, vocab=32, seed=3)

    def optimizer(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW(m.parameters(), lr=peak, betas=(0.9, 0.95), weight_decay=0.0)

    return Task(model, _lm_loss, optimizer, lambda s: min(1.0, (s + 1) / 100)), _loader(seqs, batch_size=16, seed=4)


def _fit(out: Path, peak: float, recover: Any, steps: int = 200, ckpt: Path | None = None, **trainer: Any) -> Any:
    task, loader = _gpt(peak)
    monitor = GradientHealthMonitor(log_every_n_steps=10, recover=recover, report=False, verbose=False)
    record = _Losses()
    settings = {"logger": False, "enable_checkpointing": False, **trainer}
    settings["callbacks"] = [monitor, record, *settings.get("callbacks", [])]
    fit = L.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=str(out), **settings)  # fmt: skip
    fit.fit(task, loader, ckpt_path=ckpt)
    return record, monitor


def test_a_warmup_overshoot_in_a_trainer_is_survived_and_a_resume_keeps_the_backed_off_factor(tmp_path):
    """A warmup to 100x the sane peak learns, then wrecks the run; with recover=True it rolls back, backs off and
    ends near the sane run's loss. A healthy run with recover=True is the same run, bit for bit. A checkpoint taken
    after the rollback resumes with the backed-off learning-rate factor."""
    torch.set_num_threads(1)
    sane, _ = _fit(tmp_path / "sane", 3e-3, False)
    same, monitor = _fit(tmp_path / "same", 3e-3, True)
    assert same.losses == sane.losses and monitor.health.recovery.rollbacks == 0
    wrecked, _ = _fit(tmp_path / "wrecked", 0.3, False)
    assert min(wrecked.losses[:60]) < 1.5 and _tail(wrecked.losses) > 2 * _tail(sane.losses)  # learned, then wrecked
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=100, save_top_k=-1)
    saved, monitor = _fit(tmp_path / "saved", 0.3, True, callbacks=[ckpts], enable_checkpointing=True)
    events = monitor.health.recovery.events
    assert events and events[0]["trigger"] == "divergence" and events[0]["step"] < 100
    assert _tail(saved.losses) < 1.25 * _tail(sane.losses)
    for lr, scheduled in saved.lrs[events[0]["step"] + 1 : events[0]["step"] + 10]:
        assert lr == pytest.approx(scheduled * events[0]["factor"])  # on top of the schedule
    before = [e for e in events if e["step"] < 100]
    factor = before[-1]["factor"]
    (ckpt,) = (tmp_path / "ckpt").glob("*step=100.ckpt")
    resumed, again = _fit(tmp_path / "resumed", 0.3, True, steps=110, ckpt=ckpt,
                          logger=CSVLogger(str(tmp_path), name="csv"))  # fmt: skip
    assert again.health.recovery.events[: len(before)] == before
    assert len(resumed.lrs) == 10
    for lr, scheduled in resumed.lrs:
        assert lr == pytest.approx(scheduled * factor)
    logged = {int(r["step"]): float(r[metrics.LR_FACTOR]) for r in _csv(tmp_path) if r.get(metrics.LR_FACTOR)}
    assert logged and set(logged.values()) == {factor}


# --------------------------------------------------------------------------- every rank agrees
def test_two_processes_roll_back_at_the_same_step_each_restoring_its_shard(tmp_path):
    """DDP, then FSDP2, on 2 gloo processes: rank 1's gradient alone is faulted at step 17; both ranks roll back at
    that step to the snapshot of step 10, their (local, under FSDP2 sharded) parameters and Adam moments equal to
    that step's bit for bit, and the full weights are the same on both ranks at the end."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(HERE / "recovery_dist_script.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for mode in ("ddp", "fsdp2"):
        r0, r1 = (torch.load(tmp_path / f"{mode}_rank{r}.pt", weights_only=False) for r in (0, 1))
        assert r0["events"] == r1["events"] and len(r0["events"]) == 1, mode
        assert (r0["events"][0]["step"], r0["events"][0]["to_step"]) == (17, 10)
        for r in (r0, r1):
            for key in ("params", "exp_avg_sq"):
                assert len(r["snapshot"][key]) == 6
                for a, b in zip(r["snapshot"][key], r["after_rollback"][key], strict=True):
                    assert torch.equal(a, b), (mode, key)
            assert all(math.isfinite(float(p.abs().max())) for p in r["full"])
        assert all(torch.equal(a, b) for a, b in zip(r0["full"], r1["full"], strict=True)), mode
        if mode == "fsdp2":  # each rank held and restored its own shard
            assert not torch.equal(r0["snapshot"]["params"][0], r1["snapshot"]["params"][0])
    assert proc.stderr.count("rollback 1/10 at step 17 to the snapshot of step 10") == 2  # rank zero, each mode
