"""Time-ordered identifiers for append-only tables."""

from __future__ import annotations

import os
import time
import uuid

_RANDOM_BITS = (1 << 80) - 1
_VERSION_MASK = ~(0xF << 76)
_VARIANT_MASK = ~(0x3 << 62)


def uuid7() -> uuid.UUID:
    """A version 7 UUID (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Rows keyed by it land at the right-hand end of their primary-key index, in pages already in memory,
    where a random (version 4) key dirties a random page of the index on every insert and, after each
    checkpoint, writes that whole page to the WAL again. Unguessable like a version 4 UUID, less 48 bits.
    """
    milliseconds = time.time_ns() // 1_000_000
    value = (milliseconds & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big") & _RANDOM_BITS
    value = (value & _VERSION_MASK) | (0x7 << 76)
    value = (value & _VARIANT_MASK) | (0x2 << 62)
    return uuid.UUID(int=value)
