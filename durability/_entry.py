"""The journal's record payload: one message envelope, msgpack, versioned (pure, no I/O).

``[1, id, source, source_id, seq, timestamp, topic, headers, body]`` packed with meshmq's one
codec (so ext types round-trip). The log record around it adds the journal offset and the
journal's receive time (docs/STORAGE.md); docs/JOURNAL.md has this layout.
"""

from __future__ import annotations

from typing import Any

from meshmq._codec import decode, encode
from meshmq._errors import DecodeError
from meshmq._message import Message, wire_message

__all__ = ["ENTRY_VERSION", "decode_entry", "encode_entry", "entry_id", "entry_topic"]

ENTRY_VERSION = 1


def encode_entry(msg: Message) -> bytes:
    """Return the payload bytes that store ``msg``."""
    return encode([ENTRY_VERSION, msg.id, msg.source, msg.source_id, msg.seq, msg.timestamp,
                   msg.topic, msg.headers, msg.body])


def _fields(payload: bytes | memoryview) -> list[Any]:
    fields = decode(payload)
    if (type(fields) is not list or len(fields) < 9 or fields[0] != ENTRY_VERSION
            or type(fields[1]) is not str or type(fields[6]) is not str
            or type(fields[4]) is not int):
        raise DecodeError("not a version-1 journal entry")
    return fields


def decode_entry(payload: bytes | memoryview) -> Message:
    """Return the Message stored in ``payload``; DecodeError if it is not an entry."""
    f = _fields(payload)
    headers = f[7] if type(f[7]) is dict else {}
    # wire_message: the frozen dataclass's __init__ would cost more than the unpacking (replay)
    return wire_message(f[6], f[8], headers, f[1], str(f[2]), str(f[3]), f[4], float(f[5]), 0)


def entry_topic(payload: bytes | memoryview) -> str:
    """Return just the topic of an entry (the journal filters replays by it)."""
    return str(_fields(payload)[6])


def entry_id(payload: bytes | memoryview) -> str:
    """Return just the message id of an entry (dedup rebuild)."""
    return str(_fields(payload)[1])
