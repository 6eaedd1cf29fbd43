"""RPC: call a function on another node; calls spread over the nodes that serve it.

Arguments and results are msgpack (never pickle). A handler's exception comes back as
:class:`RemoteError` (type name, message, traceback text). A server that dies mid-call fails the
call with :class:`PeerGone`, or, with ``retry=True`` (only for idempotent calls), sends it to
another server. State lives on the node's I/O thread; callers wait on futures.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meshmq.patterns._pool import Pool, describe_error

from meshmq._codec import decode, encode
from meshmq._dispatch import HandlerSpec
from meshmq._errors import (
    DecodeError,
    EncodeError,
    MeshError,
    MeshTimeout,
    NoPeerError,
    PeerGone,
    RemoteError,
)
from meshmq._peers import PeerInfo
from meshmq._topics import check_topic

if TYPE_CHECKING:
    from meshmq._node import Node

__all__ = ["PeerGone", "Rpc"]

log = logging.getLogger("meshmq")


@dataclass(eq=False)
class _Call:
    id: str
    service: str
    payload: bytes               # msgpack of [args, kwargs], encoded once by the caller
    future: concurrent.futures.Future[Any]
    deadline: float
    retry: bool
    server: str | None = None
    tried: set[str] = field(default_factory=set)


class Rpc:
    """The RPC pattern, plugged into a Node."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.services: dict[str, Pool] = {}
        self.pending: dict[str, _Call] = {}      # I/O thread only
        self.parked: list[_Call] = []            # no server yet: waiting for one to join
        self._ids = itertools.count(1)
        self._rr = itertools.count()
        self.counters = {"calls_made": 0, "calls_served": 0, "calls_retried": 0,
                         "calls_failed_remote": 0, "calls_raised": 0}

    # ---- plugin hooks -----------------------------------------------------------------------
    def bind(self, node: Node, spec: HandlerSpec, fn: Callable[..., Any]) -> bool:
        if spec.kind != "rpc":
            return False
        self.services[spec.name] = Pool(fn, f"rpc-{spec.name}", spec.options["concurrency"],
                                        node._handler_loop)
        return True

    def start(self, node: Node) -> None:
        pass

    def stop(self, node: Node) -> None:
        for pool in self.services.values():
            pool.close(0.5)
        for call in [*self.pending.values(), *self.parked]:
            if not call.future.done():
                call.future.set_exception(PeerGone("the calling node stopped"))

    def stats(self) -> dict[str, int]:
        return {**self.counters, "calls_pending": len(self.pending) + len(self.parked)}

    def on_control(self, kind: str, fields: dict[str, Any], peer_id: str) -> bool:
        if kind == "call":
            self._serve(fields, peer_id)
        elif kind == "reply":
            self._on_reply(fields, peer_id)
        else:
            return False
        return True

    def on_peer_join(self, info: PeerInfo) -> None:
        if self.parked and info.services:
            parked, self.parked = self.parked, []
            for call in parked:
                self._start(call)

    on_peer_update = on_peer_join

    def on_peer_leave(self, info: PeerInfo) -> None:
        for call in [c for c in self.pending.values() if c.server == info.id]:
            del self.pending[call.id]
            if call.retry and time.monotonic() < call.deadline:
                self.counters["calls_retried"] += 1
                log.warning("server %s left during %s: retrying elsewhere", info.name,
                            call.service)
                self._start(call)
            elif not call.future.done():
                call.future.set_exception(PeerGone(
                    f"{info.name} left while serving {call.service!r} (pass retry=True for "
                    "idempotent calls)"))

    def tick(self, now: float) -> None:
        """Fail parked calls whose deadline passed (no server appeared)."""
        if self.parked:
            keep = []
            for call in self.parked:
                if now >= call.deadline:
                    if not call.future.done():
                        call.future.set_exception(NoPeerError(
                            f"no node serves {call.service!r}"))
                else:
                    keep.append(call)
            self.parked = keep

    # ---- the caller's side ------------------------------------------------------------------------
    def begin(self, service: str, args: tuple[Any, ...], kwargs: dict[str, Any],
              timeout: float, retry: bool) -> _Call:
        """Start a call from any thread; the returned call's future settles with the result."""
        check_topic(service)
        node = self.node
        node._require_running()
        payload = encode([list(args), kwargs])
        if len(payload) > node.max_message_bytes:
            raise EncodeError(f"call arguments of {len(payload)} bytes are over "
                              f"max_message_bytes={node.max_message_bytes}")
        call = _Call(f"{node.id}-c{next(self._ids):x}", service, payload,
                     concurrent.futures.Future(), time.monotonic() + timeout, retry)
        self.counters["calls_made"] += 1
        assert node.engine is not None
        node.engine.call(lambda: self._start(call))
        return call

    def call(self, service: str, args: tuple[Any, ...], kwargs: dict[str, Any],
             timeout: float, retry: bool) -> Any:
        call = self.begin(service, args, kwargs, timeout, retry)
        try:
            return call.future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise self._timed_out(call, timeout) from None

    async def acall(self, service: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                    timeout: float, retry: bool) -> Any:
        # One loop future settled straight from the I/O thread, and one call_later for the
        # timeout: asyncio.wait_for(wrap_future(...)) costs ~40 us of loop time per call.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()
        call = self.begin(service, args, kwargs, timeout, retry)

        def settle(f: concurrent.futures.Future[Any]) -> None:
            if not waiter.done():
                exc = f.exception()
                if exc is None:
                    waiter.set_result(f.result())
                else:
                    waiter.set_exception(exc)

        call.future.add_done_callback(lambda f: loop.call_soon_threadsafe(settle, f))
        def timed_out() -> None:
            if not waiter.done():
                waiter.set_exception(TimeoutError())

        expire = loop.call_later(timeout, timed_out)
        try:
            return await waiter
        except TimeoutError:
            if call.future.done() and not call.future.cancelled() and \
                    call.future.exception() is None:
                return call.future.result()
            raise self._timed_out(call, timeout) from None
        finally:
            expire.cancel()

    def _timed_out(self, call: _Call, timeout: float) -> MeshError:
        engine = self.node.engine
        if engine is not None:
            engine.call(lambda: self._forget(call))
        if call.server is None:
            return NoPeerError(f"no node serves {call.service!r} (waited {timeout}s)")
        return MeshTimeout(f"{call.service!r} did not answer within {timeout}s")

    def _forget(self, call: _Call) -> None:
        self.pending.pop(call.id, None)
        if call in self.parked:
            self.parked.remove(call)

    # ---- I/O thread -----------------------------------------------------------------------------
    def _servers(self, service: str) -> list[str]:
        engine = self.node.engine
        assert engine is not None
        out = sorted(pid for pid, p in engine.peers.items() if service in p.info.services)
        if service in self.services:
            out.append(self.node.id)
        return out

    def _start(self, call: _Call) -> None:
        if call.future.done():
            return
        servers = self._servers(call.service)
        fresh = [s for s in servers if s not in call.tried] or servers
        if not fresh:
            self.parked.append(call)
            return
        server = fresh[next(self._rr) % len(fresh)]
        call.server = server
        call.tried.add(server)
        self.pending[call.id] = call
        if server == self.node.id:
            self._serve_local(call.service, call.payload, lambda ok, v: self.node.engine.call(  # type: ignore[union-attr]
                lambda: self._settle(call.id, server, ok, v)))
            return
        assert self.node.engine is not None
        self.node.engine.send_to(server, "call", {
            "svc": call.service, "id": call.id, "a": call.payload,
            "ttl": max(0.0, call.deadline - time.monotonic())})

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
        call = self.pending.get(cid)
        if call is None or call.server != server:
            return  # late: timed out, or already retried elsewhere
        del self.pending[cid]
        if call.future.done():
            return
        if ok:
            try:
                call.future.set_result(decode(value) if type(value) is bytes else value)
            except DecodeError as exc:
                call.future.set_exception(exc)
            return
        err = value if type(value) is dict else {}
        if err.get("retry") is True and any(
                s not in call.tried for s in self._servers(call.service)):
            self.counters["calls_retried"] += 1
            self._start(call)  # the server no longer serves it: another one may
            return
        self.counters["calls_failed_remote"] += 1
        call.future.set_exception(RemoteError(str(err.get("type", "Exception")),
                                              str(err.get("message", "")),
                                              str(err.get("traceback", ""))))

    def _serve(self, fields: dict[str, Any], peer_id: str) -> None:
        engine = self.node.engine
        assert engine is not None
        cid, svc, payload = fields.get("id"), fields.get("svc"), fields.get("a")
        if type(cid) is not str or type(svc) is not str or type(payload) is not bytes:
            engine.malformed += 1
            return

        def reply(ok: bool, value: Any) -> None:
            engine.call(lambda: engine.send_to(peer_id, "reply", {"id": cid, "ok": ok, (
                "r" if ok else "e"): value}))

        self._serve_local(svc, payload, reply)

    def _serve_local(self, svc: str, payload: bytes, reply: Callable[[bool, Any], None]) -> None:
        """Run a call on this node; ``reply(ok, msgpack result | error dict)`` from any thread."""
        pool = self.services.get(svc)
        if pool is None:
            # a stale offer sent the call here: the caller may try another server
            reply(False, {"type": "NoPeerError", "message": f"{svc!r} is not served here",
                          "retry": True})
            return
        try:
            args, kwargs = decode(payload)
            if type(args) is not list or type(kwargs) is not dict:
                raise DecodeError("call arguments are not [args, kwargs]")
        except (DecodeError, TypeError, ValueError) as exc:
            reply(False, describe_error(exc))
            return
        self.counters["calls_served"] += 1

        def done(ok: bool, value: Any) -> None:
            if ok:
                try:
                    result = encode(value)
                    if len(result) > self.node.max_message_bytes:
                        raise EncodeError(f"result of {len(result)} bytes is over "
                                          f"max_message_bytes={self.node.max_message_bytes}")
                    reply(True, result)
                except MeshError as exc:
                    reply(False, describe_error(exc))
            else:
                self.counters["calls_raised"] += 1  # the caller gets it as RemoteError
                reply(False, describe_error(value))

        pool.submit(tuple(args), kwargs, done)


def rpc_spec(service: str, concurrency: int) -> HandlerSpec:
    check_topic(service)
    return HandlerSpec("rpc", service, {"concurrency": concurrency})
