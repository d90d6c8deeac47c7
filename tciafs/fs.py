"""The pyfuse3 adapter: thin handlers that ask the tree and the cache, and map errors.

Only pyfuse3.FUSEError leaves a handler; anything else would end the mount. The parts
it asks are built and wired together by tciafs.mount; what to fetch before it is asked
for is decided in tciafs.readahead and tciafs.pagecache, and what a revised or
withdrawn series changes, in tciafs.revisions.

Sizes follow one policy: an instance never fetched reports st_size 0, which the kernel
may keep for UNKNOWN_TTL (a walk's `stat` of every file is then answered by the kernel);
open() fetches the bytes and, if the kernel was told size 0, has it drop that before
the open returns, after which getattr, fstat, lseek and read all agree on the exact
size, which is then kept (and persisted by the cache) for good.

Listings and nodes are read from the catalog page by page: what the daemon holds in
memory follows what is in use, not what a walk has seen (docs/design/metadata.md).
"""

from __future__ import annotations

import datetime as dt
import errno
import functools
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from tciafs import controlproto, names, sidecars, xattrs
from tciafs.cache import Cache, CacheDiskError, CacheFull, Entry, FetchFailed
from tciafs.cache.blocks import HEADERS_AHEAD
from tciafs.catalog import ROOT_INODE, Kind, Node, is_damaged
from tciafs.control import Control, TargetError
from tciafs.controlproto import CONTROL_NAME, STATUS_XATTR
from tciafs.inodes import KernelInodes
from tciafs.pagecache import PageFeeder
from tciafs.readahead import ReadAhead
from tciafs.sources.base import ClientError, NotFound
from tciafs.tree import INSTANCE_SUFFIX, ListingUnavailable, Tree

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

KNOWN_TTL = 3600.0
# How long the kernel may keep the size of an instance not fetched yet (0). An open
# fetches it and invalidates the kept size (KernelInodes.take_provisional), so no read
# ever sees it; a `stat` without an open may show 0 this long after a prefetch fetched it.
UNKNOWN_TTL = 60.0
READDIR_PAGE = 128  # entries read from the catalog at a time
CONTROL_INODE = 1 << 62  # far above any SQLite row id the catalog will hand out
_UNSUPPORTED_XATTRS = (b"security.", b"system.", b"trusted.")  # namespaces this mount has none of
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT
_FALLBACK_TIME = dt.datetime(2000, 1, 1, tzinfo=dt.UTC).timestamp()


class _Throttled:
    """Logs a condition when it starts, then at most once per interval while it lasts,
    with how often it recurred: a full cache fails every read, and must not flood the log."""

    def __init__(self, level: int = logging.ERROR, interval: float = 60.0) -> None:
        self.level = level
        self.interval = interval
        self._last = -interval
        self._since = 0

    def note(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._since += 1
            return
        again = f" (and {self._since} times more since the last message)" if self._since else ""
        log.log(self.level, "%s%s", message, again)
        self._last, self._since = now, 0


_cache_full = _Throttled()
_cache_disk = _Throttled()
_lost_files = _Throttled(logging.WARNING)  # a cleaner deletes them by the thousand
_damaged_db = _Throttled()


def fuse_errors(handler: Callable[P, Coroutine[Any, Any, R]]
                ) -> Callable[P, Coroutine[Any, Any, R]]:
    """Translate every failure into an errno; a bug becomes EIO and one traceback."""

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except NotFound as exc:
            log.info("%s: not found: %s", handler.__name__, exc)
            raise pyfuse3.FUSEError(errno.ENOENT) from None
        except CacheFull as exc:
            _cache_full.note(str(exc))
            raise pyfuse3.FUSEError(errno.ENOSPC) from None
        except CacheDiskError as exc:
            _cache_disk.note(f"{exc}; only files cached already can be read")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except (ClientError, FetchFailed, ListingUnavailable, trio.TooSlowError) as exc:
            log.error("%s failed: %s", handler.__name__, exc or type(exc).__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None
        except NotADirectoryError:
            raise pyfuse3.FUSEError(errno.ENOTDIR) from None
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                log.exception("unexpected error in %s", handler.__name__)
            else:  # found after start: the open-time check reads only part of a catalog
                _damaged_db.note(f"{handler.__name__}: a database of the cache is damaged "
                                 f"({exc}); unmount, and delete the catalog-*.sqlite files "
                                 "(listings are fetched again) or index.sqlite (rebuilt "
                                 "from the cached files) of the cache directory")
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


@dataclass
class OpenFile:
    entry: Entry | None = None  # a cached instance, its file opened at the first read ...
    fd: int | None = None
    data: bytes = b""  # ... or a sidecar, generated at open


class Operations(pyfuse3.Operations):
    enable_writeback_cache = False  # short reads must be able to correct i_size

    def __init__(self, tree: Tree, cache: Cache, pages: PageFeeder, ahead: ReadAhead, *,
                 open_timeout: float = 900.0,
                 status: Callable[[], dict[str, Any]] | None = None,
                 control: Control | None = None) -> None:
        super().__init__()
        self.status = status
        self.control = control
        self.tree = tree
        self.cache = cache
        self.pages = pages
        self.ahead = ahead
        self.open_timeout = open_timeout
        self.uid = os.getuid()
        self.gid = os.getgid()
        self.lookups = KernelInodes()
        self.mounted = False  # set by init(): the kernel can be told of changes
        self._last_stamp: tuple[Node | None, int] = (None, 0)  # a directory, its files' times
        self._files: dict[int, OpenFile] = {}
        self._next_fh = 1

    def init(self) -> None:
        self.mounted = True

    def kernel_knows(self, ino: int) -> bool:
        """Whether the kernel holds the inode: looked up, and not forgotten since."""
        return ino in self.lookups

    async def size_settled(self, node: Node) -> None:
        """The instance's bytes are here: if the kernel keeps the size it was told before
        they were (0), have it drop that, before any read relies on it."""
        self._settle(node.ino)

    def size_known(self, sop: str, series_uid: str) -> None:
        """The cache holds an instance now (a prefetch, a fetch): a size the kernel keeps
        for it from before is dropped, so that `stat` shows the size at once."""
        if not self.lookups.provisional:  # nearly always: no lookup in the catalog
            return
        series = self.tree.catalog.find_uid(series_uid)
        if series is not None:
            child = self.tree.catalog.child(series.ino, names.encode(sop, INSTANCE_SUFFIX))
            if child is not None:
                self._settle(child.ino)

    def _settle(self, ino: int) -> None:
        if self.lookups.take_provisional(ino) and self.mounted:
            # Attributes only: no page is locked, so the kernel answers at once, and the
            # loop may ask it directly (pages are invalidated from a worker thread).
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError as exc:  # ENOENT: the kernel forgot the inode meanwhile
                log.debug("invalidating the attributes of inode %d: %s", ino, exc)

    # -- attributes ----------------------------------------------------------------------

    async def attributes_of(self, node: Node) -> pyfuse3.EntryAttributes:
        """attributes(), with a sidecar's size worked out from its current content."""
        if node.kind is Kind.SIDECAR:
            return self.attributes(node, len(await sidecars.render(node, self.tree)))
        return self.attributes(node)

    def attributes(self, node: Node, sidecar_size: int = 0) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.st_uid, attr.st_gid = self.uid, self.gid
        stamp = self._stamp(node)
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = stamp
        attr.entry_timeout = KNOWN_TTL
        kind = node.kind
        if kind.is_dir:
            attr.st_mode = stat.S_IFDIR | 0o555
            attr.st_nlink = 2
            attr.st_size = 0
            attr.attr_timeout = KNOWN_TTL
            return attr
        size = sidecar_size if kind is Kind.SIDECAR else self.cache.known_size(node.ident)
        if size is None and kind is Kind.INSTANCE and node.meta:
            size = node.meta.get("size")  # listed by a source that knows sizes before a read
        attr.st_mode = stat.S_IFREG | 0o444
        attr.st_nlink = 1
        attr.st_size = size or 0
        attr.st_blocks = -(-(size or 0) // 512)
        attr.st_blksize = (self.cache.io_size(node.ident, size, 128 * 1024)
                           if kind is Kind.INSTANCE else 128 * 1024)
        # Sidecars follow metadata that may still arrive: never let the kernel keep a size.
        if kind is Kind.SIDECAR:
            attr.attr_timeout = 0
        elif size is None:
            attr.attr_timeout = UNKNOWN_TTL
            self.lookups.mark_provisional(node.ino)
        else:
            attr.attr_timeout = KNOWN_TTL
        return attr

    def _stamp(self, node: Node) -> int:
        """A file's times are its series'; a listing's files share it, worked out once."""
        if node.kind.is_dir:
            return int(_node_time(node) * 1e9)
        dated = self.tree.node(node.parent) or node
        if self._last_stamp[0] is not dated:  # the node is read anew when listed again
            self._last_stamp = (dated, int(_node_time(dated) * 1e9))
        return self._last_stamp[1]

    def _node(self, ino: int) -> Node:
        node = self.tree.node(ino)
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node

    def control_attributes(self) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = CONTROL_INODE
        attr.st_mode = stat.S_IFREG | 0o600  # the owner's, as the control socket is
        attr.st_nlink = 1
        attr.st_uid, attr.st_gid = self.uid, self.gid
        attr.attr_timeout = attr.entry_timeout = KNOWN_TTL
        return attr

    @fuse_errors
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode == CONTROL_INODE:
            return self.control_attributes()
        return await self.attributes_of(self._node(inode))

    @fuse_errors
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None
                     ) -> pyfuse3.EntryAttributes:
        text = os.fsdecode(name)
        if parent_inode == ROOT_INODE and text == CONTROL_NAME and self.control is not None:
            return self.control_attributes()
        parent = self._node(parent_inode)
        node: Node | None
        if text == ".":
            node = parent
        elif text == "..":
            node = self._node(parent.parent)
        else:
            node = await self.tree.lookup(parent_inode, text) if parent.kind.is_dir else None
        if node is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attr = await self.attributes_of(node)
        self.lookups.add(node.ino)
        return attr

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            if self.lookups.drop(ino, count):
                self.pages.forgotten(ino)

    # -- directories ---------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if not self._node(inode).kind.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets are inodes: a page is read from the catalog after the last one given,
        # never the whole listing for each of the kernel's calls.
        if start_id == 0:
            self.ahead.listed(await self.tree.listed(fh))
        after = start_id
        while page := self.tree.children_page(fh, after, READDIR_PAGE):
            for child in page:
                # A sidecar's size needs its content; any other entry's attributes are
                # made without a coroutine of their own (a walk is served 10^6 of them).
                attr = (await self.attributes_of(child) if child.kind is Kind.SIDECAR
                        else self.attributes(child))
                if not pyfuse3.readdir_reply(token, os.fsencode(child.name), attr, child.ino):
                    return
                self.lookups.add(child.ino)
                after = child.ino

    # -- files ---------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if flags & _WRITE_FLAGS:
            raise pyfuse3.FUSEError(errno.EROFS)
        node = self._node(inode)
        if node.kind is Kind.SIDECAR:
            return self._open_handle(OpenFile(data=await sidecars.render(node, self.tree)))
        if node.kind is not Kind.INSTANCE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if self.cache.is_cached(node.ident):  # the common case, kept cheap
            entry = await self.cache.acquire(node.collection, node.series_uid, node.ident)
        elif (lazy := self.cache.acquire_blocks(
                node.collection, node.series_uid, node.ident, node.meta.get("size"),
                [(n.ident, n.meta.get("size")) for n in self.tree.following(node, HEADERS_AHEAD)
                 if n.kind is Kind.INSTANCE])) is not None:
            # A source with byte ranges: no byte now; each read fetches its blocks.
            return self._open_handle(OpenFile(entry=lazy), keep_cache=True)
        else:
            await self.ahead.cold_open(node)
            with trio.fail_after(self.open_timeout):
                entry = await self.cache.acquire(node.collection, node.series_uid,
                                                 node.ident, self._series_bytes(node))
        try:
            entry = await self._unharmed(entry)
            await self.size_settled(node)
            await self.pages.opened(node, entry)
        except BaseException:
            self.cache.release(entry)
            raise
        return self._open_handle(OpenFile(entry=entry), keep_cache=True)

    def _open_handle(self, handle: OpenFile, keep_cache: bool = False) -> pyfuse3.FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        self._files[fh] = handle
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache)

    def _series_bytes(self, node: Node) -> int | None:
        series = self.tree.node(node.parent)
        return series.meta.get("file_size") if series is not None else None

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self._files[fh]
        if handle.entry is None:
            return handle.data[off:off + size]
        self.pages.counters["reads_through_daemon"] += 1
        if handle.entry.partial:
            return await self.cache.read_blocks(handle.entry, off, size)
        if handle.fd is None:  # most files are read from pages pushed at open, never here
            handle.fd = await self._cache_file(handle)
        data = os.pread(handle.fd, size, off)
        if len(data) < min(size, handle.entry.size - off):  # cut short since it was opened
            os.close(handle.fd)
            handle.fd = None
            handle.entry = await self._unharmed(handle.entry)
            handle.fd = await self._cache_file(handle)
            data = os.pread(handle.fd, size, off)
        return data

    async def _cache_file(self, handle: OpenFile) -> int:
        """Open the cache file behind a handle, fetched again if deleted since open."""
        assert handle.entry is not None
        try:
            return os.open(handle.entry.path, os.O_RDONLY)
        except FileNotFoundError:
            handle.entry = await self._unharmed(handle.entry)
            return os.open(handle.entry.path, os.O_RDONLY)

    async def _unharmed(self, entry: Entry) -> Entry:
        """The entry, or, when its file was deleted or changed from outside the mount,
        the entry of that file fetched again under the same hold: never a short read."""
        harm = self.cache.harm(entry)
        if harm is None:
            return entry
        _lost_files.note(f"the cached file of instance {entry.sop} was {harm} from outside "
                         "the mount; fetching it again")
        with trio.fail_after(self.open_timeout):
            return await self.cache.fetch_lost(entry)

    @fuse_errors
    async def release(self, fh: int) -> None:
        handle = self._files.pop(fh)
        try:
            if handle.fd is not None:
                os.close(handle.fd)
        finally:
            if handle.entry is not None and self.cache.release(handle.entry):
                await self.pages.refused(handle.entry.sop)  # stale: the kernel's copy too

    @fuse_errors
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        block = 4096
        data.f_bsize = data.f_frsize = block
        data.f_blocks = self.cache.max_bytes // block
        data.f_bfree = data.f_bavail = max(0, self.cache.max_bytes - self.cache.used_bytes
                                           ) // block
        data.f_files = self.tree.catalog.highest_inode()
        data.f_ffree = data.f_favail = 0
        data.f_namemax = 255
        return data

    # -- extended attributes ---------------------------------------------------------------

    def _xattrs(self, inode: int) -> dict[str, str]:
        node = self._node(ROOT_INODE if inode == CONTROL_INODE else inode)
        attrs = xattrs.attributes(node, self.tree, self.cache)
        if node.kind is Kind.ROOT and self.status is not None:
            attrs[STATUS_XATTR] = controlproto.encode_status(self.status())
        return attrs

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if name.startswith(_UNSUPPORTED_XATTRS):
            # security.selinux, asked by `ls -l` of every entry: "not supported" makes ls
            # stop asking for this mount (where "no such attribute" does not), which
            # halves the requests of an `ls -l` of 26,410 patients.
            raise pyfuse3.FUSEError(errno.ENOTSUP)
        if not name.startswith(xattrs.PREFIXES):
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        value = self._xattrs(inode).get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value.encode()

    @fuse_errors
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        # The status document is large and live: it is read by name, never listed.
        return [k.encode() for k in self._xattrs(inode) if k != STATUS_XATTR]

    @fuse_errors
    async def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any = None) -> None:
        command = controlproto.command_of(os.fsdecode(name))
        if inode != CONTROL_INODE or self.control is None or command is None:
            raise pyfuse3.FUSEError(errno.EROFS)  # archive entries are immutable once listed
        try:
            await self.control.run(command, controlproto.decode_target(value))
        except ValueError:
            raise pyfuse3.FUSEError(controlproto.UNKNOWN_COMMAND) from None
        except TargetError as exc:
            log.info("control: %s", exc)
            raise pyfuse3.FUSEError(controlproto.NO_SUCH_TARGET) from None

    # -- a read-only tree ----------------------------------------------------------------

    async def _read_only(self, *_: Any, **__: Any) -> Any:
        raise pyfuse3.FUSEError(errno.EROFS)

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    create = write = removexattr = _read_only


def _node_time(node: Node) -> float:
    """A stable timestamp, so that rsync and make see no change until the service makes
    one: the later of the release date and the last submission, which moves when a
    series is re-submitted (files of the same size would look unchanged to rsync)."""
    stamps = [_day(node.meta.get(key)) for key in ("date_released", "submission_date")]
    return max((s for s in stamps if s is not None), default=_FALLBACK_TIME)


def _day(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value).replace(tzinfo=dt.UTC).timestamp()
    except ValueError:
        return None
