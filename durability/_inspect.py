"""``meshmq journal inspect``: describe a journal directory without changing it.

Read-only (no lock, no truncation, no index rewrite), so it also works on the directory of a
running journal: sealed segments are described from their index when it checks out, the others
are scanned; damage is reported, never repaired.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re

from meshmq._errors import StorageError

from ._config import DEFAULT_SEGMENT_BYTES
from ._reader import iter_records, scan_segment
from ._record import DEFAULT_MAX_RECORD_BYTES
from ._segment import Segment

__all__ = ["inspect_directory"]

_SEGMENT_RE = re.compile(r"^(\d{20})\.log$")


def _when(ts: float) -> str:
    if not math.isfinite(ts):
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _first_ts(seg: Segment) -> float:
    records = iter_records(seg, 0, seg.base, seg.base, seg.next_offset)
    try:
        for record in records:
            return record.timestamp
    finally:
        records.close()
    return math.inf


def inspect_directory(directory: str) -> str:
    """Return a report: one line per segment, then totals, time range and damage."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise StorageError(exc.errno, f"list {directory}: {exc.strerror}") from exc
    bases = [int(m.group(1)) for n in names if (m := _SEGMENT_RE.match(n))]
    if not bases:
        return f"{directory}: no segments (not a journal directory, or empty)"
    lines = [f"{directory}: {len(bases)} segment(s)",
             f"{'segment':<26} {'offsets':>25} {'records':>10} {'bytes':>12}  source   damage"]
    total_records = total_bytes = 0
    first_ts, last_ts = math.inf, -math.inf
    damage: list[str] = []
    lost = 0
    for i, base in enumerate(bases):
        last = i == len(bases) - 1
        upper = (1 << 64) if last else bases[i + 1]
        seg = Segment(directory, base, max_record_bytes=DEFAULT_MAX_RECORD_BYTES,
                      index_interval=DEFAULT_SEGMENT_BYTES)
        size = os.stat(seg.path).st_size
        reason = "active" if last else seg.load_index(size, upper)
        tail = None
        if reason is None:
            source = "index"
        else:
            source = "scan"
            tail = scan_segment(seg, size, upper)
        notes = []
        for h in seg.holes:
            notes.append(f"bytes {h.bad_pos}..{h.resume_pos - 1} bad, offsets "
                         f"{h.first_lost}..{h.resume_offset - 1} lost")
            lost += h.resume_offset - h.first_lost
        if tail is not None:
            notes.append(f"bad tail of {size - tail} bytes at byte {tail} (cut at next open)")
        if not last and seg.next_offset < upper:
            notes.append(f"offsets {seg.next_offset}..{upper - 1} missing before next segment")
            lost += upper - seg.next_offset
        damage.extend(f"{seg.name}: {n}" for n in notes)
        span = f"{seg.base}..{seg.next_offset - 1}" if seg.records else "-"
        lines.append(f"{seg.name:<26} {span:>25} {seg.records:>10,} {size:>12,}  "
                     f"{source:<7}  {'yes' if notes else 'no'}")
        total_records += seg.records
        total_bytes += size
        if seg.records:
            first_ts = min(first_ts, _first_ts(seg))
            last_ts = max(last_ts, seg.max_ts)
    lines.append(f"total: {total_records:,} records, {total_bytes:,} bytes, offsets "
                 f"{bases[0]}..{seg.next_offset - 1}")
    lines.append(f"time range: {_when(first_ts)} .. {_when(last_ts)}")
    if damage:
        lines.append(f"damage: {len(damage)} place(s), {lost} offsets lost")
        lines.extend(f"  {d}" for d in damage)
    else:
        lines.append("damage: none")
    return "\n".join(lines)
