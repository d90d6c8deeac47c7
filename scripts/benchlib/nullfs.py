"""A pyfuse3 file system that does nothing: COUNT empty files in one directory.

    python nullfs.py MOUNTPOINT COUNT      (runs in the foreground until unmounted)

The benchmark opens and closes its files to measure what pyfuse3 and trio alone cost
per open on this machine, the floor under tciafs's own warm opens (figure 5).
"""

from __future__ import annotations

import errno
import stat
import sys

import pyfuse3
import trio

FIRST_INODE = pyfuse3.ROOT_INODE + 1


class NullOperations(pyfuse3.Operations):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.inodes = {f"{i:06d}.dcm".encode(): FIRST_INODE + i for i in range(count)}

    @staticmethod
    def _attributes(inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        is_root = inode == pyfuse3.ROOT_INODE
        attr.st_mode = (stat.S_IFDIR | 0o555) if is_root else (stat.S_IFREG | 0o444)
        attr.st_nlink = 2 if is_root else 1
        attr.attr_timeout = attr.entry_timeout = 300  # as long as tciafs's known sizes
        return attr

    async def getattr(self, inode: int, ctx: object = None) -> pyfuse3.EntryAttributes:
        return self._attributes(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: object = None) -> pyfuse3.EntryAttributes:
        inode = self.inodes.get(name) if parent_inode == pyfuse3.ROOT_INODE else None
        if inode is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attributes(inode)

    async def opendir(self, inode: int, ctx: object = None) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(self.inodes.items())
        for index in range(start_id, len(entries)):
            name, inode = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attributes(inode), index + 1):
                return

    async def open(self, inode: int, flags: int, ctx: object = None) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)  # as tciafs answers a warm open

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return b""

    async def release(self, fh: int) -> None:
        pass


def main(argv: list[str]) -> int:
    mountpoint, count = argv[1], int(argv[2])
    pyfuse3.init(NullOperations(count), mountpoint,
                 set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=nullfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
