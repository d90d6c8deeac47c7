"""How large the kernel's page-cache folios of some files are, on average.

Reading a file whose pages sit in large folios costs the reader less per byte than
reading one held in 4 KiB folios, whatever the file system behind it. The FUSE page
cache of this kernel holds only 4 KiB folios, whether filled by READ replies or by
notify_store, while ext4 and tmpfs hold large ones: that alone bounds how close a warm
read through any FUSE mount comes to reading the cache files. Counting needs root
(/proc/kpageflags, and page frame numbers in /proc/self/pagemap).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from collections.abc import Iterable
from pathlib import Path

PAGE = mmap.PAGESIZE
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1
_COMPOUND_HEAD = 1 << 15  # include/uapi/linux/kernel-page-flags.h
_COMPOUND_TAIL = 1 << 16
_ENTRY = struct.Struct("<Q")


def pages_per_folio(paths: Iterable[Path]) -> float | None:
    """Mean pages per folio over the files' resident pages; None where not permitted
    or nothing is resident. Maps each file privately and touches every page, so pages
    not yet in memory are read in; nothing is written."""
    folios = pages = 0
    try:
        with open("/proc/self/pagemap", "rb") as pagemap, \
                open("/proc/kpageflags", "rb") as flags:
            for path in paths:
                f, p = _count(path, pagemap, flags)
                folios, pages = folios + f, pages + p
    except (PermissionError, _NoFrames):
        return None
    return pages / folios if folios else None


class _NoFrames(Exception):
    """pagemap hides page frame numbers from this process (no CAP_SYS_ADMIN)."""


def _count(path: Path, pagemap, flags) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        # Private and writable only so that ctypes can take its address; never written.
        view = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        anchor = ctypes.c_char.from_buffer(view)
        try:
            return _walk(ctypes.addressof(anchor) // PAGE, -(-size // PAGE), view,
                         pagemap, flags)
        finally:
            del anchor
    finally:
        view.close()


def _walk(first: int, count: int, view: mmap.mmap, pagemap, flags) -> tuple[int, int]:
    folios = pages = 0
    for i in range(count):
        view[i * PAGE]  # fault the page in, so that it has a frame
        pagemap.seek((first + i) * _ENTRY.size)
        entry = _ENTRY.unpack(pagemap.read(_ENTRY.size))[0]
        if not entry & _PRESENT:
            continue
        frame = entry & _PFN_MASK
        if frame == 0:
            raise _NoFrames
        flags.seek(frame * _ENTRY.size)
        bits = _ENTRY.unpack(flags.read(_ENTRY.size))[0]
        pages += 1
        folios += not bits & _COMPOUND_TAIL  # a head or a single page starts a folio
    return folios, pages
