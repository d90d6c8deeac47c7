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
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

COMPRESS_LEVEL = 1
CHUNK_SIZE = 64 * 1024
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
    archive = zipfile.ZipFile(out, mode="w", compression=zipfile.ZIP_DEFLATED,  # type: ignore[arg-type]
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
