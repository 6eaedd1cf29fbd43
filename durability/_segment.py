"""One segment file of the log: its in-memory state, its appends, its ``.idx``.

A segment is a file of back-to-back records named by the offset of its first record
(``00000000000000000042.log``), plus, once sealed, a ``.idx`` side file. The loops that walk
records (recovery scan, reader) are in ``_reader``; the system calls in ``_fileio``.
"""

from __future__ import annotations

import logging
import math
import os
import struct
import zlib
from collections.abc import Iterable

from meshmq._errors import ConfigError, DecodeError

from ._fileio import (
    FatalStorageError,
    close_fd,
    datasync,
    fsync_dir,
    ftruncate,
    open_append,
    open_read,
    pread,
    read_file,
    storage_error,
    unlink,
    write_all,
    write_file_atomic,
)
from ._index import (
    NO_RECORD,
    Hole,
    IndexFile,
    SparseIndex,
    decode_index,
    encode_index,
)
from ._record import (
    BODY_HEAD,
    BODY_HEAD_SIZE,
    FRAME,
    FRAME_SIZE,
    HEADER,
    HEADER_SIZE,
    RECORD_VERSION,
)

__all__ = ["CHUNK_BYTES", "Pending", "Segment", "index_name", "segment_name"]

logger = logging.getLogger("meshmq.durability")

#: How much of a segment one read call brings in: large enough to amortise the syscall, small
#: enough that reading stays bounded in memory (a record larger than this is read whole).
CHUNK_BYTES = 1 << 20
_NAME_DIGITS = 20  # enough for any u64 offset, so names sort like offsets


def segment_name(base: int) -> str:
    """Return the file name of the segment whose first offset is ``base``."""
    return f"{base:0{_NAME_DIGITS}d}.log"


def index_name(base: int) -> str:
    """Return the file name of that segment's index."""
    return f"{base:0{_NAME_DIGITS}d}.idx"


class Pending:
    """An encoded batch not yet written: its bytes and what committing it changes."""

    __slots__ = ("data", "count", "entries", "max_ts", "next_index_at", "last_record_pos")

    def __init__(self, data: bytearray, count: int, entries: list[tuple[int, int, float]],
                 max_ts: float, next_index_at: int, last_record_pos: int) -> None:
        self.data = data
        self.count = count
        self.entries = entries
        self.max_ts = max_ts
        self.next_index_at = next_index_at
        self.last_record_pos = last_record_pos


class Segment:
    """State of one segment file; the active one also owns an append-only file descriptor."""

    __slots__ = (
        "directory", "base", "path", "index_path", "max_length", "index_interval", "size",
        "next_offset", "records", "last_record_pos", "max_ts", "index", "holes", "fd",
        "unsynced", "next_index_at", "read_damage", "read_lost",
    )

    def __init__(self, directory: str, base: int, *, max_record_bytes: int,
                 index_interval: int) -> None:
        self.directory = directory
        self.base = base
        self.path = os.path.join(directory, segment_name(base))
        self.index_path = os.path.join(directory, index_name(base))
        #: Largest length field accepted when decoding (appends have their own, lower cap).
        self.max_length = max_record_bytes - FRAME_SIZE
        self.index_interval = index_interval
        #: Bytes of valid log in the file; nothing past it is ever read.
        self.size = 0
        #: One past the last good record's offset (``base`` while empty).
        self.next_offset = base
        self.records = 0
        self.last_record_pos = NO_RECORD
        #: Newest timestamp in the segment (-inf while empty): drives age retention.
        self.max_ts = -math.inf
        self.index = SparseIndex()
        #: Damage inside the segment, sorted by position; readers jump over it.
        self.holes: list[Hole] = []
        self.fd = -1
        self.unsynced = False
        self.next_index_at = 0
        self.read_damage = 0
        self.read_lost = 0

    @property
    def name(self) -> str:
        """The segment's file name."""
        return os.path.basename(self.path)

    # -- writing ------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: str, base: int, *, max_record_bytes: int, index_interval: int,
               sync: bool) -> Segment:
        """Create an empty segment file open for appending; fsync the directory if ``sync``."""
        seg = cls(directory, base, max_record_bytes=max_record_bytes,
                  index_interval=index_interval)
        seg.fd = open_append(seg.path, create=True)
        if sync:
            try:
                fsync_dir(directory)
            except BaseException:
                seg.close()
                raise
        return seg

    def open_writer(self) -> None:
        """Open the append descriptor of an existing segment."""
        if self.fd < 0:
            self.fd = open_append(self.path, create=False)

    def close(self) -> None:
        """Close the append descriptor, if any (no sync)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            close_fd(fd)

    def encode(self, items: Iterable[tuple[bytes, float]], first_offset: int,
               max_payload: int) -> Pending:
        """Encode a batch for the end of this segment without changing any state."""
        data = bytearray()
        pack_frame = FRAME.pack
        pack_body = BODY_HEAD.pack
        crc32 = zlib.crc32
        interval = self.index_interval
        size = self.size
        next_index_at = self.next_index_at
        max_ts = self.max_ts
        entries: list[tuple[int, int, float]] = []
        last_pos = self.last_record_pos
        offset = first_offset
        try:
            for payload, timestamp in items:
                n = len(payload)
                if n > max_payload:
                    raise ConfigError(f"payload of {n} bytes exceeds the {max_payload}-byte limit"
                                      f" (max_record_bytes minus the {HEADER_SIZE}-byte header)")
                if timestamp != timestamp:  # NaN would poison the running-max time index
                    raise ConfigError("timestamp is NaN")
                if timestamp > max_ts:
                    max_ts = timestamp
                last_pos = size + len(data)
                if last_pos >= next_index_at:
                    entries.append((offset, last_pos, max_ts))
                    next_index_at = last_pos + interval
                body = pack_body(offset, timestamp)
                # crc32 chains: crc(body + payload) without concatenating them first.
                data += pack_frame(RECORD_VERSION, 0, n + BODY_HEAD_SIZE,
                                   crc32(payload, crc32(body)))
                data += body
                data += payload
                offset += 1
        except ConfigError:
            raise
        except (TypeError, ValueError, OverflowError, struct.error) as exc:
            raise ConfigError(f"bad record at offset {offset}: {exc}") from exc
        return Pending(data, offset - first_offset, entries, max_ts, next_index_at, last_pos)

    def write(self, data: bytes | bytearray) -> None:
        """Append ``data`` whole, or restore the file to its previous length and raise.

        StorageError: nothing was written (disk full, I/O error). FatalStorageError: the file
        could not be cut back, so its tail holds bytes the log never committed.
        """
        try:
            write_all(self.fd, data)
        except OSError as exc:
            try:
                ftruncate(self.fd, self.size)
            except OSError as exc2:
                raise storage_error(
                    exc2, f"write to {self.path} failed ({exc.strerror}), then cutting it back",
                    fatal=True) from exc
            raise storage_error(exc, f"write to {self.path}") from exc

    def commit(self, pending: Pending) -> None:
        """Account for a batch that has been written."""
        self.size += len(pending.data)
        self.next_offset += pending.count
        self.records += pending.count
        self.index.extend(pending.entries)
        self.max_ts = pending.max_ts
        self.next_index_at = pending.next_index_at
        self.last_record_pos = pending.last_record_pos
        self.unsynced = True

    def sync(self) -> None:
        """fdatasync the append descriptor; FatalStorageError on failure."""
        try:
            datasync(self.fd)
        except OSError as exc:
            raise storage_error(exc, f"fsync {self.path}", fatal=True) from exc
        self.unsynced = False

    # -- the index file -----------------------------------------------------------------------

    def write_index(self, sync: bool) -> bool:
        """Write the ``.idx`` atomically; False if it could not be written.

        The index is advisory, so a failed write only costs a rescan at the next open; a
        failed fsync is still fatal, like every fsync failure.
        """
        data = encode_index(IndexFile(
            self.base, self.size, self.next_offset, self.records, self.last_record_pos,
            self.max_ts, self.index, self.holes))
        try:
            write_file_atomic(self.index_path, data, sync)
        except FatalStorageError:
            raise
        except OSError as exc:
            logger.warning("could not write index %s (%s); it will be rebuilt at next open",
                           self.index_path, exc)
            unlink(self.index_path)  # an older index may no longer describe the segment
            return False
        return True

    def load_index(self, file_size: int, upper: int) -> str | None:
        """Adopt the ``.idx`` if it matches the segment file; else return why not."""
        try:
            meta = decode_index(read_file(self.index_path))
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable ({exc})"
        except DecodeError as exc:
            return f"corrupt ({exc})"
        if meta.base_offset != self.base:
            return f"base offset {meta.base_offset} is not {self.base}"
        if meta.segment_size != file_size:
            return f"describes {meta.segment_size} bytes but the segment has {file_size}"
        if meta.next_offset > upper:
            return f"ends at offset {meta.next_offset}, past the next segment ({upper})"
        if meta.record_count == 0:
            if file_size != 0:
                return "no records in a non-empty segment"
        else:
            # Spot check: the last record must be where the index says, whole and intact, and
            # end exactly at the end of the file.
            tail_size = file_size - meta.last_record_pos
            if tail_size > FRAME_SIZE + self.max_length:
                return "last record position impossible"
            fd = open_read(self.path)
            try:
                tail = pread(fd, tail_size, meta.last_record_pos, self.path)
            finally:
                close_fd(fd)
            if len(tail) < HEADER_SIZE:
                return "last record missing"
            ver, flags, length, crc, offset, _ = HEADER.unpack_from(tail, 0)
            if (ver != RECORD_VERSION or flags or FRAME_SIZE + length != len(tail)
                    or offset != meta.next_offset - 1
                    or zlib.crc32(memoryview(tail)[FRAME_SIZE:]) != crc):
                return "last record does not match"
        self.size = meta.segment_size
        self.next_offset = meta.next_offset
        self.records = meta.record_count
        self.last_record_pos = meta.last_record_pos
        self.max_ts = meta.max_timestamp
        self.index = meta.index
        self.holes = meta.holes
        return None

    # -- lookups ------------------------------------------------------------------------------

    def time_search_start(self, timestamp: float) -> tuple[int, int]:
        """Return (position, offset) from which the first record >= ``timestamp`` is found."""
        found = self.index.before_time(timestamp)
        return (0, self.base) if found is None else (found[1], found[0])

    def offset_search_start(self, offset: int) -> tuple[int, int]:
        """Return (position, offset) of the closest indexed record at or before ``offset``."""
        found = self.index.floor_offset(offset)
        return (0, self.base) if found is None else (found[1], found[0])
