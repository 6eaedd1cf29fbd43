"""Helpers for testing code built on meshmq (and meshmq itself): real sockets, no sleeps.

``Collector`` is a handler that records messages and lets a test wait for them; ``wait_until``
polls a predicate with a timeout; ``RawPeer`` is a plain-pyzmq peer that speaks the wire protocol
(or deliberately does not) so tests can send hand-made frames; ``Script`` runs a process and
waits for lines on its output; ``Overlap`` counts how many handlers run at once.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from meshmq._envelope import CtlKind, PubEncoder, decode_ctl, encode_ctl
from meshmq._errors import MeshTimeout
from meshmq._message import Message

__all__ = ["Collector", "Overlap", "RawPeer", "Script", "wait_until"]


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005,
               what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; raise MeshTimeout after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise MeshTimeout(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Overlap:
    """How many threads are inside ``with overlap:`` at once: ``now``, and ``most`` ever.

    Wrap a handler's body in it to check a concurrency bound (``most`` never above it) and
    that the bound was reached (``most`` equal to it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0

    def __enter__(self) -> Overlap:
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.now -= 1


class Collector:
    """A sync handler that keeps what it receives; ``wait(n)`` blocks until n have arrived."""

    def __init__(self, delay: float = 0.0) -> None:
        self.messages: list[Message] = []
        self.threads: set[str] = set()
        self.delay = delay
        self._cond = threading.Condition()

    def __call__(self, msg: Message) -> None:
        if self.delay:
            time.sleep(self.delay)
        with self._cond:
            self.messages.append(msg)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    @property
    def bodies(self) -> list[Any]:
        with self._cond:
            return [m.body for m in self.messages]

    def wait(self, count: int, timeout: float = 5.0) -> list[Message]:
        """Block until at least ``count`` messages have arrived; return them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise MeshTimeout(f"got {len(self.messages)} of {count} messages in {timeout}s")
            return list(self.messages)


class RawPeer:
    """A peer made of plain pyzmq sockets, for feeding a node hand-made frames.

    ``hello(address)`` performs the handshake so the node subscribes to this peer's PUB; then
    ``pub.send_multipart([...])`` puts anything at all on the node's SUB socket.
    """

    def __init__(self, name: str = "raw") -> None:
        self.ctx = zmq.Context()
        self.name = name
        self.id = uuid.uuid4().hex[:16]
        # XPUB, so the test can see the node's subscription arrive before it sends anything
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.linger = 0
        self.pub.bind("tcp://127.0.0.1:*")
        self.pub_endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.dealer: zmq.Socket[Any] | None = None
        self.encoder = PubEncoder()

    def hello(self, address: str, subs: Sequence[str] = (), timeout: float = 5.0
              ) -> dict[str, Any]:
        """Handshake with the node at ``address``; return its welcome fields."""
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.linger = 0
        self.dealer.connect(address)
        self.dealer.send(encode_ctl(CtlKind.HELLO, {
            "name": self.name, "id": self.id, "group": "default", "ctl": "tcp://127.0.0.1:1",
            "pub": self.pub_endpoint, "subs": list(subs), "sv": 1, "workers": [],
            "services": []}))
        if not self.dealer.poll(int(timeout * 1000)):
            raise MeshTimeout(f"no welcome from {address}")
        kind, fields = decode_ctl(self.dealer.recv())
        assert kind == CtlKind.WELCOME, kind
        return fields

    def wait_subscribed(self, prefix: bytes, timeout: float = 5.0) -> None:
        """Wait until the node's SUB has subscribed to ``prefix`` on our socket."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.pub.poll(int(left * 1000) + 1):
                note = self.pub.recv()
                if note[:1] == b"\x01" and note[1:].startswith(prefix):
                    return
        raise MeshTimeout(f"node did not subscribe to {prefix!r} in {timeout}s")

    def publish(self, topic: str, body: Any, seq: int, msg_id: str | None = None) -> None:
        """Publish a well-formed message with a chosen sequence number."""
        payload = self.encoder.encode(msg_id or f"{self.id}-{seq:x}", self.name, self.id, seq,
                                      time.time(), None, body)
        self.pub.send_multipart([topic.encode(), payload])

    def close(self) -> None:
        if self.dealer is not None:
            self.dealer.close()
        self.pub.close()
        self.ctx.term()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Script:
    """A child process whose output lines a test can wait for. Kill it with ``stop()``."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | None = None, on_line: Callable[[str], None] | None = None) -> None:
        full_env = dict(os.environ)
        full_env.setdefault("MESHMQ_INTERFACES", "127.0.0.1")
        full_env["PYTHONUNBUFFERED"] = "1"
        if env:
            full_env.update(env)
        argv = list(argv)
        if argv and argv[0].endswith(".py"):
            argv = [sys.executable, *argv]
        self.argv = argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=full_env, cwd=cwd)
        self._on_line = on_line
        self.lines: list[str] = []  # every line read so far (``wait``/``stop`` read them all)
        self._pos = 0  # lines before this one have been consumed by ``expect``
        self._eof = False
        self._q: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        on_line = self._on_line
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            if on_line is not None:
                on_line(line)  # e.g. echo it live, as the demo does
            self._q.put(line)
        self._q.put(None)

    def _pull(self, timeout: float) -> bool:
        """Move one line from the reader into ``lines``; False at EOF or on timeout."""
        if self._eof:
            return False
        try:
            line = self._q.get(timeout=timeout) if timeout > 0 else self._q.get_nowait()
        except queue.Empty:
            return False
        if line is None:
            self._eof = True
            return False
        self.lines.append(line)
        return True

    def expect(self, predicate: Callable[[str], bool] | str, timeout: float = 10.0) -> str:
        """Wait for an output line that contains ``predicate`` (a str) or satisfies it.

        Lines are consumed in order: each call looks only at lines after the last match.
        """
        test = (lambda s: predicate in s) if isinstance(predicate, str) else predicate
        deadline = time.monotonic() + timeout
        while True:
            while self._pos < len(self.lines):
                line = self.lines[self._pos]
                self._pos += 1
                if test(line):
                    return line
            if self._eof:
                raise MeshTimeout(f"{self.argv} exited ({self.proc.wait()}) before a line "
                                  f"matching {predicate!r}; output:\n" + "\n".join(self.lines[-30:]))
            left = deadline - time.monotonic()
            if left <= 0:
                raise MeshTimeout(f"{self.argv}: no line matching {predicate!r} in {timeout}s; "
                                  f"output so far:\n" + "\n".join(self.lines[-30:]))
            self._pull(min(left, 0.5))

    def _read_all(self) -> None:
        while self._pull(0):
            pass

    def wait(self, timeout: float = 10.0) -> int:
        """Wait for the process to exit; return its exit code."""
        code = self.proc.wait(timeout)
        self._reader.join(timeout)
        self._read_all()
        return code

    def stop(self, sig: int = 15, timeout: float = 10.0) -> int:
        """Send ``sig`` (SIGTERM by default) if still running, then wait, killing at the end."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        self._read_all()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return int(self.proc.returncode)
