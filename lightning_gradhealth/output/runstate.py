"""The run's end marker and what the live run knew, saved beside the model file for ``gradhealth report``.

``gradient_health_run.json`` is written when training starts (``"status": "running"``) and again when the run ends:
``"finished"`` (``close()``, the end of ``fit``), or ``"stopped"`` with the reason (the guard stopped it, or the loop
raised). A run killed (SIGKILL, power loss) keeps ``"running"``: ``gradhealth report`` then says that it did not
finish and at which step its events stop. The file also carries what the event files do not: where a NaN was born,
the batch size the noise-scale comparison used, the live findings (graded on everything the run measured), and which
logger failed from which step. It is written with :func:`~lightning_gradhealth.output.safe_io.write_text` (never
through a link) and read back with :func:`read_run_state`, which validates every field.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_gradhealth.diagnosis.history import History
from lightning_gradhealth.diagnosis.rules import Finding
from lightning_gradhealth.output.safe_io import clean, read_optional_json

__all__ = ["RUN_JSON", "read_run_state", "run_state", "write_run_state"]

RUN_JSON = "gradient_health_run.json"
_STATUSES = ("running", "finished", "stopped")


def run_state(
    status: str,
    history: History | None = None,
    findings: Sequence[Finding] = (),
    *,
    reason: str | None = None,
    sink_notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The run's state as saved (see the module docstring)."""
    first = history.first_nonfinite if history is not None else None
    return {
        "status": status,
        "reason": reason,
        "time": time.time(),
        "last_step": history.steps[-1] if history is not None and history.steps else None,
        "records": history.records_seen if history is not None else 0,
        "batch_size": history.batch_size if history is not None else None,
        "nonfinite_step": first.step if first is not None else None,
        "nonfinite_birth": first.nonfinite_birth if first is not None else None,
        "findings": [f.to_dict() for f in findings],
        "sink_failures": list(sink_notes),
    }


def write_run_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to :data:`RUN_JSON` in ``directory`` (never through a link).

    Raises:
        OSError: It could not be written (the caller says so; the run goes on).
    """
    import json

    from lightning_gradhealth.output.safe_io import write_text

    write_text(Path(directory) / RUN_JSON, json.dumps(state, default=str) + "\n")


def _opt(value: Any, kind: type | tuple[type, ...]) -> Any:
    return value if (isinstance(value, kind) and not isinstance(value, bool)) or value is None else None


def read_run_state(run_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """The saved state of the run in ``run_dir``, validated, and why it could not be used (``None`` if it could).

    Every string is escaped (:func:`~lightning_gradhealth.output.safe_io.clean`); fields of the wrong type are
    dropped; findings keep only well-formed entries.

    Raises:
        UnsafePathError: The file is a link, a FIFO, a device, too large or too deep.
    """
    path = Path(run_dir) / RUN_JSON
    data, problem = read_optional_json(path)
    if problem is not None or data is None:
        return None, problem
    if not isinstance(data, dict) or data.get("status") not in _STATUSES:
        return None, f"{clean(str(path))} is not a run state this version wrote (no valid 'status')"
    reason = data.get("reason")
    state = {
        "status": data["status"],
        "reason": clean(reason) if isinstance(reason, str) else None,
        "last_step": _opt(data.get("last_step"), int),
        "batch_size": _opt(data.get("batch_size"), int),
        "nonfinite_step": _opt(data.get("nonfinite_step"), int),
        "nonfinite_birth": clean(b) if isinstance(b := data.get("nonfinite_birth"), str) else None,
        "findings": [f for f in map(_finding, data.get("findings") or []) if f is not None]
        if isinstance(data.get("findings"), list)
        else [],
        "sink_failures": [clean(s) for s in data.get("sink_failures") or [] if isinstance(s, str)]
        if isinstance(data.get("sink_failures"), list)
        else [],
    }
    return state, None


def _finding(entry: Any) -> Finding | None:
    """A saved finding, if well formed (strings escaped; the evidence is not read back)."""
    from lightning_gradhealth.config.thresholds import Severity

    if not isinstance(entry, dict):
        return None
    kind, severity, summary = entry.get("kind"), entry.get("severity"), entry.get("summary")
    layers, fixes, code = entry.get("layers", []), entry.get("fixes", []), entry.get("code", "")
    if not (isinstance(kind, str) and isinstance(summary, str) and isinstance(code, str)):
        return None
    if not (isinstance(layers, list) and isinstance(fixes, list) and all(isinstance(x, str) for x in layers + fixes)):
        return None
    try:
        level = Severity(severity)
    except ValueError:
        return None
    return Finding(
        kind=clean(kind), severity=level, summary=clean(summary), layers=tuple(clean(x) for x in layers),
        fixes=tuple(clean(x) for x in fixes), code="\n".join(clean(line) for line in code.splitlines()),
    )  # fmt: skip
