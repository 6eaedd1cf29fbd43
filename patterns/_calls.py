"""What an RPC caller waits on: a call in flight, and the per-loop waker of AsyncNode callers.

A sync caller blocks on a held lock that the settling thread releases (the cheapest wake-up
CPython has). Async callers are settled in batches, one loop wake-up for many replies; the calls
their coroutines start go out in one batch per loop iteration, and their timeouts share timer
slots.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from meshmq._codec import pack

__all__ = ["Call", "Expired", "LoopWaker", "SLOT", "pack"]


class Expired(Exception):
    """An async call's own timeout (internal)."""


SLOT = 0.01   # async call timeouts are rounded up to this many seconds


class Call:
    """One call in flight. Its tables (pending, parked) and fields are guarded by Rpc.lock."""

    __slots__ = ("abandoned", "deadline", "done", "entry", "id", "lane", "notify", "ok",
                 "payload", "retry", "server", "service", "tried", "value", "waiter")

    def __init__(self, cid: str, service: str, payload: bytes, deadline: float, retry: bool,
                 notify: Callable[[Call], None] | None) -> None:
        self.id = cid
        self.service = service
        self.payload = payload     # msgpack of [args, kwargs], encoded once by the caller
        self.deadline = deadline
        self.retry = retry
        self.server: str | None = None
        self.tried: set[str] = set()
        self.done = False          # ok and value are set
        self.ok = False
        self.value: Any = None     # the result, or the exception to raise
        self.abandoned = False     # the caller gave up: never start it again
        # sent on the caller's lane (_lane.py): its LaneCaller, and the (DEALER, poll) entry
        self.lane: Any = None
        self.entry: Any = None
        # A sync caller blocks on a held lock that the settling thread releases (the cheapest
        # wake-up CPython has); an async caller is told through notify (from any thread).
        self.notify = notify
        self.waiter: threading.Lock | None = None
        if notify is None:
            self.waiter = threading.Lock()
            self.waiter.acquire()

    def result(self) -> Any:
        if self.ok:
            return self.value
        raise self.value


class LoopWaker:
    """Settles the asyncio futures of one loop's calls, many per wake-up of that loop; and
    sends the calls its coroutines start in one batch per loop iteration (one lock, one
    ``ZMQ_EVENTS`` check per batch instead of per call)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.ready: list[tuple[asyncio.Future[Any], Call]] = []
        self.scheduled = False
        self.outbox: dict[str, list[bytes]] = {}   # server -> payloads (loop thread only)
        self.engine: Any = None
        # Timeouts share one loop timer per 10 ms slot (loop thread only): a call_later and a
        # cancel per call cost more loop time than the rest of the call's bookkeeping.
        self.slots: dict[int, dict[str, asyncio.Future[Any]]] = {}

    def expire_after(self, timeout: float, cid: str, waiter: asyncio.Future[Any]) -> int:
        """Fail ``waiter`` with Expired ``timeout`` seconds from now (up to 10 ms later)."""
        slot = int((self.loop.time() + timeout) / SLOT) + 1
        waiters = self.slots.get(slot)
        if waiters is None:
            waiters = self.slots[slot] = {}
            self.loop.call_at(slot * SLOT, self._expire, slot)
        waiters[cid] = waiter
        return slot

    def forget(self, slot: int, cid: str) -> None:
        waiters = self.slots.get(slot)
        if waiters is not None:
            waiters.pop(cid, None)

    def _expire(self, slot: int) -> None:
        for waiter in self.slots.pop(slot, {}).values():
            if not waiter.done():
                waiter.set_exception(Expired())

    def send(self, engine: Any, server: str, payload: bytes) -> None:
        """Queue a call for the end of this loop iteration (loop thread)."""
        out = self.outbox.get(server)
        if out is None:
            if not self.outbox:
                self.engine = engine
                self.loop.call_soon(self._flush)
            self.outbox[server] = [payload]
        else:
            out.append(payload)

    def _flush(self) -> None:
        outbox, self.outbox = self.outbox, {}
        for server, payloads in outbox.items():
            # if the server left meanwhile, on_peer_leave fails or retries the calls
            self.engine.send_payload(server, payloads)

    def add(self, fut: asyncio.Future[Any], call: Call) -> None:
        with self.lock:
            self.ready.append((fut, call))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            pass  # the loop is closed: nobody awaits these any more

    def _run(self) -> None:
        with self.lock:
            ready, self.ready = self.ready, []
            self.scheduled = False
        for fut, call in ready:
            if not fut.done():
                if call.ok:
                    fut.set_result(call.value)
                else:
                    fut.set_exception(call.value)
