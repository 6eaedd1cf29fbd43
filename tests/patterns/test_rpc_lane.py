"""The RPC lane (docs/PROTOCOL.md 13.5): sync calls on a socket pair of their own, real sockets."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq

from meshmq import MeshTimeout, Node, PeerGone, RemoteError
from meshmq.testing import Overlap, wait_until


def _lane_ready(client: Node, service: str, echo: Any = 0) -> None:
    """Call until one of this thread's calls went on the lane (a thread's first call to a
    server goes on the control socket while its lane DEALER connects)."""
    caller = client._rpc.lanes.mine()
    assert caller is not None
    before = caller.sent
    wait_until(lambda: client.call(service, echo, timeout=5) == echo and caller.sent > before,
               timeout=5, what="a call on the lane")


def _echo_server(make_node: Callable[..., Node], client: Node, **kw: Any) -> Node:
    server = make_node("server", peers=[client.address], **kw)

    @server.rpc("echo")
    def echo(x: Any) -> Any:
        return x

    client.wait_for_servers("echo", timeout=5)
    return server


def test_sync_calls_take_the_lane_once_it_is_connected(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = _echo_server(make_node, client)
    assert "rpc" in server.extra_endpoints
    _lane_ready(client, "echo")
    lane0, served0 = client.stats()["calls_lane"], server.stats()["calls_served_lane"]
    took = []
    for i in range(50):
        t0 = time.monotonic()
        assert client.call("echo", i, timeout=5) == i
        took.append(time.monotonic() - t0)
    # a lost wake-up would still end, at the next 1 s look at the socket: none took that long
    assert max(took) < 0.5, max(took)
    assert client.stats()["calls_lane"] - lane0 == 50
    assert server.stats()["calls_served_lane"] - served0 == 50
    assert client.stats()["calls_pending"] == 0


def test_without_a_lane_calls_take_the_control_socket(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = _echo_server(make_node, client, rpc_lane=False)
    assert "rpc" not in server.extra_endpoints
    assert [client.call("echo", i, timeout=5) for i in range(20)] == list(range(20))
    assert client.stats()["calls_lane"] == 0
    assert server.stats()["calls_served"] == 20


def test_errors_and_timeouts_on_the_lane(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    gate = threading.Event()

    @server.rpc("echo", concurrency=2)
    def echo(x: Any) -> Any:
        if x == "raise":
            raise ValueError("no such thing")
        if x == "stall":
            gate.wait(10)
        return x

    client.wait_for_servers("echo", timeout=5)
    _lane_ready(client, "echo")
    with pytest.raises(RemoteError) as info:
        client.call("echo", "raise", timeout=5)
    assert info.value.type_name == "ValueError"
    with pytest.raises(MeshTimeout):
        client.call("echo", "stall", timeout=0.2)
    gate.set()
    # the stalled call's reply comes late, on the same DEALER: it is ignored, not taken as this
    # call's answer
    assert client.call("echo", "after", timeout=5) == "after"
    assert client.call("echo", "again", timeout=5) == "again"


def test_a_slow_handler_does_not_hold_up_calls_behind_it(make_node: Callable[..., Node]) -> None:
    """The thread that reads the lane runs a handler itself; while it does, another takes over
    the reading: four calls of a concurrency-4 service run at once (a barrier of 4)."""
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    barrier = threading.Barrier(4, timeout=10)

    @server.rpc("meet", concurrency=4)
    def meet(i: int) -> int:
        if i >= 0:
            barrier.wait()   # breaks (and the call raises) unless all four run at once
        return i

    client.wait_for_servers("meet", timeout=5)
    results: dict[int, Any] = {}

    def caller(i: int) -> None:
        _lane_ready(client, "meet", -1)   # this thread's lane is connected
        ready.wait(10)
        try:
            results[i] = client.call("meet", i, timeout=15)
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            results[i] = exc

    ready = threading.Event()
    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: client.stats()["calls_lane"] >= 4, timeout=10, what="four lanes")
    lane0 = client.stats()["calls_lane"]
    ready.set()
    for t in threads:
        t.join(20)
    assert results == {0: 0, 1: 1, 2: 2, 3: 3}
    assert client.stats()["calls_lane"] - lane0 == 4
    assert server._rpc.lane is not None and server._rpc.lane.handovers >= 1


def test_concurrency_bounds_handlers_on_the_lane(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    overlap = Overlap()
    work = threading.Event()   # never set: each call works for 20 ms

    @server.rpc("bounded", concurrency=2)
    def bounded(i: int) -> int:
        with overlap:
            work.wait(0.02)
        return i

    client.wait_for_servers("bounded", timeout=5)
    out: list[int] = []

    def caller(base: int) -> None:
        for i in range(5):
            out.append(client.call("bounded", base + i, timeout=10))

    threads = [threading.Thread(target=caller, args=(10 * k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(out) == sorted(10 * k + i for k in range(6) for i in range(5))
    assert overlap.most == 2
    assert server.stats()["calls_served_lane"] > 0


def test_async_handler_replies_on_the_lane(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])

    @server.rpc("double")
    async def double(x: int) -> int:
        return 2 * x

    client.wait_for_servers("double", timeout=5)
    _lane_ready(client, "double", 0)
    assert [client.call("double", i, timeout=5) for i in range(20)] == [2 * i for i in range(20)]
    assert server.stats()["calls_served_lane"] >= 20


def test_malformed_lane_messages_are_counted_and_dropped(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = _echo_server(make_node, client)
    endpoint = server.extra_endpoints["rpc"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        before = server.stats()["malformed"]
        sock.send(b"\xc1 not msgpack")
        sock.send_multipart([b"two", b"frames"])
        sock.send(msgpack.packb([1, "reply", {"id": "x", "ok": True}]))   # not a call
        sock.send(msgpack.packb([1, "call", {"svc": "echo", "id": 5, "a": b""}]))   # bad id
        call = msgpack.packb([1, "call", {"svc": "echo", "id": "raw-1", "ttl": 5.0,
                                          "a": msgpack.packb([[7], {}])}])
        sock.send(call)
        assert sock.poll(5000), "no reply from the lane"
        kind, fields = msgpack.unpackb(sock.recv())[1:]
        assert (kind, fields["id"], fields["ok"], msgpack.unpackb(fields["r"])) == \
            ("reply", "raw-1", True, 7)
        wait_until(lambda: server.stats()["malformed"] - before == 4, timeout=5,
                   what="four malformed counted")
    finally:
        sock.close()
        ctx.term()
    assert client.call("echo", "still", timeout=5) == "still"


def test_threads_that_ended_give_their_lane_sockets_back(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    _echo_server(make_node, client)

    lanes = client._rpc.lanes
    go = threading.Event()

    def one_thread() -> None:
        _lane_ready(client, "echo")
        go.wait(10)

    threads = [threading.Thread(target=one_thread) for _ in range(3)]
    for t in threads:
        t.start()
    wait_until(lambda: lanes.nsocks == 3 and all(c.sent for c in list(lanes.callers.values())),
               timeout=10, what="three threads on the lane")
    go.set()
    for t in threads:
        t.join(10)
    # the node's I/O thread closes the ended threads' sockets within about a second
    wait_until(lambda: lanes.nsocks == 0 and not lanes.callers, timeout=5,
               what="the ended threads' lane sockets closed")


def test_stopping_the_node_wakes_a_caller_waiting_on_the_lane(
        make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    gate = threading.Event()

    @server.rpc("stall")
    def stall(x: int) -> int:
        if x:
            gate.wait(10)
        return x

    client.wait_for_servers("stall", timeout=5)
    outcome: list[Any] = []

    def caller() -> None:
        _lane_ready(client, "stall")
        try:
            outcome.append(client.call("stall", 1, timeout=30))
        except Exception as exc:  # noqa: BLE001 - checked below
            outcome.append(exc)

    t = threading.Thread(target=caller)
    t.start()
    wait_until(lambda: server.stats()["calls_served_lane"] >= 2, timeout=5, what="call stalled")
    t0 = time.monotonic()
    client.stop()
    t.join(10)
    gate.set()
    assert len(outcome) == 1 and isinstance(outcome[0], PeerGone), outcome
    assert time.monotonic() - t0 < 5


def test_server_leaving_mid_call_on_the_lane_is_retried(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    s1 = make_node("s1", peers=[client.address])
    s2 = make_node("s2", peers=[client.address])
    gate = threading.Event()
    started = threading.Event()

    for node in (s1, s2):
        name = node.name

        @node.rpc("idem")
        def idem(x: int, _name: str = name) -> str:
            if x == 1 and _name == "s1":
                started.set()
                gate.wait(10)
            return _name

    client.wait_until(lambda: sum("idem" in p.services for p in client.peers()) == 2, 5,
                      "two servers")
    outcome: dict[str, Any] = {}

    def caller() -> None:
        lane = client._rpc.lanes.mine()
        assert lane is not None
        # this thread's lanes to both servers connected: calls alternate between them
        wait_until(lambda: client.call("idem", 0, timeout=5) is not None
                   and len(lane.socks) == 2 and lane.sent >= 4, timeout=5, what="two lanes")
        for _ in range(4):   # round-robin: the slow call lands on s1 within two tries
            before = lane.sent
            got = client.call("idem", 1, timeout=10, retry=True)
            if started.is_set():
                outcome.update(result=got, on_lane=lane.sent > before)
                return

    t = threading.Thread(target=caller)
    t.start()
    assert started.wait(10)
    s1.stop(timeout=0.2)   # leaves (bye) with the call running: the caller retries on s2
    t.join(10)
    gate.set()
    assert outcome == {"result": "s2", "on_lane": True}
    assert client.stats()["calls_retried"] >= 1


def test_a_handler_may_stop_its_own_node(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    stopped = threading.Event()

    @server.rpc("shutdown")
    def shutdown(now: bool) -> str:
        if now:
            server.stop(timeout=1.0)   # from the lane thread running this handler
            stopped.set()
        return "bye"

    client.wait_for_servers("shutdown", timeout=5)
    caller = client._rpc.lanes.mine()
    assert caller is not None
    wait_until(lambda: client.call("shutdown", False, timeout=5) == "bye" and caller.sent > 0,
               timeout=5, what="a call on the lane")
    with pytest.raises(PeerGone):
        client.call("shutdown", True, timeout=10)
    assert stopped.wait(5)
    assert not server.running


def test_calls_back_and_forth_between_two_servers_do_not_deadlock(
        make_node: Callable[..., Node]) -> None:
    """client -> a.outer (on A) -> b.inner (on B) -> a.leaf (on A again), all on lanes: A's
    lane reader is busy in a.outer when a.leaf comes in, so another thread reads it."""
    client = make_node("client")
    a = make_node("a", peers=[client.address])
    b = make_node("b", peers=[client.address, a.address])

    @a.rpc("a.leaf")
    def leaf(x: int) -> int:
        return x + 1

    @b.rpc("b.inner")
    def inner(x: int) -> int:
        return int(b.call("a.leaf", x * 10, timeout=5)) + 1

    @a.rpc("a.outer")
    def outer(x: int) -> int:
        return int(a.call("b.inner", x, timeout=5)) + 1

    client.wait_for_servers("a.outer", timeout=5)
    a.wait_for_servers("b.inner", timeout=5)
    b.wait_for_servers("a.leaf", timeout=5)
    results = [client.call("a.outer", i, timeout=10) for i in range(20)]
    assert results == [10 * i + 3 for i in range(20)]
    # after the first calls, the nested ones went on lanes too
    assert a.stats()["calls_lane"] > 0 and b.stats()["calls_lane"] > 0
    assert a.stats()["calls_served_lane"] > 0


def test_a_standby_takes_over_from_a_second_slow_handler_too(
        make_node: Callable[..., Node]) -> None:
    """A reader whose handler ends after another thread took over the reading must not clear
    the new reader's start time: a third call behind the second, slow one is read in ms."""
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    slow_started, slow_done = threading.Event(), threading.Event()

    @server.rpc("svc", concurrency=3)
    def svc(what: str) -> str:
        if what == "first":
            slow_started.wait(10)    # ends once "slow" runs (on the thread that took over)
        elif what == "slow":
            slow_started.set()
            slow_done.wait(10)
        return what

    client.wait_for_servers("svc", timeout=5)
    results: dict[str, Any] = {}

    def call(what: str) -> None:
        _lane_ready(client, "svc", "quick")
        results[what] = client.call("svc", what, timeout=10)

    first = threading.Thread(target=call, args=("first",))
    first.start()
    lane = server._rpc.lane
    assert lane is not None
    # "first" runs on the lane's reader; 2 ms on, a standby takes over the reading
    wait_until(lambda: lane.handovers >= 1, timeout=5, what="first running, reading handed over")
    slow = threading.Thread(target=call, args=("slow",))
    slow.start()
    first.join(10)
    assert results.get("first") == "first" and slow_started.is_set()
    _lane_ready(client, "svc", "quick")
    t0 = time.monotonic()
    assert client.call("svc", "quick", timeout=5) == "quick"
    assert time.monotonic() - t0 < 1.0   # not held until "slow" ends
    slow_done.set()
    slow.join(10)
    assert results.get("slow") == "slow"


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


def test_a_handler_error_that_cannot_be_printed_does_not_stop_the_lane(
        make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])

    @server.rpc("odd", concurrency=1)
    def odd(x: int) -> int:
        if x < 0:
            raise Unprintable()
        return x

    client.wait_for_servers("odd", timeout=5)
    _lane_ready(client, "odd", 1)
    served = server.stats()["calls_served_lane"]
    for _ in range(3):
        with pytest.raises(RemoteError) as info:
            client.call("odd", -1, timeout=5)
        assert info.value.type_name == "Unprintable"
        assert "unprintable" in info.value.message
    assert client.call("odd", 7, timeout=5) == 7
    assert server.stats()["calls_served_lane"] - served == 4


def test_lane_sockets_to_servers_that_left_are_closed(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    lanes = client._rpc.lanes
    for i in range(4):
        server = make_node(f"server{i}", peers=[client.address])

        @server.rpc("echo")
        def echo(x: Any) -> Any:
            return x

        client.wait_for_servers("echo", timeout=5)
        _lane_ready(client, "echo")
        server.stop()
        wait_until(lambda: client.servers_for("echo") == 0, timeout=5, what="server gone")
    # one DEALER per live server at most: the ones to servers that left were closed
    assert lanes.nsocks <= 1, lanes.nsocks
