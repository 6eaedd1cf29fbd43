"""A bounded pool that runs a handler for pipeline tasks and RPC calls, then reports the outcome.

Sync handlers run on ``concurrency`` threads of their own; ``async def`` handlers run as tasks
on the node's handler loop with at most ``concurrency`` at once. Never on the I/O thread.

A job goes straight to the worker thread that went idle last (its own lock is the wake-up), so
at low load the same warm thread runs every call; jobs wait in a FIFO backlog only when every
worker is busy.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from meshmq._dispatch import is_async
from meshmq._errors import MeshTimeout

__all__ = ["Abandoned", "Outcome", "Pool", "describe_error"]

log = logging.getLogger("meshmq")

#: (ok, value): value is the handler's result, or an error description from describe_error()
Outcome = tuple[bool, Any]
Job = tuple[Callable[[], Any], Callable[[bool, Any], None]]
_STOP: Any = object()


class Abandoned(MeshTimeout):
    """A job whose caller's deadline passed before a worker could start it: it is not run."""


def describe_error(exc: BaseException) -> dict[str, str]:
    """An exception as data: type name, message, traceback text. Never pickled, never imported.

    Never raises: an exception whose ``str()`` (or traceback) raises is described as
    unprintable, so reporting a handler's failure cannot kill the thread that reports it.
    """
    name = type(exc).__qualname__
    try:
        message = str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ is the handler's bug, not ours
        message = f"<unprintable {name}>"
    try:
        text = "".join(traceback.format_exception(exc))
    except Exception:  # noqa: BLE001
        text = f"{name}: {message}\n"
    return {"type": name, "message": message, "traceback": text}


class _Worker:
    __slots__ = ("job", "wake")

    def __init__(self) -> None:
        self.job: Any = None
        self.wake = threading.Lock()   # held while the worker waits; released to hand a job
        self.wake.acquire()


class Pool:
    """Runs ``call()`` jobs, ``concurrency`` at a time, and hands each outcome to ``done``."""

    def __init__(self, fn: Callable[..., Any], label: str, concurrency: int,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.fn = fn
        self.label = label
        self.concurrency = concurrency
        self.is_async = is_async(fn)
        self.errors = 0
        self.done = 0
        self.expired = 0      # jobs not run: their caller's deadline passed while they waited
        # seconds spent in the handler, over all jobs (threads add without a lock: a lost
        # update only blurs it; the adaptive prefetch of pipelines reads it)
        self.busy = 0.0
        self._threads: list[threading.Thread] = []
        self._mutex = threading.Lock()
        self._idle: list[_Worker] = []                   # last idle first
        self._backlog: collections.deque[Any] = collections.deque()
        if self.is_async:
            self.loop = loop_factory()
            self._sem: asyncio.Semaphore | None = None
        else:
            for i in range(concurrency):
                w = _Worker()
                self._idle.append(w)
                t = threading.Thread(target=self._work, args=(w,), name=f"meshmq-{label}-{i}",
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def submit(self, args: tuple[Any, ...], kwargs: dict[str, Any],
               done: Callable[[bool, Any], None], expires: float | None = None) -> None:
        """Run ``fn(*args, **kwargs)`` soon; call ``done(ok, result_or_error)`` after.

        ``expires`` (time.monotonic()): a job that has not started by then is not run; it
        ends with ``done(False, Abandoned(...))`` (the caller has given up waiting for it).
        """
        if self.is_async:
            self.loop.call_soon_threadsafe(self._spawn, args, kwargs, done, expires)
            return
        job = (args, kwargs, done, expires)
        with self._mutex:
            if not self._idle:
                self._backlog.append(job)
                return
            w = self._idle.pop()
        w.job = job
        w.wake.release()

    def claim(self) -> _Worker | None:
        """Reserve an idle worker so the calling thread can run one job itself (run_claimed).

        The RPC lane's reader runs a call on the thread that read it, one hand-off fewer; the
        reserved worker stays parked, so ``concurrency`` still bounds the handlers running.
        None when every worker is busy (then ``submit``) or the handler is ``async def``.
        """
        if self.is_async:
            return None
        with self._mutex:
            return self._idle.pop() if self._idle else None

    def run_claimed(self, w: _Worker, args: tuple[Any, ...], kwargs: dict[str, Any]
                    ) -> Outcome:
        """Run one job on this thread in ``w``'s place, give ``w`` back (or its backlog), and
        return the outcome: (True, result) or (False, the exception)."""
        outcome = self._run(args, kwargs)
        self.done += 1
        job = self._next(w)
        if job is not None:
            w.job = job
            w.wake.release()   # jobs queued meanwhile: the parked worker takes them on
        return outcome

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Outcome:
        """Call the handler on this thread, timed (``busy``): (True, result) or (False, exc)."""
        t0 = time.perf_counter()
        outcome: Outcome
        try:
            outcome = (True, self.fn(*args, **kwargs))
        except Exception as exc:  # noqa: BLE001 - a handler's failure is data
            self.errors += 1
            outcome = (False, exc)
        self.busy += time.perf_counter() - t0
        return outcome

    def _next(self, w: _Worker) -> Any:
        """The next backlog job for ``w``, or None after putting ``w`` back among the idle."""
        with self._mutex:
            if self._backlog:
                return self._backlog.popleft()
            self._idle.append(w)
            return None

    def _expire(self, done: Callable[[bool, Any], None]) -> None:
        self.expired += 1
        self._finish(done, False, Abandoned(
            f"{self.label}: not started before its caller's deadline, so not run"))

    def _finish(self, done: Callable[[bool, Any], None], ok: bool, value: Any) -> None:
        self.done += 1
        try:
            done(ok, value)
        except Exception:  # noqa: BLE001 - reporting must not kill the worker
            log.exception("reporting the outcome of %s failed", self.label)

    def _work(self, w: _Worker) -> None:
        while True:
            w.wake.acquire()
            job, w.job = w.job, None
            while job is not None:
                if job is _STOP:
                    return
                args, kwargs, done, expires = job
                if expires is not None and time.monotonic() > expires:
                    self._expire(done)
                else:
                    self._finish(done, *self._run(args, kwargs))
                job = self._next(w)

    def _spawn(self, args: tuple[Any, ...], kwargs: dict[str, Any],
               done: Callable[[bool, Any], None], expires: float | None = None) -> None:
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.concurrency)
        asyncio.ensure_future(self._run_async(args, kwargs, done, expires))

    async def _run_async(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                         done: Callable[[bool, Any], None], expires: float | None = None
                         ) -> None:
        assert self._sem is not None
        async with self._sem:
            if expires is not None and time.monotonic() > expires:
                self._expire(done)
                return
            t0 = time.perf_counter()   # with the waits between the handler's steps
            try:
                result = await self.fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                self.busy += time.perf_counter() - t0
                self.errors += 1
                self._finish(done, False, exc)
            else:
                self.busy += time.perf_counter() - t0
                self._finish(done, True, result)

    def close(self, timeout: float) -> None:
        """Let the workers finish the backlog, then stop them; wait up to ``timeout`` each."""
        with self._mutex:
            idle, self._idle = self._idle, []
            # busy workers take these after the backlog; idle ones are told now
            self._backlog.extend(_STOP for _ in range(len(self._threads) - len(idle)))
        for w in idle:
            w.job = _STOP
            w.wake.release()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:   # a handler may stop its own node
                t.join(timeout)
