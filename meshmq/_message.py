"""The Message a handler receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Message", "wire_message"]


@dataclass(frozen=True, slots=True)
class Message:
    """One message as delivered to a handler.

    ``seq`` counts per sender and topic, from 1 for each sender incarnation, so filtering by topic
    never looks like loss. ``gap`` is how many messages of this sender and topic were missed just
    before this one (0 when none; a subscriber's first message from a sender never counts a gap).
    ``attempt`` counts deliveries of a pipeline task (1 for pub/sub); ``key`` is the task's
    affinity key (None for pub/sub and unkeyed tasks).
    """

    topic: str
    body: Any
    headers: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    source: str = ""
    source_id: str = ""
    seq: int = 0
    timestamp: float = 0.0
    gap: int = 0
    attempt: int = 1
    key: Any = None


class _Building:
    """A mutable twin of Message's slot layout, so wire_message can fill one with plain
    attribute stores (~0.6 us for 11 fields, against ~1.8 us through the frozen class's slot
    descriptors) and then make it a Message by assigning ``__class__``. CPython allows that
    between classes whose slots are the same names in the same order; a Message is frozen
    from then on (its ``__setattr__`` raises), exactly as if built by its ``__init__``."""

    __slots__ = Message.__slots__


def wire_message(topic: str, body: Any, headers: dict[str, Any], msg_id: str, source: str,
                 source_id: str, seq: int, timestamp: float, gap: int, attempt: int = 1,
                 key: Any = None) -> Message:
    """``Message(...)`` with the same fields, cheaper: for the receive paths (pub/sub, tasks,
    journal entries), which build one per message."""
    m: Any = _Building()
    m.topic = topic
    m.body = body
    m.headers = headers
    m.id = msg_id
    m.source = source
    m.source_id = source_id
    m.seq = seq
    m.timestamp = timestamp
    m.gap = gap
    m.attempt = attempt
    m.key = key
    m.__class__ = Message
    return m
