"""Shared helpers for the benchmarks: environment, child processes, medians, tables, envelopes.

Benchmarks print figures; they are not tests. Every figure compares meshmq with raw pyzmq measured
in the same run (the machines are noisy: only same-run ratios mean anything) and is the median of
a few bounded rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgpack

# Loopback only, static peers only: no mDNS, no multicast on a real interface.
BENCH_ENV = {"MESHMQ_DISCOVERY": "static", "MESHMQ_INTERFACES": "127.0.0.1"}
HWM = 100_000          # meshmq's default high-water mark; the raw sockets get the same
PROTO = 1              # envelope version (meshmq/_envelope.py)
SNDMORE = 2            # int(zmq.SNDMORE): a plain int, no IntFlag arithmetic on the hot path
NOBLOCK = 1            # int(zmq.NOBLOCK)


def setup_env() -> None:
    """Force the loopback/static environment (children started later inherit it)."""
    os.environ.update(BENCH_ENV)


def add_common_args(ap: argparse.ArgumentParser, repeats: int = 3, seconds: float = 0.5) -> None:
    ap.add_argument("--repeats", type=int, default=repeats,
                    help=f"rounds per measurement, the median is quoted (default {repeats})")
    ap.add_argument("--seconds", type=float, default=seconds,
                    help=f"upper bound on one round's sending time (default {seconds})")
    ap.add_argument("--quick", action="store_true", help="1 round of 0.2 s: a smoke run")


def resolve(args: argparse.Namespace) -> tuple[int, float]:
    """(repeats, seconds) after --quick (or $MESHMQ_BENCH_QUICK), clamped to sane bounds."""
    if args.quick or os.environ.get("MESHMQ_BENCH_QUICK"):
        return 1, 0.2
    return max(1, min(args.repeats, 15)), max(0.05, min(args.seconds, 10.0))


# ---- child processes ---------------------------------------------------------------------------
# spawn, not fork: a forked child would inherit the parent's zmq contexts and threads.
MP = multiprocessing.get_context("spawn")


class BenchError(RuntimeError):
    """A child process died, or did not answer in time."""


class Child:
    """A process running ``target(conn, *args)``, driven over a pipe of (command, ...) tuples."""

    def __init__(self, name: str, target: Callable[..., None], *args: Any) -> None:
        self.name = name
        self.conn, child_conn = MP.Pipe()
        self.proc = MP.Process(target=_child_main, args=(target, child_conn, *args), name=name,
                               daemon=True)
        self.proc.start()
        child_conn.close()

    def send(self, *msg: Any) -> None:
        self.conn.send(msg)

    def recv(self, timeout: float = 30.0) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.1):
            if not self.proc.is_alive():
                raise BenchError(f"{self.name} exited with code {self.proc.exitcode}")
            if time.monotonic() >= deadline:
                raise BenchError(f"{self.name} did not answer within {timeout}s")
        try:
            reply = self.conn.recv()
        except EOFError as exc:
            raise BenchError(f"{self.name} closed its pipe") from exc
        if isinstance(reply, tuple) and reply and reply[0] == "error":
            raise BenchError(f"{self.name} failed: {reply[1]}")
        return reply

    def ask(self, *msg: Any, timeout: float = 30.0) -> Any:
        self.send(*msg)
        return self.recv(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Ask the child to stop; past ``timeout`` terminate it, then kill it (by its pid)."""
        if self.proc.is_alive():
            try:
                self.conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)
        self.conn.close()


def _child_main(target: Callable[..., None], conn: Connection, *args: Any) -> None:
    import traceback
    try:
        target(conn, *args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which prints it
        try:
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        except OSError:
            pass
        raise SystemExit(1) from None


def serve(conn: Connection, handlers: dict[str, Callable[..., Any]], idle_timeout: float = 120.0
          ) -> None:
    """A child's command loop: ``(cmd, *args)`` in, the handler's return value out, until stop.

    Every child also answers ``cpu``: the CPU seconds its process (all threads) has used, so the
    parent can put a CPU cost on each message, which the machine's noise disturbs far less than
    a rate.
    """
    handlers = {"cpu": time.process_time, **handlers}
    while True:
        if not conn.poll(idle_timeout):
            raise BenchError(f"no command from the parent for {idle_timeout}s")
        cmd, *args = conn.recv()
        if cmd == "stop":
            return
        conn.send(handlers[cmd](*args))


# ---- the wire envelope, built by hand for the raw baselines ----------------------------------------
class RawIds:
    """Message ids as meshmq makes them: a per-process prefix plus a hex counter."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n:x}"


def pack_pub(packer: msgpack.Packer, msg_id: str, source: str, source_id: str, seq: int,
             ts: float, body: Any) -> bytes:
    """The frame-1 payload of a published message (see meshmq/_envelope.py)."""
    return packer.pack([PROTO, msg_id, source, source_id, seq, ts, None, body])


def pack_ctl(kind: str, fields: dict[str, Any]) -> bytes:
    """A control-plane payload ``[proto, kind, fields]`` (tasks, acks, calls, replies)."""
    return msgpack.packb([PROTO, kind, fields], use_bin_type=True)


def unpack(payload: bytes) -> Any:
    """Decode with the options meshmq's codec uses on the way in."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=True, timestamp=3)


def check_same_envelope() -> None:
    """Fail loudly if the hand-built raw envelopes stop matching meshmq's own encoder."""
    from meshmq._envelope import PubEncoder, encode_ctl
    body = b"x" * 64
    ours = pack_pub(msgpack.Packer(use_bin_type=True), "abc-1", "pub", "abc", 7, 1.5, body)
    theirs = PubEncoder().encode("abc-1", "pub", "abc", 7, 1.5, None, body)
    if ours != theirs:
        raise BenchError("raw pub envelope differs from meshmq's PubEncoder")
    fields = {"q": "q", "id": "t1", "att": 1, "key": None, "h": {}, "b": msgpack.packb(body)}
    if pack_ctl("task", fields) != encode_ctl("task", fields):
        raise BenchError("raw control envelope differs from meshmq's encode_ctl")


# ---- figures -------------------------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of ``xs`` (p in 0..100)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


@dataclass
class Result:
    """One comparison: a subject's figures (meshmq's, usually) and a baseline's, over the rounds."""

    bench: str
    case: str
    unit: str                       # "msg/s" or "us"
    higher_is_better: bool
    meshmq: list[float] = field(default_factory=list)   # the subject's figures
    raw: list[float] = field(default_factory=list)      # the baseline's figures
    aim: float | None = None        # aimed ratio subject/baseline (>= if higher is better, else <=)
    baseline: str = "raw pyzmq"
    subject: str = "meshmq"
    note: str = ""

    @property
    def ratio(self) -> float:
        m, r = median(self.meshmq), median(self.raw)
        return m / r if r else float("nan")

    @property
    def verdict(self) -> str:
        if self.aim is None or self.ratio != self.ratio:
            return ""
        ok = self.ratio >= self.aim if self.higher_is_better else self.ratio <= self.aim
        return "meets aim" if ok else "MISSES AIM"

    @property
    def aim_text(self) -> str:
        if self.aim is None:
            return ""
        return f"{'>=' if self.higher_is_better else '<='} {self.aim:g}"


def fmt(value: float, unit: str) -> str:
    if value != value:
        return "-"
    if unit == "msg/s":
        return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def spread(xs: Sequence[float], unit: str) -> str:
    return "/".join(fmt(x, unit) for x in xs)


def print_table(title: str, results: Sequence[Result]) -> None:
    """A fixed-width table: medians, subject/baseline ratio, the aim, and every round's figure."""
    print(f"\n{title}")
    head = (f"  {'case':<32} {'subject / baseline':<38} {'unit':<5} {'subject':>8} "
            f"{'baseline':>8} {'ratio':>6}  {'aim':<7} {'verdict':<10} rounds")
    print(head)
    print("  " + "-" * (len(head) + 10))
    for r in results:
        print(f"  {r.case:<32} {r.subject + ' / ' + r.baseline:<38} {r.unit:<5} "
              f"{fmt(median(r.meshmq), r.unit):>8} {fmt(median(r.raw), r.unit):>8} "
              f"{r.ratio:>6.2f}  {r.aim_text:<7} {r.verdict:<10} "
              f"{spread(r.meshmq, r.unit)} | {spread(r.raw, r.unit)}")
        for line in r.note.splitlines():
            print(f"  {'':<32} {line}")
    print(flush=True)


class CpuMeter:
    """CPU microseconds per message of some children, summed over rounds: ``with meter(n):``."""

    def __init__(self, *children: Child) -> None:
        self.children = children
        self.cpu = [0.0] * len(children)
        self.messages = 0

    def start(self) -> list[float]:
        return [c.ask("cpu") for c in self.children]

    def stop(self, before: list[float], messages: int) -> None:
        for i, c in enumerate(self.children):
            self.cpu[i] += c.ask("cpu") - before[i]
        self.messages += messages

    def per_message(self) -> list[float]:
        return [1e6 * c / self.messages if self.messages else float("nan") for c in self.cpu]

    def text(self, *names: str) -> str:
        return " + ".join(f"{n} {v:.1f}" for n, v in zip(names, self.per_message(), strict=True))


def emit(results: Sequence[Result]) -> None:
    """Append the results as JSON lines to $MESHMQ_BENCH_JSON (the runner's summary), if set."""
    path = os.environ.get("MESHMQ_BENCH_JSON")
    if not path:
        return
    with open(path, "a", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps({
                "bench": r.bench, "case": r.case, "subject": r.subject, "unit": r.unit,
                "higher_is_better": r.higher_is_better, "value": median(r.meshmq),
                "baseline_value": median(r.raw), "baseline": r.baseline, "ratio": r.ratio,
                "aim": r.aim_text, "verdict": r.verdict, "note": r.note}) + "\n")
