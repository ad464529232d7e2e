"""Advice fitted to the run: the front-end in use, and a learning-rate cut sized to the evidence."""

from __future__ import annotations

import re

__all__ = ["for_frontend", "lr_fix"]


_TRAINER_OR = re.compile(r"\s*(?:#\s*)?or Trainer\([^)]*\)")


def for_frontend(text: str, frontend: str | None) -> str:
    """``text`` (a fix or code) fitted to the front-end in use.

    The Lightning callback (``"GradientHealthMonitor"``) and an unknown front-end (``None``) keep it as it is; a loop
    (``"GradientHealth"``) is never told to change a ``Trainer`` argument or to build the callback: those become the
    loop API's own arguments (``GradientHealth(model, clip='norm', ...)``).
    """
    if frontend is None or frontend == "GradientHealthMonitor":
        return text
    text = _TRAINER_OR.sub("", text)
    return text.replace("GradientHealthMonitor(", f"{frontend}(model, ")


def lr_fix(lr: float | None, severe: bool) -> str:
    """The learning-rate fix sized to the evidence.

    Args:
        lr: The learning rate in use (the largest of the parameter groups), when known.
        severe: Whether the run blew up (the loss rose past the critical line, NaN losses, or a learning rate far
            above the usual ranges): a 3-10x cut does not fix an lr of 1.0.
    """
    usual = "Adam-family optimizers usually train at 1e-4 to 3e-3 (transformers at the low end), SGD at 0.01 to 0.1"
    if lr is not None and (severe or lr >= 0.05):
        target = min(lr / 100, 1e-3)
        return f"lower the learning rate by 100x or more (from {lr:g} to ~{target:g}) and add a warm-up: {usual}"
    if severe:
        return f"lower the learning rate by 100x or more and add a warm-up: {usual}"
    return "lower the learning rate (3-10x) or lengthen the warm-up: the loss rises with the gradient norm"
