"""Pipelines in one process (several nodes, real sockets): dispatch, failures, keys, limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from meshmq import Backpressure, MeshTimeout, Message, Node
from meshmq.testing import Collector, Overlap, wait_until


def test_fair_dispatch_favours_the_fast_worker(make_node: Callable[..., Node]) -> None:
    pusher = make_node("vent")
    slow, fast = make_node("slow", peers=[pusher.address]), make_node("fast", peers=[pusher.address])
    counts = {"slow": 0, "fast": 0}

    @slow.worker("jobs")
    def slow_work(msg: Message) -> None:
        time.sleep(0.05)
        counts["slow"] += 1

    @fast.worker("jobs")
    def fast_work(msg: Message) -> None:
        time.sleep(0.001)
        counts["fast"] += 1

    pusher.wait_for_workers("jobs", count=2)
    started = time.monotonic()
    for i in range(200):
        pusher.push("jobs", i)
    pusher.wait_for_tasks("jobs", timeout=20)
    elapsed = time.monotonic() - started
    assert counts["slow"] + counts["fast"] == 200
    # round-robin would give the slow worker 100 tasks: 5 s. Fair dispatch is near fast-alone.
    assert counts["fast"] >= 170, counts
    assert elapsed < 2.0, (elapsed, counts)


def test_return_value_is_emitted_to_the_next_stage(make_node: Callable[..., Node]) -> None:
    vent = make_node("vent")
    worker = make_node("w", peers=[vent.address])
    sink = make_node("sink", peers=[vent.address, worker.address])
    got = Collector()

    @worker.worker("resize", emit="thumbs")
    def resize(msg: Message) -> dict[str, int]:
        return {"n": msg.body * 2}

    sink.worker("thumbs")(got)
    vent.wait_for_workers("resize")
    worker.wait_for_workers("thumbs")
    ids = [vent.push("resize", i) for i in range(5)]
    msgs = got.wait(5)
    assert sorted(m.body["n"] for m in msgs) == [0, 2, 4, 6, 8]
    assert {m.id for m in msgs} == {f"{i}>thumbs" for i in ids}  # derived: a redo has the same id


def test_failing_task_is_dead_lettered_and_does_not_block(make_node: Callable[..., Node]) -> None:
    vent = make_node("vent")
    worker = make_node("w", peers=[vent.address])
    dead, ok = Collector(), Collector()
    attempts: list[int] = []

    @worker.worker("audit", max_attempts=3)
    def audit(msg: Message) -> None:
        if msg.body == "poison":
            attempts.append(msg.attempt)
            raise RuntimeError("cannot audit poison")
        ok(msg)

    vent.subscribe("deadletter.>")(dead)
    vent.wait_for_workers("audit")
    vent.push("audit", "poison")
    vent.push("audit", "fine")
    [letter] = dead.wait(1)
    assert letter.topic == "deadletter.audit"
    assert letter.body["body"] == "poison" and letter.body["attempts"] == 3
    assert [e["type"] for e in letter.body["errors"]] == ["RuntimeError"] * 3
    assert "cannot audit poison" in letter.body["errors"][0]["traceback"]
    assert attempts == [1, 2, 3]
    assert ok.wait(1)[0].body == "fine"
    vent.wait_for_tasks(timeout=5)
    stats = vent.stats()
    assert stats["deadlettered"] == 1 and stats["tasks_failed"] == 3


def test_key_affinity_in_order_and_moves_when_a_worker_leaves(
        make_node: Callable[..., Node]) -> None:
    vent = make_node("vent")
    workers = [make_node(f"w{i}", peers=[vent.address]) for i in range(3)]
    seen: dict[str, list[tuple[str, int]]] = {}
    lock = threading.Lock()

    for w in workers:
        @w.worker("orders", concurrency=4)
        def handle(msg: Message, name: str = w.name) -> None:
            with lock:
                seen.setdefault(msg.key, []).append((name, msg.body))

    vent.wait_for_workers("orders", count=3)
    keys = [f"customer-{k}" for k in range(8)]
    for i in range(20):
        for k in keys:
            vent.push("orders", i, key=k)
    vent.wait_for_tasks(timeout=10)
    owner = {}
    for k in keys:
        names = {n for n, _ in seen[k]}
        assert len(names) == 1, (k, names)           # one worker per key
        assert [b for _, b in seen[k]] == list(range(20))   # in order
        owner[k] = names.pop()
    leaving = owner[keys[0]]
    next(w for w in workers if w.name == leaving).stop()
    wait_until(lambda: vent._pipelines.workers_for("orders") == 2, what="leave")
    seen.clear()
    for k in keys:
        vent.push("orders", 99, key=k)
    vent.wait_for_tasks(timeout=10)
    assert all(seen[k][0][0] != leaving for k in keys)
    assert all(seen[k][0][0] == owner[k] for k in keys if owner[k] != leaving)  # others stay


def test_backpressure_bounds_the_backlog(make_node: Callable[..., Node]) -> None:
    vent = make_node("vent", max_backlog=5)
    for i in range(5):
        vent.push("nobody.works.here", i)
    with pytest.raises(Backpressure):
        vent.push("nobody.works.here", 5, block=False)
    t0 = time.monotonic()
    with pytest.raises(MeshTimeout):
        vent.push("nobody.works.here", 5, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 2
    assert vent.stats()["tasks_backlog"] == 5
    # a worker appears: the backlog drains and push accepts again
    got = Collector()
    worker = make_node("late", peers=[vent.address])
    worker.worker("nobody.works.here")(got)
    assert [m.body for m in got.wait(5)] == [0, 1, 2, 3, 4]
    vent.wait_for_tasks("nobody.works.here", timeout=5)  # their acks are back
    vent.push("nobody.works.here", 5, block=False)


def test_local_worker_and_async_worker(make_node: Callable[..., Node]) -> None:
    node = make_node("solo")
    done = threading.Event()
    bodies: list[int] = []

    @node.worker("self.q", concurrency=2)
    async def work(msg: Message) -> None:
        bodies.append(msg.body)
        if len(bodies) == 3:
            done.set()

    for i in range(3):
        node.push("self.q", i)
    assert done.wait(5)
    node.wait_for_tasks(timeout=5)
    assert sorted(bodies) == [0, 1, 2]


@pytest.mark.parametrize("local", [False, True], ids=["remote", "local"])
def test_blocking_handlers_run_concurrency_at_once_and_never_more(
        make_node: Callable[..., Node], local: bool) -> None:
    # A sync worker's threads are started one at a time, as tasks wait (see
    # Pipelines._drainer): handlers that block must still reach `concurrency` at once (the
    # barrier breaks otherwise), and never exceed it.
    vent = make_node("vent")
    worker = vent if local else make_node("w", peers=[vent.address])
    barrier = threading.Barrier(6, timeout=5)
    overlap = Overlap()

    @worker.worker("wave", concurrency=6, max_attempts=1)
    def work(msg: Message) -> None:
        with overlap:
            barrier.wait()

    vent.wait_for_workers("wave")
    for i in range(30):   # five waves of six
        vent.push("wave", i)
    vent.wait_for_tasks("wave", timeout=20)
    assert overlap.most == 6
    assert vent.stats()["deadlettered"] == 0 and not barrier.broken
    assert worker.stats()["tasks_worked"] == 30


def test_a_failure_that_cannot_be_printed_is_reported_and_the_worker_goes_on(
        make_node: Callable[..., Node]) -> None:
    # An exception whose str() raises is described as unprintable (describe_error never
    # raises): the task fails, is retried and dead-lettered like any other, and the worker's
    # only thread goes on with the next tasks.
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text")

    vent = make_node("vent")
    worker = make_node("w", peers=[vent.address])
    got: list[int] = []
    dead = Collector()
    vent.subscribe("deadletter.odd")(dead)

    @worker.worker("odd", concurrency=1, max_attempts=2)
    def work(msg: Message) -> None:
        if msg.body == 0:
            raise Unprintable
        got.append(msg.body)

    vent.wait_for_workers("odd")
    for i in range(10):
        vent.push("odd", i)
    wait_until(lambda: vent.stats()["tasks_completed"] == 10, 10.0, what="10 finished")
    assert sorted(got) == list(range(1, 10))
    assert vent.stats()["deadlettered"] == 1 and vent.stats()["tasks_inflight"] == 0
    (letter,) = dead.wait(1, timeout=5)
    errors = letter.body["errors"]
    assert [e["type"].rsplit(".", 1)[-1] for e in errors] == ["Unprintable", "Unprintable"]
    assert "unprintable" in errors[0]["message"]


def test_bad_push_arguments_fail_at_the_caller_and_the_node_keeps_working(
        make_node: Callable[..., Node]) -> None:
    from meshmq import ConfigError, EncodeError
    node = make_node("solo")
    got = Collector()
    node.worker("jobs")(got)
    with pytest.raises(ConfigError, match="hashable"):
        node.push("jobs", 1, key=[1, 2])
    with pytest.raises(EncodeError):
        node.push("jobs", 1, key=object())
    with pytest.raises(EncodeError):
        node.push("jobs", 1, headers={"h": object()})
    with pytest.raises(EncodeError):
        node.push("jobs", 1, headers=["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(EncodeError, match="keys must be str or bytes"):
        node.push("jobs", {"sizes": {640: "vga"}})      # every worker would drop it
    with pytest.raises(ConfigError, match="longer"):
        node.push("q" * 250, 1)
    with pytest.raises(ConfigError, match="longer"):
        node.worker("q" * 250)(got)
    node.push("jobs", {"ok": True}, key=("tuple", 1), headers={"h": 1})
    assert got.wait(1)[0].body == {"ok": True}
    assert node.running


def test_credit_is_concurrency_plus_prefetch(make_node: Callable[..., Node]) -> None:
    from meshmq import ConfigError
    vent = make_node("vent")
    worker = make_node("w", peers=[vent.address])
    worker.worker("a", concurrency=2)(lambda msg: None)
    worker.worker("b", concurrency=3, prefetch=0)(lambda msg: None)
    with pytest.raises(ConfigError):
        worker.worker("c", prefetch=-1)(lambda msg: None)
    vent.wait_for_workers("b")
    (peer,) = vent.peers()
    assert peer.queues["a"][0] == 6 and peer.queues["b"][0] == 3


@pytest.mark.timeout(60)
def test_prefetch_adapts_to_the_handlers_time_unless_given(
        make_node: Callable[..., Node]) -> None:
    vent = make_node("vent")
    worker = make_node("w", peers=[vent.address])
    def slow(msg: Message) -> None:
        time.sleep(0.03)   # the handler's own work: what the worker measures

    worker.worker("quick")(lambda msg: None)                 # adapts: deep window
    worker.worker("slow")(slow)                              # adapts: no prefetch
    worker.worker("fixed", prefetch=2)(lambda msg: None)     # given: kept
    vent.wait_for_workers("fixed")
    (peer,) = vent.peers()
    assert [peer.queues[q][0] for q in ("quick", "slow", "fixed")] == [5, 5, 3]  # 4 at first

    def credits() -> list[int]:
        (p,) = vent.peers()
        return [p.queues[q][0] for q in ("quick", "slow", "fixed")]

    for i in range(3000):   # bounded; the adaptation shows within a few retunes (0.25 s each)
        vent.push("quick", i)
        if i < 40:
            vent.push("slow", i)
        vent.push("fixed", i)
        if i % 500 == 499 and credits()[0] > 100 and credits()[1] == 1:
            break
    vent.wait_until(lambda: (c := credits())[0] > 100 and c[1] == 1, 20, "adapted credits")
    assert credits()[2] == 3
    assert worker.stats()["worker_credit"]["fixed"] == 3
    vent.wait_for_tasks(timeout=20)


def test_each_task_is_acked_only_after_its_handler_returned(
        make_node: Callable[..., Node]) -> None:
    # Acks travel batched (PROTOCOL 12.8); a task whose handler is still running must stay
    # outstanding at the pusher however many of its neighbours are acknowledged.
    vent = make_node("vent")
    worker = make_node("w", peers=[vent.address])
    release = threading.Event()
    ran: list[str] = []
    lock = threading.Lock()

    @worker.worker("held", concurrency=8)
    def work(msg: Message) -> None:
        if msg.body % 20 == 0:
            assert release.wait(10)
        with lock:
            ran.append(msg.id)

    vent.wait_for_workers("held")
    ids = [vent.push("held", i) for i in range(60)]
    wait_until(lambda: vent.stats()["tasks_completed"] == 57, 10.0, what="57 acks")
    assert vent.stats()["tasks_inflight"] == 3
    with pytest.raises(MeshTimeout):
        vent.wait_for_tasks("held", timeout=0.2)
    release.set()
    vent.wait_for_tasks("held", timeout=10)
    assert sorted(ran) == sorted(ids)            # each ran once: nothing lost or redone
    stats = vent.stats()
    assert stats["tasks_completed"] == 60 and stats["late_acks"] == 0
    assert worker.stats()["tasks_worked"] == 60


def test_blocked_pushers_resume_when_acks_come_in_batches(
        make_node: Callable[..., Node]) -> None:
    # One ack message may return many tasks at once, so the backlog can drop past the level
    # at which blocked pushers are let in again (7 of 8 here) without ever equalling it; the
    # first task is held so that the backlog never drains to 0 either.
    vent = make_node("vent", max_backlog=8)
    worker = make_node("w", peers=[vent.address])
    release = threading.Event()
    got: list[int] = []

    @worker.worker("burst", concurrency=16)
    def work(msg: Message) -> None:
        if msg.body == 0:
            assert release.wait(10)
        got.append(msg.body)

    vent.wait_for_workers("burst")
    for i in range(400):
        vent.push("burst", i, timeout=3.0)
    release.set()
    vent.wait_for_tasks("burst", timeout=10)
    assert sorted(got) == list(range(400))


def test_batches_of_big_tasks_stay_under_max_message_bytes(
        make_node: Callable[..., Node]) -> None:
    # 20 tasks of 12 KiB fit one worker's credit but not one 64 KiB message: the pusher splits
    # them (a frame over the receiver's MAXMSGSIZE would make libzmq drop the connection).
    cap = 64 * 1024
    vent = make_node("vent", max_message_bytes=cap)
    worker = make_node("w", peers=[vent.address], max_message_bytes=cap)
    got: list[int] = []
    lock = threading.Lock()

    @worker.worker("big", concurrency=16)
    def work(msg: Message) -> None:
        with lock:
            got.append(len(msg.body))

    vent.wait_for_workers("big")
    vent.push("big", b"x")                  # a first ack tells the pusher it may batch
    vent.wait_for_tasks("big", timeout=5)
    for i in range(100):
        vent.push("big", bytes(12 * 1024 + i))
    vent.push("big", bytes(cap - 64))       # too big for any batch: travels alone
    vent.wait_for_tasks("big", timeout=10)
    assert sorted(got) == sorted([1, cap - 64] + [12 * 1024 + i for i in range(100)])
    assert vent.stats()["late_acks"] == 0 and worker.stats()["malformed"] == 0
