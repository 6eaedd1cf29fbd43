"""Pub/sub throughput: meshmq Node -> Node vs raw pyzmq XPUB -> SUB with the same envelope.

Publisher and subscriber are separate processes on 127.0.0.1. Each round, the publisher sends as
fast as it can for at most --seconds (and at most 500k messages); the subscriber decodes
everything it gets and stops after a quiet period. The figure is messages delivered per second,
from the publisher's first send to the subscriber's last receive (one monotonic clock for both
processes). Loss (messages PUB dropped at the high-water mark, or meshmq dropped in a full handler
queue) is reported beside it: a rate with heavy loss is the subscriber's ceiling.

    .venv/bin/python benchmarks/bench_pubsub.py [--repeats 3] [--seconds 0.5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

from _common import (
    HWM,
    SNDMORE,
    Child,
    CpuMeter,
    Result,
    add_common_args,
    check_same_envelope,
    emit,
    pack_pub,
    print_table,
    resolve,
    serve,
    setup_env,
    unpack,
)

TOPIC = "bench.data"
N_MAX = 500_000          # upper bound on one round's messages, whatever the time bound
QUIET = 0.3              # the subscriber's round ends after this long without a message
FIRST_WAIT = 10.0        # how long a subscriber waits for a round's first message
SIZES = (64, 1024)


# ---- meshmq ------------------------------------------------------------------------------------
def mesh_publisher(conn: Connection) -> None:
    from meshmq import Node
    node = Node("pub", host="127.0.0.1").start()
    try:
        conn.send(("ready", node.address))

        def wait(topic: str) -> int:
            return node.wait_for_subscribers(topic, count=1, timeout=10.0)

        def go(size: int, n_max: int, seconds: float) -> tuple[int, float, float]:
            body = os.urandom(size)
            publish = node.publish
            clock = time.perf_counter
            t0 = clock()
            deadline = t0 + seconds
            n = 0
            while n < n_max:
                publish(TOPIC, body)
                n += 1
                if not n & 255 and clock() >= deadline:
                    break
            return n, t0, clock()

        serve(conn, {"wait": wait, "go": go})
    finally:
        node.stop()


class _Counter:
    """The subscriber's handler: counts and stamps the last arrival (plain Python, no lock)."""

    def __init__(self) -> None:
        self.n = 0
        self.last = 0.0

    def __call__(self, msg: Any) -> None:
        self.n += 1
        self.last = time.perf_counter()


def mesh_subscriber(conn: Connection, address: str) -> None:
    from meshmq import Node
    node = Node("sub", peers=[address])
    counter = _Counter()
    node.subscribe("bench.>")(counter)
    node.start()
    try:
        conn.send(("ready",))

        def run(n_max: int) -> tuple[int, float, dict[str, Any]]:
            counter.n = 0
            before = node.stats()
            conn.send(("armed",))
            deadline = time.monotonic() + FIRST_WAIT
            while counter.n == 0 and time.monotonic() < deadline:
                time.sleep(0.005)
            while counter.n < n_max and time.perf_counter() - counter.last < QUIET:
                time.sleep(0.02)
            after = node.stats()
            lost = {k: after[k] - before[k] for k in ("gaps", "dropped")}
            return counter.n, counter.last, lost

        serve(conn, {"run": run})
    finally:
        node.stop()


# ---- raw pyzmq -----------------------------------------------------------------------------------
def raw_publisher(conn: Connection) -> None:
    import msgpack
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)   # XPUB: the subscriber's filter shows up, like wait_for_subscribers
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.bind("tcp://127.0.0.1:*")
    source_id = uuid.uuid4().hex[:16]
    state = {"seq": 0, "ids": 0}
    try:
        conn.send(("ready", sock.getsockopt(zmq.LAST_ENDPOINT).decode()))

        def wait(topic: str) -> int:
            if not sock.poll(10_000):
                raise TimeoutError("no subscription arrived")
            return len(sock.recv())

        def go(size: int, n_max: int, seconds: float) -> tuple[int, float, float]:
            body = os.urandom(size)
            packer = msgpack.Packer(use_bin_type=True)
            send = sock.send
            topic = TOPIC.encode()
            prefix = f"{source_id}-"
            seq, ids = state["seq"], state["ids"]
            clock = time.perf_counter
            wall = time.time
            t0 = clock()
            deadline = t0 + seconds
            n = 0
            while n < n_max:
                seq += 1
                ids += 1
                payload = pack_pub(packer, f"{prefix}{ids:x}", "pub", source_id, seq, wall(), body)
                send(topic, SNDMORE)
                send(payload)
                n += 1
                if not n & 255 and clock() >= deadline:
                    break
            t1 = clock()
            state["seq"], state["ids"] = seq, ids
            return n, t0, t1

        serve(conn, {"wait": wait, "go": go})
    finally:
        sock.close()
        ctx.term()


def raw_subscriber(conn: Connection, endpoint: str) -> None:
    import zmq
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.SUBSCRIBE, b"bench.")
    sock.connect(endpoint)
    try:
        conn.send(("ready",))

        def run(n_max: int) -> tuple[int, float, dict[str, Any]]:
            recv = sock.recv
            clock = time.perf_counter
            sock.setsockopt(zmq.RCVTIMEO, int(FIRST_WAIT * 1000))
            conn.send(("armed",))
            n, last, bad = 0, 0.0, 0
            try:
                recv()
            except zmq.Again:
                return 0, 0.0, {}
            sock.setsockopt(zmq.RCVTIMEO, int(QUIET * 1000))
            while True:
                arr = unpack(recv())            # the payload frame: decode it, as meshmq does
                if arr[0] != 1:
                    bad += 1
                n += 1
                last = clock()
                if n >= n_max:
                    break
                try:
                    recv()                     # the next topic frame
                except zmq.Again:
                    break
            return n, last, {"bad": bad}

        serve(conn, {"run": run})
    finally:
        sock.close()
        ctx.term()


# ---- driver ------------------------------------------------------------------------------------------
class Pair:
    def __init__(self, impl: str, pub_target: Any, sub_target: Any) -> None:
        self.impl = impl
        self.pub = Child(f"{impl}-publisher", pub_target)
        _, address = self.pub.recv()
        self.sub = Child(f"{impl}-subscriber", sub_target, address)
        self.sub.recv()
        self.pub.ask("wait", TOPIC)
        self.cpu = {size: CpuMeter(self.pub, self.sub) for size in SIZES}

    def round(self, size: int, seconds: float) -> tuple[float, int, int]:
        """One round: (delivered msgs/s, sent, delivered)."""
        before = self.cpu[size].start()
        self.sub.ask("run", N_MAX)
        sent, t0, _ = self.pub.ask("go", size, N_MAX, seconds, timeout=seconds + 30)
        got, last, _ = self.sub.recv(timeout=FIRST_WAIT + 60)
        self.cpu[size].stop(before, got)
        return (got / (last - t0) if got and last > t0 else 0.0), sent, got

    def close(self) -> None:
        self.sub.close()
        self.pub.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    repeats, seconds = resolve(args)
    setup_env()
    check_same_envelope()
    results = {size: Result("pubsub", f"pub/sub, {_size(size)} body", "msg/s", True, aim=0.5,
                            baseline="raw XPUB/SUB") for size in SIZES}
    totals = {(impl, size): [0, 0] for impl in ("meshmq", "raw") for size in SIZES}
    pairs: list[Pair] = []
    try:
        pairs = [Pair("meshmq", mesh_publisher, mesh_subscriber),
                 Pair("raw", raw_publisher, raw_subscriber)]
        for _ in range(repeats):
            for size in SIZES:
                for pair in pairs:   # interleaved, so drifting machine load hits both alike
                    rate, sent, got = pair.round(size, seconds)
                    getattr(results[size], pair.impl).append(rate)
                    totals[pair.impl, size][0] += sent
                    totals[pair.impl, size][1] += got
    finally:
        for pair in pairs:
            pair.close()
    for size, r in results.items():
        r.note = "delivered/sent: " + ", ".join(
            f"{impl} {got}/{sent} ({100 * (1 - got / sent) if sent else 0:.1f}% lost)"
            for impl in ("meshmq", "raw") for sent, got in [totals[impl, size]])
        r.note += "\nCPU us per message: " + "; ".join(
            f"{p.impl} {p.cpu[size].text('pub', 'sub')}" for p in pairs)
    print_table(f"pub/sub: Node -> Node vs raw XPUB -> SUB, same msgpack envelope, separate "
                f"processes, median of {repeats} x {seconds:g} s rounds",
                list(results.values()))
    emit(list(results.values()))
    return 0


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


if __name__ == "__main__":
    raise SystemExit(main())
