"""The handler pool: bounded concurrency, every job runs, close() lets the backlog finish."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from meshmq.patterns._pool import Pool

from meshmq.testing import wait_until


def _no_loop() -> asyncio.AbstractEventLoop:
    raise AssertionError("a sync pool needs no loop")


def test_jobs_run_at_most_concurrency_at_once_and_all_finish() -> None:
    lock = threading.Lock()
    running = [0, 0]   # now, most at once
    outcomes: list[tuple[bool, Any]] = []

    def handler(i: int) -> int:
        with lock:
            running[0] += 1
            running[1] = max(running[1], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        if i == 3:
            raise ValueError("three")
        return i * 2

    pool = Pool(handler, "test", 3, _no_loop)
    try:
        for i in range(30):
            pool.submit((i,), {}, lambda ok, v: outcomes.append((ok, v)))
        wait_until(lambda: len(outcomes) == 30, 10, what="30 outcomes")
    finally:
        pool.close(5.0)
    assert running[1] == 3  # all three workers were used, never more
    assert sorted(v for ok, v in outcomes if ok) == [i * 2 for i in range(30) if i != 3]
    assert [type(v).__name__ for ok, v in outcomes if not ok] == ["ValueError"]
    assert pool.errors == 1 and pool.done == 30


def test_close_runs_the_backlog_then_stops_the_threads() -> None:
    release = threading.Event()
    done: list[int] = []

    def handler(i: int) -> None:
        release.wait(10)
        done.append(i)

    pool = Pool(handler, "test", 2, _no_loop)
    for i in range(6):   # two run, four wait in the backlog
        pool.submit((i,), {}, lambda ok, v: None)
    release.set()
    pool.close(10.0)
    assert sorted(done) == list(range(6))
    assert not any(t.is_alive() for t in pool._threads)
