"""Pub/sub between separate OS processes, restarts, and garbage from plain pyzmq sockets."""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zmq

from meshmq import Node
from meshmq.testing import Collector, RawPeer, Script, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def address_of(script: Script) -> str:
    line = script.expect("listening on", timeout=15)
    return line.rsplit(" ", 1)[1]


def test_examples_run_as_separate_processes() -> None:
    sub = Script([str(EXAMPLES / "pubsub_subscriber.py"), "--static", "--count", "5"])
    try:
        addr = address_of(sub)
        pub = Script([str(EXAMPLES / "pubsub_publisher.py"), "--peer", addr, "--count", "5",
                      "--interval", "0.01"])
        try:
            assert pub.wait(20) == 0
        finally:
            pub.stop()
        lines = [sub.expect("received orders.created") for _ in range(5)]
        assert [int(re.search(r"seq=(\d+)", ln).group(1)) for ln in lines] == [1, 2, 3, 4, 5]
        assert sub.wait(20) == 0
    finally:
        sub.stop()


def test_publisher_restart_mid_stream() -> None:
    sub = Script([str(EXAMPLES / "pubsub_subscriber.py"), "--static"])
    try:
        addr = address_of(sub)
        pub1 = Script([str(EXAMPLES / "pubsub_publisher.py"), "--peer", addr, "--count", "0",
                       "--interval", "0.01", "--name", "pubA"])
        try:
            sub.expect("seq=10 from=pubA")
        finally:
            pub1.stop(signal.SIGKILL)  # no goodbye: the subscriber finds out by heartbeat
        pub2 = Script([str(EXAMPLES / "pubsub_publisher.py"), "--peer", addr, "--count", "5",
                       "--interval", "0.01", "--name", "pubB"])
        try:
            # a new incarnation starts its own sequence: no gap is reported across the restart
            sub.expect("seq=1 from=pubB", timeout=15)
            last = sub.expect("seq=5 from=pubB", timeout=15)
            assert "missed" not in last
            assert pub2.wait(20) == 0
        finally:
            pub2.stop()
        assert sub.stop(signal.SIGINT) == 0
        stats = sub.expect("done:", timeout=5) if "done:" not in sub.lines[-1] else sub.lines[-1]
        assert "'gaps': 0" in stats and "'malformed': 0" in stats
    finally:
        sub.stop()


def test_publisher_process_to_subscriber_in_this_process(make_node: Callable[..., Node]) -> None:
    node = make_node("here")
    got = Collector()
    node.subscribe("orders.created")(got)
    pub = Script([str(EXAMPLES / "pubsub_publisher.py"), "--peer", node.address, "--count", "20",
                  "--interval", "0"])
    try:
        assert [m.body["order"] for m in got.wait(20, timeout=15)] == list(range(1, 21))
        assert pub.wait(15) == 0
    finally:
        pub.stop()


def test_garbage_on_the_pub_path_is_counted_and_dropped(make_node: Callable[..., Node]) -> None:
    node = make_node("victim", max_message_bytes=1000)
    got = Collector()
    node.subscribe("t")(got)
    with RawPeer("vandal") as raw:
        raw.hello(node.address)
        raw.wait_subscribed(b"t")
        raw.pub.send_multipart([b"t", b"\xc1 not msgpack"])
        raw.pub.send_multipart([b"t"])                                # one frame
        raw.pub.send_multipart([b"t", b"x", b"y"])                    # three frames
        raw.pub.send_multipart([b"t", msgpack.packb([99, "future"])])  # unknown version
        raw.pub.send_multipart([b"t", msgpack.packb(["x" * 1500])])     # oversized
        raw.pub.send_multipart([b"t\xff", msgpack.packb([1])])           # bad topic
        raw.publish("t", "still alive", 1)
        assert got.wait(1)[0].body == "still alive"
    stats = node.stats()
    assert stats["malformed"] == 6
    assert stats["bad_version"] == 1 and stats["oversized"] == 1
    assert stats["received"] == 1


def test_a_lone_frame_does_not_cost_the_next_message(make_node: Callable[..., Node]) -> None:
    # The receiver learns that a topic frame stood alone only from the frame after it, which
    # is then the next message's topic: it starts over from there and loses nothing.
    node = make_node("victim")
    got = Collector()
    node.subscribe("t")(got)
    with RawPeer("vandal") as raw:
        raw.hello(node.address)
        raw.wait_subscribed(b"t")
        for i in range(1, 4):
            raw.pub.send_multipart([b"t"])               # one frame: malformed
            raw.publish("t", f"ok {i}", i)               # delivered all the same
        raw.pub.send_multipart([b"t", b"x", b"y", b"z"])  # four frames: counted, dropped
        raw.publish("t", "last", 4)
        assert [m.body for m in got.wait(4)] == ["ok 1", "ok 2", "ok 3", "last"]
    stats = node.stats()
    assert stats["received"] == 4 and stats["malformed"] >= 4


def test_garbage_on_the_control_endpoint(make_node: Callable[..., Node]) -> None:
    node = make_node("victim")
    ctx = zmq.Context()
    try:
        for frames in ([b"garbage"], [b"a", b"b"], [msgpack.packb([1, "hello", {"name": 1}])],
                       [msgpack.packb([7, "hello", {}])], [msgpack.packb([1, "nonsense", {}])]):
            with ctx.socket(zmq.DEALER) as s:
                s.linger = 2000  # let the garbage actually leave before close
                s.connect(node.address)
                s.send_multipart(frames)
        # a plain TCP client that speaks no ZMTP at all
        import socket
        with socket.create_connection(tuple(node.address[6:].rsplit(":", 1))) as raw:  # type: ignore[arg-type]
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
        wait_until(lambda: node.stats()["malformed"] >= 4, what="garbage counted")
    finally:
        ctx.term()
    other = make_node("ok", peers=[node.address])
    wait_until(lambda: node.peers(), what="a good peer still joins")
    assert other.peers()[0].name == "victim"


@pytest.mark.skipif(sys.platform != "linux", reason="counts /proc fds")
def test_many_start_stop_cycles_leave_nothing(make_node: Callable[..., Node]) -> None:
    for i in range(10):
        with Node(f"cycle{i}", peers=[]) as a, Node(f"cycle{i}b", peers=[a.address]):
            wait_until(lambda a=a: a.peers(), what="handshake")
