"""SimulatedLan, and discovery between two simulated hosts (needs root and `ip netns`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
from meshmq.discovery import netns

from meshmq._errors import ConfigError

AVAILABLE, WHY_NOT = netns.available()
needs_netns = pytest.mark.skipif(not AVAILABLE, reason=f"simulated LAN unavailable: {WHY_NOT}")

SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 7000))
s.listen()
print("listening", flush=True)
while True:
    s.accept()[0].close()
"""
CLIENT = """
import socket, sys
socket.create_connection((sys.argv[1], 7000), timeout=1).close()
"""


def test_available_says_why() -> None:
    ok, reason = netns.available()
    assert isinstance(ok, bool)
    assert ok or reason


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        netns.SimulatedLan(hosts=0)
    lan = netns.SimulatedLan(hosts=2)  # nothing is created before create()/__enter__
    with pytest.raises(ConfigError):
        lan.host_ip(3)
    assert not set(lan.host_ns) & set(netns.namespaces())


@needs_netns
def test_lan_links_hosts_partitions_and_cleans_up() -> None:
    with netns.SimulatedLan(hosts=2) as lan:
        ours = {lan.switch_ns, *lan.host_ns}
        assert ours <= set(netns.namespaces())
        assert all(ns.startswith(f"mmq{os.getpid()}-") for ns in ours)
        server = lan.run(
            2, [sys.executable, "-c", SERVER, lan.host_ip(2)], stdout=subprocess.PIPE, text=True
        )
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "listening"

        def reach() -> int:
            return lan.call(1, [sys.executable, "-c", CLIENT, lan.host_ip(2)]).returncode

        assert reach() == 0
        lan.link_down(2)
        assert reach() != 0
        lan.link_up(2)
        assert reach() == 0
        # No route out: a real address is unreachable from inside.
        routes = lan.call(1, ["ip", "route"]).stdout
        assert "default" not in routes
    assert server.poll() is not None  # killed by close()
    server.stdout.close()
    assert not ours & set(netns.namespaces())


@needs_netns
def test_cleanup_happens_on_error() -> None:
    lan = netns.SimulatedLan(hosts=1)
    with pytest.raises(RuntimeError, match="boom"), lan:
        assert lan.namespace(1) in netns.namespaces()
        raise RuntimeError("boom")
    assert not {lan.switch_ns, *lan.host_ns} & set(netns.namespaces())


@needs_netns
def test_two_hosts_discover_each_other_by_their_lan_address(
    group: str, peers: Callable[..., Any], tools: Any
) -> None:
    with netns.SimulatedLan(hosts=2) as lan:
        hosts = []
        for i in (1, 2):
            cfg = tools.node_cfg(group, f"host{i}")
            cfg["interfaces"] = [lan.host_ip(i)]
            # Worst case: the node also publishes 127.0.0.1; the other host must not use it.
            cfg["bind"] = ["127.0.0.1", lan.host_ip(i)]

            def spawn(argv: list[str], _i: int = i, **kw: Any) -> subprocess.Popen[str]:
                return lan.run(_i, argv, **kw)

            hosts.append(peers(cfg, spawn=spawn))
        one, two = hosts
        assert one.sees("join", two.node_id)["s"]["addresses"] == [lan.host_ip(2)]
        assert two.sees("join", one.node_id)["s"]["addresses"] == [lan.host_ip(1)]
        two.stop()
        one.sees("leave", two.node_id, timeout=5)
        one.stop()
        names = {lan.switch_ns, *lan.host_ns}
    assert not names & set(netns.namespaces())
