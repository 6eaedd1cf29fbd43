"""The one error tree of meshmq.

::

    MeshError
    ├── MeshTimeout (also TimeoutError)      no answer, subscriber or ack in time
    ├── NoPeerError                          nobody serves that queue or service
    ├── Backpressure                         a bounded queue is full (push(block=False))
    ├── RemoteError                          a remote handler raised; carries type, message, traceback
    ├── PeerGone (also ConnectionError)      the peer handling a call left before it replied
    ├── NodeClosed (also RuntimeError)       you used a node after stop(), or before start()
    ├── ConfigError (also ValueError)        a bad argument: endpoint, pattern, option
    ├── EncodeError (also TypeError)         a body that cannot be encoded (names the type)
    ├── DecodeError (also ValueError)        bytes that are not a valid meshmq frame or record
    │   └── ProtocolVersionError             a frame of a protocol version we do not speak
    └── StorageError (also OSError)          the journal's disk failed (full, I/O error)

Names say who is at fault: ``NodeClosed`` and ``ConfigError`` are the caller's;
``DecodeError`` is the peer's; ``StorageError`` is the machine's. ``__cause__`` carries the
underlying zmq, msgpack or OS error.
"""

from __future__ import annotations

__all__ = [
    "Backpressure",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "MeshError",
    "MeshTimeout",
    "NoPeerError",
    "NodeClosed",
    "PeerGone",
    "ProtocolVersionError",
    "RemoteError",
    "StorageError",
]


class MeshError(Exception):
    """Base class of every error meshmq raises."""


class MeshTimeout(MeshError, TimeoutError):
    """Nothing answered within the timeout."""


class NoPeerError(MeshError):
    """No node serves the queue or service asked for."""


class Backpressure(MeshError):
    """A bounded queue is full and the caller asked not to block."""


class PeerGone(MeshError, ConnectionError):
    """The server handling a call left (died or stopped) before it replied."""


class NodeClosed(MeshError, RuntimeError):
    """The node is not running (not started yet, or stopped)."""


class ConfigError(MeshError, ValueError):
    """An argument or setting is invalid."""


class EncodeError(MeshError, TypeError):
    """A value cannot be encoded with msgpack and the registered ext types."""


class DecodeError(MeshError, ValueError):
    """Bytes that do not form a valid meshmq frame or record."""


class ProtocolVersionError(DecodeError):
    """A frame of a protocol version this node does not speak."""


class StorageError(MeshError, OSError):
    """The journal's storage failed (disk full, I/O error)."""


class RemoteError(MeshError):
    """A remote handler raised. Carries the remote type name, message and traceback text.

    Nothing named here is ever imported: the remote exception travels as data.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
