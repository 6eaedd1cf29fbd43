"""The node side of the journal: confirmed publishes, replay, replay-then-live subscribers.

A Node creates one :class:`JournalClient` the first time it needs one (``publish(...,
confirm=True)``, ``replay()``, ``subscribe(..., replay=...)``). Journals are found among the
node's peers by their services (``meshmq.journal.<id>.append``) and cover the topics they
subscribe to. Everything goes through the node's RPC. docs/JOURNAL.md.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from meshmq._dispatch import HandlerSpec, is_async
from meshmq._errors import ConfigError, MeshTimeout, NodeClosed, NoPeerError, PeerGone, RemoteError
from meshmq._message import Message
from meshmq._peers import PeerInfo
from meshmq._topics import check_pattern, matcher

from ._entry import decode_entry, encode_entry
from ._journal import SERVICE_PREFIX, service_name

if TYPE_CHECKING:
    from meshmq._node import Node

__all__ = ["JournalClient", "since_value"]

logger = logging.getLogger("meshmq.durability")

#: How long a replay-then-live subscriber waits for the journal to catch up with the live
#: stream before it goes live anyway (and logs what may be missing).
HANDOFF_TIMEOUT = 10.0
_APPEND_SUFFIX = ".append"


def since_value(since: Any) -> Any:
    """Normalise a replay start: "earliest", "latest", an int offset, or a time (float)."""
    if since is None:
        return "earliest"
    if since in ("earliest", "latest"):
        return since
    if isinstance(since, bool):
        raise ConfigError(f"replay start must be 'earliest', 'latest', an offset or a datetime,"
                          f" not {since!r}")
    if isinstance(since, int):
        if since < 0:
            raise ConfigError(f"replay offset must be >= 0, got {since}")
        return since
    if isinstance(since, dt.datetime):
        return (since if since.tzinfo else since.astimezone()).timestamp()
    if isinstance(since, float):
        return since
    raise ConfigError(f"replay start must be 'earliest', 'latest', an offset or a datetime,"
                      f" not {since!r}")


def _covers(journal_pattern: str, pattern: str) -> bool:
    """Whether a journal subscribed to ``journal_pattern`` stores everything ``pattern`` names."""
    if "*" not in pattern and ">" not in pattern:
        return matcher(journal_pattern)(pattern)
    return journal_pattern in (pattern, ">") or (
        journal_pattern.endswith(".>") and pattern.startswith(journal_pattern[:-1]))


class JournalClient:
    """Plugged into a Node: the journal-facing half of confirm, replay and replay-then-live."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._replayers: list[_ReplayThenLive] = []
        #: confirmed: confirm=True publishes acknowledged; confirm_resends: append calls
        #: repeated (journal gone or refusing); replayed: stored messages delivered by replay;
        #: replay_live / replay_skipped: live messages delivered / dropped as already replayed
        #: by replay-then-live subscribers.
        self.counters = {"confirmed": 0, "confirm_resends": 0, "replayed": 0, "replay_live": 0,
                         "replay_skipped": 0}

    # ---- plugin hooks (see Node._plugins) ----------------------------------------------------
    def bind(self, node: Node, spec: HandlerSpec, fn: Callable[..., Any]) -> bool:
        return False

    def start(self, node: Node) -> None:
        for r in self._replayers:
            r.start()

    def stop(self, node: Node) -> None:
        for r in self._replayers:
            r.stop()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    # ---- finding journals --------------------------------------------------------------------
    def journals(self, topic_or_pattern: str | None = None) -> list[PeerInfo]:
        """Journal peers (sorted by id) that store ``topic_or_pattern`` (every one if None)."""
        out = []
        for p in self.node.peers():
            if not any(s.startswith(SERVICE_PREFIX) and s.endswith(_APPEND_SUFFIX)
                       for s in p.services):
                continue
            if topic_or_pattern is None or any(_covers(j, topic_or_pattern)
                                               for j in p.subscriptions):
                out.append(p)
        return sorted(out, key=lambda p: p.id)

    def wait_journal(self, what: str, timeout: float) -> PeerInfo:
        """The first journal covering ``what``, waiting up to ``timeout`` for one to join."""
        found = self.node.wait_until(lambda: self.journals(what), max(timeout, 0.0),
                                     f"a journal covering {what!r}")
        return found[0]

    # ---- confirm=True --------------------------------------------------------------------------
    def confirm(self, topic: str, body: Any, headers: dict[str, Any] | None, msg_id: str,
                seq: int, ts: float, timeout: float) -> int:
        """Block until a journal covering ``topic`` has the message durably; its offset.

        The message (same id, so the journal stores it once) is resent whenever the journal
        that had it dies or restarts before answering. MeshTimeout when ``timeout`` runs out.
        """
        node = self.node
        entry = encode_entry(Message(topic, body, headers or {}, msg_id, node.name, node.id,
                                     seq, ts))
        deadline = time.monotonic() + timeout
        attempt = 0
        last: BaseException | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeshTimeout(f"no journal acknowledged message {msg_id} on {topic!r} within"
                                  f" {timeout}s" + (f" (last: {last})" if last else "")) from last
            try:
                journal = self.wait_journal(topic, left)
            except MeshTimeout as exc:
                raise MeshTimeout(f"no journal covering {topic!r} acknowledged message {msg_id}"
                                  f" within {timeout}s") from exc
            if attempt:
                self.counters["confirm_resends"] += 1
            attempt += 1
            try:
                offset = node.call(service_name(journal.id, "append"), entry,
                                   timeout=max(deadline - time.monotonic(), 0.001))
            except (PeerGone, NoPeerError, RemoteError, MeshTimeout) as exc:
                # The journal died, restarted or refused (e.g. disk full): try again, same id.
                last = exc
                if isinstance(exc, RemoteError):
                    self._pause(min(0.05, max(deadline - time.monotonic(), 0)))
                continue
            self.counters["confirmed"] += 1
            return int(offset)

    def _pause(self, seconds: float) -> None:
        threading.Event().wait(seconds)

    # ---- replay (pull) -------------------------------------------------------------------------
    def replay(self, pattern: str, since: Any = "earliest", until: Any = None, *,
               batch: int = 1000, timeout: float = 5.0, pace: str = "fast"
               ) -> Iterator[Message]:
        """Yield stored messages matching ``pattern`` from ``since`` up to ``until``.

        ``until``: None (the journal's end when the replay starts), an offset (exclusive) or a
        datetime/float time. Batches are pulled one at a time, so a slow reader holds at most
        one batch and the journal buffers nothing for it. ``pace="original"`` spaces the
        messages as they were published (by their timestamps); "fast" does not wait.
        """
        check_pattern(pattern)
        if pace not in ("fast", "original"):
            raise ConfigError(f'pace must be "fast" or "original", not {pace!r}')
        start = since_value(since)
        self.node._require_running()
        journal = self.wait_journal(pattern, timeout)
        read = service_name(journal.id, "read")
        call = self.node.call
        first = call(read, 0, pattern, 0, 1, 1, since=start, timeout=timeout)
        offset = first["next"]
        if until is None:
            end = call(read, 0, None, 0, 1, 1, since="latest", timeout=timeout)["next"]
        elif isinstance(until, int) and not isinstance(until, bool):
            end = until
        else:
            end = call(read, 0, None, 0, 1, 1, since=since_value(until),
                       timeout=timeout)["next"]
        messages = self._pull(read, pattern, offset, end, batch, timeout)
        return _paced(messages) if pace == "original" else messages

    def _pull(self, read: str, pattern: str, offset: int, end: int, batch: int,
              timeout: float) -> Iterator[Message]:
        while offset < end:
            res = self.node.call(read, offset, pattern, end, batch, timeout=timeout)
            for _, _, payload in res["records"]:
                self.counters["replayed"] += 1
                yield decode_entry(payload)
            if res["next"] <= offset:
                return
            offset = res["next"]

    # ---- replay-then-live ----------------------------------------------------------------------
    def replaying(self, spec: HandlerSpec, fn: Callable[..., Any]) -> Callable[[Message], None]:
        """Wrap a subscriber so that it first gets the stored messages, then the live ones."""
        if is_async(fn):
            raise ConfigError("replay= needs a plain (sync) handler")
        wrapper = _ReplayThenLive(self, spec.name, since_value(spec.options["replay"]), fn)
        self._replayers.append(wrapper)
        if self.node.running:
            wrapper.start()
        return wrapper


def _paced(messages: Iterator[Message]) -> Iterator[Message]:
    """Yield ``messages`` no faster than their timestamps say they were published."""
    wait = threading.Event().wait
    origin: tuple[float, float] | None = None
    for msg in messages:
        if origin is None:
            origin = (msg.timestamp, time.monotonic())
        else:
            due = origin[1] + (msg.timestamp - origin[0])
            if (delay := due - time.monotonic()) > 0:
                wait(delay)
        yield msg


class _ReplayThenLive:
    """Buffers live messages while replaying, then hands off with no gap and no duplicate.

    Hand-off rule: for every (sender, topic) seen live, the journal must have stored up to the
    seq before the first buffered live one (``positions``); then everything up to the journal's
    end is replayed, and buffered live messages are delivered unless replay already did
    (per-sender-and-topic seq). The handler is never called from two threads at once.
    """

    def __init__(self, client: JournalClient, pattern: str, since: Any,
                 fn: Callable[[Message], Any]) -> None:
        self.client = client
        self.pattern = pattern
        self.since = since
        self.fn = fn
        self.__qualname__ = getattr(fn, "__qualname__", "handler")
        self._lock = threading.Lock()
        self._live = since == "latest"
        self._buffer: list[Message] = []
        self._seen: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counters = client.counters

    def __call__(self, msg: Message) -> None:
        if not self._live:
            with self._lock:
                if not self._live:
                    self._buffer.append(msg)
                    return
        self._deliver(msg, "replay_live")

    def _deliver(self, msg: Message, kind: str) -> None:
        key = (msg.source_id, msg.topic)
        if msg.seq <= self._seen.get(key, 0):
            self._counters["replay_skipped"] += 1
            return
        self._seen[key] = msg.seq
        self._counters[kind] += 1
        self.fn(msg)

    def start(self) -> None:
        if self._live or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"meshmq-replay-{self.pattern}")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def _run(self) -> None:
        try:
            self._replay()
        except (NodeClosed, PeerGone) as exc:
            if not self._stop.is_set():
                logger.warning("replay of %s ended early (%s); going live", self.pattern, exc)
        except Exception:  # noqa: BLE001 - a replay failure must not lose the live stream
            logger.exception("replay of %s failed; going live", self.pattern)
        finally:
            self._go_live()

    def _replay(self) -> None:
        client = self.client
        node = client.node
        journal = client.wait_journal(self.pattern, 30.0)
        read = service_name(journal.id, "read")
        positions = service_name(journal.id, "positions")
        res = node.call(read, 0, self.pattern, 0, 1, 1, since=self.since)
        offset = res["next"]
        deadline: float | None = None
        while not self._stop.is_set():
            res = node.call(read, offset, self.pattern, None, 1000)
            for _, _, payload in res["records"]:
                self._deliver(decode_entry(payload), "replayed")
            offset = res["next"]
            if offset < res["end"]:
                continue
            # Caught up with the journal: has it got everything before the live stream?
            with self._lock:
                firsts: dict[tuple[str, str], int] = {}
                for m in self._buffer:
                    firsts.setdefault((m.source_id, m.topic), m.seq)
            keys = list(firsts)
            stored = node.call(positions, [list(k) for k in keys]) if keys else []
            if all(s >= firsts[k] - 1 for k, s in zip(keys, stored, strict=True)):
                # Everything before the first live messages is stored: read to the end once
                # more (it may have grown since the check), then hand off.
                while True:
                    res = node.call(read, offset, self.pattern, None, 1000)
                    for _, _, payload in res["records"]:
                        self._deliver(decode_entry(payload), "replayed")
                    offset = res["next"]
                    if offset >= res["end"]:
                        return
            now = time.monotonic()
            if deadline is None:
                deadline = now + HANDOFF_TIMEOUT
            elif now > deadline:
                logger.warning("replay of %s: the journal did not catch up with the live stream"
                               " in %.0fs; going live", self.pattern, HANDOFF_TIMEOUT)
                return
            self._stop.wait(0.02)

    def _go_live(self) -> None:
        with self._lock:
            for msg in self._buffer:
                self._deliver(msg, "replay_live")
            self._buffer = []
            self._live = True
