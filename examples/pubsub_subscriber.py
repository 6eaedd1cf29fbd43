"""Receive order events from pubsub_publisher.py (start them in any order).

    MESHMQ_INTERFACES=127.0.0.1 python examples/pubsub_subscriber.py           # find peers by mDNS
    python examples/pubsub_subscriber.py --port 7002                              # or be dialled
    python examples/pubsub_subscriber.py --replay earliest   # what a journal stored, then live
"""

from __future__ import annotations

import argparse
import threading

from meshmq import Message, Node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="subscriber")
    ap.add_argument("--peer", action="append", help="a peer's control endpoint (static mode)")
    ap.add_argument("--port", type=int, default=0, help="control port to listen on (0: any)")
    ap.add_argument("--static", action="store_true", help="no mDNS even without --peer")
    ap.add_argument("--pattern", default="orders.*")
    ap.add_argument("--count", type=int, default=0, help="exit after this many (0: Ctrl-C)")
    ap.add_argument("--replay", default=None, metavar="FROM",
                    help="earliest, latest or an offset: first get what a journal stored "
                         "(meshmq journal), then continue live, no gap, no duplicate")
    ap.add_argument("--repair", action="store_true",
                    help="fetch messages dropped on the way from a journal (on with --replay)")
    args = ap.parse_args(argv)

    node = Node(args.name, peers=args.peer if args.peer or not args.static else [],
                port=args.port)
    received = 0
    enough = threading.Event()

    options: dict[str, object] = {}
    if args.replay is not None:
        options["replay"] = int(args.replay) if args.replay.isdigit() else args.replay
    if args.repair:
        options["repair"] = True

    @node.subscribe(args.pattern, **options)
    def on_order(msg: Message) -> None:
        nonlocal received
        received += 1
        gap = f" (missed {msg.gap} before this)" if msg.gap else ""
        print(f"received {msg.topic} {msg.body} seq={msg.seq} from={msg.source}{gap}",
              flush=True)
        if args.count and received >= args.count:
            enough.set()

    @node.on_peer_join
    def joined(peer: object) -> None:
        print(f"peer joined: {getattr(peer, 'name', peer)}", flush=True)

    node.start()
    print(f"{args.name} listening on {node.address}", flush=True)
    if args.count:
        enough.wait()
        node.stop()
    else:
        node.run()  # until Ctrl-C / SIGTERM
    stats = node.stats()
    if args.replay is not None:
        print(f"done: {received} received ({stats['replayed']} replayed from a journal, "
              f"{stats['replay_live']} live)", flush=True)
    print(f"done: {received} received, stats {stats}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
