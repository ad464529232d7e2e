"""Where a NaN was born: replay a failing step with hooks and find the module that produced it.

When a NaN appears in a middle layer's forward pass, every later activation and every gradient is NaN, so naming the
first non-finite layer *in definition order* names a bystander. On a failing step only (rare, so the cost is paid
only then), :func:`find_birthplace` recomputes the step's loss with the RNG state the step started from and watches
the tensors flow through every module, parameter-free ones included:

- forward, in execution order: the first module whose output is non-finite while its inputs (and its own
  parameters) are finite;
- then the loss: finite activations but a non-finite loss;
- backward, in execution order (tensor hooks on each module's inputs and outputs, so in-place modules keep working):
  the first module whose input gradient is non-finite while the gradient reaching its output is finite, else the
  first whose own parameters' gradient is; a gradient already non-finite where it enters the model comes from the
  loss.

The replay never writes ``.grad`` (gradients are taken with :func:`torch.autograd.grad`), so the caller's state and
DDP's reducer are left alone. The RNG state is captured cheaply at each step's start (:func:`rng_state`: a small CPU
copy, and the CUDA generator's seed and offset, with no host synchronisation).

This is the "anomaly detection" idea of :func:`torch.autograd.detect_anomaly` (which checks backward only, on every
step, at a large cost) turned into a post-mortem of one step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from lightning_gradhealth.schema.record import StepStats

__all__ = [
    "Birthplace",
    "NoBirthplace",
    "Replay",
    "Replays",
    "RngState",
    "describe",
    "find_birthplace",
    "fold_loss",
    "rng_state",
]


@dataclass(frozen=True)
class RngState:
    """The random number generators' state at a step's start (restored for the replay).

    Attributes:
        cpu: ``torch.get_rng_state()``.
        cuda: ``torch.cuda.get_rng_state()`` of the current device, when CUDA is initialised.
        cuda_device: That device's index.
    """

    cpu: torch.Tensor
    cuda: torch.Tensor | None = None
    cuda_device: int | None = None


def rng_state() -> RngState:
    """Capture the RNG state now (a 5 kB CPU copy, and the CUDA generator's seed and offset: no host sync)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        return RngState(torch.get_rng_state(), torch.cuda.get_rng_state(device), device)
    return RngState(torch.get_rng_state())


@dataclass(frozen=True)
class Birthplace:
    """Where the first non-finite value of a replayed step was produced.

    Attributes:
        module: The module's qualified name (``""`` for the model itself, ``"loss"`` for the loss).
        phase: ``"forward"`` or ``"backward"``.
        detail: What happened there (``"output NaN from finite input"``).
    """

    module: str
    phase: Literal["forward", "backward"]
    detail: str

    def describe(self) -> str:
        """One line: ``born in `blocks.4` (forward): output NaN from finite input``."""
        if self.module == "loss":
            where = "the loss"
        elif self.module == "":
            where = "the model's own code (outside its submodules)"
        else:
            where = f"`{self.module}`"
        return f"born in {where} ({self.phase}): {self.detail}"


@dataclass(frozen=True)
class NoBirthplace:
    """Why the replay could not say where the NaN was born.

    Attributes:
        reason: A sentence for the message.
    """

    reason: str


def _tensors(value: Any) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]


def _kind(tensors: Iterable[torch.Tensor]) -> str | None:
    """``"NaN"``, ``"Inf"`` or ``None`` (all finite): one host sync per call (failing steps only)."""
    nan = inf = False
    for t in tensors:
        t = t.detach()
        if t.numel() == 0:
            continue
        nan = nan or bool(torch.isnan(t).any())
        inf = inf or bool(torch.isinf(t).any())
    return "NaN" if nan else "Inf" if inf else None


class _Watch:
    """Forward hooks and backward tensor hooks on every module, recording the first birth in execution order."""

    def __init__(self, model: nn.Module) -> None:
        self.forward: Birthplace | None = None
        self.backward: Birthplace | None = None
        self.grad_in_clean: dict[str, bool] = {}  # module -> every gradient reaching its outputs was finite
        self.first_bad_grad: str | None = None  # the first module whose output gradient arrived non-finite
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()]
        self.modules = dict(model.named_modules())

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            outs, ins = _tensors(output), _tensors(inputs)
            if self.forward is None:
                bad = _kind(outs)
                if bad is not None and _kind(ins) is None:
                    own = _kind(module.parameters(recurse=False))
                    detail = (
                        f"output {bad} from finite input"
                        if own is None
                        else f"its own parameters are {own} (an update already applied corrupted them, so the step "
                        "cannot be replayed as it ran)"
                    )
                    self.forward = Birthplace(name, "forward", detail)
            if not torch.is_grad_enabled():
                return
            for t in outs:
                if t.requires_grad:
                    t.register_hook(self._out_grad(name))
            for t in ins:
                if t.requires_grad:
                    t.register_hook(self._in_grad(name))

        return hook

    def _out_grad(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            bad = _kind([grad])
            self.grad_in_clean[name] = self.grad_in_clean.get(name, True) and bad is None
            if bad is not None and self.first_bad_grad is None:
                self.first_bad_grad = name

        return hook

    def _in_grad(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            if self.backward is not None or not self.grad_in_clean.get(name, False):
                return
            bad = _kind([grad])
            if bad is not None:
                self.backward = Birthplace(name, "backward", f"input gradient {bad} from a finite output gradient")

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _set_rng(state: RngState) -> None:
    torch.set_rng_state(state.cpu)
    if state.cuda is not None:
        torch.cuda.set_rng_state(state.cuda, state.cuda_device)


def _loss_of(value: Any) -> torch.Tensor:
    if isinstance(value, dict):
        value = value.get("loss")
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the replay returned {type(value).__name__}, not a loss tensor (or a dict with 'loss')")
    return value


def find_birthplace(
    model: nn.Module, replay_fn: Callable[[], Any], rng: RngState | None = None
) -> Birthplace | NoBirthplace:
    """Replay a failing step with hooks on every module and say where its first non-finite value was produced.

    Args:
        model: The model (the unwrapped module: names are its ``named_modules``).
        replay_fn: Recomputes the step's loss from the step's batch (a tensor, or a dict with ``"loss"``, as a
            ``training_step`` returns).
        rng: The RNG state at the step's start (restored before the replay, and the current state restored after).

    Returns:
        The :class:`Birthplace`, or :class:`NoBirthplace` with the reason (the replay failed, or everything was finite
        this time: the weights moved, the data source was consumed, or an operation is non-deterministic).
    """
    saved = rng_state()
    watch = _Watch(model)
    was_training = model.training
    try:
        if rng is not None:
            _set_rng(rng)
        model.train()
        with torch.enable_grad():
            loss = _loss_of(replay_fn())
            if watch.forward is not None:
                return watch.forward
            bad = _kind([loss])
            if bad is not None:
                return Birthplace("loss", "forward", f"the loss is {bad} while every module's output is finite")
            params = [p for p in model.parameters() if p.requires_grad]
            if not params or not loss.requires_grad:
                return NoBirthplace("the replayed loss does not depend on the trainable parameters")
            grads = torch.autograd.grad(loss.sum(), params, allow_unused=True)
    except Exception as err:  # a replay that cannot run must not hide the original failure
        return NoBirthplace(f"the replay failed ({type(err).__name__}: {err})")
    finally:
        watch.remove()
        model.train(was_training)
        _set_rng(saved)
    if watch.backward is not None:
        return watch.backward
    if watch.first_bad_grad is not None and watch.first_bad_grad == "":
        return Birthplace("loss", "backward", "the loss's gradient with respect to the model's output is non-finite")
    owner = {id(p): name for name, m in watch.modules.items() for p in m.parameters(recurse=False)}
    for p, g in zip(params, grads, strict=True):
        if g is not None and (bad := _kind([g])) is not None:
            name = owner.get(id(p), "")
            if watch.grad_in_clean.get(name, True):
                return Birthplace(name, "backward", f"its parameters' gradient is {bad} from a finite output gradient")
    if watch.first_bad_grad is not None:
        return Birthplace("loss", "backward", f"the gradient reaching `{watch.first_bad_grad}` is already non-finite")
    return NoBirthplace(
        "the replayed step is finite: the weights moved since, the data or the random state differ, or an operation "
        "is non-deterministic"
    )


def describe(result: Birthplace | NoBirthplace | None) -> str | None:
    """The message's line for a replay's result (``None`` when no replay was possible)."""
    if result is None:
        return None
    if isinstance(result, Birthplace):
        line = result.describe()
        return line[0].upper() + line[1:] + "."
    return "Where it was born: unknown (" + result.reason + "); the non-finite layers follow."



#: A front-end's replay of a step: one callable (recomputes the loss), or one ``(callable, RNG state)`` per
#: micro-batch of an accumulated step.
Replay = Callable[[], Any] | Sequence[tuple[Callable[[], Any], RngState]]


class Replays:
    """What the core keeps so that a failing step can be replayed.

    The RNG state at each step's start, and the last few steps' replays (a guard that reads its verdict a step or two
    late fails on an older step).

    Args:
        enabled: ``replay_nonfinite``.
        keep: How many recent steps' replays are kept (references only: the batches stay alive that long).
    """

    def __init__(self, enabled: bool = True, keep: int = 3) -> None:
        self.enabled = enabled
        self.keep = keep
        self.rng: RngState | None = None
        self._steps: dict[int, Replay] = {}

    def mark(self) -> None:
        """A step's forward pass is about to start: remember the RNG state (a few microseconds)."""
        if self.enabled:
            self.rng = rng_state()

    def add(self, step: int, replay: Replay | None) -> None:
        """The replay of step ``step`` (a single callable is paired with the RNG state at the step's start)."""
        if not self.enabled or replay is None:
            return
        self._steps[step] = [(replay, self.rng)] if callable(replay) else list(replay)  # type: ignore[list-item]
        while len(self._steps) > self.keep:
            self._steps.pop(next(iter(self._steps)))

    def birth(self, record: StepStats, model: nn.Module, sharded: bool = False) -> StepStats:
        """The failing ``record`` with :attr:`~StepStats.nonfinite_birth` from a replay of its step (rare: a raise)."""
        if not self.enabled:
            return record
        replays = self._steps.pop(record.step, None)
        if sharded:
            result: Birthplace | NoBirthplace = NoBirthplace(
                "not replayed: the model is sharded across processes (FSDP, tensor or pipeline parallelism), and a "
                "replay re-runs the forward pass on this rank alone, whose collectives (and other stages) would not "
                "take part"
            )
        elif not replays:
            result = NoBirthplace(
                "no replay: pass `replay=lambda: loss_fn(model(x), y)` to `GradientHealth.step` to find it"
            )
        else:
            micro = record.first_nonfinite_micro_batch or 0
            fn, rng = replays[min(micro, len(replays) - 1)]
            result = find_birthplace(model, fn, rng)
        return replace(record, nonfinite_birth=describe(result))


def fold_loss(pending: Any, loss: torch.Tensor | float | None) -> None:
    """Make a step's guarded norm non-finite when its loss is (``+ 0 * loss``, on the device: no sync).

    A NaN loss whose gradients are finite (``loss + log(-loss)``) then fails the step like a NaN gradient, and its
    replay names the loss. ``pending``: the engine's :class:`~lightning_gradhealth.stats.engine.PendingStats`.
    """
    if loss is None:
        return
    at = 0
    for name, length in pending.schema:
        if name == "total_norm":
            value = torch.as_tensor(loss).detach().reshape(())
            if value.device != pending.packed.device:
                value = value.to(pending.packed.device)
            pending.packed[at].add_(value * 0)
            return
        at += length
