"""What a node knows of its peers: the PeerInfo record and the offer exchanged in the handshake.

Pure data and functions (no sockets): the engine owns the live table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshmq._errors import DecodeError
from meshmq._zmqio import dialable

__all__ = ["PeerInfo", "parse_offer"]

MAX_LIST = 4096  # a hostile peer cannot make us keep an unbounded offer


@dataclass(frozen=True)
class PeerInfo:
    """A peer as this node sees it: identity, where to reach it, and what it offers."""

    name: str
    id: str
    address: str                      # control endpoint (tcp://host:port) to give others
    group: str = "default"
    pub: str = ""                     # its pub/sub endpoint
    subscriptions: tuple[str, ...] = ()
    workers: tuple[str, ...] = ()     # queues it works on
    services: tuple[str, ...] = ()    # RPC services it serves
    endpoints: dict[str, str] = field(default_factory=dict)  # other named endpoints
    sub_version: int = 0              # bumped whenever its subscriptions change
    queues: dict[str, tuple[int, int]] = field(default_factory=dict)  # queue -> (concurrency, max_attempts)


def _str_list(fields: dict[str, Any], key: str) -> tuple[str, ...]:
    value = fields.get(key, [])
    if type(value) is not list or len(value) > MAX_LIST or any(type(v) is not str for v in value):
        raise DecodeError(f"offer field {key!r} is not a list of strings")
    return tuple(value)


def parse_offer(fields: dict[str, Any], via_host: str | None) -> PeerInfo:
    """A hello/welcome/update's fields -> PeerInfo. Wildcard hosts become ``via_host``."""
    try:
        name, node_id, ctl, pub = fields["name"], fields["id"], fields["ctl"], fields["pub"]
    except KeyError as exc:
        raise DecodeError(f"offer lacks field {exc.args[0]!r}") from None
    if not all(type(v) is str for v in (name, node_id, ctl, pub)):
        raise DecodeError("offer identity fields must be strings")
    group = fields.get("group", "default")
    sv = fields.get("sv", 0)
    eps = fields.get("eps", {})
    if type(group) is not str or type(sv) is not int or type(eps) is not dict:
        raise DecodeError("offer has a field of the wrong type")
    if len(eps) > 64 or any(type(k) is not str or type(v) is not str for k, v in eps.items()):
        raise DecodeError("offer endpoints must map str to str")
    wq = fields.get("wq", {})
    if type(wq) is not dict or len(wq) > MAX_LIST:
        raise DecodeError("offer field 'wq' is not a map")
    queues: dict[str, tuple[int, int]] = {}
    for q, spec in wq.items():
        if (type(q) is not str or type(spec) is not list or len(spec) < 2
                or type(spec[0]) is not int or type(spec[1]) is not int
                or not 0 < spec[0] <= 1_000_000 or not 0 < spec[1] <= 1_000_000):
            raise DecodeError("offer field 'wq' maps queue to [concurrency, max_attempts]")
        queues[q] = (spec[0], spec[1])
    try:
        return PeerInfo(
            name=name, id=node_id, address=dialable(ctl, via_host), group=group,
            pub=dialable(pub, via_host),
            subscriptions=_str_list(fields, "subs"), workers=_str_list(fields, "workers"),
            services=_str_list(fields, "services"),
            endpoints={k: dialable(v, via_host) for k, v in eps.items()}, sub_version=sv,
            queues=queues)
    except ValueError as exc:  # ConfigError from a malformed endpoint
        raise DecodeError(f"offer has a bad endpoint: {exc}") from exc
