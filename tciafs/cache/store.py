"""The cached files on disk: where each lives, downloads in tmp/, fsync and rename, and
what a file's DICOM header says it is.

objects/ab/abcdef… holds one instance each, named by a hash of its SOP Instance UID;
tmp/ holds downloads in progress, renamed into objects/ once complete and checked
(docs/design/cache.md, "On disk").
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import os
import random
import shutil
import struct
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import trio

from .index import FoundFile
from .layout import object_name, object_path
from .model import CacheDiskError, CacheFull, FetchFailed
from .space import Reservation

HEAD_BYTES = 16 << 10  # DICOM headers name the SOP Instance UID well within this
REINDEX_REPORT_EVERY = 10.0  # seconds; systemd is told to wait 60 s more each time
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL
# Tags as plain numbers (group << 16 | element), which pydicom compares and accepts alike.
_SOP_INSTANCE_UID = 0x00080018
_SERIES_INSTANCE_UID = 0x0020000E
_MD5 = functools.partial(hashlib.md5, usedforsecurity=False)  # a checksum, not security
_FULL = (errno.ENOSPC, errno.EDQUOT)
_SOP_TAG = 0x00080018
_IMPLICIT_LE = b"1.2.840.10008.1.2"
_LITTLE_ENDIAN = (_IMPLICIT_LE, b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.4.50",
                  b"1.2.840.10008.1.2.4.57", b"1.2.840.10008.1.2.4.70",
                  b"1.2.840.10008.1.2.4.90", b"1.2.840.10008.1.2.4.91",
                  b"1.2.840.10008.1.2.5")  # uncompressed and the usual encapsulated ones
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                       b"UN", b"UR", b"UT", b"UV"})


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("objects", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
        self._objects = str(root / "objects")

    def directories(self) -> list[Path]:
        """The directories under the cache: they take room too."""
        return [self.root, self.root / "objects", self.root / "tmp",
                *(self.root / "objects").iterdir()]

    def path(self, sop: str) -> Path:
        return object_path(self.root, sop)

    def file(self, sop: str) -> str:
        # A plain string: building Path objects cost a quarter of a warm open.
        name = object_name(sop)
        return f"{self._objects}/{name[:2]}/{name}"

    def remove(self, sop: str) -> None:
        self.path(sop).unlink(missing_ok=True)

    def has_files(self) -> bool:
        return next((self.root / "objects").glob("*/*"), None) is not None

    def reconcile(self, rows: list[tuple]) -> tuple[list[tuple], list[str]]:
        """At start: empty tmp/, delete the files the index does not list, and split the
        index's rows (sop, series, size, pinned) into those whose whole file is there
        and the SOP UIDs of those missing or partial, whose remains are deleted."""
        shutil.rmtree(self.root / "tmp", ignore_errors=True)
        (self.root / "tmp").mkdir(mode=0o700)
        on_disk = {p.name: p for p in (self.root / "objects").glob("*/*")}
        kept, gone = [], []
        for row in rows:
            path = on_disk.pop(object_name(row[0]), None)
            if path is None or path.stat().st_size != row[2]:
                gone.append(row[0])
                if path is not None:
                    path.unlink()
                continue
            kept.append(row)
        for orphan in on_disk.values():
            orphan.unlink()
        return kept, gone

    def scan(self, progress: Callable[[int], None]) -> list[FoundFile]:
        """Every readable cached file, as its header names it, to index anew; what cannot
        be read is left out (the reconcile that follows deletes it). Calls `progress`
        with the count so far every REINDEX_REPORT_EVERY seconds."""
        found: list[FoundFile] = []
        next_report = time.monotonic() + REINDEX_REPORT_EVERY
        for path in (self.root / "objects").glob("*/*"):
            if time.monotonic() >= next_report:
                progress(len(found))
                next_report = time.monotonic() + REINDEX_REPORT_EVERY
            try:
                with path.open("rb") as stored:
                    sop, series = _instance_uids(stored)
                    stored.seek(0)
                    md5 = hashlib.file_digest(stored, _MD5).hexdigest()
                info = path.stat()
            except (OSError, FetchFailed):
                continue
            if path.name == object_name(sop):
                found.append(FoundFile(sop, series, info.st_size, md5, info.st_mtime))
        return found

    def tmpfile(self, room: Reservation, *, hashed: bool = False) -> TmpFile:
        """A file in tmp/; `hashed`: a whole file to `finish`, whose MD5 and header are
        taken from its bytes as they are written (a block needs neither)."""
        return TmpFile(self.root, room, hashed=hashed)

    async def finish(self, tmp: TmpFile) -> tuple[str, str]:
        """fsync a finished download; its SOP Instance UID and the MD5 of its bytes."""
        return (await self.finish_all([tmp]))[0]

    async def finish_all(self, tmps: Sequence[TmpFile]) -> list[tuple[str, str]]:
        """fsync finished downloads, all in one worker-thread job, and close them; the
        SOP Instance UID and the MD5 of each. The MD5 and (nearly always) the UID were
        taken from the bytes as they were written; only a header longer than what was
        kept of it is read back from the file."""
        named = [tmp.sop_from_head() for tmp in tmps]
        jobs = [(tmp.fd, tmp.path, sop) for tmp, sop in zip(tmps, named, strict=True)]
        with cache_disk(self.root):
            sops = await trio.to_thread.run_sync(_finish_files, jobs, self.root)
        for tmp in tmps:
            tmp.close()
        return [(sop, tmp.md5()) for sop, tmp in zip(sops, tmps, strict=True)]

    async def put_block(self, data: bytes, final: Path, make_room: Callable[[], None]
                        ) -> None:
        """Write a block whose room is reserved: in tmp/, fsynced, then renamed to
        `final`, all in one worker-thread job (creating, writing and renaming a small
        file on the event loop cost it more than the thread's hand-off). When the disk
        refuses the bytes for reasons outside the cache, `make_room` once and again."""
        for last in (False, True):
            try:
                with cache_disk(self.root, full_too=last):
                    await trio.to_thread.run_sync(_put_file, self.root, data, final)
                return
            except OSError:  # full, the first time
                make_room()

    def place(self, tmp: TmpFile, sop: str) -> Path:
        """Rename a finished download into place."""
        final = self.path(sop)
        with cache_disk(self.root):  # full: the directory could not grow
            os.rename(tmp.path, final)
        return final


class TmpFile:
    """A download in progress in tmp/, with room reserved ahead in steps."""

    def __init__(self, root: Path, room: Reservation, *, hashed: bool = False) -> None:
        self.root = root
        self.room = room
        # The MD5 and the first bytes, taken in the same pass as the write: reading the
        # file back for them cost a second pass over every byte, in another thread.
        self._md5 = _MD5() if hashed else None
        self._head = bytearray()
        self.sop: str | None = None  # the SOP UID its head named, when already read
        with cache_disk(root):
            self.path, fd = _new_tmp(root)
        self.fd: int | None = fd
        self._kept = False

    @property
    def size(self) -> int:
        return self.room.used

    async def write(self, chunk: bytes) -> None:
        offset = self.size
        await self.room.claim(len(chunk))
        try:
            with cache_disk(self.root, full_too=False):
                _write_all(self.fd, chunk, offset)
        except OSError as exc:
            # The disk (or the user's quota) filled for reasons outside the cache: make
            # room once, then write the chunk again at its own offset (part of it may be
            # there already).
            full = f"disk full ({self.root}) while caching series {self.room.series}"
            try:
                self.room.make_room(len(chunk))
            except CacheFull:
                raise CacheFull(f"{full}; every cached file is open or pinned") from exc
            with cache_disk(self.root):
                _write_all(self.fd, chunk, offset)
        if self._md5 is not None:  # the bytes are written: they are what is stored
            self._md5.update(chunk)
            if len(self._head) < HEAD_BYTES:
                self._head += chunk[:HEAD_BYTES - len(self._head)]

    def md5(self) -> str:
        """The MD5 of the bytes written (a file made `hashed`)."""
        assert self._md5 is not None
        return self._md5.hexdigest()

    def sop_from_head(self) -> str | None:
        """The SOP Instance UID its first bytes name; None when the header runs past
        what was kept of them: the file itself must be read."""
        if self.sop is not None:
            return self.sop
        if len(self._head) >= self.size:  # the whole file: what it says is final
            return _plain_sop(self._head) or _instance_uids(io.BytesIO(self._head),
                                                           series_too=False)[0]
        return sop_in_head([bytes(self._head)])

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def adopted(self) -> None:
        """Renamed into place: its bytes, and the room they take, are the cache's now."""
        self._kept = True

    def discard(self) -> None:
        self.close()
        if not self._kept:
            self.room.give_back()
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def cache_disk(root: Path, *, full_too: bool = True) -> Iterator[None]:
    """The cache disk's own failures as clear errors: CacheFull when it is full (unless
    the caller handles that: then the OSError passes), CacheDiskError otherwise. Neither
    is worth fetching again for."""
    try:
        yield
    except OSError as exc:
        if exc.errno in _FULL:
            if not full_too:
                raise
            raise CacheFull(f"disk full ({root}): {exc.strerror}") from exc
        raise CacheDiskError(f"cache directory {root} cannot be written: "
                             f"{exc.strerror or exc}") from exc


def _write_all(fd: int | None, data: bytes, offset: int) -> None:
    assert fd is not None
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _finish_files(jobs: Sequence[tuple[int | None, Path, str | None]], root: Path
                  ) -> list[str]:
    """fsync each file (fd, path, its SOP UID when already known); return their SOP
    UIDs, reading the header of those not known; make the directories they go to.

    One worker-thread job for several files: each hand-off to a thread and back costs
    the event loop more than an fsync's own CPU.
    """
    sops = []
    for fd, path, sop in jobs:
        assert fd is not None
        os.fsync(fd)
        if sop is None:
            with open(path, "rb") as stored:
                sop = _instance_uids(stored, series_too=False)[0]
        _make_parent(root, sop)
        sops.append(sop)
    return sops


def _new_tmp(root: Path) -> tuple[Path, int]:
    """A new, empty file in tmp/, open for writing."""
    path = root / "tmp" / f"{os.getpid()}-{random.getrandbits(64):016x}"
    try:
        return path, os.open(path, _TMP_FLAGS, 0o600)
    except FileNotFoundError:  # a cleaner of old, empty directories took tmp/
        path.parent.mkdir(mode=0o700, exist_ok=True)
        return path, os.open(path, _TMP_FLAGS, 0o600)


def _put_file(root: Path, data: bytes, final: Path) -> None:
    """A new file `final` holding `data`, whole and on disk once it has its name."""
    tmp, fd = _new_tmp(root)
    try:
        try:
            _write_all(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        for directory in (final.parent.parent, final.parent):  # blocks/, blocks/ab/
            directory.mkdir(exist_ok=True, mode=0o700)
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _make_parent(root: Path, sop: str) -> None:
    parent = object_path(root, sop).parent
    if not parent.is_dir():  # objects/ too may have been taken, empty, by a cleaner
        parent.mkdir(parents=True, exist_ok=True, mode=0o700)


def sop_in_head(head: list[bytes]) -> str | None:
    """The SOP Instance UID the first bytes of a DICOM file name; None when the header
    runs past them."""
    data = b"".join(head)
    quick = _plain_sop(data)
    if quick is not None:
        return quick
    buffer = io.BytesIO(data)
    try:
        sop = _instance_uids(buffer, series_too=False, meta_too=False)[0]
    except FetchFailed:
        return None
    # Parsing stops at the first element past the UID: had it reached the end of the
    # head, the UID's own value may have been cut there.
    return sop if buffer.tell() < len(data) else None


def _plain_sop(data: bytes | bytearray) -> str | None:
    """The SOP Instance UID of a plain Part 10 header (preamble, little-endian transfer
    syntax, elements of defined length, a UID of digits and dots), read straight from its
    bytes; None for anything else, which pydicom then reads (`_instance_uids`).

    pydicom cost 0.2-0.3 ms of the event loop's CPU per file, for four elements or so.
    """
    if data[128:132] != b"DICM":
        return None
    meta = _walk(data, 132, explicit=True, group=0x0002)
    if meta is None:
        return None
    end_of_meta, syntax = meta
    if syntax not in _LITTLE_ENDIAN:
        return None
    found = _walk(data, end_of_meta, explicit=syntax != _IMPLICIT_LE, until=_SOP_TAG)
    if found is None:
        return None
    uid = found[1].rstrip(b"\0 ")
    return uid.decode() if uid and not uid.strip(b"0123456789.") else None


def _walk(data: bytes | bytearray, pos: int, *, explicit: bool, group: int | None = None,
          until: int | None = None) -> tuple[int, bytes] | None:
    """Walk elements from `pos`: with `group`, to the group's end, returning where it
    ends and the value of its element 0010 (the transfer syntax, in the file meta);
    with `until`, to that tag, returning where it starts and its value. None when the
    bytes end first, the tag is missing, or an element's length is undefined."""
    wanted = b""
    while pos + 8 <= len(data):
        tag_group, element = struct.unpack_from("<HH", data, pos)
        tag = tag_group << 16 | element
        if group is not None and tag_group != group:
            return pos, wanted
        if until is not None and tag > until:
            return None
        if not explicit:
            length, header = struct.unpack_from("<I", data, pos + 4)[0], 8
        elif bytes(data[pos + 4:pos + 6]) in _LONG_VRS:
            if pos + 12 > len(data):
                return None
            length, header = struct.unpack_from("<I", data, pos + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, pos + 6)[0], 8
        end = pos + header + length
        if length == 0xFFFFFFFF or end > len(data):
            return None
        value = bytes(data[pos + header:end])
        if tag == until:
            return pos, value
        if group is not None and element == 0x0010:
            wanted = value.rstrip(b"\0 ")
        pos = end
    return None


def _instance_uids(stored: BinaryIO, *, series_too: bool = True,
                   meta_too: bool = True) -> tuple[str, str]:
    """SOPInstanceUID (and SeriesInstanceUID) from a file's header; with `meta_too`,
    the file meta's MediaStorageSOPInstanceUID stands in for a missing one."""
    # pydicom (with numpy, a fifth of a second) is loaded when a header first needs it,
    # not when the daemon starts: most headers are read without it (above).
    from pydicom.filereader import read_partial

    last = _SERIES_INSTANCE_UID if series_too else _SOP_INSTANCE_UID
    try:
        # Parsing stops past the last UID wanted: the rest is never needed here.
        ds = read_partial(stored, stop_when=lambda tag, vr, length: tag > last,
                          specific_tags=[_SOP_INSTANCE_UID, last])
        sop = ds.get("SOPInstanceUID") or (
            ds.file_meta.get("MediaStorageSOPInstanceUID") if meta_too else None)
        series = ds.get("SeriesInstanceUID") if series_too else ""
    except Exception as exc:  # pydicom raises many kinds for a body that is not DICOM
        raise FetchFailed(f"not a DICOM file: {exc}") from exc
    if not sop:
        raise FetchFailed("DICOM file without a SOPInstanceUID")
    if series_too and not series:
        raise FetchFailed("DICOM file without a SeriesInstanceUID")
    return str(sop), str(series)
