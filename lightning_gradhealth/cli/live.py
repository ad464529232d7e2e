"""What the live run knew that its event files do not hold, read back for ``gradhealth report``.

The run's state file (:mod:`~lightning_gradhealth.output.runstate`) says whether the run finished, why it stopped,
where its NaN was born, the batch size the noise-scale comparison used, which logger failed, and the live findings
(graded on everything the run measured, e.g. the loss). The offline history gets the birthplace and the batch size;
findings of kinds the offline diagnosis does not reach are kept from the live run (only when graded with the run's own
thresholds, no ``--threshold``); and the report says when the run did not finish, and at which step it stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["live_knowledge"]


def live_knowledge(
    run: Path, history: Any, *, saved_model: bool = True
) -> tuple[Callable[[list[Any], bool], list[Any]], list[str]]:
    """Fill ``history`` with what the live run saved; return how to merge its findings, and the report's notes."""
    from lightning_gradhealth.output.runstate import RUN_JSON, read_run_state

    state, why = read_run_state(run)
    last = history.steps[-1] if history.steps else None
    notes: list[str] = []
    if why is not None:
        notes.append(f"{why}: whether the run finished, and what it knew beyond its event files, is unknown.")
    elif state is None or state["status"] == "running":
        marker = "its end marker says it was still running" if state else f"it left no end marker ({RUN_JSON})"
        older = "" if state else " (or it was logged by a version that wrote none)"
        notes.append(f"The run did not finish: {marker}, so it was killed or is still running{older}; its events "
                     f"stop at step {last}.")  # fmt: skip
    elif state["status"] == "stopped":
        notes.append(f"The run stopped before its end: {state['reason'] or 'no reason saved'}.")
    if state is None:
        return (lambda findings, same_lines: findings), notes
    notes += state["sink_failures"]
    if history.batch_size is None and state["batch_size"] is not None:
        history.batch_size = state["batch_size"]
    birth, at = state["nonfinite_birth"], state["nonfinite_step"]
    for name in ("first_nonfinite", "last_nonfinite"):
        record = getattr(history, name)
        if birth and record is not None and record.step == at and not record.nonfinite_birth:
            setattr(history, name, replace(record, nonfinite_birth=birth))

    def merge(findings: list[Any], same_lines: bool) -> list[Any]:
        if not same_lines:  # (graded with other lines than the run's: the live findings would not fit)
            return findings
        kinds = {f.kind for f in findings}
        return findings + [f for f in state["findings"] if f.kind not in kinds]

    return merge, notes
