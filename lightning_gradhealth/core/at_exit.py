"""Loop runs closed at interpreter exit: a forgotten ``close()`` loses neither the last steps nor the report.

:class:`~lightning_gradhealth.core.health.GradientHealth` adds a run built on a model to :data:`OPEN_RUNS`;
``close()`` (or the end of a ``with`` block) takes it out. At exit, :func:`close_open_runs` (registered with
:mod:`atexit`) closes those still open: the deferred guard's last verdicts are read, the buffered steps written, the
report and the run's end marker saved; a failure found then (a NaN at the last step) is said on stderr and in the
report, never swallowed. Runs are held weakly: a run that was garbage-collected has nothing left to write.
"""

from __future__ import annotations

import atexit
import sys
import weakref
from typing import Any

from lightning_gradhealth.schema.errors import TrainingHealthError

__all__ = ["OPEN_RUNS", "close_open_runs"]

#: Loop runs not closed yet (held weakly).
OPEN_RUNS: weakref.WeakSet[Any] = weakref.WeakSet()


def _distributed() -> bool:
    """Whether several processes run together (closing could start a collective the others never join)."""
    dist = getattr(sys.modules.get("torch"), "distributed", None)
    return bool(dist is not None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def close_open_runs() -> None:
    """Close every loop run still open; what goes wrong is said on stderr.

    Under several processes nothing is closed at exit (a collective could wait for ranks that are gone): that is
    said instead, with the fix.
    """
    runs = list(OPEN_RUNS)
    if runs and _distributed():
        print("GradientHealth: close() was not called in a distributed run; it is not closed at exit (the other "
              "processes may be gone): call health.close() on every rank.", file=sys.stderr)  # fmt: skip
        return
    for health in runs:
        try:
            health.close()
        except TrainingHealthError as err:
            print(f"GradientHealth (closed at exit: close() was not called): {err}", file=sys.stderr)
        except Exception as err:  # (at exit: say it, never hide it)
            print(f"GradientHealth: closing at exit failed ({type(err).__name__}: {err})", file=sys.stderr)


atexit.register(close_open_runs)
