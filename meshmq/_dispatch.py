"""Handler specs (what decorators record) and runners (where handlers execute).

Decorators only record: they attach an immutable :class:`HandlerSpec` to the function and
return it unchanged, so handlers stay plain, unit-testable functions. Binding to a node is a
separate step (``node.register(obj)`` or the node's own decorators).

Each handler gets its own runner, so one slow handler never delays another: a sync handler runs
in a dedicated thread, an ``async def`` handler in a task on an event loop that is not the node's
I/O thread. Each runner delivers its messages in order, one at a time. A runner's queue is
bounded; past the bound new messages are dropped and counted (as a PUB socket does at its
high-water mark), so a stuck handler cannot grow memory without bound.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["HandlerSpec", "specs_of", "subscribe"]

log = logging.getLogger("meshmq")

F = TypeVar("F", bound=Callable[..., Any])
SPEC_ATTR = "__meshmq_specs__"
_STOP: list[Any] = []


@dataclass(frozen=True)
class HandlerSpec:
    """What a decorator records: the kind of handler, its topic/queue/service, its options."""

    kind: str                      # "subscribe", "worker" or "rpc"
    name: str                      # pattern, queue or service name
    options: dict[str, Any] = field(default_factory=dict)


def record(fn: F, spec: HandlerSpec) -> F:
    """Attach ``spec`` to ``fn`` and return ``fn`` unchanged."""
    specs = getattr(fn, SPEC_ATTR, ())
    try:
        setattr(fn, SPEC_ATTR, (*specs, spec))
    except AttributeError:  # a bound method: record on the underlying function
        setattr(fn.__func__, SPEC_ATTR, (*specs, spec))  # type: ignore[attr-defined]
    return fn


def specs_of(fn: Callable[..., Any]) -> tuple[HandlerSpec, ...]:
    """The specs recorded on a function (empty if none)."""
    return tuple(getattr(fn, SPEC_ATTR, ()))


def subscribe(pattern: str, **options: Any) -> Callable[[F], F]:
    """Mark a function as a subscriber without binding it to a node (see ``Node.register``)."""
    def deco(fn: F) -> F:
        return record(fn, HandlerSpec("subscribe", pattern, dict(options)))
    return deco


def is_async(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` must be awaited."""
    call = type(fn).__dict__.get("__call__")  # an object whose __call__ is async
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(call)


class Runner:
    """Runs one handler over batches of messages, in order."""

    def __init__(self, fn: Callable[..., Any], label: str, max_pending: int) -> None:
        self.fn = fn
        self.label = label
        self.max_pending = max_pending
        # Single-writer counters: `queued`/`dropped` by the submitting (I/O) thread,
        # `done`/`errors` by the runner. Their difference is the backlog, without a lock.
        self.queued = 0
        self.dropped = 0
        self.done = 0
        self.errors = 0
        self.abandoned = 0       # queued when stop's drain deadline passed; never run
        self._abandon = False

    @property
    def pending(self) -> int:
        return self.queued - self.done

    def submit(self, batch: list[Any]) -> None:
        room = self.max_pending - self.pending
        if room <= 0:
            self.dropped += len(batch)
            return
        if len(batch) > room:
            self.dropped += len(batch) - room
            batch = batch[:room]
        self.queued += len(batch)
        self._put(batch)

    def _put(self, batch: list[Any]) -> None:
        raise NotImplementedError

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        log.error("handler %s raised", self.label, exc_info=exc)

    def close(self, timeout: float) -> bool:
        """Stop after the queued messages (bounded by ``timeout``); True if it finished."""
        raise NotImplementedError


class ThreadRunner(Runner):
    """A sync handler in its own thread."""

    def __init__(self, fn: Callable[..., Any], label: str, max_pending: int) -> None:
        super().__init__(fn, label, max_pending)
        self._q: queue.SimpleQueue[list[Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"meshmq-handler-{label}",
                                        daemon=True)
        self._thread.start()

    def _put(self, batch: list[Any]) -> None:
        self._q.put(batch)

    def _run(self) -> None:
        fn, get = self.fn, self._q.get
        while True:
            batch = get()
            if batch is _STOP:
                return
            for i, msg in enumerate(batch):
                if self._abandon:
                    self.abandoned += len(batch) - i
                    break
                try:
                    fn(msg)
                except BaseException as exc:  # noqa: BLE001 - a handler's failure is data
                    self.failed(exc)
            self.done += len(batch)

    def close(self, timeout: float) -> bool:
        self._q.put(_STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Past the drain deadline: run nothing more; the thread ends after its current call.
            self._abandon = True
            return False
        return True


class AsyncRunner(Runner):
    """An ``async def`` handler as a task on ``loop`` (never the node's I/O thread)."""

    def __init__(self, fn: Callable[..., Any], label: str, max_pending: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(fn, label, max_pending)
        self.loop = loop
        self._q: asyncio.Queue[list[Any]] | None = None
        self._ready = threading.Event()
        self._task: asyncio.Future[None] | None = None
        self._closed = threading.Event()
        loop.call_soon_threadsafe(self._start)

    def _start(self) -> None:
        self._q = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run())
        self._ready.set()

    def _put(self, batch: list[Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self._enqueue, batch)
        except RuntimeError:  # loop closed: the node is stopping
            self.dropped += len(batch)

    def _enqueue(self, batch: list[Any]) -> None:
        assert self._q is not None
        self._q.put_nowait(batch)

    async def _run(self) -> None:
        assert self._q is not None
        fn, get = self.fn, self._q.get
        try:
            while True:
                batch = await get()
                if batch is _STOP:
                    return
                for i, msg in enumerate(batch):
                    if self._abandon:
                        self.abandoned += len(batch) - i
                        break
                    try:
                        await fn(msg)
                    except Exception as exc:  # noqa: BLE001 - a handler's failure is data
                        self.failed(exc)
                self.done += len(batch)
        finally:
            self._closed.set()

    def close(self, timeout: float) -> bool:
        if not self._ready.wait(timeout):
            return False
        try:
            self.loop.call_soon_threadsafe(self._enqueue, _STOP)
        except RuntimeError:
            return True
        if self._closed.wait(timeout):
            return True
        self._abandon = True
        task = self._task
        if task is not None:
            try:
                self.loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass
        return False


class LoopThread:
    """An event loop in a thread of its own, for a sync Node's ``async def`` handlers."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def stop(self, timeout: float) -> None:
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        self._thread.join(timeout)


def make_runner(fn: Callable[..., Any], label: str, max_pending: int,
                loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Runner:
    """A runner of the right kind for ``fn``."""
    if is_async(fn):
        return AsyncRunner(fn, label, max_pending, loop_factory())
    return ThreadRunner(fn, label, max_pending)
