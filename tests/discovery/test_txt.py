"""TXT codec: golden bytes, round trips, and hostile input."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from meshmq.discovery import (
    MAX_GROUP_BYTES,
    MAX_NAME_BYTES,
    MAX_OFFERS_BYTES,
    OFFERS_TRUNCATED,
    SERVICE_TYPE,
    Advert,
    decode_advert,
    encode_advert,
    pack_txt,
    summarize_offers,
)
from zeroconf import ServiceInfo

from meshmq._errors import ConfigError, DecodeError

GOLDEN_ADVERT = Advert(1, "alpha", "0123456789abcdef", "default", 5555, "t:prices,q:jobs,s:echo")
GOLDEN_PROPS = {
    b"proto": b"1",
    b"name": b"alpha",
    b"id": b"0123456789abcdef",
    b"group": b"default",
    b"port": b"5555",
    b"offers": b"t:prices,q:jobs,s:echo",
}
GOLDEN_TXT = (
    b"\x07proto=1"
    b"\x0aname=alpha"
    b"\x13id=0123456789abcdef"
    b"\x0dgroup=default"
    b"\x09port=5555"
    b"\x1doffers=t:prices,q:jobs,s:echo"
)


def props(**changes: bytes | None) -> dict[bytes, bytes | None]:
    """Return the golden properties with some keys replaced (None value) or removed ("DROP")."""
    result: dict[bytes, bytes | None] = dict(GOLDEN_PROPS)
    for key, value in changes.items():
        if value == b"DROP":
            del result[key.encode()]
        else:
            result[key.encode()] = value
    return result


def test_golden_properties_and_wire_bytes() -> None:
    assert encode_advert(GOLDEN_ADVERT) == GOLDEN_PROPS
    assert list(encode_advert(GOLDEN_ADVERT)) == list(GOLDEN_PROPS)  # key order is part of it
    assert pack_txt(encode_advert(GOLDEN_ADVERT)) == GOLDEN_TXT
    assert decode_advert(GOLDEN_PROPS) == GOLDEN_ADVERT


def test_zeroconf_produces_the_same_wire_bytes() -> None:
    info = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=GOLDEN_PROPS)
    assert info.text == GOLDEN_TXT
    parsed = ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", port=1, properties=GOLDEN_TXT)
    assert decode_advert(parsed.properties) == GOLDEN_ADVERT


def test_largest_advert_fits_the_rfc6763_budget() -> None:
    biggest = Advert(
        65535, "n" * MAX_NAME_BYTES, "f" * 32, "g" * MAX_GROUP_BYTES, 65535, "o" * MAX_OFFERS_BYTES
    )
    encoded = encode_advert(biggest)
    assert all(len(k) + 1 + len(v) <= 255 for k, v in encoded.items())
    assert len(pack_txt(encoded)) < 400  # RFC 6763 §6.2
    assert decode_advert(encoded) == biggest


printable = st.text(min_size=1, max_size=40).filter(str.isprintable)


@st.composite
def adverts(draw: Any) -> Advert:
    name = draw(printable.filter(lambda s: len(s.encode()) <= MAX_NAME_BYTES))
    group = draw(printable.filter(lambda s: len(s.encode()) <= MAX_GROUP_BYTES))
    offers = draw(st.text(max_size=60).filter(str.isprintable))
    node_id = draw(st.text(alphabet="0123456789abcdef", min_size=8, max_size=32))
    return Advert(
        draw(st.integers(1, 65535)),
        name,
        node_id,
        group,
        draw(st.integers(1, 65535)),
        offers,
    )


@settings(max_examples=200, deadline=None)
@given(adverts())
def test_round_trip(advert: Advert) -> None:
    encoded = encode_advert(advert)
    assert decode_advert(encoded) == advert
    wire = pack_txt(encoded)
    assert len(wire) < 400
    assert (
        decode_advert(ServiceInfo(SERVICE_TYPE, f"x.{SERVICE_TYPE}", properties=wire).properties)
        == advert
    )


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"proto", b"name", b"id", b"group", b"port", b"offers", b"x"])
        | st.binary(max_size=12),
        st.none() | st.binary(max_size=300),
        max_size=10,
    )
)
def test_arbitrary_properties_decode_or_raise_decode_error(raw: dict[bytes, bytes | None]) -> None:
    try:
        advert = decode_advert(raw)
    except DecodeError:
        return
    assert decode_advert(encode_advert(advert)) == advert


@pytest.mark.parametrize("key", ["proto", "name", "id", "group", "port", "offers"])
def test_missing_key(key: str) -> None:
    with pytest.raises(DecodeError, match="lacks required keys"):
        decode_advert(props(**{key: b"DROP"}))


@pytest.mark.parametrize("key", ["proto", "name", "id", "group", "port", "offers"])
def test_key_without_value(key: str) -> None:
    with pytest.raises(DecodeError, match="no value"):
        decode_advert(props(**{key: None}))


@pytest.mark.parametrize(
    "changes",
    [
        # bad UTF-8 and non-printable text
        {"name": b"\xff\xfe"},
        {"group": b"caf\xc3"},
        {"offers": b"\xed\xa0\x80"},  # an encoded surrogate
        {"name": b"evil\x1b[2J"},
        {"name": b""},
        {"group": b""},
        # oversized values
        {"name": b"n" * (MAX_NAME_BYTES + 1)},
        {"group": b"g" * (MAX_GROUP_BYTES + 1)},
        {"offers": b"o" * (MAX_OFFERS_BYTES + 1)},
        {"name": b"n" * 300},  # a key=value string longer than 255 bytes
        # ports
        {"port": b"0"},
        {"port": b"65536"},
        {"port": b"-1"},
        {"port": b"+80"},
        {"port": b" 80"},
        {"port": b"080"},
        {"port": b"80a"},
        {"port": b""},
        {"port": "٨٠".encode()},  # int() would accept Arabic-Indic digits
        {"port": b"9" * 40},
        # protocol versions
        {"proto": b"0"},
        {"proto": b"-1"},
        {"proto": b"1.0"},
        {"proto": b"999999"},
        # node ids
        {"id": b"0123ABCD"},
        {"id": b"0123abc"},
        {"id": b"f" * 33},
        {"id": b"0123abcz"},
        {"id": b"\xff" * 10},
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))[:12]!r}",
)
def test_hostile_values(changes: dict[str, bytes]) -> None:
    with pytest.raises(DecodeError):
        decode_advert(props(**changes))


def test_whole_record_too_large() -> None:
    raw = dict(GOLDEN_PROPS)
    for i in range(6):
        raw[b"x%d" % i] = b"v" * 250
    with pytest.raises(DecodeError, match="bytes, more than"):
        decode_advert(raw)


@pytest.mark.parametrize(
    "raw",
    [None, [], "proto=1", {"proto": "1"}, {b"proto": 1}],
    ids=["none", "list", "str", "str-keys", "int-value"],
)
def test_wrong_types(raw: Any) -> None:
    with pytest.raises(DecodeError):
        decode_advert(raw)


def test_unknown_keys_are_ignored_and_higher_proto_decodes() -> None:
    raw = props(proto=b"7")
    raw[b"future"] = b"something"
    raw[b"flag"] = None
    advert = decode_advert(raw)
    assert advert.proto == 7
    assert advert.name == "alpha"


def test_keys_are_case_insensitive_and_first_occurrence_wins() -> None:
    raw: dict[bytes, bytes | None] = {b"NAME": b"first", **GOLDEN_PROPS}
    assert decode_advert(raw).name == "first"  # RFC 6763 §6.4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"proto": 0},
        {"proto": True},
        {"port": 0},
        {"port": 70000},
        {"port": "80"},
        {"name": ""},
        {"name": "x" * 64},
        {"name": "tab\there"},
        {"group": "g" * 33},
        {"node_id": "XYZ"},
        {"node_id": "0123ABCDEF"},
        {"offers": "bell\a"},
    ],
)
def test_invalid_advert_is_config_error(kwargs: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "proto": 1,
        "name": "n",
        "node_id": "0123456789abcdef",
        "group": "g",
        "port": 1,
    }
    base.update(kwargs)
    with pytest.raises(ConfigError):
        Advert(**base)


def test_summarize_offers() -> None:
    assert summarize_offers(["t:a", "q:b"]) == "t:a,q:b"
    assert summarize_offers(["t:a,b", "q:\x00c"]) == "t:ab,q:c"  # commas and controls dropped
    cut = summarize_offers([f"topic-{i}" for i in range(100)], limit=40)
    assert cut.endswith("," + OFFERS_TRUNCATED)
    assert len(cut.encode()) <= 40
    assert cut.split(",")[:-1] == [f"topic-{i}" for i in range(len(cut.split(",")) - 1)]
    assert summarize_offers(["x" * 500]) == OFFERS_TRUNCATED
    with pytest.raises(ConfigError):
        summarize_offers(["a"], limit=1)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=40), st.integers(3, 200))
def test_summarize_offers_always_fits(items: list[str], limit: int) -> None:
    summary = summarize_offers(items, limit)
    assert len(summary.encode()) <= limit
    assert summary.isprintable()


def test_long_offers_are_truncated_on_construction() -> None:
    advert = Advert(1, "n", "0123456789abcdef", "g", 1, ",".join(f"topic-{i}" for i in range(100)))
    assert advert.offers.endswith(OFFERS_TRUNCATED)
    assert len(advert.offers.encode()) <= MAX_OFFERS_BYTES
    assert decode_advert(encode_advert(advert)) == advert


def test_protocol_md_txt_example_is_what_the_codec_packs() -> None:
    """docs/PROTOCOL.md section 16 shows TXT bytes; they must be what encode_advert packs."""
    import re
    from pathlib import Path

    from meshmq.discovery import Advert, encode_advert, pack_txt

    doc = (Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md").read_text()
    section = doc[doc.index("## 16. Discovery"):doc.index("## 17. Worked examples")]
    block = section[section.index("```\n") + 4:section.rindex("```")]
    hexed = "".join(re.sub(r'"[^"]*"', "", line) for line in block.splitlines())
    advert = Advert(1, "billing", "0123456789abcdef0123456789abcdef", "default", 7001,
                    "t:orders.>,q:resize,s:inventory.check")
    assert bytes.fromhex(hexed) == pack_txt(encode_advert(advert))
