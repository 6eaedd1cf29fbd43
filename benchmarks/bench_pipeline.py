"""Pipeline throughput: meshmq push -> worker (acknowledged) vs raw pyzmq with the same envelope.

A pusher process and a worker process on 127.0.0.1. Each round the pusher pushes 64 B tasks for at
most --seconds (and at most 200k raw, 5k meshmq) and the figure is tasks per second from the first
push to:

- meshmq: ``wait_for_tasks`` returning, i.e. every task acknowledged by the worker's handler;
- raw PUSH -> PULL (the issue's baseline): the worker decoding the last task. No acknowledgement
  at all, so this is the ceiling of fire-and-forget;
- raw ROUTER <-> DEALER with acks and the same credit window as the meshmq worker's concurrency
  (same semantics as meshmq: a task is done when its ack is back): what the protocol itself costs.

Tasks and acks use meshmq's control envelope ``[1, "task", {q, id, att, key, h, b}]`` /
``[1, "ack", {q, id, ok}]`` with the body msgpack-encoded once per task, as ``Node.push`` does.

    .venv/bin/python benchmarks/bench_pipeline.py [--repeats 3] [--seconds 0.5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any

import msgpack
from _common import (
    HWM,
    NOBLOCK,
    SNDMORE,
    Child,
    CpuMeter,
    Result,
    add_common_args,
    check_same_envelope,
    emit,
    pack_ctl,
    print_table,
    resolve,
    serve,
    setup_env,
    unpack,
)

N_MAX = 200_000          # raw rounds: at most this many tasks (and --seconds of pushing)
MESH_N_MAX = 5_000       # meshmq rounds: tasks queue up to max_backlog (10k) at once, and
                         # draining them all at a few k/s would make rounds of several seconds
QUIET = 0.3
FIRST_WAIT = 10.0
SIZE = 64
WINDOWS = (1, 16)          # worker concurrency (meshmq) = credit window (raw acked)


def _queue(window: int) -> str:
    return f"bench.c{window}"


# ---- meshmq ------------------------------------------------------------------------------------
def mesh_pusher(conn: Connection) -> None:
    from meshmq import Node
    node = Node("pusher", host="127.0.0.1").start()
    try:
        conn.send(("ready", node.address))

        def wait(queue: str) -> int:
            return node.wait_for_workers(queue, count=1, timeout=10.0)

        def go(queue: str, n_max: int, seconds: float) -> tuple[int, float, float]:
            body = os.urandom(SIZE)
            push = node.push
            clock = time.perf_counter
            t0 = clock()
            deadline = t0 + seconds
            n = 0
            while n < n_max:
                push(queue, body)
                n += 1
                if not n & 63 and clock() >= deadline:
                    break
            node.wait_for_tasks(queue, timeout=60.0)
            return n, t0, clock()

        serve(conn, {"wait": wait, "go": go})
    finally:
        node.stop()


def _work(msg: Any) -> None:
    """The worker's handler: nothing, so the figure is the pipeline's own cost."""


def mesh_worker(conn: Connection, address: str) -> None:
    from meshmq import Node
    node = Node("worker", peers=[address])
    for w in WINDOWS:
        node.worker(_queue(w), concurrency=w)(_work)
    node.start()
    try:
        conn.send(("ready",))
        serve(conn, {})
    finally:
        node.stop()


# ---- raw pyzmq ---------------------------------------------------------------------------------------
def _task(queue: str, tid: str, body: bytes) -> bytes:
    return pack_ctl("task", {"q": queue, "id": tid, "att": 1, "key": None, "h": {},
                             "b": msgpack.packb(body, use_bin_type=True)})


def raw_pusher(conn: Connection) -> None:
    import zmq
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    router = ctx.socket(zmq.ROUTER)
    for s in (push, router):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
    push.bind("tcp://127.0.0.1:*")
    router.bind("tcp://127.0.0.1:*")
    prefix = f"{uuid.uuid4().hex[:16]}-t"
    ids = [0]
    peer: list[bytes] = []
    try:
        conn.send(("ready", push.getsockopt(zmq.LAST_ENDPOINT).decode(),
                   router.getsockopt(zmq.LAST_ENDPOINT).decode()))

        def wait(_queue: str) -> int:
            if not router.poll(10_000):   # the worker's hello: we learn its identity
                raise TimeoutError("no worker said hello")
            ident, _ = router.recv_multipart()
            peer.append(ident)
            return 1

        def go_push(queue: str, n_max: int, seconds: float) -> tuple[int, float, float]:
            body = os.urandom(SIZE)
            send = push.send
            clock = time.perf_counter
            t0 = clock()
            deadline = t0 + seconds
            n, i = 0, ids[0]
            while n < n_max:
                i += 1
                send(_task(queue, f"{prefix}{i:x}", body))
                n += 1
                if not n & 63 and clock() >= deadline:
                    break
            ids[0] = i
            return n, t0, clock()

        def go_acked(window: int, n_max: int, seconds: float) -> tuple[int, float, float]:
            body = os.urandom(SIZE)
            queue = _queue(window)
            ident = peer[0]
            send, recv = router.send, router.recv
            clock = time.perf_counter
            t0 = clock()
            deadline = t0 + seconds
            n = acked = inflight = 0
            i = ids[0]
            stop = False
            while True:
                while inflight < window and not stop:
                    i += 1
                    send(ident, SNDMORE)
                    send(_task(queue, f"{prefix}{i:x}", body))
                    n += 1
                    inflight += 1
                    stop = n >= n_max or (not n & 63 and clock() >= deadline)
                if not inflight:
                    break
                if not router.poll(10_000):
                    raise TimeoutError("acks stopped coming")
                while True:   # take every ack that is there
                    try:
                        recv(NOBLOCK)
                    except zmq.Again:
                        break
                    fields = unpack(recv())[2]
                    if fields["ok"]:
                        acked += 1
                        inflight -= 1
            ids[0] = i
            return acked, t0, clock()

        serve(conn, {"wait": wait, "push": go_push, "acked": go_acked})
    finally:
        push.close()
        router.close()
        ctx.term()


def raw_worker(conn: Connection, push_ep: str, router_ep: str) -> None:
    import zmq
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    dealer = ctx.socket(zmq.DEALER)
    for s in (pull, dealer):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SNDHWM, HWM)
        s.setsockopt(zmq.RCVHWM, HWM)
    pull.connect(push_ep)
    dealer.connect(router_ep)
    dealer.send(pack_ctl("hello", {}))
    try:
        conn.send(("ready",))

        def run_pull(n_max: int) -> tuple[int, float]:
            recv = pull.recv
            clock = time.perf_counter
            pull.setsockopt(zmq.RCVTIMEO, int(FIRST_WAIT * 1000))
            conn.send(("armed",))
            n, last = 0, 0.0
            try:
                payload = recv()
            except zmq.Again:
                return 0, 0.0
            pull.setsockopt(zmq.RCVTIMEO, int(QUIET * 1000))
            while True:
                fields = unpack(payload)[2]
                unpack(fields["b"])
                n += 1
                last = clock()
                if n >= n_max:
                    break
                try:
                    payload = recv()
                except zmq.Again:
                    break
            return n, last

        def run_acked(n_max: int) -> tuple[int, float]:
            recv, send = dealer.recv, dealer.send
            dealer.setsockopt(zmq.RCVTIMEO, int(FIRST_WAIT * 1000))
            conn.send(("armed",))
            n = 0
            try:
                payload = recv()
            except zmq.Again:
                return 0, 0.0
            dealer.setsockopt(zmq.RCVTIMEO, int(QUIET * 1000))
            while True:
                fields = unpack(payload)[2]
                unpack(fields["b"])
                send(pack_ctl("ack", {"q": fields["q"], "id": fields["id"], "ok": True}))
                n += 1
                if n >= n_max:
                    break
                try:
                    payload = recv()
                except zmq.Again:
                    break
            return n, 0.0

        serve(conn, {"pull": run_pull, "acked": run_acked})
    finally:
        pull.close()
        dealer.close()
        ctx.term()


# ---- driver ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    args = ap.parse_args(argv)
    repeats, seconds = resolve(args)
    setup_env()
    check_same_envelope()
    raw_pull: list[float] = []
    mesh: dict[int, list[float]] = {w: [] for w in WINDOWS}
    acked: dict[int, list[float]] = {w: [] for w in WINDOWS}
    children: list[Child] = []
    try:
        mp = Child("meshmq-pusher", mesh_pusher)
        children.append(mp)
        _, address = mp.recv()
        mw = Child("meshmq-worker", mesh_worker, address)
        children.append(mw)
        mw.recv()
        for w in WINDOWS:
            mp.ask("wait", _queue(w))
        rp = Child("raw-pusher", raw_pusher)
        children.append(rp)
        _, push_ep, router_ep = rp.recv()
        rw = Child("raw-worker", raw_worker, push_ep, router_ep)
        children.append(rw)
        rw.recv()
        rp.ask("wait", "")
        mesh_cpu = {w: CpuMeter(mp, mw) for w in WINDOWS}
        acked_cpu = {w: CpuMeter(rp, rw) for w in WINDOWS}
        pull_cpu = CpuMeter(rp, rw)
        bound = seconds + 90
        for _ in range(repeats):
            before = pull_cpu.start()
            rw.ask("pull", N_MAX)
            sent, t0, _ = rp.ask("push", "bench.raw", N_MAX, seconds, timeout=bound)
            got, last = rw.recv(timeout=bound)
            pull_cpu.stop(before, got)
            raw_pull.append(got / (last - t0) if got and last > t0 else 0.0)
            for w in WINDOWS:
                before = mesh_cpu[w].start()
                n, t0, t1 = mp.ask("go", _queue(w), MESH_N_MAX, seconds, timeout=bound)
                mesh_cpu[w].stop(before, n)
                mesh[w].append(n / (t1 - t0))
                before = acked_cpu[w].start()
                rw.ask("acked", N_MAX)
                n, t0, t1 = rp.ask("acked", w, N_MAX, seconds, timeout=bound)
                rw.recv(timeout=bound)
                acked_cpu[w].stop(before, n)
                acked[w].append(n / (t1 - t0))
    finally:
        for child in reversed(children):
            child.close()
    results = [Result("pipeline", f"push->worker, concurrency={w}", "msg/s", True,
                      mesh[w], raw_pull, aim=0.5, baseline="raw PUSH/PULL (no acks)",
                      note=f"CPU us per task: meshmq {mesh_cpu[w].text('pusher', 'worker')}; "
                           f"raw PUSH/PULL {pull_cpu.text('pusher', 'worker')}")
               for w in WINDOWS]
    results += [Result("pipeline", f"push->worker, concurrency={w}", "msg/s", True,
                       mesh[w], acked[w], baseline=f"raw ROUTER/DEALER acked w={w}",
                       note=f"CPU us per task: raw acked {acked_cpu[w].text('pusher', 'worker')}")
                for w in WINDOWS]
    print_table(f"pipeline: push -> worker vs raw pyzmq, same envelope, separate processes, "
                f"{SIZE} B tasks, median of {repeats} x {seconds:g} s rounds", results)
    emit(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
