"""Collect results from the workers (pipeline_worker.py), counting each task once.

    MESHMQ_INTERFACES=127.0.0.1 python examples/pipeline_sink.py --count 100

Delivery is at-least-once: a worker killed after emitting a result but before its
acknowledgement reached the ventilator does the task again. The result of a redone task comes
under the same derived id, so the sink de-duplicates by ``msg.id``.
"""

from __future__ import annotations

import argparse
import threading

from meshmq import Message, Node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="sink")
    ap.add_argument("--peer", action="append", help="a peer's control endpoint (static mode)")
    ap.add_argument("--static", action="store_true", help="no mDNS even without --peer")
    ap.add_argument("--queue", default="results")
    ap.add_argument("--count", type=int, default=0, help="exit after this many distinct results")
    args = ap.parse_args(argv)

    node = Node(args.name, peers=args.peer if args.peer or not args.static else [])
    seen: set[str] = set()
    tasks: set[int] = set()
    duplicates = 0
    lock = threading.Lock()
    enough = threading.Event()

    @node.worker(args.queue, concurrency=1)
    def collect(msg: Message) -> None:
        nonlocal duplicates
        with lock:
            if msg.id in seen:
                duplicates += 1
                print(f"duplicate id={msg.id} task={msg.body['task']}", flush=True)
                return
            seen.add(msg.id)
            tasks.add(msg.body["task"])
            print(f"result task={msg.body['task']} by={msg.body['by']}", flush=True)
            if args.count and len(seen) >= args.count:
                enough.set()

    node.start()
    print(f"{args.name} listening on {node.address}", flush=True)
    if args.count:
        enough.wait()
        node.stop()
    else:
        node.run()
    print(f"sink done: {len(seen)} unique results for {len(tasks)} tasks, "
          f"{duplicates} duplicates", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
