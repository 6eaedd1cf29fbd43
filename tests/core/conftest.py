from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from meshmq import Node, Timing

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
