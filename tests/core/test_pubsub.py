from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable

import pytest

from meshmq import AsyncNode, ConfigError, EncodeError, MeshTimeout, Message, Node, NodeClosed
from meshmq.testing import Collector, wait_until


def pair(make_node: Callable[..., Node], **kw: object) -> tuple[Node, Node]:
    pub = make_node("pub")
    sub = make_node("sub", peers=[pub.address], **kw)
    return pub, sub


def test_publish_reaches_decorated_handler(make_node: Callable[..., Node]) -> None:
    pub, sub = pair(make_node)
    got = Collector()
    sub.subscribe("orders.created")(got)
    assert pub.wait_for_subscribers("orders.created", count=1, timeout=5) == 1
    msg_id = pub.publish("orders.created", {"id": 1}, headers={"k": "v"})
    [msg] = got.wait(1)
    assert isinstance(msg, Message)
    assert (msg.topic, msg.body, msg.headers, msg.id) == ("orders.created", {"id": 1},
                                                          {"k": "v"}, msg_id)
    assert (msg.source, msg.source_id, msg.seq, msg.gap) == ("pub", pub.id, 1, 0)
    assert abs(msg.timestamp - time.time()) < 5
    assert sub.stats()["received"] == 1 and pub.stats()["sent"] == 1


def test_received_message_is_a_frozen_message(make_node: Callable[..., Node]) -> None:
    # The receive path builds Messages without Message.__init__ (meshmq/_message.py): the
    # result must be indistinguishable from one built normally.
    pub, sub = pair(make_node)
    got = Collector()
    sub.subscribe("t")(got)
    pub.wait_for_subscribers("t", timeout=5)
    msg_id = pub.publish("t", [1, 2])
    [msg] = got.wait(1)
    assert type(msg) is Message
    assert msg == Message("t", [1, 2], {}, msg_id, "pub", pub.id, 1, msg.timestamp)
    assert repr(msg).startswith("Message(topic='t', body=[1, 2]")
    with pytest.raises(AttributeError):  # dataclasses.FrozenInstanceError
        msg.topic = "u"  # type: ignore[misc]
    assert dataclasses.replace(msg, gap=2).gap == 2 and msg.gap == 0


def test_decorator_returns_function_unchanged(make_node: Callable[..., Node]) -> None:
    node = make_node("n")

    def handler(msg: Message) -> str:
        return "plain"

    assert node.subscribe("a.b")(handler) is handler
    assert handler(Message("a.b", None)) == "plain"


def test_peering_is_symmetric_and_either_side_publishes(make_node: Callable[..., Node]) -> None:
    a, b = pair(make_node)          # only b knows a's address
    got_a, got_b = Collector(), Collector()
    a.subscribe("to.a")(got_a)
    b.subscribe("to.b")(got_b)
    b.wait_for_subscribers("to.a", timeout=5)
    a.wait_for_subscribers("to.b", timeout=5)
    a.publish("to.b", 1)
    b.publish("to.a", 2)
    assert [m.body for m in got_a.wait(1)] == [2]
    assert [m.body for m in got_b.wait(1)] == [1]
    assert {p.name for p in a.peers()} == {"sub"} and {p.name for p in b.peers()} == {"pub"}


def test_wildcards_between_nodes(make_node: Callable[..., Node]) -> None:
    pub, sub = pair(make_node)
    star, tail, exact = Collector(), Collector(), Collector()
    sub.subscribe("orders.*")(star)
    sub.subscribe("orders.>")(tail)
    sub.subscribe("orders.created")(exact)
    pub.wait_for_subscribers("orders.created", timeout=5)
    for topic in ["orders.created", "orders.created.eu", "orders", "ordersX.created"]:
        pub.publish(topic, topic)
    pub.publish("orders.done", "last")
    assert [m.body for m in star.wait(2)] == ["orders.created", "last"]
    assert [m.body for m in tail.wait(3)] == ["orders.created", "orders.created.eu", "last"]
    assert [m.body for m in exact.wait(1)] == ["orders.created"]


def test_each_handler_keeps_the_order_across_topics(make_node: Callable[..., Node]) -> None:
    # The receive path batches per handler within a burst; topics routed to different sets of
    # handlers interleave, and each handler must still see its messages in publish order.
    pub, sub = pair(make_node)
    every, some = Collector(), Collector()
    sub.subscribe("t.>")(every)
    sub.subscribe("t.b")(some)
    pub.wait_for_subscribers("t.b", timeout=5)
    sent = [(("t.a", "t.b", "t.c")[i % 3], i) for i in range(300)]
    for topic, i in sent:
        pub.publish(topic, i)
    assert [m.body for m in every.wait(300)] == [i for _, i in sent]
    assert [m.body for m in some.wait(100)] == [i for topic, i in sent if topic == "t.b"]
    assert sub.stats()["gaps"] == 0


def test_handler_added_after_start_is_learned_by_peers(make_node: Callable[..., Node]) -> None:
    pub, sub = pair(make_node)
    wait_until(lambda: pub.peers(), what="handshake")
    assert pub.subscribers("late.topic") == 0
    got = Collector()
    sub.subscribe("late.*")(got)
    assert pub.wait_for_subscribers("late.topic", timeout=5) == 1
    pub.publish("late.topic", "hi")
    assert got.wait(1)[0].body == "hi"


def test_sync_and_async_handlers_never_run_on_the_io_thread(
        make_node: Callable[..., Node]) -> None:
    pub, sub = pair(make_node)
    sync_got = Collector()
    threads: list[str] = []
    done = threading.Event()

    async def async_handler(msg: Message) -> None:
        await asyncio.sleep(0)
        threads.append(threading.current_thread().name)
        done.set()

    sub.subscribe("t")(sync_got)
    sub.subscribe("t")(async_handler)
    pub.wait_for_subscribers("t", timeout=5)
    pub.publish("t", 1)
    sync_got.wait(1)
    assert done.wait(5)
    assert not any(n.startswith("meshmq-io") for n in [*sync_got.threads, *threads])


def test_slow_handler_does_not_delay_others(make_node: Callable[..., Node]) -> None:
    pub, sub = pair(make_node)
    slow, fast = Collector(delay=2.0), Collector()
    sub.subscribe("work")(slow)
    sub.subscribe("work")(fast)
    pub.wait_for_subscribers("work", timeout=5)
    started = time.monotonic()
    for i in range(5):
        pub.publish("work", i)
    assert [m.body for m in fast.wait(5, timeout=1.5)] == [0, 1, 2, 3, 4]
    assert time.monotonic() - started < 1.5
    # the node's own I/O is not stalled either: a new peer can join meanwhile
    other = Collector()
    third = Node("third", peers=[pub.address], timing=pub.timing).start()
    try:
        third.subscribe("work")(other)
        pub.wait_for_subscribers("work", count=2, timeout=1.5)
    finally:
        third.stop()
    sub.stop(timeout=0.1)  # does not wait out the slow handler's queue


def test_handler_errors_are_logged_counted_and_survived(
        make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture) -> None:
    pub, sub = pair(make_node)
    got = Collector()

    def broken(msg: Message) -> None:
        raise ValueError(f"bad {msg.body}")

    sub.subscribe("t")(broken)
    sub.subscribe("t")(got)
    pub.wait_for_subscribers("t", timeout=5)
    pub.publish("t", 1)
    pub.publish("t", 2)
    got.wait(2)
    wait_until(lambda: sub.stats()["handler_errors"] == 2, what="errors counted")
    assert "ValueError: bad 1" in caplog.text and "Traceback" in caplog.text


def test_local_delivery(make_node: Callable[..., Node]) -> None:
    node = make_node("solo")
    got = Collector()
    node.subscribe("self.>")(got)
    node.publish("self.talk", "echo")
    assert got.wait(1)[0].body == "echo"


def test_publish_errors_are_clear(make_node: Callable[..., Node]) -> None:
    node = make_node("n")
    with pytest.raises(EncodeError, match="object"):
        node.publish("t", object())
    with pytest.raises(ConfigError):
        node.publish("bad topic", 1)
    with pytest.raises(ConfigError):
        node.subscribe("a.>.b")
    with pytest.raises(EncodeError, match="keys must be str or bytes"):
        node.publish("t", {"order": {7: "x"}})   # every receiver would drop it
    with pytest.raises(EncodeError, match="keys must be str or bytes"):
        node.publish("t", 1, headers={"k": {1: 2}})
    node.publish("t", 1)  # a failed encode did not consume a sequence number
    assert node._seqs["t"] == 1


def test_wait_for_subscribers_times_out(make_node: Callable[..., Node]) -> None:
    node = make_node("n")
    with pytest.raises(MeshTimeout) as info:
        node.wait_for_subscribers("nobody", timeout=0.2)
    assert isinstance(info.value, TimeoutError)


def test_lifecycle_idempotent_and_bounded() -> None:
    node = Node("n", peers=[])
    with pytest.raises(NodeClosed):
        node.publish("t", 1)
    node.stop()  # stopping a node that never started is fine
    with Node("ctx", peers=[]) as n2:
        assert n2.running and n2.address.startswith("tcp://127.0.0.1:")
    t0 = time.monotonic()
    n2.stop()
    n2.stop()
    assert time.monotonic() - t0 < 1
    with pytest.raises(NodeClosed):
        n2.publish("t", 1)
    with pytest.raises(NodeClosed):
        n2.start()


def test_peer_leave_on_stop_and_rejoin(make_node: Callable[..., Node]) -> None:
    pub = make_node("pub")
    joins: list[str] = []
    leaves: list[str] = []
    pub.on_peer_join(lambda p: joins.append(p.name))
    pub.on_peer_leave(lambda p: leaves.append(p.name))
    sub = make_node("sub", peers=[pub.address])
    wait_until(lambda: joins == ["sub"], what="join")
    sub.stop()
    wait_until(lambda: leaves == ["sub"], timeout=1.0, what="goodbye seen")
    assert pub.peers() == []


def test_async_node(make_node: Callable[..., Node]) -> None:
    async def main() -> list[object]:
        got: list[object] = []
        arrived = asyncio.Event()
        async with AsyncNode("apub", peers=[]) as apub:
            async with AsyncNode("asub", peers=[apub.address]) as asub:
                @asub.subscribe("x.>")
                async def handler(msg: Message) -> None:
                    got.append(msg.body)
                    if len(got) == 3:
                        arrived.set()

                assert await apub.wait_for_subscribers("x.y", 1, timeout=5) == 1
                for i in range(3):
                    await apub.publish("x.y", i)
                await asyncio.wait_for(arrived.wait(), 5)
        return got

    assert asyncio.run(main()) == [0, 1, 2]


def test_gaps_are_detected_and_surfaced(make_node: Callable[..., Node]) -> None:
    from meshmq.testing import RawPeer

    node = make_node("sub")
    got = Collector()
    node.subscribe("g")(got)
    with RawPeer("liar") as raw:
        raw.hello(node.address)
        raw.wait_subscribed(b"g")
        for seq in (1, 2, 5, 6, 10):
            raw.publish("g", seq, seq)
        msgs = got.wait(5)
    assert [m.gap for m in msgs] == [0, 0, 2, 0, 3]
    stats = node.stats()
    assert stats["gaps"] == 5 and stats["gaps_by_sender"] == {"liar": 5}


def test_oversized_sends_fail_at_the_caller(make_node: Callable[..., Node]) -> None:
    from meshmq import EncodeError, RemoteError
    a = make_node("a", max_message_bytes=4096)
    b = make_node("b", peers=[a.address], max_message_bytes=4096)
    got = Collector()
    b.subscribe("big")(got)
    b.worker("jobs")(lambda msg: None)
    b.rpc("echo")(lambda x: x * 2)
    a.wait_for_subscribers("big")
    a.wait_for_servers("echo")
    with pytest.raises(EncodeError, match="max_message_bytes"):
        a.publish("big", b"x" * 5000)
    with pytest.raises(EncodeError, match="max_message_bytes"):
        a.push("jobs", b"x" * 5000)
    with pytest.raises(EncodeError, match="max_message_bytes"):
        a.call("echo", b"x" * 5000)
    with pytest.raises(RemoteError, match="max_message_bytes"):
        a.call("echo", b"x" * 3000)  # the result would be 6000 bytes
    a.publish("big", b"x" * 100)  # the node keeps working
    assert got.wait(1)[0].body == b"x" * 100


def test_offers_advertise_a_pattern_only_once_its_filter_is_set(
        make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch) -> None:
    # Regression: an offer sent between subscribe() (a user thread) and the I/O thread setting
    # the filter paired the new pattern with the old marker version, so the publisher's
    # wait_for_subscribers returned early and the first message was lost (~1% of runs).
    pub, sub = pair(make_node)
    pub.wait_until(lambda: pub.peers(), timeout=5, what="the subscriber")
    assert sub.engine is not None
    engine = sub.engine
    held: list[Callable[[], None]] = []
    monkeypatch.setattr(engine, "subscriptions_changed",
                        lambda: held.append(engine._apply_subscriptions))
    got = Collector()
    sub.subscribe("t")(got)              # the filter is not set yet (held) ...

    @sub.worker("q")                     # ... but an offer goes out now (a new worker)
    def work(msg: Message) -> None:
        pass

    pub.wait_until(lambda: any("q" in p.queues for p in pub.peers()), timeout=5,
                   what="the new offer")
    assert pub.subscribers("t") == 0     # not advertised before its filter is in place
    engine.call(held[0])
    assert pub.wait_for_subscribers("t", timeout=5) == 1
    pub.publish("t", 1)
    assert [m.body for m in got.wait(1)] == [1]
