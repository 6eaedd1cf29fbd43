"""Glue between a Node and mDNS discovery (meshmq.discovery), imported only when mDNS is used."""

from __future__ import annotations

from typing import Any

__all__ = ["default_host", "start_discovery"]


def default_host(interfaces: list[str] | None) -> str:
    """The address a node with mDNS discovery binds when no ``host`` was given."""
    from meshmq.discovery._mesh import default_host as choose

    return choose(interfaces)


def start_discovery(node: Any) -> Any:
    """Advertise ``node`` and dial the peers found. Returns an object with ``stop()``."""
    from meshmq.discovery._mesh import NodeDiscovery

    discovery = NodeDiscovery(node)
    try:
        return discovery.start()
    except BaseException:
        discovery.stop()
        raise
