"""The RPC lane: sync calls and their replies with no thread hand-off on either side.

On the control sockets a call crosses two hand-offs per side: the server's I/O thread reads it
and wakes a pool worker, the client's I/O thread reads the reply and wakes the caller. On this
machine each costs about 60 us, as much as a whole raw REQ/REP round trip (benchmarks/README.md).
The lane removes all four:

- A node that serves RPC binds one more ROUTER, advertised in its offer as ``eps["rpc"]``.
  One thread reads it; when a call comes in for a sync handler with a free worker, it runs the
  handler itself, sends the reply and reads on, while a standby takes over the reading if the
  handler runs long (LaneServer). Other calls (async handlers, busy pools) go to the
  service's Pool as on the control path.
- A thread that makes a sync call sends it on a DEALER of its own connected to that ROUTER, and
  reads the reply off it itself. Anything that settles the call another way (the server left,
  a retry answered on the control path, the node stopping) writes the thread's eventfd, which
  it polls beside the socket.

The messages are the control plane's ``call`` and ``reply``, byte for byte (PROTOCOL.md 13.5).
The lane is only a shortcut: a DEALER sends only on a completed connection (ZMQ_IMMEDIATE), so
a call it cannot send at once, the first from a thread, and every call to a server without a
lane, go on the control path; peer liveness, retries and timeouts stay the control plane's.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from meshmq import _zmqio as zio

if TYPE_CHECKING:
    from meshmq._node import Node

__all__ = ["HAVE_LANE", "LaneCaller", "LaneCallers", "LaneServer"]

log = logging.getLogger("meshmq")

HAVE_LANE = hasattr(os, "eventfd")   # Linux; elsewhere every call takes the control path
#: lane DEALERs a node keeps open at most (threads x servers); past it, calls take the
#: control path. Each costs a TCP connection and a few descriptors.
MAX_LANE_SOCKETS = 128
_EVENTS = int(zmq.EVENTS)
_RCVMORE = int(zmq.RCVMORE)
_POLLIN = int(zmq.POLLIN)
_NB = zio.NOBLOCK
_MORE_NB = zio.SNDMORE | zio.NOBLOCK
# the C-level send, without the Python wrapper of zmq.Socket.send (as meshmq._engine does)
_send: Callable[..., Any] = zmq.backend.Socket.send
_POLL_MS = 1000      # a thread polling the lane looks at `closed` at least this often
#: a call that comes in while the lane's reader runs a handler waits at most about this long
#: for another thread to read it (see LaneServer)
HANDOVER = 0.002
IDLE_AFTER = 0.1     # s without calls after which no thread waits with a timeout


def wake(fd: int) -> None:
    """Wake a thread polling its eventfd (any thread)."""
    try:
        os.eventfd_write(fd, 1)
    except OSError:
        pass  # the counter is full of wake-ups already


def _heartbeats(sock: zmq.Socket[Any], node: Node) -> None:
    """ZMTP heartbeats on a lane socket, at the node's heartbeat pace: a lane connection that
    died silently (a NAT or firewall dropping an idle flow while the control connection's pings
    keep that one) is noticed and dropped, and an IMMEDIATE DEALER then refuses to send, so
    calls go on the control socket until it reconnects."""
    t = node.timing
    sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(t.heartbeat_interval * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(t.peer_timeout * 1000)))
    sock.setsockopt(zmq.HEARTBEAT_TTL, max(100, int(t.peer_timeout * 1000)))


def _drain_fd(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except OSError:
        pass  # nothing to read (non-blocking)


class LaneServer:
    """The serving side: a ROUTER read by one thread at a time, which runs calls itself.

    ``serve(lane, ident, frame)`` (the Rpc's) either returns a job for ``run(job)`` on the
    reading thread (a call with a worker of its pool claimed), or None when it dealt with the
    call (queued it for the pool, or answered an error). ``reply(ident, payload)`` may be
    called from any thread.

    Leader and standby: the leader reads, and runs the handler of a call it read on its own
    thread, then goes on reading. Handing the reading over before every handler (classic
    leader/followers) costs a futex wake and a GIL fight on every call (~15 us here). Instead,
    while the lane is busy, one other thread stands by, waking every HANDOVER seconds: if the
    leader has been in a handler that long, it takes over the reading, and the old leader
    becomes a follower when its handler returns. So a call that comes in while the leader runs
    a slow handler waits at most about HANDOVER; at most ``max_threads()`` threads (the sync
    services' total concurrency + 1) ever read or run. An idle lane (no call for IDLE_AFTER s)
    has no thread waking.
    """

    def __init__(self, node: Node,
                 serve: Callable[[LaneServer, bytes, bytes], tuple[Any, ...] | None],
                 run: Callable[[tuple[Any, ...]], None],
                 max_threads: Callable[[], int]) -> None:
        self.sock = zio.new_socket(node.ctx, zmq.ROUTER, linger=0,
                                   max_bytes=2 * node.max_message_bytes, hwm=node.hwm)
        _heartbeats(self.sock, node)
        port = zio.split_endpoint(zio.bind(self.sock, node.host, 0))[1]
        self.advertised = f"tcp://{node.host}:{port}"
        self.fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.slock = threading.Lock()   # every use of sock
        self.cond = threading.Condition(threading.Lock())   # the fields below to `closed`
        self.leader = 0          # thread ident of the reader (0: none)
        self.standby = 0         # thread ident of the follower that waits with a timeout
        self.followers = 0
        self.hot = False         # calls came in lately: the standby waits with a timeout
        self.threads: list[threading.Thread] = []
        self.live = 0            # threads not ended (under slock): the last one closes wake_fd
        self.fd_open = True      # (under slock)
        self.closed = False
        # written by the leader without the lock: when it started its handler (0: reading)
        self.running_since = 0.0
        self.last_call = 0.0
        self.served = 0          # calls read from the lane
        self.inline = 0          # ... of them run on the thread that read them
        self.handovers = 0       # times a standby took over from a leader busy in a handler
        self._node = node
        self._serve = serve
        self._run_job = run
        self._max_threads = max_threads
        self._label = node.name
        self._spawn()

    # ---- threads ----------------------------------------------------------------------------
    def _spawn(self) -> None:
        t = threading.Thread(target=self._run, name=f"meshmq-lane-{self._label}-"
                             f"{len(self.threads)}", daemon=True)
        self.threads.append(t)
        with self.slock:
            self.live += 1
        t.start()

    def _follow(self, me: int) -> bool:
        """Wait (under cond) until this thread may lead; False once closed."""
        cond = self.cond
        self.followers += 1
        try:
            while not self.closed:
                if not self.leader:
                    break
                since = self.running_since
                now = time.monotonic()
                if since and now - since >= HANDOVER:
                    self.handovers += 1   # the leader is stuck in a handler: read for it
                    break
                if not self.standby or self.standby == me:
                    if self.hot and now - self.last_call > IDLE_AFTER:
                        self.hot = False   # nothing lately: stop waking (leader re-arms it)
                    if self.hot:
                        self.standby = me
                        cond.wait(HANDOVER)
                        continue
                    self.standby = 0
                cond.wait()
            else:
                return False
        finally:
            self.followers -= 1
            if self.standby == me:
                self.standby = 0
        self.leader = me
        self.running_since = 0.0
        cond.notify()   # another follower may stand by now
        return True

    def _run(self) -> None:
        me = threading.get_ident()
        try:
            self._lead_or_follow()
        finally:
            with self.cond:
                if self.leader == me:   # only if something raised: let another lead
                    self.leader = 0
                    self.cond.notify()
            with self.slock:
                self.live -= 1
                self._close_fd()

    def _close_fd(self) -> None:
        """Close the eventfd once closed and no thread may poll it (under slock)."""
        if self.closed and self.live == 0 and self.fd_open:
            self.fd_open = False
            os.close(self.wake_fd)

    def _lead_or_follow(self) -> None:
        me = threading.get_ident()
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self.wake_fd, select.POLLIN)
        cond = self.cond
        with cond:
            if not self._follow(me):
                return
        while True:
            try:
                job = self._read(poller)
            except Exception:  # noqa: BLE001 - the lane must outlive any one call
                log.exception("the RPC lane failed to read a call; going on")
                continue
            if job is None:   # closed
                with cond:
                    self.leader = 0
                    cond.notify_all()
                return
            now = time.monotonic()
            idle = now - self.last_call
            self.last_call = now        # before the look at hot below (see _follow)
            self.running_since = now
            if not self.hot or idle > IDLE_AFTER / 2 or (
                    self.followers == 0 and len(self.threads) < self._max_threads()):
                with cond:
                    # A standby that found the lane idle may be turning cold right now: under
                    # the lock it either sees last_call fresh, or we see hot off and notify.
                    if not self.hot:
                        self.hot = True
                    cond.notify()          # a follower stands by from now on
                    if self.followers == 0 and len(self.threads) < self._max_threads():
                        self._spawn()      # one to stand by while this one runs handlers
            self.inline += 1
            try:
                self._run_job(job)
            except Exception:  # noqa: BLE001 - as above; the caller times out
                log.exception("the RPC lane failed to run or answer a call; going on")
            with cond:   # one step with a standby's look at running_since: one reader
                if self.leader == me:
                    self.running_since = 0.0   # not when a standby took over: it is its own
                elif not self._follow(me):
                    return

    def _read(self, poller: Any) -> tuple[Any, ...] | None:
        """Lead: read calls until one is to run on this thread (None once closed)."""
        sock, slock = self.sock, self.slock
        recv = sock.recv
        woke = False
        while True:
            ident: bytes | None = None
            payload: bytes | None = None
            with slock:
                if self.closed:
                    return None
                # ZMQ_FD is edge-triggered: read while ZMQ_EVENTS says a message waits, which
                # also re-arms it (so does a receive that finds nothing). Whoever sends on the
                # socket checks again (reply()). Just woken by the socket, receive at once: a
                # message is nearly always what woke us, and ZMQ_EVENTS costs a few us.
                try:
                    if woke or sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                        ident = recv(_NB)
                        # a ROUTER's message has an identity and a body
                        payload = recv(_NB)
                        if sock.getsockopt(_RCVMORE):
                            while sock.getsockopt(_RCVMORE):
                                recv(_NB)
                            payload = None   # a call is one frame
                except zmq.Again:
                    pass   # woken for something else: look again, then poll
            woke = False
            if ident is None:
                for fd, _ in poller.poll(_POLL_MS):
                    if fd == self.wake_fd:
                        _drain_fd(fd)
                    else:
                        woke = True
                continue
            if payload is None:
                engine = self._node.engine
                if engine is not None:
                    engine.malformed += 1   # counted with the control plane's
                continue
            self.served += 1
            job = self._serve(self, ident, payload)
            if job is not None:
                return job

    def reply(self, ident: bytes, payload: bytes) -> None:
        """Send a reply (any thread); a message that arrived meanwhile wakes the leader."""
        sock = self.sock
        with self.slock:
            if self.closed:
                return
            try:
                _send(sock, ident, _MORE_NB)
                _send(sock, payload, _NB)
            except zmq.Again:
                return   # the caller's queue is full: it times out, as on a lost reply
            # the leader asks ZMQ_EVENTS itself before it polls again; another thread must
            # wake it if its send took the notice of a message that came in
            if self.leader != threading.get_ident() and \
                    sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                wake(self.wake_fd)

    def close(self, timeout: float) -> None:
        """Stop reading; wait up to ``timeout`` for handlers running on lane threads. One still
        running then ends on its own (its reply is not sent); the last thread out closes the
        eventfd."""
        with self.slock:
            self.closed = True
            if self.fd_open:
                wake(self.wake_fd)
        with self.cond:
            self.cond.notify_all()
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for t in list(self.threads):
            if t is not me:   # a handler may stop its own node
                t.join(max(0.0, deadline - time.monotonic()))
        with self.slock:
            self.sock.close()
            self._close_fd()


class LaneCaller:
    """One thread's lane state: its eventfd and its DEALER to each server's lane."""

    __slots__ = ("closed", "fd_open", "gen", "ident", "lock", "sent", "socks", "thread",
                 "wake_fd")

    def __init__(self) -> None:
        self.thread = threading.current_thread()
        self.ident = threading.get_ident()
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.fd_open = True
        self.lock = threading.Lock()   # every use of socks, closed, and the fd
        self.socks: dict[str, tuple[zmq.Socket[Any], Any]] = {}   # endpoint -> (DEALER, poll)
        self.closed = False
        self.sent = 0                  # calls this thread sent on a lane
        self.gen = 0                   # LaneCallers.gen when socks was last pruned

    def wake(self) -> None:
        """Wake this thread if it polls its lane (any thread; never after close)."""
        with self.lock:
            if self.fd_open:
                wake(self.wake_fd)

    def close(self) -> int:
        """Close the sockets and the fd (a thread polling them wakes and sees closed)."""
        with self.lock:
            self.closed = True
            socks, self.socks = self.socks, {}
            for sock, _ in socks.values():
                sock.close()
            if self.fd_open:
                self.fd_open = False
                os.close(self.wake_fd)
        return len(socks)


class LaneCallers:
    """Every thread's LaneCaller of one node: made on a thread's first call, closed when the
    thread is found dead or the node stops."""

    def __init__(self, node: Node, live: Callable[[], set[str]]) -> None:
        self.node = node
        self.lock = threading.Lock()
        self.callers: dict[int, LaneCaller] = {}
        self.nsocks = 0
        # bumped when a peer leaves: each caller then closes its DEALERs to lanes that are no
        # peer's any more (``live()``), before its next send
        self.gen = 0
        self._live = live
        self.closed = False
        self.local = threading.local()

    def mine(self) -> LaneCaller | None:
        caller: LaneCaller | None = getattr(self.local, "caller", None)
        if caller is not None:
            return None if caller.closed else caller
        if not HAVE_LANE:
            return None
        self.prune_dead()
        with self.lock:
            if self.closed:
                return None
            caller = self.callers[threading.get_ident()] = LaneCaller()
        self.local.caller = caller
        return caller

    def prune_dead(self) -> None:
        """Close the sockets and eventfds of threads that ended (any thread; the node's I/O
        thread does it every second, and a thread's first call)."""
        with self.lock:
            gone = [self.callers.pop(k) for k, c in list(self.callers.items())
                    if not c.thread.is_alive()]
        n = sum(c.close() for c in gone)   # outside self.lock: close takes the caller's lock
        if n:
            with self.lock:
                self.nsocks -= n

    def send(self, caller: LaneCaller, endpoint: str, payload: bytes
             ) -> tuple[zmq.Socket[Any], Any] | None:
        """Send on this thread's DEALER to ``endpoint``; None if it cannot go now (not yet
        connected, queue full, too many sockets): then it takes the control path."""
        with caller.lock:
            if caller.closed:
                return None
            if caller.gen != self.gen:
                self._prune(caller)
            entry = caller.socks.get(endpoint)
            if entry is None:
                with self.lock:
                    if self.closed or self.nsocks >= MAX_LANE_SOCKETS:
                        return None
                    self.nsocks += 1
                node = self.node
                sock = zio.new_socket(node.ctx, zmq.DEALER, linger=0,
                                      max_bytes=2 * node.max_message_bytes, hwm=node.hwm)
                sock.setsockopt(zmq.IMMEDIATE, 1)   # queue only on a completed connection
                _heartbeats(sock, node)
                zio.connect(sock, endpoint)
                poller = select.poll()
                poller.register(sock.getsockopt(zmq.FD), select.POLLIN)  # type: ignore[arg-type]
                poller.register(caller.wake_fd, select.POLLIN)
                entry = caller.socks[endpoint] = (sock, poller)
            try:
                _send(entry[0], payload, _NB)
            except zmq.Again:
                return None   # no connection yet (the first call), or the queue is full
            caller.sent += 1
        return entry

    def _prune(self, caller: LaneCaller) -> None:
        """Close ``caller``'s DEALERs to lanes no live peer has (under caller.lock)."""
        caller.gen = self.gen   # first: a peer leaving meanwhile bumps it again
        live = self._live()
        gone = [ep for ep in caller.socks if ep not in live]
        for ep in gone:
            caller.socks.pop(ep)[0].close()
        if gone:
            with self.lock:
                self.nsocks -= len(gone)

    def wait(self, caller: LaneCaller, entry: tuple[zmq.Socket[Any], Any], call: Any,
             on_frame: Callable[[Any, bytes], bool], deadline: float) -> None:
        """Read frames off ``entry``'s DEALER on this thread, ``on_frame(call, frame)`` for
        each, until ``call.done`` or the deadline. A write to ``caller.wake_fd`` (the call was
        settled another way: retried elsewhere, server gone, node stopping) wakes it to look."""
        sock, poller = entry
        recv = sock.recv
        woke = False
        while not call.done:
            frame: bytes | None = None
            with caller.lock:
                if caller.closed:
                    return
                # Only this thread uses the socket, and it asks ZMQ_EVENTS (which re-arms the
                # edge-triggered ZMQ_FD), or receives until nothing is left, every time before
                # it polls: so it may stop after one message. Just woken by the socket, it
                # receives at once (see LaneServer._read). Each frame is taken as a message:
                # a reply is one frame, and anything else fails to decode and is counted.
                try:
                    if woke or sock.getsockopt(_EVENTS) & _POLLIN:  # type: ignore[operator]
                        frame = recv(_NB)
                except zmq.Again:
                    pass
            woke = False
            if frame is not None:
                if on_frame(call, frame):
                    return
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return
            # a closed socket or fd shows as POLLNVAL at once: then `closed` ends it
            for fd, _ in poller.poll(min(int(left * 1000) + 1, _POLL_MS)):
                if fd == caller.wake_fd:
                    with caller.lock:
                        if caller.fd_open:
                            _drain_fd(fd)
                else:
                    woke = True

    def close(self) -> None:
        with self.lock:
            self.closed = True
            callers, self.callers = list(self.callers.values()), {}
        for caller in callers:
            caller.close()
