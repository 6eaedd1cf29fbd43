from __future__ import annotations

import datetime as dt
import decimal
import uuid

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import meshmq
from meshmq import ConfigError, DecodeError, EncodeError
from meshmq._codec import decode, encode


def test_builtin_ext_types_round_trip() -> None:
    value = {
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "decimal": decimal.Decimal("1.10"),
        "set": {1, 2, 3},
        "frozenset": frozenset({"a"}),
        "naive": dt.datetime(2026, 11, 23, 9, 30, 1, 5),
        "aware": dt.datetime(2026, 11, 23, 9, 30, tzinfo=dt.UTC),
        "date": dt.date(2026, 11, 23),
        "bytes": b"\x00\xff",
    }
    out = decode(encode(value))
    assert out == value
    assert type(out["bytes"]) is bytes and type(out["frozenset"]) is frozenset


def test_aware_datetime_uses_the_standard_timestamp_ext() -> None:
    raw = encode(dt.datetime(1970, 1, 1, 0, 0, 1, tzinfo=dt.UTC))
    assert raw == b"\xd6\xff\x00\x00\x00\x01"  # fixext4, type -1, seconds=1


def test_unknown_ext_passes_through_unchanged() -> None:
    foreign = msgpack.packb([msgpack.ExtType(99, b"opaque")])
    value = decode(foreign)
    assert value == [msgpack.ExtType(99, b"opaque")]
    assert encode(value) == foreign


def test_unencodable_type_names_the_type() -> None:
    class Widget:
        pass

    with pytest.raises(EncodeError, match="Widget"):
        encode({"w": Widget()})


def test_register_type() -> None:
    class Point:
        def __init__(self, x: int, y: int) -> None:
            self.x, self.y = x, y

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    meshmq.register_type(77, Point, lambda p: bytes([p.x, p.y]), lambda b: Point(b[0], b[1]))
    assert decode(encode([Point(1, 2)])) == [Point(1, 2)]
    with pytest.raises(ConfigError):
        meshmq.register_type(3, Point, bytes, bytes)  # meshmq's own range
    with pytest.raises(ConfigError):
        meshmq.register_type(77, dict, bytes, dict)   # taken


def test_keys_receivers_would_refuse_are_refused_when_encoding() -> None:
    class Name(str):
        pass

    for bad in ({1: "x"}, [{"a": {(1, 2): 3}}], ({"ok": [{None: 1}]},)):
        with pytest.raises(EncodeError, match="keys must be str or bytes"):
            encode(bad)
    deep: object = 1
    for _ in range(600):
        deep = [deep]
    with pytest.raises(EncodeError, match="nested deeper"):
        encode({"deep": deep})
    value = {"a": [{"b": {b"raw": 1}}], Name("sub"): (1, 2.5, None)}
    assert decode(encode(value)) == {"a": [{"b": {b"raw": 1}}], "sub": [1, 2.5, None]}


def test_strict_map_keys_and_garbage() -> None:
    with pytest.raises(DecodeError):
        decode(msgpack.packb({1: "x"}))  # non-str keys are refused
    with pytest.raises(DecodeError):
        decode(b"\xc1")  # never-used byte
    with pytest.raises(DecodeError):
        decode(b"\x92\x01")  # truncated array


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_round_trip_property(value: object) -> None:
    assert decode(encode(value)) == value


def test_ext_types_that_encode_inside_encode_nest() -> None:
    # A set's payload is itself encoded while the enclosing value is being packed: that inner
    # encode must not reuse the thread's packer, which is mid-way through the outer value.
    value = [{frozenset({1, 2}), frozenset({3})}, {"a": {4}}, "tail"]
    assert decode(encode(value)) == value
    assert decode(encode(value)) == value   # and the thread's packer still works after
