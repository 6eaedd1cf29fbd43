"""Validated Log settings: fsync policy, segment size, retention, limits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from meshmq._errors import ConfigError

from ._record import DEFAULT_MAX_RECORD_BYTES, check_max_record_bytes

__all__ = [
    "DEFAULT_INDEX_INTERVAL_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "FsyncMode",
    "LogConfig",
    "parse_fsync",
]

FsyncMode = Literal["always", "interval", "never"]
#: Default segment size: the active segment rolls once it holds this much.
DEFAULT_SEGMENT_BYTES = 64 << 20
#: Default sparse-index spacing: one entry per this many bytes of segment.
DEFAULT_INDEX_INTERVAL_BYTES = 4096


def parse_fsync(policy: str) -> tuple[FsyncMode, float]:
    """Return (mode, interval seconds) for "always", "never" or "interval=<ms>"; ConfigError."""
    if policy == "always":
        return "always", 0.0
    if policy == "never":
        return "never", 0.0
    if isinstance(policy, str) and policy.startswith("interval="):
        try:
            ms = float(policy[len("interval="):])
        except ValueError:
            ms = math.nan
        if ms > 0 and math.isfinite(ms):
            return "interval", ms / 1000.0
    raise ConfigError(f'fsync must be "always", "never" or "interval=<ms>" with ms > 0,'
                      f" got {policy!r}")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def _positive_or_none(name: str, value: float | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not value > 0):
        raise ConfigError(f"{name} must be > 0 or None, got {value!r}")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Checked settings of one open Log."""

    mode: FsyncMode
    interval: float
    segment_bytes: int
    retention_seconds: float | None
    retention_bytes: int | None
    max_record_bytes: int
    index_interval: int

    @classmethod
    def make(cls, fsync: str, segment_bytes: int, retention_seconds: float | None,
             retention_bytes: int | None, max_record_bytes: int,
             index_interval_bytes: int) -> LogConfig:
        """Validate the arguments of Log.open; ConfigError names the first bad one."""
        mode, interval = parse_fsync(fsync)
        _positive_or_none("retention_seconds", retention_seconds)
        _positive_or_none("retention_bytes", retention_bytes)
        return cls(mode, interval, _positive_int("segment_bytes", segment_bytes),
                   retention_seconds, retention_bytes, check_max_record_bytes(max_record_bytes),
                   _positive_int("index_interval_bytes", index_interval_bytes))

    @property
    def sync(self) -> bool:
        """Whether this policy fsyncs at all (everything but "never")."""
        return self.mode != "never"

    @property
    def decode_max_record_bytes(self) -> int:
        """Cap used when reading: never below the default.

        Shrinking max_record_bytes between runs must not make recovery take older, larger
        records for damage and cut them.
        """
        return max(self.max_record_bytes, DEFAULT_MAX_RECORD_BYTES)
