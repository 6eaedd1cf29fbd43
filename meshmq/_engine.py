"""The I/O engine: one thread per node that owns the control plane and the receive path.

The thread polls the control ROUTER (peers dial it), one DEALER per address this node dials,
the SUB socket (messages from every peer's PUB), and a wake-up socket for commands from other
threads. Handlers never run here: decoded messages go to their runners in batches.

Publishing does not pass through this thread: the XPUB socket is shared with publishing threads
under ``pub_lock`` (ZeroMQ sockets may change threads behind a full memory barrier, which a lock
provides). This thread takes the same lock only to read the subscription notices that XPUB
delivers, which is how ``wait_for_subscribers`` knows a subscriber's filters are in place.

The control sockets (the ROUTER and the dialled DEALERs) are shared the same way, each under a
lock of its own (:class:`_Chan`): any thread may send a control message to a peer with
:meth:`Engine.send_to`, so an RPC call or reply leaves from the thread that made it instead of
waiting for this one. This thread polls their ``ZMQ_FD`` instead of the sockets; that
descriptor is edge-triggered (zmq_getsockopt(3), ZMQ_FD): any send or receive may consume the
notice of a message that arrived, so whoever sends reads ``ZMQ_EVENTS`` afterwards and, if a
message waits, has this thread drain the socket.
"""

from __future__ import annotations

import collections
import logging
import queue
import socket as _socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import zmq

from meshmq import _zmqio as zio
from meshmq._envelope import CtlKind, decode_ctl, decode_pub, encode_ctl
from meshmq._errors import DecodeError, ProtocolVersionError
from meshmq._message import Message, wire_message
from meshmq._peers import PeerInfo, parse_offer

if TYPE_CHECKING:
    from meshmq._node import Node

__all__ = ["Engine", "marker_topic"]

log = logging.getLogger("meshmq")

# Messages taken from SUB per wake-up, handed to runners as one batch. 256, not more: every
# Message is a GC-tracked object until its handler is done with it, and at 512 two batches
# waiting for the handler thread passed the gen-0 threshold (700) so often that the collector
# cost the subscriber ~0.4 us per message (measured with gc.callbacks); at 256 it rarely runs.
BURST = 256
_MARK = b"\xff"        # subscription-marker topics start with a byte UTF-8 never contains
_SV = struct.Struct(">I")


def marker_topic(node_id: str, version: int) -> bytes:
    """The topic a subscriber subscribes to after its filters, to show a publisher they are set.

    libzmq sends a SUB's subscriptions in byte order when it connects, so a 0xff-prefixed
    marker goes after every real filter; later changes are sent in the order they are made.
    """
    return _MARK + node_id.encode() + _SV.pack(version & 0xFFFFFFFF)


DEPARTED_MAX = 4096   # ids of peers that said bye, remembered (Engine._departed)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_NB = zio.NOBLOCK
_MORE_NB = zio.SNDMORE | zio.NOBLOCK
# The backend's send, without pyzmq's Python-level wrapper (which only adds routing_id/group
# handling we do not use): half the cost of a small send (PERF-NOTES).
_send_frame: Callable[..., Any] = zmq.backend.Socket.send


class _Chan:
    """A control socket shared between threads: every use of ``sock`` is under ``lock``.

    Senders never wait for the lock: they queue on ``out`` and whoever holds the lock sends
    the queue before letting go, and looks at it again after (see ``Engine._flush``).
    """

    __slots__ = ("closed", "fd", "kicked", "link", "lock", "out", "sock")

    def __init__(self, sock: zmq.Socket[Any], link: _Link | None) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.out: collections.deque[tuple[bytes | None, bytes]] = collections.deque()
        self.fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.link = link
        self.closed = False
        self.kicked = False   # a drain is due (set and cleared under lock)

    def close(self) -> None:
        with self.lock:
            if not self.closed:
                self.closed = True
                self.sock.close()


@dataclass
class _Link:
    """A connection this node dialled: a DEALER to a peer's control endpoint."""

    address: str
    chan: _Chan = field(repr=False)
    via_host: str
    peer_id: str | None = None
    next_hello: float = 0.0
    hello_delay: float = 0.005   # backs off to Timing.hello_interval while nobody answers


@dataclass
class _Peer:
    info: PeerInfo
    route: tuple[str, Any]          # ("out", address) or ("in", router identity)
    last_seen: float
    routes: set[tuple[str, Any]] = field(default_factory=set)


class Engine:
    """Owns the I/O thread. Created and started by :class:`meshmq.Node`."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.timing = node.timing
        self.cmds: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = _socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self.thread = threading.Thread(target=self._main, name=f"meshmq-io-{node.name}",
                                       daemon=True)
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.error: BaseException | None = None
        self.address = ""
        self._stopping = False
        # ids of peers that said bye (newest last, at most DEPARTED_MAX): node ids are never
        # reused, so a hello or welcome from one is a stray from the pair's other connection
        self._departed: dict[str, None] = {}
        self._links: dict[str, _Link] = {}
        self._chans: dict[int, _Chan] = {}      # by ZMQ_FD: the router and every link
        self._hot: list[_Chan] = []             # to drain again without waiting (I/O thread)
        self._io_ident = 0
        self._hello_due = 0.0                   # when _hello next has something to do
        #: control kinds handled straight from the I/O loop (set by patterns on start)
        self.ctl_handlers: dict[str, Callable[[dict[str, Any], str], None]] = {}
        self._subs: dict[str, zmq.Socket[Any]] = {}     # peer id -> SUB on its PUB
        self._sub_socks: set[zmq.Socket[Any]] = set()
        self._retiring: dict[zmq.Socket[Any], tuple[float, str]] = {}
        self.peers: dict[str, _Peer] = {}        # read by other threads under node.state_lock
        self.synced: dict[str, int] = {}          # node id -> marker version seen on our XPUB
        self._route_peer: dict[tuple[str, Any], str] = {}
        self._prefixes: dict[bytes, int] = {}
        self._marker: bytes | None = None
        self.sub_version = 0
        # The patterns whose filters are set by marker ``sub_version``: what offers advertise.
        # Not node._patterns(), which a user thread changes before this thread sets the filters:
        # an offer sent in between would pair the new pattern with the old version, and a
        # publisher's wait_for_subscribers would return before the filter is in place.
        self._sub_patterns: list[str] = []
        self._seqs: dict[str, dict[str, int]] = {}
        # counters written only by this thread
        self.received = 0
        self.malformed = 0
        self.bad_version = 0
        self.oversized = 0
        self.gaps = 0
        self.gaps_by_sender: dict[str, int] = {}
        self.peer_joins = 0
        self.peer_leaves = 0

    # ---- called from other threads -------------------------------------------------------
    def call(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the I/O thread soon (thread-safe; wake-ups are coalesced)."""
        self.cmds.put(fn)
        if not self._wake_pending:
            self._wake_pending = True
            try:
                self._wake_w.send(b"\x00")
            except (BlockingIOError, OSError):
                pass  # the buffer is full of wake-ups already, or we are closing

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float) -> None:
        if self.thread.is_alive():
            self.call(self._begin_stop)
            self.thread.join(timeout)
        self._wake_r.close()
        self._wake_w.close()

    # ---- the thread --------------------------------------------------------------------------
    def _main(self) -> None:
        node = self.node
        try:
            self._setup()
        except BaseException as exc:
            self.error = exc
            self.started.set()
            self._teardown()
            self.stopped.set()
            return
        self.started.set()
        try:
            self._loop()
        except BaseException as exc:  # a crash stops the node and is re-raised from run()
            log.exception("meshmq I/O thread of node %s crashed", node.name)
            self.error = exc
        finally:
            self._teardown()
            self.stopped.set()
            node._engine_exited()

    def _setup(self) -> None:
        node, t = self.node, self.timing
        ctx = node.ctx
        self._io_ident = threading.get_ident()
        # The control sockets carry calls and tasks as well as the control plane: give them the
        # node's high-water mark, not libzmq's 1000 (a burst of calls would be dropped).
        router = zio.new_socket(ctx, zmq.ROUTER, linger=t.linger,
                                max_bytes=2 * node.max_message_bytes, hwm=node.hwm)
        self.router = _Chan(router, None)
        router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        bound = zio.bind(router, node.host, node.port)
        _, port = zio.split_endpoint(bound)
        self.address = f"tcp://{zio.local_address(node.host)}:{port}"
        self.ctl_advertised = f"tcp://{node.host}:{port}"
        self.poller = zmq.Poller()
        self._chans[self.router.fd] = self.router
        self.poller.register(self.router.fd, zmq.POLLIN)
        self.poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._xpub_fd = node.xpub.getsockopt(zmq.FD)
        self.poller.register(self._xpub_fd, zmq.POLLIN)
        self._apply_subscriptions()
        for address in node.initial_peers:
            self._dial(address)

    def _teardown(self) -> None:
        for sock in [*self._subs.values(), *self._retiring]:
            sock.close()
        for chan in [*(lk.chan for lk in self._links.values()), getattr(self, "router", None)]:
            if chan is not None:
                chan.close()
        self._links.clear()
        self._chans.clear()
        self._subs.clear()
        self._retiring.clear()

    def _open_sub(self, pub: str) -> zmq.Socket[Any]:
        """A SUB socket for one peer's PUB, with every current filter set before it connects.

        One SUB per peer rather than one for all: when a peer leaves we close its socket whole.
        ``zmq_disconnect`` on a shared SUB can cut a pipe while another pipe's multipart
        message is half read, which trips libzmq's ``!_more`` assertion (fq.cpp) and aborts.
        """
        # libzmq resets a connection that sends a frame over ZMQ_MAXMSGSIZE without telling us;
        # set it above our own cap so frames between the two are seen, counted and dropped.
        sock = zio.new_socket(self.node.ctx, zmq.SUB, linger=0,
                              max_bytes=2 * self.node.max_message_bytes, hwm=self.node.hwm)
        for prefix in self._prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        if self._marker is not None:
            sock.setsockopt(zmq.SUBSCRIBE, self._marker)
        zio.connect(sock, pub)
        self.poller.register(sock, zmq.POLLIN)
        return sock

    def _close_sub(self, node_id: str, grace: float = 0.0) -> None:
        """Stop listening to a peer, after ``grace`` seconds of draining what is in flight."""
        sock = self._subs.pop(node_id, None)
        if sock is None:
            return
        if grace > 0:
            # A goodbye travels on the control connection and can overtake the peer's last
            # messages on its PUB connection: keep reading those for a moment.
            self._retiring[sock] = (time.monotonic() + grace, node_id)
            return
        self._discard_sub(sock)

    def _discard_sub(self, sock: zmq.Socket[Any]) -> None:
        self.poller.unregister(sock)
        sock.close()
        self._sub_socks.discard(sock)

    def _retire_subs(self, now: float) -> None:
        for sock, (deadline, node_id) in list(self._retiring.items()):
            if now >= deadline:
                del self._retiring[sock]
                self._discard_sub(sock)
                if node_id not in self.peers:
                    self._seqs.pop(node_id, None)

    def _loop(self) -> None:
        t = self.timing
        zpoll, items = zmq.zmq_poll, self.poller.sockets   # the Poller's own list, kept current
        wake, xfd = self._wake_r.fileno(), self._xpub_fd
        chans = self._chans
        next_beat = 0.0
        next_tick = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now >= next_tick:
                self._check_xpub()
                if self._retiring:
                    self._retire_subs(now)
                next_tick = now + t.tick
            if now >= next_beat:
                self._heartbeat(now)
                next_beat = now + t.heartbeat_interval / 2
            if now >= self._hello_due:
                self._hello_due = self._hello(now)
            if self._hot:
                timeout_ms = 0
            else:
                timeout = max(0.0, min(next_tick, next_beat, self._hello_due) - time.monotonic())
                timeout_ms = int(timeout * 1000) + 1
            for sock, _ in zpoll(items, timeout_ms):
                chan = chans.get(sock)
                if chan is not None:
                    self._drain(chan)
                elif sock in self._sub_socks:
                    self._on_sub(sock)
                elif sock == wake:
                    self._on_wake()
                elif sock == xfd:
                    self._check_xpub()
            if self._hot:
                hot, self._hot = self._hot, []
                for chan in hot:
                    self._drain(chan)

    def _on_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        self._wake_pending = False  # before draining: a command put after this wakes us again
        while True:
            try:
                fn = self.cmds.get_nowait()
            except queue.Empty:
                return
            fn()

    # ---- receive path (hot) ---------------------------------------------------------------
    def _on_sub(self, sub: zmq.Socket[Any]) -> None:
        # Per message this is the cost that matters (it bounds a subscriber's rate), so the
        # loop keeps lookups local and does per-message work only where it must.
        recv = sub.recv
        node = self.node
        seqs = self._seqs
        cap = node.max_message_bytes
        batches: dict[Any, list[Message]] = {}
        last_sid: str | None = None
        per: dict[str, int] = {}
        last_runners: tuple[Any, ...] = ()
        targets: list[list[Message]] = []
        n = 0
        suspect = False
        for _ in range(BURST):
            # The topic frame is read as bytes (~1.3 us cheaper than a zmq.Frame), which does not
            # say whether more frames follow (asking RCVMORE costs ~2 us): the payload frame
            # says it. A message's frames arrive together, so Again here means a lone frame.
            try:
                topic_b = recv(zio.NOBLOCK)
            except zmq.Again:
                break
            try:
                pf = recv(zio.NOBLOCK, copy=False)
            except zmq.Again:
                self.malformed += 1   # a one-frame message, the last one queued
                break
            while pf.more:
                # topic_b was not the first of exactly two frames: a one-frame message, or the
                # head of one of 3+ frames. Count it, and start over from this frame (which
                # may begin the next message; if it is the tail of this one, its failure to
                # decode is not counted again: `suspect`).
                self.malformed += 1
                suspect = True
                topic_b = pf.bytes
                pf = recv(zio.NOBLOCK, copy=False)
            # msgpack reads the frame through the buffer protocol: no copy into a bytes first
            # (~0.5 us a message at 1 KiB); what it decodes owns its own memory.
            payload: Any = pf
            if len(payload) > cap:
                if not suspect:
                    self.oversized += 1
                    self.malformed += 1
                suspect = False
                continue
            try:
                t, mid, source, sid, seq, ts, headers, body = decode_pub(topic_b, payload)
            except ProtocolVersionError:
                if not suspect:
                    self.bad_version += 1
                    self.malformed += 1
                suspect = False
                continue
            except DecodeError:
                if not suspect:   # the tail of a 3+ frame message counted already
                    self.malformed += 1
                suspect = False
                continue
            suspect = False
            n += 1
            if sid != last_sid:   # a burst mostly comes from one sender: look it up once
                last_sid = sid
                got = seqs.get(sid)
                if got is None:
                    got = seqs[sid] = {}
                per = got
            last = per.get(t)
            per[t] = seq
            gap = 0
            if last is not None and seq > last + 1:
                gap = seq - last - 1
                self.gaps += gap
                self.gaps_by_sender[source] = self.gaps_by_sender.get(source, 0) + gap
            runners = node._cache.get(t)   # node._route's own first step, without the call
            if runners is None:
                runners = node._route(t)
            if runners:
                if runners is not last_runners:   # the same topic's runners: the same lists
                    last_runners = runners
                    targets = [batches.setdefault(r, []) for r in runners]
                msg = wire_message(t, body, headers, mid, source, sid, seq, ts, gap)
                for b in targets:
                    b.append(msg)
        self.received += n
        for r, b in batches.items():
            r.submit(b)

    # ---- subscriptions --------------------------------------------------------------------
    def _apply_subscriptions(self) -> None:
        """Make the SUB filters match the node's patterns; bump the marker; tell peers."""
        patterns = sorted(set(self.node._patterns()))
        if self._marker is not None and patterns == self._sub_patterns:
            self._broadcast(CtlKind.UPDATE)
            return
        wanted = {self.node._prefix(pattern): 1 for pattern in patterns}
        socks = list(self._subs.values())
        for prefix in wanted.keys() - self._prefixes.keys():
            for sock in socks:
                sock.setsockopt(zmq.SUBSCRIBE, prefix)
        for prefix in self._prefixes.keys() - wanted.keys():
            for sock in socks:
                sock.setsockopt(zmq.UNSUBSCRIBE, prefix)
        self._prefixes = wanted
        # New patterns (the prefixes follow from them), so a new version: its marker goes
        # after the filters above.
        self.sub_version += 1
        old, self._marker = self._marker, marker_topic(self.node.id, self.sub_version)
        for sock in socks:
            sock.setsockopt(zmq.SUBSCRIBE, self._marker)
            if old is not None:
                sock.setsockopt(zmq.UNSUBSCRIBE, old)
        self._sub_patterns = patterns
        self._broadcast(CtlKind.UPDATE)

    def subscriptions_changed(self) -> None:
        self.call(self._apply_subscriptions)

    def offer_changed(self) -> None:
        self.call(lambda: self._broadcast(CtlKind.UPDATE))

    def _check_xpub(self) -> None:
        xpub, lock = self.node.xpub, self.node.pub_lock
        changed = False
        with lock:
            while True:
                try:
                    note = xpub.recv(zio.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return
                # b"\x01" + topic is a subscribe; a marker names the subscriber and its version
                if note[:2] == b"\x01" + _MARK and len(note) >= 2 + 4:
                    try:
                        nid = note[2:-4].decode()
                    except UnicodeDecodeError:
                        continue
                    (version,) = _SV.unpack(note[-4:])
                    if self.synced.get(nid, -1) < version:
                        self.synced[nid] = version
                        changed = True
        if changed:
            self.node._state_changed()

    # ---- control plane --------------------------------------------------------------------
    def offer(self) -> dict[str, Any]:
        node = self.node
        return {"name": node.name, "id": node.id, "group": node.group,
                "ctl": self.ctl_advertised, "pub": node.pub_advertised,
                "subs": self._sub_patterns, "sv": self.sub_version,
                "workers": sorted(node._offers("worker")),
                "services": sorted(node._offers("rpc")), "eps": dict(node.extra_endpoints),
                **node._offer_fields()}

    def dial(self, address: str) -> None:
        self.call(lambda: self._dial(address))

    def forget(self, node_id: str | None, address: str | None = None) -> None:
        """Drop peer ``node_id`` now and stop dialling ``address`` (mDNS said it is gone).

        Thread-safe. A link that meanwhile reached another node (a new incarnation on the
        same port) is kept.
        """
        def run() -> None:
            if node_id is not None and node_id in self.peers:
                self._remove_peer(node_id, "goodbye")
            link = self._links.get(address) if address else None
            if link is not None and link.peer_id in (None, node_id):
                del self._links[link.address]
                del self._chans[link.chan.fd]
                self.poller.unregister(link.chan.fd)
                link.chan.close()
        self.call(run)

    def _dial(self, address: str) -> None:
        if address in self._links or address == self.address:
            return
        host, _ = zio.split_endpoint(address)
        sock = zio.new_socket(self.node.ctx, zmq.DEALER, linger=self.timing.linger,
                              max_bytes=self.node.max_message_bytes, hwm=self.node.hwm)
        sock.setsockopt(zmq.IMMEDIATE, 1)     # no hellos queued for a peer that is not there
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        zio.connect(sock, address)
        chan = _Chan(sock, None)
        link = _Link(address, chan, host)
        chan.link = link
        self._links[address] = link
        self._hello_due = 0.0
        self._chans[chan.fd] = chan
        self.poller.register(chan.fd, zmq.POLLIN)

    def _send(self, route: tuple[str, Any], payload: bytes | list[bytes]) -> None:
        """Send a control payload (or several, in order) on a route; thread-safe."""
        if route[0] == "out":
            link = self._links.get(route[1])
            if link is None:
                return
            chan = link.chan
            ident = None
        else:
            chan = self.router
            ident = route[1]
        if isinstance(payload, bytes):
            chan.out.append((ident, payload))
        else:
            chan.out.extend([(ident, one) for one in payload])
        self._flush(chan)

    def _flush(self, chan: _Chan) -> None:
        """Send what is queued on ``chan`` unless another thread holds it (it will send it).

        Flat combining instead of waiting for the lock: a thread that would block hands its
        messages to the holder, so senders (pool threads, the I/O thread) never convoy on a
        socket, and a burst goes out with one ``ZMQ_EVENTS`` check.
        """
        out, lock = chan.out, chan.lock
        while out and lock.acquire(False):
            kick = False
            try:
                if chan.closed:
                    out.clear()
                    return
                sock = chan.sock
                while out:
                    ident, payload = out.popleft()
                    try:
                        if ident is not None:
                            _send_frame(sock, ident, _MORE_NB)
                        _send_frame(sock, payload, _NB)
                    except zmq.Again:
                        pass  # not connected (yet): heartbeats and hellos are repeated anyway
                    except zmq.ZMQError as exc:
                        log.debug("send on %r failed: %s", chan.link or "router", exc)
                # ZMQ_FD is edge-triggered: the sends may have consumed the notice of a
                # message that arrived meanwhile. If one waits, have the I/O thread read it.
                if not chan.kicked and sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                    chan.kicked = kick = True
            finally:
                lock.release()
            if kick:
                if threading.get_ident() == self._io_ident:
                    self._hot.append(chan)
                else:
                    self.call(lambda: self._drain(chan))
            # loop: a sender that found the lock taken after our last look left its messages

    def _drain(self, chan: _Chan) -> None:
        """Read what waits on a control socket (I/O thread), then handle it without the lock."""
        got: list[tuple[bytes | None, zmq.Frame]] = []
        link = chan.link
        with chan.lock:
            chan.kicked = False
            if chan.closed:
                return
            sock = chan.sock
            recv = sock.recv
            for _ in range(64):
                try:
                    ident = None if link is not None else recv(zio.NOBLOCK)
                    frame = recv(zio.NOBLOCK, copy=False)
                except zmq.Again:
                    break  # woken for nothing (the notice was a command, not a message)
                if frame.more:
                    while recv(zio.NOBLOCK, copy=False).more:
                        pass
                    self.malformed += 1
                else:
                    got.append((ident, frame))
                # Asking ZMQ_EVENTS is cheaper than a receive that raises Again (~3 us against
                # ~8 us), and, like it, re-arms ZMQ_FD when nothing is left.
                if not sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                    break
            else:
                chan.kicked = True  # more may wait: come back after the others had a turn
                self._hot.append(chan)
        if chan.out:
            self._flush(chan)  # sent by other threads while we held the lock
        if link is not None:
            route: tuple[str, Any] = ("out", link.address)
            for _, frame in got:
                self._on_ctl(frame.bytes, route, link.via_host)
        else:
            for ident, frame in got:
                self._on_ctl(frame.bytes, ("in", ident), frame)

    def _broadcast(self, kind: str) -> None:
        payload = encode_ctl(kind, self.offer())
        for peer in list(self.peers.values()):
            self._send(peer.route, payload)

    def _heartbeat(self, now: float) -> None:
        t = self.timing
        for plugin in self.node._plugins:
            tick = getattr(plugin, "tick", None)
            if tick is not None:
                tick(now)
        ping = encode_ctl(CtlKind.PING, {"id": self.node.id})
        for peer in list(self.peers.values()):
            if now - peer.last_seen > t.peer_timeout:
                log.info("peer %s (%s) silent for %.1fs: gone", peer.info.name, peer.info.id,
                         now - peer.last_seen)
                self._remove_peer(peer.info.id, "timeout")
            else:
                self._send(peer.route, ping)

    def _hello(self, now: float) -> float:
        """Say hello on links nobody answered yet; return when next to look."""
        upcoming = now + 3600.0
        hello: bytes | None = None
        for link in self._links.values():
            if link.peer_id is not None:
                continue
            if now >= link.next_hello:
                # Quick retries first: with ZMQ_IMMEDIATE a hello sent before the TCP
                # connection is up is refused, and the peer may just be starting.
                link.next_hello = now + link.hello_delay
                link.hello_delay = min(link.hello_delay * 2, self.timing.hello_interval)
                if hello is None:
                    hello = encode_ctl(CtlKind.HELLO, self.offer())
                self._send(("out", link.address), hello)
            upcoming = min(upcoming, link.next_hello)
        return upcoming

    def _on_ctl(self, payload: bytes, route: tuple[str, Any], via: str | zmq.Frame | None
                ) -> None:
        try:
            kind, fields = decode_ctl(payload)
            if kind in (CtlKind.HELLO, CtlKind.WELCOME, CtlKind.UPDATE):
                # the Peer-Address lookup only where it is used: offers, not tasks or calls
                via_host = zio.peer_address(via) if isinstance(via, zmq.Frame) else via
                info = parse_offer(fields, via_host)
        except ProtocolVersionError:
            self.bad_version += 1
            self.malformed += 1
            return
        except DecodeError as exc:
            log.debug("malformed control message via %r: %s", route, exc)
            self.malformed += 1
            return
        now = time.monotonic()
        known = self._route_peer.get(route)
        handler = self.ctl_handlers.get(kind)
        if handler is not None:
            # the pattern traffic (calls, replies): straight to its handler, from a known peer
            peer = self.peers.get(known) if known is not None else None
            if peer is not None:
                peer.last_seen = now
                handler(fields, known)  # type: ignore[arg-type]
            return
        if kind in (CtlKind.HELLO, CtlKind.WELCOME) and info.id in self._departed:
            return   # said bye; this was sent before it, on the other connection (section 9)
        if kind == CtlKind.HELLO:
            if info.id == self.node.id:
                return
            # Welcome first: joining may make the patterns send work to the peer at once,
            # and the peer ignores anything from us before our welcome.
            self._send(route, encode_ctl(CtlKind.WELCOME, self.offer()))
            self._upsert(info, route, now)
        elif kind == CtlKind.WELCOME:
            if info.id == self.node.id:
                return
            link = self._links.get(route[1]) if route[0] == "out" else None
            if link is not None:
                link.peer_id = info.id
            self._upsert(info, route, now)
            # Our offer may have changed after the hello went out (a handler added meanwhile),
            # and an update broadcast then had no peer to go to: send the current one now.
            self._send(route, encode_ctl(CtlKind.UPDATE, self.offer()))
        elif known is None or known not in self.peers:
            if kind in (CtlKind.PING, CtlKind.UPDATE):
                self._send(route, encode_ctl(CtlKind.RESET, {"id": self.node.id}))
            elif kind == CtlKind.RESET and route[0] == "out":
                link = self._links.get(route[1])
                if link is not None:
                    link.next_hello = 0.0
                    self._hello_due = 0.0
        elif kind == CtlKind.UPDATE:
            self._upsert(info, route, now)
        elif kind == CtlKind.PING:
            self.peers[known].last_seen = now
        elif kind == CtlKind.BYE:
            self._departed[known] = None
            if len(self._departed) > DEPARTED_MAX:
                del self._departed[next(iter(self._departed))]
            self._remove_peer(known, "goodbye")
        elif kind == CtlKind.RESET:
            # the peer restarted and no longer knows us: forget it and say hello again
            self._remove_peer(known, "reset")
            if route[0] == "out" and route[1] in self._links:
                self._links[route[1]].next_hello = 0.0
                self._hello_due = 0.0
        else:
            self.node._on_control(kind, fields, known, route)
        if known is not None and known in self.peers:
            self.peers[known].last_seen = now

    def _upsert(self, info: PeerInfo, route: tuple[str, Any], now: float) -> None:
        prev = self._route_peer.get(route)
        if prev is not None and prev != info.id:
            self._remove_peer(prev, "restarted")
        for other in list(self.peers.values()):  # an old incarnation at the same address
            if other.info.id != info.id and other.info.address == info.address:
                self._remove_peer(other.info.id, "restarted")
        peer = self.peers.get(info.id)
        with self.node.state_lock:
            if peer is None:
                peer = _Peer(info, route, now, {route})
                self.peers[info.id] = peer
                self._set_sub(info.id, info.pub)
                joined = True
            else:
                if peer.info.pub != info.pub:
                    self._set_sub(info.id, info.pub)
                peer.info = info
                peer.routes.add(route)
                peer.last_seen = now
                joined = False
            self._route_peer[route] = info.id
        if joined:
            self.peer_joins += 1
            log.info("peer %s (%s) joined at %s", info.name, info.id, info.address)
            self.node._peer_event("join", info)
        else:
            self.node._peer_updated(info)
        self.node._state_changed()

    def _set_sub(self, node_id: str, pub: str) -> None:
        self._close_sub(node_id)
        sock = self._subs[node_id] = self._open_sub(pub)
        self._sub_socks.add(sock)

    def _remove_peer(self, node_id: str, reason: str) -> None:
        with self.node.state_lock:
            peer = self.peers.pop(node_id, None)
            if peer is None:
                return
            self.synced.pop(node_id, None)
            for route in peer.routes:
                self._route_peer.pop(route, None)
                if route[0] == "out" and route[1] in self._links:
                    link = self._links[route[1]]
                    link.peer_id = None
                    link.next_hello = 0.0
                    self._hello_due = 0.0
                    link.hello_delay = 0.005
        self._close_sub(node_id, grace=self.timing.peer_timeout if reason == "goodbye" else 0.0)
        if node_id not in {nid for _, nid in self._retiring.values()}:
            self._seqs.pop(node_id, None)
        self.peer_leaves += 1
        log.info("peer %s (%s) left: %s", peer.info.name, node_id, reason)
        self.node._peer_event("leave", replace(peer.info))
        self.node._state_changed()

    def send_to(self, node_id: str, kind: str, fields: dict[str, Any]) -> bool:
        """Send a control message to a peer, from any thread. False if it is unknown."""
        return self.send_payload(node_id, encode_ctl(kind, fields))

    def send_payload(self, node_id: str, payload: bytes | list[bytes]) -> bool:
        """Send an encoded control payload (or several, in order, under one lock) to a peer,
        from any thread. False if it is unknown."""
        peer = self.peers.get(node_id)
        if peer is None:
            return False
        self._send(peer.route, payload)
        return True

    def _begin_stop(self) -> None:
        bye = encode_ctl(CtlKind.BYE, {"id": self.node.id})
        for peer in list(self.peers.values()):
            self._send(peer.route, bye)
        self._stopping = True

