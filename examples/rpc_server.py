"""Serve inventory checks over RPC. Start one or more, then rpc_client.py.

    MESHMQ_INTERFACES=127.0.0.1 python examples/rpc_server.py --name inventory-1
"""

from __future__ import annotations

import argparse

from meshmq import Node


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="inventory")
    ap.add_argument("--peer", action="append", help="a peer's control endpoint (static mode)")
    ap.add_argument("--static", action="store_true", help="no mDNS even without --peer")
    ap.add_argument("--delay", type=float, default=0.0, help="seconds each call takes")
    args = ap.parse_args(argv)

    stock = {"A1": 5, "B2": 0, "C3": 12}
    node = Node(args.name, peers=args.peer if args.peer or not args.static else [])

    @node.rpc("inventory.check")
    def check(sku: str, qty: int = 1) -> dict[str, object]:
        if sku not in stock:
            raise KeyError(f"unknown sku {sku}")
        if args.delay:
            import time
            time.sleep(args.delay)
        return {"sku": sku, "available": stock[sku] >= qty, "server": args.name}

    node.start()
    print(f"{args.name} listening on {node.address}", flush=True)
    node.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
