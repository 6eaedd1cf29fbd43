"""Every timing constant in one place, so tests and deployments can shorten or lengthen them."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Timing"]


@dataclass(frozen=True)
class Timing:
    """Timing of the control plane, in float seconds (converted to ms only at the socket)."""

    heartbeat_interval: float = 0.5   # how often a node pings each peer
    peer_timeout: float = 3.0         # silence after which a peer is declared dead
    hello_interval: float = 0.25      # how often an unanswered hello is repeated
    tick: float = 0.1                 # I/O loop wake-up for timers and subscription checks
    stop_timeout: float = 5.0         # how long stop() waits for handlers to drain
    linger: float = 0.2               # socket linger at close (lets a goodbye go out)
