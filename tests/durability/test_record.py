"""The sans-IO record codec: golden bytes, round trips, torn input, damage detection."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meshmq.durability import (
    DEFAULT_MAX_RECORD_BYTES,
    HEADER_SIZE,
    RECORD_VERSION,
    CorruptRecordError,
    Record,
    RecordDecoder,
    decode_record,
    encode_record,
    find_record,
)

from meshmq._errors import ConfigError, DecodeError

PROPERTY = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# encode_record(1, 1.5, b"hi"), byte by byte. Changing the layout must break this test.
GOLDEN = bytes.fromhex(
    "01"                  # version 1
    "00"                  # flags
    "12000000"            # length 18 = 16 + len(b"hi"), u32 little-endian
    "1adde67d"            # crc32 of the 18 bytes below, u32 little-endian
    "0100000000000000"    # offset 1, u64 little-endian
    "000000000000f83f"    # timestamp 1.5, f64 little-endian
    "6869"                # payload b"hi"
)

records = st.builds(
    Record,
    offset=st.integers(min_value=0, max_value=2**64 - 1),
    timestamp=st.floats(allow_nan=False),
    payload=st.binary(max_size=300),
)


def test_golden_bytes() -> None:
    assert encode_record(1, 1.5, b"hi") == GOLDEN
    assert HEADER_SIZE == 26 and RECORD_VERSION == 1
    # The crc covers exactly the bytes after the crc field.
    assert struct.unpack_from("<I", GOLDEN, 6)[0] == zlib.crc32(GOLDEN[10:])


def test_golden_bytes_second_record() -> None:
    data = encode_record(0x0102030405060708, -2.25, b"")
    assert data == bytes.fromhex("01 00 10000000 971a7cc1 0807060504030201 00000000000002c0")
    assert decode_record(data) == (Record(0x0102030405060708, -2.25, b""), 26)


def test_decode_golden() -> None:
    assert decode_record(GOLDEN) == (Record(1, 1.5, b"hi"), len(GOLDEN))
    assert decode_record(b"junk" + GOLDEN, 4) == (Record(1, 1.5, b"hi"), 4 + len(GOLDEN))


@PROPERTY
@given(record=records)
def test_round_trip(record: Record) -> None:
    data = encode_record(record.offset, record.timestamp, record.payload)
    assert len(data) == HEADER_SIZE + len(record.payload)
    assert decode_record(data) == (record, len(data))


@PROPERTY
@given(batch=st.lists(records, max_size=8), cuts=st.lists(st.integers(0, 3000), max_size=10))
def test_incremental_decoder_any_chunking(batch: list[Record], cuts: list[int]) -> None:
    stream = b"".join(encode_record(r.offset, r.timestamp, r.payload) for r in batch)
    decoder = RecordDecoder()
    out: list[Record] = []
    last = 0
    for cut in sorted(c for c in cuts if c <= len(stream)) + [len(stream)]:
        decoder.feed(stream[last:cut])
        last = cut
        out.extend(decoder)
    assert out == batch
    assert decoder.buffered == 0 and decoder.position == len(stream)


def test_every_torn_prefix_needs_more_data() -> None:
    data = encode_record(7, 3.0, b"payload bytes")
    for cut in range(len(data)):
        assert decode_record(data[:cut]) is None, cut
        decoder = RecordDecoder()
        decoder.feed(data[:cut])
        assert decoder.next() is None, cut
        assert list(decoder) == []
        decoder.feed(data[cut:])
        assert decoder.next() == Record(7, 3.0, b"payload bytes")


@PROPERTY
@given(record=records, data=st.data())
def test_torn_prefix_property(record: Record, data: st.DataObject) -> None:
    encoded = encode_record(record.offset, record.timestamp, record.payload)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    assert decode_record(encoded[:cut]) is None


def test_every_single_bit_flip_is_detected() -> None:
    data = encode_record(12345, 99.5, b"a payload that fills a few bytes")
    for bit in range(len(data) * 8):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        try:
            result = decode_record(bytes(damaged))
        except CorruptRecordError as exc:
            assert exc.position == 0
        else:
            # Only a larger length can look incomplete; never a wrong record.
            assert result is None, bit
            assert 2 * 8 <= bit < 6 * 8


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"\x02" + b[1:], "version"),
        (lambda b: b"\x00" + b[1:], "version"),
        (lambda b: b[:1] + b"\x80" + b[2:], "flags"),
        (lambda b: b[:2] + struct.pack("<I", 15) + b[6:], "length"),
        (lambda b: b[:2] + struct.pack("<I", DEFAULT_MAX_RECORD_BYTES) + b[6:], "length"),
        (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "crc"),
        (lambda b: b[:6] + b"\0\0\0\0" + b[10:], "crc"),
    ],
)
def test_damage_reports_position_of_bad_record(mutate: object, reason: str) -> None:
    good = encode_record(0, 1.0, b"first")
    bad = mutate(encode_record(1, 2.0, b"second"))  # type: ignore[operator]
    decoder = RecordDecoder(position=1000)
    decoder.feed(good + bad + encode_record(2, 3.0, b"third"))
    assert decoder.next() == Record(0, 1.0, b"first")
    with pytest.raises(CorruptRecordError) as info:
        decoder.next()
    assert info.value.position == 1000 + len(good)
    assert reason in info.value.reason
    assert isinstance(info.value, DecodeError) and isinstance(info.value, ValueError)
    # The decoder stays failed: it never skips over damage silently.
    with pytest.raises(CorruptRecordError):
        decoder.next()
    with pytest.raises(CorruptRecordError):
        decode_record(bad)


def test_bad_version_detected_from_first_byte() -> None:
    decoder = RecordDecoder()
    decoder.feed(b"\x00")  # e.g. a preallocated, zero-filled tail
    with pytest.raises(CorruptRecordError, match="version"):
        decoder.next()


def test_impossible_length_detected_before_the_body_arrives() -> None:
    decoder = RecordDecoder(max_record_bytes=1024)
    decoder.feed(bytes([RECORD_VERSION, 0]) + struct.pack("<I", 5000))
    with pytest.raises(CorruptRecordError, match="length"):
        decoder.next()


def test_record_size_cap() -> None:
    assert len(encode_record(0, 0.0, b"x" * 74, max_record_bytes=100)) == 100
    with pytest.raises(ConfigError):
        encode_record(0, 0.0, b"x" * 75, max_record_bytes=100)
    big = encode_record(0, 0.0, b"x" * 75)
    with pytest.raises(CorruptRecordError):
        decode_record(big, max_record_bytes=100)
    assert decode_record(big, max_record_bytes=101) is not None
    with pytest.raises(ConfigError):
        RecordDecoder(max_record_bytes=HEADER_SIZE - 1)


def test_encode_rejects_bad_fields() -> None:
    with pytest.raises(ConfigError):
        encode_record(-1, 0.0, b"")
    with pytest.raises(ConfigError):
        encode_record(2**64, 0.0, b"")


def test_find_record_resynchronises() -> None:
    garbage = b"\x01\x00\x10garbage\x01\x00" + bytes(40)
    second = encode_record(5, 5.0, b"five")
    data = garbage + second
    assert find_record(data) == (len(garbage), Record(5, 5.0, b"five"))
    assert find_record(data, len(garbage) + 1) is None
    assert find_record(bytes(100)) is None
    assert find_record(memoryview(data)) == (len(garbage), Record(5, 5.0, b"five"))


def test_record_is_frozen() -> None:
    record = Record(1, 2.0, b"x")
    with pytest.raises(AttributeError):
        record.offset = 2  # type: ignore[misc]
    assert record == Record(1, 2.0, b"x") and hash(record) == hash(Record(1, 2.0, b"x"))
