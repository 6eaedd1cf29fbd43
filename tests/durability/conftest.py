"""Shared helpers for the storage engine tests: payloads, log builders, fault injection."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import meshmq.durability._fileio as fileio
import pytest
from meshmq.durability import Log, Record


def payload(i: int) -> bytes:
    """A recognisable payload of varying length (0..40 extra bytes) for offset ``i``."""
    return b"rec-%06d|" % i + bytes([i % 251]) * (i % 41)


def ts(i: int) -> float:
    """The timestamp the helpers give the record at offset ``i``."""
    return 1_000.0 + i


def fill(log: Log, count: int, first: int | None = None, batch: int = 1) -> list[int]:
    """Append ``count`` records numbered from ``first`` (default: the log's next offset)."""
    start = log.next_offset if first is None else first
    offsets: list[int] = []
    for lo in range(start, start + count, batch):
        hi = min(lo + batch, start + count)
        offsets += log.append_many([(payload(i), ts(i)) for i in range(lo, hi)])
    return offsets


def expected_record(i: int) -> Record:
    """The record ``fill`` writes at offset ``i``."""
    return Record(i, ts(i), payload(i))


def read_all(directory: Path, **kwargs: Any) -> tuple[list[Record], Log]:
    """Open ``directory``, read every record, close; return the records and the closed log."""
    with Log.open(directory, **kwargs) as log:
        return list(log.read()), log


def segment_files(directory: Path) -> list[Path]:
    """The segment files of a log directory, oldest first."""
    return sorted(directory.glob("*.log"))


def copy_dir(src: Path, dst: Path) -> Path:
    """Replace ``dst`` with a copy of the log directory ``src`` (without its lock file)."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def flip_bit(path: Path, bit: int) -> None:
    """Invert one bit of a file in place."""
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


class FaultyOS:
    """Stands in for the ``os`` module inside ``meshmq.durability._fileio``.

    Everything is the real ``os`` except what a test arms: a plan of outcomes for the next
    writes, failing fsyncs or ftruncates. It also counts writes and fsyncs.
    """

    def __init__(self) -> None:
        self.write_plan: list[int | OSError] = []
        self.fail_fsync: OSError | None = None
        self.fail_ftruncate: OSError | None = None
        self.writes = 0
        self.fsyncs = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        """Real write unless planned: an int writes only that many bytes, an error raises."""
        self.writes += 1
        if self.write_plan:
            step = self.write_plan.pop(0)
            if isinstance(step, OSError):
                raise step
            return os.write(fd, bytes(data)[:step])
        return os.write(fd, data)

    def _sync(self, real: Callable[[int], None], fd: int) -> None:
        self.fsyncs += 1
        if self.fail_fsync is not None:
            raise self.fail_fsync
        real(fd)

    def fsync(self, fd: int) -> None:
        self._sync(os.fsync, fd)

    def fdatasync(self, fd: int) -> None:
        self._sync(getattr(os, "fdatasync", os.fsync), fd)

    def ftruncate(self, fd: int, length: int) -> None:
        if self.fail_ftruncate is not None:
            raise self.fail_ftruncate
        os.ftruncate(fd, length)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


@pytest.fixture
def faulty_os(monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyOS]:
    """Route the storage engine's system calls through a FaultyOS for this test."""
    fake = FaultyOS()
    monkeypatch.setattr(fileio, "os", fake)
    yield fake


@pytest.fixture
def tools() -> SimpleNamespace:
    """The helpers above, for test modules (importlib mode cannot import conftest)."""
    return SimpleNamespace(
        payload=payload,
        ts=ts,
        fill=fill,
        expected_record=expected_record,
        read_all=read_all,
        segment_files=segment_files,
        copy_dir=copy_dir,
        flip_bit=flip_bit,
        enospc=enospc,
        eio=eio,
    )
