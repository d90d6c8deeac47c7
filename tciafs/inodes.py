"""What the kernel holds of the mount's inodes: a lookup count for each, and whether it
was told a size that may still change.

A walk of 10^7 files leaves the kernel holding up to 10^7 inodes, each looked up (by
readdirplus) and not yet forgotten. A dict of counts costs about 100 bytes an inode; this
table costs one byte, indexed by the inode number, which the catalog hands out densely.
"""

from __future__ import annotations

_COUNT = 0x7F  # the low seven bits: the lookup count, up to 126 ...
_OVERFLOW = 0x7F  # ... and this value: the count is in the overflow table
_PROVISIONAL = 0x80  # the kernel caches a size that is not known yet
_DENSE_LIMIT = 1 << 32  # larger inodes (the control file's) go to the overflow table


class KernelInodes:
    def __init__(self) -> None:
        self._bytes = bytearray()
        self._overflow: dict[int, int] = {}  # counts of 127 and more, and large inodes
        self._sparse_flags: set[int] = set()  # the flag of large inodes
        self.provisional = 0  # inodes flagged now: none, and nothing need be looked up

    def __getitem__(self, ino: int) -> int:
        """How many lookups of `ino` the kernel has not forgotten."""
        if ino >= _DENSE_LIMIT:
            return self._overflow.get(ino, 0)
        byte = self._bytes[ino] if ino < len(self._bytes) else 0
        count = byte & _COUNT
        return self._overflow[ino] if count == _OVERFLOW else count

    def __contains__(self, ino: object) -> bool:
        return isinstance(ino, int) and self[ino] > 0

    def add(self, ino: int, n: int = 1) -> None:
        # readdirplus adds one lookup for every entry it serves: the common case, a
        # small count in the table, is kept to a few byte operations.
        if ino < len(self._bytes):
            byte = self._bytes[ino]
            count = (byte & _COUNT) + n
            if count < _OVERFLOW:
                self._bytes[ino] = (byte & _PROVISIONAL) | count
                return
        self._set(ino, self[ino] + n)

    def drop(self, ino: int, n: int) -> bool:
        """The kernel forgot `n` lookups; True when it holds the inode no more."""
        count = max(0, self[ino] - n)
        self._set(ino, count)
        if count == 0:
            self.take_provisional(ino)
        return count == 0

    def mark_provisional(self, ino: int) -> None:
        """The kernel was told a size that may change (an instance not fetched yet)."""
        if ino >= _DENSE_LIMIT:
            self.provisional += ino not in self._sparse_flags
            self._sparse_flags.add(ino)
            return
        self._grow(ino)
        if not self._bytes[ino] & _PROVISIONAL:
            self.provisional += 1
            self._bytes[ino] |= _PROVISIONAL

    def take_provisional(self, ino: int) -> bool:
        """Whether the kernel may cache a size told before it was known; cleared."""
        if ino >= _DENSE_LIMIT:
            if ino in self._sparse_flags:
                self._sparse_flags.discard(ino)
                self.provisional -= 1
                return True
            return False
        if ino >= len(self._bytes) or not self._bytes[ino] & _PROVISIONAL:
            return False
        self._bytes[ino] &= _COUNT
        self.provisional -= 1
        return True

    def _set(self, ino: int, count: int) -> None:
        if ino >= _DENSE_LIMIT:
            if count:
                self._overflow[ino] = count
            else:
                self._overflow.pop(ino, None)
            return
        self._grow(ino)
        flag = self._bytes[ino] & _PROVISIONAL
        if count >= _OVERFLOW:
            self._overflow[ino] = count
            self._bytes[ino] = flag | _OVERFLOW
        else:
            self._overflow.pop(ino, None)
            self._bytes[ino] = flag | count

    def _grow(self, ino: int) -> None:
        if ino >= len(self._bytes):  # by half again at least: few copies over a walk
            self._bytes.extend(bytes(max(ino + 1 - len(self._bytes), len(self._bytes) // 2)))
