"""TensorBoard event files read as untrusted input: streamed, bounded, every checksum verified.

An event file is a TFRecord file: each record is its length (8 bytes, little-endian), that length's masked CRC-32C
(4 bytes), the data, and the data's masked CRC-32C (4 bytes) (TensorFlow, ``tensorflow/core/lib/io/record_writer.cc``;
CRC-32C is Castagnoli et al., 1993, as in RFC 3720 appendix B.4). :func:`iter_records` reads a file in chunks of
about :data:`CHUNK_BYTES`, so memory does not grow with the file; a record whose header claims more than
:data:`MAX_RECORD_BYTES` is refused from its 12-byte header, before anything is allocated.

TensorBoard's own CRC-32C is pure Python (~2 MB/s). Here the data checksums of a chunk are computed together with
numpy: every record is cut into blocks of :data:`_BLOCK` bytes (the first block padded with leading zeros, which leave
a CRC register at zero unchanged), the blocks' CRCs are computed side by side one byte column at a time, and each
record's blocks are then folded with the linear "shift by one block" map (the CRC-combination identity used by zlib's
``crc32_combine``). The register's initial value is XORed into the record's first four bytes (the same identity), so
no per-length correction is needed.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

__all__ = ["CHUNK_BYTES", "MAX_RECORD_BYTES", "RecordProblem", "iter_records", "masked_crc32c"]

#: The largest record read (a TensorBoard scalar event is ~40 bytes a value; an image of a figure ~100 KB).
MAX_RECORD_BYTES = 64 * 2**20
#: How much of a file is read and checked at a time.
CHUNK_BYTES = 4 * 2**20
_BLOCK = 64  # records under _BIG bytes are cut into blocks of _BLOCK bytes, larger ones into blocks of _BIG_BLOCK
_BIG = 4096
_BIG_BLOCK = 1024
_MASK_DELTA = 0xA282EAD8


def _byte_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1).astype(np.uint32)
    return table


_TABLE = _byte_table()
_TABLE_LIST = [int(v) for v in _TABLE]


def _shift_tables(nbytes: int) -> list[np.ndarray]:
    """Four tables giving the register after ``nbytes`` zero bytes, one per byte of the register (it is linear)."""
    out = []
    for k in range(4):
        state = np.arange(256, dtype=np.uint32) << np.uint32(8 * k)
        for _ in range(nbytes):
            state = _TABLE[state & 0xFF] ^ (state >> np.uint32(8))
        out.append(state.astype(np.uint32))
    return out


_SHIFTS = {_BLOCK: _shift_tables(_BLOCK), _BIG_BLOCK: _shift_tables(_BIG_BLOCK)}


def _slice_tables() -> tuple[np.ndarray, ...]:
    """The four tables of "slicing-by-4": the register after 1, 2, 3 and 4 bytes (Kounavis and Berry, 2005)."""
    tables = [_TABLE]
    for _ in range(3):
        last = tables[-1]
        tables.append((last >> np.uint32(8)) ^ _TABLE[last & 0xFF])
    return tuple(tables)


_T0, _T1, _T2, _T3 = _slice_tables()
_LOW_FIRST = sys.byteorder == "little"


def _block_crcs(blocks: np.ndarray) -> np.ndarray:
    """The CRC register (started at zero) after each row of ``blocks`` (uint8, rows a multiple of 4 bytes long).

    All rows advance together, four bytes a step (slicing-by-4): the next little-endian word is XORed into the
    register, whose four bytes (read through a byte view of it, in place) then index the four tables.
    """
    count = len(blocks)
    words = np.ascontiguousarray(blocks.view("<u4").T, dtype=np.uint32)  # one contiguous row per word position
    state = np.zeros(count, dtype=np.uint32)
    lanes = state.view(np.uint8).reshape(count, 4)
    b0, b1, b2, b3 = (lanes[:, k] for k in (range(4) if _LOW_FIRST else range(3, -1, -1)))
    mixed = np.empty(count, dtype=np.uint32)
    for word in words:
        state ^= word
        np.take(_T3, b0, out=mixed)
        mixed ^= _T2[b1]
        mixed ^= _T1[b2]
        mixed ^= _T0[b3]
        state[:] = mixed
    return state


def _crc_py(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    table = _TABLE_LIST
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _mask(crc: int | np.ndarray) -> int | np.ndarray:
    if isinstance(crc, np.ndarray):
        c = crc.astype(np.uint64)
        return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (pure Python: for short strings such as a record's length)."""
    return int(_mask(_crc_py(data)))


def _masked_crcs(buffer: bytes, spans: list[tuple[int, int]]) -> np.ndarray:
    """The masked CRC-32C of ``buffer[start:start + length]`` for each span, computed together (numpy)."""
    count = len(spans)
    result = np.zeros(count, dtype=np.uint64)
    if not count:
        return result
    lengths = np.array([n for _, n in spans], dtype=np.int64)
    small = lengths < 4
    for i in np.flatnonzero(small):  # (too short for the seed trick: at most 3 bytes)
        start, n = spans[i]
        result[i] = _mask(_crc_py(buffer[start : start + n]))
    for which, block in ((~small & (lengths < _BIG), _BLOCK), (lengths >= _BIG, _BIG_BLOCK)):
        chosen = np.flatnonzero(which)
        if len(chosen):
            result[chosen] = _crcs_in_blocks(buffer, spans, chosen, lengths[chosen], block)
    return result


def _crcs_in_blocks(
    buffer: bytes, spans: list[tuple[int, int]], big: np.ndarray, lengths: np.ndarray, block: int
) -> np.ndarray:
    """The masked CRC-32C of the spans ``big`` (each at least 4 bytes), cut into blocks of ``block`` bytes."""
    _BLOCK = block
    _SHIFT = _SHIFTS[block]
    raw = np.frombuffer(buffer, dtype=np.uint8)
    nblocks = (lengths + _BLOCK - 1) // _BLOCK
    pad = nblocks * _BLOCK - lengths
    first_block = np.concatenate(([0], np.cumsum(nblocks)[:-1]))
    blocks = np.zeros((int(nblocks.sum()), _BLOCK), dtype=np.uint8)
    flat = blocks.reshape(-1)
    # each record right-aligned in its blocks (leading zeros change nothing), gathered in one indexing operation
    starts = np.array([spans[i][0] for i in big], dtype=np.int64)
    dest0 = first_block * _BLOCK + pad
    if len(big) <= 64 or lengths.mean() >= 256:  # few or long records: slices
        for at, start, n in zip(dest0.tolist(), starts.tolist(), lengths.tolist(), strict=True):
            flat[at : at + n] = raw[start : start + n]
    else:  # many short ones: one gather
        within = np.arange(int(lengths.sum()), dtype=np.int32) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        flat[np.repeat(dest0, lengths) + within] = raw[np.repeat(starts, lengths) + within]
    seed = (dest0[:, None] + np.arange(4)).reshape(-1)
    flat[seed] ^= np.uint8(0xFF)  # the register's initial value, XORed into the first four bytes
    state = _block_crcs(blocks)
    # fold each record's blocks: acc = shift(acc) ^ block, all records together, right-aligned
    most = int(nblocks.max())
    acc = np.zeros(len(big), dtype=np.uint32)
    for k in range(most):
        has = nblocks > (most - 1 - k)
        idx = np.flatnonzero(has)
        if not len(idx):
            continue
        a = acc[idx]
        shifted = _SHIFT[0][a & 0xFF] ^ _SHIFT[1][(a >> 8) & 0xFF] ^ _SHIFT[2][(a >> 16) & 0xFF] ^ _SHIFT[3][a >> 24]
        position = first_block[idx] + (nblocks[idx] - (most - k))
        acc[idx] = shifted ^ state[position]
    return _mask(acc ^ np.uint32(0xFFFFFFFF))


@dataclass
class RecordProblem:
    """Why the reading of a file stopped early.

    Attributes:
        offset: The byte where the bad record starts.
        size: The file's size.
        records: The whole records read before it.
        kind: ``"truncated"`` (ends inside a record), ``"corrupt"`` (a checksum fails) or ``"oversized"`` (a header
            claims more than :data:`MAX_RECORD_BYTES`).
        claimed: The length the header claims (``"oversized"``).
    """

    offset: int
    size: int
    records: int
    kind: str
    claimed: int = 0


def iter_records(
    fh: BinaryIO, size: int, problems: list[RecordProblem], progress: list[int] | None = None
) -> Iterator[bytes]:
    """The data of each whole record of the open event file ``fh`` (``size`` bytes), checksums verified, in order.

    The first bad record ends the iteration; what is wrong is appended to ``problems``. ``progress[0]``, if given,
    is advanced by the bytes read.
    """
    offset = records = 0
    carry = b""
    while True:
        chunk = fh.read(CHUNK_BYTES)
        buffer = carry + chunk
        at = 0
        spans: list[tuple[int, int]] = []
        stored: list[int] = []
        problem: RecordProblem | None = None
        while len(buffer) - at >= 12:
            head = buffer[at : at + 12]
            (length,) = struct.unpack("<Q", head[:8])
            if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
                problem = RecordProblem(offset + at, size, records + len(spans), "corrupt")
                break
            if length > MAX_RECORD_BYTES:
                problem = RecordProblem(offset + at, size, records + len(spans), "oversized", length)
                break
            if offset + at + 16 + length > size:
                problem = RecordProblem(offset + at, size, records + len(spans), "truncated")
                break
            if len(buffer) - at < 16 + length:
                break  # the rest comes with the next chunk
            spans.append((at + 12, length))
            stored.append(struct.unpack("<I", buffer[at + 12 + length : at + 16 + length])[0])
            at += 16 + length
        crcs = _masked_crcs(buffer, spans)
        for j, ((start, length), want) in enumerate(zip(spans, stored, strict=True)):
            if int(crcs[j]) != want:
                problems.append(RecordProblem(offset + start - 12, size, records, "corrupt"))
                return
            records += 1
            yield buffer[start : start + length]
        if progress is not None:
            progress[0] += len(chunk)
        if problem is not None:
            problems.append(problem)
            return
        offset += at
        carry = buffer[at:]
        if not chunk:
            if carry:
                problems.append(RecordProblem(offset, size, records, "truncated"))
            return
