"""Sparse offset/time index of one segment, and its ``.idx`` side-file format (pure).

In memory a :class:`SparseIndex` holds one entry every ``index_interval_bytes`` of segment:
the record's offset, its byte position, and the running maximum timestamp of the segment up to
and including that record. The running maximum is non-decreasing even when timestamps are not,
which is what makes a binary search for "first record with timestamp >= t" correct.

The ``.idx`` file is written once, whole, when a segment is sealed (rolled), through a temporary
file and a rename. It is advisory: the segment is the truth, and an index that is missing, fails
its crc or disagrees with the segment is rebuilt by scanning. Layout in docs/STORAGE.md.
"""

from __future__ import annotations

import math
import struct
import zlib
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field

from meshmq._errors import DecodeError

__all__ = ["Hole", "IndexFile", "SparseIndex", "decode_index", "encode_index"]

INDEX_MAGIC = b"MQIX"
INDEX_VERSION = 1
#: magic, version, flags, reserved, base_offset, segment_size, next_offset, record_count,
#: last_record_pos, max_timestamp, entry_count, hole_count.
INDEX_HEADER = struct.Struct("<4sBBHQQQQQdII")
#: offset, position, running max timestamp.
INDEX_ENTRY = struct.Struct("<QQd")
#: bad_pos, resume_pos, first_lost, resume_offset.
INDEX_HOLE = struct.Struct("<QQQQ")
INDEX_TRAILER = struct.Struct("<I")
#: last_record_pos when the segment holds no record.
NO_RECORD = 0xFFFFFFFFFFFFFFFF

assert INDEX_HEADER.size == 64 and INDEX_ENTRY.size == 24 and INDEX_HOLE.size == 32


@dataclass(frozen=True, slots=True)
class Hole:
    """Damage inside a segment: bytes [bad_pos, resume_pos) held offsets [first_lost, resume_offset).

    The range of lost offsets may be empty (damaged bytes that held no record of ours).
    """

    bad_pos: int
    resume_pos: int
    first_lost: int
    resume_offset: int


class SparseIndex:
    """Sorted entries (offset, position, running max timestamp) of one segment."""

    __slots__ = ("offsets", "positions", "max_ts")

    def __init__(self) -> None:
        self.offsets = array("Q")
        self.positions = array("Q")
        self.max_ts = array("d")

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, offset: int, position: int, max_ts: float) -> None:
        """Append an entry; callers add in increasing offset and position order."""
        self.offsets.append(offset)
        self.positions.append(position)
        self.max_ts.append(max_ts)

    def extend(self, entries: list[tuple[int, int, float]]) -> None:
        """Append entries (offset, position, max_ts) in order."""
        for offset, position, max_ts in entries:
            self.add(offset, position, max_ts)

    def floor_offset(self, offset: int) -> tuple[int, int] | None:
        """Return (entry offset, position) of the last entry with offset <= ``offset``."""
        i = bisect_right(self.offsets, offset) - 1
        return None if i < 0 else (self.offsets[i], self.positions[i])

    def before_time(self, timestamp: float) -> tuple[int, int] | None:
        """Return (entry offset, position) of the last entry whose running max is < timestamp.

        Every record up to that entry is older than ``timestamp``, so a search may start there.
        """
        i = bisect_left(self.max_ts, timestamp) - 1
        return None if i < 0 else (self.offsets[i], self.positions[i])


@dataclass(slots=True)
class IndexFile:
    """Everything a sealed segment's ``.idx`` records about it."""

    base_offset: int
    segment_size: int
    next_offset: int
    record_count: int
    last_record_pos: int
    max_timestamp: float
    index: SparseIndex = field(default_factory=SparseIndex)
    holes: list[Hole] = field(default_factory=list)


def encode_index(meta: IndexFile) -> bytes:
    """Return the ``.idx`` bytes for ``meta``."""
    idx = meta.index
    parts = [
        INDEX_HEADER.pack(
            INDEX_MAGIC, INDEX_VERSION, 0, 0, meta.base_offset, meta.segment_size,
            meta.next_offset, meta.record_count, meta.last_record_pos, meta.max_timestamp,
            len(idx), len(meta.holes),
        )
    ]
    pack = INDEX_ENTRY.pack
    parts.extend(pack(o, p, t) for o, p, t in zip(idx.offsets, idx.positions, idx.max_ts,
                                                  strict=True))
    parts.extend(INDEX_HOLE.pack(h.bad_pos, h.resume_pos, h.first_lost, h.resume_offset)
                 for h in meta.holes)
    body = b"".join(parts)
    return body + INDEX_TRAILER.pack(zlib.crc32(body))


def decode_index(data: bytes) -> IndexFile:
    """Parse and self-check ``.idx`` bytes; DecodeError if they are not a consistent index."""
    if len(data) < INDEX_HEADER.size + INDEX_TRAILER.size:
        raise DecodeError(f"index file too short ({len(data)} bytes)")
    (magic, version, flags, _reserved, base, size, next_offset, count, last_pos, max_ts,
     n_entries, n_holes) = INDEX_HEADER.unpack_from(data, 0)
    if magic != INDEX_MAGIC or version != INDEX_VERSION or flags != 0:
        raise DecodeError(f"not a version-{INDEX_VERSION} index (magic {magic!r}, v{version})")
    expected = INDEX_HEADER.size + n_entries * INDEX_ENTRY.size + n_holes * INDEX_HOLE.size
    if len(data) != expected + INDEX_TRAILER.size:
        raise DecodeError(f"index length {len(data)} does not match its counts")
    (crc,) = INDEX_TRAILER.unpack_from(data, expected)
    if zlib.crc32(memoryview(data)[:expected]) != crc:
        raise DecodeError("index crc mismatch")
    meta = IndexFile(base, size, next_offset, count, last_pos, max_ts)
    pos = INDEX_HEADER.size
    idx = meta.index
    for offset, position, entry_ts in INDEX_ENTRY.iter_unpack(
            memoryview(data)[pos:pos + n_entries * INDEX_ENTRY.size]):
        idx.add(offset, position, entry_ts)
    pos += n_entries * INDEX_ENTRY.size
    for bad_pos, resume_pos, first_lost, resume_offset in INDEX_HOLE.iter_unpack(
            memoryview(data)[pos:expected]):
        meta.holes.append(Hole(bad_pos, resume_pos, first_lost, resume_offset))
    _check_consistent(meta)
    return meta


def _check_consistent(meta: IndexFile) -> None:
    """Raise DecodeError unless the index agrees with itself (sorted, in bounds)."""
    idx = meta.index
    if meta.next_offset < meta.base_offset or meta.record_count > meta.next_offset - meta.base_offset:
        raise DecodeError("index offsets out of range")
    if (meta.record_count == 0) != (meta.last_record_pos == NO_RECORD):
        raise DecodeError("index record count disagrees with its last record")
    if meta.record_count and meta.last_record_pos >= meta.segment_size:
        raise DecodeError("index last record beyond segment end")
    if math.isnan(meta.max_timestamp):
        raise DecodeError("index max timestamp is NaN")
    prev_offset, prev_pos, prev_ts = -1, -1, -math.inf
    for offset, position, entry_ts in zip(idx.offsets, idx.positions, idx.max_ts, strict=True):
        if not (offset > prev_offset and position > prev_pos and entry_ts >= prev_ts
                and meta.base_offset <= offset < meta.next_offset
                and position < meta.segment_size and entry_ts <= meta.max_timestamp):
            raise DecodeError("index entries out of order or out of bounds")
        prev_offset, prev_pos, prev_ts = offset, position, entry_ts
    prev_end = -1
    for hole in meta.holes:
        if not (prev_end <= hole.bad_pos < hole.resume_pos <= meta.segment_size
                and meta.base_offset <= hole.first_lost <= hole.resume_offset < meta.next_offset):
            raise DecodeError("index holes out of order or out of bounds")
        prev_end = hole.resume_pos
