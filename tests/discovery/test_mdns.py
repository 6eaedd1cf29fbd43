"""MdnsDiscovery against real zeroconf on 127.0.0.1, peers in separate processes."""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Any

import pytest
from meshmq.discovery import Advert, MdnsDiscovery, Sighting

from meshmq._errors import ConfigError, NodeClosed

LOOPBACK = ["127.0.0.1"]
Local = Callable[
    ..., Any
]  # conftest `local`: (group, name, ...) -> (MdnsDiscovery, Recorder, Advert)
Peers = Callable[..., Any]  # conftest `peers`: (cfg) -> Peer


def test_two_processes_see_each_other_and_a_clean_stop_is_a_quick_leave(
    group: str, peers: Peers, tools: Any
) -> None:
    a = peers(tools.node_cfg(group, "a", offers="t:prices"))
    b = peers(tools.node_cfg(group, "b", offers="q:jobs"))
    seen_by_a = a.sees("join", b.node_id)["s"]
    seen_by_b = b.sees("join", a.node_id)["s"]
    assert seen_by_a["addresses"] == ["127.0.0.1"]
    assert (seen_by_a["port"], seen_by_a["offers"]) == (b.cfg["port"], "q:jobs")
    assert (seen_by_b["port"], seen_by_b["offers"]) == (a.cfg["port"], "t:prices")
    b.send("stop")
    stopped_at = b.expect("stopped")["t"]
    left_at = a.sees("leave", b.node_id, timeout=5)["t"]
    # The first goodbye goes out before stop() returns and is acted on at once.
    assert left_at - stopped_at < 1.0


def test_in_process_node_and_child_process(
    group: str, local: Local, peers: Peers, tools: Any
) -> None:
    b = peers(tools.node_cfg(group, "b"))
    d, rec, advert = local(group, "a")
    s, _ = rec.wait("join", b.node_id, timeout=5)
    assert s.addresses == ("127.0.0.1",)
    assert s.endpoints == (f"tcp://127.0.0.1:{b.cfg['port']}",)
    assert s.instance == f"b-{b.node_id[:8]}"
    assert b.sees("join", advert.node_id, timeout=5)["s"]["name"] == "a"
    assert [x.advert.node_id for x in d.sightings()] == [b.node_id]
    assert d.stats()["found"] == 1


def test_join_latency_on_loopback(group: str, tools: Any) -> None:
    """Median time from start() of a new node to both sides' join stays well under 1 s."""
    samples: list[float] = []
    for _ in range(5):
        old_rec, new_rec = tools.Recorder(), tools.Recorder()
        old = MdnsDiscovery(LOOPBACK, group, on_join=old_rec.on_join)
        new = MdnsDiscovery(LOOPBACK, group, on_join=new_rec.on_join)
        a1 = Advert(1, "old", tools.new_id(), group, 1001)
        a2 = Advert(1, "new", tools.new_id(), group, 1002)
        try:
            old.start(a1)
            t0 = time.monotonic()
            new.start(a2)
            _, t_old = old_rec.wait("join", a2.node_id, timeout=5)
            _, t_new = new_rec.wait("join", a1.node_id, timeout=5)
            samples.append(max(t_old, t_new) - t0)
        finally:
            new.stop()
            old.stop()
    assert statistics.median(samples) < 0.6, samples


def test_same_name_gets_distinct_instances(
    group: str, local: Local, peers: Peers, tools: Any
) -> None:
    twins = [peers(tools.node_cfg(group, "twin")) for _ in range(2)]
    _, rec, _ = local(group, "observer")
    instances = {rec.wait("join", t.node_id)[0].instance for t in twins}
    assert instances == {f"twin-{t.node_id[:8]}" for t in twins}


def test_other_groups_are_ignored(group: str, local: Local, peers: Peers, tools: Any) -> None:
    d, rec, _ = local(group)
    stranger = peers(tools.node_cfg(group + "-other", "stranger"))
    friend = peers(tools.node_cfg(group, "friend"))
    rec.wait("join", friend.node_id)
    tools.wait_until(
        lambda: d.stats()["ignored_other_group"] >= 1, 5, "the other group to be counted"
    )
    assert rec.kinds(stranger.node_id) == []
    assert [s.advert.node_id for s in d.sightings()] == [friend.node_id]


VALID = {"proto": "1", "name": "x", "id": "0123456789abcdef", "port": "4000", "offers": ""}
GARBAGE: dict[str, dict[str, str | bytes]] = {
    "bad-utf8-name": {**VALID, "name": b"\xff\xfe"},
    "negative-port": {**VALID, "port": "-4000"},
    "missing-keys": {"hello": "world"},
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_txt_is_ignored_and_counted(
    kind: str, group: str, local: Local, peers: Peers, tools: Any
) -> None:
    d, rec, _ = local(group)
    txt = {"group": group, **GARBAGE[kind]} if kind != "missing-keys" else GARBAGE[kind]
    hexed = [
        [k.encode().hex(), (v if isinstance(v, bytes) else v.encode()).hex()]
        for k, v in txt.items()
    ]
    instance = f"junk-{tools.new_id()}"
    peers({"mode": "raw", "interfaces": LOOPBACK, "instance": instance, "props": hexed})
    tools.wait_until(lambda: d.stats()["ignored_garbage"] >= 1, 5, "the garbage to be counted")
    assert d.sightings() == []
    assert rec.kinds() == []


def test_offers_update_fires_on_update(group: str, local: Local, peers: Peers, tools: Any) -> None:
    d, rec, _ = local(group)
    b = peers(tools.node_cfg(group, "b", offers="t:a"))
    rec.wait("join", b.node_id)
    b.send("update t:a,t:b")
    s, _ = rec.wait("update", b.node_id, timeout=5)
    assert s.advert.offers == "t:a,t:b"
    assert d.sightings()[0].advert.offers == "t:a,t:b"
    assert d.stats()["updated"] == 1


def test_without_on_update_updates_fire_on_join_again(group: str, local: Local, tools: Any) -> None:
    _, rec, _ = local(group, on_update=None)
    advert = Advert(1, "b", tools.new_id(), group, 2000, "v1")
    with MdnsDiscovery(LOOPBACK, group) as other:
        other.start(advert)
        rec.wait("join", advert.node_id)
        other.update(Advert(1, "b", advert.node_id, group, 2000, "v2"))
        tools.wait_until(lambda: rec.kinds(advert.node_id) == ["join", "join"], 5, "a 2nd join")
        assert rec.events[-1][1].advert.offers == "v2"


def test_own_advert_is_ignored(group: str, local: Local, tools: Any) -> None:
    d, rec, _ = local(group)
    tools.wait_until(lambda: d.stats()["ignored_self"] >= 1, 5, "our own advert to be seen")
    assert d.sightings() == []
    assert rec.kinds() == []


def test_view_is_bounded_and_deferred_peers_join_when_room_frees(
    group: str, local: Local, peers: Peers, tools: Any
) -> None:
    d, rec, _ = local(group, max_peers=1)
    first = peers(tools.node_cfg(group, "first"))
    rec.wait("join", first.node_id)
    second = peers(tools.node_cfg(group, "second"))
    tools.wait_until(lambda: d.stats()["view_full"] >= 1, 5, "the second peer to hit the bound")
    assert len(d.sightings()) == 1
    first.stop()
    rec.wait("leave", first.node_id, timeout=5)
    rec.wait("join", second.node_id, timeout=5)
    assert [s.advert.node_id for s in d.sightings()] == [second.node_id]


def test_callback_errors_are_logged_and_do_not_stop_discovery(
    group: str, peers: Peers, tools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    joined = threading.Event()

    def explode(s: Sighting) -> None:
        joined.set()
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="meshmq.discovery"):
        with MdnsDiscovery(LOOPBACK, group, on_join=explode) as d:
            d.start(Advert(1, "a", tools.new_id(), group, 1000))
            b = peers(tools.node_cfg(group, "b"))
            assert joined.wait(5)
            b.stop()
            tools.wait_until(lambda: d.stats()["removed"] == 1, 5, "the leave after the failure")
    assert "boom" in caplog.text


def test_stop_from_inside_a_callback_does_not_deadlock(
    group: str, peers: Peers, tools: Any
) -> None:
    done = threading.Event()

    def stop_now(s: Sighting) -> None:
        d.stop()
        done.set()

    d = MdnsDiscovery(LOOPBACK, group, on_join=stop_now)
    d.start(Advert(1, "a", tools.new_id(), group, 1000))
    peers(tools.node_cfg(group, "b"))
    assert done.wait(10)
    d.stop()  # idempotent


def test_stop_is_bounded_and_sends_the_goodbye(
    group: str, local: Local, peers: Peers, tools: Any
) -> None:
    d, rec, advert = local(group)
    b = peers(tools.node_cfg(group, "b"))
    rec.wait("join", b.node_id)
    b.sees("join", advert.node_id)
    t0 = time.monotonic()
    d.stop()
    assert time.monotonic() - t0 < 2.0
    assert d.sightings() == []
    b.sees("leave", advert.node_id, timeout=5)
    n = len(rec.events)
    b.stop()  # no callbacks after stop()
    assert len(rec.events) == n


def test_lifecycle_errors(group: str, tools: Any) -> None:
    d = MdnsDiscovery(LOOPBACK, group)
    advert = Advert(1, "a", tools.new_id(), group, 1000)
    with pytest.raises(NodeClosed):
        d.update(advert)
    d.stop()  # before start: allowed, and final
    with pytest.raises(NodeClosed):
        d.start(advert)
    d2 = MdnsDiscovery(LOOPBACK, group)
    with pytest.raises(ConfigError, match="group"):
        d2.start(Advert(1, "a", tools.new_id(), group + "x", 1000))
    with d2:
        d2.start(advert)
        with pytest.raises(NodeClosed):
            d2.start(advert)
        with pytest.raises(ConfigError):
            d2.update(Advert(1, "a", tools.new_id(), group, 1000))
    with pytest.raises(NodeClosed):
        d2.update(advert)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interfaces": ["203.0.113.77"]},  # not an address of this host
        {"bind_addresses": ["not-an-ip"]},
        {"bind_addresses": []},
    ],
)
def test_bad_start_arguments(
    group: str, kwargs: dict[str, Any], tools: Any, no_network: None
) -> None:
    # rejected before zeroconf opens anything (no_network fails any socket)
    d = MdnsDiscovery(kwargs.pop("interfaces", LOOPBACK), group)
    with pytest.raises(ConfigError):
        d.start(Advert(1, "a", tools.new_id(), group, 1000), **kwargs)
    d.stop()


@pytest.mark.parametrize("bad", [[str(IPv4Address(0))], ["233.252.0.1"], ["not-an-ip"], []])
def test_published_addresses_must_be_dialable(bad: list[str], no_network: None) -> None:
    # The check start() runs on bind_addresses, called alone: a pure function, so the
    # unspecified address and a multicast group (MCAST-TEST-NET, RFC 5771, for documentation)
    # are only parsed and refused, never handed to zeroconf.
    from ipaddress import IPv4Interface

    from meshmq.discovery._mdns import _check_bind

    with pytest.raises(ConfigError):
        _check_bind(bad, [IPv4Interface("127.0.0.1/8")])


@pytest.mark.parametrize(
    "kwargs", [{"group": ""}, {"group": "g" * 40}, {"max_peers": 0}, {"interfaces": ["eth0"]}]
)
def test_bad_constructor_arguments(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"interfaces": LOOPBACK, "group": "g"}
    args.update(kwargs)
    with pytest.raises(ConfigError):
        MdnsDiscovery(**args)


def test_a_flood_of_adverts_stays_bounded(
    group: str, local: Local, peers: Peers, tools: Any
) -> None:
    d, rec, _ = local(group, max_peers=10)
    flood = peers({"mode": "flood", "interfaces": LOOPBACK, "group": group, "count": 60})
    tools.wait_until(
        lambda: d.stats()["found"] == 10 and d.stats()["view_full"] >= 50, 10, "60 adverts resolved"
    )
    assert len(d.sightings()) == 10
    flood.stop()
    tools.wait_until(lambda: d.sightings() == [], 10, "every flooded advert to leave")
    kinds = rec.kinds()
    assert kinds.count("join") == kinds.count("leave") >= 10


def test_rfc6762_probing_can_be_turned_on(group: str, local: Local, tools: Any) -> None:
    _, rec, _ = local(group)
    advert = Advert(1, "careful", tools.new_id(), group, 1000)
    with MdnsDiscovery(LOOPBACK, group, probe=True) as d:
        t0 = time.monotonic()
        d.start(advert)
        assert time.monotonic() - t0 < 5.0
        rec.wait("join", advert.node_id, timeout=5)


def test_an_announcement_right_after_a_goodbye_is_a_leftover(group: str) -> None:
    """A responder may send an answer it had queued after its goodbye: it must not count."""
    from meshmq.discovery import SERVICE_TYPE
    from zeroconf import ServiceStateChange

    d = MdnsDiscovery(LOOPBACK, group)  # never started: feed the browser handler by hand
    name = f"gone-0123abcd.{SERVICE_TYPE}"
    d._on_change(None, SERVICE_TYPE, name, ServiceStateChange.Removed)
    d._on_change(None, SERVICE_TYPE, name, ServiceStateChange.Added)
    assert d.stats()["ignored_stale"] == 1
    assert d._inflight == {} and d._waiting == {}
