"""Snapshots travel in chunks: frames are capped (4 MiB), snapshots are not.

The sender splits the data; the receiver keeps at most one assembly per peer, in a
buffer preallocated to the announced size (bounded by `max_snapshot_bytes`), accepts
chunks only in order for the same (term, index, snapshot term), and hands the data on
only when it is complete and its crc32 matches. Any gap or mismatch drops the assembly:
the leader resends the snapshot when its wait for an answer times out (core.py).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from controlplane.errors import ControlplaneError

ChunkKey = tuple[int, int, int]  # (message term, snapshot index, snapshot term)


def split(data: bytes, chunk_bytes: int) -> Iterator[tuple[int, bytes]]:
    """(offset, chunk) pairs; one empty chunk for empty data."""
    for off in range(0, max(len(data), 1), chunk_bytes):
        yield off, data[off : off + chunk_bytes]


@dataclass(slots=True)
class _Assembly:
    key: ChunkKey
    buf: bytearray
    crc: int
    filled: int = 0


class ChunkError(ControlplaneError, ValueError):
    """A complete snapshot whose checksum does not match."""


class Assembler:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._by_peer: dict[str, _Assembly] = {}

    def add(self, peer: str, key: ChunkKey, off: int, total: int, crc: int, chunk: bytes) -> bytes | None:
        """The whole snapshot once the last chunk arrived; None before (or after a gap).
        Raises ChunkError for a checksum mismatch, ValueError for an oversized one."""
        if total > self.max_bytes:
            self._by_peer.pop(peer, None)
            raise ValueError(f"snapshot of {total} bytes is over the {self.max_bytes} limit")
        asm = self._by_peer.get(peer)
        if off == 0:
            asm = _Assembly(key, bytearray(total), crc)
            self._by_peer[peer] = asm
        if asm is None or asm.key != key or asm.filled != off or off + len(chunk) > total:
            self._by_peer.pop(peer, None)
            return None
        asm.buf[off : off + len(chunk)] = chunk
        asm.filled += len(chunk)
        if asm.filled < total:
            return None
        del self._by_peer[peer]
        data = bytes(asm.buf)
        if zlib.crc32(data) != asm.crc:
            raise ChunkError("snapshot checksum mismatch")
        return data
