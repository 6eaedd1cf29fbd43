"""PeerView, the bounded view behind MdnsDiscovery, driven without any network."""

from __future__ import annotations

import logging
from collections.abc import Callable
from ipaddress import IPv4Interface

import pytest
from meshmq.discovery import Advert, Sighting, encode_advert
from meshmq.discovery._view import PeerView

LAN = [IPv4Interface("10.213.0.1/24")]
SELF = "ffffffffffffffff"


class Log:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []  # (kind, node_id, offers)

    def cb(self, kind: str) -> Callable[[Sighting], None]:
        def record(s: Sighting) -> None:
            self.calls.append((kind, s.advert.node_id, s.advert.offers))

        return record


def make(max_peers: int = 10, with_update: bool = True) -> tuple[PeerView, Log]:
    log = Log()
    view = PeerView(
        "g",
        max_peers,
        on_join=log.cb("join"),
        on_leave=log.cb("leave"),
        on_update=log.cb("update") if with_update else None,
    )
    view.self_id = SELF
    view.networks = LAN
    return view, log


def txt(node_id: str, group: str = "g", offers: str = "") -> dict[bytes, bytes | None]:
    return dict(encode_advert(Advert(1, "n", node_id, group, 7000, offers)))


A, B, C = "a" * 16, "b" * 16, "c" * 16


def test_join_update_leave() -> None:
    view, log = make()
    view.resolved("k1", "n-aaaaaaaa", txt(A), ["192.168.1.1", "10.213.0.9"])
    view.resolved("k1", "n-aaaaaaaa", txt(A), ["192.168.1.1", "10.213.0.9"])  # no change
    view.resolved("k1", "n-aaaaaaaa", txt(A, offers="t:x"), ["10.213.0.9"])
    assert view.sightings()[0].addresses == ("10.213.0.9",)
    view.removed("k1")
    assert log.calls == [("join", A, ""), ("update", A, "t:x"), ("leave", A, "t:x")]
    stats = view.stats()
    assert (stats["found"], stats["updated"], stats["removed"], stats["peers"]) == (1, 1, 1, 0)


def test_updates_go_to_on_join_without_on_update() -> None:
    view, log = make(with_update=False)
    view.resolved("k1", "i", txt(A), ["10.213.0.9"])
    view.resolved("k1", "i", txt(A, offers="t:x"), ["10.213.0.9"])
    assert log.calls == [("join", A, ""), ("join", A, "t:x")]


def test_rejections_are_counted_and_a_peer_that_turns_bad_leaves() -> None:
    view, log = make()
    view.resolved("self", "i", txt(SELF), ["10.213.0.1"])
    view.resolved("other", "i", txt(B, group="h"), ["10.213.0.2"])
    view.resolved("junk", "i", {b"x": b"y"}, ["10.213.0.3"])
    view.resolved("lo", "i", txt(C), ["127.0.0.1"])  # a LAN node never dials 127.0.0.1
    view.resolved("k1", "i", txt(A), ["10.213.0.9"])
    view.resolved("k1", "i", {b"proto": b"1"}, ["10.213.0.9"])
    stats = view.stats()
    assert (stats["ignored_self"], stats["ignored_other_group"]) == (1, 1)
    assert (stats["ignored_garbage"], stats["ignored_unreachable"]) == (2, 1)
    assert log.calls == [("join", A, ""), ("leave", A, "")]
    assert view.sightings() == []


def test_new_node_id_under_the_same_name_is_a_new_incarnation() -> None:
    view, log = make()
    view.resolved("k1", "i", txt(A), ["10.213.0.9"])
    view.resolved("k1", "i", txt(B), ["10.213.0.9"])
    assert log.calls == [("join", A, ""), ("leave", A, ""), ("join", B, "")]


def test_a_node_id_claimed_twice_keeps_the_first() -> None:
    view, log = make()
    view.resolved("k1", "i", txt(A), ["10.213.0.9"])
    view.resolved("k2", "j", txt(A), ["10.213.0.8"])
    assert [s.instance for s in view.sightings()] == ["i"]
    assert view.stats()["ignored_garbage"] == 1


def test_bounded_view_defers_and_settles() -> None:
    view, log = make(max_peers=1)
    view.resolved("k1", "i", txt(A), ["10.213.0.9"])
    view.resolved("k2", "j", txt(B), ["10.213.0.8"])
    view.resolved("k3", "k", txt(C), ["10.213.0.7"])
    assert view.stats()["view_full"] == 2
    view.removed("k2")  # a deferred peer that left is never admitted
    view.removed("k1")
    view.settle()
    assert [c[:2] for c in log.calls] == [("join", A), ("leave", A), ("join", C)]


def test_closed_view_fires_nothing_and_stays_empty() -> None:
    view, log = make()
    view.resolved("k1", "i", txt(A), ["10.213.0.9"])
    view.close()
    view.resolved("k2", "j", txt(B), ["10.213.0.8"])
    view.removed("k1")
    assert view.sightings() == []
    assert log.calls == [("join", A, "")]


def test_a_failing_callback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def boom(s: Sighting) -> None:
        raise ValueError("boom")

    view = PeerView("g", 10, on_join=boom)
    view.networks = LAN
    with caplog.at_level(logging.ERROR, logger="meshmq.discovery"):
        view.resolved("k1", "i", txt(A), ["10.213.0.9"])
    assert "boom" in caplog.text
    assert len(view.sightings()) == 1
