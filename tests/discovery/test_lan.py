"""Nodes on three simulated hosts (network namespaces on a bridge) find each other by mDNS.

Needs root and ``ip netns`` (CI has both); skipped with the reason elsewhere. Nothing
leaves the namespaces the test creates, and they are deleted even on failure.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
from meshmq.discovery import netns

from meshmq.testing import Script

AVAILABLE, WHY_NOT = netns.available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"simulated LAN unavailable: {WHY_NOT}")

PEER_TIMEOUT = 0.8  # _mesh_node.py's default
LEAVE_BOUND = PEER_TIMEOUT + 1.0  # see test_node.py


def served(lines: list[str]) -> list[tuple[int, str, float]]:
    """The driver's ``svc <i> <server> <time>`` lines: (i, server, time)."""
    out = []
    for line in lines:
        w = line.split()
        if w[:1] == ["svc"] and w[2] != "error":
            out.append((int(w[1]), w[2], float(w[3])))
    return out


@pytest.mark.timeout(90)
def test_three_hosts_discover_exchange_and_survive_a_partition(
    mesh: Callable[..., Script], group: str, tools: Any
) -> None:
    with netns.SimulatedLan(hosts=3) as lan:
        def on_host(i: int, name: str, *args: str) -> Script:
            # Only MESHMQ_INTERFACES says where to run: the node binds that address itself.
            return mesh(name, group, *args, env={"MESHMQ_INTERFACES": lan.host_ip(i)},
                        prefix=("ip", "netns", "exec", lan.namespace(i)))

        a = on_host(1, "a", "--exchange", "2", "--drive", "150", "--interval", "0.02")
        b = on_host(2, "b", "--exchange", "2", "--shared")
        c = on_host(3, "c", "--exchange", "2", "--shared")
        scripts = {"a": a, "b": b, "c": c}
        for i, (name, script) in enumerate(scripts.items(), start=1):
            ready = tools.find_line(script, lambda ln: ln.startswith("ready"), 15).split()
            assert ready[3] == lan.host_ip(i)  # bound on its LAN address, not loopback
            tools.find_line(script, lambda ln: ln.startswith("exchanged 2"), 20)
            others = [o for o in scripts if o != name]
            for first in ("hello", "served", "called"):
                for other in others:
                    tools.find_line(script, lambda ln, x=f"{first} {other}": ln == x, 10)
            # Each peer is dialled on its own LAN address, never on 127.0.0.1.
            for w in tools.words(script, "join"):
                host = lan.host_ip(1 + list(scripts).index(w[1]))
                assert w[3].startswith(f"tcp://{host}:"), w

        # The driver spreads calls over b and c.
        tools.wait_lines(a, lambda lines: {s for _, s, _ in served(lines)} == {"b", "c"}, 10,
                         "calls served by both b and c")
        t0 = time.monotonic()
        lan.link_down(2)
        leave = tools.find_line(a, lambda ln: ln.startswith("leave b"), 5).split()
        left_at = float(leave[3])
        assert left_at - t0 < LEAVE_BOUND
        # From then on c gets all the work, including what b held when it vanished.
        after = tools.wait_lines(
            a, lambda lines: (x := [y for y in served(lines) if y[2] > left_at])[4:] and x, 10,
            "calls after the leave")
        assert {s for _, s, _ in after} == {"c"}
        # Every task was acknowledged: those b held when it vanished were redone by c.
        done = tools.find_line(a, lambda ln: ln.startswith("drive-done"), 20).split()
        assert not tools.words(a, "failed")
        # most calls went on the servers' RPC lanes, dialled on their LAN addresses
        assert done[2] == "lane" and int(done[3]) >= 75, done

        # The partition heals: the link a node dialled keeps saying hello, so b is back.
        lan.link_up(2)
        tools.wait_lines(a, lambda lines: [ln for ln in lines if ln.startswith("join b ")][1:], 10,
                         "b to join again")
        for script in scripts.values():
            assert script.stop(signal.SIGTERM) == 0
        done_by_c = {int(w[1]) for w in tools.words(c, "did")}
        done_by_b = {int(w[1]) for w in tools.words(b, "did")}
        assert done_by_c | done_by_b == set(range(150))
        assert {i for i, _, _ in after} <= done_by_c - done_by_b
