"""The meshmq demo: eleven processes on this machine find each other and do four kinds of work.

    make demo                     # or: MESHMQ_INTERFACES=127.0.0.1 python examples/demo.py

It starts every other example as its own OS process, exactly as you would in eleven terminals:

* pub/sub:   pubsub_publisher.py -> pubsub_subscriber.py (topic ``orders.created``)
* journal:   ``meshmq journal`` stores the orders (in a temporary directory, removed at the end);
             the publisher waits until each one is on disk (``confirm=True``), and a late
             subscriber (``auditor``, started halfway) first replays what it missed from the
             journal, then continues live: every order once, none missed
* pipeline:  pipeline_ventilator.py -> 2 x pipeline_worker.py -> pipeline_sink.py;
             one worker is killed with SIGKILL halfway: its unacknowledged task goes to
             the other worker (attempt=2) and the sink still gets every result once
* RPC:       rpc_client.py -> 2 x rpc_server.py (calls spread across both servers)

Every line a process prints is shown with its name. With ``--discovery mdns`` (the default)
no process is given an address: they find each other with mDNS on the interfaces in
``MESHMQ_INTERFACES`` (this demo pins loopback when it is unset). ``--discovery static``
passes control endpoints on the command lines instead. Exits 0 when all of it worked.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from meshmq.testing import Script  # a child process whose output lines we can wait for

HERE = Path(__file__).resolve().parent
WIDTH = 12


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--discovery", choices=["mdns", "static"], default="mdns")
    ap.add_argument("--tasks", type=int, default=40, help="pipeline tasks to push")
    ap.add_argument("--timeout", type=float, default=60.0, help="give up after this long")
    args = ap.parse_args(argv)
    os.environ.setdefault("MESHMQ_INTERFACES", "127.0.0.1")  # never multicast beyond loopback
    os.environ["MESHMQ_DISCOVERY"] = args.discovery
    static = args.discovery == "static"

    out: queue.SimpleQueue[str] = queue.SimpleQueue()
    procs: list[Script] = []
    printer_stop = threading.Event()

    def printer() -> None:
        while not (printer_stop.is_set() and out.empty()):
            try:
                print(out.get(timeout=0.1), flush=True)
            except queue.Empty:
                pass

    show = threading.Thread(target=printer, daemon=True)
    show.start()

    def start(label: str, script: str, *a: str) -> Script:
        argv = [str(HERE / script)] if script.endswith(".py") else [sys.executable, "-m", script]
        p = Script([*argv, *a],
                   on_line=lambda line: out.put(f"{label:>{WIDTH}} | {line}"))
        procs.append(p)
        return p

    addresses: dict[Script, str] = {}

    def address(p: Script) -> str:
        if p not in addresses:  # expect() consumes the line: read it once
            addresses[p] = p.expect("listening on", 20).rsplit(" ", 1)[1]
        return addresses[p]

    def peers(*ps: Script) -> list[str]:
        return [x for p in ps for x in ("--peer", address(p))] if static else []

    started = time.monotonic()
    problems: list[str] = []
    data = tempfile.mkdtemp(prefix="meshmq-demo-journal-")
    auditor: Script | None = None
    try:
        print(f"meshmq demo: 11 processes, discovery={args.discovery}, "
              f"interfaces={os.environ['MESHMQ_INTERFACES']}", flush=True)
        flag = ["--static"] if static else []
        journal = start("journal", "meshmq.cli", "journal", "--dir", data, "--topics",
                        "orders.>", "--fsync", "always", "--quiet",
                        "--discovery", args.discovery)
        # The sink runs until the ventilator is done: a task redone after the worker kill
        # re-emits its result, which the sink must still acknowledge (as a duplicate).
        sink = start("sink", "pipeline_sink.py", *flag)
        vent = start("ventilator", "pipeline_ventilator.py", "--count", str(args.tasks),
                     "--workers", "2", "--timeout", str(args.timeout), *peers(sink))
        workers = [start(f"worker-{i}", "pipeline_worker.py", "--name", f"worker-{i}",
                         "--delay", "0.05", *peers(vent, sink)) for i in (1, 2)]
        sub = start("subscriber", "pubsub_subscriber.py", "--count", "10", *flag)
        # It waits for two subscribers: the subscriber and the journal.
        pub = start("publisher", "pubsub_publisher.py", "--count", "10", "--interval", "0.1",
                    "--confirm", "--subscribers", "2", *peers(sub, journal))
        auditor_peers = peers(pub, journal)   # before expect() reads past "listening on"
        servers = [start(f"inventory-{i}", "rpc_server.py", "--name", f"inventory-{i}", *flag)
                   for i in (1, 2)]
        client = start("rpc-client", "rpc_client.py", "--calls", "6", "--servers", "2",
                       "--timeout", str(args.timeout), *peers(*servers))

        # Halfway through the orders, a subscriber that missed the first ones joins: it gets
        # them from the journal, then the rest live.
        try:
            pub.expect("order=5 ", args.timeout)
        except TimeoutError as exc:
            problems.append(str(exc))
        auditor = start("auditor", "pubsub_subscriber.py", "--name", "auditor", "--replay",
                        "earliest", "--count", "10", *flag, *auditor_peers)

        # Halfway through the pipeline, kill worker-2 without warning.
        try:
            workers[1].expect("working task=", args.timeout)
            vent.expect("pushed", args.timeout)
            for _ in range(args.tasks // 2):
                sink.expect(lambda line: line.startswith("result "), args.timeout)
        except TimeoutError as exc:
            problems.append(str(exc))
        out.put(f"{'demo':>{WIDTH}} | killing worker-2 with SIGKILL (no goodbye, tasks in hand)")
        workers[1].stop(signal.SIGKILL)

        for p, what in ((vent, "ventilator"), (pub, "publisher"), (sub, "subscriber"),
                        (auditor, "auditor"), (client, "rpc client")):
            try:
                if p.wait(max(1.0, args.timeout - (time.monotonic() - started))) != 0:
                    problems.append(f"{what} exited with {p.proc.returncode}")
            except subprocess.TimeoutExpired:
                problems.append(f"{what} did not finish in {args.timeout}s")
        if sink.stop(signal.SIGINT) != 0:  # prints its summary on the way out
            problems.append(f"sink exited with {sink.proc.returncode}")
    except TimeoutError as exc:
        problems.append(str(exc))
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGINT)
        printer_stop.set()
        show.join(5)
        shutil.rmtree(data, ignore_errors=True)
    if len(procs) < 11 or auditor is None:
        for problem in problems:
            print(f"demo problem: {problem}", file=sys.stderr, flush=True)
        return 1

    unique = int(m.group(1)) if (m := _search(sink, r"sink done: (\d+) unique")) else 0
    redone = _search(vent, r"(\d+) redelivered")
    served = {name for name in ("inventory-1", "inventory-2")
              if _search(client, rf"'server': '{name}'")}
    print(file=sys.stderr if problems else sys.stdout, flush=True)
    print("summary:", flush=True)
    print(f"  pub/sub : {_count(sub, r'^received ')} of 10 orders received", flush=True)
    audited = sorted({int(m.group(1)) for line in auditor.lines
                      if (m := re.search(r"'order': (\d+)", line)) and line.startswith("received")})
    split = _search(auditor, r"\((\d+) replayed from a journal, (\d+) live\)")
    print(f"  journal : {_count(pub, r'on disk')} of 10 orders confirmed on disk; the late "
          f"auditor got {len(audited)} of 10, each once "
          f"({split.group(1) if split else '?'} replayed, {split.group(2) if split else '?'} "
          f"live)", flush=True)
    print(f"  pipeline: {unique} of {args.tasks} results at the sink, each once; "
          f"{redone.group(1) if redone else '?'} task(s) redelivered after worker-2 was killed",
          flush=True)
    print(f"  rpc     : {_count(client, r'^call ')} calls answered by {sorted(served)}; "
          f"remote error {'seen' if _count(client, 'remote error as expected') else 'missing'}",
          flush=True)
    print(f"  {time.monotonic() - started:.1f}s in all", flush=True)
    if unique != args.tasks:
        problems.append(f"sink has {unique} of {args.tasks} results")
    if audited != list(range(1, 11)) or _count(auditor, r"^received ") != 10:
        problems.append(f"the auditor got orders {audited}")
    for problem in problems:
        print(f"demo problem: {problem}", file=sys.stderr, flush=True)
    return 1 if problems else 0


def _count(p: Script, pattern: str) -> int:
    rx = re.compile(pattern)
    return sum(1 for line in p.lines if rx.search(line))


def _search(p: Script, pattern: str) -> re.Match[str] | None:
    rx = re.compile(pattern)
    for line in p.lines:
        m = rx.search(line)
        if m:
            return m
    return None


if __name__ == "__main__":
    raise SystemExit(main())
