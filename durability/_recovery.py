"""Opening a log directory: find the segments, trust or rebuild their indexes, cut bad tails.

Sealed segments whose ``.idx`` matches the file (size, last record, crc) are adopted without a
scan; the last segment, and any segment whose index is missing, corrupt or inconsistent, is
scanned record by record. What the scan finds is reported in a :class:`RecoveryReport` and
logged at WARNING. See docs/STORAGE.md, "Recovery".
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, field

from meshmq._errors import StorageError

from ._fileio import fsync_dir, sync_path, truncate_path, unlink
from ._reader import scan_segment
from ._segment import Segment

__all__ = ["RecoveryReport", "recover"]

logger = logging.getLogger("meshmq.durability")

_SEGMENT_RE = re.compile(r"^(\d{20})\.log$")
_INDEX_RE = re.compile(r"^(\d{20})\.idx(\.tmp)?$")
#: Upper bound for offsets in the last segment (the u64 offset field's range).
_NO_UPPER = 1 << 64


@dataclass(frozen=True)
class RecoveryReport:
    """What ``Log.open`` found on disk and did about it."""

    #: Bytes cut off the end of segments (torn writes, garbage, preallocated zeros).
    truncated_bytes: int = 0
    #: (segment file name, byte position) of the first cut, or None if nothing was cut.
    truncated_at: tuple[str, int] | None = None
    #: Inclusive offset ranges missing from the log because of damage before its tail.
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)
    #: Segments verified record by record (the last one always is).
    segments_scanned: int = 0
    #: Segments in the log after recovery.
    segments: int = 0
    #: Sealed segments scanned and given a fresh ``.idx`` (theirs was missing, corrupt or
    #: inconsistent, or ``full_scan`` was asked for).
    indexes_rebuilt: int = 0
    #: Wall time ``open`` spent recovering.
    seconds: float = 0.0
    #: Every cut made: (segment file name, position, bytes removed).
    truncations: list[tuple[str, int, int]] = field(default_factory=list)

    @property
    def lost_records(self) -> int:
        """How many offsets the lost ranges cover."""
        return sum(last - first + 1 for first, last in self.lost_ranges)

    @property
    def clean(self) -> bool:
        """True when nothing was cut and nothing is missing."""
        return not self.truncated_bytes and not self.lost_ranges


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort inclusive ranges and join those that touch or overlap."""
    merged: list[tuple[int, int]] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _remove_quietly(path: str) -> None:
    if not unlink(path):
        logger.warning("could not remove %s", path)


def recover(directory: str, *, max_record_bytes: int, index_interval: int, sync: bool,
            full_scan: bool) -> tuple[list[Segment], RecoveryReport]:
    """Open every segment in ``directory``, verify and repair; the last one is left writable.

    ``sync``: fsync what recovery changes, and every segment, so that what is on disk when
    ``open`` returns is durable. ``full_scan``: scan sealed segments too, ignoring indexes.
    """
    started = time.perf_counter()
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise StorageError(exc.errno, f"list {directory}: {exc.strerror}") from exc
    bases = sorted(int(m.group(1)) for n in names if (m := _SEGMENT_RE.match(n)))
    known = set(bases)
    for n in names:
        m = _INDEX_RE.match(n)
        # Leftover temporary files and indexes whose segment was deleted are debris.
        if m and (m.group(2) or int(m.group(1)) not in known):
            _remove_quietly(os.path.join(directory, n))
    opts = {"max_record_bytes": max_record_bytes, "index_interval": index_interval}
    if not bases:
        seg = Segment.create(directory, 0, sync=sync, **opts)
        return [seg], RecoveryReport(segments=1, seconds=time.perf_counter() - started)

    segments: list[Segment] = []
    lost: list[tuple[int, int]] = []
    truncations: list[tuple[str, int, int]] = []
    scanned = rebuilt = 0
    for i, base in enumerate(bases):
        last = i == len(bases) - 1
        upper = _NO_UPPER if last else bases[i + 1]
        seg = Segment(directory, base, **opts)
        try:
            file_size = os.stat(seg.path).st_size
        except OSError as exc:
            raise StorageError(exc.errno, f"stat {seg.path}: {exc.strerror}") from exc
        reason = "last segment" if last else ("full scan" if full_scan else
                                               seg.load_index(file_size, upper))
        if reason is not None:
            if not last and not full_scan:
                logger.info("rebuilding index of %s: %s", seg.name, reason)
            scanned += 1
            tail = scan_segment(seg, file_size, upper)
            if tail is not None:
                truncations.append((seg.name, tail, file_size - tail))
                truncate_path(seg.path, tail, sync)
            if last:
                _remove_quietly(seg.index_path)  # the active segment's index lives in memory
            else:
                rebuilt += 1
                seg.write_index(sync)
        if sync and not last:
            sync_path(seg.path)
        lost.extend((h.first_lost, h.resume_offset - 1) for h in seg.holes
                    if h.resume_offset > h.first_lost)
        if not last and seg.next_offset < upper:
            # The next segment starts later than this one ends: the records between are gone
            # (a sealed segment cut short, or whose tail was damaged).
            lost.append((seg.next_offset, upper - 1))
        segments.append(seg)

    active = segments[-1]
    active.open_writer()
    if sync:
        try:
            active.sync()
            fsync_dir(directory)
        except StorageError:
            active.close()
            raise
    report = RecoveryReport(
        truncated_bytes=sum(t[2] for t in truncations),
        truncated_at=(truncations[0][0], truncations[0][1]) if truncations else None,
        lost_ranges=_merge(lost),
        segments_scanned=scanned,
        segments=len(segments),
        indexes_rebuilt=rebuilt,
        seconds=time.perf_counter() - started,
        truncations=truncations,
    )
    for name, position, removed in truncations:
        logger.warning("%s: cut %d bytes of torn or corrupt tail at byte %d",
                       os.path.join(directory, name), removed, position)
    for first, last_lost in report.lost_ranges:
        logger.warning("%s: offsets %d..%d lost to damage (%d records)", directory, first,
                       last_lost, last_lost - first + 1)
    return segments, report

