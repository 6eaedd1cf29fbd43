"""RPC between nodes (real sockets): spreading, errors, timeouts, retry, nesting, concurrency."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from meshmq import (
    AsyncNode,
    EncodeError,
    MeshError,
    MeshTimeout,
    Node,
    NoPeerError,
    PeerGone,
    RemoteError,
    Timing,
)
from meshmq.testing import wait_until

QUICK = Timing(heartbeat_interval=0.1, peer_timeout=0.8, hello_interval=0.1, tick=0.05,
               stop_timeout=2.0, linger=0.1)


def serve(node: Node, service: str, name: str, delay: float = 0.0) -> None:
    @node.rpc(service)
    def handler(x: int, *, scale: int = 1) -> dict[str, Any]:
        if delay:
            time.sleep(delay)
        return {"value": x * scale, "server": name}


def test_calls_are_spread_across_servers(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    for name in ("s1", "s2"):
        serve(make_node(name, peers=[client.address]), "math.scale", name)
    client.wait_until(lambda: sum("math.scale" in p.services for p in client.peers()) == 2, 5,
                      "two servers")
    replies = [client.call("math.scale", i, scale=3) for i in range(20)]
    assert [r["value"] for r in replies] == [3 * i for i in range(20)]
    counts = {s: sum(r["server"] == s for r in replies) for s in ("s1", "s2")}
    assert min(counts.values()) >= 5, counts  # round-robin, not all on one


def test_remote_exception_comes_back_as_remote_error(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])

    @server.rpc("inventory.check")
    def check(sku: str) -> bool:
        raise KeyError(f"unknown sku {sku}")

    with pytest.raises(RemoteError) as info:
        client.call("inventory.check", "ZZ", timeout=5)
    err = info.value
    assert isinstance(err, MeshError)
    assert err.type_name == "KeyError"
    assert "unknown sku ZZ" in err.message
    assert "raise KeyError" in err.traceback_text  # the remote traceback, as text
    # the server keeps serving after a failing call
    assert server.stats()["calls_raised"] == 1
    assert client.stats()["calls_failed_remote"] == 1
    with pytest.raises(RemoteError):
        client.call("inventory.check", "A1", timeout=5)


def test_unencodable_result_is_a_remote_error(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])

    @server.rpc("bad.result")
    def bad() -> object:
        return object()

    with pytest.raises(RemoteError) as info:
        client.call("bad.result", timeout=5)
    assert "object" in info.value.message


def test_no_server_raises_no_peer_error_after_the_timeout(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    started = time.monotonic()
    with pytest.raises(NoPeerError):
        client.call("nobody.serves", 1, timeout=0.5)
    assert 0.4 <= time.monotonic() - started < 3.0


def test_call_parked_until_a_server_appears(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.append(client.call("late.svc", 2, timeout=5)))
    caller.start()
    try:
        serve(make_node("late", peers=[client.address]), "late.svc", "late")
    finally:
        caller.join(10)
    assert result == [{"value": 2, "server": "late"}]


def test_slow_server_gives_mesh_timeout(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    serve(make_node("slow", peers=[client.address]), "slow.svc", "slow", delay=1.0)
    client.wait_until(lambda: any("slow.svc" in p.services for p in client.peers()), 5, "server")
    with pytest.raises(MeshTimeout) as info:
        client.call("slow.svc", 1, timeout=0.2)
    assert isinstance(info.value, TimeoutError)


def test_server_leaving_mid_call_without_retry_raises_peer_gone(
        make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("doomed", peers=[client.address])
    entered, release = threading.Event(), threading.Event()

    @server.rpc("work")
    def work() -> str:
        entered.set()
        release.wait(5)  # outlasts the server's bounded drain at stop()
        return "late"

    client.wait_until(lambda: client.peers(), 5, "server")
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.call("work", timeout=5)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    assert entered.wait(5)
    server.stop(timeout=0.1)
    release.set()
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], PeerGone), errors
    assert isinstance(errors[0], ConnectionError)


def test_retry_resends_to_another_server(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    doomed = make_node("doomed", peers=[client.address])
    entered, release = threading.Event(), threading.Event()

    @doomed.rpc("idempotent")
    def stuck() -> str:
        entered.set()
        release.wait(5)
        return "doomed"

    survivor = make_node("survivor", peers=[client.address])
    survivor.rpc("idempotent")(lambda: "survivor")
    client.wait_until(lambda: sum("idempotent" in p.services for p in client.peers()) == 2, 5,
                      "two servers")
    results: list[Any] = []
    t = threading.Thread(target=lambda: results.append(
        [client.call("idempotent", timeout=5, retry=True) for _ in range(4)]))
    t.start()
    assert entered.wait(5)
    doomed.stop(timeout=0.1)
    release.set()
    t.join(10)
    assert results and results[0].count("survivor") >= 3 and len(results[0]) == 4


def test_handler_can_call_a_service_of_its_own_node(make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])

    @server.rpc("price.base", concurrency=1)
    def base(sku: str) -> int:
        return {"A": 10, "B": 20}[sku]

    @server.rpc("price.total", concurrency=1)
    def total(skus: list[str]) -> int:
        return sum(server.call("price.base", s, timeout=2) for s in skus)

    assert client.call("price.total", ["A", "B", "A"], timeout=5) == 40
    assert server.call("price.total", ["B"], timeout=5) == 20  # fully local, nested


@pytest.mark.timeout(60)
def test_thousands_of_concurrent_calls_from_async_node(make_node: Callable[..., Node]) -> None:
    server = make_node("server")

    @server.rpc("echo", concurrency=16)
    async def echo(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def main() -> list[int]:
        async with AsyncNode("client", peers=[server.address], timing=QUICK) as client:
            await client.wait_until(lambda: client.peers(), 5, "server")
            return list(await asyncio.gather(*(client.call("echo", i, timeout=30)
                                               for i in range(3000))))

    assert asyncio.run(main()) == list(range(3000))


def test_async_handler_and_async_caller(make_node: Callable[..., Node]) -> None:
    server = make_node("server")

    @server.rpc("add")
    async def add(a: int, b: int) -> int:
        await asyncio.sleep(0.01)
        return a + b

    async def main() -> tuple[int, str]:
        async with AsyncNode("client", peers=[server.address], timing=QUICK) as client:
            got = await client.call("add", 2, b=3, timeout=5)
            try:
                await client.call("add", "x", b=1, timeout=5)
            except RemoteError as exc:
                return got, exc.type_name
        return got, ""

    assert asyncio.run(main()) == (5, "TypeError")


def test_calls_from_many_threads_at_once(make_node: Callable[..., Node]) -> None:
    """Callers on several threads send on the shared control sockets themselves."""
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    serve(server, "math.scale", "server")
    client.wait_for_servers("math.scale", 1, timeout=5)
    results: dict[int, list[int]] = {}

    def caller(t: int) -> None:
        results[t] = [client.call("math.scale", i, scale=t, timeout=10)["value"]
                      for i in range(100)]

    threads = [threading.Thread(target=caller, args=(t,)) for t in range(1, 9)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert results == {t: [i * t for i in range(100)] for t in range(1, 9)}
    stats = client.stats()
    assert stats["calls_made"] == 800 and stats["calls_pending"] == 0, stats


def test_async_timeout_then_later_calls_still_work(make_node: Callable[..., Node]) -> None:
    server = make_node("server")
    serve(server, "slow", "server", delay=0.5)
    serve(server, "fast", "server")

    async def main() -> tuple[str, int]:
        async with AsyncNode("client", peers=[server.address], timing=QUICK) as client:
            await client.wait_for_servers("slow", 1, timeout=5)
            started = time.monotonic()
            try:
                await client.call("slow", 1, timeout=0.1)
                kind = "no timeout"
            except MeshTimeout:
                kind = "timeout"
            waited = time.monotonic() - started
            assert 0.1 <= waited < 0.4, waited
            got = await client.call("fast", 7, timeout=5)
            return kind, got["value"]

    assert asyncio.run(main()) == ("timeout", 7)


def test_a_call_whose_caller_gave_up_before_it_started_is_not_run(
        make_node: Callable[..., Node]) -> None:
    client = make_node("client")
    server = make_node("server", peers=[client.address])
    gate = threading.Event()
    ran: list[str] = []

    @server.rpc("one.at.a.time", concurrency=1)
    def work(tag: str) -> str:
        ran.append(tag)
        if tag == "first":
            gate.wait(10)
        return tag

    client.wait_for_servers("one.at.a.time", timeout=5)
    first = threading.Thread(target=lambda: client.call("one.at.a.time", "first", timeout=10))
    first.start()
    wait_until(lambda: ran == ["first"], timeout=5)
    with pytest.raises(MeshTimeout):     # waits behind "first", past its own deadline
        client.call("one.at.a.time", "late", timeout=0.3)
    gate.set()
    first.join(10)
    wait_until(lambda: server.stats()["calls_expired"] == 1, timeout=5)
    assert ran == ["first"]              # "late" was never run: nobody waited for it
    assert client.call("one.at.a.time", "again", timeout=5) == "again"


def test_call_arguments_with_keys_receivers_refuse_fail_at_the_caller(
        make_node: Callable[..., Node]) -> None:
    node = make_node("solo")

    @node.rpc("echo")
    def echo(value: object) -> object:
        return value

    @node.rpc("bad.result")
    def bad() -> object:
        return {"sizes": {640: "vga"}}

    with pytest.raises(EncodeError, match="keys must be str or bytes"):
        node.call("echo", {1: "x"}, timeout=5)
    with pytest.raises(RemoteError) as info:     # the server refuses to send such a result
        node.call("bad.result", timeout=5)
    assert "keys must be str or bytes" in info.value.message
    assert node.call("echo", {"ok": [1]}, timeout=5) == {"ok": [1]}
