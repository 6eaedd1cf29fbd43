"""Storage engine benchmark: append, replay and recovery rates beside raw-syscall baselines.

Each figure is printed beside a baseline measured in the same run on the same file system
(the machines are noisy: compare ratios, not absolute numbers across runs)::

    python benchmarks/bench_storage.py                       # ~30 s, 128 MB recovery journal
    python benchmarks/bench_storage.py --recovery-mb 1024    # the 1 GB recovery figure
    python benchmarks/bench_storage.py --dir /mnt/ssd/tmp    # measure another disk

Aims (issue 5): group commit >= 100k msgs/s of 100 B records; replay >= 200k msgs/s; recovery
of 1 GB < 5 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable

from meshmq.durability import HEADER_SIZE, Log, encode_record

RESULTS: list[tuple[str, float, str, float, str]] = []


def report(name: str, rate: float, unit: str, baseline: float, base_name: str) -> None:
    """Print one figure beside its baseline, as a ratio."""
    ratio = rate / baseline if baseline else float("nan")
    RESULTS.append((name, rate, unit, baseline, base_name))
    print(f"{name:<42} {rate:>12,.0f} {unit:<10} baseline {baseline:>12,.0f}  "
          f"({base_name}) ratio {ratio:5.2f}", flush=True)


def timed(fn: Callable[[], int]) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t0


def fresh(root: str, name: str) -> str:
    path = os.path.join(root, name)
    shutil.rmtree(path, ignore_errors=True)
    return path


# ---- baselines: raw system calls, the same record sizes ---------------------------------------

def raw_write_fsync(path: str, count: int, record: bytes) -> int:
    """os.write + os.fdatasync per record: the floor for fsync=always with one record a batch."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    try:
        for _ in range(count):
            os.write(fd, record)
            os.fdatasync(fd)
    finally:
        os.close(fd)
    return count


def raw_write_group(path: str, count: int, record: bytes, interval: float) -> int:
    """os.write per record, os.fdatasync once ``interval`` passed: the floor for group commit."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    last = time.monotonic()
    try:
        for _ in range(count):
            os.write(fd, record)
            now = time.monotonic()
            if now - last >= interval:
                os.fdatasync(fd)
                last = now
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return count


def raw_write_batched(path: str, count: int, record: bytes, batch: int,
                      sync: bool) -> int:
    """One os.write per ``batch`` records (and an fdatasync per batch if ``sync``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC, 0o644)
    chunk = record * batch
    try:
        for _ in range(count // batch):
            os.write(fd, chunk)
            if sync:
                os.fdatasync(fd)
    finally:
        os.close(fd)
    return count // batch * batch


def raw_read_walk(directory: str) -> int:
    """Read every segment in 1 MiB chunks and walk the length fields: the floor for replay."""
    unpack = struct.Struct("<I").unpack_from
    count = 0
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".log"):
            continue
        with open(os.path.join(directory, name), "rb", buffering=0) as f:
            data = f.read()
        pos = 0
        end = len(data)
        while pos + HEADER_SIZE <= end:
            pos += 10 + unpack(data, pos + 2)[0]
            count += 1
    return count


# ---- the engine ------------------------------------------------------------------------------

def log_append(directory: str, fsync: str, count: int, payload: bytes) -> int:
    """Log.append one record at a time, driving group commit as the journal does."""
    with Log.open(directory, fsync=fsync) as log:
        append, maybe_sync, clock = log.append, log.maybe_sync, time.monotonic
        for i in range(count):
            append(payload, float(i))
            maybe_sync(clock())
        log.sync() if fsync != "never" else None
    return count


def log_append_batched(directory: str, fsync: str, count: int, payload: bytes,
                       batch: int) -> int:
    """Log.append_many of ``batch`` records: what the journal does with messages that queue up."""
    items = [(payload, 1.0)] * batch
    with Log.open(directory, fsync=fsync) as log:
        for _ in range(count // batch):
            log.append_many(items)
            log.maybe_sync(time.monotonic())
    return count // batch * batch


def log_replay(directory: str) -> tuple[int, float, float]:
    """Read every record back: (count, seconds to open the log, seconds to read it)."""
    t0 = time.perf_counter()
    with Log.open(directory, fsync="never") as log:
        t1 = time.perf_counter()
        n = 0
        for _ in log.read():
            n += 1
        t2 = time.perf_counter()
    return n, t1 - t0, t2 - t1


def build_journal(directory: str, megabytes: int, payload: bytes) -> int:
    """Write about ``megabytes`` MiB of records quickly (fsync=never, big batches)."""
    per = HEADER_SIZE + len(payload)
    total = megabytes * (1 << 20) // per
    batch = 20_000
    items = [(payload, 1.0)] * batch
    with Log.open(directory, fsync="never") as log:
        done = 0
        while done < total:
            n = min(batch, total - done)
            log.append_many(items[:n])
            done += n
        log.sync()
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--always-count", type=int, default=2_000,
                        help="records for the fsync-per-record figures")
    parser.add_argument("--count", type=int, default=300_000,
                        help="records for the group-commit, never and replay figures")
    parser.add_argument("--recovery-mb", type=int, default=128,
                        help="size of the journal whose recovery is timed (default 128)")
    args = parser.parse_args(argv)

    root = tempfile.mkdtemp(prefix="meshmq-bench-", dir=args.dir)
    payload = os.urandom(args.size)
    record = encode_record(0, 0.0, payload)
    raw = os.path.join(root, "raw.bin")
    print(f"storage benchmark in {root}: {args.size} B payloads ({len(record)} B records)")
    try:
        # fsync=always, one record per append (one fsync each)
        n, t = timed(lambda: raw_write_fsync(raw, args.always_count, record))
        base = n / t
        n, t = timed(lambda: log_append(fresh(root, "always"), "always", args.always_count,
                                        payload))
        report("append fsync=always, 1 record/batch", n / t, "msgs/s", base,
               "os.write+fdatasync each")
        # fsync=always, batches of 100 (the journal batches what queued while it synced)
        n, t = timed(lambda: raw_write_batched(raw, args.always_count * 50, record, 100, True))
        base = n / t
        n, t = timed(lambda: log_append_batched(fresh(root, "always100"), "always",
                                                args.always_count * 50, payload, 100))
        report("append fsync=always, 100 records/batch", n / t, "msgs/s", base,
               "os.write 100 + fdatasync")
        # group commit
        n, t = timed(lambda: raw_write_group(raw, args.count, record, 0.005))
        base = n / t
        n, t = timed(lambda: log_append(fresh(root, "interval"), "interval=5", args.count,
                                        payload))
        report("append fsync=interval=5, 1 record/append", n / t, "msgs/s", base,
               "os.write each, fdatasync/5ms")
        n, t = timed(lambda: log_append_batched(fresh(root, "interval100"), "interval=5",
                                                args.count, payload, 100))
        report("append fsync=interval=5, 100 records/append", n / t, "msgs/s", base,
               "os.write each, fdatasync/5ms")
        # never
        n, t = timed(lambda: raw_write_batched(raw, args.count, record, 1, False))
        base = n / t
        n, t = timed(lambda: log_append(fresh(root, "never"), "never", args.count, payload))
        report("append fsync=never, 1 record/append", n / t, "msgs/s", base, "os.write each")
        # replay of what "never" wrote
        directory = os.path.join(root, "never")
        n, t = timed(lambda: raw_read_walk(directory))
        base = n / t
        n, opening, t = log_replay(directory)
        report("replay (Log.read, verified)", n / t, "msgs/s", base, "read + length walk")
        print(f"  (opening that log first took {opening:.3f} s: recovery scans the active "
              f"segment; see the recovery figures)", flush=True)
        # recovery
        big = fresh(root, "big")
        total, t = timed(lambda: build_journal(big, args.recovery_mb, payload))
        print(f"built a {args.recovery_mb} MiB journal of {total:,} records in {t:.1f} s")
        n, t = timed(lambda: raw_read_walk(big))
        base_s = t
        _, t_open = timed(lambda: Log.open(big, fsync="never").close() or 0)
        _, t_full = timed(lambda: Log.open(big, fsync="never", full_scan=True).close() or 0)
        for idx in (f for f in os.listdir(big) if f.endswith(".idx")):
            os.unlink(os.path.join(big, idx))
        _, t_rebuild = timed(lambda: Log.open(big, fsync="never").close() or 0)
        mb = args.recovery_mb
        for label, secs in (("recovery, indexes trusted", t_open),
                            ("recovery, full scan", t_full),
                            ("recovery, indexes missing (rebuild)", t_rebuild)):
            print(f"{label:<42} {secs:>10.3f} s for {mb} MiB"
                  f"  baseline {base_s:.3f} s (read + length walk of it all) ratio "
                  f"{base_s / secs if secs else float('nan'):5.2f}", flush=True)
        print("(page cache warm: the journal was just written; a cold read adds disk time."
              " Trusted indexes scan only the last segment, so that figure barely grows with"
              " size; full scan and rebuild grow linearly)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
