"""What ``gradhealth report`` reads beside the event files, validated as untrusted input.

The model file (:data:`~lightning_gradhealth.output.report.MODEL_JSON`) holds the model's inventory and the run's
thresholds. It is read with :func:`~lightning_gradhealth.output.safe_io.read_json` (a regular file, size and depth
capped) and checked against a schema before use: a field of the wrong type, an unknown threshold line or an invalid
value gives one warning and the fallback (the model unknown, the default thresholds), never a traceback. Every string
of the inventory is escaped (:func:`~lightning_gradhealth.output.safe_io.clean`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lightning_gradhealth.output.safe_io import clean, read_optional_json, shown

__all__ = ["MODEL_FILE_ERRORS", "read_model_file", "valid_inventory", "valid_thresholds"]

#: What reading the model file can raise (all caught: a warning and the fallback).
MODEL_FILE_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError)
#: The most layers an inventory read back may hold.
MAX_LAYERS = 100_000

_LAYER_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "module_class": (str,), "numel": (int,), "depth": (int,),
    "units": (int, type(None)), "comparable": (bool,), "tied": (bool,), "alias": (bool,), "is_head": (bool,),
    "shortcut": (bool,), "trainable": (bool,),
}  # fmt: skip
_TOP_LISTS = ("activations", "norms")
_TOP_SCALARS: dict[str, tuple[type, ...]] = {
    "residual": (bool,), "residual_evidence": (str,), "has_attention": (bool,), "pre_norm": (bool, type(None)),
    "main_activation": (str, type(None)), "group_by": (str,),
}  # fmt: skip


def read_model_file(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The model file's top-level object, and why it could not be read (``None`` when it could, or is absent).

    Raises:
        UnsafePathError: It is a link, a FIFO, a device, too large or too deep: not a file this run wrote.
    """
    data, problem = read_optional_json(path, shown(path))
    if problem is not None or data is None:
        return None, problem
    if not isinstance(data, dict):
        return None, f"{shown(path)} is unreadable (not a JSON object)"
    return data, None


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{what} must be a list of strings")
    return [clean(v) for v in value]


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{what} must be a list of integers")
    return list(value)


def _layer(entry: Any, i: int) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise TypeError(f"layers[{i}] must be an object")
    out: dict[str, Any] = {}
    for key, types in _LAYER_TYPES.items():
        if key not in entry:
            if key in ("name", "kind", "module_class", "numel", "depth"):
                raise TypeError(f"layers[{i}] has no {key!r}")
            continue
        value = entry[key]
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise TypeError(f"layers[{i}].{key} must be {' or '.join(t.__name__ for t in types)}")
        out[key] = clean(value) if isinstance(value, str) else value
    out["params"] = _strings(entry.get("params", []), f"layers[{i}].params")
    out["tied_with"] = _strings(entry.get("tied_with", []), f"layers[{i}].tied_with")
    kernel = entry.get("kernel_size")
    out["kernel_size"] = None if kernel is None else _ints(kernel, f"layers[{i}].kernel_size")
    return out


def valid_inventory(data: Any) -> dict[str, Any]:
    """The inventory ``data`` with every field checked and every string escaped.

    Raises:
        TypeError: A field has the wrong type, or a required one is missing.
    """
    if not isinstance(data, dict):
        raise TypeError("the inventory must be an object")
    layers = data.get("layers")
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise TypeError(f"'layers' must be a list of at most {MAX_LAYERS:,} objects")
    out: dict[str, Any] = {"layers": [_layer(entry, i) for i, entry in enumerate(layers)]}
    for key in _TOP_LISTS:
        if key in data:
            out[key] = _strings(data[key], key)
    for key, types in _TOP_SCALARS.items():
        if key in data:
            value = data[key]
            if not isinstance(value, types):
                raise TypeError(f"{key} must be {' or '.join(t.__name__ for t in types)}")
            out[key] = clean(value) if isinstance(value, str) else value
    maps = data.get("feature_maps", {})
    if not isinstance(maps, dict):
        raise TypeError("feature_maps must be an object")
    out["feature_maps"] = {clean(str(k)): _ints(v, f"feature_maps[{k!r}]") for k, v in maps.items()}
    return out


def valid_thresholds(data: Any) -> dict[str, float | int]:
    """The saved thresholds ``data``: a mapping of line names to numbers (the names are checked by ``Thresholds``).

    Raises:
        TypeError: Not a mapping of strings to finite-or-infinite numbers.
    """
    if not isinstance(data, dict):
        raise TypeError("the thresholds must be an object of line names to numbers")
    for key, value in data.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            raise TypeError(f"threshold {clean(str(key))!r} must be a number, got {clean(repr(value))[:40]}")
    return dict(data)
