"""A meshmq Node with mDNS discovery in its own process, for the discovery tests.

    python _mesh_node.py --name a --group G [--exchange K] [--shared] [--drive N]

It is given no address: it finds its peers by mDNS (MESHMQ_INTERFACES, or --interfaces).
Every node subscribes to ``mesh.hello``, works queue ``jobs.<name>`` and serves
``whoami.<name>``. With ``--exchange K``, once K peers joined, it publishes a hello to
all, pushes one task to and calls the service of each peer, then prints ``exchanged``.
``--shared`` also works queue ``work`` and serves ``svc`` (the same for every node);
``--drive N`` then pushes N tasks to ``work`` and calls ``svc`` N times, one per
``--interval``. Lines are words separated by spaces, times are ``time.monotonic()``
(one clock for every process of the machine). The process stops on SIGTERM/SIGINT or
after ``--lifetime`` seconds, so it never outlives a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from meshmq import MeshError, Message, Node, PeerInfo, Timing

_out = threading.Lock()


def say(*words: object) -> None:
    with _out:
        print(*words, flush=True)


def exchange(node: Node, k: int) -> None:
    """Pub/sub, a pipeline task and an RPC call with each of the first k peers."""
    node.wait_until(lambda: len(node.peers()) >= k, 20.0, f"{k} peers")
    peers = sorted(p.name for p in node.peers())
    node.wait_for_subscribers("mesh.hello", count=k, timeout=10.0)
    node.publish("mesh.hello", node.name)
    for name in peers:
        node.wait_for_workers(f"jobs.{name}", 1, timeout=10.0)
        node.push(f"jobs.{name}", node.name)
    for name in peers:
        say("called", node.call(f"whoami.{name}", node.name, timeout=10.0))
    node.wait_for_tasks(timeout=10.0)
    say("exchanged", len(peers))


def drive(node: Node, n: int, interval: float) -> None:
    """Push n tasks to ``work`` and call ``svc`` n times, reporting who served each call."""
    node.wait_for_workers("work", 1, timeout=10.0)
    tick = threading.Event()
    for i in range(n):
        node.push("work", i)
        try:
            say("svc", i, node.call("svc", i, timeout=3.0, retry=True), time.monotonic())
        except MeshError as exc:
            say("svc", i, "error", type(exc).__name__, time.monotonic())
        tick.wait(interval)
    node.wait_for_tasks(timeout=15.0)
    say("drive-done", n, "lane", node.stats()["calls_lane"])   # calls sent on RPC lanes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--group", required=True)
    ap.add_argument("--interfaces", default=None)
    ap.add_argument("--exchange", type=int, default=0)
    ap.add_argument("--shared", action="store_true")
    ap.add_argument("--drive", type=int, default=0)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--peer-timeout", type=float, default=0.8)
    ap.add_argument("--lifetime", type=float, default=60.0)
    args = ap.parse_args(argv)

    timing = Timing(heartbeat_interval=args.peer_timeout / 8, peer_timeout=args.peer_timeout,
                    hello_interval=0.1, tick=0.05, stop_timeout=2.0, linger=0.1)
    interfaces = args.interfaces.split(",") if args.interfaces else None
    node = Node(args.name, discovery="mdns", group=args.group, interfaces=interfaces,
                timing=timing)
    me = args.name

    @node.subscribe("mesh.hello")
    def hello(msg: Message) -> None:
        say("hello", msg.body)

    @node.worker(f"jobs.{me}")
    def job(msg: Message) -> None:
        say("task", msg.body)

    @node.rpc(f"whoami.{me}")
    def whoami(caller: str) -> str:
        say("served", caller)
        return me

    if args.shared:
        @node.worker("work")
        def work(msg: Message) -> None:
            say("did", msg.body, time.monotonic())

        @node.rpc("svc")
        def svc(i: int) -> str:
            return me

    @node.on_peer_join
    def joined(p: PeerInfo) -> None:
        say("join", p.name, p.id, p.address, time.monotonic())

    @node.on_peer_leave
    def left(p: PeerInfo) -> None:
        say("leave", p.name, p.id, time.monotonic())

    # Bounded life: SIGTERM ourselves after --lifetime; node.run() stops cleanly on it.
    timer = threading.Timer(args.lifetime, os.kill, (os.getpid(), signal.SIGTERM))
    timer.daemon = True
    timer.start()
    node.start()
    say("ready", node.id, node.address, node.host, time.monotonic())

    def act() -> None:
        try:
            if args.exchange:
                exchange(node, args.exchange)
            if args.drive:
                drive(node, args.drive, args.interval)
        except MeshError as exc:
            say("failed", type(exc).__name__, str(exc).replace("\n", " "))

    threading.Thread(target=act, name="act", daemon=True).start()
    stats: dict[str, Any] = {}
    try:
        node.run()
    finally:
        discovery = node._discovery
        if discovery is not None:
            stats = discovery.stats()
        timer.cancel()
    say("stopped", json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
