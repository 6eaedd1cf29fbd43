"""meshmq.durability: an append-only, checksummed, segmented log (the journal's storage).

:class:`Log` is the storage engine; the codec (:func:`encode_record`, :class:`RecordDecoder`)
is pure and usable on any byte stream. The on-disk format is in docs/STORAGE.md.
"""

from ._config import DEFAULT_INDEX_INTERVAL_BYTES, DEFAULT_SEGMENT_BYTES, LogConfig, parse_fsync
from ._journal import Journal
from ._log import Log
from ._record import (
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
from ._recovery import RecoveryReport

__all__ = [
    "CorruptRecordError",
    "DEFAULT_INDEX_INTERVAL_BYTES",
    "DEFAULT_MAX_RECORD_BYTES",
    "DEFAULT_SEGMENT_BYTES",
    "HEADER_SIZE",
    "Journal",
    "Log",
    "LogConfig",
    "RECORD_VERSION",
    "Record",
    "RecordDecoder",
    "RecoveryReport",
    "decode_record",
    "encode_record",
    "find_record",
    "parse_fsync",
]
