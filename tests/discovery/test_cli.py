"""``meshmq nodes``: list and watch the nodes mDNS shows, as a table or JSON (loopback)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from meshmq import Node
from meshmq.testing import Collector, Script

NODES = [sys.executable, "-m", "meshmq.cli", "nodes"]


def test_nodes_json_lists_what_each_node_offers_and_does_not_advertise_itself(
    mdns_node: Callable[..., Node], group: str
) -> None:
    shop = mdns_node("shop", group, start=False)
    shop.subscribe("orders.*")(Collector())
    shop.rpc("stock.check")(lambda sku: 1)
    shop.start()
    other = mdns_node("elsewhere", group + "-2")
    # Not too short a browse: a responder that multicast its records less than a second ago
    # (to someone else) answers again only a second later (RFC 6762 §14, python-zeroconf).
    cli = Script([*NODES, "--json", "--timeout", "2.5", "--group", group])
    table = Script([*NODES, "--timeout", "2.5", "--all-groups"])
    try:
        assert cli.wait(15) == 0 and table.wait(15) == 0
    finally:
        cli.stop()
        table.stop()
    rows = json.loads("\n".join(cli.lines))
    assert [(r["name"], r["id"], r["group"]) for r in rows] == [("shop", shop.id, group)]
    assert rows[0]["address"] == shop.address
    assert rows[0]["offers"] == ["t:orders.*", "s:stock.check"]
    assert table.lines[0].split() == ["NAME", "ID", "GROUP", "ADDRESS", "OFFERS"]
    mine = sorted(ln.split()[:3] for ln in table.lines[1:] if group in ln)
    assert mine == [["elsewhere", other.id, group + "-2"], ["shop", shop.id, group]]
    # Browsing only: the commands never showed up as nodes of any group. (Each node saw the
    # other one's group at least; nodes of other test runs on this machine may add to it.)
    for node in (shop, other):
        stats = node._discovery.stats()
        assert stats["found"] == 0 and stats["ignored_other_group"] >= 1, stats


def test_nodes_watch_prints_joins_and_leaves(
    mdns_node: Callable[..., Node], group: str
) -> None:
    cli = Script([*NODES, "--watch", "--json", "--timeout", "8", "--group", group])
    try:
        cli.expect("watching", timeout=10)
        node = mdns_node("passing", group)
        joined: dict[str, Any] = json.loads(cli.expect('"join"', timeout=5))
        assert (joined["name"], joined["id"]) == ("passing", node.id)
        node.stop()
        left = json.loads(cli.expect('"leave"', timeout=5))
        assert left["id"] == node.id
    finally:
        assert cli.stop(2) == 0  # SIGINT: a clean exit
