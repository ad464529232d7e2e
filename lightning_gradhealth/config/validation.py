"""Constructor-argument validation: every error names the argument, what is allowed and what was received."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["check_choice", "check_float", "check_group_by", "check_int", "check_norm_type", "check_regex", "check_type"]


def _received(value: Any) -> str:
    return f"{value!r} (type {type(value).__name__})"


def check_type(name: str, value: Any, types: type | tuple[type, ...], allowed: str) -> None:
    """Raise ``TypeError`` unless ``value`` is an instance of ``types`` (``bool`` never passes for ``int``)."""
    bad_bool = isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))
    if bad_bool or not isinstance(value, types):
        raise TypeError(f"`{name}` must be {allowed}, got {_received(value)}.")


def check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    """Validate an integer argument with a lower bound."""
    allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
    if value is None and allow_none:
        return
    check_type(name, value, int, allowed)
    if value < minimum:
        raise ValueError(f"`{name}` must be {allowed}, got {_received(value)}.")


def check_choice(name: str, value: Any, choices: Collection[Any], *, also: str = "") -> None:
    """Validate that ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = " | ".join(repr(c) for c in choices) + (f" | {also}" if also else "")
        raise ValueError(f"`{name}` must be one of {allowed}, got {_received(value)}.")


def check_norm_type(name: str, value: Any) -> float:
    """Validate a norm order: a real number ``>= 1`` or ``inf``. Returns it as a float."""
    allowed = "a float >= 1 (e.g. 1, 2) or float('inf')"
    check_type(name, value, (int, float), allowed)
    if math.isnan(value) or value < 1:
        raise ValueError(f"`{name}` must be {allowed}, got {_received(value)}.")
    return float(value)


def check_regex(name: str, value: Any) -> re.Pattern[str] | None:
    """Validate an optional regex (string or compiled pattern); returns the compiled pattern or None."""
    if value is None:
        return None
    check_type(name, value, (str, re.Pattern), "None, a regex string or a compiled re.Pattern")
    if isinstance(value, re.Pattern):
        return value
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"`{name}` must be a valid regular expression, got {value!r}: {err}.") from err


def check_group_by(name: str, value: Any) -> str | Callable[[str], str]:
    """Validate ``group_by``: ``"module"``, ``"parameter"`` or a callable ``(param_name) -> layer_name``."""
    if callable(value):
        return value  # type: ignore[no-any-return]
    allowed = "'module' | 'parameter' | a callable (param_name: str) -> str"
    check_type(name, value, str, f"one of {allowed}")
    check_choice(name, value, ("module", "parameter"), also="a callable (param_name: str) -> str")
    return value  # type: ignore[no-any-return]


def check_float(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """Validate a real number in ``[low, high]`` (``(low, high]`` with ``low_open``). Returns it as a float."""
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"<= {high:g}")
    allowed = "a finite float" + (" " + " and ".join(parts) if parts else "") + (" or None" if allow_none else "")
    if value is None and allow_none:
        return None
    check_type(name, value, (int, float), allowed)
    bad = math.isnan(value) or math.isinf(value)
    bad = bad or (low is not None and (value <= low if low_open else value < low))
    bad = bad or (high is not None and value > high)
    if bad:
        raise ValueError(f"`{name}` must be {allowed}, got {_received(value)}.")
    return float(value)
