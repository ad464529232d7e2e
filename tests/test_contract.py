"""The front-end contract (core/contract.py): the calls the Lightning callback and a plain loop make on the core,
recorded in real runs, follow the documented order; the core satisfies the protocol; a broken order is named."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from conftest import TinyMLP, loader, make_trainer
from fabric_script import Net
from torch import nn

from lightning_gradhealth import GradientHealth, GradientHealthMonitor
from lightning_gradhealth.core.contract import CALLS, Pipeline, check_call_order
from lightning_gradhealth.output.pipeline import Frontend


def record_calls(health: Any) -> list[str]:
    """Wrap the contract's methods on ``health``; the front-end's calls (not the core's own) are appended."""
    calls: list[str] = []
    depth = [0]
    for name in CALLS:
        method = getattr(health, name)

        @functools.wraps(method)
        def wrapper(*args: Any, _name: str = name, _method: Any = method, **kwargs: Any) -> Any:
            if depth[0] == 0:
                calls.append(_name)
            depth[0] += 1
            try:
                return _method(*args, **kwargs)
            finally:
                depth[0] -= 1

        setattr(health, name, wrapper)
    return calls


def test_the_core_satisfies_the_protocol() -> None:
    assert isinstance(GradientHealth(None), Pipeline)
    assert isinstance(GradientHealthMonitor().health, Pipeline)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_lightning_callback_keeps_the_order(tmp_path, accumulate: int) -> None:
    monitor = GradientHealthMonitor(log_every_n_steps=2, report=False)
    calls = record_calls(monitor.health)
    trainer = make_trainer(tmp_path, callbacks=[monitor], max_epochs=2, accumulate_grad_batches=accumulate)
    trainer.fit(TinyMLP(), loader(n=48))
    check_call_order(calls)
    steps = trainer.global_step
    assert calls.count("before_step") == steps and calls.count("on_step") == steps  # guard on: every step acts
    assert calls.count("after_backward") == (2 * steps if accumulate > 1 else 0)
    assert calls[:2] == ["attach", "start"] and calls[-1] == "close"


def test_a_loop_keeps_the_order_and_an_exception_aborts() -> None:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    health = GradientHealth(None, log_every_n_steps=2, report=False)
    calls = record_calls(health)
    health.attach(Frontend.for_model(model, None, every=2), [opt], ddp=model)
    health.start()
    for i in range(4):
        for _ in range(2):  # accumulation
            nn.functional.mse_loss(model(torch.randn(4, 8)), torch.zeros(4, 1)).backward()
            health.after_backward()
        if health.step(opt, step=i):
            opt.step()
        opt.zero_grad()
    with pytest.raises(RuntimeError), health:
        raise RuntimeError("boom")
    check_call_order(calls)
    assert calls[-1] == "abort" and calls.count("on_step") == 4


def test_a_broken_order_is_named() -> None:
    with pytest.raises(ValueError, match=r"call 3 \('on_step'\) breaks the order"):
        check_call_order(["attach", "start", "before_batch", "on_step", "end_batch"])
    with pytest.raises(ValueError, match="`calls` must name the contract's calls"):
        check_call_order(["attach", "fly"])
    check_call_order(["attach", "start", "before_batch", "before_step", "end_batch", "close"])
