"""Interface choice and address ordering (pure functions: no test here opens a socket).

Some inputs are addresses beyond loopback (the unspecified address, a documentation multicast
group, LAN addresses): they are only parsed, rejected or sorted, and the ``no_network`` fixture
fails any socket that would be opened, so nothing here can listen or multicast.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface

import pytest
from meshmq.discovery import ENV_INTERFACES, order_addresses, resolve_interfaces
from meshmq.discovery._net import default_bind_addresses, local_networks

from meshmq._errors import ConfigError

UNSPECIFIED = str(IPv4Address(0))   # what a socket reads as "every interface"
MCAST_TEST = "233.252.0.1"          # MCAST-TEST-NET (RFC 5771): a group for documentation


def test_none_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_INTERFACES, " 127.0.0.1 , 10.1.2.3,127.0.0.1")
    assert resolve_interfaces(None) == ["127.0.0.1", "10.1.2.3"]
    monkeypatch.setenv(ENV_INTERFACES, "all")
    assert resolve_interfaces(None) == "all"


@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_environment_means_all(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    if value is None:
        monkeypatch.delenv(ENV_INTERFACES, raising=False)
    else:
        monkeypatch.setenv(ENV_INTERFACES, value)
    assert resolve_interfaces(None) == "all"


def test_explicit_choices() -> None:
    assert resolve_interfaces(["127.0.0.1"]) == ["127.0.0.1"]
    assert resolve_interfaces("127.0.0.1,10.0.0.1") == ["127.0.0.1", "10.0.0.1"]
    assert resolve_interfaces("ALL") == "all"


@pytest.mark.parametrize("bad", [[], ",", ["eth0"], ["::1"], [UNSPECIFIED], [MCAST_TEST], "1.2.3"])
def test_bad_choices(bad: str | list[str], no_network: None) -> None:
    with pytest.raises(ConfigError):
        resolve_interfaces(bad)


def test_local_networks_knows_loopback_and_rejects_foreign_addresses() -> None:
    assert local_networks(["127.0.0.1"]) == [IPv4Interface("127.0.0.1/8")]
    with pytest.raises(ConfigError, match="not on this host"):
        local_networks(["203.0.113.77"])


def test_same_subnet_first_and_loopback_only_for_loopback_only_nodes(no_network: None) -> None:
    lan = [IPv4Interface("10.213.0.1/24")]
    advertised = ["192.168.9.9", "127.0.0.1", "10.213.0.2", UNSPECIFIED, MCAST_TEST, "junk"]
    assert order_addresses(advertised, lan) == ("10.213.0.2", "192.168.9.9")
    loop = [IPv4Interface("127.0.0.1/8")]
    assert order_addresses(advertised, loop) == ("127.0.0.1", "192.168.9.9", "10.213.0.2")
    # With a real interface too (e.g. "all"), an advert may come from another host.
    both = [*loop, *lan]
    assert order_addresses(["127.0.0.1", "10.9.9.9", "10.213.0.5", "10.213.0.5"], both) == (
        "10.213.0.5",
        "10.9.9.9",
    )


def test_default_bind_addresses_leave_out_loopback_when_there_is_more() -> None:
    nets = [IPv4Interface("127.0.0.1/8"), IPv4Interface("10.213.0.1/24")]
    assert default_bind_addresses(nets) == ["10.213.0.1"]
    assert default_bind_addresses(nets[:1]) == ["127.0.0.1"]
