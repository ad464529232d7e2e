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


def close_open_runs() -> None:
    """Close every loop run still open; what goes wrong is said on stderr."""
    for health in list(OPEN_RUNS):
        try:
            health.close()
        except TrainingHealthError as err:
            print(f"GradientHealth (closed at exit: close() was not called): {err}", file=sys.stderr)
        except Exception as err:  # (at exit: say it, never hide it)
            print(f"GradientHealth: closing at exit failed ({type(err).__name__}: {err})", file=sys.stderr)


atexit.register(close_open_runs)
