"""Publish order events. Start it in one terminal, pubsub_subscriber.py in another.

    MESHMQ_INTERFACES=127.0.0.1 python examples/pubsub_publisher.py            # find peers by mDNS
    python examples/pubsub_publisher.py --peer tcp://127.0.0.1:7002              # or dial one
    python examples/pubsub_publisher.py --confirm     # each returns once a journal has it on disk
                                                      # (run `meshmq journal --dir ./data` too)
"""

from __future__ import annotations

import argparse
import itertools
import threading

from meshmq import MeshTimeout, Node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="publisher")
    ap.add_argument("--peer", action="append", help="a peer's control endpoint (static mode)")
    ap.add_argument("--port", type=int, default=0, help="control port to listen on (0: any)")
    ap.add_argument("--topic", default="orders.created")
    ap.add_argument("--count", type=int, default=10, help="messages to send (0: until Ctrl-C)")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between messages")
    ap.add_argument("--subscribers", type=int, default=1, help="wait for this many first")
    ap.add_argument("--confirm", action="store_true",
                    help="wait until a journal has each message on disk (meshmq journal)")
    args = ap.parse_args(argv)

    stop = threading.Event()
    with Node(args.name, peers=args.peer, port=args.port) as node:
        print(f"{args.name} listening on {node.address}", flush=True)
        try:
            node.wait_for_subscribers(args.topic, count=args.subscribers, timeout=30.0)
        except MeshTimeout:
            print("no subscriber after 30 s; publishing anyway", flush=True)
        counter = itertools.count(1) if args.count == 0 else range(1, args.count + 1)
        for i in counter:
            node.publish(args.topic, {"order": i, "amount": 10 * i}, confirm=args.confirm,
                         timeout=30.0)
            print(f"published {args.topic} order={i}{' (on disk)' if args.confirm else ''}",
                  flush=True)
            if stop.wait(args.interval):
                break
        print(f"done: {node.stats()['sent']} sent", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
