"""The one msgpack codec: options, bounds and the ext-type registry.

Every byte meshmq puts on the wire goes through here. Options are fixed: ``use_bin_type=True``
on the way out; ``raw=False``, ``strict_map_key=True`` and bounded sizes on the way in. Pickle is
never used.

Ext codes: msgpack reserves negative codes (-1 is the standard timestamp, which carries
timezone-aware datetimes). meshmq reserves 0-31 for its own types; users register 32-127 with
:func:`register_type`. An ext code nobody registered decodes to :class:`msgpack.ExtType` and
re-encodes unchanged, so a node relays data it does not understand.
"""

from __future__ import annotations

import datetime as _dt
import decimal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from meshmq._errors import ConfigError, DecodeError, EncodeError

__all__ = ["MAX_MESSAGE_BYTES", "decode", "encode", "register_type"]

#: Default cap on one frame (bytes). Also set as ZMQ_MAXMSGSIZE on receiving sockets.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

USER_CODES = range(32, 128)

# meshmq's own ext codes (documented in docs/PROTOCOL.md, "Ext types").
EXT_UUID = 1
EXT_DECIMAL = 2
EXT_SET = 3
EXT_FROZENSET = 4
EXT_NAIVE_DATETIME = 5
EXT_DATE = 6


@dataclass(frozen=True)
class _ExtSpec:
    code: int
    cls: type
    to_bytes: Callable[[Any], bytes]
    from_bytes: Callable[[bytes], Any]


_by_type: dict[type, _ExtSpec] = {}
_by_code: dict[int, _ExtSpec] = {}


def _register(code: int, cls: type, to_bytes: Callable[[Any], bytes],
              from_bytes: Callable[[bytes], Any]) -> None:
    spec = _ExtSpec(code, cls, to_bytes, from_bytes)
    _by_type[cls] = spec
    _by_code[code] = spec


def register_type(code: int, cls: type, to_bytes: Callable[[Any], bytes],
                  from_bytes: Callable[[bytes], Any]) -> None:
    """Teach the codec a type: ``to_bytes(obj)`` on encode, ``from_bytes(data)`` on decode.

    ``code`` must be in 32..127 (0..31 are meshmq's). Every node that receives the type must
    register it too; one that did not sees a :class:`msgpack.ExtType` and can relay it intact.
    """
    if code not in USER_CODES:
        raise ConfigError(f"ext code {code} is outside the user range 32..127")
    existing = _by_code.get(code)
    if existing is not None and existing.cls is not cls:
        raise ConfigError(f"ext code {code} is already registered for {existing.cls.__qualname__}")
    _register(code, cls, to_bytes, from_bytes)


def _pack_collection(items: Any) -> bytes:
    return encode(list(items))


def _unpack_collection(data: bytes) -> list[Any]:
    out = _unpackb(data)
    if not isinstance(out, list):
        raise DecodeError("set ext payload is not an array")
    return out


_register(EXT_UUID, uuid.UUID, lambda u: u.bytes, lambda b: uuid.UUID(bytes=bytes(b)))
_register(EXT_DECIMAL, decimal.Decimal, lambda d: str(d).encode(),
          lambda b: decimal.Decimal(bytes(b).decode()))
_register(EXT_SET, set, _pack_collection, lambda b: set(_unpack_collection(b)))
_register(EXT_FROZENSET, frozenset, _pack_collection, lambda b: frozenset(_unpack_collection(b)))
_register(EXT_NAIVE_DATETIME, _dt.datetime, lambda d: d.isoformat().encode(),
          lambda b: _dt.datetime.fromisoformat(bytes(b).decode()))
_register(EXT_DATE, _dt.date, lambda d: d.isoformat().encode(),
          lambda b: _dt.date.fromisoformat(bytes(b).decode()))


def _default(obj: Any) -> Any:
    spec = _by_type.get(type(obj))
    if spec is None:
        for cls, candidate in _by_type.items():  # subclasses (e.g. a UUID subclass)
            if isinstance(obj, cls) and cls is not _dt.date:
                spec = candidate
                break
    if spec is None:
        raise EncodeError(
            f"cannot encode object of type {type(obj).__module__}.{type(obj).__qualname__}; "
            "register it with meshmq.register_type()")
    # to_bytes may encode too (sets do): not with this thread's packer, which is mid-way
    # through the enclosing value; an encode in there makes and keeps its own until we return.
    outer = _tls.__dict__.pop("pack", None)
    try:
        return msgpack.ExtType(spec.code, spec.to_bytes(obj))
    finally:
        if outer is not None:
            _tls.pack = outer


def _ext_hook(code: int, data: bytes) -> Any:
    spec = _by_code.get(code)
    if spec is None:
        return msgpack.ExtType(code, data)
    try:
        return spec.from_bytes(data)
    except Exception as exc:
        raise DecodeError(f"bad payload for ext type {code} ({spec.cls.__qualname__})") from exc


def new_packer() -> msgpack.Packer:
    """A packer with meshmq's options. Not thread-safe: keep one per thread or lock."""
    # datetime=True packs timezone-aware datetimes as the standard timestamp ext (-1), which
    # every msgpack implementation understands; naive ones fall to _default (ext 5).
    return msgpack.Packer(default=_default, use_bin_type=True, datetime=True)


def _unpackb(data: bytes | memoryview) -> Any:
    # unpackb bounds every str/bin/array/map length by len(data); frames themselves are capped
    # by ZMQ_MAXMSGSIZE before they reach us.
    return msgpack.unpackb(data, raw=False, strict_map_key=True, ext_hook=_ext_hook, timestamp=3)


_LEAVES = frozenset({str, bytes, int, float, bool, type(None)})
CONTAINERS = frozenset({dict, list, tuple})


#: Containers nested deeper than this are refused when encoding (the receivers' decoder stops
#: near 1024 levels, with the envelope around the body; and no message needs this many).
MAX_DEPTH = 500


def check_keys(obj: Any, depth: int = 0) -> None:
    """Raise :class:`EncodeError` if ``obj`` holds a map key other than str or bytes, or
    nests containers deeper than ``MAX_DEPTH``.

    msgpack packs any key, but receivers decode with ``strict_map_key`` (only str and bytes
    keys, so a peer cannot make a node hash attacker-chosen ints), so such a message would be
    dropped by every receiver as malformed: refuse it at the sender instead. Only dicts,
    lists and tuples are walked; a scalar costs one type check.
    """
    if depth >= MAX_DEPTH:
        raise EncodeError(f"containers nested deeper than {MAX_DEPTH} levels")
    t = type(obj)
    if t is dict:
        for k, v in obj.items():
            if type(k) is not str and not isinstance(k, (str, bytes)):
                raise EncodeError(f"map key {k!r} is a {type(k).__name__}: keys must be str or"
                                  " bytes (receivers refuse other keys)")
            if type(v) not in _LEAVES:
                check_keys(v, depth + 1)
    elif t is list or t is tuple:
        for v in obj:
            if type(v) not in _LEAVES:
                check_keys(v, depth + 1)


def encode(obj: Any) -> bytes:
    """Encode one value from a user (a body, headers, call arguments, a result): refuses, with
    :class:`EncodeError`, what receivers would refuse (see :func:`check_keys`)."""
    if type(obj) in CONTAINERS:
        check_keys(obj)
    return pack(obj)


_tls = threading.local()


def pack(obj: Any) -> bytes:
    """Encode with a packer kept per thread (``msgpack.packb`` builds one per call, ~2 us),
    without :func:`check_keys`: for meshmq's own envelopes, whose keys it chose, around
    user values already encoded or checked."""
    try:
        packer = _tls.pack
    except AttributeError:
        packer = _tls.pack = new_packer().pack
    try:
        data: bytes = packer(obj)   # the packer resets itself when packing fails
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        raise EncodeError(f"cannot encode {type(obj).__qualname__}: {exc}") from exc
    return data


def decode(data: bytes | memoryview) -> Any:
    """Decode one value; any malformed input raises :class:`DecodeError`."""
    try:
        return _unpackb(data)
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not valid msgpack: {exc}") from exc
