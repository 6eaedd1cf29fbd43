"""Pipelines: fair, credit-based dispatch of tasks to workers, with acks, redelivery, dead letters.

The pushing node owns its tasks until a worker acknowledges them. State lives on the node's I/O
thread; ``push`` (any thread) only hands a task over. A worker advertises, per queue, how many
tasks it takes at once (its credit) and how many failures a task may have; the pusher sends a
task only to a worker with free credit (fair dispatch: a slow worker gets fewer), keeps it until
the worker's handler returns, and on a failure, or when the worker dies (heartbeat timeout or
goodbye), delivers it again with ``attempt`` incremented. Delivery is at-least-once.
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
from meshmq._dispatch import HandlerSpec
from meshmq._errors import Backpressure, ConfigError, DecodeError, EncodeError, MeshTimeout
from meshmq._message import Message
from meshmq._peers import PeerInfo
from meshmq._topics import MAX_TOPIC_BYTES, check_topic

if TYPE_CHECKING:
    from meshmq._node import Node

__all__ = ["Pipelines"]

log = logging.getLogger("meshmq")
DEFAULT_PREFETCH = 4  # tasks a worker holds beyond those running, unless told
KEY_SCAN = 10_000   # how deep dispatch looks past tasks whose key's worker is busy


@dataclass(eq=False)
class _Task:
    id: str
    queue: str
    body: bytes                 # msgpack of the body, encoded once at push()
    headers: dict[str, Any]
    key: Any
    order: int
    deliveries: int = 0
    failures: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    worker: str | None = None
    # Called on the I/O thread once the task is finished (acknowledged or dead-lettered):
    # an emitted task acknowledges the task that produced it only then (chained acks).
    on_done: Callable[[], None] | None = None


@dataclass
class _Queue:
    backlog: deque[_Task] = field(default_factory=deque)
    inflight: dict[str, _Task] = field(default_factory=dict)
    keys_inflight: set[Any] = field(default_factory=set)
    per_worker: dict[str, int] = field(default_factory=dict)


@dataclass
class _LocalWorker:
    pool: Pool
    concurrency: int
    credit: int       # concurrency + prefetch: tasks a pusher may have in flight here
    max_attempts: int
    emit: str | None


class Pipelines:
    """The pipeline pattern, plugged into a Node."""

    def __init__(self, node: Node, max_backlog: int) -> None:
        self.node = node
        self.max_backlog = max_backlog
        self.workers: dict[str, _LocalWorker] = {}
        self.queues: dict[str, _Queue] = {}
        self._cv = threading.Condition()
        self._outstanding: dict[str, int] = {}
        self._waiters = 0     # threads blocked in push() or wait_done(), under _cv
        # A full queue lets pushers in again once it has drained to this level, not at every
        # ack: one wake-up per batch instead of a GIL ping-pong per task.
        self._resume_at = max(0, max_backlog - max(1, max_backlog // 8))
        self._ids = itertools.count(1)
        self._order = itertools.count()
        self.counters = {"tasks_pushed": 0, "tasks_completed": 0, "tasks_redelivered": 0,
                         "tasks_failed": 0, "deadlettered": 0, "late_acks": 0,
                         "backpressure_rejects": 0, "tasks_worked": 0}

    # ---- plugin hooks -----------------------------------------------------------------------
    def bind(self, node: Node, spec: HandlerSpec, fn: Callable[..., Any]) -> bool:
        if spec.kind != "worker":
            return False
        opts = spec.options
        pool = Pool(fn, f"worker-{spec.name}", opts["concurrency"], node._handler_loop)
        self.workers[spec.name] = _LocalWorker(pool, opts["concurrency"],
                                               opts["concurrency"] + opts["prefetch"],
                                               opts["max_attempts"],
                                               opts.get("emit"))
        if node.engine is not None:
            node.engine.call(lambda: self._dispatch(spec.name))
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

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out["tasks_backlog"] = sum(len(q.backlog) for q in self.queues.values())
        out["tasks_inflight"] = sum(len(q.inflight) for q in self.queues.values())
        return out

    def on_control(self, kind: str, fields: dict[str, Any], peer_id: str) -> bool:
        if kind == "task":
            self._on_task(fields, peer_id)
        elif kind == "ack":
            self._on_ack(peer_id, fields)
        else:
            return False
        return True

    def on_peer_join(self, info: PeerInfo) -> None:
        for q in info.queues:
            self._dispatch(q)

    on_peer_update = on_peer_join

    def on_peer_leave(self, info: PeerInfo) -> None:
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
        check_queue(queue)
        # Everything that travels is checked here, at the caller: nothing a caller passes may
        # fail later on the I/O thread (that would stop the node).
        if headers is not None and type(headers) is not dict:
            raise EncodeError("headers must be a dict")
        if key is not None:
            try:
                hash(key)
            except TypeError:
                raise ConfigError(f"key must be hashable, not {type(key).__name__}") from None
        if key is not None or headers:
            encode([key, headers])  # an unencodable key or header raises EncodeError here
        node = self.node
        node._require_running()
        payload = encode(body)  # an unencodable body fails here, at the caller
        if len(payload) > node.max_message_bytes:
            raise EncodeError(f"task body of {len(payload)} bytes is over max_message_bytes="
                              f"{node.max_message_bytes}")
        with self._cv:
            n = self._outstanding.get(queue, 0)
            if n >= self.max_backlog:
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
            self._outstanding[queue] = self._outstanding.get(queue, 0) + 1
            self.counters["tasks_pushed"] += 1
        tid = task_id or f"{node.id}-t{next(self._ids):x}"
        task = _Task(tid, queue, payload, headers or {}, key, next(self._order), on_done=on_done)
        assert node.engine is not None
        node.engine.call(lambda: self._enqueue(task))
        return tid

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
    def _enqueue(self, task: _Task) -> None:
        q = self.queues.get(task.queue)
        if q is None:
            q = self.queues[task.queue] = _Queue()
        q.backlog.append(task)
        self._dispatch(task.queue)

    def _candidates(self, queue: str) -> dict[str, int]:
        """Workers of ``queue`` and their credit (tasks they take at once)."""
        engine = self.node.engine
        assert engine is not None
        out = {pid: p.info.queues[queue][0] for pid, p in engine.peers.items()
               if queue in p.info.queues}
        local = self.workers.get(queue)
        if local is not None:
            out[self.node.id] = local.credit
        return out

    def _dispatch(self, queue: str) -> None:
        q = self.queues.get(queue)
        if q is None or not q.backlog:
            return
        caps = self._candidates(queue)
        if not caps:
            return
        free = {w: cap - q.per_worker.get(w, 0) for w, cap in caps.items()}
        total = sum(f for f in free.values() if f > 0)
        ranked = sorted(caps)
        kept: list[_Task] = []
        scanned = 0
        while q.backlog and total > 0 and scanned < KEY_SCAN:
            task = q.backlog.popleft()
            scanned += 1
            if task.key is not None:
                wid = _rendezvous(task.key, ranked)
                if free[wid] <= 0 or task.key in q.keys_inflight:
                    kept.append(task)  # waits for its worker, in order
                    continue
                q.keys_inflight.add(task.key)
            else:
                wid = max(free, key=free.__getitem__)
            free[wid] -= 1
            total -= 1
            self._send(q, task, wid)
        q.backlog.extendleft(reversed(kept))

    def _send(self, q: _Queue, task: _Task, wid: str) -> None:
        task.worker = wid
        task.deliveries += 1
        q.inflight[task.id] = task
        q.per_worker[wid] = q.per_worker.get(wid, 0) + 1
        node = self.node
        if wid == node.id:
            self._run_local(task, node.name, node.id)
            return
        assert node.engine is not None
        node.engine.send_to(wid, "task", {"q": task.queue, "id": task.id, "att": task.deliveries,
                                          "key": task.key, "h": task.headers, "b": task.body})

    def _unassign(self, q: _Queue, task: _Task) -> None:
        q.inflight.pop(task.id, None)
        if task.worker is not None:
            q.per_worker[task.worker] = q.per_worker.get(task.worker, 1) - 1
        if task.key is not None:
            q.keys_inflight.discard(task.key)
        task.worker = None

    def _on_ack(self, wid: str, fields: dict[str, Any]) -> None:
        tid, qname = fields.get("id"), fields.get("q")
        q = self.queues.get(qname) if type(qname) is str else None
        task = q.inflight.get(tid) if q is not None and type(tid) is str else None
        if q is None or task is None or task.worker != wid:
            self.counters["late_acks"] += 1  # e.g. from a worker we had given up on
            return
        self._unassign(q, task)
        if fields.get("ok"):
            self._finish(task)
        elif fields.get("retry"):
            q.backlog.appendleft(task)  # the worker could not take it: not the task's fault
        else:
            e = fields.get("e")
            err: dict[str, Any] = e if isinstance(e, dict) else {"type": "?"}
            task.failures += 1
            self.counters["tasks_failed"] += 1
            task.errors.append({**err, "worker": self._name_of(wid), "attempt": task.deliveries,
                                "at": time.time()})
            if task.failures >= self._max_attempts(wid, task.queue):
                self._dead_letter(task)
                self._finish(task)
            else:
                q.backlog.appendleft(task)
        self._dispatch(task.queue)

    def _finish(self, task: _Task) -> None:
        self.counters["tasks_completed"] += 1
        with self._cv:
            n = self._outstanding[task.queue] = self._outstanding[task.queue] - 1
            if self._waiters and (n == 0 or n == self._resume_at):
                self._cv.notify_all()
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
            "headers": task.headers, "attempts": task.deliveries, "errors": task.errors})

    # ---- I/O thread: the working side ---------------------------------------------------------
    def _on_task(self, fields: dict[str, Any], pid: str) -> None:
        engine = self.node.engine
        assert engine is not None
        qname, tid = fields.get("q"), fields.get("id")
        if type(qname) is not str or type(tid) is not str:
            engine.malformed += 1
            return
        if qname not in self.workers:
            engine.send_to(pid, "ack", {"q": qname, "id": tid, "ok": False, "retry": True})
            return
        peer = engine.peers.get(pid)
        self._run_local(_Task(tid, qname, fields.get("b", b""), fields.get("h") or {},
                              fields.get("key"), 0, fields.get("att", 1)),
                        peer.info.name if peer else pid, pid)

    def _run_local(self, task: _Task, source: str, source_id: str) -> None:
        lw = self.workers[task.queue]
        node = self.node
        engine = node.engine
        assert engine is not None
        try:
            body = decode(task.body)
        except DecodeError as exc:
            self._report(source_id, task.queue, task.id, False, exc)
            return
        msg = Message(task.queue, body, task.headers, task.id, source, source_id, 0, time.time(),
                      0, task.deliveries, task.key)
        emit = lw.emit

        def report(ok: bool, value: Any) -> None:
            engine.call(lambda: self._report(source_id, task.queue, task.id, ok, value))

        def done(ok: bool, value: Any) -> None:
            self.counters["tasks_worked"] += 1
            if ok and emit is not None:
                # Chained acknowledgement: the task stays unacknowledged upstream until the
                # next stage has acknowledged what it produced, so a worker that dies between
                # the two loses nothing (it is redone, and re-emitted under the same id).
                try:
                    self.push(emit, value, key=task.key, headers=task.headers,
                              task_id=f"{task.id}>{emit}",
                              on_done=lambda: self._report(source_id, task.queue, task.id,
                                                           True, None))
                    return
                except Exception as exc:  # noqa: BLE001 - not acknowledged: will be redone
                    ok, value = False, exc
            if not ok:
                log.error("worker %s failed task %s (attempt %d)", task.queue, task.id,
                          task.deliveries, exc_info=value)
            report(ok, value)

        lw.pool.submit((msg,), {}, done)

    def _report(self, to: str, queue: str, tid: str, ok: bool, value: Any) -> None:
        fields: dict[str, Any] = {"q": queue, "id": tid, "ok": ok}
        if not ok:
            fields["e"] = describe_error(value)
        if to == self.node.id:
            self._on_ack(to, fields)
        else:
            engine = self.node.engine
            assert engine is not None
            engine.send_to(to, "ack", fields)


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
    if prefetch is None:
        prefetch = DEFAULT_PREFETCH
    if not 0 <= prefetch <= 10_000:
        raise ConfigError(f"prefetch must be 0..10000, not {prefetch}")
    return HandlerSpec("worker", queue, {"emit": emit, "concurrency": concurrency,
                                         "max_attempts": max_attempts, "prefetch": prefetch})
