"""Push resize tasks to the workers (pipeline_worker.py); results flow on to pipeline_sink.py.

    MESHMQ_INTERFACES=127.0.0.1 python examples/pipeline_ventilator.py --count 100
"""

from __future__ import annotations

import argparse
import time

from meshmq import MeshTimeout, Node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="ventilator")
    ap.add_argument("--peer", action="append", help="a peer's control endpoint (static mode)")
    ap.add_argument("--static", action="store_true", help="no mDNS even without --peer")
    ap.add_argument("--queue", default="resize")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1, help="wait for this many workers")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up after this long")
    args = ap.parse_args(argv)

    node = Node(args.name, peers=args.peer if args.peer or not args.static else [])
    with node:
        print(f"{args.name} listening on {node.address}", flush=True)
        try:
            node.wait_for_workers(args.queue, count=args.workers, timeout=args.timeout)
        except MeshTimeout:
            print(f"fewer than {args.workers} worker(s) after {args.timeout}s", flush=True)
            return 1
        started = time.monotonic()
        for i in range(args.count):
            node.push(args.queue, {"task": i, "image": f"img-{i:05d}.png", "size": 128})
        print(f"pushed {args.count} tasks", flush=True)
        # The ventilator owns its tasks until a worker acknowledges them: stay until all are.
        try:
            node.wait_for_tasks(args.queue, timeout=args.timeout)
        except MeshTimeout:
            pass
        s = node.stats()
        print(f"done: {s['tasks_completed']}/{args.count} acknowledged, "
              f"{s['tasks_redelivered']} redelivered, {s['deadlettered']} dead-lettered, "
              f"{time.monotonic() - started:.2f}s", flush=True)
        return 0 if s["tasks_completed"] == args.count else 1


if __name__ == "__main__":
    raise SystemExit(main())
