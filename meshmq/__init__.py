"""meshmq: brokerless messaging over ZeroMQ for systems on a LAN.

Peers publish and subscribe, push tasks to workers and call services, find each other with
mDNS, and optionally persist what they publish in a journal node. See README.md.
"""

from meshmq._async import AsyncNode
from meshmq._codec import register_type
from meshmq._dispatch import HandlerSpec, subscribe
from meshmq._errors import (
    Backpressure,
    ConfigError,
    DecodeError,
    EncodeError,
    MeshError,
    MeshTimeout,
    NodeClosed,
    NoPeerError,
    PeerGone,
    ProtocolVersionError,
    RemoteError,
    StorageError,
)
from meshmq._message import Message
from meshmq._node import Node
from meshmq._peers import PeerInfo
from meshmq._timing import Timing

__version__ = "0.1.0"

__all__ = [
    "AsyncNode",
    "Backpressure",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "HandlerSpec",
    "MeshError",
    "MeshTimeout",
    "Message",
    "NoPeerError",
    "Node",
    "NodeClosed",
    "PeerGone",
    "PeerInfo",
    "ProtocolVersionError",
    "RemoteError",
    "StorageError",
    "Timing",
    "register_type",
    "subscribe",
]
