"""Directory options checked when they are given: a path the run will write into must be a creatable, writable folder.

A wrong ``report_dir`` or ``spike_dir`` would otherwise surface at the end of training (the report lost) or at the
first spike (the run killed). Nothing is created here: the nearest existing folder on the path is looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["check_writable_dir"]


def check_writable_dir(name: str, value: str | os.PathLike[str]) -> Path:
    """``value`` as a :class:`~pathlib.Path`, if it is (or can be created as) a directory this process can write.

    Raises:
        ValueError: It is empty, it or a parent is not a directory, or the folder it would be made in is not
            writable (the message names ``name``, what is allowed and what was received).
    """
    text = os.fspath(value)
    path = Path(text)
    why = None
    if not str(text).strip():
        why = "an empty path"
    else:
        probe = path.absolute()
        while not os.path.lexists(probe) and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            why = f"{probe} is not a directory" if probe == path.absolute() else f"{probe} is a file, not a directory"
        elif not os.access(probe, os.W_OK | os.X_OK):
            why = f"{probe} is not writable"
    if why is not None:
        raise ValueError(f"`{name}` must be a directory that exists or can be created, and is writable; got "
                         f"{value!r}: {why}.")  # fmt: skip
    return path
