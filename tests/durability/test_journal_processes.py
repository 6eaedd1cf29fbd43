"""The journal as a separate process: the CLI, inspect, replay, and kill -9 under confirm=True."""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from meshmq.durability import Log
from meshmq.durability._entry import decode_entry

from meshmq import MeshTimeout, Node
from meshmq.testing import Script, wait_until

CLI = [sys.executable, "-m", "meshmq.cli"]


def journal_script(directory: Path, *extra: str) -> Script:
    return Script([*CLI, "journal", "--dir", str(directory), "--topics", "orders.>",
                   "--discovery", "static", *extra])


def address_of(script: Script) -> str:
    return script.expect("listening on", timeout=15).rsplit(" ", 1)[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(60)
def test_journal_cli_inspect_and_replay(tmp_path: Path,
                                        make_node: Callable[..., Node]) -> None:
    directory = tmp_path / "data"
    journal = journal_script(directory)
    try:
        addr = address_of(journal)
        pub = make_node("pub", peers=[addr])
        for i in range(100):
            pub.publish("orders.created", {"order": i}, confirm=True)
        journal.expect(lambda line: "records 100 " in line, timeout=10)  # the progress line
        inspect = run_cli("journal", "inspect", "--dir", str(directory))
        assert inspect.returncode == 0, inspect.stderr
        assert "total: 100 records" in inspect.stdout and "damage: none" in inspect.stdout
        live = run_cli("replay", "orders.>", "--from-node", addr, "--since", "95")
        assert live.returncode == 0, live.stderr
        assert [json.loads(ln)["body"]["order"] for ln in live.stdout.splitlines()] == \
            list(range(95, 100))
        assert journal.stop(signal.SIGINT) == 0
        assert any("journal stopped: 100 stored" in ln for ln in journal.lines)
    finally:
        journal.stop()
    out = run_cli("replay", "orders.created", "--dir", str(directory), "--since", "90")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(ln) for ln in out.stdout.splitlines()]
    assert [r["offset"] for r in rows] == list(range(90, 100))
    assert [r["body"]["order"] for r in rows] == list(range(90, 100))


def test_journal_cli_rejects_bad_settings(tmp_path: Path) -> None:
    out = run_cli("journal", "--dir", str(tmp_path), "--topics", "orders.>", "--fsync", "sometimes")
    assert out.returncode == 1 and out.stderr.startswith("error: ")


@pytest.mark.timeout(90)
def test_kill_9_while_publishing_with_confirm(tmp_path: Path,
                                              make_node: Callable[..., Node]) -> None:
    directory = tmp_path / "data"
    port = str(free_port())
    journal = journal_script(directory, "--port", port, "--fsync", "always", "--quiet")
    total = 1500
    acked: list[str] = []
    failed: list[str] = []
    done = threading.Event()
    try:
        addr = address_of(journal)
        pub = make_node("pub", peers=[addr])

        def send() -> None:
            try:
                for i in range(total):
                    try:
                        acked.append(pub.publish("orders.created", i, confirm=True,
                                                 timeout=20.0))
                    except MeshTimeout:
                        failed.append(str(i))
            finally:
                done.set()

        sender = threading.Thread(target=send)
        sender.start()
        rng = random.Random(5)
        kills = 0
        try:
            for target in sorted(rng.sample(range(100, total - 200), 4)):
                wait_until(lambda t=target: len(acked) >= t or done.is_set(), timeout=30)  # type: ignore[misc]
                if done.is_set():
                    break
                journal.stop(signal.SIGKILL)
                kills += 1
                journal = journal_script(directory, "--port", port, "--fsync", "always",
                                         "--quiet")
                address_of(journal)
        finally:
            done.wait(60)
            sender.join(5)
        assert kills == 4 and not failed
        assert len(acked) == total
        assert pub.stats()["confirm_resends"] >= 1  # at least one in-flight message was resent
        assert journal.stop(signal.SIGINT) == 0
    finally:
        journal.stop()
    with Log.open(directory, fsync="never") as log:
        msgs = [decode_entry(r.payload) for r in log.read()]
        assert log.recovery.lost_ranges == []
    ids = [m.id for m in msgs]
    assert len(ids) == len(set(ids)), "a message was stored twice"
    assert set(acked) <= set(ids), "an acknowledged message is missing"
    # In order per publisher: stored seqs strictly increase (one topic, one publisher).
    seqs = [m.seq for m in msgs if m.source_id == pub.id]
    assert seqs == sorted(seqs) and [m.body for m in msgs] == list(range(total))
