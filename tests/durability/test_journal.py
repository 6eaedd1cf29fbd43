"""The journal node in this process: storing, dedup, confirm, replay, replay-then-live."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import meshmq.durability._fileio as fileio
import pytest
from meshmq.durability import Journal, Log
from meshmq.durability._entry import decode_entry

from meshmq import MeshTimeout, Message, Node, Timing
from meshmq.testing import Collector, wait_until

QUICK = Timing(heartbeat_interval=0.1, peer_timeout=0.8, hello_interval=0.1, tick=0.05,
               stop_timeout=2.0, linger=0.1)


@pytest.fixture
def make_journal(tmp_path: Path) -> Iterator[Callable[..., Journal]]:
    made: list[Journal] = []

    def factory(directory: Path | None = None, topics: tuple[str, ...] = ("orders.>",),
                **kw: Any) -> Journal:
        kw.setdefault("timing", QUICK)
        kw.setdefault("peers", [])
        journal = Journal(directory or tmp_path / "journal", list(topics), **kw)
        made.append(journal)
        return journal.start()

    yield factory
    for journal in reversed(made):
        journal.stop()


def stored(directory: Path) -> list[Message]:
    with Log.open(directory, fsync="never") as log:
        return [decode_entry(r.payload) for r in log.read()]


def test_confirmed_publish_is_on_disk_once(make_journal: Callable[..., Journal],
                                           make_node: Callable[..., Node],
                                           tmp_path: Path) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    ids = [pub.publish("orders.new", {"i": i}, confirm=True) for i in range(50)]
    # Each went twice (pub/sub, unless sent before the journal's subscription was in place,
    # and the append call) and was stored once.
    assert journal.log.durable_offset >= 50
    wait_until(lambda: journal.stats()["duplicates"] >= 49, timeout=5)
    s = journal.stats()
    assert s["stored"] == 50 and s["acks"] == 50
    assert pub.stats()["confirmed"] == 50
    journal.stop()
    msgs = stored(tmp_path / "journal")
    assert [m.id for m in msgs] == ids
    assert [m.body for m in msgs] == [{"i": i} for i in range(50)]
    assert [m.seq for m in msgs] == list(range(1, 51)) and {m.source for m in msgs} == {"pub"}


def test_unconfirmed_messages_are_stored_and_others_ignored(
        make_journal: Callable[..., Journal], make_node: Callable[..., Node]) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.wait_for_subscribers("orders.x", timeout=5)
    for i in range(300):
        pub.publish("orders.x", i)
        pub.publish("billing.x", i)  # not a journal topic
    wait_until(lambda: journal.stats()["stored"] == 300, timeout=10)
    assert [m.body for m in pub.replay("orders.>")] == list(range(300))


def test_confirm_times_out_without_a_journal(make_node: Callable[..., Node]) -> None:
    pub = make_node("pub")
    with pytest.raises(MeshTimeout, match="journal"):
        pub.publish("orders.x", 1, confirm=True, timeout=0.3)
    assert pub.stats()["sent"] == 1  # the publish itself happened


def test_confirm_needs_a_journal_covering_the_topic(make_journal: Callable[..., Journal],
                                                   make_node: Callable[..., Node]) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.publish("orders.x", 1, confirm=True)
    with pytest.raises(MeshTimeout):
        pub.publish("billing.x", 1, confirm=True, timeout=0.3)


def test_dedup_state_survives_a_restart(make_journal: Callable[..., Journal],
                                        make_node: Callable[..., Node], tmp_path: Path) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.publish("orders.x", "first", confirm=True)
    journal.stop()
    entry = stored(tmp_path / "journal")[0]
    again = make_journal()
    assert again.stats()["records"] == 1
    # A retry of an already stored message (same id) after the restart is not stored again.
    from meshmq.durability._entry import encode_entry
    from meshmq.durability._journal import service_name
    pub.connect(again.address)
    wait_until(lambda: pub._journal_client().journals("orders.x"), timeout=5)
    offset = pub.call(service_name(again.node.id, "append"), encode_entry(entry))
    assert offset == 0 and again.stats()["duplicates"] == 1 and again.stats()["records"] == 1


def test_disk_full_refuses_the_ack_and_keeps_serving(make_journal: Callable[..., Journal],
                                                     make_node: Callable[..., Node],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.publish("orders.x", 0, confirm=True)
    import errno
    import os

    real_write = os.write

    class Full:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def write(self, fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio, "os", Full())
    with pytest.raises(MeshTimeout):
        pub.publish("orders.x", 1, confirm=True, timeout=0.5)
    assert journal.stats()["append_errors"] >= 1 and not journal.log.failed
    assert [m.body for m in pub.replay("orders.>")] == [0]  # still readable
    monkeypatch.setattr(fileio, "os", os)
    assert real_write is os.write
    pub.publish("orders.x", 2, confirm=True)
    # The refused message was never stored: its resends all hit the full disk.
    assert [m.body for m in pub.replay("orders.>")] == [0, 2]


def test_replay_since_until_and_flow_control(make_journal: Callable[..., Journal],
                                             make_node: Callable[..., Node]) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    for i in range(120):
        pub.publish("orders.a" if i % 2 else "orders.b", i, confirm=True)
    assert [m.body for m in pub.replay("orders.a", batch=7)] == list(range(1, 120, 2))
    assert [m.body for m in pub.replay("orders.>", since=100)] == list(range(100, 120))
    assert [m.body for m in pub.replay("orders.>", since=10, until=15)] == list(range(10, 15))
    assert list(pub.replay("orders.>", since="latest")) == []
    # The iterator is lazy: one batch at a time, however slowly it is consumed.
    it = pub.replay("orders.>", batch=10)
    assert next(it).body == 0
    reads_before = journal.node.stats()["calls_served"]
    for _ in range(9):
        next(it)
    assert journal.node.stats()["calls_served"] == reads_before  # still in the first batch
    assert next(it).body == 10
    assert journal.node.stats()["calls_served"] == reads_before + 1


def test_replay_since_datetime(make_journal: Callable[..., Journal],
                               make_node: Callable[..., Node]) -> None:
    import datetime as dt

    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    for i in range(5):
        pub.publish("orders.a", i, confirm=True)
    mark = dt.datetime.now(dt.UTC)
    wait_until(lambda: dt.datetime.now(dt.UTC) > mark + dt.timedelta(milliseconds=20), timeout=1)
    for i in range(5, 8):
        pub.publish("orders.a", i, confirm=True)
    assert [m.body for m in pub.replay("orders.>", since=mark)] == [5, 6, 7]


@pytest.mark.timeout(60)
def test_replay_then_live_with_the_publisher_sending(make_journal: Callable[..., Journal],
                                                     make_node: Callable[..., Node]) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.wait_for_subscribers("orders.a", timeout=5)
    for i in range(2000):
        pub.publish("orders.a", i)
    wait_until(lambda: journal.stats()["stored"] == 2000, timeout=10)
    stop = threading.Event()
    sent: list[int] = []

    def keep_sending() -> None:
        # Slower than replay, so replay catches up and hands off while this still sends.
        i = 2000
        while not stop.is_set() and i < 40_000:
            pub.publish("orders.a", i)
            sent.append(i)
            i += 1
            if i % 10 == 0:
                stop.wait(0.002)

    sender = threading.Thread(target=keep_sending)
    sender.start()
    try:
        got = Collector()
        sub = make_node("sub", peers=[pub.address, journal.address], start=False)
        sub.subscribe("orders.>", replay="earliest")(got)
        sub.start()
        # Wait until hundreds of messages came live (delivered but not replayed).
        wait_until(lambda: sub.stats()["replay_live"] > 500, timeout=30)
    finally:
        stop.set()
        sender.join(10)
    total = 2000 + len(sent)
    got.wait(total, timeout=20)
    bodies = got.bodies
    assert bodies == list(range(total)), (len(bodies), total)
    # Both halves were used: replay covered at least the stored prefix, live the rest.
    stats = sub.stats()
    assert stats["replayed"] >= 2000 and stats["replayed"] + stats["replay_live"] == total


def test_replay_latest_is_just_live(make_journal: Callable[..., Journal],
                                    make_node: Callable[..., Node]) -> None:
    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.publish("orders.a", "old", confirm=True)
    got = Collector()
    sub = make_node("sub", peers=[pub.address, journal.address], start=False)
    sub.subscribe("orders.>", replay="latest")(got)
    sub.start()
    pub.wait_for_subscribers("orders.a", count=2, timeout=5)
    pub.publish("orders.a", "new")
    assert [m.body for m in got.wait(1)] == ["new"]


def test_fsync_failure_is_fatal_for_the_journal(make_journal: Callable[..., Journal],
                                                make_node: Callable[..., Node],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    pub.publish("orders.x", 0, confirm=True)

    class BadSync:
        def __getattr__(self, name: str) -> Any:
            return getattr(os, name)

        def fdatasync(self, fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        fsync = fdatasync

    monkeypatch.setattr(fileio, "os", BadSync())
    with pytest.raises(MeshTimeout):
        pub.publish("orders.x", 1, confirm=True, timeout=0.5)
    assert journal.failed.wait(5) and journal.log.failed
    from meshmq import StorageError
    assert isinstance(journal.error, StorageError)
    monkeypatch.setattr(fileio, "os", os)
    # Never retried, never acknowledged again, even with a healthy disk.
    with pytest.raises(MeshTimeout):
        pub.publish("orders.x", 2, confirm=True, timeout=0.5)
    assert journal.stats()["acks"] == 1
    # run() stops and re-raises the error (what makes `meshmq journal` exit 3).
    with pytest.raises(StorageError):
        journal.run(every=0.05)


def test_replay_at_the_original_pace(make_journal: Callable[..., Journal],
                                     make_node: Callable[..., Node]) -> None:
    import time

    journal = make_journal()
    pub = make_node("pub", peers=[journal.address])
    t0 = time.monotonic()
    for i in range(4):
        pub.publish("orders.a", i, confirm=True)
        if i < 3:
            threading.Event().wait(0.1)  # the original spacing to reproduce
    published = time.monotonic() - t0
    start = time.monotonic()
    assert [m.body for m in pub.replay("orders.>", pace="original")] == [0, 1, 2, 3]
    assert time.monotonic() - start >= 0.3 - 0.02 and published >= 0.3
    start = time.monotonic()
    assert len(list(pub.replay("orders.>"))) == 4
    assert time.monotonic() - start < 0.25  # "fast" does not wait
