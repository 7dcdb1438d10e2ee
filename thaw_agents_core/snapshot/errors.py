"""The errors of every snapshot check (.thawkv KV and .thaw weights): a ValueError family.

SnapshotError              base: the bytes or their metadata cannot be used
  SnapshotFormatError      not a well-formed snapshot (header, bounds, framing)
  SnapshotMismatchError    well-formed, made for another engine (namespace differs)
  SnapshotChecksumError    payload bytes do not match their chunk CRC32C
"""

from __future__ import annotations


class SnapshotError(ValueError):
    """Base of every snapshot validation error."""


class SnapshotFormatError(SnapshotError):
    """The bytes are not a well-formed ``.thawkv`` snapshot."""


class SnapshotMismatchError(SnapshotError):
    """A well-formed snapshot made for another engine (namespace differs)."""

    def __init__(self, mismatches: list[str]):
        self.mismatches = mismatches
        super().__init__(
            "snapshot namespace does not match this engine:\n  " + "\n  ".join(mismatches)
        )


class SnapshotChecksumError(SnapshotError):
    """Payload bytes do not match their chunk CRC32C."""

    def __init__(self, bad_chunks: list[int], num_chunks: int):
        self.bad_chunks = bad_chunks
        super().__init__(
            f"CRC32C mismatch in chunk(s) {bad_chunks} of {num_chunks}: the payload is corrupt "
            "or was overwritten while being read"
        )
