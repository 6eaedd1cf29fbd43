"""The two loops that walk a segment's records: the recovery scan and the reader.

Both read the file in chunks, verify every record (frame fields, crc, expected offset) and, on
a bad record, resynchronise on the next valid one. They are two copies of one loop on purpose:
they are the hot paths (hundreds of thousands of records a second), and a shared generator
would cost a yield and a tuple per record.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Generator

from ._fileio import close_fd, open_read, pread
from ._index import NO_RECORD, Hole, SparseIndex
from ._record import (
    BODY_HEAD_SIZE,
    FRAME_SIZE,
    HEADER,
    HEADER_SIZE,
    RECORD_VERSION,
    Record,
    make_record,
)
from ._segment import CHUNK_BYTES, Segment

__all__ = ["find_resume", "iter_records", "scan_segment"]

logger = logging.getLogger("meshmq.durability")

_START_MARK = bytes((RECORD_VERSION, 0))


def scan_segment(seg: Segment, file_size: int, upper: int) -> int | None:
    """Rebuild ``seg``'s state by verifying every record; return where a bad tail starts.

    Records must carry consecutive offsets from ``seg.base`` and stay below ``upper``. After a
    bad record the scan resynchronises on the next valid one, recording a Hole; if none follows,
    the rest of the file is a bad tail and its start is returned (None if the file is clean).
    """
    fd = open_read(seg.path)
    try:
        return _scan(seg, fd, file_size, upper)
    finally:
        close_fd(fd)


def _scan(seg: Segment, fd: int, file_size: int, upper: int) -> int | None:
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    max_length = seg.max_length
    interval = seg.index_interval
    path = seg.path
    index = SparseIndex()
    holes: list[Hole] = []
    pos = 0
    expected = seg.base
    max_ts = -math.inf
    count = 0
    last_pos = NO_RECORD
    next_index_at = 0
    need = 0
    tail: int | None = None
    while pos < file_size:
        buf = pread(fd, min(max(CHUNK_BYTES, need), file_size - pos), pos, path)
        blen = len(buf)
        bad = need > blen  # the file is shorter than it claimed
        need = 0
        view = memoryview(buf)
        rel = 0
        while not bad and blen - rel >= HEADER_SIZE:
            ver, flags, length, crc, offset, timestamp = unpack(buf, rel)
            end = rel + FRAME_SIZE + length
            if (ver != RECORD_VERSION or flags or length < BODY_HEAD_SIZE or length > max_length
                    or offset != expected or offset >= upper):
                bad = True
            elif end > blen:
                # A record running past the chunk: reread from its start, unless it also runs
                # past the end of the file (a torn write).
                if pos + end > file_size:
                    bad = True
                else:
                    need = FRAME_SIZE + length
                break
            elif crc32(view[rel + FRAME_SIZE:end]) != crc:
                bad = True
            else:
                if timestamp > max_ts:
                    max_ts = timestamp
                if pos + rel >= next_index_at:
                    index.add(offset, pos + rel, max_ts)
                    next_index_at = pos + rel + interval
                last_pos = pos + rel
                count += 1
                expected = offset + 1
                rel = end
        view.release()
        pos += rel
        if not bad and not need and pos < file_size and (rel == 0 or file_size - pos < HEADER_SIZE):
            bad = True  # too few bytes left for a header: a torn write
        if bad:
            found = find_resume(seg, fd, pos, file_size, expected, upper)
            if found is None:
                tail = pos
                break
            holes.append(Hole(pos, found[0], expected, found[1]))
            pos, expected = found
    seg.size = pos
    seg.next_offset = expected
    seg.records = count
    seg.last_record_pos = last_pos
    seg.max_ts = max_ts
    seg.index = index
    seg.holes = holes
    seg.next_index_at = next_index_at
    return tail


def find_resume(seg: Segment, fd: int, bad_pos: int, end: int, expected: int,
                upper: int) -> tuple[int, int] | None:
    """Find the first valid record after ``bad_pos`` and before ``end``: (position, offset).

    A candidate must start with the version and flags bytes, have a plausible length, a
    matching crc, and an offset in [expected, upper) no larger than the number of records the
    skipped bytes could have held (each takes at least HEADER_SIZE): that rejects stale or
    foreign records. None if there is no such record.
    """
    unpack = HEADER.unpack_from
    max_length = seg.max_length
    chunk_start = bad_pos + 1
    while end - chunk_start >= HEADER_SIZE:
        chunk = pread(fd, min(CHUNK_BYTES, end - chunk_start), chunk_start, seg.path)
        if len(chunk) < HEADER_SIZE:
            return None
        i = 0
        while (i := chunk.find(_START_MARK, i)) >= 0:
            q = chunk_start + i
            if end - q < HEADER_SIZE:
                return None
            if i + HEADER_SIZE <= len(chunk):
                head, hrel = chunk, i
            else:
                head, hrel = pread(fd, HEADER_SIZE, q, seg.path), 0
            _, _, length, crc, offset, _ = unpack(head, hrel)
            if (BODY_HEAD_SIZE <= length <= max_length and q + FRAME_SIZE + length <= end
                    and expected <= offset < upper
                    and offset <= expected + (q - bad_pos) // HEADER_SIZE):
                if i + FRAME_SIZE + length <= len(chunk):
                    body: bytes | memoryview = memoryview(chunk)[i + FRAME_SIZE:
                                                                 i + FRAME_SIZE + length]
                else:
                    body = pread(fd, length, q + FRAME_SIZE, seg.path)
                if zlib.crc32(body) == crc:
                    return q, offset
            i += 1
        # Overlap one byte so a start mark split across two chunks is still seen.
        chunk_start += len(chunk) - 1
    return None


def iter_records(seg: Segment, pos: int, expected: int, start: int,
                 stop: int) -> Generator[Record, None, None]:
    """Yield ``seg``'s verified records with start <= offset < stop, walking from ``pos``.

    ``expected`` is the offset of the record at ``pos``. Damage met on the way is skipped
    (known holes silently, new damage with a warning); a bad record is never yielded.
    """
    unpack = HEADER.unpack_from
    crc32 = zlib.crc32
    max_length = seg.max_length
    path = seg.path
    fd = open_read(path)
    need = 0
    try:
        while expected < stop:
            # Re-read the size at every chunk: the active segment grows while a reader runs.
            end_limit = seg.size
            if pos >= end_limit:
                return
            buf = pread(fd, min(max(CHUNK_BYTES, need), end_limit - pos), pos, path)
            blen = len(buf)
            bad = need > blen
            need = 0
            view = memoryview(buf)
            rel = 0
            while not bad and blen - rel >= HEADER_SIZE:
                ver, flags, length, crc, offset, timestamp = unpack(buf, rel)
                end = rel + FRAME_SIZE + length
                if (ver != RECORD_VERSION or flags or length < BODY_HEAD_SIZE
                        or length > max_length or offset != expected):
                    bad = True
                elif end > blen:
                    if pos + end > end_limit:
                        bad = True
                    else:
                        need = FRAME_SIZE + length
                    break
                elif crc32(view[rel + FRAME_SIZE:end]) != crc:
                    bad = True
                else:
                    expected = offset + 1
                    if offset >= start:
                        yield make_record(offset, timestamp, buf[rel + HEADER_SIZE:end])
                        if expected >= stop:
                            return
                    rel = end
            view.release()
            pos += rel
            if not bad and not need and pos < end_limit and (
                    rel == 0 or end_limit - pos < HEADER_SIZE):
                bad = True
            if bad:
                pos, expected = _skip_damage(seg, fd, pos, expected, end_limit)
    finally:
        close_fd(fd)


def _skip_damage(seg: Segment, fd: int, pos: int, expected: int,
                 end_limit: int) -> tuple[int, int]:
    """Return where reading resumes after a bad record at ``pos``: (position, offset)."""
    for hole in seg.holes:
        if hole.bad_pos == pos:
            return hole.resume_pos, hole.resume_offset
    # New damage (the disk changed since open, or the segment was trusted by its index).
    found = find_resume(seg, fd, pos, end_limit, expected, seg.next_offset)
    resume_pos, resume_offset = found or (end_limit, seg.next_offset)
    seg.holes.append(Hole(pos, resume_pos, expected, resume_offset))
    seg.holes.sort(key=lambda h: h.bad_pos)
    seg.read_damage += 1
    seg.read_lost += resume_offset - expected
    logger.warning("damage found reading %s at byte %d: skipped to byte %d, offsets %d..%d lost",
                   seg.path, pos, resume_pos, expected, resume_offset - 1)
    return resume_pos, resume_offset
