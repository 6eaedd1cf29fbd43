"""Topics and patterns: validation, matching, and the ZeroMQ prefix a pattern subscribes to.

A topic is dot-separated non-empty segments of UTF-8 (``orders.created``). A pattern's segment is
a literal, ``*`` (exactly one segment) or, as the last segment only, ``>`` (one or more segments).
ZeroMQ filters by byte prefix on the publisher; the exact match is done here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

from meshmq._errors import ConfigError

__all__ = ["check_pattern", "check_topic", "matcher", "zmq_prefix"]

MAX_TOPIC_BYTES = 255
_FORBIDDEN = frozenset("*> \t\r\n\x00")


def check_topic(topic: str) -> bytes:
    """Validate a concrete topic; return its UTF-8 bytes."""
    if not isinstance(topic, str):
        raise ConfigError(f"topic must be a str, not {type(topic).__name__}")
    raw = topic.encode()
    if not raw or len(raw) > MAX_TOPIC_BYTES:
        raise ConfigError(f"topic {topic!r} must be 1..{MAX_TOPIC_BYTES} bytes")
    for seg in topic.split("."):
        if not seg or _FORBIDDEN.intersection(seg):
            raise ConfigError(
                f"invalid topic {topic!r}: segments are non-empty and contain no '*', '>', "
                "whitespace or NUL")
    return raw


def check_pattern(pattern: str) -> str:
    """Validate a subscription pattern; return it unchanged."""
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"pattern must be a non-empty str, not {pattern!r}")
    segs = pattern.split(".")
    for i, seg in enumerate(segs):
        if seg in ("*", ">"):
            if seg == ">" and i != len(segs) - 1:
                raise ConfigError(f"invalid pattern {pattern!r}: '>' must be the last segment")
            continue
        if not seg or _FORBIDDEN.intersection(seg):
            raise ConfigError(f"invalid pattern {pattern!r}: bad segment {seg!r}")
    if len(pattern.encode()) > MAX_TOPIC_BYTES:
        raise ConfigError(f"pattern {pattern!r} is longer than {MAX_TOPIC_BYTES} bytes")
    return pattern


def zmq_prefix(pattern: str) -> bytes:
    """The byte prefix a SUB socket subscribes to for ``pattern`` (literal part before a wildcard)."""
    out: list[str] = []
    for seg in pattern.split("."):
        if seg in ("*", ">"):
            return (".".join(out) + ".").encode() if out else b""
        out.append(seg)
    return ".".join(out).encode()


@lru_cache(maxsize=4096)
def matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate telling whether a topic matches ``pattern``."""
    segs = tuple(pattern.split("."))
    if "*" not in segs and ">" not in segs:
        return pattern.__eq__
    tail = segs[-1] == ">"
    fixed = segs[:-1] if tail else segs
    n = len(fixed)

    def match(topic: str) -> bool:
        parts = topic.split(".")
        if tail:
            if len(parts) <= n:
                return False
        elif len(parts) != n:
            return False
        for want, got in zip(fixed, parts, strict=False):
            if want != "*" and want != got:
                return False
        return True

    return match
