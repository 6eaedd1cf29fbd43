"""The journal node: a Node that stores every message of its topic patterns in a Log.

::

    journal = Journal("./data", ["orders.>"], fsync="always", peers=[...])
    journal.run()          # or start() / stop(); `meshmq journal` runs this

It subscribes like any peer, and also serves three RPC services named after its node id (so a
caller can pin one journal): ``meshmq.journal.<id>.append`` (a publisher's confirm=True path:
answers once the message is durable), ``.read`` (batches for replay, pulled by the reader:
flow control), ``.positions`` (last stored seq per sender and topic: the replay hand-off),
``.fetch`` (messages of one sender and topic by seq: gap repair) and ``.lookup`` (where a
message id is in this journal: replay failover from another journal).
One writer thread owns every append; readers share the log under one lock. docs/JOURNAL.md.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import logging
import math
import os
import queue
import signal
import threading
import time
from array import array
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable
from typing import Any, cast

from meshmq._errors import ConfigError, DecodeError, StorageError
from meshmq._message import Message
from meshmq._node import Node
from meshmq._timing import Timing
from meshmq._topics import check_pattern, matcher

from ._config import DEFAULT_SEGMENT_BYTES
from ._entry import decode_entry, encode_entry, entry_topic
from ._fileio import FatalStorageError
from ._log import Log
from ._record import Record

__all__ = ["SERVICE_PREFIX", "Journal", "service_name"]

logger = logging.getLogger("meshmq.durability")

SERVICE_PREFIX = "meshmq.journal."
#: Records (and bytes) one read call returns at most: the unit of replay flow control.
MAX_READ_RECORDS = 5_000
MAX_READ_BYTES = 4 << 20
#: Messages one fetch call (gap repair) returns at most.
MAX_FETCH_RECORDS = 1_000
#: A confirm=True append that overtook earlier messages of its sender still on their way by
#: pub/sub waits this long for them, so that the log keeps each sender's order.
REORDER_HOLD = 0.1
_STOP: Any = object()
_Item = tuple[str, str, int, str, bytes, "concurrent.futures.Future[int] | None"]


def service_name(journal_id: str, what: str) -> str:
    """The RPC service ``what`` ("append", "read", "positions") of journal node ``journal_id``."""
    return f"{SERVICE_PREFIX}{journal_id}.{what}"


class Journal:
    """A journal node over the log in ``directory``, storing messages matching ``topics``."""

    def __init__(self, directory: str | os.PathLike[str], topics: Iterable[str], *,
                 fsync: str = "always", name: str = "journal", peers: list[str] | None = None,
                 host: str | None = None, port: int = 0, discovery: str | None = None,
                 timing: Timing | None = None, segment_bytes: int = DEFAULT_SEGMENT_BYTES,
                 retention_seconds: float | None = None, retention_bytes: int | None = None,
                 dedup_window: int = 100_000, **node_options: Any) -> None:
        self.topics = [check_pattern(t) for t in topics]
        if not self.topics:
            raise ConfigError("a journal needs at least one topic pattern")
        if dedup_window < 1:
            raise ConfigError(f"dedup_window must be >= 1, got {dedup_window!r}")
        self.log = Log.open(directory, fsync=fsync, segment_bytes=segment_bytes,
                            retention_seconds=retention_seconds, retention_bytes=retention_bytes)
        if host is not None:
            node_options["host"] = host
        self.node = Node(name, peers=peers, port=port, discovery=discovery, timing=timing,
                         **node_options)
        self._lock = threading.Lock()          # the Log is not thread-safe
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._window = dedup_window
        self._ids: OrderedDict[str, int] = OrderedDict()   # message id -> offset (recent)
        self._last_seq: dict[tuple[str, str], int] = {}    # (source_id, topic) -> last seq
        # (source_id, topic) -> (seqs, offsets), ascending, for the last ``dedup_window``
        # records: gap repair looks messages up by seq. Arrays: 16 bytes per record.
        self._seq_index: dict[tuple[str, str], tuple[array[int], array[int]]] = {}
        self._indexed = 0
        self._index_lock = threading.Lock()   # the writer adds, fetch calls read
        self._waiting: deque[tuple[int, concurrent.futures.Future[int]]] = deque()
        self._held: list[_Item] = []            # appends waiting for earlier messages
        self._hold_until: dict[str, float] = {}  # message id -> when to store it anyway
        self._writer: threading.Thread | None = None
        self.error: BaseException | None = None   # a fatal storage error: the process must go
        self.failed = threading.Event()
        self.counters = {"stored": 0, "duplicates": 0, "acks": 0, "append_errors": 0,
                         "bytes_in": 0}
        try:
            self._rebuild_dedup()
        except BaseException:
            self.log.close()
            raise
        for pattern in self.topics:
            self.node.subscribe(pattern)(self._on_message)
        jid = self.node.id
        self.node.rpc(service_name(jid, "append"), concurrency=1024)(self._rpc_append)
        self.node.rpc(service_name(jid, "read"), concurrency=4)(self._rpc_read)
        self.node.rpc(service_name(jid, "positions"), concurrency=4)(self._rpc_positions)
        self.node.rpc(service_name(jid, "fetch"), concurrency=4)(self._rpc_fetch)
        self.node.rpc(service_name(jid, "lookup"), concurrency=4)(self._rpc_lookup)

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Journal:
        """Start the writer, then the node (subscriptions and services). Returns self."""
        if self._writer is not None:
            return self
        self._writer = threading.Thread(target=self._write_loop, name="meshmq-journal-writer",
                                        daemon=True)
        self._writer.start()
        try:
            self.node.start()
        except BaseException:
            self.stop()
            raise
        logger.info("journal %s on %s: %s, fsync=%s, offsets %d..%d", self.node.name,
                    self.log.directory, ", ".join(self.topics), self._fsync_text(),
                    self.log.first_offset, self.log.next_offset)
        return self

    def stop(self) -> None:
        """Stop receiving, store what was queued, sync and close the log. Idempotent."""
        self.node.stop()
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(30)
            self._writer = None
        with self._lock:
            try:
                self.log.close()
            except StorageError as exc:
                self._fatal(exc)
        self._fail_waiting(StorageError(5, "journal stopped"))

    def run(self, progress: Callable[[Journal], None] | None = None,
            every: float = 1.0) -> None:
        """Run until SIGINT/SIGTERM (calling ``progress`` every ``every`` s); then stop.

        A fatal storage error stops the journal and is re-raised here.
        """
        self.start()
        done = threading.Event()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda *_: done.set())
        try:
            engine = self.node.engine
            while not done.wait(every):
                if self.failed.is_set() or engine is None or engine.stopped.is_set():
                    break
                if progress is not None:
                    progress(self)
        finally:
            for prev_sig, handler in previous.items():
                signal.signal(prev_sig, handler)
            self.stop()
        if self.error is not None:
            raise self.error
        if engine is not None and engine.error is not None:
            raise engine.error

    def __enter__(self) -> Journal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """The journal node's control endpoint."""
        return self.node.address

    def _fsync_text(self) -> str:
        cfg = self.log.config
        return f"interval={cfg.interval * 1000:g}" if cfg.mode == "interval" else cfg.mode

    def stats(self) -> dict[str, Any]:
        """The log's stats plus the journal's counters."""
        with self._lock:
            out: dict[str, Any] = dict(self.log.stats())
        out.update(self.counters)
        out["senders"] = len(self._last_seq)
        return out

    # ---- input -------------------------------------------------------------------------------
    def _on_message(self, msg: Message) -> None:
        """A message from the subscription: store it (no one waits for it)."""
        self._queue.put((msg.id, msg.source_id, msg.seq, msg.topic, encode_entry(msg), None))

    async def _rpc_append(self, entry: bytes) -> int:
        """confirm=True: store the entry (unless stored already) and answer once it is durable."""
        import asyncio

        if type(entry) is not bytes:
            raise DecodeError("append takes the bytes of a journal entry")
        msg = decode_entry(entry)
        if not any(matcher(p)(msg.topic) for p in self.topics):
            raise ConfigError(f"this journal does not cover {msg.topic!r}")
        if self.error is not None:
            raise StorageError(5, f"journal failed: {self.error}")
        fut: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._queue.put((msg.id, msg.source_id, msg.seq, msg.topic, entry, fut))
        return await asyncio.wrap_future(fut)

    # ---- the writer ----------------------------------------------------------------------------
    def _rebuild_dedup(self) -> None:
        """Load the ids and positions of the last ``dedup_window`` records."""
        log = self.log
        start = max(log.first_offset, log.next_offset - self._window)
        bad = 0
        for record in log.read(start):
            try:
                msg = decode_entry(record.payload)
            except DecodeError:
                bad += 1
                continue
            self._remember(msg.id, record.offset, msg.source_id, msg.topic, msg.seq)
        if bad:
            logger.warning("%d records of %s are not journal entries", bad, log.directory)

    def _remember(self, msg_id: str, offset: int, source_id: str, topic: str, seq: int) -> None:
        ids = self._ids
        ids[msg_id] = offset
        if len(ids) > self._window:
            ids.popitem(last=False)
        key = (source_id, topic)
        if seq > self._last_seq.get(key, 0):
            self._last_seq[key] = seq
        with self._index_lock:
            entry = self._seq_index.get(key)
            if entry is None:
                entry = self._seq_index[key] = (array("q"), array("q"))
            seqs, offsets = entry
            if not seqs or seq > seqs[-1]:
                seqs.append(seq)
                offsets.append(offset)
            else:  # out of order (a confirm resend overtaking pub/sub): keep the index sorted
                i = bisect.bisect_left(seqs, seq)
                if i < len(seqs) and seqs[i] == seq:
                    return
                seqs.insert(i, seq)
                offsets.insert(i, offset)
            self._indexed += 1
            if self._indexed > 2 * self._window:
                self._prune_index(offset + 1 - self._window)

    def _prune_index(self, floor: int) -> None:
        """Forget index entries of records below offset ``floor`` (index lock held)."""
        total = 0
        for key in list(self._seq_index):
            seqs, offsets = self._seq_index[key]
            keep = [i for i, off in enumerate(offsets) if off >= floor]
            if not keep:
                del self._seq_index[key]
                continue
            if len(keep) < len(offsets):
                self._seq_index[key] = (array("q", (seqs[i] for i in keep)),
                                        array("q", (offsets[i] for i in keep)))
            total += len(keep)
        self._indexed = total

    def _write_loop(self) -> None:
        q = self._queue
        log = self.log
        interval = log.config.interval if log.config.mode == "interval" else 0.0
        next_retention = time.monotonic() + 1.0
        stopping = False
        while not stopping:
            wait = interval if (interval and self._waiting) else 0.25
            if self._held:
                wait = min(wait, REORDER_HOLD / 4)
            try:
                first = q.get(timeout=wait)
            except queue.Empty:
                first = None
            batch: list[_Item] = []
            item = first
            while item is not None:
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
                if len(batch) >= 10_000:
                    break
                try:
                    item = q.get_nowait()
                except queue.Empty:
                    item = None
            if self.error is not None:
                for it in batch:
                    if it[5] is not None and not it[5].done():
                        it[5].set_exception(StorageError(5, f"journal failed: {self.error}"))
                continue
            try:
                if batch or self._held:
                    self._store(batch, flush=stopping)
                now = time.monotonic()
                if interval:
                    with self._lock:
                        log.maybe_sync(now)
                if now >= next_retention:
                    next_retention = now + 1.0
                    with self._lock:
                        log.apply_retention(time.time())
            except FatalStorageError as exc:
                self._fatal(exc)
            except StorageError as exc:
                logger.error("journal %s: %s", log.directory, exc)
            self._ack_durable()

    def _store(self, batch: list[_Item], flush: bool = False) -> None:
        """Append the new messages of ``batch`` in one write; settle or park every future.

        An append (confirm=True) whose sender's earlier messages are not stored yet is held
        for up to ``REORDER_HOLD`` s (they are usually still on their way by pub/sub), so
        that the log, and every replay, keeps each sender's order per topic.
        """
        log = self.log
        ids = self._ids
        fresh: dict[str, int] = {}
        items: list[tuple[bytes, float]] = []
        rows: list[_Item] = []
        dups: list[tuple[str, concurrent.futures.Future[int]]] = []
        next_offset = log.next_offset
        now = time.time()
        if self._held:   # after the new items, which may be the ones they wait for
            batch = batch + self._held
            self._held = []
        clock = time.monotonic()
        hold = self._hold_until
        expected: dict[tuple[str, str], int] = {}
        for it in batch:
            msg_id = it[0]
            if msg_id in ids or msg_id in fresh:
                self.counters["duplicates"] += 1
                hold.pop(msg_id, None)
                if it[5] is not None:
                    dups.append((msg_id, it[5]))
                continue
            key = (it[1], it[3])
            nxt = expected.get(key)
            if nxt is None:
                nxt = self._last_seq.get(key, 0) + 1
            if it[5] is not None and it[2] > nxt and not flush and \
                    clock < hold.setdefault(msg_id, clock + REORDER_HOLD):
                self._held.append(it)
                continue
            hold.pop(msg_id, None)
            expected[key] = max(nxt, it[2] + 1)
            fresh[msg_id] = next_offset + len(items)
            items.append((it[4], now))
            rows.append(it)
        if items:
            try:
                with self._lock:
                    first = log.append_many(items)[0]
            except StorageError as exc:
                self.counters["append_errors"] += 1
                for it in rows:
                    if it[5] is not None and not it[5].done():
                        it[5].set_exception(exc)
                for msg_id, fut in dups:
                    if msg_id in fresh and not fut.done():
                        fut.set_exception(exc)
                if isinstance(exc, FatalStorageError):
                    raise
                logger.error("journal %s: append of %d messages refused: %s", log.directory,
                             len(items), exc)
                dups = [(m, f) for m, f in dups if m not in fresh]
                items, rows = [], []
            else:
                for i, it in enumerate(rows):
                    self._remember(it[0], first + i, it[1], it[3], it[2])
                    if it[5] is not None:
                        self._waiting.append((first + i, it[5]))
                    self.counters["bytes_in"] += len(it[4])
                self.counters["stored"] += len(rows)
        for msg_id, fut in dups:
            offset = ids.get(msg_id)
            if offset is not None:
                self._waiting.append((offset, fut))

    def _ack_durable(self) -> None:
        waiting = self._waiting
        if not waiting:
            return
        durable = self.log.durable_offset
        keep: deque[tuple[int, concurrent.futures.Future[int]]] = deque()
        while waiting:
            offset, fut = waiting.popleft()
            if offset < durable:
                if not fut.done():
                    fut.set_result(offset)
                    self.counters["acks"] += 1
            else:
                keep.append((offset, fut))
        self._waiting = keep

    def _fail_waiting(self, exc: BaseException) -> None:
        while self._waiting:
            _, fut = self._waiting.popleft()
            if not fut.done():
                fut.set_exception(exc)

    def _fatal(self, exc: BaseException) -> None:
        """An fsync failed: acknowledge nothing more, and stop the node (the process exits)."""
        if self.error is None:
            self.error = exc
            logger.critical("journal %s: fatal storage error, stopping: %s",
                            self.log.directory, exc)
        self._fail_waiting(exc)
        self.failed.set()   # run() stops the journal and re-raises self.error

    # ---- reading -----------------------------------------------------------------------------
    def _rpc_read(self, start: int, pattern: str | None = None, until: int | None = None,
                  max_records: int = 1000, max_bytes: int = 1 << 20,
                  since: Any = None) -> dict[str, Any]:
        """A batch of stored records from ``start`` (or from ``since``) for a replaying reader.

        ``since``, if given, replaces ``start``: "earliest", "latest", an offset, or a float
        time (the journal's receive clock). Returns records ``[offset, time, entry bytes]``,
        ``next`` (where the following call starts), ``end`` (the log's end then) and ``first``.
        """
        match = matcher(check_pattern(pattern)) if pattern else None
        if pattern is not None and (pattern == ">" or self.topics == [pattern]):
            match = None   # everything stored matches: no need to look at each topic
        max_records = max(1, min(int(max_records), MAX_READ_RECORDS))
        max_bytes = max(1, min(int(max_bytes), MAX_READ_BYTES))
        scan_limit = max_records * 20   # bound the work a sparse pattern can cause per call
        log = self.log
        out: list[list[Any]] = []
        size = scanned = 0
        with self._lock:
            if since is not None:
                start = self._locate(since)
            end = log.next_offset if until is None else min(int(until), log.next_offset)
            nxt = max(int(start), log.first_offset)
            records = cast(Generator[Record, None, None], log.read(nxt, end))
            try:
                for record in records:
                    nxt = record.offset + 1
                    scanned += 1
                    if match is None or match(entry_topic(record.payload)):
                        out.append([record.offset, record.timestamp, record.payload])
                        size += len(record.payload)
                        if len(out) >= max_records or size >= max_bytes:
                            break
                    if scanned >= scan_limit:
                        break
                else:
                    nxt = max(nxt, end)
            finally:
                records.close()
            return {"records": out, "next": nxt, "end": end, "first": log.first_offset}

    def _locate(self, since: Any) -> int:
        log = self.log
        if since == "earliest" or since is None:
            return log.first_offset
        if since == "latest":
            return log.next_offset
        if type(since) is int:
            return since
        if type(since) is float and not math.isnan(since):
            return log.offset_for_time(since)
        raise ConfigError(f"since must be 'earliest', 'latest', an offset or a time: {since!r}")

    def _rpc_positions(self, keys: list[list[str]]) -> list[int]:
        """For each [source_id, topic], the highest seq stored (0 if none)."""
        last = self._last_seq
        return [last.get((str(k[0]), str(k[1])), 0) for k in keys]

    def _rpc_fetch(self, source_id: str, topic: str, first_seq: int, last_seq: int,
                   max_records: int = MAX_FETCH_RECORDS) -> dict[str, Any]:
        """Gap repair: the stored messages of one sender and topic with first <= seq <= last.

        Returns ``records`` (``[offset, time, entry]``, by seq), ``stored`` (the highest seq
        stored for that sender and topic: a reader whose gap ends above it may ask again
        later) and ``floor`` (the lowest seq still indexed; older ones are out of the window).
        """
        key = (str(source_id), str(topic))
        first, last = int(first_seq), int(last_seq)
        limit = max(1, min(int(max_records), MAX_FETCH_RECORDS))
        with self._index_lock:
            entry = self._seq_index.get(key)
            if entry is None:
                wanted: list[int] = []
                floor = None
            else:
                seqs, offsets = entry
                lo = bisect.bisect_left(seqs, first)
                hi = min(bisect.bisect_right(seqs, last), lo + limit)
                wanted = list(offsets[lo:hi])
                floor = seqs[0] if seqs else None
        out: list[list[Any]] = []
        with self._lock:
            if wanted and max(wanted) - min(wanted) < 4 * len(wanted) + 64:
                # dense (one sender dominates the stretch): one pass over the range
                keep = set(wanted)
                found = {r.offset: [r.offset, r.timestamp, r.payload]
                         for r in self.log.read(min(wanted), max(wanted) + 1)
                         if r.offset in keep}
                out = [found[o] for o in wanted if o in found]   # by seq, as indexed
            else:
                for offset in wanted:
                    out.extend([r.offset, r.timestamp, r.payload]
                               for r in self.log.read(offset, offset + 1))
        return {"records": out, "stored": self._last_seq.get(key, 0), "floor": floor}

    def _rpc_lookup(self, ids: list[str]) -> list[list[Any] | None]:
        """For each message id, ``[offset, time]`` in this journal, or None if it is not among
        the last ``dedup_window`` records (replay failover resumes from there)."""
        out: list[list[Any] | None] = []
        with self._lock:
            for msg_id in ids:
                offset = self._ids.get(str(msg_id))
                found = list(self.log.read(offset, offset + 1)) if offset is not None else []
                out.append([found[0].offset, found[0].timestamp] if found else None)
        return out

