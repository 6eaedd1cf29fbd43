"""Journal node benchmark: replay through a journal node beside reading its log directly.

A journal (``meshmq journal``, its own process, fsync=never) stores ``--count`` 100 B messages
published by this process; then, in the same run::

    node.replay(pattern)      # batches pulled over RPC from the journal process, decoded
    Log.read()                # the same records read from the same files in this process
                              # (after the journal stopped): the storage engine's floor

and the ratio says what the network, the RPC and decoding entries into Messages cost::

    python benchmarks/bench_journal.py --count 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

from meshmq.durability import Log
from meshmq.durability._entry import decode_entry

from meshmq import Node
from meshmq.testing import Script, wait_until

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BENCH_ENV, Result, add_common_args, emit, resolve  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--count", type=int, default=100_000, help="messages stored and replayed")
    args = ap.parse_args(argv)
    repeats, _ = resolve(args)
    count = 10_000 if args.quick or os.environ.get("MESHMQ_BENCH_QUICK") else \
        max(1_000, min(args.count, 1_000_000))
    os.environ.update(BENCH_ENV)
    root = tempfile.mkdtemp(prefix="meshmq-bench-journal-")
    directory = os.path.join(root, "journal")
    journal = Script([sys.executable, "-m", "meshmq.cli", "journal", "--dir", directory,
                      "--topics", "bench.>", "--fsync", "never", "--quiet",
                      "--discovery", "static"])
    replayed: list[float] = []
    try:
        address = journal.expect("listening on", 20).rsplit(" ", 1)[1]
        with Node("bench-replay", peers=[address]) as node:
            node.wait_for_subscribers("bench.a", timeout=10)
            body = b"x" * 100
            client = node._journal_client()
            wait_until(lambda: client.journals("bench.>"), timeout=10)
            for i in range(count):          # bounded: count messages, paced by the journal
                node.publish("bench.a", body)
                if i % 10_000 == 9_999:     # far below the high-water mark: nothing dropped
                    wait_until(lambda i=i: _end(node, client) >= i - 20_000, timeout=60)
            wait_until(lambda: _end(node, client) >= count, timeout=60)
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = sum(1 for _ in node.replay("bench.>", batch=5000))
                replayed.append(n / (time.perf_counter() - t0))
        journal.stop(signal.SIGINT)
        direct: list[float] = []
        with Log.open(directory, fsync="never") as log:
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = sum(1 for r in log.read() if decode_entry(r.payload))
                direct.append(n / (time.perf_counter() - t0))
    finally:
        journal.stop()
        shutil.rmtree(root, ignore_errors=True)
    meshmq_rate, raw_rate = statistics.median(replayed), statistics.median(direct)
    print(f"replay of {count:,} 100 B messages, medians of {repeats}:")
    print(f"  node.replay (journal process, RPC batches of 5000) {meshmq_rate:>12,.0f} msgs/s")
    print(f"  Log.read + decode_entry (same files, in process)  {raw_rate:>12,.0f} msgs/s")
    print(f"  ratio {meshmq_rate / raw_rate:.2f}")
    emit([Result("journal", "replay 100 B via node.replay", "msg/s", True, replayed, direct,
                 baseline="Log.read + decode, same files")])
    return 0


def _end(node: Node, client: object) -> int:
    from meshmq.durability._journal import service_name
    journal = client.journals("bench.>")[0]  # type: ignore[attr-defined]
    res = node.call(service_name(journal.id, "read"), 0, None, 0, 1, 1, since="latest")
    return int(res["next"])


if __name__ == "__main__":
    raise SystemExit(main())
