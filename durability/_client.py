"""The node side of the journal: confirmed publishes, replay, replay-then-live subscribers.

A Node creates one :class:`JournalClient` the first time it needs one (``publish(...,
confirm=True)``, ``replay()``, ``subscribe(..., replay=...)``). Journals are found among the
node's peers by their services (``meshmq.journal.<id>.append``) and cover the topics they
subscribe to. Everything goes through the node's RPC. docs/JOURNAL.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import threading
import time
from collections import deque
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
#: After a failover, reading in the new journal resumes this many seconds (of its own receive
#: clock) before the last message delivered; messages delivered already are skipped by id.
FAILOVER_MARGIN = 2.0
#: When the new journal no longer knows the last message delivered, resume by the old
#: journal's clock minus this: the two journals' clocks are assumed to agree within it.
CLOCK_SKEW = 5.0
#: How long gap repair waits for a journal that lags the live stream to store the missing
#: messages before it counts them as unrepaired.
REPAIR_TIMEOUT = 5.0
_APPEND_SUFFIX = ".append"
_GONE = (PeerGone, NoPeerError, MeshTimeout)   # a journal died or does not answer: fail over
_LIVE = (None, "replay_live")   # delivery kinds whose seq gaps gap repair fills


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
        self._replayers: list[_DurableSubscriber] = []
        #: confirmed: confirm=True publishes acknowledged; confirm_resends: append calls
        #: repeated (journal gone or refusing); replayed: stored messages delivered by replay;
        #: replay_live / replay_skipped: live messages delivered / dropped as already replayed
        #: by replay-then-live subscribers; replay_failovers: replays moved to another journal
        #: mid-way; replay_buffer_dropped: live messages dropped from a full hand-off buffer
        #: (replay delivers them); repaired / gaps_unrepaired: missed messages recovered from a
        #: journal by gap repair / that no journal had.
        self.counters = {"confirmed": 0, "confirm_resends": 0, "replayed": 0, "replay_live": 0,
                         "replay_skipped": 0, "replay_failovers": 0,
                         "replay_buffer_dropped": 0, "repaired": 0, "gaps_unrepaired": 0}
        #: handler invocations by replay, hand-off or repair that raised (part of the node's
        #: ``handler_errors``)
        self.handler_errors = 0

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

    def wait_journal(self, what: str, timeout: float, exclude: frozenset[str] = frozenset()
                     ) -> PeerInfo:
        """The first journal covering ``what`` (not in ``exclude``), waiting up to ``timeout``
        for one to join."""
        found = self.node.wait_until(
            lambda: [j for j in self.journals(what) if j.id not in exclude],
            max(timeout, 0.0), f"a journal covering {what!r}")
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
        datetime/float time. Batches are pulled one at a time (the next one is fetched while
        the caller works through this one), so a slow reader holds at most two batches and the
        journal buffers nothing for it. ``pace="original"`` spaces the
        messages as they were published (by their timestamps); "fast" does not wait. If the
        journal dies mid-way, the replay continues from another journal covering ``pattern``.
        """
        check_pattern(pattern)
        if pace not in ("fast", "original"):
            raise ConfigError(f'pace must be "fast" or "original", not {pace!r}')
        start = since_value(since)
        end: Any = None
        if until is not None:
            end = until if isinstance(until, int) and not isinstance(until, bool) \
                else since_value(until)
        self.node._require_running()
        reader = _Reader(self, pattern, timeout)
        reader.open(start, end)
        messages = self._pull(reader, max(1, int(batch)))
        return _paced(messages) if pace == "original" else messages

    def _pull(self, reader: _Reader, batch: int) -> Iterator[Message]:
        """Yield the reader's messages. The next batch is fetched and decoded in a thread of
        its own while the caller works through this one: at most two batches are held."""
        counters = self.counters
        with concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="meshmq-replay-prefetch") as pool:
            ahead = pool.submit(reader.batch, batch)
            while True:
                records, at_end = ahead.result()
                if not at_end:
                    ahead = pool.submit(reader.batch, batch)
                for _, msg in records:
                    counters["replayed"] += 1
                    yield msg
                if at_end:
                    return

    # ---- replay-then-live and gap repair -------------------------------------------------------
    def replaying(self, spec: HandlerSpec, fn: Callable[..., Any]) -> Callable[[Message], None]:
        """Wrap a subscriber so that it first gets the stored messages, then the live ones, and
        (``repair``, the default with ``replay``) fetches messages it missed from a journal."""
        options = spec.options
        replay = options.get("replay")
        since = None if replay is None else since_value(replay)
        repair = bool(options.get("repair", since is not None))
        if is_async(fn):
            fn = _blocking(fn, self.node._handler_loop())
        wrapper = _DurableSubscriber(self, spec.name, since, repair, fn, self.node.max_pending)
        self._replayers.append(wrapper)
        if self.node.running:
            wrapper.start()
        return wrapper


def _blocking(fn: Callable[[Message], Any], loop: asyncio.AbstractEventLoop
              ) -> Callable[[Message], Any]:
    """Run an async handler on the node's handler loop and wait for it (one at a time, in
    order, as a replaying or repairing subscriber needs)."""
    def call(msg: Message) -> Any:
        return asyncio.run_coroutine_threadsafe(fn(msg), loop).result()
    call.__qualname__ = getattr(fn, "__qualname__", "handler")
    return call


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


class _Reader:
    """Reads ``pattern`` from one journal in batches; fails over to another when it dies.

    Offsets belong to one journal, so a failover resumes by message id: the new journal's
    ``lookup`` tells where the last delivered message is in its log, and reading resumes
    ``FAILOVER_MARGIN`` seconds of its receive clock before that (the journals may have
    interleaved senders differently). Messages delivered already are skipped by id. The end
    of a bounded replay moves over the same way (the id of the last record before the end).
    """

    def __init__(self, client: JournalClient, pattern: str, timeout: float) -> None:
        self.client = client
        self.node = client.node
        self.pattern = pattern
        self.timeout = timeout
        self.journal: PeerInfo | None = None
        self.dead: set[str] = set()
        self.offset = 0
        self.follow = False                       # no end: read until caught up, repeatedly
        self.until: int | None = None             # exclusive end offset in this journal
        self.until_time: float | None = None      # the end as a time (until=<datetime>)
        self.end_mark: tuple[str, float] | None = None   # id, time of the last record to read
        self.since: Any = "earliest"
        self.anchor: tuple[str, float] | None = None     # id, time of the first record
        self.last: tuple[str, float] | None = None       # id, time of the last record read
        # ids read recently, in batches: (newest time, ids); trimmed by time
        self._recent: deque[tuple[float, set[str]]] = deque()
        self._failed_over = False

    def _call(self, what: str, *args: Any, **kw: Any) -> Any:
        assert self.journal is not None
        engine = self.node.engine
        if engine is not None and self.journal.id not in engine.peers:
            # left already (goodbye or heartbeat timeout): a call would wait for it in vain
            raise PeerGone(f"journal {self.journal.name} ({self.journal.id}) left")
        return self.node.call(service_name(self.journal.id, what), *args,
                              timeout=self.timeout, **kw)

    def _position(self, since: Any) -> int:
        return int(self._call("read", 0, None, 0, 1, 1, since=since)["next"])

    def _first_record(self, offset: int, until: int | None) -> tuple[str, float] | None:
        res = self._call("read", offset, self.pattern, until, 1)
        if not res["records"]:
            return None
        _, t, payload = res["records"][0]
        return decode_entry(payload).id, float(t)

    def open(self, since: Any, until: Any, wait: float | None = None) -> None:
        """Position on ``since`` in the first journal covering the pattern (waiting up to
        ``wait`` s for one). ``until``: None (the journal's end now), "follow" (no end), an
        offset or a float time."""
        self.since = since
        self.follow = until == "follow"
        self.journal = self.client.wait_journal(self.pattern,
                                                self.timeout if wait is None else wait)
        while True:
            try:
                self.offset = self._position(since)
                if type(since) is int:
                    self.anchor = self._first_record(self.offset, None)
                if self.follow:
                    self.until = None
                elif until is None or type(until) is int:
                    self.until = self._position("latest") if until is None else until
                    if self.until > self.offset:
                        self.end_mark = self._first_record(self.until - 1, self.until)
                else:
                    self.until_time = float(until)
                    self.until = self._position(self.until_time)
                return
            except _GONE as exc:
                if type(since) is int or type(until) is int:
                    raise  # an offset names a place in that one journal
                self.dead.add(self.journal.id)
                self.journal = self._next_journal(exc)

    def _next_journal(self, exc: BaseException) -> PeerInfo:
        try:
            return self.client.wait_journal(self.pattern, self.timeout,
                                            frozenset(self.dead))
        except MeshTimeout:
            raise exc from None

    def batch(self, max_records: int) -> tuple[list[tuple[float, Message]], bool]:
        """The next records (journal time, message), and whether the end was reached."""
        while True:
            try:
                res = self._call("read", self.offset, self.pattern, self.until, max_records)
            except _GONE as exc:
                self._failover(exc)
                continue
            break
        out: list[tuple[float, Message]] = []
        recent = self._recent
        ids: set[str] = set()
        for _, t, payload in res["records"]:
            msg = decode_entry(payload)
            if self._failed_over and any(msg.id in batch_ids for _, batch_ids in recent):
                continue   # read before the failover
            ids.add(msg.id)
            out.append((t, msg))
        if out:
            t, msg = out[-1]
            self.last = (msg.id, float(t))
            recent.append((float(t), ids))
            horizon = float(t) - FAILOVER_MARGIN - CLOCK_SKEW
            while len(recent) > 1 and recent[0][0] < horizon:
                recent.popleft()
        nxt = int(res["next"])
        progressed = nxt > self.offset
        self.offset = nxt
        end = int(res["end"]) if self.until is None else self.until
        return out, nxt >= end or not (progressed or out)

    def positions(self, keys: list[list[str]]) -> list[int]:
        """The journal's highest stored seq per [source_id, topic] (the hand-off check)."""
        while True:
            try:
                return [int(s) for s in self._call("positions", keys)]
            except _GONE as exc:
                self._failover(exc)

    def _failover(self, exc: BaseException) -> None:
        """The journal died or stopped answering: move to another one covering the pattern."""
        assert self.journal is not None
        while True:
            self.dead.add(self.journal.id)
            old = self.journal
            self.journal = self._next_journal(exc)
            logger.warning("replay of %s: journal %s (%s) failed (%s); continuing from %s (%s)",
                           self.pattern, old.name, old.id, exc, self.journal.name,
                           self.journal.id)
            try:
                self._resume()
            except _GONE as again:
                exc = again
                continue
            self.client.counters["replay_failovers"] += 1
            self._failed_over = True
            return

    def _resume(self) -> None:
        mark = self.last or self.anchor
        if mark is not None:
            found = self._call("lookup", [mark[0]])[0]
            margin = FAILOVER_MARGIN if self.last is not None else 0.0
            since: Any = float(found[1]) - margin if found else mark[1] - CLOCK_SKEW
        elif type(self.since) is int:
            since = "earliest"   # nothing read yet at an offset of the old journal: from the
            #                      start, skipping nothing (the anchor was not found either)
        else:
            since = self.since
        if self.follow:
            self.until = None
        elif self.until_time is not None:
            self.until = self._position(self.until_time)
        elif self.end_mark is not None:
            found = self._call("lookup", [self.end_mark[0]])[0]
            self.until = int(found[0]) + 1 if found else self._position(self.end_mark[1])
        else:
            self.until = self._position("latest")
        self.offset = self._position(since)


class _DurableSubscriber:
    """A subscriber with replay-then-live and/or gap repair around the user's handler.

    Replay-then-live: live messages are buffered while replaying, then handed off with no gap
    and no duplicate. Hand-off rule: for every (sender, topic) seen live, the journal must have
    stored up to the seq before the first buffered live one (``positions``); then everything up
    to the journal's end is replayed, and buffered live messages are delivered unless replay
    already did (per-sender-and-topic seq). The buffer is bounded (``max_buffer``): past it the
    oldest buffered message is dropped and the hand-off also waits until the journal has it
    (so replay delivers it).

    Gap repair: a live message whose seq skips some after the last one delivered from that
    sender and topic (dropped at a high-water mark or a full handler queue) first has the
    missing ones fetched from a journal and delivered, in order.

    The handler is never called from two threads at once.
    """

    def __init__(self, client: JournalClient, pattern: str, since: Any, repair: bool,
                 fn: Callable[[Message], Any], max_buffer: int) -> None:
        self.client = client
        self.pattern = pattern
        self.since = since
        self.repair = repair
        self.fn = fn
        self.max_buffer = max(1, max_buffer)
        self.__qualname__ = getattr(fn, "__qualname__", "handler")
        self._lock = threading.Lock()
        self._live = since is None or since == "latest"
        self._buffer: deque[Message] = deque()
        self._need: dict[tuple[str, str], int] = {}   # dropped from the buffer: replay must
        self._seen: dict[tuple[str, str], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counters = client.counters

    def __call__(self, msg: Message) -> None:
        if not self._live:
            with self._lock:
                if not self._live:
                    self._buffer.append(msg)
                    if len(self._buffer) > self.max_buffer:
                        old = self._buffer.popleft()
                        key = (old.source_id, old.topic)
                        self._need[key] = max(self._need.get(key, 0), old.seq)
                        self._counters["replay_buffer_dropped"] += 1
                    return
        self._deliver(msg, "replay_live" if self.since is not None else None)

    def _deliver(self, msg: Message, kind: str | None) -> None:
        key = (msg.source_id, msg.topic)
        last = self._seen.get(key, 0)
        seq = msg.seq
        if seq <= last:
            self._counters["replay_skipped"] += 1
            return
        if self.repair and last and seq > last + 1 and kind in _LIVE:
            self._repair(key, last + 1, seq - 1)
        self._seen[key] = seq
        if kind is not None:
            self._counters[kind] += 1
        self.fn(msg)

    def _deliver_safely(self, msg: Message, kind: str) -> None:
        """_deliver for replay, hand-off and repair: a handler error is logged and counted,
        and the rest go on (live messages get that from their runner)."""
        try:
            self._deliver(msg, kind)
        except Exception:  # noqa: BLE001 - the handler's bug must not stop replay or repair
            self.client.handler_errors += 1
            logger.exception("handler %s raised on message %s", self.__qualname__, msg.id)

    # ---- gap repair --------------------------------------------------------------------------
    def _repair(self, key: tuple[str, str], first: int, last: int) -> None:
        """Fetch and deliver seqs first..last of ``key`` from a journal, in order."""
        source_id, topic = key
        node = self.client.node
        deadline = time.monotonic() + REPAIR_TIMEOUT
        want = first
        dead: set[str] = set()
        while want <= last and not self._stop.is_set():
            journals = [j for j in self.client.journals(topic) if j.id not in dead]
            if not journals:
                break
            journal = journals[0]
            try:
                res = node.call(service_name(journal.id, "fetch"), source_id, topic, want, last,
                                timeout=max(0.5, deadline - time.monotonic()))
            except _GONE:
                dead.add(journal.id)
                continue
            except RemoteError as exc:  # an older journal without fetch, or a refusal
                logger.warning("gap repair from %s failed: %s", journal.name, exc)
                dead.add(journal.id)
                continue
            records = res["records"]
            if records:   # progress: the timeout is for a journal that lags, not for paging
                deadline = time.monotonic() + REPAIR_TIMEOUT
            for _, _, payload in records:
                msg = decode_entry(payload)
                if msg.seq < want or msg.seq > last:
                    continue
                self._lost(topic, msg.seq - want)    # the journal missed those too
                want = msg.seq + 1
                self._deliver_safely(msg, "repaired")
            if want > last:
                return
            if len(records) >= 1000:
                continue    # more pages
            if int(res["stored"]) >= last or time.monotonic() >= deadline:
                break       # the journal will not get them (or not in time)
            self._stop.wait(0.01)   # the journal lags the live stream: ask again shortly
        self._lost(topic, last - want + 1)

    def _lost(self, topic: str, count: int) -> None:
        if count > 0:
            self._counters["gaps_unrepaired"] += count
            logger.warning("gap repair on %s: %d message(s) could not be recovered from a "
                           "journal", topic, count)

    # ---- replay-then-live ----------------------------------------------------------------------
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
        except (NodeClosed, PeerGone, NoPeerError, MeshTimeout) as exc:
            if not self._stop.is_set():
                logger.warning("replay of %s ended early (%s); going live", self.pattern, exc)
        except Exception:  # noqa: BLE001 - a replay failure must not lose the live stream
            logger.exception("replay of %s failed; going live", self.pattern)
        finally:
            self._go_live()

    def _replay_batch(self, reader: _Reader) -> bool:
        records, at_end = reader.batch(1000)
        for _, msg in records:
            if self._stop.is_set():
                return True
            self._deliver_safely(msg, "replayed")
        return at_end

    def _replay(self) -> None:
        reader = _Reader(self.client, self.pattern, 5.0)
        reader.open(self.since, "follow", wait=30.0)
        deadline: float | None = None
        while not self._stop.is_set():
            if not self._replay_batch(reader):
                continue
            # Caught up with the journal: has it got everything before the live stream?
            with self._lock:
                need = dict(self._need)
                for m in self._buffer:
                    k = (m.source_id, m.topic)
                    need[k] = max(need.get(k, 0), m.seq - 1)
            keys = list(need)
            stored = reader.positions([list(k) for k in keys]) if keys else []
            if all(s >= need[k] for k, s in zip(keys, stored, strict=True)):
                # Everything before the first live messages is stored: read to the end once
                # more (it may have grown since the check), then hand off.
                while not self._replay_batch(reader) and not self._stop.is_set():
                    pass
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
            while self._buffer:
                self._deliver_safely(self._buffer.popleft(), "replay_live")
            self._need.clear()
            self._live = True
