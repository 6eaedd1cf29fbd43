"""The one module that touches zmq directly: contexts, socket options, binds, error mapping."""

from __future__ import annotations

import socket as _socket
from typing import Any

import zmq

from meshmq._errors import ConfigError, MeshError

__all__ = ["NOBLOCK", "SNDMORE", "bind", "dialable", "new_context", "new_socket", "peer_address"]

# Plain ints: `zmq.SNDMORE | flags` is an enum.IntFlag operation costing ~1.7 us (PERF-NOTES).
SNDMORE: int = int(zmq.SNDMORE)
NOBLOCK: int = int(zmq.NOBLOCK)
Again = zmq.Again
ZMQError = zmq.ZMQError


def new_context() -> zmq.Context[Any]:
    """A private context per node, so stop() can terminate it and prove nothing is left."""
    return zmq.Context()


def new_socket(ctx: zmq.Context[Any], kind: int, *, linger: float, max_bytes: int = -1,
               hwm: int | None = None) -> zmq.Socket[Any]:
    """A socket with meshmq's options: linger in seconds, ZMQ_MAXMSGSIZE, high-water marks."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, int(linger * 1000))
    if max_bytes > 0:
        # Oversized frames are dropped by libzmq (the connection is reset) before Python sees them.
        sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


def bind(sock: zmq.Socket[Any], host: str, port: int) -> str:
    """Bind to tcp://host:port (port 0: any free port); return the endpoint actually bound."""
    endpoint = f"tcp://{host}:{port}" if port else f"tcp://{host}:*"
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot listen on {endpoint}: {exc.strerror}") from exc
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(last, bytes)
    return last.decode()


def connect(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Connect, naming the endpoint in the error."""
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise ConfigError(f"cannot connect to {endpoint!r}: {exc.strerror}") from exc


def disconnect(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Disconnect; an endpoint that was never connected is not an error."""
    try:
        sock.disconnect(endpoint)
    except zmq.ZMQError:
        pass


def split_endpoint(endpoint: str) -> tuple[str, int]:
    """tcp://host:port -> (host, port)."""
    if not endpoint.startswith("tcp://"):
        raise ConfigError(f"endpoint {endpoint!r} is not tcp://host:port")
    host, _, port = endpoint[6:].rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"endpoint {endpoint!r} is not tcp://host:port")
    return host.strip("[]"), int(port)


WILDCARD_HOSTS = frozenset({"0.0.0.0", "*", "::", ""})


def dialable(endpoint: str, via_host: str | None) -> str:
    """An advertised endpoint with a wildcard host rewritten to the host we know the peer by."""
    host, port = split_endpoint(endpoint)
    if host in WILDCARD_HOSTS:
        host = via_host or "127.0.0.1"
    return f"tcp://{host}:{port}"


def local_address(host: str) -> str:
    """The address to tell others for a socket bound on ``host``."""
    if host not in WILDCARD_HOSTS:
        return host
    try:
        return _socket.gethostbyname(_socket.gethostname())
    except OSError:
        return "127.0.0.1"


def peer_address(frame: zmq.Frame) -> str | None:
    """The remote IP of the TCP connection a frame arrived on (ZMQ 'Peer-Address' property)."""
    try:
        value = frame.get("Peer-Address")
    except (zmq.ZMQError, MeshError):
        return None
    return value if isinstance(value, str) else None
