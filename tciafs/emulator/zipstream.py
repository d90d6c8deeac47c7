"""A streaming ZIP writer, shaped like ``java.util.zip.ZipOutputStream`` output.

Each member is DEFLATE-compressed with general-purpose bit 3 set (CRC and sizes follow
in a data descriptor), so nothing is buffered beyond one output chunk and nothing is
ever seeked: bytes go to ``sink`` as they are produced, in chunks of ``chunk_size``.

It drives :class:`zipfile.ZipFile` over an unseekable adapter; ``zipfile`` then writes
data descriptors itself.  Members are marked as made on MS-DOS with no external
attributes, as Java does, so ``unzip`` applies its default permissions.

The compression level is 1, not Java's 6: on noisy CT, level 6 gains ~3 % in size but
costs ~7x the CPU (about 11 MB/s here), which would make the emulator, not the
network, the bottleneck of every download benchmark.
"""

from __future__ import annotations

import datetime as dt
import threading
import zipfile
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from cachetools import LRUCache

COMPRESS_LEVEL = 1
CHUNK_SIZE = 64 * 1024
BODY_CACHE_BYTES = 256 << 20
_ZIP64_THRESHOLD = 0x7FFF0000  # zipfile refuses to grow a non-ZIP64 entry past 2 GiB


class StreamAborted(Exception):
    """Raised by a sink to stop the stream (client gone, or a fault cut the body)."""


@dataclass(frozen=True)
class ZipMember:
    name: str
    chunks: Callable[[], Iterable[bytes]]  # called once, when the member is written
    size: int = 0  # expected uncompressed size, 0 if unknown
    date_time: tuple[int, int, int, int, int, int] = (1980, 1, 1, 0, 0, 0)


def bytes_member(name: str, data: bytes, when: dt.datetime | None = None) -> ZipMember:
    return ZipMember(name, lambda: (data,), len(data), zip_time(when))


def zip_time(when: dt.datetime | dt.date | None) -> tuple[int, int, int, int, int, int]:
    if when is None or when.year < 1980:
        return (1980, 1, 1, 0, 0, 0)
    if not isinstance(when, dt.datetime):
        return (when.year, when.month, when.day, 0, 0, 0)
    return (when.year, when.month, when.day, when.hour, when.minute, when.second)


class _SinkWriter:
    """File-like adapter: coalesces zipfile's small writes into ``chunk_size`` pieces."""

    def __init__(self, sink: Callable[[bytes], None], chunk_size: int) -> None:
        self._sink = sink
        self._chunk_size = chunk_size
        self._buffer = bytearray()
        self.dead = False

    def write(self, data: bytes) -> int:
        if self.dead:  # after an abort, zipfile's finalisers may still write: drop it
            return len(data)
        self._buffer += data
        while len(self._buffer) >= self._chunk_size:
            piece = bytes(self._buffer[: self._chunk_size])
            del self._buffer[: self._chunk_size]
            self._emit(piece)
        return len(data)

    def flush(self) -> None:
        """zipfile flushes after small writes; coalescing is the point, so wait."""

    def drain(self) -> None:
        if self._buffer and not self.dead:
            piece = bytes(self._buffer)
            self._buffer.clear()
            self._emit(piece)

    def _emit(self, piece: bytes) -> None:
        try:
            self._sink(piece)
        except BaseException:
            self.dead = True
            raise


def _set_level(info: zipfile.ZipInfo) -> None:
    # ZipFile's compresslevel only reaches members named by a string; a ZipInfo carries
    # its own, called _compresslevel before Python 3.13 and compress_level after.
    name = "compress_level" if "compress_level" in zipfile.ZipInfo.__slots__ else "_compresslevel"
    setattr(info, name, COMPRESS_LEVEL)


def write_zip(members: Iterable[ZipMember], sink: Callable[[bytes], None],
              chunk_size: int = CHUNK_SIZE) -> None:
    """Write ``members`` as one ZIP to ``sink``; ends with the central directory."""
    out = _SinkWriter(sink, chunk_size)
    archive = zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_DEFLATED,  # type: ignore[call-overload]
                              compresslevel=COMPRESS_LEVEL, allowZip64=True)
    for member in members:
        info = zipfile.ZipInfo(member.name, date_time=member.date_time)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.create_system = 0
        info.external_attr = 0
        # ZipFile's compresslevel only reaches members named by string; a ZipInfo
        # carries its own (private before Python 3.13).
        _set_level(info)
        dest = archive.open(info, mode="w", force_zip64=member.size > _ZIP64_THRESHOLD)
        for chunk in member.chunks():
            dest.write(chunk)
        dest.close()
    archive.close()
    out.drain()


class BodyCache:
    """Recent ZIP bodies, kept whole and replayed byte for byte.

    On loopback the emulator shares the client's CPUs, and deflating a series costs it
    about as much CPU as the client spends taking the series in. A real server's CPU is
    not the client's, so a benchmark that downloads a series again should not pay for
    compressing it again. Faults and shaping act on the bytes on their way out, so a
    replayed body is throttled, cut and counted like a fresh one.
    """

    def __init__(self, max_bytes: int = BODY_CACHE_BYTES) -> None:
        self._bodies: LRUCache[Hashable, tuple[bytes, ...]] = LRUCache(
            maxsize=max(1, max_bytes), getsizeof=lambda body: max(1, sum(map(len, body))))
        self._lock = threading.Lock()  # one thread per connection
        self.max_body = max_bytes // 4  # a body this large would push out most others

    def write(self, key: Hashable, members: Callable[[], Iterable[ZipMember]],
              sink: Callable[[bytes], None]) -> None:
        """Send the body for `key` to `sink`, from memory when it was made before."""
        with self._lock:
            body = self._bodies.get(key)
        if body is not None:
            for chunk in body:
                sink(chunk)
            return
        kept: list[bytes] | None = []
        size = 0

        def tee(chunk: bytes) -> None:
            nonlocal kept, size
            if kept is not None:
                size += len(chunk)
                if size > self.max_body:
                    kept = None
                else:
                    kept.append(chunk)
            sink(chunk)

        write_zip(members(), tee)  # a client that goes away raises: nothing is kept
        if kept is not None:
            with self._lock:
                self._bodies[key] = tuple(kept)
