"""Time from start to the first delivered message between two fresh nodes, mDNS vs static peers.

    .venv/bin/python benchmarks/bench_discovery.py [--runs 10]

Each run starts two new processes on loopback (mDNS on 127.0.0.1 only): a subscriber, then,
once it is up, a publisher that starts its node, waits for the subscriber (``wait_for_subscribers``)
and publishes one message. The figure is the time from the publisher's ``Node.start()`` to
the subscriber's handler getting the message; "from spawn" adds the publisher's interpreter
start and imports. Three ways, interleaved run by run so machine noise hits all alike:

* ``mdns``          both nodes find each other by mDNS, no address given;
* ``mdns-together`` the same, both processes started at once (timed from the later start());
* ``static``        the publisher is given the subscriber's address (``peers=[...]``).

Both processes read ``time.time()`` on the same machine, so their clocks agree. Runs are
bounded in number (at most 100) and each process in time (--timeout).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

MODES = ("mdns", "mdns-together", "static")
TOPIC = "bench.first"


# ---- the two roles, each in a process of its own ----------------------------------------------
def subscriber(group: str, static: bool, timeout: float) -> int:
    from meshmq import Message, Node

    got = threading.Event()
    when: list[float] = []

    def first(msg: Message) -> None:
        if not when:
            when.append(time.time())
            got.set()

    t0 = time.time()
    node = Node("bench-sub", peers=[] if static else None, discovery="static" if static else "mdns",
                group=group)
    node.subscribe(TOPIC)(first)
    node.start()
    print("ready", node.address, t0, flush=True)
    ok = got.wait(timeout)
    print("got", when[0] if ok else "timeout", flush=True)
    node.stop()
    return 0 if ok else 1


def publisher(group: str, peer: str | None, timeout: float) -> int:
    from meshmq import Node

    t0 = time.time()
    node = Node("bench-pub", peers=[peer] if peer else None,
                discovery="static" if peer else "mdns", group=group)
    node.start()
    try:
        node.wait_for_subscribers(TOPIC, 1, timeout=timeout)
        node.publish(TOPIC, "first")
        print("sent", t0, flush=True)
        sys.stdin.read()  # until the parent has seen the delivery (EOF)
    finally:
        node.stop()
    return 0


# ---- the parent: runs and figures --------------------------------------------------------------
def _spawn(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _line(proc: subprocess.Popen[str], word: str, timeout: float) -> list[str]:
    """The next stdout line of proc starting with word (bounded by timeout)."""
    assert proc.stdout is not None
    result: list[list[str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.split()[:1] == [word]:
                result.append(line.split())
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        raise TimeoutError(f"no {word!r} line within {timeout} s")
    return result[0]


def _close(proc: subprocess.Popen[str]) -> None:
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def one_run(mode: str, group: str, timeout: float) -> tuple[float, float]:
    """Return (seconds from the later start() to delivery, seconds from publisher spawn)."""
    common = ["--group", group, "--timeout", str(timeout)]
    static = ["--static"] if mode == "static" else []
    sub = _spawn(["--role", "sub", *static, *common])
    pub: subprocess.Popen[str] | None = None
    try:
        if mode == "mdns-together":
            spawned = time.time()
            pub = _spawn(["--role", "pub", *common])
            started_sub = float(_line(sub, "ready", timeout)[2])
        else:
            ready = _line(sub, "ready", timeout)
            started_sub = float(ready[2])
            spawned = time.time()
            pub = _spawn(["--role", "pub", *common,
                          *(["--peer", ready[1]] if mode == "static" else [])])
        got = _line(sub, "got", timeout)
        if got[1] == "timeout":
            raise TimeoutError(f"{mode}: nothing delivered within {timeout} s")
        delivered = float(got[1])
        started_pub = float(_line(pub, "sent", timeout)[1])
        return delivered - max(started_sub, started_pub), delivered - spawned
    finally:
        if pub is not None:
            _close(pub)
        _close(sub)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values, linear between closest ranks."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="runs per way (1..100; default 10)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds each step may take")
    ap.add_argument("--role", choices=("sub", "pub"), help=argparse.SUPPRESS)
    ap.add_argument("--group", default="", help=argparse.SUPPRESS)
    ap.add_argument("--peer", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--static", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    # Loopback only, whatever the caller's environment says: never multicast on a real LAN.
    os.environ["MESHMQ_INTERFACES"] = "127.0.0.1"
    if args.role == "sub":
        return subscriber(args.group, args.static, args.timeout)
    if args.role == "pub":
        return publisher(args.group, args.peer, args.timeout)

    runs = 2 if os.environ.get("MESHMQ_BENCH_QUICK") else max(1, min(args.runs, 100))
    print(f"start -> first delivered message, two fresh processes on loopback, {runs} runs "
          f"per way\ncommand: {' '.join([os.path.basename(sys.executable), *sys.argv])}",
          flush=True)
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    for i in range(runs):
        for mode in MODES:
            group = f"bench-{os.getpid()}-{i}-{mode}"  # runs never see each other's nodes
            results[mode].append(one_run(mode, group, args.timeout))
    print(f"{'way':<14} {'p50':>8} {'p95':>8} {'max':>8}   {'from spawn p50':>15} {'p95':>8}")
    for mode, rows in results.items():
        start = [r[0] * 1000 for r in rows]
        spawn = [r[1] * 1000 for r in rows]
        print(f"{mode:<14} {pct(start, 0.5):6.0f}ms {pct(start, 0.95):6.0f}ms "
              f"{max(start):6.0f}ms   {pct(spawn, 0.5):13.0f}ms {pct(spawn, 0.95):6.0f}ms",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
