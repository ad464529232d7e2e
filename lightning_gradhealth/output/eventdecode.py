"""Scalar events taken apart from their bytes: how :mod:`~lightning_gradhealth.output.eventfiles` reads a record.

A TensorBoard ``Event`` holding scalars is, in the protocol buffers wire format (protobuf documentation, "Encoding"),
``wall_time`` (field 1, 8 bytes), ``step`` (field 2, a varint) and ``summary`` (field 5, length-delimited), whose
``value`` entries (field 1) each hold a ``tag`` (field 1) and a ``simple_value`` (field 2, a 4-byte float). That is
what torch's ``SummaryWriter.add_scalar`` and the monitor's one-event writer produce. Decoding it with the generic
protobuf classes costs a Python object and several attribute reads per value (~1 µs each, 4,000 values a step for a
1,000-layer model); here an event of exactly that shape is read directly:

- :func:`decode_scalars` walks the event's bytes (each field's key byte, each length) and returns the step, the
  tags and the values, or :data:`GENERIC` for anything else (another field, a repeated field, a tensor value, a
  tag that is not UTF-8, a length that does not fit), which the caller decodes with the protobuf classes, as before.
  A shape it accepts has one meaning under protobuf's rules, so both decoders give the same result.
- A large summary is compared with the last one of the same length (a **template**): a run logs the same tags in
  the same order on every step, so only the 4-byte floats differ. The summary's bytes with those floats zeroed
  must equal the template's byte for byte; then the wire structure (every key and length byte) is the template's,
  and the floats are gathered with one numpy indexing operation. Any difference falls back to the walk.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

__all__ = ["GENERIC", "ScalarDecoder"]

#: Returned for an event whose shape the fast path does not read: decode it with the protobuf classes.
GENERIC = object()
_TEMPLATE_FROM = 32  # values in a summary from which it is kept as a template
_MAX_TEMPLATES = 16  # templates kept (by summary length), so memory stays bounded
_FLOAT = struct.Struct("<f")
_EVENT_FIELDS = {0x09: 1, 0x10: 2, 0x2A: 4}  # the key bytes of wall_time, step and summary -> a bit of their own


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (``-1``: runs past ``end`` or over 10 bytes)."""
    result = shift = 0
    stop = min(end, pos + 10)
    while pos < stop:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
    return 0, -1


def _event(data: bytes) -> tuple[int, int, int] | None:
    """``(step, start, end)`` of the summary of a scalar event of the plain shape; ``None``: not that shape."""
    pos, end = 0, len(data)
    step = 0
    start = stop = -1
    seen = 0
    while pos < end:
        key = data[pos]
        bit = _EVENT_FIELDS.get(key, 0)
        if not bit or seen & bit:  # another field, or one given twice (protobuf would merge them)
            return None
        seen |= bit
        if key == 0x09:  # wall_time: a fixed 8-byte double (not needed here)
            pos += 9
        elif key == 0x10:
            step, pos = _varint(data, pos + 1, end)
            if pos < 0 or step >= 2**64:
                return None
            if step >= 2**63:  # a negative int64: a 10-byte varint
                step -= 2**64
        else:
            length, pos = _varint(data, pos + 1, end)
            if pos < 0 or pos + length > end:
                return None
            start, stop = pos, pos + length
            pos = stop
    if pos != end or start < 0:
        return None
    return step, start, stop


def _walk(data: bytes, start: int, end: int) -> tuple[tuple[str, ...], list[int]] | None:
    """The tags of a summary whose every value is ``tag`` then ``simple_value``, and where each float starts."""
    tags: list[str] = []
    floats: list[int] = []
    pos = start
    while pos < end:
        if data[pos] != 0x0A:
            return None
        length, pos = _varint(data, pos + 1, end)
        if pos < 0 or pos + length > end or length < 7 or data[pos] != 0x0A:
            return None
        stop = pos + length
        size, at = _varint(data, pos + 1, stop)
        if at < 0 or at + size + 5 != stop or data[at + size] != 0x15:
            return None
        try:
            tags.append(data[at : at + size].decode("utf-8"))
        except UnicodeDecodeError:
            return None
        floats.append(at + size + 1)
        pos = stop
    return tuple(tags), floats


@dataclass
class _Template:
    """A summary's wire structure: its bytes with the floats zeroed, where the floats are, and its tags."""

    masked: bytes
    spread: np.ndarray  # (values, 4) byte positions of the floats
    tags: tuple[str, ...]


class ScalarDecoder:
    """Decodes scalar events, keeping the structure of the large summaries it met (see the module's docstring)."""

    def __init__(self) -> None:
        self._templates: dict[int, _Template] = {}

    def decode(self, data: bytes) -> tuple[int, tuple[str, ...], list[float]] | object | None:
        """``(step, tags, values)`` of one serialized event, ``None`` for one without a summary, or :data:`GENERIC`."""
        shape = _event(data)
        if shape is None:
            return GENERIC
        step, start, end = shape
        if start == end:
            return None  # an empty summary: no scalar
        template = self._templates.get(end - start)
        if template is not None:
            raw = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start)
            masked = raw.copy()
            masked[template.spread] = 0
            if masked.tobytes() == template.masked:
                return step, template.tags, raw[template.spread].view("<f4").ravel().tolist()
        walked = _walk(data, start, end)
        if walked is None:
            return GENERIC
        tags, floats = walked
        if len(floats) >= _TEMPLATE_FROM:
            spread = np.asarray(floats, dtype=np.int64)[:, None] + np.arange(4)
            raw = np.frombuffer(data, dtype=np.uint8, count=end - start, offset=start)
            masked = raw.copy()
            spread -= start
            masked[spread] = 0
            if len(self._templates) >= _MAX_TEMPLATES:
                self._templates.clear()
            self._templates[end - start] = _Template(masked.tobytes(), spread, tags)
            return step, tags, raw[spread].view("<f4").ravel().tolist()
        return step, tags, [_FLOAT.unpack_from(data, at)[0] for at in floats]
