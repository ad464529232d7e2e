"""Snapshots of the training state in host memory, for recovery without a restart (:mod:`.recovery`).

A :class:`Snapshot` holds this rank's share of everything a rollback must put back: the parameters and buffers (the
local shard of FSDP2's DTensors), each optimizer's state (moments and step counters, fused optimizers' device step
tensors included) and its param groups' hyper-parameters, the LR schedulers, a GradScaler's scale and growth
tracker, the RNG states (torch CPU and CUDA, Python's) and the monitor's own running state. Tensors go into host
buffers that are reused from one snapshot to the next; on CUDA they are pinned and filled with non-blocking copies
(ordered on the stream before the update that follows, so the step does not wait), and an event is waited on only
when the buffers are read back or refilled. Nothing is written to disk.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_gradhealth.model.distributed import local

__all__ = ["Snapshot", "Targets", "restore", "take"]


@dataclass
class Targets:
    """What a snapshot covers besides the model and optimizers.

    Attributes:
        schedulers: LR schedulers (anything with ``state_dict``/``load_state_dict``).
        scaler: A ``torch.amp.GradScaler``, or ``None``.
        running_state: Returns the monitor's running state to keep (copied); ``load_running_state`` puts it back.
        load_running_state: Restores what ``running_state`` returned.
    """

    schedulers: Sequence[Any] = ()
    scaler: Any = None
    running_state: Callable[[], Any] = lambda: None
    load_running_state: Callable[[Any], None] = lambda state: None


@dataclass
class Snapshot:
    """One rank's training state at one optimizer step, in host memory.

    Attributes:
        step: The optimizer step it was taken at (before that step's update).
        healthy: Healthy steps seen since it was taken.
        trusted: Whether it may be rolled back to.
        buffers: Host copies of the tensors, in :func:`_tensors` order (reused by the next snapshot in this slot).
        layout: Per optimizer and parameter, the state keys held as tensors (``None``: no state yet).
        plain: The state's non-tensor values and each param group's hyper-parameters.
        schedulers: Each scheduler's ``state_dict``.
        rng: The RNG states.
        running: The monitor's running state.
        event: A CUDA event recorded after the copies (waited on before the buffers are read or refilled).
    """

    step: int = 0
    healthy: int = 0
    trusted: bool = False
    buffers: list[torch.Tensor] = field(default_factory=list)
    layout: list[list[tuple[str, ...] | None]] = field(default_factory=list)
    plain: list[Any] = field(default_factory=list)
    schedulers: list[Any] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    running: Any = None
    event: Any = None

    @property
    def nbytes(self) -> int:
        """Bytes of host memory its tensors take."""
        return sum(b.numel() * b.element_size() for b in self.buffers)

    def wait(self) -> None:
        """Wait for the copies into (or out of) the buffers to finish."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None


def _params(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from (local(p) for p in model.parameters())
    yield from (local(b) for b in model.buffers())


def _opt_layout(opt: Optimizer) -> tuple[list[tuple[str, ...] | None], list[Any]]:
    """Per parameter of ``opt``, its tensor state keys; the non-tensor values and param groups' settings."""
    keys: list[tuple[str, ...] | None] = []
    values: dict[int, dict[str, Any]] = {}
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        state = opt.state.get(p)
        if not state:
            keys.append(None)
            continue
        keys.append(tuple(sorted(k for k, v in state.items() if isinstance(v, torch.Tensor))))
        values[i] = {k: copy.deepcopy(v) for k, v in state.items() if not isinstance(v, torch.Tensor)}
    groups = [{k: _plain(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return keys, [values, groups]


def _plain(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _tensors(model: nn.Module, optimizers: Sequence[Optimizer], scaler: Any) -> list[torch.Tensor]:
    """Every tensor a snapshot copies, in a fixed order (the state's tensor keys sorted)."""
    out = list(_params(model))
    for opt in optimizers:
        for p in (p for g in opt.param_groups for p in g["params"]):
            state = opt.state.get(p) or {}
            out += [local(state[k]) for k in sorted(state) if isinstance(state[k], torch.Tensor)]
    if scaler is not None:
        out += [t for t in (getattr(scaler, "_scale", None), getattr(scaler, "_growth_tracker", None)) if t is not None]
    return out


def _rng() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def take(
    slot: Snapshot | None, step: int, model: nn.Module, optimizers: Sequence[Optimizer], targets: Targets
) -> Snapshot:
    """Copy the training state into ``slot``'s host buffers (reused when they fit) and return it as a snapshot."""
    snap = slot if slot is not None else Snapshot()
    snap.wait()
    sources = _tensors(model, optimizers, targets.scaler)
    reuse = len(snap.buffers) == len(sources) and all(
        b.shape == s.shape and b.dtype == s.dtype for b, s in zip(snap.buffers, sources, strict=True)
    )
    if not reuse:
        snap.buffers = [torch.empty(s.shape, dtype=s.dtype, pin_memory=s.is_cuda) for s in sources]
    cuda = any(s.is_cuda for s in sources)
    with torch.no_grad():
        if sources:
            torch._foreach_copy_(snap.buffers, sources, non_blocking=cuda)  # (one multi-tensor copy, no host sync)
    if cuda:
        snap.event = torch.cuda.Event()
        snap.event.record()
    layouts = [_opt_layout(opt) for opt in optimizers]
    snap.layout = [keys for keys, _ in layouts]
    snap.plain = [plain for _, plain in layouts]
    snap.schedulers = [copy.deepcopy(s.state_dict()) for s in targets.schedulers]
    snap.rng = _rng()
    snap.running = copy.deepcopy(targets.running_state())
    snap.step, snap.healthy, snap.trusted = step, 0, False
    return snap


def restore(snap: Snapshot, model: nn.Module, optimizers: Sequence[Optimizer], targets: Targets) -> None:
    """Put the training state of ``snap`` back, in place (every tensor keeps its identity, device and dtype)."""
    snap.wait()
    bufs = iter(snap.buffers)
    with torch.no_grad():
        for dst in _params(model):
            dst.copy_(next(bufs), non_blocking=dst.is_cuda)
        for opt, keys, (values, groups) in zip(optimizers, snap.layout, snap.plain, strict=True):
            _restore_groups(opt, groups)
            params = [p for g in opt.param_groups for p in g["params"]]
            for i, (p, held) in enumerate(zip(params, keys, strict=True)):
                if held is None:
                    opt.state.pop(p, None)  # no state at the snapshot: the optimizer starts it afresh
                    continue
                state = opt.state[p]
                for k in [k for k in state if k not in held and isinstance(state[k], torch.Tensor)]:
                    del state[k]
                for k in held:
                    buf = next(bufs)
                    if k in state:
                        local(state[k]).copy_(buf, non_blocking=state[k].is_cuda)
                    else:  # (dropped since the snapshot: a plain tensor comes back, on the parameter's device)
                        state[k] = buf.clone() if k == "step" and not p.is_cuda else buf.to(p.device, copy=True)
                state.update(copy.deepcopy(values.get(i, {})))
        scaler = targets.scaler
        for name in ("_scale", "_growth_tracker"):
            if scaler is not None and (t := getattr(scaler, name, None)) is not None:
                t.copy_(next(bufs), non_blocking=t.is_cuda)
    if next(bufs, None) is not None:
        raise RuntimeError("The model or its optimizers changed since the snapshot: it cannot be restored.")
    for scheduler, state in zip(targets.schedulers, snap.schedulers, strict=True):
        scheduler.load_state_dict(copy.deepcopy(state))
    torch.set_rng_state(snap.rng["torch"])
    random.setstate(snap.rng["python"])
    if "cuda" in snap.rng:
        torch.cuda.set_rng_state_all(snap.rng["cuda"])
    targets.load_running_state(copy.deepcopy(snap.running))


def _restore_groups(opt: Optimizer, groups: list[dict[str, Any]]) -> None:
    for group, saved in zip(opt.param_groups, groups, strict=True):
        for k, v in saved.items():
            if isinstance(group.get(k), torch.Tensor) and isinstance(v, torch.Tensor):
                group[k].copy_(v)
            else:
                group[k] = _plain(v)
