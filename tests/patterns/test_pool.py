"""The handler pool: bounded concurrency, every job runs, close() lets the backlog finish."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from meshmq.patterns._pool import Pool

from meshmq.testing import Overlap, wait_until


def _no_loop() -> asyncio.AbstractEventLoop:
    raise AssertionError("a sync pool needs no loop")


def test_jobs_run_at_most_concurrency_at_once_and_all_finish() -> None:
    overlap = Overlap()
    outcomes: list[tuple[bool, Any]] = []

    def handler(i: int) -> int:
        with overlap:
            time.sleep(0.01)
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
    assert overlap.most == 3  # all three workers were used, never more
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


def test_a_claimed_worker_counts_against_concurrency_and_takes_the_backlog_after() -> None:
    """claim()/run_claimed(): the RPC lane runs a job on the thread that read it, in the place
    of a parked worker; jobs submitted meanwhile wait for it, then that worker runs them."""
    gate = threading.Event()
    ran: list[tuple[str, str]] = []

    def handler(tag: str) -> str:
        ran.append((tag, threading.current_thread().name))
        if tag == "boom":
            raise KeyError(tag)
        if tag == "inline":
            gate.wait(10)
        return tag

    pool = Pool(handler, "test", 1, _no_loop)
    outcomes: list[tuple[bool, Any]] = []
    try:
        worker = pool.claim()
        assert worker is not None
        assert pool.claim() is None          # the only worker is taken
        pool.submit(("queued",), {}, lambda ok, v: outcomes.append((ok, v)))
        inline = threading.Thread(target=lambda: outcomes.append(
            pool.run_claimed(worker, ("inline",), {})), name="lane-reader")
        inline.start()
        wait_until(lambda: ran[:1] == [("inline", "lane-reader")], 5, what="inline job")
        assert len(ran) == 1                 # "queued" waits: concurrency is 1
        gate.set()
        inline.join(5)
        wait_until(lambda: len(outcomes) == 2, 5, what="both outcomes")
        assert outcomes == [(True, "inline"), (True, "queued")]
        assert ran[1][0] == "queued" and ran[1][1].startswith("meshmq-test")
        assert pool.done == 2
        worker = pool.claim()                # given back idle
        assert worker is not None
        assert pool.run_claimed(worker, ("again",), {}) == (True, "again")
        claimed = pool.claim()
        assert claimed is not None
        ok, exc = pool.run_claimed(claimed, ("boom",), {})
        assert not ok and isinstance(exc, KeyError) and pool.errors == 1
    finally:
        pool.close(2)


def test_an_async_pool_is_never_claimed() -> None:
    async def handler() -> None:
        return None

    loop = asyncio.new_event_loop()
    try:
        pool = Pool(handler, "test", 1, lambda: loop)
        assert pool.claim() is None
    finally:
        loop.close()
