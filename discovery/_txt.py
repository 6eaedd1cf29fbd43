"""Sans-IO codec between an :class:`Advert` and the DNS-SD TXT record of a meshmq node.

The TXT record carries only what a peer needs to decide whether to dial: protocol
version, node name and id, group, control port and a short summary of what the node
offers. The host is never in the TXT: it comes from the mDNS address records, so a
node cannot tell a remote host to dial "127.0.0.1". The full detail of what a node
offers travels in the meshmq handshake.

Wire layout (RFC 6763 §6), keys in this order, each string ``key=value``::

    proto=1  name=<utf-8>  id=<hex>  group=<utf-8>  port=<decimal>  offers=<utf-8>

Version rule: ``proto`` is the meshmq protocol version. A TXT whose ``proto`` is
higher than ours is still decoded as long as the six keys above are present and valid,
because the schema is append-only: a newer node keeps publishing these keys and adds
new ones, which older decoders ignore (unknown keys are skipped). Deciding whether we
can talk to it is the handshake's job, not discovery's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshmq._errors import ConfigError, DecodeError

__all__ = [
    "MAX_GROUP_BYTES",
    "MAX_NAME_BYTES",
    "MAX_OFFERS_BYTES",
    "OFFERS_TRUNCATED",
    "PROTO_VERSION",
    "Advert",
    "decode_advert",
    "encode_advert",
    "pack_txt",
    "summarize_offers",
]

PROTO_VERSION = 1
"""The meshmq protocol version this code speaks and advertises."""

# Field limits. With them the whole TXT record is at most 303 bytes: RFC 6763 §6.2
# asks for 200 bytes "typically" and under 400 so the record fits one 512-byte DNS
# message; each key=value string is also far below the 255-byte limit of §6.1.
MAX_NAME_BYTES = 63
MAX_GROUP_BYTES = 32
MAX_OFFERS_BYTES = 128
MIN_NODE_ID_LEN = 8
MAX_NODE_ID_LEN = 32
MAX_PROTO = 65535

OFFERS_TRUNCATED = "…"
"""Last item of an ``offers`` summary that did not fit: the list is partial."""

# Hard ceiling accepted when decoding: RFC 6763 §6.2 says keep TXT under 1300 bytes
# (one Ethernet frame) even in extreme cases; a peer sending more is hostile or broken.
_MAX_DECODE_TXT_BYTES = 1300
# RFC 6763 §6.1: each constituent string is a length byte plus at most 255 bytes.
_MAX_STRING_BYTES = 255

_K_PROTO = b"proto"
_K_NAME = b"name"
_K_ID = b"id"
_K_GROUP = b"group"
_K_PORT = b"port"
_K_OFFERS = b"offers"
_REQUIRED = (_K_PROTO, _K_NAME, _K_ID, _K_GROUP, _K_PORT, _K_OFFERS)

# Canonical decimal only: no sign, no leading zero, no spaces, ASCII digits only
# (int() would also accept "+80", " 80", "8_0" and non-ASCII digits).
_DECIMAL = re.compile(rb"[1-9][0-9]{0,4}")
_HEX_ID = re.compile(rf"[0-9a-f]{{{MIN_NODE_ID_LEN},{MAX_NODE_ID_LEN}}}")


@dataclass(frozen=True, slots=True)
class Advert:
    """What one node publishes about itself; validated on construction (ConfigError).

    ``offers`` longer than MAX_OFFERS_BYTES is cut at an item boundary and ends in
    OFFERS_TRUNCATED (see summarize_offers), so a node with many topics never fails here.
    """

    proto: int
    name: str
    node_id: str
    group: str
    port: int
    offers: str = ""

    def __post_init__(self) -> None:
        offers = self.offers
        if isinstance(offers, str) and len(offers.encode("utf-8", "replace")) > MAX_OFFERS_BYTES:
            object.__setattr__(self, "offers", summarize_offers(offers.split(",")))
        problem = _problem(self)
        if problem is not None:
            raise ConfigError(f"invalid advert: {problem}")


def _text_problem(field: str, value: object, max_bytes: int, *, empty_ok: bool) -> str | None:
    """Return why a text field is invalid, or None."""
    if not isinstance(value, str):
        return f"{field} must be str, not {type(value).__name__}"
    if not value and not empty_ok:
        return f"{field} must not be empty"
    if not value.isprintable():
        # Control characters (and lone surrogates, which UTF-8 cannot carry) would end
        # up in the logs and terminals of every peer.
        return f"{field} has non-printable characters"
    if len(value.encode("utf-8")) > max_bytes:
        return f"{field} is longer than {max_bytes} bytes in UTF-8"
    return None


def _problem(advert: Advert) -> str | None:
    """Return the first reason the advert is invalid, or None."""
    proto, port = advert.proto, advert.port
    if type(proto) is not int or not 1 <= proto <= MAX_PROTO:
        return f"proto must be an int in 1..{MAX_PROTO}, got {proto!r}"
    if type(port) is not int or not 1 <= port <= 65535:
        return f"port must be an int in 1..65535, got {port!r}"
    if not isinstance(advert.node_id, str) or _HEX_ID.fullmatch(advert.node_id) is None:
        return (
            f"node_id must be {MIN_NODE_ID_LEN}..{MAX_NODE_ID_LEN} lowercase hex digits,"
            f" got {advert.node_id!r}"
        )
    return (
        _text_problem("name", advert.name, MAX_NAME_BYTES, empty_ok=False)
        or _text_problem("group", advert.group, MAX_GROUP_BYTES, empty_ok=False)
        or _text_problem("offers", advert.offers, MAX_OFFERS_BYTES, empty_ok=True)
    )


def summarize_offers(items: Iterable[str], limit: int = MAX_OFFERS_BYTES) -> str:
    """Join offer names with commas into at most ``limit`` UTF-8 bytes, ending in OFFERS_TRUNCATED if cut."""
    if limit < len(OFFERS_TRUNCATED.encode()):
        raise ConfigError(f"limit must be at least {len(OFFERS_TRUNCATED.encode())} bytes")
    # Commas separate items, so an item may not contain one; non-printable
    # characters are dropped rather than failing the whole advert.
    clean = ["".join(c for c in item if c.isprintable() and c != ",") for item in items]
    clean = [item for item in clean if item]
    full = ",".join(clean)
    if len(full.encode()) <= limit:
        return full
    marker_bytes = len(OFFERS_TRUNCATED.encode())
    kept: list[str] = []
    used = 0
    for item in clean:
        cost = len(item.encode()) + 1  # the item and the comma after it
        if used + cost + marker_bytes > limit:
            break
        kept.append(item)
        used += cost
    return ",".join([*kept, OFFERS_TRUNCATED])


def encode_advert(advert: Advert) -> dict[bytes, bytes]:
    """Return the TXT properties of an advert, keys in wire order."""
    # The dataclass validated every field, so sizes are within the budget above.
    return {
        _K_PROTO: str(advert.proto).encode(),
        _K_NAME: advert.name.encode(),
        _K_ID: advert.node_id.encode(),
        _K_GROUP: advert.group.encode(),
        _K_PORT: str(advert.port).encode(),
        _K_OFFERS: advert.offers.encode(),
    }


def pack_txt(props: Mapping[bytes, bytes | None]) -> bytes:
    """Return the TXT RDATA for properties: length-prefixed ``key=value`` strings (RFC 6763 §6.1)."""
    out = bytearray()
    for key, value in props.items():
        item = key if value is None else key + b"=" + value
        if not key or b"=" in key or len(item) > _MAX_STRING_BYTES:
            raise ConfigError(f"TXT string for key {key!r} is empty, has '=' or exceeds 255 bytes")
        out.append(len(item))
        out += item
    return bytes(out)


def _decode_text(key: bytes, raw: bytes, max_bytes: int, *, empty_ok: bool) -> str:
    """Return a validated UTF-8 text value or raise DecodeError."""
    if len(raw) > max_bytes:
        raise DecodeError(f"TXT {key.decode()} is longer than {max_bytes} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"TXT {key.decode()} is not valid UTF-8") from exc
    problem = _text_problem(key.decode(), text, max_bytes, empty_ok=empty_ok)
    if problem is not None:
        raise DecodeError(f"TXT {problem}")
    return text


def _decode_decimal(key: bytes, raw: bytes, maximum: int) -> int:
    """Return a canonical positive decimal no larger than maximum or raise DecodeError."""
    if _DECIMAL.fullmatch(raw) is None or int(raw) > maximum:
        raise DecodeError(f"TXT {key.decode()} must be a decimal in 1..{maximum}, got {raw[:16]!r}")
    return int(raw)


def decode_advert(props: Mapping[bytes, bytes | None]) -> Advert:
    """Return the advert in TXT properties; raise DecodeError on missing, malformed or oversized keys."""
    if not isinstance(props, Mapping):
        raise DecodeError(f"TXT properties must be a mapping, got {type(props).__name__}")
    total = 0
    fields: dict[bytes, bytes] = {}
    for key, value in props.items():
        if not isinstance(key, bytes) or not (value is None or isinstance(value, bytes)):
            raise DecodeError("TXT keys and values must be bytes")
        size = len(key) + (0 if value is None else 1 + len(value))
        if size > _MAX_STRING_BYTES:
            raise DecodeError(f"TXT string for key {key[:16]!r} exceeds 255 bytes")
        total += 1 + size
        # RFC 6763 §6.4: keys are case-insensitive and only the first occurrence
        # of a key counts. Unknown keys are skipped for forward compatibility.
        lowered = key.lower()
        if lowered in _REQUIRED and lowered not in fields:
            if value is None:
                raise DecodeError(f"TXT {lowered.decode()} has no value")
            fields[lowered] = value
    if total > _MAX_DECODE_TXT_BYTES:
        raise DecodeError(f"TXT record is {total} bytes, more than {_MAX_DECODE_TXT_BYTES}")
    missing = [k.decode() for k in _REQUIRED if k not in fields]
    if missing:
        raise DecodeError(f"TXT lacks required keys: {', '.join(missing)}")
    node_id_raw = fields[_K_ID]
    if len(node_id_raw) > MAX_NODE_ID_LEN:
        raise DecodeError(f"TXT id is longer than {MAX_NODE_ID_LEN} characters")
    node_id = node_id_raw.decode("ascii", "replace")
    if _HEX_ID.fullmatch(node_id) is None:
        raise DecodeError(
            f"TXT id must be {MIN_NODE_ID_LEN}..{MAX_NODE_ID_LEN} lowercase hex digits"
        )
    try:
        return Advert(
            proto=_decode_decimal(_K_PROTO, fields[_K_PROTO], MAX_PROTO),
            name=_decode_text(_K_NAME, fields[_K_NAME], MAX_NAME_BYTES, empty_ok=False),
            node_id=node_id,
            group=_decode_text(_K_GROUP, fields[_K_GROUP], MAX_GROUP_BYTES, empty_ok=False),
            port=_decode_decimal(_K_PORT, fields[_K_PORT], 65535),
            offers=_decode_text(_K_OFFERS, fields[_K_OFFERS], MAX_OFFERS_BYTES, empty_ok=True),
        )
    except ConfigError as exc:  # pragma: no cover - every field was checked above
        raise DecodeError(str(exc)) from exc
