"""``meshmq nodes``: list the meshmq nodes mDNS shows, or watch them come and go.

Browse only: the command registers no service, so it never appears as a node itself.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from typing import Any, TextIO

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add ``nodes`` to the ``meshmq`` subcommands."""
    p = sub.add_parser(
        "nodes",
        help="list the meshmq nodes on the LAN (mDNS)",
        description="Browse mDNS for meshmq nodes and print what each offers. "
        "Nothing is advertised: this command is not a node.",
    )
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="seconds to browse (default 3; with --watch: until Ctrl-C)")
    p.add_argument("--watch", action="store_true",
                   help="print nodes joining and leaving as it happens")
    p.add_argument("--json", action="store_true",
                   help="a JSON list (with --watch: one JSON object per event and line)")
    p.add_argument("--group", default=None,
                   help="the group to list (default $MESHMQ_GROUP or 'default')")
    p.add_argument("--all-groups", action="store_true", help="list the nodes of every group")
    p.add_argument("--interfaces", default=None, metavar="ADDRS",
                   help="comma-separated IPv4 addresses, or 'all' (default $MESHMQ_INTERFACES, "
                   "else all)")
    p.set_defaults(func=run)


def as_dict(s: Any) -> dict[str, Any]:
    """A Sighting as JSON-able data."""
    a = s.advert
    return {
        "name": a.name, "id": a.node_id, "group": a.group,
        "address": s.endpoints[0] if s.endpoints else "", "addresses": list(s.addresses),
        "port": a.port, "offers": [o for o in a.offers.split(",") if o], "proto": a.proto,
        "instance": s.instance,
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned text table, sorted by group, name and id."""
    head = ("NAME", "ID", "GROUP", "ADDRESS", "OFFERS")
    cells = [head] + [(r["name"], r["id"], r["group"], r["address"], ",".join(r["offers"]))
                      for r in sorted(rows, key=lambda r: (r["group"], r["name"], r["id"]))]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head) - 1)]
    return "\n".join("  ".join([*(c[i].ljust(widths[i]) for i in range(len(widths))), c[-1]])
                     .rstrip() for c in cells)


def run(args: argparse.Namespace) -> int:
    from meshmq.discovery._mdns import MdnsDiscovery

    group = None if args.all_groups else (args.group or os.environ.get("MESHMQ_GROUP")
                                          or "default")
    timeout = args.timeout if args.timeout is not None else (None if args.watch else 3.0)
    events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    browser = MdnsDiscovery(
        args.interfaces, group,
        on_join=lambda s: events.put(("join", s)),
        on_update=lambda s: events.put(("update", s)),
        on_leave=lambda s: events.put(("leave", s)),
    )
    browser.start(None)  # browse only: advertise nothing
    try:
        if args.watch:
            try:
                watch(events, timeout, args.json, sys.stdout)
            except KeyboardInterrupt:
                pass  # Ctrl-C is how a watch ends
        else:
            threading.Event().wait(timeout or 0)
            rows = [as_dict(s) for s in browser.sightings()]
            print(json.dumps(rows, indent=2) if args.json else table(rows)
                  if rows else "no meshmq nodes found", flush=True)
    finally:
        browser.stop()
    return 0


def watch(events: queue.SimpleQueue[tuple[str, Any]], timeout: float | None, as_json: bool,
          out: TextIO) -> None:
    """Print events until ``timeout`` (None: until Ctrl-C, which ends the command with 130)."""
    print("watching for meshmq nodes (Ctrl-C to stop)", file=sys.stderr, flush=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    signs = {"join": "+", "update": "~", "leave": "-"}
    while deadline is None or (left := deadline - time.monotonic()) > 0:
        try:
            kind, s = events.get(timeout=0.5 if deadline is None else min(left, 0.5))
        except queue.Empty:
            continue
        row = as_dict(s)
        if as_json:
            line = json.dumps({"event": kind, "t": round(time.time(), 3), **row})
        else:
            line = (f"{time.strftime('%H:%M:%S')} {signs[kind]} {row['name']} {row['id']} "
                    f"{row['group']} {row['address']} {','.join(row['offers'])}").rstrip()
        print(line, file=out, flush=True)
