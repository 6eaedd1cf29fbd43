"""Pipelines: fair, credit-based dispatch of tasks to workers, with acks, redelivery, dead letters.

The pushing node owns its tasks until a worker acknowledges them. State lives on the node's I/O
thread; ``push`` (any thread) only hands a task over. A worker advertises, per queue, how many
tasks it takes at once (its credit) and how many failures a task may have; the pusher sends a
task only to a worker with free credit (fair dispatch: a slow worker gets fewer), keeps it until
the worker's handler returns, and on a failure, or when the worker dies (heartbeat timeout or
goodbye), delivers it again with ``attempt`` incremented. Delivery is at-least-once.

Per task, the hot path is kept to a few dict operations: ``push`` appends to an inbox and wakes
the I/O thread only when it is not already due to drain it; tasks going to one worker at once
travel in one ``tasks`` message, and completions a worker's handlers finish while its I/O thread
is busy go back in one ``acks`` message (each still only after its handler returned). Both
batched forms go only to peers known to accept them (docs/PROTOCOL.md 12.8); everything else
uses the single ``task`` / ``ack`` forms. On the working side a sync handler's tasks wait in a
FIFO that "drainer" jobs of the worker's pool empty, started one at a time as handlers are
entered (``Pipelines._drainer``), rather than as one pool job each.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshmq.patterns._pool import Pool, describe_error

from meshmq._codec import decode, encode
from meshmq._dispatch import HandlerSpec, is_async
from meshmq._envelope import message_ids
from meshmq._errors import Backpressure, ConfigError, DecodeError, EncodeError, MeshTimeout
from meshmq._message import Message, wire_message
from meshmq._peers import PeerInfo
from meshmq._topics import MAX_TOPIC_BYTES, check_topic

if TYPE_CHECKING:
    from meshmq._node import Node

__all__ = ["Pipelines"]

log = logging.getLogger("meshmq")
DEFAULT_PREFETCH = 4  # tasks a worker holds beyond those running, until it has measured them
# Adaptive prefetch (a worker given no explicit prefetch): it holds about PREFETCH_BUDGET
# seconds of work beyond what runs, judged from its handlers' measured time, between 0 and
# MAX_AUTO_PREFETCH tasks; re-judged every RETUNE_SECONDS. Slow tasks get no prefetch (fair
# dispatch), short ones a deep window (the pusher and worker otherwise take turns per window).
PREFETCH_BUDGET = 0.02
MAX_AUTO_PREFETCH = 128
RETUNE_SECONDS = 0.25
KEY_SCAN = 10_000   # how deep dispatch looks past tasks whose key's worker is busy
BATCH_BYTES = 256 * 1024   # a tasks/acks message carries at most about this much
BATCH_ACKS = 4096          # ... and at most this many ids
_TASK_OVERHEAD = 24        # msgpack framing of one entry of a tasks message, rounded up


class _Task:
    """A task this node pushed, from push() until it is finished."""

    __slots__ = ("id", "queue", "body", "headers", "key", "order", "deliveries", "failures",
                 "errors", "worker", "on_done", "size")

    def __init__(self, tid: str, queue: str, body: bytes, headers: dict[str, Any], key: Any,
                 order: int, on_done: Callable[[], None] | None, size: int) -> None:
        self.id = tid
        self.queue = queue
        self.body = body                 # msgpack of the body, encoded once at push()
        self.headers = headers
        self.key = key
        self.order = order
        self.deliveries = 0
        self.failures = 0
        self.errors: list[dict[str, Any]] | None = None
        self.worker: str | None = None
        # Called on the I/O thread once the task is finished (acknowledged or dead-lettered):
        # an emitted task acknowledges the task that produced it only then (chained acks).
        self.on_done = on_done
        self.size = size                 # bytes it adds to a tasks message, about


@dataclass
class _Queue:
    backlog: deque[_Task] = field(default_factory=deque)
    inflight: dict[str, _Task] = field(default_factory=dict)
    keys_inflight: set[Any] = field(default_factory=set)
    per_worker: dict[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _LocalWorker:
    pool: Pool
    concurrency: int
    credit: int       # concurrency + prefetch: tasks a pusher may have in flight here
    max_attempts: int
    emit: str | None
    adaptive: bool = False   # no prefetch was given: it follows the handler's measured time
    next_retune: float = 0.0
    measured: tuple[float, int] = (0.0, 0)   # (busy, done) below, at the last retune
    # A sync handler's tasks wait here, not in the pool's backlog: the pool runs "drainers",
    # jobs that each take tasks from ``ready`` until it is empty (see Pipelines._drainer).
    # ``drainers`` counts those submitted and not finished, ``free`` those of them not inside
    # the handler (started or not). Under ``lock``, except that the I/O thread appends to
    # ``ready`` first and then looks (in _start).
    threaded: bool = True
    ready: deque[Message] = field(default_factory=deque)
    lock: threading.Lock = field(default_factory=threading.Lock)
    drainers: int = 0
    free: int = 0
    # seconds in the handler and tasks run, added without a lock by the threads that ran
    # them (a lost update only blurs the adaptive prefetch's estimate, which reads them)
    busy: float = 0.0
    done: int = 0


class Pipelines:
    """The pipeline pattern, plugged into a Node."""

    def __init__(self, node: Node, max_backlog: int) -> None:
        self.node = node
        self.max_backlog = max_backlog
        self.workers: dict[str, _LocalWorker] = {}
        self.queues: dict[str, _Queue] = {}
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)   # entered through _lock on hot paths
        self._outstanding: dict[str, int] = {}
        self._waiters = 0     # threads blocked in push() or wait_done(), under _cv
        # A full queue lets pushers in again once it has drained to this level, not at every
        # ack: one wake-up per batch instead of a GIL ping-pong per task.
        self._resume_at = max(0, max_backlog - max(1, max_backlog // 8))
        # Task ids "<node id>-t<hex counter>", made under _lock: the generator behind
        # message_ids is not safe to advance from two threads at once.
        self._tids = message_ids(f"{node.id}-t")
        self._order = itertools.count()
        self._queue_ok: set[str] = set()      # queue names push() has already checked
        # Hand-offs to the I/O thread. Any thread appends; the I/O thread pops until empty.
        # ``*_armed`` is True while a drain is already due: appenders then skip the wake-up
        # (the drain clears it before it pops, so nothing appended is ever left behind).
        self._inbox: deque[_Task] = deque()
        self._inbox_armed = False
        self._outbox: deque[tuple[str, str, str, bool, Any]] = deque()   # finished handlers
        self._acked_out: deque[Message] = deque()   # plain successes (the common case)
        self._outbox_armed = False
        # I/O thread only: peers known to accept the batched forms (12.8), and the workers of
        # each queue with their credit (rebuilt when peers or local workers change).
        self._batch_workers: set[str] = set()    # sent us an ack with "bt", or an "acks"
        self._batch_pushers: set[str] = set()    # sent us a "tasks"
        self._caps: dict[str, tuple[dict[str, int], list[str]]] = {}
        self.counters = {"tasks_pushed": 0, "tasks_completed": 0, "tasks_redelivered": 0,
                         "tasks_failed": 0, "deadlettered": 0, "late_acks": 0,
                         "backpressure_rejects": 0, "tasks_worked": 0}

    # ---- plugin hooks -----------------------------------------------------------------------
    def bind(self, node: Node, spec: HandlerSpec, fn: Callable[..., Any]) -> bool:
        if spec.kind != "worker":
            return False
        opts = spec.options
        threaded = not is_async(fn)
        label, concurrency = f"worker-{spec.name}", opts["concurrency"]
        # A sync handler's pool runs drainers (no arguments), an async one each task itself.
        job: Callable[..., Any] = fn
        if threaded:
            def job() -> None:
                self._drainer(lw, fn)
        lw = _LocalWorker(Pool(job, label, concurrency, node._handler_loop), concurrency,
                          concurrency + opts["prefetch"], opts["max_attempts"], opts.get("emit"),
                          bool(opts.get("auto_prefetch")), time.monotonic() + RETUNE_SECONDS,
                          threaded=threaded)
        self.workers[spec.name] = lw
        if node.engine is not None:
            node.engine.call(lambda: self._workers_changed(spec.name))
        return True

    def offer_fields(self) -> dict[str, Any]:
        return {"wq": {q: [w.credit, w.max_attempts] for q, w in self.workers.items()}}

    def start(self, node: Node) -> None:
        pass

    def stop(self, node: Node) -> None:
        with self._cv:
            self._cv.notify_all()   # blocked pushers and waiters see the node stopping
        for w in self.workers.values():
            w.pool.close(0.5)

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        out["tasks_backlog"] = sum(len(q.backlog) for q in self.queues.values())
        out["tasks_inflight"] = sum(len(q.inflight) for q in self.queues.values())
        out["worker_credit"] = {q: w.credit for q, w in self.workers.items()}
        return out

    def _retune(self, now: float) -> None:
        """Adaptive prefetch (I/O thread): set each measuring worker's credit to its
        concurrency plus about PREFETCH_BUDGET seconds of its handler's work, and tell peers
        when that moved by a quarter or more."""
        changed = False
        for w in self.workers.values():
            if not w.adaptive or now < w.next_retune:
                continue
            busy, done = (w.busy, w.done) if w.threaded else (w.pool.busy, w.pool.done)
            calls = done - w.measured[1]
            if not calls:
                continue
            w.next_retune = now + RETUNE_SECONDS
            per_task = max((busy - w.measured[0]) / calls, 1e-6)
            w.measured = (busy, done)
            extra = min(MAX_AUTO_PREFETCH, int(PREFETCH_BUDGET * w.concurrency / per_task))
            credit = w.concurrency + extra
            if credit != w.credit and abs(credit - w.credit) * 4 >= w.credit:
                w.credit = credit
                changed = True
        if changed:
            self._caps.clear()
            engine = self.node.engine
            if engine is not None:
                engine.offer_changed()   # pushers use the new credit from the update on
            for queue in self.workers:
                self._dispatch(queue)    # a local pusher may send more at once

    def on_control(self, kind: str, fields: dict[str, Any], peer_id: str) -> bool:
        if kind == "acks":
            self._on_acks(peer_id, fields)
        elif kind == "tasks":
            self._on_tasks(fields, peer_id)
        elif kind == "task":
            self._on_task(fields, peer_id)
        elif kind == "ack":
            self._on_ack(peer_id, fields)
        else:
            return False
        return True

    def on_peer_join(self, info: PeerInfo) -> None:
        self._caps.clear()
        for q in info.queues:
            self._dispatch(q)

    on_peer_update = on_peer_join

    def on_peer_leave(self, info: PeerInfo) -> None:
        self._caps.clear()
        self._batch_workers.discard(info.id)
        self._batch_pushers.discard(info.id)
        for qname, q in self.queues.items():
            lost = sorted((t for t in q.inflight.values() if t.worker == info.id),
                          key=lambda t: t.order)
            for task in lost:
                self._unassign(q, task)
            if lost:
                self.counters["tasks_redelivered"] += len(lost)
                log.warning("worker %s left with %d unacknowledged %s task(s): redelivering",
                            info.name, len(lost), qname)
                q.backlog.extendleft(reversed(lost))
            q.per_worker.pop(info.id, None)
            self._dispatch(qname)

    # ---- the user's side ----------------------------------------------------------------------
    def push(self, queue: str, body: Any, key: Any = None, headers: dict[str, Any] | None = None,
             block: bool = True, timeout: float | None = None, task_id: str | None = None,
             on_done: Callable[[], None] | None = None) -> str:
        if type(queue) is not str or queue not in self._queue_ok:
            check_queue(queue)
            if len(self._queue_ok) < 4096:
                self._queue_ok.add(queue)
        # Everything that travels is checked here, at the caller: nothing a caller passes may
        # fail later on the I/O thread (that would stop the node).
        if headers is not None and type(headers) is not dict:
            raise EncodeError("headers must be a dict")
        if key is not None:
            try:
                hash(key)
            except TypeError:
                raise ConfigError(f"key must be hashable, not {type(key).__name__}") from None
        size = _TASK_OVERHEAD
        if key is not None or headers:
            size += len(encode([key, headers]))  # an unencodable key or header raises here
        node = self.node
        node._require_running()
        payload = encode(body)  # an unencodable body fails here, at the caller
        if len(payload) > node.max_message_bytes:
            raise EncodeError(f"task body of {len(payload)} bytes is over max_message_bytes="
                              f"{node.max_message_bytes}")
        # acquire/release, not ``with``: half the cost (~0.2 us against ~0.5 us on 3.11),
        # and push() is the pusher's hot path; the try/finally costs nothing until it raises.
        lock = self._lock
        lock.acquire()
        try:
            n = self._outstanding.get(queue, 0)
            if n >= self.max_backlog:
                n = self._wait_for_room(queue, n, block, timeout)
            self._outstanding[queue] = n + 1
            self.counters["tasks_pushed"] += 1
            if task_id:
                tid = task_id
                size += len(tid.encode())
            else:
                tid = next(self._tids)
                size += len(tid)   # ASCII: a hex node id and counter
        finally:
            lock.release()
        self._inbox.append(_Task(tid, queue, payload, headers or {}, key, next(self._order),
                                 on_done, size + len(payload)))
        if not self._inbox_armed:
            self._inbox_armed = True
            engine = node.engine
            assert engine is not None
            engine.call(self._take_inbox)
        return tid

    def _wait_for_room(self, queue: str, n: int, block: bool, timeout: float | None) -> int:
        """push() on a full queue, under _lock: wait until it drained to the resume level,
        or raise; return the queue's count of outstanding tasks then."""
        node = self.node
        if not block:
            self.counters["backpressure_rejects"] += 1
            raise Backpressure(f"queue {queue!r} has {n} tasks outstanding "
                               f"(max_backlog={self.max_backlog})")
        self._waiters += 1
        try:
            ok = self._cv.wait_for(
                lambda: self._outstanding.get(queue, 0) <= self._resume_at
                or not node.running, timeout)
        finally:
            self._waiters -= 1
        if not ok:
            raise MeshTimeout(f"queue {queue!r} stayed full for {timeout}s")
        node._require_running()
        return self._outstanding.get(queue, 0)

    def wait_done(self, queue: str | None, timeout: float | None) -> bool:
        """Block until every task pushed (to ``queue``, or to any) is acknowledged."""
        def idle() -> bool:
            if queue is not None:
                return self._outstanding.get(queue, 0) == 0
            return not any(self._outstanding.values())
        with self._cv:
            self._waiters += 1
            try:
                return self._cv.wait_for(lambda: idle() or not self.node.running,
                                         timeout) and idle()
            finally:
                self._waiters -= 1

    def workers_for(self, queue: str) -> int:
        n = sum(1 for p in self.node.peers() if queue in p.queues)
        return n + (1 if queue in self.workers else 0)

    # ---- I/O thread: the pushing side ------------------------------------------------------------
    def _take_inbox(self) -> None:
        """Move every task push() handed over into its queue's backlog, then dispatch."""
        self._inbox_armed = False   # before popping: a task appended after this wakes us again
        pop, queues = self._inbox.popleft, self.queues
        touched: dict[str, None] = {}
        while True:
            try:
                task = pop()
            except IndexError:
                break
            q = queues.get(task.queue)
            if q is None:
                q = queues[task.queue] = _Queue()
            q.backlog.append(task)
            touched[task.queue] = None
        for name in touched:
            self._dispatch(name)

    def _workers_changed(self, queue: str) -> None:
        self._caps.clear()
        self._dispatch(queue)

    def _candidates(self, queue: str) -> tuple[dict[str, int], list[str]]:
        """Workers of ``queue`` with their credit (tasks they take at once), and their ids in
        rendezvous order. Cached until a peer joins, changes or leaves, or a worker is bound."""
        found = self._caps.get(queue)
        if found is not None:
            return found
        engine = self.node.engine
        assert engine is not None
        caps = {pid: p.info.queues[queue][0] for pid, p in engine.peers.items()
                if queue in p.info.queues}
        local = self.workers.get(queue)
        if local is not None:
            caps[self.node.id] = local.credit
        found = self._caps[queue] = (caps, sorted(caps))
        return found

    def _dispatch(self, queue: str) -> None:
        q = self.queues.get(queue)
        if q is None or not q.backlog:
            return
        caps, ranked = self._candidates(queue)
        if not caps:
            return
        per_worker = q.per_worker
        free = {w: cap - per_worker.get(w, 0) for w, cap in caps.items()}
        total = sum(f for f in free.values() if f > 0)
        if total <= 0:
            return
        only = ranked[0] if len(ranked) == 1 else None
        backlog, inflight, keys_inflight = q.backlog, q.inflight, q.keys_inflight
        out: dict[str, list[_Task]] = {}
        kept: list[_Task] = []
        scanned = 0
        while backlog and total > 0 and scanned < KEY_SCAN:
            task = backlog.popleft()
            scanned += 1
            if task.key is not None:
                wid = only or _rendezvous(task.key, ranked)
                if free[wid] <= 0 or task.key in keys_inflight:
                    kept.append(task)  # waits for its worker, in order
                    continue
                keys_inflight.add(task.key)
            else:
                wid = only or max(free, key=free.__getitem__)
            free[wid] -= 1
            total -= 1
            task.worker = wid
            task.deliveries += 1
            inflight[task.id] = task
            batch = out.get(wid)
            if batch is None:
                out[wid] = [task]
            else:
                batch.append(task)
        backlog.extendleft(reversed(kept))
        for wid, tasks in out.items():
            per_worker[wid] = per_worker.get(wid, 0) + len(tasks)
            self._deliver(queue, wid, tasks)

    def _deliver(self, queue: str, wid: str, tasks: list[_Task]) -> None:
        """Send tasks just assigned to worker ``wid`` (or run them here, if it is this node)."""
        node = self.node
        engine = node.engine
        assert engine is not None
        if wid == node.id:
            now = time.time()
            lw = self.workers[queue]
            for t in tasks:
                self._run(lw, queue, t.id, t.deliveries, t.key, t.headers, t.body, node.name,
                          node.id, now)
            self._start(lw)
            return
        if wid in self._batch_workers:
            limit = min(BATCH_BYTES, node.max_message_bytes // 2)
            entries: list[list[Any]] = []
            size = 0
            for t in tasks:
                if entries and size + t.size > limit:
                    engine.send_to(wid, "tasks", {"q": queue, "t": entries})
                    entries, size = [], 0
                if t.size > limit:   # a big one travels alone, as it always did
                    engine.send_to(wid, "task", _task_fields(t))
                    continue
                entries.append([t.id, t.deliveries, t.key, t.headers, t.body])
                size += t.size
            if entries:
                engine.send_to(wid, "tasks", {"q": queue, "t": entries})
            return
        for t in tasks:
            engine.send_to(wid, "task", _task_fields(t))

    def _unassign(self, q: _Queue, task: _Task) -> None:
        q.inflight.pop(task.id, None)
        if task.worker is not None:
            q.per_worker[task.worker] = q.per_worker.get(task.worker, 1) - 1
        if task.key is not None:
            q.keys_inflight.discard(task.key)
        task.worker = None

    def _on_acks(self, wid: str, fields: dict[str, Any]) -> None:
        """A batch of successful acks (12.8): the same as one ``ack`` with ``ok`` per id."""
        qname, ids = fields.get("q"), fields.get("ids")
        if type(qname) is not str or type(ids) is not list:
            engine = self.node.engine
            assert engine is not None
            engine.malformed += 1
            return
        self._batch_workers.add(wid)
        self._acked(wid, qname, ids)

    def _acked(self, wid: str, qname: str, ids: list[Any]) -> None:
        q = self.queues.get(qname)
        if q is None:
            self.counters["late_acks"] += len(ids)
            return
        inflight, keys = q.inflight, q.keys_inflight
        done: list[_Task] = []
        for tid in ids:
            task = inflight.get(tid) if type(tid) is str else None
            if task is None or task.worker != wid:
                self.counters["late_acks"] += 1  # e.g. from a worker we had given up on
                continue
            del inflight[tid]      # _unassign, with the credit returned once for all below
            if task.key is not None:
                keys.discard(task.key)
            task.worker = None
            done.append(task)
        if done:
            q.per_worker[wid] = q.per_worker.get(wid, len(done)) - len(done)
            self._finish(qname, done)
        self._dispatch(qname)

    def _on_ack(self, wid: str, fields: dict[str, Any]) -> None:
        if fields.get("bt") is True:
            self._batch_workers.add(wid)
        tid, qname = fields.get("id"), fields.get("q")
        q = self.queues.get(qname) if type(qname) is str else None
        task = q.inflight.get(tid) if q is not None and type(tid) is str else None
        if q is None or task is None or task.worker != wid:
            self.counters["late_acks"] += 1  # e.g. from a worker we had given up on
            return
        self._unassign(q, task)
        if fields.get("ok"):
            self._finish(task.queue, [task])
        elif fields.get("retry"):
            q.backlog.appendleft(task)  # the worker could not take it: not the task's fault
        else:
            e = fields.get("e")
            err: dict[str, Any] = e if isinstance(e, dict) else {"type": "?"}
            task.failures += 1
            self.counters["tasks_failed"] += 1
            if task.errors is None:
                task.errors = []
            task.errors.append({**err, "worker": self._name_of(wid), "attempt": task.deliveries,
                                "at": time.time()})
            if task.failures >= self._max_attempts(wid, task.queue):
                self._dead_letter(task)
                self._finish(task.queue, [task])
            else:
                q.backlog.appendleft(task)
        self._dispatch(task.queue)

    def _finish(self, queue: str, tasks: list[_Task]) -> None:
        n = len(tasks)
        self.counters["tasks_completed"] += n
        with self._lock:
            before = self._outstanding[queue]
            after = self._outstanding[queue] = before - n
            # wake blocked pushers when the queue drops to the resume level, waiters at zero
            if self._waiters and (after == 0 or after <= self._resume_at < before):
                self._cv.notify_all()
        for task in tasks:
            if task.on_done is not None:
                task.on_done()

    def _max_attempts(self, wid: str, queue: str) -> int:
        if wid == self.node.id and queue in self.workers:
            return self.workers[queue].max_attempts
        engine = self.node.engine
        peer = engine.peers.get(wid) if engine is not None else None
        return peer.info.queues.get(queue, (1, 3))[1] if peer is not None else 3

    def _name_of(self, wid: str) -> str:
        engine = self.node.engine
        peer = engine.peers.get(wid) if engine is not None else None
        return self.node.name if wid == self.node.id else (peer.info.name if peer else wid)

    def _dead_letter(self, task: _Task) -> None:
        self.counters["deadlettered"] += 1
        try:
            body: Any = decode(task.body)
        except DecodeError:
            body = task.body
        log.error("task %s on %s failed %d time(s): dead-lettered", task.id, task.queue,
                  task.failures)
        self.node.publish(f"deadletter.{task.queue}", {
            "queue": task.queue, "id": task.id, "key": task.key, "body": body,
            "headers": task.headers, "attempts": task.deliveries, "errors": task.errors or []})

    # ---- I/O thread: the working side ---------------------------------------------------------
    def _on_task(self, fields: dict[str, Any], pid: str) -> None:
        engine = self.node.engine
        assert engine is not None
        qname, tid = fields.get("q"), fields.get("id")
        if type(qname) is not str or type(tid) is not str:
            engine.malformed += 1
            return
        lw = self.workers.get(qname)
        if lw is None:
            self._refuse(pid, qname, tid)
            return
        peer = engine.peers.get(pid)
        self._run(lw, qname, tid, fields.get("att", 1), fields.get("key"), fields.get("h") or {},
                  fields.get("b", b""), peer.info.name if peer else pid, pid, time.time())
        self._start(lw)

    def _on_tasks(self, fields: dict[str, Any], pid: str) -> None:
        """A batch of tasks (12.8): each entry is handled as one ``task`` would be."""
        engine = self.node.engine
        assert engine is not None
        qname, entries = fields.get("q"), fields.get("t")
        if type(qname) is not str or type(entries) is not list:
            engine.malformed += 1
            return
        self._batch_pushers.add(pid)
        lw = self.workers.get(qname)
        peer = engine.peers.get(pid)
        source = peer.info.name if peer else pid
        now = time.time()
        if lw is None or not lw.threaded:
            for entry in entries:
                if type(entry) is not list or len(entry) < 5 or type(entry[0]) is not str:
                    engine.malformed += 1
                elif lw is None:
                    self._refuse(pid, qname, entry[0])
                else:
                    tid, att, key, headers, body = entry[:5]
                    self._run(lw, qname, tid, att, key, headers or {}, body, source, pid, now)
            return
        # The hot loop: _run's work inline (two calls less a task), for a sync worker.
        append = lw.ready.append
        for entry in entries:
            if type(entry) is not list or len(entry) < 5 or type(entry[0]) is not str:
                engine.malformed += 1
                continue
            tid, att, key, headers, body = entry[:5]
            try:
                body = decode(body)
            except DecodeError as exc:
                self._complete(pid, qname, tid, False, describe_error(exc))
                continue
            append(wire_message(qname, body, headers or {}, tid, source, pid, 0, now, 0, att,
                                key))
        self._start(lw)   # once for the batch: one look at the drainers, not one a task

    def _refuse(self, pid: str, qname: str, tid: str) -> None:
        engine = self.node.engine
        assert engine is not None
        engine.send_to(pid, "ack", {"q": qname, "id": tid, "ok": False, "retry": True,
                                    "bt": True})

    def _run(self, lw: _LocalWorker, queue: str, tid: str, att: Any, key: Any,
             headers: dict[str, Any], payload: Any, source: str, source_id: str,
             now: float) -> None:
        """Make one task ready for the local worker (callers then _start it); its outcome
        goes back as an ack."""
        try:
            body = decode(payload)
        except DecodeError as exc:
            self._complete(source_id, queue, tid, False, describe_error(exc))
            return
        # The Message carries everything its ack needs (queue, id, pusher): no per-task
        # closure or record beside it.
        msg = wire_message(queue, body, headers, tid, source, source_id, 0, now, 0, att, key)
        if lw.threaded:
            lw.ready.append(msg)
        else:
            lw.pool.submit((msg,), {}, lambda ok, value: self._outcome(lw, msg, ok, value))

    def _start(self, lw: _LocalWorker) -> None:
        """Tasks were made ready (I/O thread): see that a drainer will take them."""
        if not lw.threaded:
            return
        with lw.lock:
            if not lw.ready or lw.free or lw.drainers >= lw.concurrency:
                return   # a free drainer takes them, or every one is busy (they wait)
            lw.drainers += 1
            lw.free += 1
        lw.pool.submit((), {}, self._drainer_failed)

    def _drainer(self, lw: _LocalWorker, fn: Callable[[Message], Any]) -> None:
        """A pool job, on a handler thread: run the tasks in ``lw.ready`` until it is empty.

        Why not one pool job per task: with short handlers, a job's own bookkeeping (a job
        tuple, the pool's mutex twice, an outcome closure) cost more than the handler, and at
        concurrency 16 the pool woke a thread for most tasks of a batch: each wake-up is a
        GIL hand-over and a context switch or two, for a thread that then ran one task.

        Drainers are added one at a time, when needed: one that enters the handler while
        tasks are ready and no other drainer is free starts another first. So a task never
        waits behind a running handler while fewer than ``concurrency`` run (blocking
        handlers fan out to ``concurrency`` threads, one wake-up per task, as before), but
        short handlers leave the next drainer nothing to do: one or two threads run a
        whole batch.
        """
        ready, lock, emit, limit = lw.ready, lw.lock, lw.emit, lw.concurrency
        pop, acked = ready.popleft, self._acked_out
        acquire, release = lock.acquire, lock.release
        clock = time.perf_counter
        ran = False
        while True:
            if limit == 1:
                # Alone: no other drainer to start, so no count to keep per task (the lock
                # costs about as much as the rest of this loop); only leaving needs it.
                try:
                    msg = pop()
                except IndexError:
                    with lock:
                        if ready:
                            continue
                        lw.drainers = lw.free = 0
                        return
                more = False
            else:
                acquire()   # not ``with``: see push()
                try:
                    if ran:
                        lw.free += 1
                    if not ready:
                        # Only under the lock: a task appended after that look finds this
                        # drainer gone in _start (which then adds one), never half-gone.
                        lw.drainers -= 1
                        lw.free -= 1
                        return
                    msg = pop()
                    lw.free -= 1
                    more = bool(ready) and not lw.free and lw.drainers < limit
                    if more:
                        lw.drainers += 1
                        lw.free += 1
                finally:
                    release()
            if more:
                lw.pool.submit((), {}, self._drainer_failed)
            ran = True
            t0 = clock()
            try:
                value = fn(msg)
                ok = True
            except Exception as exc:  # noqa: BLE001 - a handler's failure is data
                value, ok = exc, False
            lw.busy += clock() - t0
            lw.done += 1
            if ok and emit is None:
                # The common case: a plain success. The Message itself is the ack's record;
                # _send_acks counts it in tasks_worked and batches it per pusher.
                acked.append(msg)
                if not self._outbox_armed:
                    self._arm_outbox()
                continue
            try:
                self._outcome(lw, msg, ok, value)
            except Exception:  # noqa: BLE001 - a drainer must live on: its count is kept
                # As the pool does for a failed report: the task stays unacknowledged (the
                # pusher redelivers it if this worker leaves), the other tasks go on.
                log.exception("reporting the outcome of task %s failed", msg.id)

    def _drainer_failed(self, ok: bool, value: Any) -> None:
        if not ok:   # a bug: handlers' failures and failed reports are caught per task
            log.error("a pipeline drainer failed", exc_info=value)

    def _outcome(self, lw: _LocalWorker, msg: Message, ok: bool, value: Any) -> None:
        """A handler thread's report of one task, other than a plain success of a worker
        that emits nothing: a failure, or a result to pass to the next stage."""
        with self._lock:   # handler threads and the I/O thread (_send_acks) all count
            self.counters["tasks_worked"] += 1
        queue, tid, source_id, emit = msg.topic, msg.id, msg.source_id, lw.emit
        if ok and emit is not None:
            # Chained acknowledgement: the task stays unacknowledged upstream until the
            # next stage has acknowledged what it produced, so a worker that dies between
            # the two loses nothing (it is redone, and re-emitted under the same id).
            try:
                self.push(emit, value, key=msg.key, headers=msg.headers,
                          task_id=f"{tid}>{emit}",
                          on_done=lambda: self._complete(source_id, queue, tid, True, None))
                return
            except Exception as exc:  # noqa: BLE001 - not acknowledged: will be redone
                ok, value = False, exc
        if not ok:
            log.error("worker %s failed task %s (attempt %d)", queue, tid, msg.attempt,
                      exc_info=value)
            value = describe_error(value)
        self._complete(source_id, queue, tid, ok, value)

    def _complete(self, to: str, queue: str, tid: str, ok: bool, error: Any) -> None:
        """Queue the ack of a finished task (any thread); the I/O thread sends it soon."""
        self._outbox.append((to, queue, tid, ok, error))
        if not self._outbox_armed:
            self._arm_outbox()

    def _arm_outbox(self) -> None:
        self._outbox_armed = True
        engine = self.node.engine
        if engine is not None:
            engine.call(self._send_acks)

    def _send_acks(self) -> None:
        """Send the acks of every task finished since the last time, batched per pusher."""
        self._outbox_armed = False   # before popping: an ack appended after this wakes us again
        now = time.monotonic()
        for w in self.workers.values():
            if w.adaptive and now >= w.next_retune:
                self._retune(now)
                break
        node = self.node
        engine = node.engine
        assert engine is not None
        groups: dict[tuple[str, str], list[str]] = {}
        # Plain successes, as Messages; a batch mostly comes from one pusher and queue, so
        # the group is looked up only when they change.
        take = self._acked_out.popleft
        n = 0
        last_to = last_queue = None
        ids: list[str] = []
        while True:
            try:
                m = take()
            except IndexError:
                break
            n += 1
            if m.source_id is not last_to or m.topic is not last_queue:
                last_to, last_queue = m.source_id, m.topic
                ids = groups.setdefault((m.source_id, m.topic), [])
            ids.append(m.id)
        if n:
            with self._lock:   # see _outcome
                self.counters["tasks_worked"] += n
        pop, batching = self._outbox.popleft, self._batch_pushers
        while True:
            try:
                to, queue, tid, ok, error = pop()
            except IndexError:
                break
            if ok:
                groups.setdefault((to, queue), []).append(tid)
                continue
            fields: dict[str, Any] = {"q": queue, "id": tid, "ok": ok, "e": error}
            if to == node.id:
                self._on_ack(to, fields)
            else:
                fields["bt"] = True   # 12.8: we accept "tasks"
                engine.send_to(to, "ack", fields)
        # Pushers choose the ids, so bound the bytes as well as the count (len() counts
        # characters: up to 4 bytes each in UTF-8).
        limit = min(BATCH_BYTES, node.max_message_bytes // 2) // 4
        for (to, queue), ids in groups.items():
            if to == node.id:
                self._acked(to, queue, ids)
                continue
            if to not in batching:   # a pusher that never sent "tasks": one "ack" each
                for tid in ids:
                    engine.send_to(to, "ack", {"q": queue, "id": tid, "ok": True, "bt": True})
                continue
            if len(ids) <= BATCH_ACKS and sum(map(len, ids)) + 2 * len(ids) <= limit:
                engine.send_to(to, "acks", {"q": queue, "ids": ids})   # the usual: one message
                continue
            chunk: list[str] = []
            size = 0
            for tid in ids:
                if chunk and (len(chunk) >= BATCH_ACKS or size + len(tid) > limit):
                    engine.send_to(to, "acks", {"q": queue, "ids": chunk})
                    chunk, size = [], 0
                chunk.append(tid)
                size += len(tid) + 2
            engine.send_to(to, "acks", {"q": queue, "ids": chunk})


#: ``deadletter.<queue>`` must still be a valid topic.
MAX_QUEUE_BYTES = MAX_TOPIC_BYTES - len("deadletter.")


def check_queue(queue: str) -> bytes:
    """A queue name is a topic short enough that its dead-letter topic is one too."""
    raw = check_topic(queue)
    if len(raw) > MAX_QUEUE_BYTES:
        raise ConfigError(f"queue name {queue!r} is longer than {MAX_QUEUE_BYTES} bytes")
    return raw


def _rendezvous(key: Any, workers: list[str]) -> str:
    """The worker a key belongs to: highest hash of (key, worker). Stable while it lives."""
    k = repr(key).encode()
    return max(workers, key=lambda w: zlib.crc32(k + b"|" + w.encode()))


def worker_spec(queue: str, emit: str | None, concurrency: int, max_attempts: int,
                prefetch: int | None = None) -> HandlerSpec:
    """Validate a worker decorator's arguments into a spec."""
    check_queue(queue)
    if emit is not None:
        check_queue(emit)
    if not 1 <= concurrency <= 10_000:
        raise ConfigError(f"concurrency must be 1..10000, not {concurrency}")
    if not 1 <= max_attempts <= 1000:
        raise ConfigError(f"max_attempts must be 1..1000, not {max_attempts}")
    auto = prefetch is None
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH
    if not 0 <= prefetch <= 10_000:
        raise ConfigError(f"prefetch must be 0..10000, not {prefetch}")
    return HandlerSpec("worker", queue, {"emit": emit, "concurrency": concurrency,
                                         "max_attempts": max_attempts, "prefetch": prefetch,
                                         "auto_prefetch": auto})


def _task_fields(task: _Task) -> dict[str, Any]:
    """The fields of a single ``task`` message (12.2)."""
    return {"q": task.queue, "id": task.id, "att": task.deliveries, "key": task.key,
            "h": task.headers, "b": task.body}
