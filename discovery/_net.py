"""Interface choice and address ordering for mDNS discovery (pure, no sockets)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from typing import Literal

import ifaddr  # a dependency of python-zeroconf; used the same way zeroconf uses it

from meshmq._errors import ConfigError

__all__ = [
    "ENV_INTERFACES",
    "Interfaces",
    "default_bind_addresses",
    "local_networks",
    "order_addresses",
    "resolve_interfaces",
]

ENV_INTERFACES = "MESHMQ_INTERFACES"
"""Environment variable: comma-separated IPv4 addresses to run mDNS on, or "all"."""

Interfaces = list[str] | Literal["all"]
"""Where mDNS runs: a list of local IPv4 addresses, or "all" IPv4 interfaces."""


def resolve_interfaces(interfaces: str | Sequence[str] | None) -> Interfaces:
    """Return the interface choice: None reads MESHMQ_INTERFACES, else "all"; raise ConfigError if malformed."""
    if interfaces is None:
        interfaces = os.environ.get(ENV_INTERFACES, "").strip() or "all"
    if isinstance(interfaces, str):
        if interfaces.strip().lower() == "all":
            return "all"
        interfaces = [part for part in (p.strip() for p in interfaces.split(",")) if part]
    chosen: list[str] = []
    for item in interfaces:
        try:
            address = ipaddress.ip_address(item)
        except ValueError as exc:
            raise ConfigError(f"interface {item!r} is not an IP address") from exc
        if address.version != 4:
            # The advert's addresses are IPv4 (A records); IPv6 is not supported yet.
            raise ConfigError(f"interface {item!r} is not IPv4; only IPv4 is supported")
        if address.is_unspecified or address.is_multicast:
            raise ConfigError(f"interface {item!r} is not a unicast interface address")
        if str(address) not in chosen:
            chosen.append(str(address))
    if not chosen:
        raise ConfigError("no interface given; pass IPv4 addresses or 'all'")
    return chosen


def _host_ipv4() -> list[ipaddress.IPv4Interface]:
    """Return every IPv4 address of this host (or network namespace) with its prefix."""
    found: list[ipaddress.IPv4Interface] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and isinstance(ip.ip, str):
                found.append(ipaddress.IPv4Interface(f"{ip.ip}/{ip.network_prefix}"))
    return found


def local_networks(interfaces: Interfaces) -> list[ipaddress.IPv4Interface]:
    """Return the chosen interfaces with their prefixes; raise ConfigError for an address not on this host."""
    host = _host_ipv4()
    if interfaces == "all":
        return host
    by_ip = {str(i.ip): i for i in host}
    missing = [ip for ip in interfaces if ip not in by_ip]
    if missing:
        # zeroconf would only log and then send nothing at all on such an address.
        raise ConfigError(f"interface address(es) not on this host: {', '.join(missing)}")
    return [by_ip[ip] for ip in interfaces]


def default_bind_addresses(networks: Sequence[ipaddress.IPv4Interface]) -> list[str]:
    """Return the addresses to publish by default: the chosen ones, loopback only if nothing else."""
    # A remote host that dials our 127.0.0.1 dials itself, so loopback is published
    # only when it is all we run on (tests, single-host setups).
    outside = [str(n.ip) for n in networks if not n.ip.is_loopback]
    return outside or [str(n.ip) for n in networks]


def order_addresses(
    addresses: Iterable[str], networks: Sequence[ipaddress.IPv4Interface]
) -> tuple[str, ...]:
    """Return the dialable IPv4 addresses, those on the subnet of one of our networks first.

    Loopback addresses are kept only when we run on loopback alone: then the peer is
    on this host. Otherwise an advert may have come from another host, whose 127.0.0.1
    would be our own.
    """
    loopback_only = all(n.ip.is_loopback for n in networks)
    same: list[str] = []
    other: list[str] = []
    for text in addresses:
        try:
            address = ipaddress.IPv4Address(text)
        except ValueError:
            continue
        if address.is_unspecified or address.is_multicast or address == _BROADCAST:
            continue
        if address.is_loopback and not loopback_only:
            continue
        normal = str(address)
        if normal in same or normal in other:
            continue
        (same if any(address in n.network for n in networks) else other).append(normal)
    return (*same, *other)


_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
