"""Which chunks of an artifact are held: one bit per chunk, with a count and the contiguous prefix."""

from __future__ import annotations


class ChunkBitmap:
    """A bit per chunk. Not thread-safe: one owner mutates it, others get ``to_bytes()`` snapshots."""

    def __init__(self, total: int, data: bytes | None = None) -> None:
        self.total = total
        size = (total + 7) // 8
        self._bits = bytearray(size)
        if data is not None and len(data) == size:
            self._bits[:] = data
            # Bits past ``total`` in the last byte would count chunks that do not exist.
            if total % 8:
                self._bits[-1] &= (1 << (total % 8)) - 1
        self.count = sum(bin(b).count("1") for b in self._bits)
        self.contiguous = 0
        self._advance()

    def has(self, index: int) -> bool:
        return bool(self._bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> bool:
        """Mark chunk ``index`` held; True when it was not held before."""
        if self.has(index):
            return False
        self._bits[index >> 3] |= 1 << (index & 7)
        self.count += 1
        self._advance()
        return True

    def discard(self, index: int) -> None:
        if not self.has(index):
            return
        self._bits[index >> 3] &= ~(1 << (index & 7)) & 0xFF
        self.count -= 1
        self.contiguous = min(self.contiguous, index)

    def _advance(self) -> None:
        while self.contiguous < self.total and self.has(self.contiguous):
            self.contiguous += 1

    @property
    def complete(self) -> bool:
        return self.count == self.total

    def missing(self, limit: int, skip: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Up to ``limit`` missing chunk indices, lowest first, leaving out ``skip``."""
        found: list[int] = []
        for index in range(self.contiguous, self.total):
            if len(found) >= limit:
                break
            if not self.has(index) and index not in skip:
                found.append(index)
        return found

    def to_bytes(self) -> bytes:
        return bytes(self._bits)

    @classmethod
    def full(cls, total: int) -> ChunkBitmap:
        bitmap = cls(total)
        for index in range(total):
            bitmap.add(index)
        return bitmap


def ranges(indices: list[int], max_ranges: int = 256) -> list[tuple[int, int]]:
    """Sorted indices as ``[start, end)`` ranges, at most ``max_ranges`` of them (later ones are left out)."""
    out: list[tuple[int, int]] = []
    for index in sorted(indices):
        if out and out[-1][1] == index:
            out[-1] = (out[-1][0], index + 1)
        elif len(out) < max_ranges:
            out.append((index, index + 1))
        else:
            break
    return out
