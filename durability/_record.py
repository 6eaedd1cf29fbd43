"""Sans-IO record codec: pure functions over bytes, no files, no clocks.

One record, little-endian, ``HEADER_SIZE`` (26) bytes of header then the payload::

    pos  size  field
    0    1     version    RECORD_VERSION (1)
    1    1     flags      0: every bit is reserved in version 1, so a set bit is damage
    2    4     length     u32, bytes after the crc field = 16 + len(payload)
    6    4     crc32      u32, zlib.crc32 of the ``length`` bytes that follow this field
    10   8     offset     u64, the record's position in the log
    18   8     timestamp  f64, seconds (the caller's clock; opaque to the codec)
    26   n     payload    opaque bytes

The crc does not cover version, flags and length; those are checked by value instead
(exact version, zero flags, ``16 <= length <= max``) and a wrong length moves the crc's span,
so a damaged byte anywhere in a record is caught. docs/STORAGE.md has the full format.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from meshmq._errors import ConfigError, DecodeError

__all__ = [
    "BODY_HEAD_SIZE",
    "CorruptRecordError",
    "DEFAULT_MAX_RECORD_BYTES",
    "FRAME_SIZE",
    "HEADER_SIZE",
    "RECORD_VERSION",
    "Record",
    "RecordDecoder",
    "check_max_record_bytes",
    "decode_record",
    "encode_record",
    "find_record",
    "make_record",
]

RECORD_VERSION = 1
#: version, flags, length, crc: the part of the header outside the crc.
FRAME = struct.Struct("<BBII")
#: offset, timestamp: the part of the header inside the crc.
BODY_HEAD = struct.Struct("<Qd")
#: The whole header in one unpack, for the scanning loops.
HEADER = struct.Struct("<BBIIQd")
FRAME_SIZE = FRAME.size
BODY_HEAD_SIZE = BODY_HEAD.size
HEADER_SIZE = HEADER.size
#: Default cap on one whole record (header + payload).
DEFAULT_MAX_RECORD_BYTES = 16 << 20
# The largest record the u32 length field can describe.
_ABSOLUTE_MAX_RECORD_BYTES = FRAME_SIZE + 0xFFFFFFFF
# Version byte then an all-zero flags byte: what a record start looks like when resyncing.
_START_MARK = bytes((RECORD_VERSION, 0))

assert HEADER_SIZE == 26 and FRAME_SIZE == 10 and BODY_HEAD_SIZE == 16


@dataclass(frozen=True, slots=True)
class Record:
    """One log entry: its offset, the timestamp given at append time, and the payload."""

    offset: int
    timestamp: float
    payload: bytes


# Build Records without the frozen dataclass __init__ (which sets each field through
# object.__setattr__): the slot descriptors' own setters halve the cost, and replay creates one
# Record per record read.
_new = object.__new__
_set_offset = Record.__dict__["offset"].__set__
_set_timestamp = Record.__dict__["timestamp"].__set__
_set_payload = Record.__dict__["payload"].__set__


def make_record(offset: int, timestamp: float, payload: bytes) -> Record:
    """Return Record(offset, timestamp, payload), faster than the constructor (hot loops)."""
    record = _new(Record)
    _set_offset(record, offset)
    _set_timestamp(record, timestamp)
    _set_payload(record, payload)
    return record


class CorruptRecordError(DecodeError):
    """Bytes that cannot be a valid record; ``position`` is where the bad record starts."""

    def __init__(self, position: int, reason: str) -> None:
        super().__init__(f"corrupt record at byte {position}: {reason}")
        #: Stream position of the first byte of the bad record: every byte before it decoded
        #: as whole valid records, so this is where a log is cut.
        self.position = position
        #: Which check failed: "version", "flags", "length" or "crc", with detail.
        self.reason = reason


def check_max_record_bytes(max_record_bytes: int) -> int:
    """Return ``max_record_bytes`` if it can hold a record with an empty payload; else ConfigError."""
    if not isinstance(max_record_bytes, int) or not (
        HEADER_SIZE <= max_record_bytes <= _ABSOLUTE_MAX_RECORD_BYTES
    ):
        raise ConfigError(
            f"max_record_bytes must be an int in [{HEADER_SIZE}, {_ABSOLUTE_MAX_RECORD_BYTES}],"
            f" got {max_record_bytes!r}"
        )
    return max_record_bytes


def encode_record(
    offset: int,
    timestamp: float,
    payload: bytes,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> bytes:
    """Return the bytes of one record; ConfigError if it would exceed ``max_record_bytes``."""
    if HEADER_SIZE + len(payload) > max_record_bytes:
        raise ConfigError(
            f"record of {HEADER_SIZE + len(payload)} bytes exceeds max_record_bytes={max_record_bytes}"
        )
    try:
        body_head = BODY_HEAD.pack(offset, timestamp)
    except struct.error as exc:
        raise ConfigError(f"bad offset or timestamp ({offset!r}, {timestamp!r}): {exc}") from exc
    crc = zlib.crc32(payload, zlib.crc32(body_head))
    return FRAME.pack(RECORD_VERSION, 0, BODY_HEAD_SIZE + len(payload), crc) + body_head + bytes(
        payload
    )


def _check_frame(data: bytes | bytearray | memoryview, pos: int, avail: int, max_length: int,
                 base: int) -> int:
    """Validate the frame fields present in ``avail`` bytes at ``pos``; return length or -1.

    -1 means too few bytes to know the length yet. Raises CorruptRecordError (positions offset
    by ``base``) as soon as a present byte is wrong, so damage is reported without waiting for
    bytes that may never come.
    """
    if avail >= 1 and data[pos] != RECORD_VERSION:
        raise CorruptRecordError(base + pos, f"version {data[pos]} is not {RECORD_VERSION}")
    if avail >= 2 and data[pos + 1] != 0:
        raise CorruptRecordError(base + pos, f"flags {data[pos + 1]:#04x} set (reserved)")
    if avail < 6:
        return -1
    (length,) = struct.unpack_from("<I", data, pos + 2)
    if length < BODY_HEAD_SIZE or length > max_length:
        raise CorruptRecordError(
            base + pos, f"length {length} outside [{BODY_HEAD_SIZE}, {max_length}]"
        )
    return int(length)


def decode_record(
    data: bytes | bytearray | memoryview,
    position: int = 0,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> tuple[Record, int] | None:
    """Decode the record at ``position``: (record, end position), None if incomplete.

    Raises CorruptRecordError when the bytes present already prove the record is bad.
    """
    avail = len(data) - position
    length = _check_frame(data, position, avail, max_record_bytes - FRAME_SIZE, 0)
    if length < 0 or avail < FRAME_SIZE + length:
        return None
    _, _, _, crc, offset, timestamp = HEADER.unpack_from(data, position)
    end = position + FRAME_SIZE + length
    view = memoryview(data)
    if zlib.crc32(view[position + FRAME_SIZE:end]) != crc:
        raise CorruptRecordError(position, "crc mismatch")
    return Record(offset, timestamp, bytes(view[position + HEADER_SIZE:end])), end


def find_record(
    data: bytes | bytearray | memoryview,
    start: int = 0,
    *,
    max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
) -> tuple[int, Record] | None:
    """Return (position, record) of the first whole valid record at or after ``start``, or None.

    Used to resynchronise after damage: it tries every position that starts with the version and
    flags bytes and accepts the first whose length and crc check out. The caller decides whether
    the record's offset is plausible.
    """
    view = memoryview(data)
    raw = data if isinstance(data, bytes | bytearray) else view.tobytes()
    max_length = max_record_bytes - FRAME_SIZE
    i = start
    while True:
        i = raw.find(_START_MARK, i)
        if i < 0 or i + HEADER_SIZE > len(raw):
            return None
        _, _, length, crc, offset, timestamp = HEADER.unpack_from(raw, i)
        end = i + FRAME_SIZE + length
        if (BODY_HEAD_SIZE <= length <= max_length and end <= len(raw)
                and zlib.crc32(view[i + FRAME_SIZE:end]) == crc):
            return i, Record(offset, timestamp, bytes(view[i + HEADER_SIZE:end]))
        i += 1


class RecordDecoder:
    """Incremental decoder: feed bytes in any chunking, take whole records out.

    ``next()`` returns None while a record is incomplete ("need more data"). Damage raises
    CorruptRecordError whose ``position`` counts from the start of the stream (plus the
    ``position`` given to the constructor); the decoder then stays failed, raising it again.
    """

    __slots__ = ("_buf", "_start", "_max_record_bytes", "_error")

    def __init__(self, *, max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
                 position: int = 0) -> None:
        self._max_record_bytes = check_max_record_bytes(max_record_bytes)
        self._buf = bytearray()
        # Stream position of self._buf[0].
        self._start = position
        self._error: CorruptRecordError | None = None

    @property
    def position(self) -> int:
        """Stream position of the first byte not yet returned as part of a record."""
        return self._start

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet form a whole record."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append bytes to the stream."""
        self._buf += data

    def next(self) -> Record | None:
        """Return the next whole record, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        buf = self._buf
        try:
            length = _check_frame(buf, 0, len(buf), self._max_record_bytes - FRAME_SIZE,
                                  self._start)
            if length < 0 or len(buf) < FRAME_SIZE + length:
                return None
            _, _, _, crc, offset, timestamp = HEADER.unpack_from(buf, 0)
            end = FRAME_SIZE + length
            with memoryview(buf) as view:
                if zlib.crc32(view[FRAME_SIZE:end]) != crc:
                    raise CorruptRecordError(self._start, "crc mismatch")
                payload = bytes(view[HEADER_SIZE:end])
        except CorruptRecordError as exc:
            self._error = exc
            raise
        # Deleting a bytearray prefix is O(1) amortised in CPython (it moves the start).
        del buf[:end]
        self._start += end
        return Record(offset, timestamp, payload)

    def __iter__(self) -> Iterator[Record]:
        """Yield every whole record currently decodable, then stop."""
        while (record := self.next()) is not None:
            yield record
