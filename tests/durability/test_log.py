"""The Log API: appends, reads, segments, time lookup, retention, fsync policies, faults."""

from __future__ import annotations

import errno
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from meshmq.durability import DEFAULT_SEGMENT_BYTES, HEADER_SIZE, Log, Record

from meshmq._errors import ConfigError, NodeClosed, StorageError

# ---------------------------------------------------------------------------------------------
# appends and reads


def test_append_and_read_back(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path / "log") as log:
        assert (log.first_offset, log.next_offset, log.durable_offset) == (0, 0, 0)
        assert log.append(b"hello", 10.0) == 0
        assert log.append_many([(b"a", 11.0), (b"", 12.0), (b"c" * 1000, 13.0)]) == [1, 2, 3]
        assert (log.first_offset, log.next_offset, log.durable_offset) == (0, 4, 4)
        assert list(log.read()) == [
            Record(0, 10.0, b"hello"), Record(1, 11.0, b"a"), Record(2, 12.0, b""),
            Record(3, 13.0, b"c" * 1000),
        ]
        assert log.recovery.clean and log.recovery.segments == 1


def test_append_many_empty_and_iterables(tmp_path: Path) -> None:
    with Log.open(tmp_path, fsync="never") as log:
        assert log.append_many([]) == []
        assert log.append_many((b"%d" % i, float(i)) for i in range(3)) == [0, 1, 2]
        assert log.append(bytearray(b"ba"), 5) == 3
        assert log.append(memoryview(b"mv"), 6.0) == 4
        payloads = [r.payload for r in log.read()]
        assert payloads == [b"0", b"1", b"2", b"ba", b"mv"]
        assert all(type(p) is bytes for p in payloads)


def test_append_many_is_one_write_and_one_fsync(tmp_path: Path, faulty_os: Any) -> None:
    with Log.open(tmp_path) as log:
        writes, fsyncs = faulty_os.writes, faulty_os.fsyncs
        log.append_many([(b"x" * 100, 1.0)] * 500)
        assert faulty_os.writes - writes == 1
        assert faulty_os.fsyncs - fsyncs == 1
        assert log.stats()["fsyncs"] == 1 and log.stats()["append_batches"] == 1


def test_reopen_continues_offsets(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never") as log:
        tools.fill(log, 10)
    with Log.open(tmp_path, fsync="never") as log:
        assert log.next_offset == 10 and log.recovery.clean
        assert log.append(tools.payload(10), tools.ts(10)) == 10
    records, _ = tools.read_all(tmp_path)
    assert records == [tools.expected_record(i) for i in range(11)]


def test_read_ranges(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=1000, index_interval_bytes=100) as log:
        tools.fill(log, 200, batch=7)
        assert log.stats()["segments"] > 5

        def offsets(*args: Any) -> list[int]:
            return [r.offset for r in log.read(*args)]

        assert offsets() == list(range(200))
        for start in (0, 1, 17, 63, 64, 150, 199):
            for end in (start, start + 1, start + 40, 200, 10_000, None):
                want = list(range(start, min(200, 200 if end is None else end)))
                assert offsets(start, end) == want, (start, end)
        assert offsets(-5, 3) == [0, 1, 2]
        assert offsets(200) == [] and offsets(500, 600) == [] and offsets(10, 5) == []
        assert list(log.read(120, 125)) == [tools.expected_record(i) for i in range(120, 125)]


def test_read_is_lazy_and_sees_the_log_as_of_the_call(tmp_path: Path,
                                                      tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=500) as log:
        tools.fill(log, 20)
        reader = log.read()
        first = next(reader)
        tools.fill(log, 20)  # appends while a reader is suspended, rolling segments
        rest = [r.offset for r in reader]
        assert first.offset == 0 and rest == list(range(1, 20))
        assert [r.offset for r in log.read(15)] == list(range(15, 40))


def test_segment_roll_and_naming(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=300) as log:
        tools.fill(log, 40)
        bases = [int(p.stem) for p in tools.segment_files(tmp_path)]
        assert bases[0] == 0 and len(bases) == log.stats()["segments"] > 3
        assert all(len(p.name) == len("00000000000000000000.log")
                   for p in tools.segment_files(tmp_path))
        # Each segment holds consecutive records from its base; sealed ones have an index.
        for base, nxt in zip(bases, bases[1:] + [40], strict=True):
            segment = [r.offset for r in log.read(base, nxt)]
            assert segment == list(range(base, nxt))
        indexes = sorted(int(p.stem) for p in tmp_path.glob("*.idx"))
        assert indexes == bases[:-1]
        # A segment rolls once it reaches the limit, so none exceeds it by more than a batch.
        sizes = [p.stat().st_size for p in tools.segment_files(tmp_path)]
        assert all(s < 300 + HEADER_SIZE + 60 for s in sizes)


def test_big_batch_goes_to_one_segment(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=1000) as log:
        tools.fill(log, 100, batch=100)
        assert log.stats()["segments"] == 1
        log.append(b"next", 1.0)
        assert log.stats()["segments"] == 2
        assert [int(p.stem) for p in tools.segment_files(tmp_path)] == [0, 100]


def test_read_across_segments_after_reopen(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=400) as log:
        tools.fill(log, 60, batch=3)
    records, log = tools.read_all(tmp_path, fsync="never", segment_bytes=400)
    assert records == [tools.expected_record(i) for i in range(60)]
    assert log.recovery.segments_scanned == 1 and log.recovery.segments > 5


def test_large_records_span_read_chunks(tmp_path: Path) -> None:
    # Records bigger than the 1 MiB read chunk, and chunk boundaries falling mid-record.
    sizes = [3000] * 700 + [2_500_000, 5, 1_200_000]
    with Log.open(tmp_path, fsync="never") as log:
        log.append_many([(bytes([i % 256]) * n, float(i)) for i, n in enumerate(sizes)])
        got = [(r.offset, len(r.payload), r.payload[:1]) for r in log.read()]
        assert got == [(i, n, bytes([i % 256])) for i, n in enumerate(sizes)]
    with Log.open(tmp_path, fsync="never") as log:
        assert log.recovery.clean and log.next_offset == len(sizes)
        assert [len(r.payload) for r in log.read(699)] == sizes[699:]


# ---------------------------------------------------------------------------------------------
# time lookup


def test_offset_for_time(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=600, index_interval_bytes=64) as log:
        tools.fill(log, 100, batch=4)  # record i has timestamp 1000 + i
        assert log.stats()["segments"] > 3
        assert log.offset_for_time(0.0) == 0
        assert log.offset_for_time(-math.inf) == 0
        for i in (0, 1, 31, 32, 50, 99):
            assert log.offset_for_time(tools.ts(i)) == i
            assert log.offset_for_time(tools.ts(i) - 0.5) == i
        assert log.offset_for_time(tools.ts(99) + 0.5) == 100 == log.next_offset
    with Log.open(tmp_path, fsync="never", segment_bytes=600) as log:  # from the .idx files
        assert [log.offset_for_time(tools.ts(i)) for i in range(100)] == list(range(100))


def test_offset_for_time_with_out_of_order_timestamps(tmp_path: Path) -> None:
    stamps = [5.0, 3.0, 9.0, 1.0, 9.0, 12.0, 2.0, 15.0] * 10
    with Log.open(tmp_path, fsync="never", segment_bytes=200, index_interval_bytes=30) as log:
        for t in stamps:
            log.append(b"x", t)
        for probe in (0.0, 3.0, 5.0, 6.0, 9.0, 10.0, 12.0, 13.0, 15.0, 16.0):
            want = next((i for i, t in enumerate(stamps) if t >= probe), len(stamps))
            assert log.offset_for_time(probe) == want, probe


# ---------------------------------------------------------------------------------------------
# retention


def _segments_with_times(tmp_path: Path, **kwargs: Any) -> Log:
    """A log of 5 segments of 10 records; segment k has timestamps 100k .. 100k + 9."""
    log = Log.open(tmp_path, fsync="never", segment_bytes=10 * (HEADER_SIZE + 10), **kwargs)
    for k in range(5):
        log.append_many([(b"%010d" % (10 * k + j), 100.0 * k + j) for j in range(10)])
    assert log.stats()["segments"] == 5
    return log


def test_retention_by_age(tmp_path: Path) -> None:
    with _segments_with_times(tmp_path, retention_seconds=50) as log:
        assert log.apply_retention(now=59.0) == 0  # segment 0's newest record (9) is 50 s old
        assert log.apply_retention(now=59.5) == 10
        assert log.first_offset == 10 and log.stats()["segments"] == 4
        assert log.apply_retention(now=10_000.0) == 30  # never the active segment
        assert log.first_offset == 40 and log.stats()["retention_dropped"] == 40
        assert [r.offset for r in log.read()] == list(range(40, 50))
        assert log.offset_for_time(0) == 40
        assert log.append(b"x", 1.0) == 50
    with Log.open(tmp_path, fsync="never") as log:
        assert (log.first_offset, log.next_offset) == (40, 51) and log.recovery.clean
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".log", ".idx")) == [
        "00000000000000000040.idx", "00000000000000000040.log", "00000000000000000050.log"]


def test_retention_by_size(tmp_path: Path) -> None:
    seg = 10 * (HEADER_SIZE + 10)
    with _segments_with_times(tmp_path, retention_bytes=3 * seg) as log:
        assert log.apply_retention(now=0.0) == 20
        assert log.stats()["bytes"] == 3 * seg and log.first_offset == 20
        assert log.apply_retention(now=0.0) == 0
        assert list(log.read())[0].offset == 20


def test_retention_without_limits_and_with_one_segment(tmp_path: Path) -> None:
    with _segments_with_times(tmp_path / "a") as log:
        assert log.apply_retention(now=1e12) == 0
    with Log.open(tmp_path / "b", fsync="never", retention_seconds=1, retention_bytes=1) as log:
        log.append(b"old", 0.0)
        assert log.apply_retention(now=1e12) == 0 and log.next_offset == 1


def test_reader_survives_retention(tmp_path: Path) -> None:
    with _segments_with_times(tmp_path, retention_bytes=1) as log:
        reader = log.read()
        assert next(reader).offset == 0
        log.apply_retention(now=0.0)  # deletes the segment being read and those after it
        assert [r.offset for r in reader] == list(range(1, 10)) + list(range(40, 50))


# ---------------------------------------------------------------------------------------------
# fsync policies


def test_fsync_always(tmp_path: Path, faulty_os: Any, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="always") as log:
        before = faulty_os.fsyncs
        for i in range(5):
            log.append(tools.payload(i), tools.ts(i))
            assert log.durable_offset == i + 1
        assert faulty_os.fsyncs - before == 5
        assert log.maybe_sync(1e9) == 5 and faulty_os.fsyncs - before == 5


def test_fsync_interval_group_commit(tmp_path: Path, faulty_os: Any,
                                     tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="interval=500") as log:
        before = faulty_os.fsyncs
        tools.fill(log, 10, batch=5)
        assert faulty_os.fsyncs == before and log.durable_offset == 0
        assert log.maybe_sync(100.000) == 10  # first call: nothing synced yet, so sync now
        assert faulty_os.fsyncs == before + 1
        tools.fill(log, 3)
        assert log.maybe_sync(100.25) == 10  # 250 ms later: not yet
        assert log.maybe_sync(100.5) == 13  # 500 ms: group commit
        assert faulty_os.fsyncs == before + 2
        assert log.maybe_sync(200.0) == 13 and faulty_os.fsyncs == before + 2  # nothing waits
        tools.fill(log, 1)
        assert log.sync() == 14 and faulty_os.fsyncs == before + 3
        tools.fill(log, 1)
    # close() syncs what is pending under "interval".
    assert faulty_os.fsyncs == before + 4


def test_fsync_never(tmp_path: Path, faulty_os: Any, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=200) as log:
        before = faulty_os.fsyncs
        tools.fill(log, 20)
        assert log.durable_offset == log.next_offset == 20
        assert log.maybe_sync(1e9) == 20
        assert faulty_os.fsyncs == before  # rolls do not fsync either
        assert log.sync() == 20 and faulty_os.fsyncs == before + 1
    assert faulty_os.fsyncs == before + 1


def test_interval_roll_syncs_the_sealed_segment(tmp_path: Path, faulty_os: Any,
                                                tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="interval=1000", segment_bytes=100) as log:
        tools.fill(log, 3)
        assert log.durable_offset == 0
        before = faulty_os.fsyncs
        tools.fill(log, 1)  # rolls: the full segment is synced before it is sealed
        assert log.durable_offset == 3 and faulty_os.fsyncs > before


# ---------------------------------------------------------------------------------------------
# lifecycle, configuration, stats


def test_close_is_idempotent_and_closed_log_refuses(tmp_path: Path) -> None:
    log = Log.open(tmp_path)
    log.append(b"x", 1.0)
    log.close()
    log.close()
    assert log.closed and log.next_offset == 1 and "closed" in repr(log)
    for call in (lambda: log.append(b"y", 2.0), lambda: log.read(), log.sync,
                 lambda: log.maybe_sync(0.0), lambda: log.offset_for_time(0.0),
                 lambda: log.apply_retention(0.0)):
        with pytest.raises(NodeClosed):
            call()


def test_one_process_per_directory(tmp_path: Path) -> None:
    with Log.open(tmp_path):
        with pytest.raises(StorageError) as info:
            Log.open(tmp_path)
        assert info.value.errno == errno.EBUSY
    with Log.open(tmp_path) as again:
        assert again.next_offset == 0


@pytest.mark.parametrize("fsync", ["sometimes", "interval", "interval=", "interval=0",
                                   "interval=-5", "interval=abc", "interval=inf", "ALWAYS", ""])
def test_bad_fsync_policy(tmp_path: Path, fsync: str) -> None:
    with pytest.raises(ConfigError):
        Log.open(tmp_path, fsync=fsync)


@pytest.mark.parametrize("kwargs", [
    {"segment_bytes": 0}, {"segment_bytes": 1.5}, {"retention_seconds": 0},
    {"retention_bytes": -1}, {"max_record_bytes": 10}, {"index_interval_bytes": 0},
    {"retention_seconds": True},
])
def test_bad_settings(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Log.open(tmp_path, **kwargs)
    assert not tmp_path.joinpath("00000000000000000000.log").exists()


def test_interval_policy_parses_fractions(tmp_path: Path) -> None:
    with Log.open(tmp_path, fsync="interval=0.5") as log:
        assert log.config.mode == "interval" and log.config.interval == 0.0005
    assert DEFAULT_SEGMENT_BYTES == 64 << 20


def test_bad_records_append_nothing(tmp_path: Path) -> None:
    with Log.open(tmp_path, max_record_bytes=HEADER_SIZE + 100) as log:
        log.append(b"ok", 1.0)
        size = log.stats()["bytes"]
        with pytest.raises(ConfigError):
            log.append_many([(b"fine", 2.0), (b"x" * 101, 3.0)])
        with pytest.raises(ConfigError):
            log.append(b"x", math.nan)
        with pytest.raises(ConfigError):
            log.append("text", 1.0)  # type: ignore[arg-type]
        with pytest.raises(ConfigError):
            log.append(b"x", "soon")  # type: ignore[arg-type]
        assert log.append(b"x" * 100, 4.0) == 1
        assert log.stats()["bytes"] == size + HEADER_SIZE + 100
        assert [r.payload for r in log.read()] == [b"ok", b"x" * 100]


def test_stats(tmp_path: Path, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=200) as log:
        tools.fill(log, 12, batch=4)
        stats = log.stats()
    assert stats["records"] == stats["appends"] == 12 and stats["append_batches"] == 3
    assert stats["next_offset"] == 12 and stats["first_offset"] == 0
    assert stats["bytes"] == sum(p.stat().st_size for p in tools.segment_files(tmp_path))
    assert stats["segments"] == len(tools.segment_files(tmp_path))
    for key in ("fsyncs", "write_errors", "truncated_bytes", "lost_records", "read_damage",
                "retention_dropped", "failed", "durable_offset", "recovery_seconds"):
        assert key in stats
    assert all(isinstance(v, int | float) for v in stats.values())


# ---------------------------------------------------------------------------------------------
# injected faults


def test_disk_full_mid_write_rolls_back(tmp_path: Path, faulty_os: Any,
                                        tools: SimpleNamespace) -> None:
    with Log.open(tmp_path) as log:
        tools.fill(log, 5)
        size = tools.segment_files(tmp_path)[0].stat().st_size
        faulty_os.write_plan = [30, tools.enospc()]  # a short write, then the disk is full
        with pytest.raises(StorageError) as info:
            tools.fill(log, 3, batch=3)
        assert info.value.errno == errno.ENOSPC
        assert tools.segment_files(tmp_path)[0].stat().st_size == size  # cut back
        assert log.next_offset == 5 and log.durable_offset == 5 and not log.failed
        stats = log.stats()
        assert stats["appends"] == 5 and stats["write_errors"] == 1
        assert list(log.read()) == [tools.expected_record(i) for i in range(5)]
        # Space frees up: appends resume with the next offset.
        assert tools.fill(log, 3, batch=3) == [5, 6, 7]
    records, log = tools.read_all(tmp_path)
    assert records == [tools.expected_record(i) for i in range(8)] and log.recovery.clean


def test_io_error_on_first_write(tmp_path: Path, faulty_os: Any,
                                 tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never") as log:
        faulty_os.write_plan = [tools.eio()]
        with pytest.raises(StorageError):
            log.append(b"x", 1.0)
        assert log.next_offset == 0 and log.append(b"y", 2.0) == 0
        assert [r.payload for r in log.read()] == [b"y"]


def test_fsync_failure_is_fatal(tmp_path: Path, faulty_os: Any, tools: SimpleNamespace,
                                caplog: pytest.LogCaptureFixture) -> None:
    with Log.open(tmp_path, fsync="always") as log:
        tools.fill(log, 3)
        faulty_os.fail_fsync = tools.eio()
        with caplog.at_level(logging.ERROR, logger="meshmq.durability"):
            with pytest.raises(StorageError):
                log.append(b"lost?", 9.0)
        assert log.failed and log.stats()["failed"] == 1
        assert log.durable_offset == 3 and log.next_offset == 3
        assert any("failed" in r.getMessage() for r in caplog.records)
        # No retry, even once the fault is gone: the page cache may have dropped the data.
        faulty_os.fail_fsync = None
        fsyncs = faulty_os.fsyncs
        for call in (lambda: log.append(b"x", 1.0), log.sync, lambda: log.maybe_sync(1e9),
                     lambda: log.append_many([])):
            with pytest.raises(StorageError):
                call()
        assert faulty_os.fsyncs == fsyncs
        # Reading what was durable still works.
        assert list(log.read()) == [tools.expected_record(i) for i in range(3)]
    with Log.open(tmp_path) as log:  # a restart is the way out
        assert log.next_offset in (3, 4) and not log.failed


def test_group_commit_fsync_failure_is_fatal(tmp_path: Path, faulty_os: Any,
                                             tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="interval=5") as log:
        tools.fill(log, 4)
        faulty_os.fail_fsync = tools.eio()
        with pytest.raises(StorageError):
            log.maybe_sync(1.0)
        assert log.failed and log.durable_offset == 0
        faulty_os.fail_fsync = None
        with pytest.raises(StorageError):
            log.maybe_sync(2.0)
        with pytest.raises(StorageError):
            log.append(b"x", 1.0)
    # close() did not try to sync a failed log


def test_failed_cut_back_is_fatal(tmp_path: Path, faulty_os: Any,
                                  tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never") as log:
        tools.fill(log, 2)
        faulty_os.write_plan = [10, tools.eio()]
        faulty_os.fail_ftruncate = tools.eio()
        with pytest.raises(StorageError):
            log.append(b"x" * 50, 1.0)
        assert log.failed
        faulty_os.fail_ftruncate = None
        with pytest.raises(StorageError):
            log.append(b"x", 1.0)
    # The torn bytes left behind are cut at the next open.
    records, log = tools.read_all(tmp_path)
    assert records == [tools.expected_record(i) for i in range(2)]
    assert log.recovery.truncated_bytes == 10


def test_roll_failure_leaves_log_usable(tmp_path: Path, faulty_os: Any,
                                        tools: SimpleNamespace,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=100) as log:
        tools.fill(log, 3)
        real_open = os.open

        def no_new_files(path: str, flags: int, mode: int = 0o777) -> int:
            if flags & os.O_EXCL:
                raise tools.enospc()
            return real_open(path, flags, mode)

        monkeypatch.setattr(faulty_os, "open", no_new_files, raising=False)
        with pytest.raises(StorageError):
            log.append(b"x", 1.0)
        assert not log.failed and log.next_offset == 3
        monkeypatch.undo()
        assert log.append(b"y", 1.0) == 3
        assert [int(p.stem) for p in tools.segment_files(tmp_path)] == [0, 3]


def test_index_write_failure_is_not_fatal(tmp_path: Path, faulty_os: Any,
                                          tools: SimpleNamespace,
                                          caplog: pytest.LogCaptureFixture) -> None:
    with Log.open(tmp_path, fsync="never", segment_bytes=100) as log:
        tools.fill(log, 3)
        faulty_os.write_plan = [tools.enospc()]  # the roll's first write is the index
        with caplog.at_level(logging.WARNING, logger="meshmq.durability"):
            assert log.append(b"x", 1.0) == 3
        assert any("index" in r.getMessage() for r in caplog.records)
        assert not list(tmp_path.glob("*.idx*"))
    with Log.open(tmp_path, fsync="never") as log:
        assert log.recovery.indexes_rebuilt == 1 and log.recovery.clean
        assert log.next_offset == 4 and list(tmp_path.glob("*.idx"))


def test_fsync_failure_during_roll_is_fatal(tmp_path: Path, faulty_os: Any,
                                            tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="interval=1000", segment_bytes=100) as log:
        tools.fill(log, 3)
        faulty_os.fail_fsync = tools.eio()
        with pytest.raises(StorageError):
            log.append(b"x", 1.0)
        assert log.failed and log.next_offset == 3


def test_fsync_failure_at_open(tmp_path: Path, faulty_os: Any, tools: SimpleNamespace) -> None:
    with Log.open(tmp_path, fsync="never") as log:
        tools.fill(log, 3)
    faulty_os.fail_fsync = tools.eio()
    with pytest.raises(StorageError):
        Log.open(tmp_path, fsync="always")
    faulty_os.fail_fsync = None
    with Log.open(tmp_path) as log:  # the failed open released the directory lock
        assert log.next_offset == 3
