"""NodeDiscovery: advertise a running Node over mDNS and dial the peers of its group it finds.

mDNS only says who is there and where to dial; the meshmq handshake makes a peer and
heartbeats say when it is gone. This module decides when to dial:

* Peering is symmetric, so one dial per pair is enough, and the first to see the other
  should dial: a running node sees a newcomer at once (its announcement), while the
  newcomer learns of running nodes from answers to its query, which a responder that
  multicast its records less than a second ago delays by a second (RFC 6762 §14). So the
  node with the smaller id dials at once, and the other ``fallback`` seconds after it first
  saw the peer if the pair is still apart by then. Both dial only if the handshake takes
  longer than that: harmless, the two connections make one peer.
* A node id that was on the mesh and left it (BYE, heartbeat timeout) is not dialled again
  from its lingering mDNS record (a SIGKILLed node's PTR lives for its TTL, 75 min). A new
  incarnation has a new id and is dialled; a changed record (a live responder) is too; a
  link we dialled earlier keeps saying hello, so a partition heals by itself.
* The peer's mDNS goodbye (or the expiry of its record) drops it from the mesh at once and
  closes the link we dialled to it.
* Offers (subscriptions, queues, services) are re-summarised every ``rescan`` seconds and
  the TXT record updated when the summary changed, so a burst of new handlers costs one
  announcement.

Threads: MdnsDiscovery's dispatcher calls ``_seen``/``_gone``; one rescan thread owned here
handles fallback dials and offer updates; the node's event thread calls ``_joined``.
"""

from __future__ import annotations

import logging
import threading
import time
from ipaddress import IPv4Address
from typing import Any

from meshmq.discovery._mdns import MdnsDiscovery
from meshmq.discovery._net import Interfaces, local_networks, resolve_interfaces
from meshmq.discovery._txt import MAX_NAME_BYTES, PROTO_VERSION, Advert, summarize_offers
from meshmq.discovery._view import Sighting

from meshmq._errors import ConfigError
from meshmq._peers import PeerInfo
from meshmq._zmqio import WILDCARD_HOSTS, split_endpoint

__all__ = ["MESH_STAT_KEYS", "NodeDiscovery", "default_host"]

log = logging.getLogger("meshmq.discovery")

MESH_STAT_KEYS = (
    "dials",  # peers this node dialled because mDNS showed them
    "fallback_dials",  # of those, peers with the smaller id that had not dialled us in time
    "lingering",  # records in view of nodes that left the mesh (not dialled again)
    "withdrawn",  # peers whose mDNS record went away (goodbye or expiry): dropped at once
    "txt_updates",  # times our TXT record was re-published because our offers changed
    "rescans",  # passes of the rescan thread (tests wait on it)
)


def default_host(interfaces: str | list[str] | None) -> str:
    """Return the address a node with mDNS discovery binds when no ``host`` is given.

    One chosen interface: its address. Several, or "all": 0.0.0.0, and peers dial the
    address they found us on (the handshake rewrites the wildcard to the connection's peer
    address). Loopback only when discovery runs on loopback only.
    """
    chosen = resolve_interfaces(interfaces)
    return chosen[0] if chosen != "all" and len(chosen) == 1 else "0.0.0.0"


def bind_addresses(host: str, chosen: Interfaces) -> list[str] | None:
    """Return the A records to publish for a node bound on ``host``; None: every chosen address.

    Raise ConfigError for a node bound on loopback while mDNS runs on a LAN interface: it
    would be advertised on the LAN and unreachable from it.
    """
    if host in WILDCARD_HOSTS:
        return None
    try:
        address = IPv4Address(host)
    except ValueError as exc:
        raise ConfigError(f"node host {host!r} is not an IPv4 address; mDNS needs one") from exc
    if address.is_loopback:
        lan = [str(n.ip) for n in local_networks(chosen) if not n.ip.is_loopback]
        if lan:
            raise ConfigError(
                f"node binds {host}, but mDNS discovery runs on {', '.join(lan)}: peers there "
                "could not reach it. Leave host unset (it then follows the interfaces), or set "
                "interfaces=['127.0.0.1'] / MESHMQ_INTERFACES=127.0.0.1 for one host only."
            )
    return [str(address)]


def offers_summary(node: Any) -> str:
    """Return the TXT ``offers`` summary of a node: ``t:<pattern>``, ``q:<queue>``, ``s:<service>``."""
    items = [f"t:{p}" for p in sorted(set(node._patterns()))]
    items += [f"q:{q}" for q in node._offers("worker")]
    items += [f"s:{s}" for s in node._offers("rpc")]
    return summarize_offers(items)


def _advert_name(name: str) -> str:
    """The node name cut to the TXT limit at a character boundary (the handshake has it whole)."""
    return name.encode()[:MAX_NAME_BYTES].decode("utf-8", "ignore")


class NodeDiscovery:
    """Advertise ``node`` (running) on mDNS and dial the peers of its group; ``stop()`` says goodbye."""

    def __init__(self, node: Any, *, rescan: float = 0.1, fallback: float = 0.05) -> None:
        self.node = node
        self.rescan = rescan
        self.fallback = fallback
        self._lock = threading.Lock()
        self._first_seen: dict[str, float] = {}  # node id -> when mDNS first showed it
        self._dialed: dict[str, str] = {}  # node id -> the endpoint we dialled
        self._met: set[str] = set()  # ids that joined the mesh (dialled no more by us)
        self._stats = dict.fromkeys(MESH_STAT_KEYS, 0)
        self._offers = ""
        self._stopping = threading.Event()
        self._wake = threading.Event()  # a fallback dial is due before the next rescan
        self._due = float("inf")  # when the earliest fallback dial is due
        self._thread: threading.Thread | None = None
        self.mdns = MdnsDiscovery(
            node.interfaces, node.group, on_join=self._seen, on_update=self._changed,
            on_leave=self._gone,
        )

    def start(self) -> NodeDiscovery:
        """Advertise the node and start dialling; ConfigError for an unreachable setup."""
        node = self.node
        bind = bind_addresses(node.host, self.mdns.interfaces)
        _, port = split_endpoint(node.address)
        self._offers = offers_summary(node)
        advert = Advert(PROTO_VERSION, _advert_name(node.name), node.id, node.group, port,
                        self._offers)
        node.on_peer_join(self._joined)
        self.mdns.start(advert, bind)
        self._thread = threading.Thread(target=self._run, name=f"meshmq-rescan-{node.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop dialling and send the mDNS goodbye (bounded in time); idempotent."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)
        self.mdns.stop()

    def sightings(self) -> list[Sighting]:
        """Return the nodes of our group that mDNS shows now (whether connected or not)."""
        return self.mdns.sightings()

    def stats(self) -> dict[str, int]:
        """Return MdnsDiscovery's counters (STAT_KEYS) and ours (MESH_STAT_KEYS)."""
        with self._lock:
            ours = dict(self._stats)
            ours["lingering"] = sum(1 for nid in self._first_seen
                                    if nid in self._met and not self._connected(nid))
        return {**self.mdns.stats(), **ours}

    # ---- callbacks -------------------------------------------------------------------------
    def _seen(self, s: Sighting) -> None:
        """mDNS dispatcher: a peer appeared."""
        with self._lock:
            self._first_seen.setdefault(s.advert.node_id, time.monotonic())
            self._consider(s, time.monotonic())

    def _changed(self, s: Sighting) -> None:
        """mDNS dispatcher: a peer's record changed, so it is alive: it may be dialled again."""
        with self._lock:
            nid = s.advert.node_id
            self._first_seen.setdefault(nid, time.monotonic())
            if not self._connected(nid):
                self._met.discard(nid)
            old = self._dialed.get(nid)
            if old is not None and old not in s.endpoints and not self._connected(nid):
                del self._dialed[nid]  # it moved: stop dialling the old endpoint
                self._forget(nid, old, drop=False)
            self._consider(s, time.monotonic())

    def _gone(self, s: Sighting) -> None:
        """mDNS dispatcher: a peer's record went away (goodbye or expiry): drop it now."""
        nid = s.advert.node_id
        with self._lock:
            self._first_seen.pop(nid, None)
            self._met.discard(nid)
            address = self._dialed.pop(nid, None)
            self._stats["withdrawn"] += 1
        self._forget(nid, address, drop=True)

    def _joined(self, info: PeerInfo) -> None:
        """Node event thread: a peer joined the mesh (whoever dialled)."""
        with self._lock:
            self._met.add(info.id)

    # ---- decisions -------------------------------------------------------------------------
    def _connected(self, nid: str) -> bool:
        engine = self.node.engine
        return engine is not None and nid in engine.peers

    def _consider(self, s: Sighting, now: float) -> None:
        """Dial the peer of a sighting if it is our turn (caller holds the lock)."""
        nid = s.advert.node_id
        if (nid in self._met or nid in self._dialed or not s.endpoints
                or not self.node.running or self._connected(nid)):
            return
        ours = self.node.id < nid
        due = self._first_seen.get(nid, now) + self.fallback
        if not ours and now < due:
            if due < self._due:
                self._due = due
                self._wake.set()
            return
        address = s.endpoints[0]
        self._dialed[nid] = address
        self._stats["dials"] += 1
        if not ours:
            self._stats["fallback_dials"] += 1
            log.info("%s did not dial us within %.1fs: dialling %s", s.advert.name,
                     self.fallback, address)
        self.node.connect(address)

    def _forget(self, nid: str, address: str | None, *, drop: bool) -> None:
        engine = self.node.engine
        if engine is not None and self.node.running:
            engine.forget(nid if drop else None, address)

    def _run(self) -> None:
        """Rescan thread: fallback dials when due, offer updates every ``rescan`` seconds."""
        next_rescan = time.monotonic() + self.rescan
        while not self._stopping.is_set():
            with self._lock:
                until = min(next_rescan, self._due)
            self._wake.wait(max(0.0, until - time.monotonic()))
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                if time.monotonic() >= next_rescan:
                    next_rescan = time.monotonic() + self.rescan
                    self._rescan()
                else:
                    self._dial_due()
            except Exception:  # noqa: BLE001 - discovery must outlive one bad pass
                log.exception("discovery rescan failed")

    def _dial_due(self) -> None:
        """Reconsider every peer in view (fallback dials that are due), and find the next due."""
        now = time.monotonic()
        with self._lock:
            self._due = float("inf")
            for s in self.mdns.sightings():
                self._consider(s, now)

    def _rescan(self) -> None:
        self._dial_due()
        summary = offers_summary(self.node)
        if summary != self._offers and not self._stopping.is_set():
            self._offers = summary
            old = self.mdns.advert
            if old is not None:
                self.mdns.update(Advert(old.proto, old.name, old.node_id, old.group, old.port,
                                        summary))
                with self._lock:
                    self._stats["txt_updates"] += 1
        with self._lock:
            self._stats["rescans"] += 1
