"""Shared fixtures: every test must leave no thread, socket, namespace or process behind."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meshmq import Node, Timing

os.environ.setdefault("MESHMQ_INTERFACES", "127.0.0.1")  # never multicast beyond loopback


def _fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _children() -> set[int]:
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return {int(p) for p in f.read().split()}
    except OSError:
        return set()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail a test that leaves threads, file descriptors (sockets) or child processes."""
    threads = set(threading.enumerate())
    fds = _fds()
    kids = _children()
    yield
    import time
    deadline = time.monotonic() + 3.0
    while True:  # give stopped threads a moment to finish exiting
        extra = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        leaked_fds = _fds() - fds
        leaked_kids = _children() - kids
        if not (extra or leaked_fds or leaked_kids) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not extra, f"threads left behind: {[t.name for t in extra]}"
    assert not leaked_kids, f"child processes left behind: {leaked_kids}"
    assert not leaked_fds, f"file descriptors left behind: {sorted(leaked_fds)}"


QUICK = Timing(heartbeat_interval=0.1, peer_timeout=0.8, hello_interval=0.1, tick=0.05,
               stop_timeout=2.0, linger=0.1)


@pytest.fixture
def make_node() -> Iterator[Callable[..., Node]]:
    """A factory of started nodes on loopback with quick timing; all stopped at the end."""
    made: list[Node] = []

    def factory(name: str = "n", peers: list[str] | None = None, start: bool = True,
                **kw: Any) -> Node:
        kw.setdefault("timing", QUICK)
        node = Node(name, peers=peers if peers is not None else [], **kw)
        made.append(node)
        return node.start() if start else node

    yield factory
    for node in reversed(made):
        node.stop()
