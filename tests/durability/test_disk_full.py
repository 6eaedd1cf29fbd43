"""A real file system running out of room: the failed append is refused, the log stays readable.

The limit is a file-size rlimit (RLIMIT_FSIZE) set in a child process, so the kernel itself
refuses the write (EFBIG, with SIGXFSZ ignored) exactly as a full disk refuses it with ENOSPC:
no mount, no privileges, nothing to clean up but a temporary directory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

resource = pytest.importorskip("resource")

CHILD = r"""
import errno, json, resource, signal, sys
from meshmq import StorageError
from meshmq.durability import Log

directory, limit = sys.argv[1], int(sys.argv[2])
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of dying
log = Log.open(directory, fsync="always", segment_bytes=1 << 20)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
acked = []
error = None
for i in range(10_000):
    try:
        acked.append(log.append(b"%05d" % i + b"x" * 95, float(i)))
    except StorageError as exc:
        error = exc
        break
after = [r.payload[:5].decode() for r in log.read()]
second = None
try:
    log.append(b"again" + b"x" * 95, 0.0)
except StorageError as exc:
    second = exc.errno
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space frees up
resumed = log.append(b"resumed", 0.0)
log.close()
print(json.dumps({"acked": acked, "errno": error and error.errno, "failed": log.failed,
                  "after": after, "second": second, "resumed": resumed}))
"""


@pytest.mark.timeout(30)
def test_file_size_limit_refuses_the_append_and_keeps_the_log(tmp_path: Path) -> None:
    limit = 5_000  # room for 39 whole 126-byte records, then a torn one
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path), str(limit)],
                         capture_output=True, text=True, timeout=25)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    whole = limit // 126
    assert result["acked"] == list(range(whole))
    assert result["errno"] is not None and result["errno"] in (27, 28)  # EFBIG / ENOSPC
    assert result["failed"] is False  # a refused write is not fatal; only fsync failures are
    assert result["after"] == [f"{i:05d}" for i in range(whole)]
    assert result["second"] == result["errno"]  # still refused while the disk is full
    assert result["resumed"] == whole  # the next offset, nothing skipped
    from meshmq.durability import Log

    with Log.open(tmp_path, fsync="never") as log:
        records = list(log.read())
        assert log.recovery.clean
    assert [r.offset for r in records] == list(range(whole + 1))
    assert records[-1].payload == b"resumed"
