"""RPC: call a function on another node; calls spread over the nodes that serve it.

Arguments and results are msgpack (never pickle). A handler's exception comes back as
:class:`RemoteError` (type name, message, traceback text). A server that dies mid-call fails the
call with :class:`PeerGone`, or, with ``retry=True`` (only for idempotent calls), sends it to
another server. Calls and replies are sent by the thread that makes them; replies are read by
the node's I/O thread, which wakes the caller; except on the lane (``_lane.py``), where a sync
caller reads its own reply and the server's reading thread runs the handler.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshmq.patterns._calls import Call, Expired, LoopWaker, pack
from meshmq.patterns._lane import HAVE_LANE, LaneCaller, LaneCallers, LaneServer
from meshmq.patterns._pool import Abandoned, Pool, describe_error

from meshmq._codec import decode, encode
from meshmq._dispatch import HandlerSpec
from meshmq._envelope import PROTO, decode_ctl
from meshmq._errors import (
    DecodeError,
    EncodeError,
    MeshError,
    MeshTimeout,
    NoPeerError,
    PeerGone,
    ProtocolVersionError,
    RemoteError,
)
from meshmq._peers import PeerInfo
from meshmq._topics import check_topic

if TYPE_CHECKING:
    from meshmq._node import Node

__all__ = ["PeerGone", "Rpc"]

log = logging.getLogger("meshmq")
#: The ttl a call carries is what the caller has left minus this allowance for the call's
#: transit: the server counts ttl from when the call arrived, so without it a call could still
#: start there after its caller gave up.
TTL_TRANSIT = 0.005


class Rpc:
    """The RPC pattern, plugged into a Node.

    Calls and replies leave from the thread that makes them (``Engine.send_to`` is
    thread-safe); replies arrive on the I/O thread. ``lock`` guards the call tables.
    """

    def __init__(self, node: Node) -> None:
        self.node = node
        self.services: dict[str, Pool] = {}
        self.lock = threading.Lock()
        self.pending: dict[str, Call] = {}      # sent, awaiting a reply
        self.parked: list[Call] = []            # no server yet: waiting for one to join
        self._servers_cache: dict[str, list[str]] = {}   # replaced whenever a peer changes
        self._lane_eps: dict[str, str | None] = {}        # server -> its lane; the same
        self._wakers: dict[asyncio.AbstractEventLoop, LoopWaker] = {}
        self._checked: set[str] = set()          # service names that passed check_topic
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self.counters = {"calls_made": 0, "calls_served": 0, "calls_retried": 0,
                         "calls_failed_remote": 0, "calls_raised": 0, "calls_expired": 0,
                         "calls_lane": 0}
        # the lane (see _lane.py): served here once a service is bound; callers' DEALERs
        self.use_lane = HAVE_LANE and getattr(node, "rpc_lane", True)
        self.lane: LaneServer | None = None
        self.lanes = LaneCallers(node, self._live_lanes)
        self._next_prune = 0.0

    # ---- plugin hooks -----------------------------------------------------------------------
    def bind(self, node: Node, spec: HandlerSpec, fn: Callable[..., Any]) -> bool:
        if spec.kind != "rpc":
            return False
        self.services[spec.name] = Pool(fn, f"rpc-{spec.name}", spec.options["concurrency"],
                                        node._handler_loop)
        self._servers_cache = {}
        self._lane_eps = {}
        if self.lane is None and self.use_lane:
            # before the offer that names the service goes out (Node.add_handler, start)
            self.lane = LaneServer(node, self._serve_lane, self._run_lane, self._lane_threads)
            node.extra_endpoints["rpc"] = self.lane.advertised
        return True

    def _live_lanes(self) -> set[str]:
        """The lane endpoints of the peers alive now."""
        engine = self.node.engine
        if engine is None:
            return set()
        with self.node.state_lock:
            return {ep for p in engine.peers.values()
                    if (ep := p.info.endpoints.get("rpc")) is not None}

    def _lane_threads(self) -> int:
        # one reader per handler that can run at once, and one to read while they all do
        return 1 + sum(p.concurrency for p in list(self.services.values()) if not p.is_async)

    def start(self, node: Node) -> None:
        assert node.engine is not None
        node.engine.ctl_handlers.update({"call": self._serve, "reply": self._on_reply})

    def stop(self, node: Node) -> None:
        if self.lane is not None:
            self.lane.close(0.5)   # first: no more calls start; handlers running finish
        for pool in self.services.values():
            pool.close(0.5)
        with self.lock:
            calls = [*self.pending.values(), *self.parked]
            self.pending.clear()
            self.parked = []
        for call in calls:
            self._finish(call, False, PeerGone("the calling node stopped"))
        self.lanes.close()

    def stats(self) -> dict[str, int]:
        lane = self.lane
        return {**self.counters, "calls_pending": len(self.pending) + len(self.parked),
                "calls_served_lane": lane.served if lane is not None else 0}

    def on_control(self, kind: str, fields: dict[str, Any], peer_id: str) -> bool:
        if kind == "call":
            self._serve(fields, peer_id)
        elif kind == "reply":
            self._on_reply(fields, peer_id)
        else:
            return False
        return True

    def on_peer_join(self, info: PeerInfo) -> None:
        self._servers_cache = {}
        self._lane_eps = {}
        if self.parked and info.services:
            with self.lock:
                parked, self.parked = self.parked, []
            for call in parked:
                self._start(call)

    on_peer_update = on_peer_join

    def on_peer_leave(self, info: PeerInfo) -> None:
        # The engine dropped the peer before telling us: a call that picks a server after the
        # scan below cannot pick this one, and one that picked it before is in pending.
        self._servers_cache = {}
        self._lane_eps = {}
        self.lanes.gen += 1   # callers close their DEALERs to lanes no peer has any more
        with self.lock:
            gone = [c for c in self.pending.values() if c.server == info.id]
            for call in gone:
                del self.pending[call.id]
        for call in gone:
            if call.retry and time.monotonic() < call.deadline:
                self.counters["calls_retried"] += 1
                log.warning("server %s left during %s: retrying elsewhere", info.name,
                            call.service)
                self._start(call)
            else:
                self._finish(call, False, PeerGone(
                    f"{info.name} left while serving {call.service!r} (pass retry=True for "
                    "idempotent calls)"))

    def tick(self, now: float) -> None:
        """Fail parked calls whose deadline passed (no server appeared); once a second, close
        the lane sockets of calling threads that ended."""
        if now >= self._next_prune:
            self._next_prune = now + 1.0
            self.lanes.prune_dead()
        if self.parked:
            with self.lock:
                expired = [c for c in self.parked if now >= c.deadline]
                if expired:
                    self.parked = [c for c in self.parked if now < c.deadline]
            for call in expired:
                self._finish(call, False, NoPeerError(f"no node serves {call.service!r}"))

    # ---- the caller's side ------------------------------------------------------------------------
    def begin(self, service: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              timeout: float, retry: bool, notify: Callable[[Call], None] | None = None,
              batch: LoopWaker | None = None, caller: LaneCaller | None = None) -> Call:
        """Start a call from any thread; it settles with ``notify(call)`` or its waiter."""
        if service not in self._checked:
            check_topic(service)
            if len(self._checked) < 10_000:
                self._checked.add(service)
        node = self.node
        if node._state != "running":
            node._require_running()
        payload = encode([list(args), kwargs])   # what a server would refuse fails here
        if len(payload) > node.max_message_bytes:
            raise EncodeError(f"call arguments of {len(payload)} bytes are over "
                              f"max_message_bytes={node.max_message_bytes}")
        call = Call(f"{node.id}-c{next(self._ids):x}", service, payload,
                     time.monotonic() + timeout, retry, notify)
        self._start(call, batch, first=True, caller=caller)
        return call

    def call(self, service: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             timeout: float, retry: bool) -> Any:
        caller = self.lanes.mine() if self.use_lane else None
        call = self.begin(service, args, kwargs, timeout, retry, caller=caller)
        deadline = call.deadline
        waiter = call.waiter
        assert waiter is not None
        entry = call.entry
        if entry is not None and caller is not None:
            # sent on the lane: read the reply here (settled another way, we are woken)
            self.lanes.wait(caller, entry, call, self._lane_reply, deadline)
            if call.done:   # ok and value are set before done (_finish)
                return call.result()
        if not waiter.acquire(timeout=max(0.0, deadline - time.monotonic())) \
                and not self._give_up(call):
            raise self._timed_out(call, timeout)
        return call.result()

    def _lane_reply(self, call: Call, frame: bytes) -> bool:
        """A frame off this thread's lane while it waits for ``call``: True once it settled.

        Only this thread's calls use its DEALER, one at a time: a reply for another id is a
        late one for a call it gave up on, ignored as on the control plane (13.2).
        """
        try:
            kind, fields = decode_ctl(frame)
        except (DecodeError, ProtocolVersionError):
            kind, fields = "", {}
        cid = fields.get("id")
        if kind != "reply" or type(cid) is not str:
            engine = self.node.engine
            if engine is not None:
                engine.malformed += 1
            return call.done
        if cid == call.id:
            with self.lock:
                if self.pending.get(cid) is not call:
                    return call.done   # settled another way meanwhile
                del self.pending[cid]
            ok = bool(fields.get("ok"))
            self._complete(call, ok, fields.get("r" if ok else "e"))
        return call.done

    async def acall(self, service: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    timeout: float, retry: bool) -> Any:
        # One loop future settled in batches from the settling thread, and a shared timer slot
        # for the timeout: asyncio.wait_for(wrap_future(...)) costs ~40 us of loop time a call.
        loop = asyncio.get_running_loop()
        waker = self._wakers.get(loop)
        if waker is None:
            for old in [lp for lp in self._wakers if lp.is_closed()]:
                self._wakers.pop(old, None)
            waker = self._wakers[loop] = LoopWaker(loop)
        waiter: asyncio.Future[Any] = loop.create_future()
        call = self.begin(service, args, kwargs, timeout, retry,
                          lambda c: waker.add(waiter, c), waker)
        slot = waker.expire_after(timeout, call.id, waiter)
        try:
            return await waiter
        except Expired:
            if self._give_up(call):
                return call.result()
            raise self._timed_out(call, timeout) from None
        except asyncio.CancelledError:
            self._give_up(call)
            raise
        finally:
            waker.forget(slot, call.id)

    def _give_up(self, call: Call) -> bool:
        """The caller's timeout ran out: True if the call settled after all, else forget it."""
        with self.lock:
            if call.done:
                return True
            call.abandoned = True
            self.pending.pop(call.id, None)
            if call in self.parked:
                self.parked.remove(call)
        return False

    def _timed_out(self, call: Call, timeout: float) -> MeshError:
        if call.server is None:
            return NoPeerError(f"no node serves {call.service!r} (waited {timeout}s)")
        return MeshTimeout(f"{call.service!r} did not answer within {timeout}s")

    def _finish(self, call: Call, ok: bool, value: Any) -> None:
        """Settle a call its settler took out of the tables (so exactly once), any thread."""
        call.ok, call.value, call.done = ok, value, True
        if call.waiter is not None:
            lane = call.lane
            if lane is not None and lane.ident != threading.get_ident():
                lane.wake()   # it polls its lane: settled elsewhere (retry, peer left, stop)
            call.waiter.release()
        elif call.notify is not None:
            call.notify(call)

    def _servers(self, service: str) -> list[str]:
        cache = self._servers_cache   # before reading the peers: a change replaces it after
        out = cache.get(service)
        if out is None:
            engine = self.node.engine
            assert engine is not None
            with self.node.state_lock:
                out = sorted(pid for pid, p in engine.peers.items()
                             if service in p.info.services)
            if service in self.services:
                out.append(self.node.id)
            if len(cache) < 10_000:
                cache[service] = out
        return out

    def _start(self, call: Call, batch: LoopWaker | None = None, first: bool = False,
               caller: LaneCaller | None = None) -> None:
        """Send a call to one of its servers (any thread), or park it until one joins.

        ``batch``: the caller's loop, which sends at the end of its iteration. ``caller``: the
        sync caller's lane, tried first (only on the caller's own thread).
        """
        with self.lock:
            if first:  # counted here, under the lock: callers run on many threads
                self.counters["calls_made"] += 1
            if call.done or call.abandoned:
                return
            servers = self._servers(call.service)
            fresh = ([s for s in servers if s not in call.tried] or servers) if call.tried \
                else servers
            if not fresh:
                self.parked.append(call)
                return
            server = fresh[next(self._rr) % len(fresh)] if len(fresh) > 1 else fresh[0]
            call.server = server
            call.tried.add(server)
            self.pending[call.id] = call
        if server == self.node.id:
            self._serve_local(call.service, call.payload,
                              lambda ok, v: self._settle(call.id, server, ok, v), call.deadline)
            return
        engine = self.node.engine
        assert engine is not None
        payload = pack([PROTO, "call", {
            "svc": call.service, "id": call.id, "a": call.payload,
            "ttl": max(0.0, call.deadline - time.monotonic() - TTL_TRANSIT)}])
        if caller is not None:
            eps = self._lane_eps   # replaced whenever a peer changes, as _servers_cache
            endpoint = eps.get(server, "")
            if endpoint == "":
                peer = engine.peers.get(server)
                endpoint = eps[server] = \
                    peer.info.endpoints.get("rpc") if peer is not None else None
            if endpoint is not None:
                entry = self.lanes.send(caller, endpoint, payload)
                if entry is not None:
                    call.lane, call.entry = caller, entry
                    with self.lock:   # callers run on many threads
                        self.counters["calls_lane"] += 1
                    return
        if batch is not None:
            batch.send(engine, server, payload)
        else:
            # If the server left meanwhile, on_peer_leave fails or retries it from pending.
            engine.send_payload(server, payload)

    # ---- replies (I/O thread; local calls: pool threads) ------------------------------------------
    def _on_reply(self, fields: dict[str, Any], peer_id: str) -> None:
        cid = fields.get("id")
        if type(cid) is not str:
            engine = self.node.engine
            if engine is not None:
                engine.malformed += 1
            return
        if fields.get("ok"):
            self._settle(cid, peer_id, True, fields.get("r"))
        else:
            self._settle(cid, peer_id, False, fields.get("e"))

    def _settle(self, cid: str, server: str, ok: bool, value: Any) -> None:
        with self.lock:
            call = self.pending.get(cid)
            if call is None or call.server != server:
                return  # late: timed out, or already retried elsewhere
            del self.pending[cid]
        self._complete(call, ok, value)

    def _complete(self, call: Call, ok: bool, value: Any) -> None:
        """Settle a call its settler took out of pending: decode, retry or raise."""
        if ok:
            try:
                result = decode(value) if type(value) is bytes else value
            except DecodeError as exc:
                self._finish(call, False, exc)
            else:
                self._finish(call, True, result)
            return
        err = value if type(value) is dict else {}
        if err.get("retry") is True and any(
                s not in call.tried for s in self._servers(call.service)):
            self.counters["calls_retried"] += 1
            self._start(call)  # the server no longer serves it: another one may
            return
        self.counters["calls_failed_remote"] += 1
        self._finish(call, False, RemoteError(str(err.get("type", "Exception")),
                                              str(err.get("message", "")),
                                              str(err.get("traceback", ""))))

    # ---- the server's side ------------------------------------------------------------------------
    def _call_fields(self, fields: dict[str, Any]) -> tuple[str, str, bytes] | None:
        """A call's id, service and arguments; None (counted malformed) if any is bad."""
        cid, svc, payload = fields.get("id"), fields.get("svc"), fields.get("a")
        if type(cid) is not str or type(svc) is not str or type(payload) is not bytes:
            engine = self.node.engine
            if engine is not None:
                engine.malformed += 1
            return None
        return cid, svc, payload

    @staticmethod
    def _expires(fields: dict[str, Any]) -> float | None:
        """When a call's caller gives up (its ttl from now): a call still waiting for a
        worker then is not run."""
        ttl = fields.get("ttl")
        if (type(ttl) is float or type(ttl) is int) and ttl >= 0:
            return time.monotonic() + ttl
        return None

    @staticmethod
    def _reply_payload(cid: str, ok: bool, value: Any) -> bytes:
        return pack([PROTO, "reply", {"id": cid, "ok": ok, ("r" if ok else "e"): value}])

    def _serve(self, fields: dict[str, Any], peer_id: str) -> None:
        engine = self.node.engine
        assert engine is not None
        call = self._call_fields(fields)
        if call is None:
            return
        cid, svc, payload = call

        def reply(ok: bool, value: Any) -> None:
            # straight from the pool thread: the engine's control sockets are thread-safe
            engine.send_payload(peer_id, self._reply_payload(cid, ok, value))

        self._serve_local(svc, payload, reply, self._expires(fields))

    def _serve_lane(self, lane: LaneServer, ident: bytes, frame: bytes
                    ) -> tuple[Any, ...] | None:
        """A call read off the lane (its reading thread): a job for that thread to run
        (``_run_lane``), with a worker claimed from the service's pool; or None when it was
        queued for the pool or answered already."""
        try:
            kind, fields = decode_ctl(frame)
        except (DecodeError, ProtocolVersionError):
            kind, fields = "", {}
        fields_ok = self._call_fields(fields if kind == "call" else {})
        if fields_ok is None:
            return None
        cid, svc, payload = fields_ok

        def reply(ok: bool, value: Any) -> None:
            lane.reply(ident, self._reply_payload(cid, ok, value))

        pool = self.services.get(svc)
        call = self._decode_call(svc, pool, payload, reply)
        if call is None:
            return None
        assert pool is not None
        worker = pool.claim()
        if worker is not None:
            return pool, worker, call[0], call[1], reply
        pool.submit(call[0], call[1], self._done(reply), self._expires(fields))
        return None

    def _run_lane(self, job: tuple[Any, ...]) -> None:
        """Run a job of _serve_lane on the lane thread that read it, and reply."""
        pool, worker, args, kwargs, reply = job
        ok, value = pool.run_claimed(worker, args, kwargs)
        self._reply_outcome(reply, ok, value)

    def _serve_local(self, svc: str, payload: bytes, reply: Callable[[bool, Any], None],
                     expires: float | None = None) -> None:
        """Run a call on this node; ``reply(ok, msgpack result | error dict)`` from any thread."""
        pool = self.services.get(svc)
        call = self._decode_call(svc, pool, payload, reply)
        if call is not None:
            assert pool is not None
            pool.submit(call[0], call[1], self._done(reply), expires)

    def _decode_call(self, svc: str, pool: Pool | None, payload: bytes,
                     reply: Callable[[bool, Any], None]
                     ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """(args, kwargs) of a call to run, or None if it was answered with an error."""
        if pool is None:
            # a stale offer sent the call here: the caller may try another server
            reply(False, {"type": "NoPeerError", "message": f"{svc!r} is not served here",
                          "retry": True})
            return None
        try:
            args, kwargs = decode(payload)
            if type(args) is not list or type(kwargs) is not dict:
                raise DecodeError("call arguments are not [args, kwargs]")
        except (DecodeError, TypeError, ValueError) as exc:
            reply(False, describe_error(exc))
            return None
        self.counters["calls_served"] += 1
        return tuple(args), kwargs

    def _done(self, reply: Callable[[bool, Any], None]) -> Callable[[bool, Any], None]:
        """The pool's done callback of a call: its outcome, encoded, to ``reply``."""
        return lambda ok, value: self._reply_outcome(reply, ok, value)

    def _reply_outcome(self, reply: Callable[[bool, Any], None], ok: bool, value: Any) -> None:
        """A handler's outcome (result, or exception) as a reply (any thread)."""
        if ok:
            try:
                result = encode(value)
                if len(result) > self.node.max_message_bytes:
                    raise EncodeError(f"result of {len(result)} bytes is over "
                                      f"max_message_bytes={self.node.max_message_bytes}")
            except MeshError as exc:
                reply(False, describe_error(exc))
            else:
                reply(True, result)
        elif isinstance(value, Abandoned):
            self.counters["calls_expired"] += 1   # nobody waits for the answer any more
            reply(False, describe_error(value))
        else:
            self.counters["calls_raised"] += 1  # the caller gets it as RemoteError
            reply(False, describe_error(value))


def rpc_spec(service: str, concurrency: int) -> HandlerSpec:
    check_topic(service)
    return HandlerSpec("rpc", service, {"concurrency": concurrency})
