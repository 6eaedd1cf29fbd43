"""Call the inventory service served by rpc_server.py (one or more, any order).

    MESHMQ_INTERFACES=127.0.0.1 python examples/rpc_client.py --calls 10
"""

from __future__ import annotations

import argparse

from meshmq import MeshTimeout, Node, NoPeerError, RemoteError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="client")
    ap.add_argument("--peer", action="append", help="a peer's control endpoint (static mode)")
    ap.add_argument("--static", action="store_true", help="no mDNS even without --peer")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--servers", type=int, default=1, help="wait for this many servers first")
    args = ap.parse_args(argv)

    with Node(args.name, peers=args.peer if args.peer or not args.static else []) as node:
        print(f"{args.name} listening on {node.address}", flush=True)
        skus = ["A1", "B2", "C3"]
        try:
            node.wait_for_servers("inventory.check", count=args.servers, timeout=args.timeout)
            for i in range(args.calls):
                sku = skus[i % len(skus)]
                reply = node.call("inventory.check", sku, qty=2, timeout=args.timeout,
                                  retry=True)  # a check is idempotent: safe to retry
                print(f"call {i}: {sku} -> {reply}", flush=True)
            node.call("inventory.check", "ZZ", timeout=args.timeout)
        except RemoteError as exc:
            print(f"remote error as expected: {exc.type_name}: {exc.message}", flush=True)
        except (NoPeerError, MeshTimeout) as exc:
            print(f"error: {exc}", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
