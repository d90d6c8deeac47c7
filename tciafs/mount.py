"""The daemon: the parts assembled in one trio nursery, readiness and signals; what comes
before it (options, checks, starting it in the background) is tciafs.spawn."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from tciafs import controlproto, controlserver, credentials, paths, sources
from tciafs.cache import Cache
from tciafs.cache.parallel import Connections
from tciafs.catalog import Catalog
from tciafs.control import Control
from tciafs.fs import Operations
from tciafs.mounts import MountError, locked_cache_dir
from tciafs.pagecache import PageFeeder
from tciafs.probe import ONLINE, ServiceProbe, online_selection, probe, stored_tree
from tciafs.readahead import ReadAhead
from tciafs.revisions import Revisions
from tciafs.sources.base import (
    Series,
    Source,
)
from tciafs.spawn import (  # the options and checks the daemon shares with `tciafs mount`
    MountOptions,
    default_cache_size,
    preflight,
)
from tciafs.tree import Tree

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # mallopt(3) parameter
_MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value
READY_GRACE = 0.05  # seconds a mount with a stored tree waits for the probe's answer


# -- checks before mounting ----------------------------------------------------------------

def warn_if_remote(cache_dir: Path) -> None:
    """Clusters put home directories, and so ~/.cache, on network file systems."""
    fstype = paths.filesystem_type(cache_dir)
    if fstype in paths.NETWORK_FILESYSTEMS:
        log.warning("the cache directory %s is on a network file system (%s): the cache "
                    "index needs a local disk for its locks and shared memory, and cached "
                    "reads would cross the network; give --cache-dir on a local disk "
                    "(node-local scratch)", cache_dir, fstype)


# -- the demo server ---------------------------------------------------------------------

@contextlib.contextmanager
def demo_emulator(s3: bool = False) -> Iterator[tuple[str, str, str | None]]:
    """Run the bundled emulator with the demo archive for as long as the mount lives;
    with `s3`, its S3 side (IDC's buckets and catalog) too."""
    # Only the demo starts an emulator: the daemon loads the launcher just then.
    from tciafs.emulator import launch

    data_dir = paths.data_home() / "emulator" / "demo"
    try:
        emu = launch.start("--host", "127.0.0.1", "--profile", "demo", data_dir=data_dir,
                           nlst=True, s3=s3)
    except launch.EmulatorStartError as exc:
        raise MountError("the demo emulator did not start; see the log") from exc
    with emu:
        assert emu.nlst_url is not None  # asked for with nlst=True
        yield emu.url, emu.nlst_url, emu.s3_url


def use_demo(opts: MountOptions, urls: tuple[str, str, str | None]) -> None:
    """Point the options at the demo emulator's servers."""
    opts.server, opts.nlst_server, s3_url = urls
    if s3_url is not None:
        opts.s3_endpoint = s3_url
        opts.idc_catalog = f"{s3_url}/_emulator/idc/idc_index.parquet"


# -- the daemon ----------------------------------------------------------------------------

def run_foreground(opts: MountOptions, ready_fd: int | None = None) -> int:
    """Mount and serve until unmounted or signalled. Reports readiness on `ready_fd`."""
    steady_heap()
    more_descriptors()
    try:
        preflight(opts.mountpoint)
        warn_if_remote(opts.cache_dir)
        with locked_cache_dir(opts.cache_dir), contextlib.ExitStack() as stack:
            if opts.demo:
                use_demo(opts, stack.enter_context(demo_emulator(s3=opts.source != "nbia")))
            trio.run(_serve, opts, ready_fd)
        return 0
    except MountError as exc:
        _report(ready_fd, f"error: {exc}")
        log.error("%s", exc)
        return 1


def steady_heap() -> bool:
    """Keep large buffers out of the heap for the daemon's whole life; False if the C
    library does not take the setting (not glibc).

    glibc raises its mmap threshold to the size of each mmapped block freed, up to 32 MiB.
    A streamed series frees many large buffers, so later ones come from the heap, whose
    fragments stay resident: the daemon's peak RSS grew with the size of the series copied
    (12 MB more for a 1 GB series than for 100 MB; 4 MB with the threshold held).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1


def more_descriptors(wanted: int = 65536) -> int:
    """Raise the soft limit on open files toward the hard one, and return it: a file
    read through the daemon holds a descriptor while open, and readers in parallel
    soon pass the usual 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _report(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)


def _source_key(opts: MountOptions) -> str:
    """What makes one persisted catalog differ from another: server, view, selection."""
    server = "demo" if opts.demo else f"{opts.server}|{opts.nlst_server}"
    if opts.source == "auto":  # NBIA's tree, so NBIA's servers
        server = f"auto|{server}"
    elif opts.source != "nbia":  # NBIA's keys stay as they were, so its catalogs too
        server = f"{opts.source}|{server if opts.demo else opts.s3_endpoint}"
    selection = ""
    if opts.manifest is not None:
        selection = "manifest:" + hashlib.sha256(opts.manifest.read_bytes()).hexdigest()
    elif opts.cart is not None:
        selection = f"cart:{opts.cart}"
    return f"{server}|{opts.layout}|{selection}"


def _client(opts: MountOptions) -> Source:
    if opts.source == "idc":
        return _idc_source(opts)
    try:
        login = credentials.find(os.environ, opts.credentials_file)
        api_key = credentials.read_secret(opts.api_key_file) if opts.api_key_file else None
    except credentials.CredentialsError as exc:
        raise MountError(str(exc)) from None
    if login is not None:
        log.info("logging in as %s", login)
    try:
        nbia = dict(server=opts.server, api=opts.api, nlst_server=opts.nlst_server,
                    login=login, api_key=api_key, max_connections=opts.max_connections,
                    timeout=opts.timeout)
        if opts.source == "auto":  # NBIA's tree and IDC's buckets; its map in the cache
            return sources.build("auto", cache_dir=opts.cache_dir,
                                 s3_endpoint=opts.s3_endpoint, idc_catalog=opts.idc_catalog,
                                 **nbia)
        return sources.build("nbia", **nbia)
    except ValueError as exc:  # a malformed server URL, an unreadable IDC catalog
        raise MountError(str(exc)) from None


def _idc_source(opts: MountOptions) -> Source:
    try:
        return sources.build("idc", endpoint=opts.s3_endpoint, catalog=opts.idc_catalog,
                             max_connections=opts.max_connections, timeout=opts.timeout)
    except ValueError as exc:  # no catalog, or one that cannot be read
        raise MountError(str(exc)) from None


async def _serve(opts: MountOptions, ready_fd: int | None) -> None:
    client = _client(opts)
    async with client:
        digest = hashlib.sha256(_source_key(opts).encode()).hexdigest()[:12]
        catalog = Catalog(opts.cache_dir / f"catalog-{digest}.sqlite", _source_key(opts))
        try:
            warm, selection = stored_tree(catalog, opts.manifest is not None
                                          or opts.cart is not None)
            if warm:  # ready at once; the service is probed meanwhile
                await _serve_tree(client, catalog, selection, opts, ready_fd, background=True)
                return
            unreachable = await probe(client, opts.server)
            if unreachable is not None:  # nothing stored to serve without it
                raise MountError(f"cannot reach {opts.server}: {unreachable}")
            selection = await online_selection(client, opts.manifest, opts.cart, opts.server,
                                               catalog)
            await _serve_tree(client, catalog, selection, opts, ready_fd, background=False)
        finally:
            catalog.close()


async def _serve_tree(client: Source, catalog: Catalog, selection: list[Series] | None,
                      opts: MountOptions, ready_fd: int | None, *, background: bool) -> None:
    size = opts.cache_size or default_cache_size(opts.cache_dir)
    # Background series leave two of the mount's connections to readers, as ZIPs do.
    connections = Connections(opts.series_connections, max(1, opts.max_connections - 2))
    cache = Cache(opts.cache_dir, size, client, prefetch=opts.prefetch,
                  connections=connections,
                  still_starting=lambda: notify_systemd(f"EXTEND_TIMEOUT_USEC={60_000_000}"))
    tree = Tree(client, catalog, listing_ttl=opts.listing_ttl, layout=opts.layout,
                ahead_at_once=ahead_at_once(opts.max_connections),
                selection=selection)
    started = time.time()

    async def refresh_selection() -> None:
        if selection is not None:  # a manifest's or cart's series, resolved again
            tree.selection = await online_selection(client, opts.manifest, opts.cart,
                                                    opts.server, catalog)

    service = ServiceProbe(client, opts.server, on_down=tree.service_down,
                           on_up=tree.service_up, refresh=refresh_selection
                           ) if background else None

    def snapshot() -> dict[str, Any]:
        return status_document(parts, opts, started, service)

    parts = assemble(client, tree, cache, control=Control(tree, cache), status=snapshot)
    parts.control_address = controlproto.new_address()
    parts.service = service
    try:
        await _run_fuse(parts, opts, ready_fd)
    finally:
        cache.close()


def ahead_at_once(max_connections: int) -> int:
    """Listings fetched ahead of a walk at once: all connections but one, as a walk's
    requests are small and a cold walk waits on their round trips (the number in flight
    bounds it: docs/benchmarks.md, "Where a cold walk's CPU goes"); the one left is for
    the readers' own requests."""
    return max(0, max_connections - 1)


@dataclass
class Parts:
    """One mount's parts, wired together by assemble()."""

    client: Source
    tree: Tree
    cache: Cache
    pages: PageFeeder
    ops: Operations
    control: Control | None = None
    # Where the commands reach the control (tciafs.controlserver); None: no commands.
    control_address: str | None = None
    # The service probed in the background while a stored tree is served; None: it
    # answered before the mount was made.
    service: ServiceProbe | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the parts' background tasks, each once those it relies on run."""
        if self.service is not None:  # first: stored listings are served as they are
            await nursery.start(self.service.run)
        await nursery.start(self.cache.run)
        if self.control is not None:
            await nursery.start(self.control.run_jobs)
            if self.control_address is not None:
                await nursery.start(controlserver.serve, self.ops, self.control_address)
        await nursery.start(self.pages.run)
        await nursery.start(self.tree.run)
        await nursery.start(self.tree.catalog.run_checkpoints)
        await nursery.start(self.client.run)


def assemble(client: Source, tree: Tree, cache: Cache, *, control: Control | None = None,
             status: Callable[[], dict[str, Any]] | None = None) -> Parts:
    """Build the adapter and the parts it steers, and wire the callbacks between them."""
    pages = PageFeeder(tree, cache)
    ops = Operations(tree, cache, pages, ReadAhead(tree, cache), status=status,
                     control=control)
    revisions = Revisions(tree, cache, pages, kernel_knows=ops.kernel_knows)
    # The cache fetches a series by the instances the tree lists, and bytes it refuses
    # as wrong must leave the kernel's page cache too.
    cache.instances_of = tree.instance_uids
    cache.prefetcher.held_instances_of = tree.held_instance_uids
    cache.on_refused = pages.refused
    cache.contents.on_added = ops.size_known  # sizes the kernel kept as 0 are dropped
    tree.on_series_revised = revisions.series_revised
    tree.on_series_withdrawn = revisions.series_withdrawn
    return Parts(client, tree, cache, pages, ops, control)


def status_document(parts: Parts, opts: MountOptions, started: float,
                    service: ServiceProbe | None = None) -> dict[str, Any]:
    """The status document the mount serves, which `tciafs status` shows."""
    client, cache = parts.client, parts.cache
    s = cache.stats
    looked = s.hits + s.misses
    doc: dict[str, Any] = {
        "pid": os.getpid(), "server": opts.server, "api": opts.api,
        "uptime": time.time() - started,
        "cache_dir": str(cache.root),
        "requests": client.stats.as_dict(),
        "unreachable": client.unreachable,
        "cache": {"used": cache.used_bytes, "bound": cache.max_bytes, "entries": cache.entries,
                  "hits": s.hits, "misses": s.misses,
                  "hit_ratio": s.hits / looked if looked else 0.0,
                  "bytes_fetched": s.bytes_fetched, "single_fetches": s.single_fetches,
                  "series_fetches": s.series_fetches, "series_resumed": s.series_resumed,
                  "series_cut_short": s.series_cut_short,
                  "evictions": s.evictions,
                  "md5_mismatches": s.md5_mismatches},
        "in_flight": {k: {"bytes": v[0], "instances": v[1]}
                      for k, v in cache.in_flight.items()},
        "jobs": parts.control.progress() if parts.control is not None else {},
        "page_cache": {**parts.pages.counters, "read_ahead": parts.pages.state},
        "listed_ahead": parts.tree.listed_ahead,
        "traffic": client.traffic(),  # bytes received, by archive
    }
    if opts.source == "auto":
        doc.update(source="auto", s3_endpoint=opts.s3_endpoint,
                   catalog=opts.idc_catalog or "the installed idc-index-data",
                   catalog_version=getattr(client, "catalog_version", None))
    elif opts.source != "nbia":  # NBIA's document stays as it was
        doc.update(source=opts.source, server=opts.s3_endpoint, api="S3",
                   catalog=opts.idc_catalog or "the installed idc-index-data",
                   catalog_version=getattr(client, "catalog_version", None))
    if parts.control_address is not None:
        doc[controlproto.CONTROL_KEY] = parts.control_address
    doc["service"] = service.state if service is not None else ONLINE
    if service is not None and service.offline is not None:
        doc["offline_at_start"] = service.offline
    return doc


async def _run_fuse(parts: Parts, opts: MountOptions, ready_fd: int | None) -> None:
    fuse_options = set(pyfuse3.default_options)
    # "ro": the kernel refuses writes without asking us, and findmnt, backup tools and
    # root's `test -w` see a read-only tree. It refuses setxattr too, so commands come
    # through the control socket.
    fuse_options |= {"fsname=tciafs", "subtype=tciafs", "noatime", "ro"}
    if opts.allow_other:
        # Other local users then read through this mount with this user's login and
        # cache; non-root users also need user_allow_other in /etc/fuse.conf.
        fuse_options.add("allow_other")
    try:
        pyfuse3.init(parts.ops, str(opts.mountpoint), fuse_options)
    except RuntimeError as exc:
        raise MountError(f"cannot mount {opts.mountpoint}: {exc}") from exc
    # main() returns both when someone unmounted us (nothing left to undo) and after a
    # signal's terminate() (the mount is still there and must go).
    outside_unmount = False
    signalled = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await parts.start(nursery)
            nursery.start_soon(_watch_signals, signalled)
            nursery.start_soon(_announce_ready, opts.mountpoint, ready_fd, parts.service)
            await pyfuse3.main()
            outside_unmount = not signalled.is_set()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=not outside_unmount)
        log.info("unmounted %s", opts.mountpoint)


async def _watch_signals(signalled: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("signal %d: unmounting", signum)
            signalled.set()
            pyfuse3.terminate()
            return


async def _announce_ready(mountpoint: Path, ready_fd: int | None,
                          service: ServiceProbe | None) -> None:
    # The stat is answered by our own loop, so success proves the mount serves.
    await trio.to_thread.run_sync(os.stat, mountpoint)
    # A service that answers (or refuses at once) is reported with the mount; one that
    # needs its back-off is reported as being probed, and the mount is ready meanwhile.
    note = await service.outcome(READY_GRACE) if service is not None else None
    log.info("mounted %s", mountpoint)
    _report(ready_fd, "ready" if note is None else f"ready: {note}")
    notify_systemd("READY=1")


def notify_systemd(message: str) -> None:
    """sd_notify without libsystemd: one datagram to $NOTIFY_SOCKET."""
    import socket

    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    # A stale socket (the manager restarted) must not take down a mount that works.
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
