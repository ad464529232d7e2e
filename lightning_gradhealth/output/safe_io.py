r"""Reading and writing files of a directory that may be hostile: what ``gradhealth report`` reads and writes with.

A log directory can come from anyone (a colleague's run, a bug report, a download), so everything in it is untrusted:

- **Writes never follow a link.** :func:`write_bytes` writes a new temporary file in the target directory
  (``O_CREAT | O_EXCL``: never an existing file or link) and renames it over the target with :func:`os.replace`, which
  replaces a directory entry and never writes through it. An existing target that is a symbolic link or not a regular
  file is refused (:class:`UnsafePathError`), so a planted ``gradient_health_report.md -> .../site-packages/x.pth``
  writes nothing anywhere.
- **Reads take regular files only, with caps.** :func:`open_regular` opens with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO or
  a device cannot block the open) and refuses anything that ``fstat`` does not call a regular file, or a file over
  its size cap (``/dev/zero`` is a device; a FIFO never blocks a read that never happens). :func:`read_json` also
  caps the nesting depth before parsing, so a deeply nested file is a clear refusal, not a ``RecursionError``.
- **Names are shown, never obeyed.** :func:`clean` escapes control characters, line and paragraph separators and
  undecodable bytes of file names (``\n`` becomes the two characters ``\`` ``n``), so no name can start a line;
  :func:`md_text` and :func:`md_code` add Markdown/HTML escaping on top (``<script>`` is shown as text).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import unicodedata
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "MAX_JSON_BYTES",
    "MAX_JSON_DEPTH",
    "UnsafePathError",
    "clean",
    "md_code",
    "md_text",
    "open_regular",
    "read_json",
    "read_optional_json",
    "safe_dir",
    "shown",
    "write_bytes",
    "write_text",
]

#: The largest JSON file read from a log directory (the model's inventory of a 10,000-layer model is ~5 MB).
MAX_JSON_BYTES = 16 * 2**20
#: The deepest nesting of JSON arrays and objects read from a log directory (the files written have depth 4).
MAX_JSON_DEPTH = 32


class UnsafePathError(OSError):
    """A path that is not what it must be (a link, a FIFO, a device, too large, too deep): refused."""


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` as printable text: undecodable bytes and control characters escaped (:func:`clean`)."""
    return clean(os.fspath(path))


def clean(text: str) -> str:
    r"""``text`` with every character that could start a line or hide text escaped; printable text unchanged.

    Control characters (``\n``, ``\r``, ``\x1b``, ...), Unicode line/paragraph separators and format characters, and
    the lone surrogates that stand for a file name's undecodable bytes (``os.fsdecode``) become backslash escapes.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        code = ord(ch)
        if ch.isprintable() or (ch == " "):
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(ch, f"\\x{code:02x}"))
        elif unicodedata.category(ch) in ("Zs",):
            out.append(" ")
        else:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return "".join(out)


_MD = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|"})


def md_text(text: str) -> str:
    """``text`` for Markdown prose or a table cell: :func:`clean`, HTML (``<``, ``>``, ``&``) and ``|`` escaped."""
    return clean(text).translate(_MD)


def md_code(text: str) -> str:
    """``text`` as a Markdown code span (a table cell's too): :func:`clean`, no backtick, ``|`` escaped.

    A name with ``<``, ``>`` or ``&`` is given as escaped text instead (:func:`md_text`): no raw HTML in the file.
    """
    if any(ch in text for ch in "<>&"):
        return md_text(text)
    return "`" + clean(text).replace("`", "'").replace("|", "\\|") + "`"


def open_regular(path: str | os.PathLike[str], max_bytes: int) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading if it is a regular file of at most ``max_bytes``; return it and its size.

    Never blocks and never follows a final symbolic link: ``O_NOFOLLOW | O_NONBLOCK``, then ``fstat`` on what was
    opened (no race between the check and the open).

    Raises:
        UnsafePathError: A link, a FIFO, a socket, a device, a directory, or a file over ``max_bytes``.
        OSError: It cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if os.path.islink(path):
            raise UnsafePathError(f"{shown(path)} is a symbolic link: not followed") from None
        raise UnsafePathError(f"{shown(path)} cannot be opened ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafePathError(f"{shown(path)} is not a regular file ({_kind(info.st_mode)}): not read")
        if info.st_size > max_bytes:
            raise UnsafePathError(
                f"{shown(path)} is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit: not read"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block "
                       "device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a link")):
        if test(mode):
            return name
    return "not a regular file"


def _depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON ``text`` (strings skipped), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_json(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON value in ``path``, read as untrusted input (:func:`open_regular`, UTF-8, nesting capped).

    Raises:
        UnsafePathError: Not a regular file, too large, or nested deeper than ``max_depth``.
        ValueError: Not UTF-8, or not JSON.
    """
    fh, _ = open_regular(path, max_bytes)
    with fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # (grew since the fstat)
        raise UnsafePathError(f"{shown(path)} is over the {max_bytes:,}-byte limit: not read")
    text = data.decode("utf-8")
    if _depth(text) > max_depth:
        raise UnsafePathError(f"{shown(path)} nests JSON deeper than {max_depth} levels: not read")
    return json.loads(text)


def safe_dir(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """``path`` as a real directory (created if missing): refused if it, or what is there, is a link or not a folder.

    Raises:
        UnsafePathError: ``path`` is a symbolic link or not a directory.
        OSError: It cannot be created.
    """
    target = Path(path)
    if create:
        try:
            target.mkdir(parents=True)
        except FileExistsError:
            pass
    info = os.lstat(target)
    if stat.S_ISLNK(info.st_mode):
        raise UnsafePathError(f"{shown(target)} is a symbolic link: nothing is written through it")
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafePathError(f"{shown(target)} is not a directory ({_kind(info.st_mode)})")
    return target


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` without ever writing through a link or into a file that is not a regular one.

    A temporary file is created beside the target (``O_EXCL``), written, and renamed over the target
    (:func:`os.replace`: the directory entry is replaced; a hard-linked old file keeps its contents).

    Raises:
        UnsafePathError: The target is a symbolic link (even a dangling one) or not a regular file.
        OSError: The write failed (the temporary file is removed).
    """
    target = Path(path)
    try:
        info = os.lstat(target)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        what = "a symbolic link" if stat.S_ISLNK(info.st_mode) else _kind(info.st_mode)
        raise UnsafePathError(f"{shown(target)} is {what}: not overwritten, nothing is written through it")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_bytes` of ``text`` in UTF-8 (undecodable name bytes in it escaped, never an encoding error)."""
    return write_bytes(path, text.encode("utf-8", "backslashreplace"))


_UMASK: list[int] = []


def _umask() -> int:
    """The process's umask, read once (reading it means setting it)."""
    if not _UMASK:
        mask = os.umask(0o022)
        os.umask(mask)
        _UMASK.append(mask)
    return _UMASK[0]


def read_optional_json(path: Path, name: str | None = None) -> tuple[Any, str | None]:
    """A JSON file a run may or may not have written.

    Returns:
        ``(value, None)``; ``(None, None)`` when it is absent; ``(None, why)`` when it cannot be read (naming it
        ``name``, else its escaped path: one line for stderr).

    Raises:
        UnsafePathError: It is a link, a FIFO, a device, too large or too deep: not a file the run wrote.
    """
    if not path.exists() and not path.is_symlink():
        return None, None
    try:
        return read_json(path), None
    except UnsafePathError:
        raise
    except (OSError, ValueError) as err:
        return None, f"{name or clean(str(path))} is unreadable ({clean(str(err))})"
