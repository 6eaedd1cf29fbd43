"""The Log: an append-only, checksummed, segmented record log in one directory.

A Log is used by one thread at a time: it takes no locks and starts no threads. The owner's
loop drives group commit by calling :meth:`Log.maybe_sync`. One process at a time may open a
directory (an exclusive ``flock`` on ``<directory>/.lock`` where the platform has it).
"""

from __future__ import annotations

import errno
import logging
import math
import os
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from types import TracebackType

from meshmq._errors import NodeClosed, StorageError

from ._config import (
    DEFAULT_INDEX_INTERVAL_BYTES,
    DEFAULT_SEGMENT_BYTES,
    LogConfig,
)
from ._fileio import FatalStorageError, unlink
from ._reader import iter_records
from ._record import DEFAULT_MAX_RECORD_BYTES, HEADER_SIZE, Record
from ._recovery import RecoveryReport, recover
from ._segment import Segment

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory lock; one writer by convention
    fcntl = None  # type: ignore[assignment]

__all__ = ["Log"]

logger = logging.getLogger("meshmq.durability")


class Log:
    """An append-only log of (offset, timestamp, payload) records; see docs/STORAGE.md.

    Offsets are consecutive integers from 0. Not thread-safe: one thread at a time.
    """

    def __init__(self, directory: str | os.PathLike[str], config: LogConfig, *,
                 full_scan: bool = False) -> None:
        """Open and recover the log in ``directory`` with checked settings; use :meth:`open`."""
        self._config = config
        self._directory = os.fspath(directory)
        self._closed = True
        self._failure: StorageError | None = None
        self._lock_fd = -1
        try:
            os.makedirs(self._directory, exist_ok=True)
        except OSError as exc:
            raise StorageError(exc.errno, f"create {self._directory}: {exc.strerror}") from exc
        self._lock()
        try:
            self._segments, self._recovery = recover(
                self._directory,
                max_record_bytes=config.decode_max_record_bytes,
                index_interval=config.index_interval,
                sync=config.sync,
                full_scan=full_scan,
            )
        except BaseException:
            self._unlock()
            raise
        self._closed = False
        self._active = self._segments[-1]
        self._next_offset = self._active.next_offset
        self._durable_offset = self._next_offset
        self._max_payload = config.max_record_bytes - HEADER_SIZE
        self._last_sync_at = -math.inf
        self._appends = 0
        self._batches = 0
        self._fsyncs = 0
        self._write_errors = 0
        self._retention_dropped = 0
        logger.info("opened log %s: offsets %d..%d in %d segments (%d scanned, %.3f s)",
                    self._directory, self.first_offset, self._next_offset,
                    len(self._segments), self._recovery.segments_scanned,
                    self._recovery.seconds)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        fsync: str = "always",
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retention_seconds: float | None = None,
        retention_bytes: int | None = None,
        *,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
        index_interval_bytes: int = DEFAULT_INDEX_INTERVAL_BYTES,
        full_scan: bool = False,
    ) -> Log:
        """Open (creating if needed) and recover the log in ``directory``.

        ``fsync``: "always" (append returns once fdatasync'd), "interval=<ms>" (group commit
        driven by :meth:`maybe_sync`) or "never". ``full_scan`` verifies every segment instead
        of trusting the indexes of sealed ones. ``max_record_bytes`` caps header + payload.
        ConfigError for a bad setting; StorageError if the directory cannot be used.
        """
        config = LogConfig.make(fsync, segment_bytes, retention_seconds, retention_bytes,
                                max_record_bytes, index_interval_bytes)
        return cls(directory, config, full_scan=full_scan)

    # -- lifecycle ----------------------------------------------------------------------------

    def _lock(self) -> None:
        if fcntl is None:
            return
        path = os.path.join(self._directory, ".lock")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(exc.errno, f"open {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(errno.EBUSY, f"log {self._directory} is open elsewhere"
                               f" ({exc.strerror})") from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd >= 0:
            fd, self._lock_fd = self._lock_fd, -1
            os.close(fd)  # closing the descriptor releases the flock

    def close(self) -> None:
        """Sync pending records (unless fsync="never" or failed) and release the log; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._failure is None and self._config.sync and self._active.unsynced:
                self._sync_active()
        finally:
            self._active.close()
            self._unlock()

    def __enter__(self) -> Log:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "failed" if self._failure else "open"
        return (f"<Log {self._directory!r} {state} offsets {self.first_offset}.."
                f"{self._next_offset} durable<{self._durable_offset}>")

    def _check_open(self) -> None:
        if self._closed:
            raise NodeClosed(f"log {self._directory} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._failure is not None:
            raise StorageError(self._failure.errno or errno.EIO,
                               f"log {self._directory} failed earlier and refuses writes:"
                               f" {self._failure}") from self._failure

    def _fail(self, exc: StorageError) -> None:
        """Enter the failed state: after an fsync error the page cache cannot be trusted."""
        self._failure = exc
        logger.error("log %s failed, no more writes: %s", self._directory, exc)

    # -- properties ---------------------------------------------------------------------------

    @property
    def config(self) -> LogConfig:
        """The settings the log was opened with."""
        return self._config

    @property
    def directory(self) -> str:
        """The log's directory."""
        return self._directory

    @property
    def first_offset(self) -> int:
        """Offset of the oldest segment's first record (== next_offset when empty)."""
        return self._segments[0].base

    @property
    def next_offset(self) -> int:
        """Offset the next append gets."""
        return self._next_offset

    @property
    def durable_offset(self) -> int:
        """Every offset below this is on disk as far as the fsync policy promises."""
        return self._durable_offset

    @property
    def recovery(self) -> RecoveryReport:
        """What open() found and repaired."""
        return self._recovery

    @property
    def failed(self) -> bool:
        """True once an fsync (or a write that could not be undone) failed; writes then raise."""
        return self._failure is not None

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._closed

    # -- writing ------------------------------------------------------------------------------

    def append(self, payload: bytes, timestamp: float) -> int:
        """Append one record and return its offset (durable on return if fsync="always")."""
        first = self._next_offset
        self._append(((payload, timestamp),))
        return first

    def append_many(self, items: Iterable[tuple[bytes, float]]) -> list[int]:
        """Append (payload, timestamp) records with one write (and one fsync); return offsets.

        All or nothing: on StorageError or ConfigError no record of the batch is appended.
        """
        first = self._next_offset
        return list(range(first, self._append(items)))

    def _append(self, items: Iterable[tuple[bytes, float]]) -> int:
        """append_many without the list of offsets: returns the next offset after the batch."""
        if self._closed or self._failure is not None:
            self._check_writable()
        seg = self._active
        if seg.size >= self._config.segment_bytes:
            seg = self._roll()
        first = self._next_offset
        pending = seg.encode(items, first, self._max_payload)
        if not pending.count:
            return first
        try:
            seg.write(pending.data)
            if self._config.mode == "always":
                self._fsyncs += 1
                seg.sync()
        except FatalStorageError as exc:
            self._fail(exc)
            raise
        except StorageError:
            self._write_errors += 1
            raise
        seg.commit(pending)
        self._next_offset = seg.next_offset
        self._appends += pending.count
        self._batches += 1
        if self._config.mode != "interval":
            seg.unsynced = self._config.mode == "never"
            self._durable_offset = self._next_offset
        return self._next_offset

    def _roll(self) -> Segment:
        """Seal the full active segment (sync, write its index) and start a new one."""
        old = self._active
        sync = self._config.sync
        try:
            if sync and old.unsynced:
                self._sync_active()
            old.write_index(sync)
            new = Segment.create(self._directory, self._next_offset,
                                 max_record_bytes=self._config.decode_max_record_bytes,
                                 index_interval=self._config.index_interval, sync=sync)
        except FatalStorageError as exc:
            if self._failure is None:
                self._fail(exc)
            raise
        old.close()
        self._segments.append(new)
        self._active = new
        return new

    def _sync_active(self) -> None:
        self._fsyncs += 1
        try:
            self._active.sync()
        except FatalStorageError as exc:
            self._fail(exc)
            raise
        self._durable_offset = self._next_offset

    def maybe_sync(self, now: float) -> int:
        """Group commit: fsync if the interval elapsed since the last one and records wait.

        ``now`` is any monotonic clock in seconds, the same one on every call. Returns
        durable_offset. A no-op under "always" and "never".
        """
        self._check_writable()
        if (self._config.mode == "interval" and self._active.unsynced
                and now - self._last_sync_at >= self._config.interval):
            self._sync_active()
            self._last_sync_at = now
        return self._durable_offset

    def sync(self) -> int:
        """fsync now, whatever the policy; return durable_offset."""
        self._check_writable()
        self._sync_active()
        return self._durable_offset

    # -- reading ------------------------------------------------------------------------------

    def read(self, start: int = 0, end: int | None = None) -> Iterator[Record]:
        """Iterate verified records with start <= offset < end, lazily, in offset order.

        ``end`` defaults to next_offset at the time of the call; later appends are not seen.
        Offsets lost to damage or retention are skipped; a corrupt record is never returned.
        """
        self._check_open()
        stop = self._next_offset if end is None else min(end, self._next_offset)
        return self._read(max(start, 0), stop)

    def _segment_index(self, offset: int) -> int:
        """Index in self._segments of the segment that would hold ``offset``."""
        bases = [s.base for s in self._segments]
        return max(bisect_right(bases, offset) - 1, 0)

    def _read(self, start: int, stop: int) -> Iterator[Record]:
        if start >= stop:
            return
        seg: Segment | None = self._segments[self._segment_index(start)]
        while seg is not None and seg.base < stop:
            if start > seg.base:
                pos, expected = seg.offset_search_start(start)
            else:
                pos, expected = 0, seg.base
            yield from iter_records(seg, pos, expected, start, stop)
            # Look the successor up afresh: retention may have removed segments meanwhile.
            after = seg.base
            seg = next((s for s in self._segments if s.base > after), None)

    def offset_for_time(self, timestamp: float) -> int:
        """Return the first offset whose timestamp is >= ``timestamp`` (next_offset if none)."""
        self._check_open()
        for seg in self._segments:
            # max_ts is the newest timestamp in the segment, so earlier segments hold nothing
            # at or after ``timestamp`` and this one does.
            if seg.max_ts >= timestamp:
                pos, expected = seg.time_search_start(timestamp)
                records = iter_records(seg, pos, expected, expected, seg.next_offset)
                try:
                    for record in records:
                        if record.timestamp >= timestamp:
                            return record.offset
                finally:
                    records.close()  # release the segment's descriptor now, not at GC
        return self._next_offset

    # -- retention ----------------------------------------------------------------------------

    def apply_retention(self, now: float) -> int:
        """Delete whole sealed segments past the age or size limits; return records dropped.

        ``now`` is on the records' timestamp clock. A segment goes by age once its newest
        record is older than retention_seconds; by size while the log exceeds retention_bytes.
        The active segment is never deleted, and only the oldest segments are, so no gap opens.
        """
        self._check_open()
        max_age, max_bytes = self._config.retention_seconds, self._config.retention_bytes
        dropped = 0
        total = sum(s.size for s in self._segments)
        while len(self._segments) > 1:
            oldest = self._segments[0]
            by_age = max_age is not None and oldest.max_ts < now - max_age
            by_size = max_bytes is not None and total > max_bytes
            if not (by_age or by_size):
                break
            try:
                os.unlink(oldest.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise StorageError(exc.errno, f"delete {oldest.path}: {exc.strerror}") from exc
            unlink(oldest.index_path)  # if this fails the orphan index goes at the next open
            self._segments.pop(0)
            total -= oldest.size
            dropped += oldest.records
        self._retention_dropped += dropped
        if dropped:
            logger.info("retention dropped %d records from %s; first offset now %d", dropped,
                        self._directory, self.first_offset)
        return dropped

    # -- introspection ------------------------------------------------------------------------

    def stats(self) -> dict[str, int | float]:
        """Counters and sizes: records, bytes, segments, appends, fsyncs, damage and more."""
        segs = self._segments
        return {
            "records": sum(s.records for s in segs),
            "bytes": sum(s.size for s in segs),
            "segments": len(segs),
            "first_offset": self.first_offset,
            "next_offset": self._next_offset,
            "durable_offset": self._durable_offset,
            "appends": self._appends,
            "append_batches": self._batches,
            "fsyncs": self._fsyncs,
            "write_errors": self._write_errors,
            "truncated_bytes": self._recovery.truncated_bytes,
            "lost_records": self._recovery.lost_records + sum(s.read_lost for s in segs),
            "read_damage": sum(s.read_damage for s in segs),
            "retention_dropped": self._retention_dropped,
            "recovery_seconds": self._recovery.seconds,
            "failed": int(self._failure is not None),
        }
