"""meshmq.patterns: pipelines (fair fan-out with acks, redelivery, dead letters) and RPC."""

from meshmq.patterns._pipeline import Pipelines, worker_spec
from meshmq.patterns._rpc import PeerGone, Rpc, rpc_spec

__all__ = ["PeerGone", "Pipelines", "Rpc", "rpc_spec", "worker_spec"]
