"""``meshmq journal`` (run a journal node, or ``inspect`` a log directory) and ``meshmq replay``."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from typing import Any

from meshmq._errors import MeshError

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``journal`` and ``replay`` subcommands to the meshmq CLI."""
    p = subparsers.add_parser(
        "journal", help="run a journal node (persist topics), or inspect a journal directory",
        description="Run a journal node storing every message of --topics in --dir, or "
                    "`meshmq journal inspect --dir D` to describe a journal directory.")
    p.add_argument("action", nargs="?", choices=["inspect"],
                   help="inspect: print segments, offsets, time range and damage, then exit")
    p.add_argument("--dir", required=True, help="the journal directory")
    p.add_argument("--topics", action="append", default=[],
                   help="topic pattern to store (repeat, or separate with commas)")
    p.add_argument("--fsync", default="always",
                   help='"always" (default), "interval=<ms>" or "never"')
    p.add_argument("--name", default="journal", help="node name (default: journal)")
    p.add_argument("--peer", action="append", default=[],
                   help="static peer control endpoint (repeatable); default discovery: mDNS")
    p.add_argument("--discovery", choices=["static", "mdns"], default=None,
                   help="static (only --peer and whoever dials us) or mdns; default: static if"
                        " --peer is given, else $MESHMQ_DISCOVERY or mdns")
    p.add_argument("--port", type=int, default=0, help="control port (default: any)")
    p.add_argument("--host", default=None, help="address to bind and advertise")
    p.add_argument("--segment-mb", type=float, default=64, help="segment size in MiB")
    p.add_argument("--retention-hours", type=float, default=None, help="delete older segments")
    p.add_argument("--retention-mb", type=float, default=None, help="cap the journal's size")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=_journal)

    r = subparsers.add_parser(
        "replay", help="print (or re-publish) what a journal stored",
        description="Read stored messages matching PATTERN from a journal directory (--dir, "
                    "journal not running) or from a running journal node (--from-node).")
    r.add_argument("pattern")
    r.add_argument("--since", default="earliest",
                   help='"earliest" (default), "latest", an offset, or an ISO date-time')
    r.add_argument("--until", default=None, help="an offset (exclusive) or an ISO date-time")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--dir", help="a journal directory (not open by a running journal)")
    src.add_argument("--from-node", metavar="ENDPOINT",
                     help='a journal node\'s control endpoint, or "mdns" to discover one')
    r.add_argument("--republish", action="store_true",
                   help="publish each message again (needs --from-node)")
    r.add_argument("--limit", type=int, default=None, help="stop after this many messages")
    r.set_defaults(func=_replay)


def _patterns(values: list[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _journal(args: argparse.Namespace) -> int:
    if args.action == "inspect":
        from ._inspect import inspect_directory
        try:
            print(inspect_directory(args.dir))
        except MeshError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from ._journal import Journal

    topics = _patterns(args.topics)
    try:
        journal = Journal(
            args.dir, topics, fsync=args.fsync, name=args.name,
            peers=args.peer or ([] if args.discovery == "static" else None),
            discovery=args.discovery, host=args.host, port=args.port,
            segment_bytes=int(args.segment_mb * (1 << 20)),
            retention_seconds=args.retention_hours * 3600 if args.retention_hours else None,
            retention_bytes=int(args.retention_mb * (1 << 20)) if args.retention_mb else None)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    last = {"t": time.monotonic(), "records": 0, "bytes": 0}
    tty = sys.stdout.isatty()

    def progress(j: Journal) -> None:
        if args.quiet:
            return
        s = j.stats()
        now = time.monotonic()
        dt_ = max(now - last["t"], 1e-9)
        rate = (s["stored"] - last["records"]) / dt_
        brate = (s["bytes_in"] - last["bytes"]) / dt_
        last.update(t=now, records=s["stored"], bytes=s["bytes_in"])
        line = (f"journal: records {s['records']:,} ({_human(s['bytes'])}, offsets "
                f"{s['first_offset']}..{s['next_offset']})  in {rate:,.0f} msg/s "
                f"{_human(brate)}/s  dup {s['duplicates']:,}  acks {s['acks']:,}")
        print(("\r" + line + "  ") if tty else line, end="" if tty else "\n", flush=True)

    try:
        journal.start()
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rep = journal.log.recovery
    print(f"journal {args.name} listening on {journal.address}", flush=True)
    print(f"storing {', '.join(topics)} in {args.dir} (fsync={args.fsync}); offsets "
          f"{journal.log.first_offset}..{journal.log.next_offset}; recovery "
          f"{'clean' if rep.clean else f'cut {rep.truncated_bytes} bytes, lost {rep.lost_ranges}'}"
          f" in {rep.seconds:.3f} s", flush=True)
    try:
        journal.run(progress)
    except MeshError as exc:
        print(f"\nerror: {exc}", file=sys.stderr, flush=True)
        return 3
    if tty:
        print()
    print(f"journal stopped: {journal.counters['stored']} stored this run", flush=True)
    return 0


def _when(value: str | None) -> Any:
    if value is None or value in ("earliest", "latest"):
        return value
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise SystemExit(f"error: not an offset or ISO date-time: {value!r}") from None


def _show(offset: Any, msg: Any) -> str:
    return json.dumps({"offset": offset, "topic": msg.topic, "id": msg.id,
                       "source": msg.source, "seq": msg.seq, "timestamp": msg.timestamp,
                       "headers": msg.headers, "body": msg.body}, default=repr)


def _replay(args: argparse.Namespace) -> int:
    since, until = _when(args.since), _when(args.until)
    try:
        if args.dir:
            if args.republish:
                print("error: --republish needs --from-node", file=sys.stderr)
                return 2
            return _replay_dir(args, since, until)
        return _replay_node(args, since, until)
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


def _replay_dir(args: argparse.Namespace, since: Any, until: Any) -> int:
    from meshmq._topics import check_pattern, matcher

    from ._client import since_value
    from ._entry import decode_entry
    from ._log import Log

    match = matcher(check_pattern(args.pattern))
    with Log.open(args.dir, fsync="never") as log:
        start = _offset(log, since_value(since))
        end = None if until is None else _offset(log, since_value(until))
        n = 0
        for record in log.read(start, end):
            msg = decode_entry(record.payload)
            if match(msg.topic):
                print(_show(record.offset, msg))
                n += 1
                if args.limit is not None and n >= args.limit:
                    break
    print(f"replayed {n} messages", file=sys.stderr)
    return 0


def _offset(log: Any, value: Any) -> int:
    if value == "earliest":
        return int(log.first_offset)
    if value == "latest":
        return int(log.next_offset)
    if isinstance(value, int):
        return value
    return int(log.offset_for_time(value))


def _replay_node(args: argparse.Namespace, since: Any, until: Any) -> int:
    from meshmq._node import Node

    mdns = args.from_node == "mdns"
    node = Node("replay", peers=None if mdns else [args.from_node],
                discovery="mdns" if mdns else "static")
    with node:
        n = 0
        for msg in node.replay(args.pattern, since=since, until=until, timeout=10.0):
            if args.republish:
                node.publish(msg.topic, msg.body, msg.headers or None)
            else:
                print(_show(None, msg))
            n += 1
            if args.limit is not None and n >= args.limit:
                break
    print(f"replayed {n} messages", file=sys.stderr)
    return 0
