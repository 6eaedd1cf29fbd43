"""Recovery on open: torn tails, garbage, bit flips, mid-segment damage, indexes."""

from __future__ import annotations

import logging
import random
from itertools import accumulate
from pathlib import Path
from types import SimpleNamespace

import pytest
from meshmq.durability import HEADER_SIZE, Log, encode_record

FIRST = "00000000000000000000.log"


def record_ends(tools: SimpleNamespace, count: int, first: int = 0) -> list[int]:
    """End position of each record ``fill`` writes into one segment starting at ``first``."""
    return list(accumulate(HEADER_SIZE + len(tools.payload(i)) for i in range(first, count)))


@pytest.fixture
def pristine(tmp_path: Path, tools: SimpleNamespace) -> Path:
    """A closed one-segment log of 12 records."""
    directory = tmp_path / "pristine"
    with Log.open(directory, fsync="never") as log:
        tools.fill(log, 12, batch=5)
    return directory


# ---------------------------------------------------------------------------------------------
# torn and garbage tails


def test_truncation_at_every_byte_of_the_last_records(tmp_path: Path, pristine: Path,
                                                      tools: SimpleNamespace) -> None:
    ends = record_ends(tools, 12)
    size = ends[-1]
    assert (pristine / FIRST).stat().st_size == size
    work = tmp_path / "work"
    for cut in range(ends[-5], size + 1):  # every byte of the last 4 records, and no cut
        tools.copy_dir(pristine, work)
        with open(work / FIRST, "r+b") as f:
            f.truncate(cut)
        whole = sum(1 for e in ends if e <= cut)
        with Log.open(work, fsync="never") as log:
            assert log.next_offset == whole, cut
            assert list(log.read()) == [tools.expected_record(i) for i in range(whole)], cut
            report = log.recovery
            assert report.truncated_bytes == cut - (ends[whole - 1] if whole else 0)
            assert report.lost_ranges == []
            assert report.truncated_at == (None if cut in ends else (FIRST, ends[whole - 1]))
            # The next append works and gets the next offset.
            assert log.append(tools.payload(whole), tools.ts(whole)) == whole
        records, log = tools.read_all(work, fsync="never")
        assert records == [tools.expected_record(i) for i in range(whole + 1)], cut
        assert log.recovery.clean


def test_truncation_inside_the_first_record_of_the_last_segment(
        tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=200) as log:
        tools.fill(log, 20)
    last = tools.segment_files(tmp_path)[-1]
    base = int(last.stem)
    with open(last, "r+b") as f:
        f.truncate(7)
    with Log.open(tmp_path, fsync="never", segment_bytes=200) as log:
        assert log.next_offset == base and log.recovery.truncated_at == (last.name, 0)
        assert log.append(b"again", 1.0) == base
        assert [r.offset for r in log.read()] == list(range(base + 1))


@pytest.mark.parametrize("length", [1, 25, 26, 27, 100, 4096, 70_000])
def test_zero_filled_tail_is_cut(pristine: Path, tools: SimpleNamespace, length: int) -> None:
    with open(pristine / FIRST, "ab") as f:
        f.write(bytes(length))  # what a preallocated or half-flushed file looks like
    records, log = tools.read_all(pristine, fsync="never")
    assert records == [tools.expected_record(i) for i in range(12)]
    assert log.recovery.truncated_bytes == length and log.recovery.lost_ranges == []
    assert (pristine / FIRST).stat().st_size == record_ends(tools, 12)[-1]


def test_random_garbage_tails_are_cut(tmp_path: Path, pristine: Path,
                                      tools: SimpleNamespace) -> None:
    rng = random.Random(1234)
    work = tmp_path / "work"
    size = record_ends(tools, 12)[-1]
    for trial in range(60):
        tools.copy_dir(pristine, work)
        length = rng.choice([1, 5, 26, 64, 300, 5000])
        garbage = bytearray(rng.randbytes(length))
        if trial % 3 == 0 and length >= 2:
            garbage[:2] = b"\x01\x00"  # looks like the start of a record
        with open(work / FIRST, "ab") as f:
            f.write(garbage)
        with Log.open(work, fsync="never") as log:
            assert log.next_offset == 12, trial
            assert log.recovery.truncated_bytes == length
            assert log.recovery.truncated_at == (FIRST, size)
            assert log.append(b"next", 1.0) == 12
        assert (work / FIRST).stat().st_size == size + HEADER_SIZE + 4


def test_stale_record_in_tail_is_not_resurrected(pristine: Path,
                                                 tools: SimpleNamespace) -> None:
    # A valid record with an old offset (e.g. a block of stale data) is damage, not a record.
    with open(pristine / FIRST, "ab") as f:
        f.write(b"\0" * 10 + encode_record(3, 3.0, b"stale") + encode_record(4, 4.0, b"stale"))
    records, log = tools.read_all(pristine, fsync="never")
    assert [r.offset for r in records] == list(range(12))
    assert log.recovery.truncated_bytes > 0 and log.recovery.lost_ranges == []


def test_torn_batch_from_a_crash(tmp_path: Path, pristine: Path,
                                 tools: SimpleNamespace) -> None:
    batch = b"".join(encode_record(i, tools.ts(i), tools.payload(i)) for i in range(12, 20))
    with open(pristine / FIRST, "ab") as f:
        f.write(batch[: len(batch) * 2 // 3])  # the kernel wrote two thirds of the batch
    records, log = tools.read_all(pristine, fsync="never")
    survivors = sum(1 for e in record_ends(tools, 20, 12) if e <= len(batch) * 2 // 3)
    assert [r.offset for r in records] == list(range(12 + survivors))
    assert records[-1] == tools.expected_record(11 + survivors)


def test_recovery_logs_a_warning(pristine: Path, caplog: pytest.LogCaptureFixture) -> None:
    with open(pristine / FIRST, "ab") as f:
        f.write(b"\x01\x00junk")
    with caplog.at_level(logging.WARNING, logger="meshmq.durability"):
        Log.open(pristine, fsync="never").close()
    assert any(r.levelno == logging.WARNING and "cut 6 bytes" in r.getMessage()
               for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# damage before the tail


def test_damaged_middle_record_is_reported_and_skipped(pristine: Path, tools: SimpleNamespace,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    ends = record_ends(tools, 12)
    tools.flip_bit(pristine / FIRST, (ends[4] + 30) * 8)  # inside record 5's payload
    with caplog.at_level(logging.WARNING, logger="meshmq.durability"):
        records, log = tools.read_all(pristine, fsync="never")
    assert [r.offset for r in records] == [i for i in range(12) if i != 5]
    assert records == [tools.expected_record(i) for i in range(12) if i != 5]
    assert log.recovery.lost_ranges == [(5, 5)] and log.recovery.truncated_bytes == 0
    assert log.stats()["lost_records"] == 1
    assert any("offsets 5..5 lost" in r.getMessage() for r in caplog.records)
    # The log stays appendable, and the damage is reported again on the next open.
    with Log.open(pristine, fsync="never") as log:
        assert log.append(b"x", 1.0) == 12
        assert log.recovery.lost_ranges == [(5, 5)]
        assert [r.offset for r in log.read(4, 7)] == [4, 6]
        assert log.stats()["read_damage"] == 0  # the known hole is skipped silently


def test_consecutive_damaged_records_are_one_range(pristine: Path,
                                                   tools: SimpleNamespace) -> None:
    ends = record_ends(tools, 12)
    data = bytearray((pristine / FIRST).read_bytes())
    data[ends[2] + 3: ends[6] - 3] = bytes(ends[6] - ends[2] - 6)  # zero records 3..6
    (pristine / FIRST).write_bytes(bytes(data))
    records, log = tools.read_all(pristine, fsync="never")
    assert [r.offset for r in records] == [0, 1, 2, 7, 8, 9, 10, 11]
    assert log.recovery.lost_ranges == [(3, 6)]


def test_damaged_first_record(pristine: Path, tools: SimpleNamespace) -> None:
    tools.flip_bit(pristine / FIRST, 0)
    records, log = tools.read_all(pristine, fsync="never")
    assert [r.offset for r in records] == list(range(1, 12))
    assert log.recovery.lost_ranges == [(0, 0)]


def test_every_bit_flip_of_one_record_is_caught(tmp_path: Path, pristine: Path,
                                                tools: SimpleNamespace) -> None:
    ends = record_ends(tools, 12)
    work = tmp_path / "work"
    for victim in (6, 11):  # a middle record, and the last one
        start, end = ends[victim - 1], ends[victim]
        for bit in range(start * 8, end * 8):
            tools.copy_dir(pristine, work)
            tools.flip_bit(work / FIRST, bit)
            records, log = tools.read_all(work, fsync="never")
            assert records == [tools.expected_record(i) for i in range(12) if i != victim], bit
            if victim == 11:
                assert log.recovery.truncated_at == (FIRST, start)
                assert log.recovery.lost_ranges == []
            else:
                assert log.recovery.lost_ranges == [(victim, victim)], bit


def test_random_bit_flips_anywhere_are_never_served(tmp_path: Path, pristine: Path,
                                                    tools: SimpleNamespace) -> None:
    ends = record_ends(tools, 12)
    work = tmp_path / "work"
    rng = random.Random(99)
    for _ in range(250):
        bit = rng.randrange(ends[-1] * 8)
        victim = next(i for i, e in enumerate(ends) if bit // 8 < e)
        tools.copy_dir(pristine, work)
        tools.flip_bit(work / FIRST, bit)
        with Log.open(work, fsync="never") as log:
            records = list(log.read())
            report = log.recovery
            assert records == [tools.expected_record(i) for i in range(12) if i != victim], bit
            if victim == 11:
                assert report.truncated_bytes == ends[11] - ends[10] and not report.lost_ranges
                assert log.append(b"x", 1.0) == 11
            else:
                assert report.lost_ranges == [(victim, victim)] and not report.truncated_bytes
                assert log.append(b"x", 1.0) == 12


# ---------------------------------------------------------------------------------------------
# sealed segments and their indexes


def multi_segment(directory: Path, tools: SimpleNamespace, count: int = 60) -> list[Path]:
    with Log.open(directory, fsync="never", segment_bytes=400, index_interval_bytes=100) as log:
        tools.fill(log, count, batch=2)
    return tools.segment_files(directory)


def reopen(directory: Path, **kwargs: object) -> Log:
    return Log.open(directory, fsync="never", segment_bytes=400, index_interval_bytes=100,
                    **kwargs)  # type: ignore[arg-type]


def test_clean_reopen_scans_only_the_last_segment(tmp_path: Path,
                                                  tools: SimpleNamespace) -> None:
    segments = multi_segment(tmp_path, tools)
    assert len(segments) > 4
    with reopen(tmp_path) as log:
        report = log.recovery
        assert report.segments_scanned == 1 and report.indexes_rebuilt == 0 and report.clean
        assert report.segments == len(segments) and report.seconds >= 0
    with reopen(tmp_path, full_scan=True) as log:
        assert log.recovery.segments_scanned == len(segments) and log.recovery.clean
        assert [r.offset for r in log.read()] == list(range(60))


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "bitflip", "empty",
                                    "other-segment"])
def test_bad_index_is_rebuilt(tmp_path: Path, tools: SimpleNamespace, damage: str) -> None:
    segments = multi_segment(tmp_path, tools)
    idx = segments[1].with_suffix(".idx")
    original = idx.read_bytes()
    if damage == "missing":
        idx.unlink()
    elif damage == "garbage":
        idx.write_bytes(random.Random(5).randbytes(len(original)))
    elif damage == "truncated":
        idx.write_bytes(original[:-10])
    elif damage == "bitflip":
        tools.flip_bit(idx, 8 * 70 + 3)
    elif damage == "empty":
        idx.write_bytes(b"")
    else:
        idx.write_bytes(segments[2].with_suffix(".idx").read_bytes())
    with reopen(tmp_path) as log:
        assert log.recovery.indexes_rebuilt == 1 and log.recovery.segments_scanned == 2
        assert log.recovery.clean
        assert [r.offset for r in log.read()] == list(range(60))
        assert [log.offset_for_time(tools.ts(i)) for i in range(60)] == list(range(60))
    assert idx.read_bytes() == original  # rebuilt identically


def test_index_not_matching_its_segment_is_rebuilt(tmp_path: Path,
                                                   tools: SimpleNamespace) -> None:
    segments = multi_segment(tmp_path, tools)
    base, nxt = int(segments[1].stem), int(segments[2].stem)
    ends = record_ends(tools, nxt, base)
    with open(segments[1], "r+b") as f:
        f.truncate(ends[-2])  # lose the sealed segment's last record (index says otherwise)
    with reopen(tmp_path) as log:
        assert log.recovery.indexes_rebuilt == 1
        assert log.recovery.lost_ranges == [(nxt - 1, nxt - 1)]
        assert [r.offset for r in log.read()] == [i for i in range(60) if i != nxt - 1]


def test_damaged_last_record_of_a_sealed_segment(tmp_path: Path,
                                                 tools: SimpleNamespace) -> None:
    segments = multi_segment(tmp_path, tools)
    nxt = int(segments[2].stem)
    size = segments[1].stat().st_size
    tools.flip_bit(segments[1], (size - 3) * 8)
    with reopen(tmp_path) as log:
        # The index spot-checks the last record, so the segment is rescanned and its tail cut.
        report = log.recovery
        assert report.indexes_rebuilt == 1 and report.lost_ranges == [(nxt - 1, nxt - 1)]
        assert report.truncated_at is not None and report.truncated_at[0] == segments[1].name
        assert [r.offset for r in log.read()] == [i for i in range(60) if i != nxt - 1]
    with reopen(tmp_path) as log:  # the gap is remembered by the rebuilt index
        assert log.recovery.lost_ranges == [(nxt - 1, nxt - 1)]
        assert log.recovery.segments_scanned == 1 and log.recovery.truncated_bytes == 0


def test_damage_inside_a_trusted_sealed_segment(tmp_path: Path,
                                                tools: SimpleNamespace) -> None:
    segments = multi_segment(tmp_path, tools)
    base = int(segments[1].stem)
    ends = record_ends(tools, int(segments[2].stem), base)
    tools.flip_bit(segments[1], (ends[1] + 20) * 8)  # in the segment's third record
    victim = base + 2
    with reopen(tmp_path) as log:
        # The index matches, so open does not rescan; readers still never serve the damage.
        assert log.recovery.clean
        assert [r.offset for r in log.read()] == [i for i in range(60) if i != victim]
        assert log.stats()["read_damage"] == 1 and log.stats()["lost_records"] == 1
        assert [r.offset for r in log.read(base, base + 4)] == [base, base + 1, base + 3]
        assert log.stats()["read_damage"] == 1  # found once, then a known hole
    with reopen(tmp_path, full_scan=True) as log:
        assert log.recovery.lost_ranges == [(victim, victim)]
        assert not log.recovery.truncated_bytes


def test_hole_in_a_sealed_segment_found_by_full_scan_is_remembered(
        tmp_path: Path, tools: SimpleNamespace) -> None:
    segments = multi_segment(tmp_path, tools)
    base = int(segments[2].stem)
    tools.flip_bit(segments[2], 100)  # inside the segment's first record's header
    with reopen(tmp_path, full_scan=True) as log:
        assert log.recovery.lost_ranges == [(base, base)]
    with reopen(tmp_path) as log:
        assert log.recovery.lost_ranges == [(base, base)]
        assert log.recovery.segments_scanned == 1
        assert [r.offset for r in log.read(base - 1, base + 2)] == [base - 1, base + 1]
        assert log.stats()["read_damage"] == 0


def test_missing_middle_segment_is_a_lost_range(tmp_path: Path,
                                                tools: SimpleNamespace) -> None:
    segments = multi_segment(tmp_path, tools)
    lo, hi = int(segments[2].stem), int(segments[3].stem)
    segments[2].unlink()
    with reopen(tmp_path) as log:
        assert log.recovery.lost_ranges == [(lo, hi - 1)]
        assert [r.offset for r in log.read()] == [i for i in range(60) if not lo <= i < hi]
    assert not segments[2].with_suffix(".idx").exists()  # the orphan index was removed


def test_debris_is_removed(tmp_path: Path, tools: SimpleNamespace) -> None:
    multi_segment(tmp_path, tools)
    (tmp_path / "00000000000000000000.idx.tmp").write_bytes(b"half written")
    (tmp_path / "00000000000000999999.idx").write_bytes(b"orphan")
    (tmp_path / "notes.txt").write_text("left alone")
    with reopen(tmp_path) as log:
        assert log.recovery.clean
    names = {p.name for p in tmp_path.iterdir()}
    assert "00000000000000000000.idx.tmp" not in names
    assert "00000000000000999999.idx" not in names and "notes.txt" in names


def test_shrinking_max_record_bytes_does_not_cut_old_records(tmp_path: Path) -> None:
    with Log.open(tmp_path, fsync="never") as log:
        log.append(b"x" * 100_000, 1.0)
    with Log.open(tmp_path, fsync="never", max_record_bytes=1024) as log:
        assert log.recovery.clean and log.next_offset == 1
        assert len(next(log.read()).payload) == 100_000
