"""The Message a handler receives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Message"]


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
