"""Sans-IO wire format: ZeroMQ frames <-> meshmq messages. Specified in docs/PROTOCOL.md.

No sockets here: functions over bytes, so other implementations and golden-byte tests can pin
the format. Every payload is a msgpack array whose first element is the protocol version.
Version 1 readers accept longer arrays (fields appended by later minor revisions are ignored) and
reject any other version with :class:`ProtocolVersionError`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import msgpack

from meshmq._codec import CONTAINERS, _default, check_keys, decode, new_packer
from meshmq._errors import DecodeError, EncodeError, ProtocolVersionError

__all__ = ["PROTO", "CtlKind", "PubEncoder", "decode_ctl", "decode_pub", "encode_ctl",
           "message_ids"]

PROTO = 1
PUB_FIELDS = 8  # [proto, id, source, source_id, seq, timestamp, headers, body]


class CtlKind:
    """Control message kinds (strings on the wire, so a capture reads plainly)."""

    HELLO = "hello"
    WELCOME = "welcome"
    UPDATE = "update"
    PING = "ping"
    BYE = "bye"
    RESET = "reset"


class PubEncoder:
    """Packs pub/sub payloads. Holds a reusable packer: use from one thread at a time."""

    __slots__ = ("_pack",)

    def __init__(self) -> None:
        self._pack = new_packer().pack

    def encode(self, msg_id: str, source: str, source_id: str, seq: int, timestamp: float,
               headers: dict[str, Any] | None, body: Any) -> bytes:
        """The frame-1 payload of a published message."""
        if type(body) in CONTAINERS:
            check_keys(body)
        if headers:
            check_keys(headers)
        try:
            return self._pack([PROTO, msg_id, source, source_id, seq, timestamp, headers, body])
        except EncodeError:
            raise
        except (TypeError, ValueError, OverflowError) as exc:
            raise EncodeError(f"cannot encode message body or headers: {exc}") from exc


_HEX1 = tuple(f"{i:x}" for i in range(1, 256))
_HEX2 = tuple(f"{i:02x}" for i in range(256))


def message_ids(prefix: str) -> Iterator[str]:
    """``prefix + hex(n)`` for n = 1, 2, ... (``f"{prefix}{n:x}"``), at ~0.2 us an id, not 0.45.

    One string format per 256 ids; every id in between is the block's head plus a two-digit
    tail, joined in C (map over str.__add__), so ``next()`` runs no Python code.
    """
    blocks = (map(f"{prefix}{high:x}".__add__, _HEX2) for high in itertools.count(1))
    return itertools.chain(map(prefix.__add__, _HEX1), itertools.chain.from_iterable(blocks))


def decode_pub(topic: bytes, payload: bytes | memoryview) -> tuple[str, str, str, str, int, float,
                                                                    dict[str, Any], Any]:
    """Frames of a published message -> (topic, id, source, source_id, seq, ts, headers, body)."""
    arr = decode(payload)
    # The receive path's hot spot: one shape test covers the common case (exactly 8 fields);
    # anything else goes to _pub_fields, which raises the precise error or drops appended fields.
    if type(arr) is list and len(arr) == PUB_FIELDS:
        proto, msg_id, source, source_id, seq, ts, headers, body = arr
    else:
        proto, msg_id, source, source_id, seq, ts, headers, body = _pub_fields(arr)
    if type(proto) is not int or proto != PROTO:
        raise ProtocolVersionError(f"pub payload has protocol version {proto!r}, expected {PROTO}")
    if (type(msg_id) is not str or type(source) is not str or type(source_id) is not str
            or type(seq) is not int or type(ts) is not float):
        raise DecodeError("pub payload field has the wrong type")
    if headers is None:
        headers = {}
    elif type(headers) is not dict:
        raise DecodeError("pub headers are not a map")
    try:
        topic_s = topic.decode()
    except UnicodeDecodeError as exc:
        raise DecodeError("topic frame is not UTF-8") from exc
    return topic_s, msg_id, source, source_id, seq, ts, headers, body


def _pub_fields(arr: Any) -> list[Any]:
    """The first 8 fields of a pub payload that is not a plain 8-element array, or the error."""
    if type(arr) is not list or not arr:
        raise DecodeError("pub payload is not a msgpack array")
    if type(arr[0]) is not int or arr[0] != PROTO:
        raise ProtocolVersionError(f"pub payload has protocol version {arr[0]!r}, expected {PROTO}")
    if len(arr) < PUB_FIELDS:
        raise DecodeError(f"pub payload has {len(arr)} fields, expected {PUB_FIELDS}")
    return arr[:PUB_FIELDS]


def _pack_ctl(obj: Any) -> bytes:
    # packb, not a shared Packer: control messages are built on several threads.
    return msgpack.packb(obj, default=_default, use_bin_type=True, datetime=True)


def encode_ctl(kind: str, fields: dict[str, Any]) -> bytes:
    """A control-plane payload: ``[proto, kind, fields]``."""
    try:
        return _pack_ctl([PROTO, kind, fields])
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode control message {kind}: {exc}") from exc


def decode_ctl(payload: bytes | memoryview) -> tuple[str, dict[str, Any]]:
    """A control-plane payload -> (kind, fields)."""
    arr = decode(payload)
    if type(arr) is not list or len(arr) < 3:
        raise DecodeError("control payload is not a [proto, kind, fields] array")
    if type(arr[0]) is not int or arr[0] != PROTO:
        raise ProtocolVersionError(f"control payload has protocol version {arr[0]!r}")
    kind, fields = arr[1], arr[2]
    if type(kind) is not str or type(fields) is not dict:
        raise DecodeError("control payload has the wrong types")
    return kind, fields
