"""Golden bytes: these pin the wire format documented in docs/PROTOCOL.md."""

from __future__ import annotations

import msgpack
import pytest

from meshmq import DecodeError, ProtocolVersionError
from meshmq._engine import marker_topic
from meshmq._envelope import PubEncoder, decode_ctl, decode_pub, encode_ctl, message_ids

GOLDEN_PUB = bytes.fromhex(
    "98"                      # array of 8
    "01"                      # protocol version 1
    "a4" "612d3031"           # id "a-01"
    "a7" "62696c6c696e67"     # source "billing"
    "a1" "61"                 # source_id "a"
    "05"                      # seq 5
    "cb" "41d9c4afc5800000"   # timestamp 1729281814.0 (float64)
    "81" "a16b" "a176"        # headers {"k": "v"}
    "81" "a26964" "01"        # body {"id": 1}
)


def test_pub_payload_golden_bytes() -> None:
    payload = PubEncoder().encode("a-01", "billing", "a", 5, 1729281814.0, {"k": "v"}, {"id": 1})
    assert payload == GOLDEN_PUB
    assert decode_pub(b"orders.created", GOLDEN_PUB) == (
        "orders.created", "a-01", "billing", "a", 5, 1729281814.0, {"k": "v"}, {"id": 1})


def test_nil_headers_decode_as_empty_map() -> None:
    payload = PubEncoder().encode("i", "s", "a", 1, 1.0, None, None)
    assert payload == bytes.fromhex("98 01 a169 a173 a161 01 cb3ff0000000000000 c0 c0")
    assert decode_pub(b"t", payload)[6] == {}


def test_later_minor_versions_may_append_fields() -> None:
    arr = msgpack.unpackb(GOLDEN_PUB)
    assert decode_pub(b"t", msgpack.packb([*arr, "future"]))[7] == {"id": 1}


def test_control_golden_bytes() -> None:
    assert encode_ctl("ping", {"id": "ab"}) == bytes.fromhex("93 01 a470696e67 81 a26964 a26162")
    assert decode_ctl(bytes.fromhex("93 01 a470696e67 81 a26964 a26162")) == ("ping", {"id": "ab"})


def test_marker_topic_layout() -> None:
    assert marker_topic("0123456789abcdef", 7) == b"\xff0123456789abcdef\x00\x00\x00\x07"


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"not msgpack at all", msgpack.packb({"a": 1}), msgpack.packb([]),
    msgpack.packb([1, "id"]),                                   # too few fields
    msgpack.packb([1, 2, "s", "a", 1, 1.0, None, None]),        # id not a string
    msgpack.packb([1, "i", "s", "a", "1", 1.0, None, None]),    # seq not an int
    msgpack.packb([1, "i", "s", "a", 1, 1.0, [], None]),        # headers not a map
])
def test_malformed_pub_payloads(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_pub(b"t", payload)


def test_unknown_version_is_its_own_error() -> None:
    with pytest.raises(ProtocolVersionError):
        decode_pub(b"t", msgpack.packb([2, "i", "s", "a", 1, 1.0, None, None]))
    with pytest.raises(ProtocolVersionError):
        decode_ctl(msgpack.packb([9, "ping", {}]))


def test_bad_topic_encoding() -> None:
    with pytest.raises(DecodeError):
        decode_pub(b"\xff\xfe", GOLDEN_PUB)


@pytest.mark.parametrize("version", [True, 1.0, 2])
def test_version_must_be_the_integer_one(version: object) -> None:
    pub = msgpack.packb([version, "id", "src", "sid", 1, 1.0, {}, None])
    with pytest.raises(ProtocolVersionError):
        decode_pub(b"t", pub)
    with pytest.raises(ProtocolVersionError):
        decode_ctl(msgpack.packb([version, "ping", {}]))


def test_message_ids_are_the_prefix_and_a_lowercase_hex_counter() -> None:
    # PROTOCOL.md 6.2: "<node-id>-<n>", n from 1 in hex without leading zeros; the generator
    # builds them in blocks of 256, so cross several block boundaries.
    ids = message_ids("3f2a-")
    assert [next(ids) for _ in range(3)] == ["3f2a-1", "3f2a-2", "3f2a-3"]
    for n in range(4, 70_000):
        assert next(ids) == f"3f2a-{n:x}"
