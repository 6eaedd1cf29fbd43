"""MdnsDiscovery: find the meshmq nodes of one group with mDNS / DNS-SD (RFC 6762, RFC 6763).

Threads: python-zeroconf runs its own asyncio loop thread; everything that touches
zeroconf (browsing, resolving, registering) runs there and never blocks. Resolved
services are handed to one dispatcher thread owned by this class, which keeps the view
and calls on_join / on_update / on_leave. A slow callback therefore delays only later
callbacks, never mDNS itself, and callbacks never run concurrently with each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Interface
from typing import Any, TypeVar

from meshmq.discovery._net import (
    default_bind_addresses,
    local_networks,
    resolve_interfaces,
)
from meshmq.discovery._txt import (
    MAX_GROUP_BYTES,
    Advert,
    _text_problem,
    encode_advert,
)
from meshmq.discovery._view import Callback, PeerView, Sighting
from zeroconf import (
    DNSQuestionType,
    InterfaceChoice,
    IPVersion,
    ServiceInfo,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo

from meshmq._errors import ConfigError, MeshTimeout, NodeClosed

__all__ = ["SERVICE_TYPE", "MdnsDiscovery", "instance_label"]

log = logging.getLogger("meshmq.discovery")

SERVICE_TYPE = "_meshmq._tcp.local."
"""The DNS-SD service type of meshmq nodes (RFC 6763 §7)."""

# Resolutions in flight at once; more wait in a bounded queue (a flood of PTRs must
# not turn into an unbounded number of tasks).
_MAX_INFLIGHT = 64
_RESOLVE_TIMEOUT_MS = 3000
# Bounds on blocking calls into zeroconf's loop from start()/update()/stop().
_CALL_TIMEOUT = 10.0
_STOP_TIMEOUT = 3.0
# RFC 1035 §2.3.4 / RFC 6763 §4.1.1: an instance label is at most 63 bytes.
_MAX_LABEL_BYTES = 63
# A responder may send an answer it queued (20-120 ms of aggregation, RFC 6762 §6, or a
# second and more under the §14 rate limit) after its goodbye. python-zeroconf then sees the
# service added again, with a TTL of 75 min, and no later goodbye removes it. Announcements of
# a service this soon after its goodbye are such leftovers: ignore them. (Our instance
# names carry the node id, and a node never registers twice, so nothing real is lost.)
_GOODBYE_QUARANTINE = 3.0

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Resolved:
    key: str
    name: str
    props: dict[bytes, bytes | None]
    addresses: list[str]


@dataclass(frozen=True, slots=True)
class _Removed:
    key: str


def instance_label(advert: Advert) -> str:
    """Return the DNS-SD instance label of an advert: ``{name}-{node_id[:8]}``, at most 63 bytes."""
    suffix = f"-{advert.node_id[:8]}"
    # Dots would read as label separators to other DNS-SD software; replace them.
    base = advert.name.replace(".", "-").encode()[: _MAX_LABEL_BYTES - len(suffix)]
    return base.decode("utf-8", "ignore") + suffix


class MdnsDiscovery:
    """Advertise one node and track the other nodes of its group on the chosen interfaces.

    on_join(s) fires once a peer is resolved (TXT and addresses); on_update(s) when its
    TXT or addresses change (if on_update is None, on_join fires again, so on_join must
    be idempotent by ``s.advert.node_id``); on_leave(s) when it sends its mDNS goodbye
    or its records expire. All three run on one dispatcher thread, one at a time.
    """

    def __init__(
        self,
        interfaces: str | Sequence[str] | None = None,
        group: str | None = "default",
        *,
        on_join: Callback | None = None,
        on_leave: Callback | None = None,
        on_update: Callback | None = None,
        max_peers: int = 1024,
        probe: bool = False,
    ) -> None:
        """Check arguments (ConfigError); nothing touches the network before start().

        ``group=None`` sees the nodes of every group; it is for browsing (``start(None)``) only.
        """
        self._interfaces = resolve_interfaces(interfaces)
        if group is not None:
            problem = _text_problem("group", group, MAX_GROUP_BYTES, empty_ok=False)
            if problem is not None:
                raise ConfigError(problem)
        if type(max_peers) is not int or max_peers < 1:
            raise ConfigError(f"max_peers must be a positive int, got {max_peers!r}")
        self.group = group
        self._max_peers = max_peers
        # RFC 6762 §8.1 probing costs ~1.2 s before the first announcement. Our instance
        # and host names carry 32+ random bits of the node id, so by default we skip it
        # (python-zeroconf's "cooperating responders") and announce at once.
        self._probe = probe

        self._life = threading.Lock()  # serializes start / update / stop
        self._state = "new"  # new -> running -> stopped
        self._view = PeerView(group, max_peers, on_join, on_leave, on_update)
        self._networks: list[IPv4Interface] = []
        self._advert: Advert | None = None
        self._info: ServiceInfo | None = None
        self._zc: Zeroconf | None = None
        self._events: queue.SimpleQueue[_Resolved | _Removed | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        # Loop-thread state.
        self._browser: AsyncServiceBrowser | None = None
        self._announce: asyncio.Future[Any] | None = None
        self._registered = False
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._dirty: dict[str, str] = {}  # changed again while being resolved
        self._waiting: OrderedDict[str, str] = OrderedDict()
        self._goodbyes: OrderedDict[str, float] = OrderedDict()  # key -> when it said goodbye
        self._closing = False

    # ----------------------------------------------------------------- public API

    @property
    def interfaces(self) -> list[str] | str:
        """Return the interface choice: a list of IPv4 addresses, or "all"."""
        return self._interfaces

    def start(self, advert: Advert | None, bind_addresses: Sequence[str] | None = None) -> None:
        """Register our service (A records: bind_addresses, default the chosen interfaces) and browse.

        With ``advert=None`` only browse: nothing is registered, so nobody sees us (the CLI).
        """
        with self._life:
            if self._state != "new":
                raise NodeClosed(f"MdnsDiscovery is {self._state}; it can be started once")
            if advert is not None and not isinstance(advert, Advert):
                raise ConfigError(f"advert must be an Advert, got {type(advert).__name__}")
            if advert is not None and advert.group != self.group:
                raise ConfigError(f"advert group {advert.group!r} is not {self.group!r}")
            self._networks = local_networks(self._interfaces)
            if not self._networks:
                raise ConfigError("no IPv4 interface to run mDNS on")
            self._view.networks = self._networks
            if advert is not None:
                addresses = _check_bind(bind_addresses, self._networks)
                self._advert = advert
                self._view.self_id = advert.node_id
                self._info = ServiceInfo(
                    SERVICE_TYPE,
                    f"{instance_label(advert)}.{SERVICE_TYPE}",
                    port=advert.port,
                    properties=encode_advert(advert),
                    server=f"meshmq-{advert.node_id[:16]}.local.",
                    parsed_addresses=addresses,
                )
            try:
                self._zc = Zeroconf(
                    interfaces=(
                        InterfaceChoice.All if self._interfaces == "all" else list(self._interfaces)
                    ),
                    ip_version=IPVersion.V4Only,
                    use_asyncio=False,  # own loop thread even if the caller runs asyncio
                )
                self._dispatcher = threading.Thread(
                    target=self._dispatch, name="meshmq-discovery", daemon=True
                )
                self._dispatcher.start()
                self._call(self._async_start(self._info), _CALL_TIMEOUT)
            except BaseException:
                self._shutdown()
                self._state = "stopped"
                raise
            self._state = "running"

    def update(self, advert: Advert) -> None:
        """Publish a new TXT (e.g. offers changed); node_id and group must stay the same."""
        with self._life:
            if self._state != "running":
                raise NodeClosed(f"MdnsDiscovery is {self._state}, not running")
            if self._info is None or self._advert is None:
                raise ConfigError("this MdnsDiscovery only browses; it has no advert to update")
            if not isinstance(advert, Advert):
                raise ConfigError(f"advert must be an Advert, got {type(advert).__name__}")
            if advert.node_id != self._advert.node_id or advert.group != self._advert.group:
                raise ConfigError("update() cannot change node_id or group; start a new instance")
            old = self._info
            info = ServiceInfo(
                SERVICE_TYPE,
                old.name,  # as registered (probing may have renamed it)
                port=advert.port,
                properties=encode_advert(advert),
                server=old.server,
                parsed_addresses=old.parsed_addresses(IPVersion.V4Only),
            )
            self._call(self._async_update(info), _CALL_TIMEOUT)
            self._info = info
            self._advert = advert

    @property
    def advert(self) -> Advert | None:
        """Return what we advertise now (None before start() or when only browsing)."""
        return self._advert

    def sightings(self) -> list[Sighting]:
        """Return the current view: the resolved peers of our group, in join order."""
        return self._view.sightings()

    def stats(self) -> dict[str, int]:
        """Return event counters (see STAT_KEYS) and ``peers``, the current view size."""
        return self._view.stats()

    def stop(self) -> None:
        """Send the mDNS goodbye, stop browsing and close zeroconf; idempotent, bounded in time."""
        with self._life:
            if self._state == "running":
                self._shutdown()
            self._state = "stopped"

    def __enter__(self) -> MdnsDiscovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------- lifecycle helpers

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float) -> _T:
        """Run a coroutine on zeroconf's loop and wait for it; MeshTimeout past timeout."""
        assert self._zc is not None and self._zc.loop is not None
        future = asyncio.run_coroutine_threadsafe(coro, self._zc.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise MeshTimeout(f"zeroconf did not answer within {timeout} s") from exc

    def _shutdown(self) -> None:
        """Withdraw, close zeroconf and stop the dispatcher, swallowing (logging) errors."""
        # From here on no callback fires, even for events already queued.
        self._closing = True
        self._view.close()
        zc = self._zc
        if zc is not None:
            try:
                if zc.loop is not None and zc.loop.is_running():
                    self._call(self._async_stop(), _STOP_TIMEOUT)
            except Exception:
                log.exception("error while withdrawing the mDNS advert")
            try:
                zc.close()
            except Exception:
                log.exception("error while closing zeroconf")
            self._zc = None
        dispatcher = self._dispatcher
        if dispatcher is not None:
            self._events.put(None)
            # stop() may be called from a callback, i.e. from the dispatcher itself.
            if dispatcher is not threading.current_thread():
                dispatcher.join(_STOP_TIMEOUT)
        self._view.close()

    async def _async_start(self, info: ServiceInfo | None) -> None:
        """Browse first (so no announcement is missed), then register our service (if any)."""
        zc = self._zc
        assert zc is not None
        # QM questions: with several mDNS stacks on one host sharing port 5353, a unicast
        # (QU) reply reaches only one of them (RFC 6762 §5.4, §15.1), so ask for multicast.
        self._browser = AsyncServiceBrowser(
            zc, [SERVICE_TYPE], handlers=[self._on_change], question_type=DNSQuestionType.QM
        )
        if info is None:
            return
        # Returns once registered; the three announcements (RFC 6762 §8.3) go on in a task.
        self._announce = asyncio.ensure_future(
            await zc.async_register_service(
                info, allow_name_change=self._probe, cooperating_responders=not self._probe
            )
        )
        self._registered = True

    async def _async_update(self, info: ServiceInfo) -> None:
        """Replace the registered record set and re-announce it."""
        assert self._zc is not None
        # A pending announcement of the old record set would otherwise re-send the old TXT.
        if self._announce is not None:
            self._announce.cancel()
        self._announce = asyncio.ensure_future(await self._zc.async_update_service(info))

    async def _async_stop(self) -> None:
        """Cancel resolutions and browsing, then send the goodbye (RFC 6762 §10.1)."""
        self._closing = True
        if self._announce is not None:
            self._announce.cancel()
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self._dirty.clear()
        self._waiting.clear()
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        if self._zc is not None and self._info is not None and self._registered:
            self._registered = False
            goodbyes = await self._zc.async_unregister_service(self._info)
            await goodbyes

    # ------------------------------------------------- zeroconf loop thread: resolving

    def _on_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Browser handler, on zeroconf's loop: start a resolution or report a removal."""
        key = name.lower()  # DNS names compare case-insensitively (RFC 6762 §16)
        if state_change is ServiceStateChange.Removed:
            task = self._inflight.pop(key, None)
            if task is not None:
                task.cancel()
            self._dirty.pop(key, None)
            self._waiting.pop(key, None)
            self._goodbyes[key] = time.monotonic()
            self._goodbyes.move_to_end(key)
            while len(self._goodbyes) > self._max_peers:
                self._goodbyes.popitem(last=False)
            self._events.put(_Removed(key))
        else:
            gone = self._goodbyes.pop(key, None)
            if gone is not None and time.monotonic() - gone < _GOODBYE_QUARANTINE:
                self._goodbyes[key] = gone
                self._view.count("ignored_stale")
                return
            self._want(key, name)

    def _want(self, key: str, name: str) -> None:
        """Resolve name now, after its current resolution, or when a slot frees."""
        if self._closing:
            return
        if key in self._inflight:
            self._dirty[key] = name
            return
        if len(self._inflight) >= _MAX_INFLIGHT:
            self._waiting[key] = name
            self._waiting.move_to_end(key)
            while len(self._waiting) > self._max_peers:
                self._waiting.popitem(last=False)
                self._view.count("dropped")
            return
        task = asyncio.get_running_loop().create_task(self._resolve(key, name))
        self._inflight[key] = task
        task.add_done_callback(partial(self._resolved, key))

    async def _resolve(self, key: str, name: str) -> None:
        """Fetch SRV, TXT and A (from the cache when the announcement carried them)."""
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        found = await info.async_request(
            self._zc, _RESOLVE_TIMEOUT_MS, question_type=DNSQuestionType.QM
        )
        if self._inflight.get(key) is not asyncio.current_task():
            # Removed (goodbye) while resolving: zeroconf may finish a cancelled request from
            # its cache all the same, and that stale result must not bring the service back.
            return
        if found:
            addresses = info.parsed_addresses(IPVersion.V4Only)
            self._events.put(_Resolved(key, name, dict(info.properties), addresses))
        else:
            self._view.count("unresolved")

    def _resolved(self, key: str, task: asyncio.Task[None]) -> None:
        """Done callback of a resolution: log failures, then run what waited for the slot."""
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("resolving %s failed", key, exc_info=exc)
        name = self._dirty.pop(key, None)
        if name is not None:
            self._want(key, name)
        while self._waiting and len(self._inflight) < _MAX_INFLIGHT and not self._closing:
            waiting_key, waiting_name = self._waiting.popitem(last=False)
            self._want(waiting_key, waiting_name)

    # --------------------------------------------------------- dispatcher thread

    def _dispatch(self) -> None:
        """Dispatcher thread: apply resolutions and removals in order (callbacks fire here)."""
        view = self._view
        while True:
            event = self._events.get()
            if event is None:
                return
            try:
                if isinstance(event, _Removed):
                    view.removed(event.key)
                else:
                    instance = event.name
                    if instance.lower().endswith("." + SERVICE_TYPE):
                        instance = instance[: -len(SERVICE_TYPE) - 1]
                    view.resolved(event.key, instance, event.props, event.addresses)
                # Admit deferred peers only once the backlog is drained: a burst of
                # goodbyes would otherwise promote peers that are about to leave too.
                if self._events.empty():
                    view.settle()
            except Exception:
                log.exception("discovery dispatcher failed on %r", event)


def _check_bind(
    bind_addresses: Sequence[str] | None, networks: Sequence[IPv4Interface]
) -> list[str]:
    """Return the IPv4 addresses to publish in our A records; ConfigError if unusable."""
    if bind_addresses is None:
        return default_bind_addresses(networks)
    if isinstance(bind_addresses, str):
        bind_addresses = [bind_addresses]
    result: list[str] = []
    for text in bind_addresses:
        try:
            address = IPv4Address(text)
        except ValueError as exc:
            raise ConfigError(f"bind address {text!r} is not an IPv4 address") from exc
        if address.is_unspecified or address.is_multicast:
            # 0.0.0.0 means "every interface" to a socket but nothing to a peer.
            raise ConfigError(f"bind address {text!r} cannot be dialled; pass None or real ones")
        if str(address) not in result:
            result.append(str(address))
    if not result:
        raise ConfigError("bind_addresses is empty")
    return result
