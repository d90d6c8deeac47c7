"""Writing cache files into the page cache of FUSE inodes (notify_store), by splice.

The message goes to /dev/fuse through a pipe that the cache file is spliced into, so
the kernel copies each page once, from the cache file's own page cache, and no Python
buffer is filled on the way.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct

NOTIFY_STORE = 4  # enum fuse_notify_code
# struct fuse_out_header (len, error = the notify code, unique = 0), then
# struct fuse_notify_store_out (nodeid, offset, size, padding).
_MESSAGE = struct.Struct("<IiQQQII")
_FUSE_DEVICE = os.makedev(10, 229)
_PIPE_SIZE = 1 << 20  # the unprivileged maximum by default; 64 KiB if refused
_PAGE = os.sysconf("SC_PAGE_SIZE")
_READ_CHUNK = 1 << 20
_SYS_CACHESTAT = 451  # the same on every architecture that has it


class _CacheStatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _CacheStat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64),
                ("nr_writeback", ctypes.c_uint64), ("nr_evicted", ctypes.c_uint64),
                ("nr_recently_evicted", ctypes.c_uint64)]


_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p,
                     ctypes.c_ulong]


def fuse_device() -> int | None:
    """The descriptor of this process's FUSE connection, if it has exactly one."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            info = os.stat(int(name))
        except (OSError, ValueError):
            continue
        if stat.S_ISCHR(info.st_mode) and info.st_rdev == _FUSE_DEVICE:
            found.append(int(name))
    return found[0] if len(found) == 1 else None


class Pusher:
    """Hands whole files to the kernel as the content of FUSE inodes."""

    def __init__(self, device: int) -> None:
        self.device = device
        self._pipe: tuple[int, int] | None = None
        self._chunk = 0  # data per message: the pipe must hold a whole message

    def push(self, ino: int, fd: int, size: int) -> None:
        """Store the first size bytes of the open file fd as the content of inode ino.

        Raises OSError; ENOENT means the kernel no longer knows the inode.
        """
        offset = 0
        while offset < size:
            count = min(size - offset, self._open_pipe())
            self._store(ino, fd, offset, count)
            offset += count

    def close(self) -> None:
        if self._pipe is not None:
            for end in self._pipe:
                os.close(end)
            self._pipe = None

    def _open_pipe(self) -> int:
        if self._pipe is None:
            read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                size = fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
            except OSError:
                size = fcntl.fcntl(write_end, fcntl.F_GETPIPE_SZ)
            self._pipe = (read_end, write_end)
            self._chunk = size - _PAGE  # the header takes one of the pipe's pages
            if self._chunk <= 0:
                self.close()
                raise OSError(errno.ENOBUFS, f"a pipe of {size} bytes holds no data page")
        return self._chunk

    def _store(self, ino: int, fd: int, offset: int, count: int) -> None:
        assert self._pipe is not None
        read_end, write_end = self._pipe
        total = _MESSAGE.size + count
        try:
            os.write(write_end, _MESSAGE.pack(total, NOTIFY_STORE, 0, ino, offset, count, 0))
            filled = 0
            while filled < count:
                n = os.splice(fd, write_end, count - filled, offset_src=offset + filled,
                              flags=os.SPLICE_F_NONBLOCK)
                if n == 0:
                    raise OSError(errno.EIO, "the cache file is shorter than its entry")
                filled += n
            if os.splice(read_end, self.device, total) != total:
                raise OSError(errno.EIO, "the kernel took part of a page-cache message")
        except BaseException:
            self.close()  # what the pipe still holds would corrupt the next message
            raise


def in_memory(fd: int, size: int) -> bool:
    """Whether all of the file's pages are in the page cache, so that a push from it
    would not wait for the disk. True where the kernel cannot tell (before 6.5)."""
    counts = _CacheStat()
    span = _CacheStatRange(0, size)
    if _syscall(_SYS_CACHESTAT, fd, ctypes.byref(span), ctypes.byref(counts), 0) != 0:
        return True
    return counts.nr_cache * _PAGE >= size


def read_soon(path: str, size: int) -> None:
    """Start reading the file into memory, without waiting for it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
    finally:
        os.close(fd)


def read_through(fd: int, size: int) -> None:
    """Read the file once, so that its pages are in memory; for a worker thread."""
    chunk = bytearray(min(size, _READ_CHUNK) or 1)
    offset = 0
    while offset < size and (n := os.preadv(fd, [chunk], offset)):
        offset += n
