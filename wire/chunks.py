"""The binary frame of an artifact chunk on MQTT: a fixed 48-byte header, then the raw bytes.

    offset  size  field
    0       4     magic b"SLMC"
    4       1     frame version (1)
    5       1     flags (reserved, 0)
    6       2     reserved (0)
    8       4     chunk index (big-endian)
    12      4     payload length (big-endian)
    16      32    artifact id (raw sha256 of the canonical manifest)

The same frame travels on the broadcast topic and on a device's repair topic.
The receiver checks the payload against the chunk's sha256 in the signed manifest.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

MAGIC = b"SLMC"
VERSION = 1
_HEADER = struct.Struct(">4sBBHII32s")
HEADER_SIZE = _HEADER.size


class FrameError(ValueError):
    """Not a valid chunk frame."""


@dataclass(frozen=True, slots=True)
class ChunkFrame:
    artifact_id: str
    index: int
    #: the payload: a read-only view into the frame, not a copy (``bytes(frame.data)`` to keep one apart from it)
    data: memoryview


def encode(artifact_id: str, index: int, data: bytes) -> bytes:
    return _HEADER.pack(MAGIC, VERSION, 0, 0, index, len(data), bytes.fromhex(artifact_id)) + data


def decode(frame: bytes) -> ChunkFrame:
    """The frame's header checked and its payload as a view: a 256 KiB chunk is hashed and written from the
    received frame itself, with no copy of it on the way (the agent's per-frame cost, issue 19)."""
    if len(frame) < HEADER_SIZE:
        raise FrameError(f"frame of {len(frame)} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, _flags, _reserved, index, length, artifact = _HEADER.unpack_from(frame)
    if magic != MAGIC:
        raise FrameError("bad magic: not a slmfleet chunk")
    if version != VERSION:
        raise FrameError(f"chunk frame version {version} is not supported")
    if len(frame) - HEADER_SIZE != length:
        raise FrameError(f"frame says {length} payload bytes, carries {len(frame) - HEADER_SIZE}")
    return ChunkFrame(artifact.hex(), index, memoryview(frame).toreadonly()[HEADER_SIZE:])
