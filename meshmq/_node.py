"""Node: the public, thread-based face of a meshmq peer."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

import zmq

from meshmq import _zmqio as zio
from meshmq._codec import MAX_MESSAGE_BYTES
from meshmq._dispatch import (
    HandlerSpec,
    LoopThread,
    Runner,
    ThreadRunner,
    make_runner,
    record,
    specs_of,
)
from meshmq._engine import Engine
from meshmq._envelope import PubEncoder, message_ids
from meshmq._errors import ConfigError, EncodeError, MeshTimeout, NodeClosed
from meshmq._message import Message
from meshmq._peers import PeerInfo
from meshmq._timing import Timing
from meshmq._topics import check_pattern, check_topic, matcher, zmq_prefix

__all__ = ["Node"]

log = logging.getLogger("meshmq")
F = TypeVar("F", bound=Callable[..., Any])

STATS_KEYS = """
sent            messages this node published
received        messages that arrived from peers and decoded well
delivered       handler invocations that finished (ok or raising)
dropped         messages dropped because a handler's queue was full, or abandoned in its
                queue when stop()'s drain deadline passed
pending         messages queued for handlers right now
malformed       frames from peers that were dropped as invalid (garbage, bad frame count, ...)
bad_version     of those, frames of a protocol version this node does not speak
oversized       of those, frames over max_message_bytes (libzmq resets a connection that
                sends one over twice that, before meshmq sees it)
gaps            messages missed, as counted from per-sender, per-topic sequence numbers
gaps_by_sender  the same, per sender name (a dict)
handler_errors  handler invocations that raised (logged with the traceback)
peers           peers alive now
peer_joins      peers seen joining since start
peer_leaves     peers seen leaving (goodbye, timeout, restart) since start
discovery       with mDNS only: a dict of discovery counters (records seen, garbage TXT
                records ignored, peers dialled, ...; see docs/DISCOVERY.md)
tasks_*         pipelines: pushed, completed (acked or dead-lettered), redelivered (worker
                died), failed (handler raised), worked (by this node), backlog, inflight
worker_credit   a dict: queue -> the credit (concurrency + prefetch) this node's worker of it
                advertises now; it adapts unless prefetch= was given
deadlettered    tasks published on deadletter.<queue> after max_attempts failures
late_acks       acks for tasks already given to another worker (counted, ignored)
backpressure_rejects  push(block=False) calls refused with Backpressure
calls_*         RPC: made, served, raised (our handler raised), expired (not run: the caller's
                ttl passed while the call waited for a worker), retried (server died,
                retry=True), failed_remote (a RemoteError came back), pending, lane (sent
                on the lane), served_lane (read off this node's lane)
confirmed, confirm_resends, replay*, repaired, gaps_unrepaired
                with a journal (once the node used one): see docs/JOURNAL.md
"""


# zmq.Socket.send is a Python-level wrapper (for DRAFT routing_id/group) around this method of
# its C base class; publish sends two plain frames per message and skipping the wrapper saves
# ~0.8 us per message (~10% of a publisher's CPU).
_send_frame = zmq.backend.Socket.send


class Node:
    """A meshmq peer: publish, subscribe, and (with the patterns) push tasks and call services.

    ::

        node = Node("billing", peers=["tcp://127.0.0.1:7001"])

        @node.subscribe("orders.*")
        def on_order(msg: Message) -> None:
            print(msg.topic, msg.body)

        with node:
            node.wait_for_subscribers("orders.created", count=1, timeout=5.0)
            node.publish("orders.created", {"id": 1})
    """

    def __init__(self, name: str, peers: list[str] | None = None, host: str | None = None,
                 port: int = 0, *, discovery: str | None = None, group: str | None = None,
                 interfaces: list[str] | None = None, timing: Timing | None = None,
                 hwm: int = 100_000, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 max_pending: int = 100_000, max_backlog: int = 10_000,
                 rpc_lane: bool = True) -> None:
        if not isinstance(name, str) or not name or len(name) > 63:
            raise ConfigError(f"node name must be a str of 1..63 characters, not {name!r}")
        if discovery is None:
            discovery = "static" if peers is not None else os.environ.get(
                "MESHMQ_DISCOVERY", "mdns")
        if discovery not in ("static", "mdns"):
            raise ConfigError(f"discovery must be 'static' or 'mdns', not {discovery!r}")
        self.name = name
        self.id = uuid.uuid4().hex[:16]
        if host is None:  # static: loopback; mDNS: where discovery runs (see docs/DISCOVERY.md)
            from meshmq._mdns_glue import default_host
            host = default_host(interfaces) if discovery == "mdns" else "127.0.0.1"
        self.host = host
        self.port = port
        self.discovery = discovery
        self.group = group or os.environ.get("MESHMQ_GROUP", "default")
        self.interfaces = interfaces
        self.timing = timing or Timing()
        self.hwm = hwm
        self.max_message_bytes = max_message_bytes
        self.max_pending = max_pending
        self.initial_peers = [_check_endpoint(p) for p in (peers or [])]
        self.extra_endpoints: dict[str, str] = {}
        # sync RPC over a socket pair of its own, no thread hand-off (docs/PROTOCOL.md 13.5)
        self.rpc_lane = rpc_lane
        self.state_lock = threading.RLock()
        self._changed = threading.Condition(self.state_lock)
        self.pub_lock = threading.Lock()
        self._state = "new"
        self._specs: list[tuple[HandlerSpec, Callable[..., Any]]] = []
        self._subs: list[tuple[str, Callable[[str], bool], Runner]] = []
        self._cache: dict[str, tuple[Runner, ...]] = {}
        self._runners: list[Runner] = []
        self._join_cbs: list[Callable[[PeerInfo], Any]] = []
        self._leave_cbs: list[Callable[[PeerInfo], Any]] = []
        self._loop_thread: LoopThread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # AsyncNode sets its own
        self._encoder = PubEncoder()
        self._seqs: dict[str, int] = {}
        self._topics: dict[str, bytes] = {}
        self._ids = message_ids(f"{self.id}-")   # "<node id>-<hex counter>" (PROTOCOL.md)
        self._sent = 0
        self._discovery: Any = None
        self._journal: Any = None    # meshmq.durability's JournalClient, made when first needed
        from meshmq.patterns import Pipelines, Rpc  # the patterns plug into the core

        self._pipelines = Pipelines(self, max_backlog)
        self._rpc = Rpc(self)
        self._plugins: list[Any] = [self._pipelines, self._rpc]
        self._listeners: list[Callable[[], None]] = []   # told of every peer/state change
        self.engine: Engine | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    @property
    def address(self) -> str:
        """This node's control endpoint, to give other nodes as a peer."""
        if self.engine is None or not self.engine.address:
            raise NodeClosed(f"node {self.name!r} has no address until start()")
        return self.engine.address

    @property
    def running(self) -> bool:
        return self._state == "running"

    def start(self) -> Node:
        """Bind, connect to peers, start advertising. Returns self."""
        if self._state == "running":
            return self
        if self._state != "new":
            raise NodeClosed(f"node {self.name!r} was stopped; create a new Node")
        self.ctx = zio.new_context()
        try:
            self.xpub = zio.new_socket(self.ctx, zmq.XPUB, linger=self.timing.linger,
                                       hwm=self.hwm)
            bound = zio.bind(self.xpub, self.host, 0)
            self.pub_advertised = f"tcp://{self.host}:{zio.split_endpoint(bound)[1]}"
            self._events = ThreadRunner(self._run_peer_event, "peer-events", 10_000)
            self.engine = Engine(self)
            with self.state_lock:
                for spec, fn in self._specs:
                    self._bind(spec, fn)
            self.engine.start()
            if not self.engine.started.wait(10.0):
                raise MeshTimeout(f"node {self.name!r} did not start in 10 s")
            if self.engine.error is not None:
                raise self.engine.error
            self._state = "running"
            for plugin in self._plugins:
                plugin.start(self)
            if self.discovery == "mdns":
                self._start_discovery()
        except BaseException:
            self._state = "running"
            self.stop()
            raise
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop receiving, drain handlers (bounded), say goodbye, close everything. Idempotent."""
        if self._state in ("new", "stopped", "stopping"):
            if self._state == "new":
                self._state = "stopped"
            return
        self._state = "stopping"
        deadline = time.monotonic() + (self.timing.stop_timeout if timeout is None else timeout)
        for plugin in reversed(self._plugins):
            try:
                plugin.stop(self)
            except Exception:  # noqa: BLE001
                log.exception("stopping %r failed", plugin)
        if self.engine is not None:
            self.engine.stop(max(0.5, deadline - time.monotonic()))
        if self._discovery is not None:
            # Withdraw the mDNS record last: peers have had our BYE, so its goodbye cannot
            # overtake our last pings (a peer would answer RESET and we would say hello again).
            try:
                self._discovery.stop()
            except Exception:  # noqa: BLE001 - stopping must go on
                log.exception("stopping discovery failed")
        for runner in [*self._runners, getattr(self, "_events", None)]:
            if runner is not None and not runner.close(max(0.05, deadline - time.monotonic())):
                log.warning("handler %s still busy after stop timeout", runner.label)
        if self._loop_thread is not None:
            self._loop_thread.stop(max(0.1, deadline - time.monotonic()))
        with self.pub_lock:
            xpub = getattr(self, "xpub", None)
            if xpub is not None:
                xpub.close()
        if hasattr(self, "ctx"):
            self.ctx.term()
        self._state = "stopped"
        with self._changed:
            self._changed.notify_all()

    close = stop

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def run(self) -> None:
        """Start if needed, block until SIGINT or SIGTERM, then stop cleanly.

        If the node's I/O thread crashed, its exception is re-raised here.
        """
        self.start()
        done = threading.Event()
        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda *_: done.set())
        try:
            assert self.engine is not None
            while not done.wait(0.2):
                if self.engine.stopped.is_set():
                    break
        finally:
            for prev_sig, handler in previous.items():
                signal.signal(prev_sig, handler)
            error = self.engine.error if self.engine else None
            self.stop()
        if error is not None:
            raise error

    def _engine_exited(self) -> None:
        self._state_changed()

    # ---- handlers --------------------------------------------------------------------------
    def subscribe(self, pattern: str, **options: Any) -> Callable[[F], F]:
        """Decorator: deliver messages whose topic matches ``pattern`` to the function.

        With a journal (meshmq.durability, docs/JOURNAL.md): ``replay="earliest" | <offset> |
        <datetime> | "latest"`` first delivers the stored messages from that point, then the
        live ones, with no gap and no duplicate; ``repair=True`` (the default with ``replay``)
        fetches messages missed live (high-water-mark drops, a full handler queue) from a
        journal and delivers them, in order, before the message that revealed the gap.
        """
        check_pattern(pattern)
        unknown = set(options) - {"replay", "repair"}
        if unknown:
            raise ConfigError(f"unknown subscribe option(s): {', '.join(sorted(unknown))}")

        def deco(fn: F) -> F:
            spec = HandlerSpec("subscribe", pattern, dict(options))
            record(fn, spec)
            self.add_handler(spec, fn)
            return fn
        return deco

    def register(self, obj: Any) -> int:
        """Bind every handler spec recorded on ``obj`` (a function, or an object's methods)."""
        found = 0
        candidates = [obj] if callable(obj) and specs_of(obj) else [
            getattr(obj, n) for n in dir(obj) if not n.startswith("__")]
        for fn in candidates:
            for spec in specs_of(fn) if callable(fn) else ():
                self.add_handler(spec, fn)
                found += 1
        return found

    def add_handler(self, spec: HandlerSpec, fn: Callable[..., Any]) -> None:
        """Bind one spec to this node, before or after start()."""
        if spec.kind == "subscribe":
            check_pattern(spec.name)
        with self.state_lock:
            self._specs.append((spec, fn))
            if self._state == "running":
                self._bind(spec, fn)
        if self._state == "running" and self.engine is not None:
            if spec.kind == "subscribe":
                self.engine.subscriptions_changed()
            else:
                self.engine.offer_changed()

    def _bind(self, spec: HandlerSpec, fn: Callable[..., Any]) -> None:
        label = f"{spec.kind}:{spec.name}:{getattr(fn, '__qualname__', type(fn).__name__)}"
        if spec.kind == "subscribe":
            if spec.options.get("replay") is not None or spec.options.get("repair"):
                # meshmq.durability: replay, then live; and/or gap repair from a journal
                fn = self._journal_client().replaying(spec, fn)
            runner = make_runner(fn, label, self.max_pending, self._handler_loop)
            self._runners.append(runner)
            self._subs = [*self._subs, (spec.name, matcher(spec.name), runner)]
            self._cache = {}  # after _subs: readers take the cache first, then _subs
        else:
            for plugin in self._plugins:
                if plugin.bind(self, spec, fn):
                    break
            else:
                raise ConfigError(f"no pattern handles {spec.kind!r} handlers")

    def _handler_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is not None:
            return self._loop
        if self._loop_thread is None:
            self._loop_thread = LoopThread(f"meshmq-async-{self.name}")
        return self._loop_thread.loop

    def _route(self, topic: str) -> tuple[Runner, ...]:
        cache = self._cache
        runners = cache.get(topic)
        if runners is None:
            runners = tuple(r for _, match, r in self._subs if match(topic))
            if len(cache) > 10_000:
                cache.clear()
            cache[topic] = runners
        return runners

    def _patterns(self) -> list[str]:
        return [spec.name for spec, _ in self._specs if spec.kind == "subscribe"]

    def _offers(self, kind: str) -> list[str]:
        return sorted({spec.name for spec, _ in self._specs if spec.kind == kind})

    @staticmethod
    def _prefix(pattern: str) -> bytes:
        return zmq_prefix(pattern)

    def _on_control(self, kind: str, fields: dict[str, Any], peer_id: str,
                    route: Any) -> None:
        for plugin in self._plugins:
            handler = getattr(plugin, "on_control", None)
            if handler is not None and handler(kind, fields, peer_id):
                return
        assert self.engine is not None
        self.engine.malformed += 1

    # ---- peers ---------------------------------------------------------------------------
    def on_peer_join(self, fn: F) -> F:
        """Decorator: call ``fn(PeerInfo)`` when a peer joins (in a thread of its own)."""
        self._join_cbs.append(fn)
        return fn

    def on_peer_leave(self, fn: F) -> F:
        """Decorator: call ``fn(PeerInfo)`` when a peer leaves (goodbye, timeout or restart)."""
        self._leave_cbs.append(fn)
        return fn

    def _peer_event(self, kind: str, info: PeerInfo) -> None:
        # Patterns hear of it at once, on the I/O thread (they keep their state there);
        # user callbacks run in a thread of their own.
        for plugin in self._plugins:
            hook = getattr(plugin, f"on_peer_{kind}", None)
            if hook is not None:
                try:
                    hook(info)
                except Exception:  # noqa: BLE001 - one pattern's bug must not stop the node
                    log.exception("peer %s hook of %r failed", kind, plugin)
        self._events.submit([(kind, info)])

    def _peer_updated(self, info: PeerInfo) -> None:
        for plugin in self._plugins:
            hook = getattr(plugin, "on_peer_update", None)
            if hook is not None:
                hook(info)

    def _run_peer_event(self, event: tuple[str, PeerInfo]) -> None:
        kind, info = event
        for cb in self._join_cbs if kind == "join" else self._leave_cbs:
            cb(info)

    def _offer_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for plugin in self._plugins:
            hook = getattr(plugin, "offer_fields", None)
            if hook is not None:
                out.update(hook())
        return out

    def peers(self) -> list[PeerInfo]:
        """The peers alive now."""
        if self.engine is None:
            return []
        with self.state_lock:
            return [p.info for p in self.engine.peers.values()]

    def connect(self, address: str) -> None:
        """Dial another node's control endpoint (as if it had been given in ``peers``)."""
        address = _check_endpoint(address)
        if self._state != "running" or self.engine is None:
            self.initial_peers.append(address)
        else:
            self.engine.dial(address)

    def _state_changed(self) -> None:
        with self._changed:
            self._changed.notify_all()
        for listener in self._listeners:
            listener()

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Block until ``predicate()`` is truthy (re-checked on every peer change)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                value = predicate()
                if value:
                    return value
                if self._state != "running":
                    raise NodeClosed(f"node {self.name!r} stopped while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise MeshTimeout(f"timed out after {timeout}s waiting for {what}")
                self._changed.wait(min(left, 0.5))

    # ---- pub/sub -----------------------------------------------------------------------------
    def subscribers(self, topic: str) -> int:
        """How many peers have a subscription matching ``topic`` in place on our socket."""
        if self.engine is None:
            return 0
        engine = self.engine
        with self.state_lock:
            return sum(
                1 for p in engine.peers.values()
                if engine.synced.get(p.info.id, -1) >= p.info.sub_version
                and any(matcher(pat)(topic) for pat in p.info.subscriptions))

    def wait_for_subscribers(self, topic: str, count: int = 1, timeout: float = 5.0) -> int:
        """Block until ``count`` peers subscribe to ``topic``; return how many do."""
        check_topic(topic)
        self._require_running()
        return int(self.wait_until(lambda: (n := self.subscribers(topic)) >= count and n,
                                   timeout, f"{count} subscriber(s) of {topic!r}"))

    def publish(self, topic: str, body: Any = None, headers: dict[str, Any] | None = None,
                *, confirm: bool = False, timeout: float = 5.0) -> str:
        """Send ``body`` to every subscriber of ``topic``; return the message id.

        Never blocks: past the high-water mark of a slow subscriber, messages to it are
        dropped by ZeroMQ, and the subscriber counts the gap. With ``confirm=True`` (meshmq.
        durability), also returns only once a journal covering ``topic`` has the message on
        disk per its fsync policy, resending it (same id) if the journal restarts; raises
        :class:`MeshTimeout` after ``timeout`` seconds.
        """
        raw = self._topics.get(topic)
        if raw is None:
            raw = check_topic(topic)
            if len(self._topics) < 10_000:
                self._topics[topic] = raw
        if headers is not None and type(headers) is not dict:
            raise EncodeError("headers must be a dict")
        lock = self.pub_lock
        lock.acquire()   # not `with`: its __enter__/__exit__ calls cost twice as much here
        try:
            if self._state != "running":
                self._require_running()
            seq = self._seqs.get(topic, 0) + 1
            msg_id = next(self._ids)
            ts = time.time()
            payload = self._encoder.encode(msg_id, self.name, self.id, seq, ts, headers, body)
            if len(payload) > self.max_message_bytes:
                raise EncodeError(f"message of {len(payload)} bytes is over max_message_bytes="
                                  f"{self.max_message_bytes}: every receiver would drop it")
            self._seqs[topic] = seq
            xpub = self.xpub
            _send_frame(xpub, raw, zio.SNDMORE)
            _send_frame(xpub, payload)
            self._sent += 1
        finally:
            lock.release()
        runners = self._cache.get(topic)   # self._route's first step, without the call
        if runners is None:
            runners = self._route(topic)
        if runners:
            msg = Message(topic, body, headers or {}, msg_id, self.name, self.id, seq, ts)
            for r in runners:
                r.submit([msg])
        if confirm:  # meshmq.durability: wait for a journal to have it on disk
            self._journal_client().confirm(topic, body, headers, msg_id, seq, ts, timeout)
        return msg_id

    # ---- journal (meshmq.durability) ---------------------------------------------------------
    def replay(self, pattern: str, since: Any = "earliest", until: Any = None,
               **options: Any) -> Any:
        """Iterate the stored messages matching ``pattern`` from a journal (meshmq.durability).

        ``since``: "earliest", "latest", a journal offset or a datetime; ``until``: None (the
        journal's end now), an offset or a datetime. Pulled in batches (flow control).
        """
        return self._journal_client().replay(pattern, since, until, **options)

    def _journal_client(self) -> Any:
        client = self._journal
        if client is None:
            from meshmq.durability._client import JournalClient
            with self.state_lock:
                client = self._journal
                if client is None:
                    client = self._journal = JournalClient(self)
                    self._plugins.append(client)
        return client

    def _require_running(self) -> None:
        if self._state != "running":
            raise NodeClosed(f"node {self.name!r} is {self._state}; call start() first"
                             if self._state == "new" else f"node {self.name!r} is {self._state}")

    # ---- pipelines -----------------------------------------------------------------------------
    def worker(self, queue: str, *, emit: str | None = None, concurrency: int = 1,
               max_attempts: int = 3, prefetch: int | None = None) -> Callable[[F], F]:
        """Decorator: one of the workers of ``queue`` gets each task (``msg.attempt`` counts).

        ``concurrency`` tasks run at once; ``prefetch`` more may wait here so that the next one
        is at hand when a handler returns. The credit this worker grants each pusher is
        ``concurrency + prefetch``: 0 gives the strictest fairness for slow tasks, more gives
        throughput for short ones. Left as None, it adapts to about 20 ms of the handler's
        measured work (0..128; 4 until measured): no prefetch for slow tasks, a deep window
        for short ones. A task whose handler raises
        ``max_attempts`` times goes to ``deadletter.<queue>``; with ``emit``, the return value
        is pushed on to that queue (under a derived id, so a redone task is recognisable).
        """
        from meshmq.patterns import worker_spec
        spec = worker_spec(queue, emit, concurrency, max_attempts, prefetch)

        def deco(fn: F) -> F:
            record(fn, spec)
            self.add_handler(spec, fn)
            return fn
        return deco

    def push(self, queue: str, body: Any = None, key: Any = None,
             headers: dict[str, Any] | None = None, *, block: bool = True,
             timeout: float | None = None) -> str:
        """Hand a task to one worker of ``queue``; return its id.

        Tasks with the same ``key`` go to the same live worker, in order. Past ``max_backlog``
        tasks outstanding, blocks (up to ``timeout``) or, with ``block=False``, raises
        :class:`Backpressure`.
        """
        return self._pipelines.push(queue, body, key, headers, block, timeout)

    def wait_for_tasks(self, queue: str | None = None, timeout: float | None = None) -> None:
        """Block until every task this node pushed (to ``queue``, or to any) is acknowledged
        or dead-lettered; raise :class:`MeshTimeout` after ``timeout`` seconds."""
        if not self._pipelines.wait_done(queue, timeout):
            raise MeshTimeout(f"tasks still outstanding after {timeout}s")

    def wait_for_workers(self, queue: str, count: int = 1, timeout: float = 5.0) -> int:
        """Block until ``count`` nodes work ``queue``; return how many do."""
        self._require_running()
        return int(self.wait_until(
            lambda: (n := self._pipelines.workers_for(queue)) >= count and n, timeout,
            f"{count} worker(s) of {queue!r}"))

    def servers_for(self, service: str) -> int:
        """How many nodes (this one included) serve ``service`` now."""
        n = sum(1 for p in self.peers() if service in p.services)
        return n + (1 if service in self._rpc.services else 0)

    def wait_for_servers(self, service: str, count: int = 1, timeout: float = 5.0) -> int:
        """Block until ``count`` nodes serve ``service``; return how many do."""
        self._require_running()
        return int(self.wait_until(
            lambda: (n := self.servers_for(service)) >= count and n, timeout,
            f"{count} server(s) of {service!r}"))

    # ---- RPC -------------------------------------------------------------------------------------
    def rpc(self, service: str, *, concurrency: int = 8) -> Callable[[F], F]:
        """Decorator: serve ``service``; up to ``concurrency`` calls run at once."""
        from meshmq.patterns import rpc_spec
        spec = rpc_spec(service, concurrency)

        def deco(fn: F) -> F:
            record(fn, spec)
            self.add_handler(spec, fn)
            return fn
        return deco

    def call(self, service: str, *args: Any, timeout: float = 5.0, retry: bool = False,
             **kwargs: Any) -> Any:
        """Call ``service`` on one of the nodes serving it; return its result.

        Raises :class:`RemoteError` if the handler raised, :class:`MeshTimeout` if no reply came
        in time, :class:`NoPeerError` if nobody served it within the timeout. ``retry=True``
        re-sends to another server if the first one dies: use it for idempotent calls only.
        """
        return self._rpc.call(service, args, kwargs, timeout, retry)

    # ---- observability -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters; every key is documented in ``Node.STATS_KEYS`` and docs/PROTOCOL.md."""
        e = self.engine
        runners = list(self._runners)
        out: dict[str, Any] = {
            "sent": self._sent,
            "received": e.received if e else 0,
            "delivered": sum(r.done for r in runners),
            "dropped": sum(r.dropped + r.abandoned for r in runners),
            "pending": sum(max(0, r.pending) for r in runners),
            "malformed": e.malformed if e else 0,
            "bad_version": e.bad_version if e else 0,
            "oversized": e.oversized if e else 0,
            "gaps": e.gaps if e else 0,
            "gaps_by_sender": dict(e.gaps_by_sender) if e else {},
            "handler_errors": sum(r.errors for r in runners) + (
                self._journal.handler_errors if self._journal is not None else 0),
            "peers": len(e.peers) if e else 0,
            "peer_joins": e.peer_joins if e else 0,
            "peer_leaves": e.peer_leaves if e else 0,
        }
        for plugin in self._plugins:
            extra = getattr(plugin, "stats", None)
            if extra is not None:
                out.update(extra())
        discovery = self._discovery
        if discovery is not None and hasattr(discovery, "stats"):
            out["discovery"] = discovery.stats()
        return out

    STATS_KEYS = STATS_KEYS

    # ---- discovery ---------------------------------------------------------------------------
    def _start_discovery(self) -> None:
        from meshmq._mdns_glue import start_discovery
        self._discovery = start_discovery(self)

    def __repr__(self) -> str:
        return f"<Node {self.name!r} id={self.id} {self._state}>"


def _check_endpoint(address: str) -> str:
    zio.split_endpoint(address)
    return address
