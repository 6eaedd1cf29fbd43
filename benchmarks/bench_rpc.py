"""RPC: round-trip latency and pipelined rate, meshmq vs raw pyzmq with the same envelope.

Client and server are separate processes on 127.0.0.1; the service echoes a 64 B argument.

- sequential: ``Node.call`` one at a time (p50/p99 of up to 2000 calls per round) vs raw REQ/REP
  carrying meshmq's call/reply envelopes ``[1, "call", {svc, id, a, ttl}]`` /
  ``[1, "reply", {id, ok, r}]`` with the arguments and result msgpack-encoded inside, as
  meshmq does;
- pipelined: ``AsyncNode.call`` from 100 coroutines at once vs raw DEALER -> ROUTER keeping 100
  requests in flight, same envelopes.

With ``--zerorpc PYTHON`` (or $MESHMQ_BENCH_ZERORPC), a Python that has zerorpc installed (never a
meshmq dependency: e.g. ``python3 -m venv /tmp/zvenv && /tmp/zvenv/bin/pip install zerorpc``),
zerorpc's figures are measured in the same run, for comparison.

    .venv/bin/python benchmarks/bench_rpc.py [--repeats 3] [--seconds 0.5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

import msgpack
from _common import (
    NOBLOCK,
    BenchError,
    Child,
    CpuMeter,
    Result,
    add_common_args,
    check_same_envelope,
    emit,
    median,
    pack_ctl,
    percentile,
    print_table,
    resolve,
    serve,
    setup_env,
    unpack,
)

SERVICE = "bench.echo"
SIZE = 64
SEQ_MAX = 2000          # calls per sequential round (and the round's time bound)
WARMUP = 50
INFLIGHT = 100
PIPE_MAX = 100_000      # calls per pipelined round (and the round's time bound)


def echo(x: Any) -> Any:
    return x


def _percentiles(lat_us: list[float]) -> tuple[float, float]:
    return percentile(lat_us, 50), percentile(lat_us, 99)


# ---- meshmq ------------------------------------------------------------------------------------
def mesh_server(conn: Connection, lane: bool = True) -> None:
    from meshmq import Node
    node = Node("rpcd", host="127.0.0.1", rpc_lane=lane)
    node.rpc(SERVICE)(echo)
    node.start()
    try:
        conn.send(("ready", node.address))
        serve(conn, {})
    finally:
        node.stop()


def mesh_client(conn: Connection, address: str, lane: bool = True) -> None:
    from meshmq import Node
    node = Node("client", peers=[address], rpc_lane=lane).start()
    try:
        body = os.urandom(SIZE)
        node.call(SERVICE, body, timeout=10.0)   # waits for the server to be known
        conn.send(("ready",))

        def seq(n_max: int, seconds: float) -> list[float]:
            call = node.call
            clock = time.perf_counter
            for _ in range(WARMUP):
                call(SERVICE, body)
            out: list[float] = []
            deadline = clock() + seconds
            while len(out) < n_max and clock() < deadline:
                t = clock()
                call(SERVICE, body)
                out.append((clock() - t) * 1e6)
            return out

        serve(conn, {"seq": seq})
    finally:
        node.stop()


def mesh_async_client(conn: Connection, address: str) -> None:
    from meshmq import AsyncNode
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    node = AsyncNode("aclient", peers=[address])
    body = os.urandom(SIZE)

    def run(coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    async def start() -> None:
        await node.start()
        await node.call(SERVICE, body, timeout=10.0)

    async def pipelined(inflight: int, n_max: int, seconds: float) -> tuple[int, float]:
        clock = time.perf_counter
        done = 0
        deadline = clock() + seconds

        async def lane() -> None:
            nonlocal done
            while done < n_max and clock() < deadline:
                await node.call(SERVICE, body, timeout=10.0)
                done += 1

        t0 = clock()
        await asyncio.gather(*(lane() for _ in range(inflight)))
        return done, clock() - t0

    try:
        run(start())
        conn.send(("ready",))
        serve(conn, {"pipe": lambda *a: run(pipelined(*a))})
    finally:
        run(node.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        loop.close()


# ---- raw pyzmq ----------------------------------------------------------------------------------------
def _reply_for(payload: bytes) -> bytes:
    fields = unpack(payload)[2]
    args, kwargs = unpack(fields["a"])
    result = echo(*args, **kwargs)
    return pack_ctl("reply", {"id": fields["id"], "ok": True,
                              "r": msgpack.packb(result, use_bin_type=True)})


def _request(cid: str, body: bytes) -> bytes:
    return pack_ctl("call", {"svc": SERVICE, "id": cid,
                             "a": msgpack.packb([[body], {}], use_bin_type=True), "ttl": 5.0})


def _result_of(reply: bytes) -> Any:
    fields = unpack(reply)[2]
    return unpack(fields["r"]) if fields["ok"] else None


def raw_server(conn: Connection) -> None:
    """A REP server and a ROUTER server, each on a thread of its own that owns its socket."""
    import zmq
    ctx = zmq.Context()
    endpoints: dict[str, str] = {}
    ready = threading.Barrier(3)
    stopping = threading.Event()

    def rep_loop() -> None:
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
        endpoints["rep"] = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        ready.wait()
        try:
            while not stopping.is_set():
                if sock.poll(100):
                    sock.send(_reply_for(sock.recv()))
        finally:
            sock.close()

    def router_loop() -> None:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind("tcp://127.0.0.1:*")
        endpoints["router"] = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        ready.wait()
        send, recv = sock.send, sock.recv
        try:
            while not stopping.is_set():
                if not sock.poll(100):
                    continue
                while True:
                    try:
                        ident = recv(NOBLOCK)
                    except zmq.Again:
                        break
                    payload = recv()
                    send(ident, 2)   # int(zmq.SNDMORE)
                    send(_reply_for(payload))
        finally:
            sock.close()

    threads = [threading.Thread(target=f, daemon=True) for f in (rep_loop, router_loop)]
    for t in threads:
        t.start()
    ready.wait(10.0)
    try:
        conn.send(("ready", endpoints["rep"], endpoints["router"]))
        serve(conn, {})
    finally:
        stopping.set()
        for t in threads:
            t.join(5.0)
        ctx.term()


def raw_client(conn: Connection, rep_ep: str, router_ep: str) -> None:
    import zmq
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    dealer = ctx.socket(zmq.DEALER)
    for s in (req, dealer):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 10_000)
    req.connect(rep_ep)
    dealer.connect(router_ep)
    prefix = f"{uuid.uuid4().hex[:16]}-c"
    ids = [0]
    body = os.urandom(SIZE)

    def next_id() -> str:
        ids[0] += 1
        return f"{prefix}{ids[0]:x}"

    def seq(n_max: int, seconds: float) -> list[float]:
        send, recv = req.send, req.recv
        clock = time.perf_counter
        for _ in range(WARMUP):
            send(_request(next_id(), body))
            _result_of(recv())
        out: list[float] = []
        deadline = clock() + seconds
        while len(out) < n_max and clock() < deadline:
            t = clock()
            send(_request(next_id(), body))
            _result_of(recv())
            out.append((clock() - t) * 1e6)
        return out

    def pipelined(inflight: int, n_max: int, seconds: float) -> tuple[int, float]:
        send, recv = dealer.send, dealer.recv
        clock = time.perf_counter
        t0 = clock()
        deadline = t0 + seconds
        sent = done = 0
        while True:
            while sent - done < inflight and sent < n_max and clock() < deadline:
                send(_request(next_id(), body))
                sent += 1
            if done == sent:
                break
            _result_of(recv())
            done += 1
        return done, clock() - t0

    try:
        for s in (req,):
            s.send(_request(next_id(), body))
            _result_of(s.recv())
        conn.send(("ready",))
        serve(conn, {"seq": seq, "pipe": pipelined})
    finally:
        req.close()
        dealer.close()
        ctx.term()


# ---- zerorpc (optional, in its own interpreter) ----------------------------------------------------
def zerorpc_server_main() -> int:
    import zerorpc

    class Echo:
        def echo(self, x: Any) -> Any:
            return x

    server = zerorpc.Server(Echo())
    server.bind("tcp://127.0.0.1:0")
    endpoint = server._events._socket.getsockopt_string(  # zerorpc does not expose it
        __import__("zmq").LAST_ENDPOINT)
    print(endpoint, flush=True)
    import gevent
    import gevent.select

    def watch_stdin() -> None:
        # gevent is not monkey-patched: a plain read would block the hub and the server with it
        gevent.select.select([sys.stdin], [], [], 600.0)   # readable at EOF: the parent is done
        server.stop()

    gevent.spawn(watch_stdin)
    server.run()
    return 0


def zerorpc_client_main(endpoint: str, repeats: int, seconds: float) -> int:
    import gevent.pool
    import zerorpc
    client = zerorpc.Client(timeout=10, heartbeat=None)
    client.connect(endpoint)
    body = os.urandom(SIZE)
    clock = time.perf_counter
    for _ in range(WARMUP):
        client.echo(body)
    out: dict[str, list[Any]] = {"seq": [], "pipe": []}
    for _ in range(repeats):
        lat: list[float] = []
        deadline = clock() + seconds
        while len(lat) < SEQ_MAX and clock() < deadline:
            t = clock()
            client.echo(body)
            lat.append((clock() - t) * 1e6)
        out["seq"].append(lat)
        pool = gevent.pool.Pool(INFLIGHT)
        t0 = clock()
        deadline = t0 + seconds
        n = 0
        while n < PIPE_MAX and clock() < deadline:
            pool.spawn(client.echo, body)
            n += 1
        pool.join(timeout=30)
        out["pipe"].append([n, clock() - t0])
    client.close()
    print(json.dumps(out), flush=True)
    return 0


def measure_zerorpc(python: str, repeats: int, seconds: float) -> dict[str, Any]:
    """Run zerorpc's server and client as two processes of ``python``; their figures."""
    here = os.path.abspath(__file__)
    server = subprocess.Popen([python, here, "--zerorpc-role", "server"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdin is not None
        endpoint = server.stdout.readline().strip()
        if not endpoint.startswith("tcp://"):
            raise BenchError(f"zerorpc server did not start (said {endpoint!r})")
        client = subprocess.run(
            [python, here, "--zerorpc-role", "client", endpoint, str(repeats), str(seconds)],
            capture_output=True, text=True, timeout=60 + 4 * repeats * seconds)
        if client.returncode != 0:
            raise BenchError(f"zerorpc client failed: {client.stderr.strip()[-500:]}")
        result: dict[str, Any] = json.loads(client.stdout.strip().splitlines()[-1])
        return result
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(5.0)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(2.0)


# ---- driver ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--zerorpc", default=os.environ.get("MESHMQ_BENCH_ZERORPC"),
                    metavar="PYTHON", help="a Python with zerorpc installed, to compare with")
    ap.add_argument("--zerorpc-role", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--no-lane", action="store_true",
                    help="meshmq without the RPC lane: sync calls on the control sockets, to "
                         "see what the lane buys (docs/PROTOCOL.md 13.5)")
    args = ap.parse_args(argv)
    if args.zerorpc_role:
        role, *rest = args.zerorpc_role
        if role == "server":
            return zerorpc_server_main()
        return zerorpc_client_main(rest[0], int(rest[1]), float(rest[2]))
    repeats, seconds = resolve(args)
    setup_env()
    check_same_envelope()
    lane = not args.no_lane
    subject = "meshmq" if lane else "meshmq, no lane"
    p50 = Result("rpc", "round trip p50, sequential", "us", False, aim=1.5, subject=subject,
                 baseline="raw REQ/REP")
    p99 = Result("rpc", "round trip p99, sequential", "us", False, subject=subject,
                 baseline="raw REQ/REP")
    pipe = Result("rpc", f"pipelined, {INFLIGHT} in flight", "msg/s", True,
                  subject="meshmq AsyncNode", baseline="raw DEALER/ROUTER")
    children: list[Child] = []
    try:
        ms = Child("meshmq-server", mesh_server, lane)
        children.append(ms)
        _, address = ms.recv()
        mc = Child("meshmq-client", mesh_client, address, lane)
        children.append(mc)
        ma = Child("meshmq-async-client", mesh_async_client, address)
        children.append(ma)
        rs = Child("raw-server", raw_server)
        children.append(rs)
        _, rep_ep, router_ep = rs.recv()
        rc = Child("raw-client", raw_client, rep_ep, router_ep)
        children.append(rc)
        for child in (mc, ma, rc):
            child.recv()
        seq_cpu = {"meshmq": CpuMeter(mc, ms), "raw": CpuMeter(rc, rs)}
        pipe_cpu = {"meshmq": CpuMeter(ma, ms), "raw": CpuMeter(rc, rs)}
        bound = seconds + 60
        for _ in range(repeats):
            for impl, client in (("meshmq", mc), ("raw", rc)):
                before = seq_cpu[impl].start()
                lat = client.ask("seq", SEQ_MAX, seconds, timeout=bound)
                seq_cpu[impl].stop(before, len(lat) + WARMUP)
                a, b = _percentiles(lat)
                getattr(p50, impl).append(a)
                getattr(p99, impl).append(b)
            for impl, client in (("meshmq", ma), ("raw", rc)):
                before = pipe_cpu[impl].start()
                n, elapsed = client.ask("pipe", INFLIGHT, PIPE_MAX, seconds, timeout=bound)
                pipe_cpu[impl].stop(before, n)
                getattr(pipe, impl).append(n / elapsed)
        p50.note = "CPU us per call: " + "; ".join(
            f"{k} {m.text('client', 'server')}" for k, m in seq_cpu.items())
        pipe.note = "CPU us per call: " + "; ".join(
            f"{k} {m.text('client', 'server')}" for k, m in pipe_cpu.items())
    finally:
        for child in reversed(children):
            child.close()
    results = [p50, p99, pipe]
    if args.zerorpc:
        try:
            z = measure_zerorpc(args.zerorpc, repeats, seconds)
        except (BenchError, OSError, subprocess.TimeoutExpired, ValueError) as exc:
            print(f"zerorpc not measured: {exc}", flush=True)
        else:
            zs = [_percentiles(lat) for lat in z["seq"]]
            results += [
                Result("rpc", "round trip p50, sequential", "us", False, [a for a, _ in zs],
                       p50.raw, subject="zerorpc", baseline="raw REQ/REP"),
                Result("rpc", "round trip p99, sequential", "us", False, [b for _, b in zs],
                       p99.raw, subject="zerorpc", baseline="raw REQ/REP"),
                Result("rpc", f"pipelined, {INFLIGHT} in flight", "msg/s", True,
                       [n / t for n, t in z["pipe"]], pipe.raw, subject="zerorpc (gevent)",
                       baseline="raw DEALER/ROUTER"),
                Result("rpc", "round trip p50: meshmq vs zerorpc", "us", False, p50.meshmq,
                       [a for a, _ in zs], baseline="zerorpc"),
            ]
    print_table(f"RPC: echo of {SIZE} B, meshmq vs raw pyzmq with the same envelopes, separate "
                f"processes, median of {repeats} rounds (<= {SEQ_MAX} calls or {seconds:g} s)",
                results)
    if p50.raw:
        print(f"  raw REQ/REP p50 {median(p50.raw):.0f} us is the floor a sequential call can "
              "reach here. " + ("meshmq's sync calls go on the RPC lane (no thread hand-off "
                                "on either side; PROTOCOL.md 13.5): what it adds is Python "
                                "per call." if lane else "Without the lane, meshmq adds two "
                                "thread hand-offs on each side.") + "\n", flush=True)
    emit(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
