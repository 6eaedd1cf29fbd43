"""Gap repair, replay failover between two journals, the bounded hand-off buffer, AsyncNode."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from meshmq.durability import Journal

from meshmq import AsyncNode, ConfigError, Message, Node, Timing
from meshmq.testing import Collector, Script, wait_until

QUICK = Timing(heartbeat_interval=0.1, peer_timeout=0.8, hello_interval=0.1, tick=0.05,
               stop_timeout=2.0, linger=0.1)


@pytest.fixture
def make_journal(tmp_path: Path) -> Iterator[Callable[..., Journal]]:
    made: list[Journal] = []

    def factory(name: str = "journal", topics: tuple[str, ...] = ("orders.>",),
                **kw: Any) -> Journal:
        kw.setdefault("timing", QUICK)
        kw.setdefault("peers", [])
        journal = Journal(tmp_path / name, list(topics), name=name, fsync="never", **kw)
        made.append(journal)
        return journal.start()

    yield factory
    for journal in reversed(made):
        journal.stop()


class Gate:
    """A handler that blocks on its first message until released, then collects."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.blocked = threading.Event()
        self.got = Collector()

    def __call__(self, msg: Message) -> None:
        if not self.release.is_set():
            self.blocked.set()
            self.release.wait(30)
        self.got(msg)


@pytest.mark.timeout(60)
def test_a_stalled_subscriber_recovers_every_dropped_message(
        make_journal: Callable[..., Journal], make_node: Callable[..., Node]) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    gate = Gate()
    # A small high-water mark and handler queue: the stalled subscriber drops most of them.
    sub = make_node("sub", peers=[pub.address, journal.address], start=False, hwm=50,
                    max_pending=50)
    sub.subscribe("orders.>", repair=True)(gate)
    sub.start()
    pub.wait_for_subscribers("orders.a", count=2, timeout=5)
    total = 3000
    pub.publish("orders.a", 0)
    assert gate.blocked.wait(5)
    for i in range(1, total):
        pub.publish("orders.a", i)
        if i % 500 == 0:  # keep the journal's queue short; the subscriber stays stalled
            wait_until(lambda i=i: journal.stats()["stored"] >= i, timeout=10)  # type: ignore[misc]
    wait_until(lambda: journal.stats()["stored"] == total, timeout=10)
    stats = sub.stats()
    assert stats["dropped"] + stats["gaps"] > 1000, stats   # the stall really lost messages
    gate.release.set()
    # A drop is noticed when the next message from that sender and topic arrives.
    wait_until(lambda: sub.stats()["pending"] == 0, timeout=10)
    pub.publish("orders.a", total)
    assert gate.got.wait(total + 1, timeout=20)
    assert gate.got.bodies == list(range(total + 1))
    stats = sub.stats()
    assert stats["repaired"] >= 1000 and stats["gaps_unrepaired"] == 0, stats


@pytest.mark.timeout(30)
def test_repair_without_a_journal_counts_what_is_lost_and_goes_on(
        make_node: Callable[..., Node]) -> None:
    pub = make_node("pub")
    gate = Gate()
    sub = make_node("sub", peers=[pub.address], start=False, max_pending=10)
    sub.subscribe("orders.>", repair=True)(gate)
    sub.start()
    pub.wait_for_subscribers("orders.a", timeout=5)
    pub.publish("orders.a", 0)
    assert gate.blocked.wait(5)
    for i in range(1, 200):
        pub.publish("orders.a", i)
    wait_until(lambda: sub.stats()["dropped"] > 0, timeout=5)
    gate.release.set()
    wait_until(lambda: sub.stats()["pending"] == 0, timeout=10)
    pub.publish("orders.a", 200)
    wait_until(lambda: gate.got.bodies[-1:] == [200], timeout=10)
    bodies = gate.got.bodies
    assert bodies == sorted(bodies) and len(bodies) < 201
    assert sub.stats()["gaps_unrepaired"] == 201 - len(bodies)


def test_unknown_subscribe_options_are_refused(make_node: Callable[..., Node]) -> None:
    node = make_node("n", start=False)
    with pytest.raises(ConfigError, match="repiar"):
        node.subscribe("orders.>", repiar=True)


@pytest.mark.timeout(60)
def test_the_hand_off_buffer_is_bounded_and_loses_nothing(
        make_journal: Callable[..., Journal], make_node: Callable[..., Node]) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.wait_for_subscribers("orders.a", timeout=5)
    for i in range(500):
        pub.publish("orders.a", i)
    wait_until(lambda: journal.stats()["stored"] == 500, timeout=10)
    gate = Gate()
    sub = make_node("sub", peers=[pub.address, journal.address], start=False, max_pending=100)
    sub.subscribe("orders.>", replay="earliest")(gate)
    sub.start()
    assert gate.blocked.wait(10)            # replay is stalled in the handler
    pub.wait_for_subscribers("orders.a", count=2, timeout=5)
    for i in range(500, 1500):              # live messages pile up in the hand-off buffer
        pub.publish("orders.a", i)
        if i % 50 == 0:  # at the pace the handler queue takes them: only the buffer drops
            wait_until(lambda i=i: (s := sub.stats())["received"] == i - 499  # type: ignore[misc]
                       and s["pending"] == 0, timeout=5)
    wait_until(lambda: sub.stats()["replay_buffer_dropped"] >= 800, timeout=10)
    wait_until(lambda: journal.stats()["stored"] == 1500, timeout=10)
    gate.release.set()
    gate.got.wait(1500, timeout=20)
    assert gate.got.bodies == list(range(1500))


@pytest.mark.timeout(60)
def test_replay_then_live_fails_over_to_the_other_journal(
        make_journal: Callable[..., Journal], make_node: Callable[..., Node]) -> None:
    first, second = make_journal("j1"), make_journal("j2")
    pub = make_node("pub", peers=[first.address, second.address])
    pub.wait_for_subscribers("orders.a", count=2, timeout=5)
    for i in range(3000):
        pub.publish("orders.a", i)
    wait_until(lambda: first.stats()["stored"] == second.stats()["stored"] == 3000, timeout=10)
    seen = Collector()
    halfway = threading.Event()
    resume = threading.Event()

    def handler(msg: Message) -> None:
        if msg.body == 1000:
            halfway.set()
            resume.wait(10)
        seen(msg)

    sub = make_node("sub", peers=[pub.address, first.address, second.address])
    # Both journals known before the replay starts, so that it reads from the first by id.
    wait_until(lambda: len(sub._journal_client().journals("orders.>")) == 2, timeout=10)
    sub.subscribe("orders.>", replay="earliest")(handler)
    assert halfway.wait(10)
    # Stop the journal the replay reads from (the first by id), mid-replay.
    reading = min((first, second), key=lambda j: j.node.id)
    reading.stop()
    resume.set()
    pub.publish("orders.a", 3000)            # and one live message after the hand-off
    seen.wait(3001, timeout=20)
    assert seen.bodies == list(range(3001))
    assert sub.stats()["replay_failovers"] == 1


CLI = [sys.executable, "-m", "meshmq.cli"]


def journal_process(directory: Path, name: str) -> tuple[Script, str]:
    script = Script([*CLI, "journal", "--dir", str(directory), "--topics", "orders.>",
                     "--discovery", "static", "--name", name, "--fsync", "never"])
    address = script.expect("listening on", timeout=15).rsplit(" ", 1)[1]
    return script, address


@pytest.mark.timeout(90)
def test_pull_replay_fails_over_when_its_journal_is_killed(
        tmp_path: Path, make_node: Callable[..., Node]) -> None:
    scripts: list[Script] = []
    try:
        addresses = {}
        for name in ("ja", "jb"):
            script, addresses[name] = journal_process(tmp_path / name, name)
            scripts.append(script)
        pub = make_node("pub", peers=list(addresses.values()))
        pub.wait_for_subscribers("orders.a", count=2, timeout=10)
        total = 5000
        for i in range(total):
            pub.publish("orders.a", i, confirm=i % 1000 == 999)
        for script in scripts:  # both have every message (the progress line says so)
            script.expect(lambda line: f"records {total:,} " in line, timeout=15)
        sub = make_node("sub", peers=list(addresses.values()))
        wait_until(lambda: len(sub._journal_client().journals("orders.>")) == 2, timeout=10)
        reading = sub._journal_client().journals("orders.>")[0]   # the first, by id
        victim = scripts[0] if reading.name == "ja" else scripts[1]
        got: list[int] = []
        for msg in sub.replay("orders.>", batch=100):
            got.append(msg.body)
            if len(got) == 1500:
                victim.stop(signal.SIGKILL)
        assert got == list(range(total))
        assert sub.stats()["replay_failovers"] == 1
    finally:
        for script in scripts:
            script.stop()


@pytest.mark.timeout(60)
def test_async_node_confirms_replays_and_replays_into_async_handlers(
        make_journal: Callable[..., Journal]) -> None:
    journal = make_journal()

    async def main() -> None:
        async with AsyncNode("pub", peers=[journal.address], timing=QUICK) as pub:
            ids = [await pub.publish("orders.a", i, confirm=True) for i in range(20)]
            assert journal.stats()["acks"] == 20
            bodies = [m.body async for m in pub.replay("orders.>", batch=7)]
            assert bodies == list(range(20))
            got: list[int] = []
            done = asyncio.Event()

            async with AsyncNode("sub", peers=[pub.address, journal.address],
                                 timing=QUICK) as sub:
                @sub.subscribe("orders.>", replay="earliest")
                async def on_order(msg: Message) -> None:
                    got.append(msg.body)
                    if len(got) == 21:
                        done.set()

                await pub.wait_for_subscribers("orders.a", count=2, timeout=5)
                await pub.publish("orders.a", 20)
                await asyncio.wait_for(done.wait(), 10)
            assert got == list(range(21))
            assert len(set(ids)) == 20

    asyncio.run(main())


def test_a_confirm_append_that_overtakes_pub_sub_waits_for_its_predecessors(
        make_journal: Callable[..., Journal]) -> None:
    import concurrent.futures

    from meshmq.durability._entry import decode_entry, encode_entry

    journal = make_journal()

    def item(seq: int, confirm: bool) -> tuple[Any, ...]:
        msg = Message("orders.a", seq, {}, f"p-{seq}", "pub", "p", seq, 1.0)
        fut: concurrent.futures.Future[int] | None = \
            concurrent.futures.Future() if confirm else None
        return (msg.id, "p", seq, "orders.a", encode_entry(msg), fut)

    last = item(5, confirm=True)          # the confirm call arrives first ...
    journal._queue.put(last)
    for seq in range(1, 5):               # ... then the pub/sub copies of 1..4
        journal._queue.put(item(seq, confirm=False))
    assert last[5].result(timeout=5) == 4  # stored after them, at offset 4
    with journal._lock:
        stored = [decode_entry(r.payload).seq for r in journal.log.read()]
    assert stored == [1, 2, 3, 4, 5]
