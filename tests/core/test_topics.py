from __future__ import annotations

import pytest

from meshmq import ConfigError
from meshmq._topics import check_pattern, check_topic, matcher, zmq_prefix

MATCH_TABLE = [
    # pattern,            topic,                    matches
    ("orders.created",    "orders.created",         True),
    ("orders.created",    "orders.created.v2",      False),
    ("orders.created",    "orders",                 False),
    ("orders.*",          "orders.created",         True),
    ("orders.*",          "orders.created.v2",      False),
    ("orders.*",          "orders",                 False),
    ("orders.*",          "ordersX.created",        False),
    ("*.created",         "orders.created",         True),
    ("*.created",         "orders.deleted",         False),
    ("orders.*.eu",       "orders.created.eu",      True),
    ("orders.*.eu",       "orders.created.us",      False),
    ("orders.>",          "orders.created",         True),
    ("orders.>",          "orders.created.v2.eu",   True),
    ("orders.>",          "orders",                 False),
    (">",                 "anything.at.all",        True),
    (">",                 "x",                      True),
    ("*",                 "x",                      True),
    ("*",                 "x.y",                    False),
    ("*.*.>",             "a.b.c",                  True),
    ("*.*.>",             "a.b",                    False),
]


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_matching(pattern: str, topic: str, expected: bool) -> None:
    assert matcher(check_pattern(pattern))(check_topic(topic).decode()) is expected


@pytest.mark.parametrize(("pattern", "topic", "expected"), MATCH_TABLE)
def test_zmq_prefix_never_filters_out_a_match(pattern: str, topic: str, expected: bool) -> None:
    # ZeroMQ filters by prefix first: every matching topic must pass the prefix filter.
    if expected:
        assert topic.encode().startswith(zmq_prefix(pattern))


@pytest.mark.parametrize("topic", ["", "a..b", ".a", "a.", "a.*", "a.>", "a b", "x\x00y",
                                   "a" * 300])
def test_bad_topics(topic: str) -> None:
    with pytest.raises(ConfigError):
        check_topic(topic)


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "> .x", "a.b*", "a.>x"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(ConfigError):
        check_pattern(pattern)


def test_prefixes() -> None:
    assert zmq_prefix("orders.created") == b"orders.created"
    assert zmq_prefix("orders.*") == b"orders."
    assert zmq_prefix("orders.*.eu") == b"orders."
    assert zmq_prefix(">") == b""
