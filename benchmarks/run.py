"""Run the benchmarks (``make bench``): every benchmarks/bench_*.py, each as a time-bounded subprocess.

    .venv/bin/python benchmarks/run.py                  # all of them
    .venv/bin/python benchmarks/run.py --only rpc       # bench_rpc.py only (repeatable)
    .venv/bin/python benchmarks/run.py --quick          # smoke run: 1 short round each
    .venv/bin/python benchmarks/run.py --list

Each script is a standalone program with a ``main()``; it runs in its own session (process group)
so that a script past its time bound is stopped with everything it started. Scripts run one after
another: they measure the machine, and two at once would measure each other. The environment is
loopback-only with static peers (MESHMQ_DISCOVERY=static, MESHMQ_INTERFACES=127.0.0.1).

Scripts that report through ``_common.emit`` (it appends JSON lines to $MESHMQ_BENCH_JSON) appear
in the summary table at the end; the others' own output is shown as it comes. Exit status is 1
if any script failed or ran out of time.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = {"MESHMQ_DISCOVERY": "static", "MESHMQ_INTERFACES": "127.0.0.1"}


def discover() -> list[Path]:
    return sorted(HERE.glob("bench_*.py"))


def short(path: Path) -> str:
    return path.stem.removeprefix("bench_")


def select(scripts: list[Path], only: list[str]) -> list[Path]:
    if not only:
        return scripts
    wanted = {w.strip().removesuffix(".py").removeprefix("bench_")
              for item in only for w in item.split(",") if w.strip()}
    unknown = wanted - {short(p) for p in scripts}
    if unknown:
        names = ", ".join(short(p) for p in scripts)
        raise SystemExit(f"error: no benchmark named {', '.join(sorted(unknown))} "
                         f"(there are: {names})")
    return [p for p in scripts if short(p) in wanted]


def run_one(path: Path, timeout: float, env: dict[str, str]) -> tuple[str, float]:
    """Run one script; ('ok' | 'failed (exit N)' | 'timed out', seconds)."""
    print(f"\n=== {path.name} (bound {timeout:g} s) ===", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(path)], cwd=HERE.parent, env=env,
                            start_new_session=True)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        return "timed out", time.monotonic() - t0
    except KeyboardInterrupt:
        _stop_group(proc)
        raise
    return ("ok" if code == 0 else f"failed (exit {code})"), time.monotonic() - t0


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the script's own process group (its pgid is its pid), then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass


def header() -> str:
    try:
        import msgpack
        import zmq
        versions = (f"pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, "
                    f"msgpack {'.'.join(map(str, msgpack.version))}")
    except ImportError:
        versions = "pyzmq/msgpack not importable"
    return (f"meshmq benchmarks, {_dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
            f"Python {platform.python_version()}, {versions}; {os.cpu_count()} CPUs; "
            f"{platform.platform(terse=True)}")


def summary(path: str, statuses: list[tuple[str, str, float]]) -> None:
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        pass
    print("\n=== summary ===")
    if rows:
        print(f"  {'bench':<9} {'case':<32} {'subject / baseline':<40} {'value':>9} "
              f"{'baseline':>9} {'ratio':>6}  {'aim':<7} verdict")
        for r in rows:
            unit = r["unit"]
            print(f"  {r['bench']:<9} {r['case']:<32} {r['subject'] + ' / ' + r['baseline']:<40} "
                  f"{_fmt(r['value'], unit):>9} {_fmt(r['baseline_value'], unit):>9} "
                  f"{r['ratio']:>6.2f}  {r['aim']:<7} {r['verdict']}")
        print("  (value/baseline: medians; msg/s higher is better, us lower is better)")
    for name, status, secs in statuses:
        print(f"  {name:<24} {status:<18} {secs:6.1f} s")


def _fmt(v: float | None, unit: str) -> str:
    if v is None or v != v:
        return "-"
    if unit == "msg/s":
        return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"
    return f"{v:.0f} {unit}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only this benchmark (e.g. pubsub or bench_pubsub); repeatable")
    ap.add_argument("--timeout", type=float, default=240.0,
                    help="time bound per script, in seconds (default 240)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: sets MESHMQ_BENCH_QUICK=1 (1 short round per figure)")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = ap.parse_args(argv)
    scripts = select(discover(), args.only)
    if args.list:
        for p in scripts:
            print(short(p))
        return 0
    env = {**os.environ, **ENV}
    if args.quick:
        env["MESHMQ_BENCH_QUICK"] = "1"
    print(header(), flush=True)
    print(f"command: {' '.join([Path(sys.executable).name, 'benchmarks/run.py', *sys.argv[1:]])}",
          flush=True)
    fd, json_path = tempfile.mkstemp(prefix="meshmq-bench-", suffix=".jsonl")
    os.close(fd)
    env["MESHMQ_BENCH_JSON"] = json_path
    statuses: list[tuple[str, str, float]] = []
    t0 = time.monotonic()
    try:
        for path in scripts:
            status, secs = run_one(path, max(1.0, args.timeout), env)
            statuses.append((path.name, status, secs))
        summary(json_path, statuses)
    finally:
        os.unlink(json_path)
    print(f"  total {time.monotonic() - t0:.0f} s", flush=True)
    return 0 if all(s == "ok" for _, s, _ in statuses) else 1


if __name__ == "__main__":
    raise SystemExit(main())
