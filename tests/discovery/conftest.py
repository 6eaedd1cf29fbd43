"""Shared helpers for the discovery tests.

Every zeroconf instance here runs on 127.0.0.1 (or inside a namespace a test created):
nothing is ever multicast on a real interface. Groups are unique per test, so adverts of
other test runs on the same loopback do not interfere.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from meshmq.discovery import Advert, MdnsDiscovery, Sighting

from meshmq import MeshTimeout, Node, Timing
from meshmq.testing import Script

PEER_SCRIPT = Path(__file__).with_name("_peer.py")
MESH_NODE = Path(__file__).with_name("_mesh_node.py")
LOOPBACK = ["127.0.0.1"]
T = TypeVar("T")
# Quick heartbeats (as tests/conftest.py's QUICK): a silent peer is gone after 0.8 s.
QUICK = Timing(heartbeat_interval=0.1, peer_timeout=0.8, hello_interval=0.1, tick=0.05,
               stop_timeout=2.0, linger=0.1)


def new_id() -> str:
    """Return a fresh random node id."""
    return secrets.token_hex(8)


def unique_group() -> str:
    """Return a group name no other test (or test run) uses."""
    return f"t{os.getpid()}-{secrets.token_hex(4)}"


def wait_until(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    """Poll probe until it returns something truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        tick.wait(0.02)


class Recorder:
    """Collects the callbacks of an in-process MdnsDiscovery and waits on them."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Sighting, float]] = []
        self._cond = threading.Condition()

    def _add(self, kind: str, s: Sighting) -> None:
        with self._cond:
            self.events.append((kind, s, time.monotonic()))
            self._cond.notify_all()

    def on_join(self, s: Sighting) -> None:
        self._add("join", s)

    def on_leave(self, s: Sighting) -> None:
        self._add("leave", s)

    def on_update(self, s: Sighting) -> None:
        self._add("update", s)

    def wait(self, kind: str, node_id: str, timeout: float = 10.0) -> tuple[Sighting, float]:
        """Return the first (sighting, time) of kind for node_id, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for k, s, t in self.events:
                    if k == kind and s.advert.node_id == node_id:
                        return s, t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {kind} of {node_id} within {timeout} s: {self.kinds()}"
                    )
                self._cond.wait(left)

    def kinds(self, node_id: str | None = None) -> list[str]:
        """Return the event kinds seen so far, optionally for one node."""
        with self._cond:
            return [k for k, s, _ in self.events if node_id in (None, s.advert.node_id)]


class Peer:
    """A discovery node in a child process (tests/discovery/_peer.py), spoken to over pipes."""

    def __init__(
        self, cfg: dict[str, Any], spawn: Callable[..., subprocess.Popen[str]] | None = None
    ) -> None:
        self.cfg = cfg
        argv = [sys.executable, str(PEER_SCRIPT), json.dumps(cfg)]
        popen = spawn or subprocess.Popen
        self.proc = popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.events: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def node_id(self) -> str:
        return str(self.cfg["node_id"])

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.events.append(json.loads(line))
                self._cond.notify_all()
        with self._cond:
            self.events.append({"ev": "eof"})
            self._cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def expect(
        self,
        ev: str,
        pred: Callable[[dict[str, Any]], bool] = lambda e: True,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Return the first event named ev that satisfies pred, waiting up to timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if event["ev"] == ev and pred(event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0 or any(e["ev"] == "eof" for e in self.events):
                    raise AssertionError(
                        f"peer {self.cfg.get('name')}: no {ev!r} within {timeout} s;"
                        f" events={[e['ev'] for e in self.events]} stderr={''.join(self.stderr)[-2000:]}"
                    )
                self._cond.wait(left)

    def sees(self, ev: str, node_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Return this peer's join/leave/update event about node_id."""
        return self.expect(ev, lambda e: e["s"]["node_id"] == node_id, timeout)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def stats(self) -> dict[str, Any]:
        """Ask the peer for its stats and sightings."""
        with self._cond:
            n = sum(1 for e in self.events if e["ev"] == "stats")
        self.send("stats")
        deadline = time.monotonic() + 10
        with self._cond:
            while True:
                found = [e for e in self.events if e["ev"] == "stats"]
                if len(found) > n:
                    return found[-1]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError("peer did not answer stats")
                self._cond.wait(left)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the peer to stop cleanly (it sends its goodbye) and wait for it to exit."""
        if self.proc.poll() is None:
            self.send("stop")
            self.proc.wait(timeout)

    def close(self) -> None:
        """Make sure the process is gone (stop, else kill by PID) and release its pipes."""
        try:
            if self.proc.poll() is None:
                try:
                    self.stop(5)
                except (OSError, subprocess.TimeoutExpired):
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            for reader in self._readers:
                reader.join(5)
            for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass


def node_cfg(group: str, name: str = "peer", **extra: Any) -> dict[str, Any]:
    """Return a peer config for a node on loopback."""
    cfg: dict[str, Any] = {
        "mode": "node",
        "interfaces": LOOPBACK,
        "group": group,
        "name": name,
        "node_id": new_id(),
        "port": 40000 + secrets.randbelow(20000),
        "offers": "t:a",
    }
    cfg.update(extra)
    return cfg


def find_line(script: Script, test: Callable[[str], bool], timeout: float = 10.0) -> str:
    """Return the first output line of script, read so far or still to come, that passes test."""
    for line in list(script.lines):
        if test(line):
            return line
    return script.expect(test, timeout)


def wait_lines(script: Script, probe: Callable[[list[str]], T | None], timeout: float,
               what: str) -> T:
    """Read script's output until probe(all lines so far) is truthy; AssertionError after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe(list(script.lines))
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}: "
                                 + "\n".join(script.lines[-30:]))
        try:
            script.expect(lambda line: True, min(left, 0.5))  # one more line
        except MeshTimeout:
            if script.proc.poll() is not None:
                raise AssertionError(f"{what}: the process exited") from None


def words(script: Script, first: str) -> list[list[str]]:
    """Return the output lines read so far that start with the word first, split in words."""
    return [ln.split() for ln in list(script.lines) if ln.split()[:1] == [first]]


@pytest.fixture
def mesh() -> Iterator[Callable[..., Script]]:
    """Factory of _mesh_node.py processes (``mesh(name, group, *args, env=, prefix=)``).

    Each is asked to stop (SIGTERM) at teardown, and killed if it does not.
    """
    made: list[Script] = []

    def start(name: str, group: str, *args: str, env: dict[str, str] | None = None,
              prefix: tuple[str, ...] = ()) -> Script:
        argv = [*prefix, sys.executable, str(MESH_NODE), "--name", name, "--group", group, *args]
        script = Script(argv, env=env)
        made.append(script)
        return script

    yield start
    for script in made:
        script.stop(timeout=5)


@pytest.fixture
def mdns_node() -> Iterator[Callable[..., Node]]:
    """Factory of in-process Nodes with mDNS discovery on loopback and quick timing."""
    made: list[Node] = []

    def make(name: str, group: str, start: bool = True, **kw: Any) -> Node:
        kw.setdefault("timing", QUICK)
        kw.setdefault("interfaces", LOOPBACK)
        node = Node(name, discovery="mdns", group=group, **kw)
        made.append(node)
        return node.start() if start else node

    yield make
    for node in reversed(made):
        node.stop()


@pytest.fixture
def tools() -> SimpleNamespace:
    """The helpers above, for test modules (importlib mode cannot import conftest)."""
    return SimpleNamespace(
        LOOPBACK=LOOPBACK,
        Peer=Peer,
        Recorder=Recorder,
        QUICK=QUICK,
        find_line=find_line,
        wait_lines=wait_lines,
        words=words,
        new_id=new_id,
        node_cfg=node_cfg,
        unique_group=unique_group,
        wait_until=wait_until,
    )


@pytest.fixture
def group() -> str:
    return unique_group()


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """Factory of child-process peers; all are stopped (or killed) at teardown."""
    made: list[Peer] = []

    def spawn(cfg: dict[str, Any], **kwargs: Any) -> Peer:
        peer = Peer(cfg, **kwargs)
        made.append(peer)
        peer.expect("ready", timeout=15)
        return peer

    yield spawn
    for peer in made:
        peer.close()


@pytest.fixture
def local() -> Iterator[Callable[..., tuple[MdnsDiscovery, Recorder, Advert]]]:
    """Factory of started in-process MdnsDiscovery on loopback; all stopped at teardown."""
    made: list[MdnsDiscovery] = []

    def start(
        group: str, name: str = "local", offers: str = "", **kwargs: Any
    ) -> tuple[MdnsDiscovery, Recorder, Advert]:
        rec = Recorder()
        kwargs.setdefault("on_update", rec.on_update)
        d = MdnsDiscovery(LOOPBACK, group, on_join=rec.on_join, on_leave=rec.on_leave, **kwargs)
        made.append(d)
        advert = Advert(1, name, new_id(), group, 30000 + secrets.randbelow(10000), offers)
        d.start(advert)
        return d, rec, advert

    yield start
    for d in made:
        d.stop()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a socket: for tests that hand non-loopback addresses (the
    unspecified address, a multicast group, LAN addresses) to code that must reject or merely
    sort them, this proves they never reach the network."""
    import socket

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("this test must not open a socket")

    monkeypatch.setattr(socket, "socket", refuse)
