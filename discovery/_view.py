"""The bounded view of a group's peers, fed by resolutions and removals (sans-IO).

One thread feeds a ``PeerView`` (MdnsDiscovery's dispatcher); it keeps the view, counts
what it ignores and calls on_join / on_update / on_leave on that same thread. Other
threads may read ``sightings()`` and ``stats()`` at any time.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Interface

from meshmq.discovery._net import order_addresses
from meshmq.discovery._txt import Advert, decode_advert

from meshmq._errors import DecodeError

__all__ = ["STAT_KEYS", "Callback", "PeerView", "Sighting"]

log = logging.getLogger("meshmq.discovery")

STAT_KEYS = (
    "found",  # peers that joined the view
    "updated",  # TXT or address changes of peers in the view
    "removed",  # peers that left the view (goodbye, expiry, or turned invalid)
    "ignored_garbage",  # resolutions whose TXT did not decode, or that reused a node_id
    "ignored_other_group",  # resolutions of nodes in another group
    "ignored_self",  # resolutions of our own advert
    "ignored_unreachable",  # resolutions without a usable IPv4 address
    "view_full",  # valid peers kept out because max_peers was reached
    "unresolved",  # services whose SRV/TXT/A did not all arrive in time
    "ignored_stale",  # announcements of a service in the seconds after its goodbye
    "dropped",  # services not even resolved because too many were waiting
)


@dataclass(frozen=True, slots=True)
class Sighting:
    """A peer as seen through mDNS: its advert, IPv4 addresses (best first) and instance name."""

    advert: Advert
    addresses: tuple[str, ...]
    instance: str

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Return ``tcp://address:port`` of the control port for each address, best first."""
        return tuple(f"tcp://{address}:{self.advert.port}" for address in self.addresses)


Callback = Callable[[Sighting], None]


class PeerView:
    """Peers of one group (None: any group) keyed by service name, at most max_peers; the rest wait."""

    def __init__(
        self,
        group: str | None,
        max_peers: int,
        on_join: Callback | None = None,
        on_leave: Callback | None = None,
        on_update: Callback | None = None,
    ) -> None:
        self.group = group
        self.max_peers = max_peers
        self.self_id = ""  # our node id, set before the first event
        self.networks: Sequence[IPv4Interface] = ()  # ours, to order peer addresses
        self._on_join = on_join
        self._on_leave = on_leave
        # Without on_update, updates go to on_join: it must be idempotent by node_id.
        self._on_update = on_update or on_join
        self._lock = threading.Lock()  # guards _view and _stats (read by other threads)
        self._view: dict[str, Sighting] = {}
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._deferred: OrderedDict[str, Sighting] = OrderedDict()  # valid, view was full
        self._ids: dict[str, str] = {}  # node_id -> key, one instance per node id
        self._closed = False

    def sightings(self) -> list[Sighting]:
        """Return the peers in the view, in join order (any thread)."""
        with self._lock:
            return list(self._view.values())

    def stats(self) -> dict[str, int]:
        """Return the counters of STAT_KEYS plus ``peers``, the view size (any thread)."""
        with self._lock:
            return {**self._stats, "peers": len(self._view)}

    def count(self, stat: str) -> None:
        """Add one to a counter (any thread)."""
        with self._lock:
            self._stats[stat] += 1

    def close(self) -> None:
        """Fire no more callbacks, accept no more peers and empty the view (any thread)."""
        with self._lock:
            self._closed = True
            self._view.clear()

    def resolved(
        self, key: str, instance: str, props: Mapping[bytes, bytes | None], addresses: Sequence[str]
    ) -> None:
        """Admit, update or reject the service key from its TXT properties and A records."""
        if self._closed:
            return
        try:
            advert = decode_advert(props)
        except DecodeError as exc:
            log.debug("ignoring %s: %s", instance, exc)
            self._reject(key, "ignored_garbage")
            return
        if advert.node_id == self.self_id:
            self.count("ignored_self")
            return
        if self.group is not None and advert.group != self.group:
            self._reject(key, "ignored_other_group")
            return
        ordered = order_addresses(addresses, self.networks)
        if not ordered:
            self._reject(key, "ignored_unreachable")
            return
        sighting = Sighting(advert, ordered, instance)
        with self._lock:
            old = self._view.get(key)
        if old is not None and old.advert.node_id == advert.node_id:
            if old != sighting and self._put(key, sighting, "updated"):
                self._fire(self._on_update, sighting)
            return
        if old is not None:  # same service name, new node id: a new incarnation
            self._drop(key)
        owner = self._ids.get(advert.node_id)
        if owner is not None and owner != key:
            # Two services claiming one node id (a copy, or a hostile peer): first wins.
            self._reject(key, "ignored_garbage")
            return
        with self._lock:
            full = len(self._view) >= self.max_peers
        if not full:
            self._deferred.pop(key, None)
            self._admit(key, sighting)
            return
        self._deferred[key] = sighting
        self._deferred.move_to_end(key)
        while len(self._deferred) > self.max_peers:
            self._deferred.popitem(last=False)
        self.count("view_full")

    def removed(self, key: str) -> None:
        """The service key is gone (goodbye or expiry): leave if it was in the view."""
        if self._closed:
            return
        self._deferred.pop(key, None)
        self._drop(key)

    def settle(self) -> None:
        """Admit deferred peers while there is room; call when no event is pending."""
        while self._deferred and not self._closed:
            with self._lock:
                if len(self._view) >= self.max_peers:
                    return
            key, sighting = self._deferred.popitem(last=False)
            if sighting.advert.node_id not in self._ids:
                self._admit(key, sighting)

    def _admit(self, key: str, sighting: Sighting) -> None:
        if self._put(key, sighting, "found"):
            self._ids[sighting.advert.node_id] = key
            self._fire(self._on_join, sighting)

    def _put(self, key: str, sighting: Sighting, stat: str) -> bool:
        """Store a sighting and count it, unless closed (checked under the lock close() takes)."""
        with self._lock:
            if self._closed:
                return False
            self._view[key] = sighting
            self._stats[stat] += 1
            return True

    def _reject(self, key: str, stat: str) -> None:
        """Count a rejected resolution; a peer of the view that turned invalid leaves it."""
        self.count(stat)
        self._deferred.pop(key, None)
        self._drop(key)

    def _drop(self, key: str) -> None:
        with self._lock:
            old = self._view.pop(key, None)
            if old is not None:
                self._stats["removed"] += 1
        if old is not None:
            self._ids.pop(old.advert.node_id, None)
            self._fire(self._on_leave, old)

    def _fire(self, callback: Callback | None, sighting: Sighting) -> None:
        if callback is None or self._closed:
            return
        try:
            callback(sighting)
        except Exception:
            log.exception("discovery callback %r failed", callback)
