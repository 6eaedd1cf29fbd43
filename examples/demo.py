"""The meshmq demo: nine processes on this machine find each other and do three kinds of work.

    make demo                     # or: MESHMQ_INTERFACES=127.0.0.1 python examples/demo.py

It starts every other example as its own OS process, exactly as you would in nine terminals:

* pub/sub:   pubsub_publisher.py -> pubsub_subscriber.py (topic ``orders.created``)
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
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIDTH = 12


class Proc:
    """One example script running as a child process; its lines are echoed with a label."""

    def __init__(self, label: str, script: str, *args: str, out: queue.SimpleQueue[str]) -> None:
        self.label = label
        self.lines: list[str] = []
        self._cv = threading.Condition(threading.RLock())
        self._out = out
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            with self._cv:
                self.lines.append(line)
                self._cv.notify_all()
            self._out.put(f"{self.label:>{WIDTH}} | {line}")

    def wait_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """Wait until a line matches ``pattern``; return the match (TimeoutError if none)."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cv:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(f"{self.label}: no line matching {pattern!r}")
                self._cv.wait(min(left, 0.2))

    def wait_count(self, pattern: str, n: int, timeout: float) -> None:
        """Wait until ``n`` lines match ``pattern`` (TimeoutError if not in time)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.count(pattern) < n:
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise TimeoutError(f"{self.label}: fewer than {n} lines matching {pattern!r}")
                self._cv.wait(min(left, 0.2))

    def count(self, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._cv:
            return sum(1 for line in self.lines if rx.search(line))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGINT) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)


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
    procs: list[Proc] = []
    printer_stop = threading.Event()

    def printer() -> None:
        while not (printer_stop.is_set() and out.empty()):
            try:
                print(out.get(timeout=0.1), flush=True)
            except queue.Empty:
                pass

    show = threading.Thread(target=printer, daemon=True)
    show.start()

    def start(label: str, script: str, *a: str) -> Proc:
        p = Proc(label, script, *a, out=out)
        procs.append(p)
        return p

    def address(p: Proc) -> str:
        return p.wait_line(r"listening on (\S+)", 20).group(1)

    def peers(*ps: Proc) -> list[str]:
        return [x for p in ps for x in ("--peer", address(p))] if static else []

    started = time.monotonic()
    problems: list[str] = []
    try:
        print(f"meshmq demo: 9 processes, discovery={args.discovery}, "
              f"interfaces={os.environ['MESHMQ_INTERFACES']}", flush=True)
        flag = ["--static"] if static else []
        # The sink runs until the ventilator is done: a task redone after the worker kill
        # re-emits its result, which the sink must still acknowledge (as a duplicate).
        sink = start("sink", "pipeline_sink.py", *flag)
        vent = start("ventilator", "pipeline_ventilator.py", "--count", str(args.tasks),
                     "--workers", "2", "--timeout", str(args.timeout), *peers(sink))
        workers = [start(f"worker-{i}", "pipeline_worker.py", "--name", f"worker-{i}",
                         "--delay", "0.05", *peers(vent, sink)) for i in (1, 2)]
        sub = start("subscriber", "pubsub_subscriber.py", "--count", "10", *flag)
        pub = start("publisher", "pubsub_publisher.py", "--count", "10", "--interval", "0.1",
                    *peers(sub))
        servers = [start(f"inventory-{i}", "rpc_server.py", "--name", f"inventory-{i}", *flag)
                   for i in (1, 2)]
        client = start("rpc-client", "rpc_client.py", "--calls", "6", "--servers", "2",
                       "--timeout", str(args.timeout), *peers(*servers))

        # Halfway through the pipeline, kill worker-2 without warning.
        try:
            workers[1].wait_line(r"working task=", args.timeout)
            vent.wait_line(r"pushed", args.timeout)
            sink.wait_count(r"^result ", args.tasks // 2, args.timeout)
        except TimeoutError as exc:
            problems.append(str(exc))
        out.put(f"{'demo':>{WIDTH}} | killing worker-2 with SIGKILL (no goodbye, tasks in hand)")
        workers[1].stop(signal.SIGKILL)

        for p, what in ((vent, "ventilator"), (pub, "publisher"),
                        (sub, "subscriber"), (client, "rpc client")):
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
            p.stop()
        printer_stop.set()
        show.join(5)
    if len(procs) < 9:
        for problem in problems:
            print(f"demo problem: {problem}", file=sys.stderr, flush=True)
        return 1

    unique = int(m.group(1)) if (m := _search(sink, r"sink done: (\d+) unique")) else 0
    redone = _search(vent, r"(\d+) redelivered")
    served = {name for name in ("inventory-1", "inventory-2")
              if _search(client, rf"'server': '{name}'")}
    print(file=sys.stderr if problems else sys.stdout, flush=True)
    print("summary:", flush=True)
    print(f"  pub/sub : {sub.count(r'^received ')} of 10 orders received", flush=True)
    print(f"  pipeline: {unique} of {args.tasks} results at the sink, each once; "
          f"{redone.group(1) if redone else '?'} task(s) redelivered after worker-2 was killed",
          flush=True)
    print(f"  rpc     : {client.count(r'^call ')} calls answered by {sorted(served)}; "
          f"remote error {'seen' if client.count('remote error as expected') else 'missing'}",
          flush=True)
    print(f"  {time.monotonic() - started:.1f}s in all", flush=True)
    if unique != args.tasks:
        problems.append(f"sink has {unique} of {args.tasks} results")
    for problem in problems:
        print(f"demo problem: {problem}", file=sys.stderr, flush=True)
    return 1 if problems else 0


def _search(p: Proc, pattern: str) -> re.Match[str] | None:
    rx = re.compile(pattern)
    for line in p.lines:
        m = rx.search(line)
        if m:
            return m
    return None


if __name__ == "__main__":
    raise SystemExit(main())
