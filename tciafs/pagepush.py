"""Writing cache files into the page cache of FUSE inodes (notify_store), by splice.

The message goes to /dev/fuse through a pipe that the cache file is spliced into, so
the kernel copies each page once, from the cache file's own page cache, and no Python
buffer is filled on the way. The read-ahead runs this in a child process
(`python -m tciafs.pagepush FD DAEMON_PID`): pushes then cost the daemon neither the GIL nor
event-loop time while it answers the reader's opens.

The child says READY on stdout, then reads jobs from stdin (`JOB` then the path) and
answers each with one byte, OK or FAILED, in order. It stops at the end of its input,
which is also what happens when the daemon dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import stat
import struct
import sys

NOTIFY_STORE = 4  # enum fuse_notify_code
# struct fuse_out_header (len, error = the notify code, unique = 0), then
# struct fuse_notify_store_out (nodeid, offset, size, padding).
_MESSAGE = struct.Struct("<IiQQQII")
_FUSE_DEVICE = os.makedev(10, 229)
_PIPE_SIZE = 1 << 20  # the unprivileged maximum by default; 64 KiB if refused
_PAGE = os.sysconf("SC_PAGE_SIZE")

_PR_SET_PDEATHSIG = 1

JOB = struct.Struct("<QQH")  # inode, size, length of the path that follows
OK, FAILED, READY = b"\x01", b"\x00", b"\x02"  # READY once, before any answer


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

    def push(self, ino: int, path: str | bytes, size: int) -> None:
        """Raises OSError; ENOENT means the kernel no longer knows the inode."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            offset = 0
            while offset < size:
                count = min(size - offset, self._open_pipe())
                self._store(ino, fd, offset, count)
                offset += count
        finally:
            os.close(fd)

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


def _read_exact(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            return b""
        data += chunk
    return data


def _die_with(daemon: int) -> None:
    # Holding the FUSE device keeps the connection alive: once the daemon is killed,
    # the mount must report itself disconnected at once, not when we notice.
    with contextlib.suppress(OSError, AttributeError):  # then only the end of input
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != daemon:
        os._exit(0)


def main(argv: list[str]) -> int:
    # ^C at a terminal and systemd's stop reach every process of the group or service;
    # the daemon ends us itself, by closing our input, once its own pushes are settled.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with(int(argv[2]))
    # Pushing ahead is worth only the CPU time that nobody else wants: the reader and
    # the daemon's event loop come first. The daemon stops waiting for a starved push.
    with contextlib.suppress(OSError):  # a seccomp filter may refuse it: then as is
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    pusher = Pusher(int(argv[1]))
    os.write(1, READY)
    while head := _read_exact(0, JOB.size):
        ino, size, length = JOB.unpack(head)
        path = _read_exact(0, length)
        try:
            pusher.push(ino, path, size)
        except OSError:
            os.write(1, FAILED)
        else:
            os.write(1, OK)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
