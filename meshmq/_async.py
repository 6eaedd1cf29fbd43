"""AsyncNode: the same engine as Node, with coroutine methods; async handlers run on your loop."""

from __future__ import annotations

import asyncio
import itertools
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar

from meshmq._errors import Backpressure, ConfigError, MeshTimeout, NodeClosed
from meshmq._message import Message
from meshmq._node import Node
from meshmq._peers import PeerInfo
from meshmq._topics import check_topic

__all__ = ["AsyncNode"]

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


async def in_thread(fn: Callable[[], T]) -> T:
    """Run a blocking call in a short-lived thread of its own (no executor left behind)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def body() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, result)

    thread = threading.Thread(target=body, name="meshmq-blocking-call", daemon=True)
    thread.start()
    try:
        return await fut
    finally:
        thread.join(0.1)


class AsyncNode:
    """A meshmq peer for asyncio programs: ``await node.start()``, ``async with AsyncNode(...)``.

    ``async def`` handlers run as tasks on the loop that started the node; plain ``def``
    handlers still run in threads of their own, never on your loop.
    """

    def __init__(self, name: str, peers: list[str] | None = None, host: str | None = None,
                 port: int = 0, **options: Any) -> None:
        self.node = Node(name, peers, host, port, **options)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.node._listeners.append(self._wake_waiters)

    # the sync parts are shared with Node as they are
    @property
    def name(self) -> str:
        return self.node.name

    @property
    def id(self) -> str:
        return self.node.id

    @property
    def address(self) -> str:
        return self.node.address

    def subscribe(self, pattern: str, **options: Any) -> Callable[[F], F]:
        return self.node.subscribe(pattern, **options)

    def register(self, obj: Any) -> int:
        return self.node.register(obj)

    def on_peer_join(self, fn: F) -> F:
        return self.node.on_peer_join(fn)

    def on_peer_leave(self, fn: F) -> F:
        return self.node.on_peer_leave(fn)

    def peers(self) -> list[PeerInfo]:
        return self.node.peers()

    def stats(self) -> dict[str, Any]:
        return self.node.stats()

    def subscribers(self, topic: str) -> int:
        return self.node.subscribers(topic)

    def connect(self, address: str) -> None:
        self.node.connect(address)

    def __getattr__(self, name: str) -> Any:
        # Pattern plugins add sync helpers to Node; expose them too.
        return getattr(self.node, name)

    # ---- coroutines ------------------------------------------------------------------------
    async def start(self) -> AsyncNode:
        self.node._loop = asyncio.get_running_loop()
        await in_thread(self.node.start)
        return self

    async def stop(self, timeout: float | None = None) -> None:
        await in_thread(lambda: self.node.stop(timeout))

    aclose = stop

    async def __aenter__(self) -> AsyncNode:
        return await self.start()

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def publish(self, topic: str, body: Any = None,
                      headers: dict[str, Any] | None = None, *, confirm: bool = False,
                      timeout: float = 5.0) -> str:
        """Publish; with ``confirm=True``, return once a journal has it on disk (see Node)."""
        if not confirm:
            # Publishing never blocks (ZeroMQ drops past the high-water mark): no thread hop.
            return self.node.publish(topic, body, headers)
        return await in_thread(lambda: self.node.publish(topic, body, headers, confirm=True,
                                                         timeout=timeout))

    async def replay(self, pattern: str, since: Any = "earliest", until: Any = None, *,
                     batch: int = 1000, timeout: float = 5.0, pace: str = "fast"
                     ) -> AsyncIterator[Message]:
        """``async for msg in node.replay(...)``: stored messages from a journal, as
        :meth:`Node.replay`. Batches are pulled in a thread, one at a time (flow control);
        ``pace="original"`` waits on the loop, never blocking it."""
        if pace not in ("fast", "original"):
            raise ConfigError(f'pace must be "fast" or "original", not {pace!r}')
        messages = await in_thread(lambda: self.node.replay(pattern, since, until, batch=batch,
                                                            timeout=timeout))
        origin: tuple[float, float] | None = None
        loop = asyncio.get_running_loop()
        try:
            while True:
                chunk = await in_thread(lambda: list(itertools.islice(messages, batch)))
                for msg in chunk:
                    if pace == "original":
                        if origin is None:
                            origin = (msg.timestamp, loop.time())
                        elif (delay := origin[1] + msg.timestamp - origin[0] - loop.time()) > 0:
                            await asyncio.sleep(delay)
                    yield msg
                if len(chunk) < batch:
                    return
        finally:
            close = getattr(messages, "close", None)
            if close is not None:
                close()

    def worker(self, queue: str, **options: Any) -> Callable[[F], F]:
        return self.node.worker(queue, **options)

    def rpc(self, service: str, **options: Any) -> Callable[[F], F]:
        return self.node.rpc(service, **options)

    async def push(self, queue: str, body: Any = None, key: Any = None,
                   headers: dict[str, Any] | None = None, *, block: bool = True,
                   timeout: float | None = None) -> str:
        try:
            return self.node.push(queue, body, key, headers, block=False)
        except Backpressure:
            if not block:
                raise
        # full: wait for room in a thread, so the loop keeps running
        return await in_thread(lambda: self.node.push(queue, body, key, headers, block=True,
                                                      timeout=timeout))

    async def wait_for_workers(self, queue: str, count: int = 1, timeout: float = 5.0) -> int:
        self.node._require_running()
        return int(await self.wait_until(
            lambda: (n := self.node._pipelines.workers_for(queue)) >= count and n, timeout,
            f"{count} worker(s) of {queue!r}"))

    async def wait_for_servers(self, service: str, count: int = 1, timeout: float = 5.0) -> int:
        self.node._require_running()
        return int(await self.wait_until(
            lambda: (n := self.node.servers_for(service)) >= count and n, timeout,
            f"{count} server(s) of {service!r}"))

    async def call(self, service: str, *args: Any, timeout: float = 5.0, retry: bool = False,
                   **kwargs: Any) -> Any:
        """Call a service without blocking the loop; thousands may be in flight at once."""
        return await self.node._rpc.acall(service, args, kwargs, timeout, retry)

    async def run(self) -> None:
        """Start if needed, wait for SIGINT or SIGTERM, then stop cleanly."""
        if not self.node.running:
            await self.start()
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, done.set)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        try:
            await self.wait_until(lambda: done.is_set() or self.node.engine is None
                                  or self.node.engine.stopped.is_set(), None, "a signal")
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)
            engine = self.node.engine
            error = engine.error if engine is not None else None
            await self.stop()
        if error is not None:
            raise error

    async def wait_for_subscribers(self, topic: str, count: int = 1,
                                   timeout: float = 5.0) -> int:
        check_topic(topic)
        self.node._require_running()
        return int(await self.wait_until(
            lambda: (n := self.node.subscribers(topic)) >= count and n, timeout,
            f"{count} subscriber(s) of {topic!r}"))

    async def wait_until(self, predicate: Callable[[], Any], timeout: float | None,
                         what: str) -> Any:
        """Await until ``predicate()`` is truthy; re-checked on every peer change."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        key = (loop, event)
        self._waiters.add(key)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                value = predicate()
                if value:
                    return value
                if not self.node.running and predicate is not None and timeout is not None:
                    raise NodeClosed(f"node {self.node.name!r} stopped while waiting for {what}")
                left = 0.5 if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    raise MeshTimeout(f"timed out after {timeout}s waiting for {what}")
                event.clear()
                try:
                    await asyncio.wait_for(event.wait(), min(left, 0.5))
                except TimeoutError:
                    pass
        finally:
            self._waiters.discard(key)

    def _wake_waiters(self) -> None:
        for loop, event in list(self._waiters):
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass

    def __repr__(self) -> str:
        return f"<AsyncNode {self.node.name!r} id={self.node.id}>"
