"""Work on resize tasks from pipeline_ventilator.py and push results on to pipeline_sink.py.

    MESHMQ_INTERFACES=127.0.0.1 python examples/pipeline_worker.py --name worker-1
"""

from __future__ import annotations

import argparse
import time

from meshmq import Message, Node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="worker")
    ap.add_argument("--peer", action="append", help="a peer's control endpoint (static mode)")
    ap.add_argument("--static", action="store_true", help="no mDNS even without --peer")
    ap.add_argument("--queue", default="resize")
    ap.add_argument("--emit", default="results", help="queue the results go on to")
    ap.add_argument("--delay", type=float, default=0.01, help="seconds of 'work' per task")
    ap.add_argument("--concurrency", type=int, default=1)
    args = ap.parse_args(argv)

    node = Node(args.name, peers=args.peer if args.peer or not args.static else [])

    @node.worker(args.queue, emit=args.emit, concurrency=args.concurrency)
    def resize(msg: Message) -> dict[str, object]:
        print(f"working task={msg.body['task']} attempt={msg.attempt}", flush=True)
        time.sleep(args.delay)  # stands for the real work
        return {"task": msg.body["task"], "thumbnail": msg.body["image"].replace(".png", "_t.png"),
                "by": args.name}

    node.start()
    print(f"{args.name} listening on {node.address}", flush=True)
    node.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
