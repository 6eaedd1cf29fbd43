"""Nodes that find each other by mDNS on 127.0.0.1, no address given anywhere.

Peers run as separate processes (_mesh_node.py); some tests add a node in this process to
look inside it. Every group is unique to its test, so concurrent runs do not mix.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from ipaddress import IPv4Interface
from typing import Any

import pytest
from meshmq.discovery import Advert, MdnsDiscovery, _mesh

from meshmq import ConfigError, Node
from meshmq._zmqio import WILDCARD_HOSTS
from meshmq.testing import Collector, Script, wait_until

Mesh = Callable[..., Script]
MdnsNode = Callable[..., Node]
PEER_TIMEOUT = 0.8  # tools.QUICK and _mesh_node.py's default
# A silent peer is declared gone after PEER_TIMEOUT, noticed at the next heartbeat check
# (every heartbeat_interval / 2); the rest is slack for a loaded CI machine.
LEAVE_BOUND = PEER_TIMEOUT + 1.0


def check_exchange(tools: Any, node: Script, others: list[str]) -> None:
    """node published to, pushed to, called, and was reached by each of the others."""
    tools.find_line(node, lambda ln: ln.startswith("exchanged"), 20)
    for first in ("hello", "task", "served", "called"):
        for other in others:
            tools.find_line(node, lambda ln, x=f"{first} {other}": ln == x, 10)
        got = sorted(w[1] for w in tools.words(node, first) if w[1] != node_name(node))
        assert got == sorted(others), (first, got, node.lines)  # each exactly once
    joined = {w[1]: w[3] for w in tools.words(node, "join")}
    assert sorted(joined) == sorted(others)
    assert all(addr.startswith("tcp://127.0.0.1:") for addr in joined.values())


def node_name(script: Script) -> str:
    return script.argv[script.argv.index("--name") + 1]


def test_two_processes_exchange_then_a_clean_stop_is_a_quick_leave(
    mesh: Mesh, group: str, tools: Any
) -> None:
    a = mesh("a", group, "--exchange", "1")
    b = mesh("b", group, "--exchange", "1")
    check_exchange(tools, a, ["b"])
    check_exchange(tools, b, ["a"])
    t0 = time.monotonic()
    assert b.stop(signal.SIGTERM) == 0
    leave = tools.find_line(a, lambda ln: ln.startswith("leave b"), 5).split()
    assert float(leave[3]) - t0 < 1.0
    assert a.stop(signal.SIGTERM) == 0
    assert not tools.words(a, "failed") and not tools.words(b, "failed")


@pytest.mark.timeout(90)
def test_five_processes_form_a_full_mesh_and_notice_leaves(
    mesh: Mesh, group: str, tools: Any
) -> None:
    names = [f"n{i}" for i in range(1, 6)]
    nodes = {n: mesh(n, group, "--exchange", "4") for n in names}
    for n, script in nodes.items():
        check_exchange(tools, script, [o for o in names if o != n])
    survivors = names[:3]
    # A clean stop: the BYE and the mDNS goodbye reach everybody at once.
    t0 = time.monotonic()
    assert nodes["n5"].stop(signal.SIGTERM) == 0
    for n in survivors + ["n4"]:
        line = tools.find_line(nodes[n], lambda ln: ln.startswith("leave n5"), 5).split()
        assert float(line[3]) - t0 < 1.0, (n, line)
    # SIGKILL: no goodbye of any kind; heartbeats notice.
    t0 = time.monotonic()
    nodes["n4"].stop(signal.SIGKILL)
    for n in survivors:
        line = tools.find_line(nodes[n], lambda ln: ln.startswith("leave n4"), 5).split()
        assert float(line[3]) - t0 < LEAVE_BOUND, (n, line)
    for n in survivors:
        assert nodes[n].stop(signal.SIGTERM) == 0
        assert not tools.words(nodes[n], "failed")
        joins = [w[1] for w in tools.words(nodes[n], "join")]
        assert sorted(joins) == sorted(o for o in names if o != n)  # nobody came back


def test_sigkill_is_a_leave_and_the_lingering_record_does_not_bring_it_back(
    mesh: Mesh, mdns_node: MdnsNode, group: str, tools: Any
) -> None:
    here = mdns_node("here", group)
    # Name clash: two nodes called "twin" are two peers, with distinct ids and instances.
    twins = [mesh("twin", group) for _ in range(2)]
    ids = [tools.find_line(t, lambda ln: ln.startswith("ready"), 15).split()[1] for t in twins]
    assert ids[0] != ids[1]
    wait_until(lambda: {p.id for p in here.peers()} == set(ids), 10, what="both twins")
    assert [p.name for p in here.peers()] == ["twin", "twin"]
    discovery = here._discovery
    instances = {s.advert.node_id: s.instance for s in discovery.sightings()}
    assert sorted(instances.values()) == sorted(f"twin-{i[:8]}" for i in ids)

    t0 = time.monotonic()
    twins[0].stop(signal.SIGKILL)
    wait_until(lambda: ids[0] not in {p.id for p in here.peers()}, LEAVE_BOUND,
               what="the killed twin to be noticed")
    assert time.monotonic() - t0 < LEAVE_BOUND
    # Its mDNS record lingers (no goodbye was sent), but it is not trusted over heartbeats.
    assert ids[0] in {s.advert.node_id for s in discovery.sightings()}
    dials = discovery.stats()["dials"]
    rescans = discovery.stats()["rescans"]
    wait_until(lambda: discovery.stats()["rescans"] >= rescans + 8, 10,
               what="rescans well past the fallback delay")
    stats = discovery.stats()
    assert stats["lingering"] == 1 and stats["dials"] == dials
    assert {p.id for p in here.peers()} == {ids[1]}

    # The same name again is a new incarnation (new id, new record): it joins.
    again = mesh("twin", group)
    new_id = tools.find_line(again, lambda ln: ln.startswith("ready"), 15).split()[1]
    wait_until(lambda: new_id in {p.id for p in here.peers()}, 10, what="the new twin")

    # A clean stop: the peer is gone at once, and so is its record.
    t0 = time.monotonic()
    twins[1].stop(signal.SIGTERM)
    wait_until(lambda: ids[1] not in {p.id for p in here.peers()}, 2, what="the stopped twin")
    assert time.monotonic() - t0 < 1.5  # including the child's own stop
    wait_until(lambda: ids[1] not in {s.advert.node_id for s in discovery.sightings()}, 2,
               what="the goodbye")
    assert discovery.stats()["withdrawn"] == 1


def test_groups_keep_deployments_apart(mdns_node: MdnsNode, group: str) -> None:
    a = mdns_node("a", group)
    b = mdns_node("b", group)
    other = mdns_node("other", group + "-2")
    for node, ignored in ((a, 1), (b, 1), (other, 2)):
        wait_until(lambda n=node, k=ignored: n._discovery.stats()["ignored_other_group"] >= k,
                   5, what=f"{node.name} to ignore the other group")
    wait_until(lambda: [p.name for p in a.peers()] == ["b"], 5, what="a and b to pair")
    assert [p.name for p in b.peers()] == ["a"]
    assert [p.group for p in a.peers()] == [group]
    assert other.peers() == [] and other._discovery.sightings() == []


def test_offers_travel_in_the_txt_record_and_updates_follow(
    mdns_node: MdnsNode, local: Any, group: str
) -> None:
    node = mdns_node("shop", group, start=False)
    node.subscribe("orders.*")(Collector())
    node.start()
    _, rec, _ = local(group, "observer")
    seen, _ = rec.wait("join", node.id, timeout=5)
    assert seen.advert.offers == "t:orders.*"
    assert seen.endpoints == (node.address,)

    @node.rpc("stock.check")
    def check(sku: str) -> int:
        return 1

    updated, _ = rec.wait("update", node.id, timeout=5)
    assert updated.advert.offers == "t:orders.*,s:stock.check"
    wait_until(lambda: node._discovery.stats()["txt_updates"] == 1, 2, what="the count")


def test_garbage_txt_is_counted_and_never_dialled(
    mdns_node: MdnsNode, peers: Any, group: str, tools: Any
) -> None:
    node = mdns_node("victim", group)
    txt = {"proto": "1", "name": "x", "id": "not-hex!", "group": group, "port": "1",
           "offers": ""}
    hexed = [[k.encode().hex(), v.encode().hex()] for k, v in txt.items()]
    peers({"mode": "raw", "interfaces": tools.LOOPBACK, "instance": f"junk-{tools.new_id()}",
           "props": hexed})
    wait_until(lambda: node.stats()["discovery"]["ignored_garbage"] >= 1, 5, what="garbage counted")
    stats = node.stats()["discovery"]
    assert stats["dials"] == 0 and stats["found"] == 0 and node.peers() == []


def test_host_follows_the_interfaces(
    mdns_node: MdnsNode, group: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = mdns_node("lo", group, host="127.0.0.1")  # loopback on loopback is fine
    assert node.address.startswith("tcp://127.0.0.1:")
    assert Node("x", discovery="mdns", interfaces=["127.0.0.1"]).host == "127.0.0.1"
    assert Node("x", peers=[]).host == "127.0.0.1"
    assert _mesh.default_host(["10.1.2.3"]) == "10.1.2.3"
    assert _mesh.default_host("all") in WILDCARD_HOSTS
    assert _mesh.default_host(["10.1.2.3", "10.4.5.6"]) in WILDCARD_HOSTS
    monkeypatch.setenv("MESHMQ_INTERFACES", "10.9.9.9")
    assert Node("x", discovery="mdns").host == "10.9.9.9"
    # A node bound on loopback cannot be advertised on a LAN interface.
    monkeypatch.setattr(_mesh, "local_networks",
                        lambda chosen: [IPv4Interface("10.9.9.9/24")])
    with pytest.raises(ConfigError, match="could not reach it"):
        _mesh.bind_addresses("127.0.0.1", ["10.9.9.9"])
    assert _mesh.bind_addresses("10.9.9.9", ["10.9.9.9"]) == ["10.9.9.9"]
    assert _mesh.bind_addresses(_mesh.default_host("all"), "all") is None


def test_the_larger_id_dials_when_the_smaller_one_does_not(
    mdns_node: MdnsNode, make_node: Callable[..., Node], group: str
) -> None:
    quiet = make_node("quiet")  # static discovery: it never browses, so it never dials
    # ... yet it is on mDNS (advertised by hand), with an id below ours.
    with MdnsDiscovery(["127.0.0.1"], group) as advert:
        port = int(quiet.address.rsplit(":", 1)[1])
        advert.start(Advert(1, "quiet", quiet.id, group, port))
        here = mdns_node("here", group, start=False)
        here.id = "f" * 16
        here.start()
        t0 = time.monotonic()
        wait_until(lambda: [p.id for p in here.peers()] == [quiet.id], 5, what="the fallback")
        assert time.monotonic() - t0 >= here._discovery.fallback
        stats = here._discovery.stats()
        assert stats["dials"] == stats["fallback_dials"] == 1


class _Engine:
    def __init__(self) -> None:
        self.peers: dict[str, object] = {}
        self.forgotten: list[tuple[str | None, str | None]] = []

    def forget(self, node_id: str | None, address: str | None) -> None:
        self.forgotten.append((node_id, address))


class _Node:
    """Just what NodeDiscovery's decisions look at."""

    def __init__(self, node_id: str) -> None:
        self.id, self.name, self.group, self.interfaces = node_id, "me", "g", ["127.0.0.1"]
        self.running = True
        self.engine = _Engine()
        self.dialled: list[str] = []

    def connect(self, address: str) -> None:
        self.dialled.append(address)


def _sighting(node_id: str, port: int = 4000, offers: str = "") -> Any:
    from meshmq.discovery import Sighting
    return Sighting(Advert(1, "p", node_id, "g", port, offers), ("127.0.0.1",), "p")


def test_who_dials_and_when_a_record_is_not_trusted() -> None:
    from meshmq import PeerInfo

    node = _Node("5" * 16)
    d = _mesh.NodeDiscovery(node)
    try:
        smaller, larger = "1" * 16, "9" * 16
        d._seen(_sighting(larger))  # our turn: at once
        assert node.dialled == ["tcp://127.0.0.1:4000"]
        d._seen(_sighting(smaller, 4001))  # its turn: we wait ...
        assert len(node.dialled) == 1
        with d._lock:
            d._consider(_sighting(smaller, 4001), time.monotonic() + d.fallback)
        assert node.dialled[-1] == "tcp://127.0.0.1:4001"  # ... then dial anyway
        assert d.stats()["fallback_dials"] == 1

        # A peer that was on the mesh and left it is not dialled from its record again ...
        other = "2" * 16
        d._seen(_sighting(other, 4002))
        node.engine.peers[other] = object()
        d._joined(PeerInfo("p", other, "tcp://127.0.0.1:4002"))
        del node.engine.peers[other]
        with d._lock:
            d._consider(_sighting(other, 4002), time.monotonic() + 60)
        assert "tcp://127.0.0.1:4002" not in node.dialled
        assert d.stats()["lingering"] == 1
        # ... unless its record changes: somebody is alive there.
        d._changed(_sighting(other, 4002, "t:x"))
        with d._lock:
            d._consider(_sighting(other, 4002, "t:x"), time.monotonic() + 60)
        assert node.dialled[-1] == "tcp://127.0.0.1:4002"

        # A goodbye drops the peer and the link we dialled to it.
        d._gone(_sighting(larger))
        assert node.engine.forgotten == [(larger, "tcp://127.0.0.1:4000")]
        assert d.stats()["withdrawn"] == 1
    finally:
        d.stop()
