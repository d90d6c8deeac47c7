"""Handler-level tests: the real Operations, tree, cache and client against the emulator,
with no mount. pyfuse3.readdir_reply needs a kernel request, so it is replaced by a
collector; everything else is the code that runs under a real mount."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pyfuse3
import pytest
import trio
import trio.testing

from tciafs.cache import META_SLACK, Cache
from tciafs.catalog import ROOT_INODE, Catalog, Kind
from tciafs.fs import UNKNOWN_TTL, Operations
from tciafs.mount import assemble
from tciafs.sources.nbia import NbiaSource
from tciafs.tree import Tree

from mountutil import IMAGE_ENDPOINTS, count_requests, reset_stats, set_faults, stats

pytestmark = pytest.mark.handler


class Harness:
    def __init__(self, ops: Operations, nursery: trio.Nursery) -> None:
        self.ops = ops
        self.nursery = nursery

    async def readdir(self, ino: int) -> list[tuple[str, pyfuse3.EntryAttributes]]:
        fh = await self.ops.opendir(ino, None)
        out: list[tuple[str, pyfuse3.EntryAttributes]] = []
        await self.ops.readdir(fh, 0, out)
        return out

    async def walk(self, ino: int = ROOT_INODE, depth: int = 5) -> list:
        found = []
        for name, attr in await self.readdir(ino):
            found.append((name, attr))
            if depth > 1 and attr.st_mode & 0o040000:
                found.extend(await self.walk(attr.st_ino, depth - 1))
        return found

    async def series(self) -> list[pyfuse3.EntryAttributes]:
        return [a for _, a in await self.walk(depth=4)
                if self.ops.tree.node(a.st_ino).kind is Kind.SERIES]


@pytest.fixture(autouse=True)
def _collect_readdir(monkeypatch: pytest.MonkeyPatch) -> None:
    def reply(token: list, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        token.append((os.fsdecode(name), attr))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)


def _build(emulator, root: Path, *, max_bytes: int = 1 << 30, prefetch: bool = False
           ) -> tuple[NbiaSource, Operations]:
    client = NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=10)
    catalog = Catalog(root / "catalog.sqlite", "test")
    cache = Cache(root / "cache", max_bytes, client, prefetch=prefetch)
    return client, assemble(client, Tree(client, catalog), cache).ops


@pytest.fixture
async def harness(emulator, tmp_path: Path):
    client, ops = _build(emulator, tmp_path)
    async with client, trio.open_nursery() as nursery:
        await nursery.start(ops.cache.run)
        yield Harness(ops, nursery)
        nursery.cancel_scope.cancel()


async def test_listing_is_one_request_per_directory_at_most(harness, emulator) -> None:
    reset_stats(emulator.url)  # the main and NLST servers share one set of counters
    entries = await harness.walk()
    dirs = sum(1 for _, a in entries if a.st_mode & 0o040000) + 1
    counts = stats(emulator.url)["requests"]
    assert sum(counts.values()) <= dirs
    collections = len(await harness.readdir(ROOT_INODE))
    series_dirs = sum(1 for _, a in entries
                      if harness.ops.tree.node(a.st_ino).kind is Kind.SERIES)
    assert counts.get("getSeries", 0) <= collections  # bulk: one per (small) collection
    assert counts.get("getSOPInstanceUIDs", 0) == series_dirs
    assert counts.get("getPatientStudy", 0) == 0  # studies come with the series rows
    assert count_requests(emulator.url, *IMAGE_ENDPOINTS) == 0
    files = [a for name, a in entries if name.endswith(".dcm")]
    # Not fetched: size 0, kept by the kernel only until an open invalidates it.
    assert files and all(a.st_size == 0 and a.attr_timeout == UNKNOWN_TTL for a in files)


async def test_junk_and_unknown_names_cost_nothing(harness, emulator) -> None:
    await harness.walk(depth=1)
    reset_stats(emulator.url)
    for name in (b".Trash-1000", b"desktop.ini", b".git", b"no-such-collection"):
        with pytest.raises(pyfuse3.FUSEError) as err:
            await harness.ops.lookup(ROOT_INODE, name, None)
        assert err.value.errno == errno.ENOENT
    assert stats(emulator.url)["requests_total"] == 0


async def test_open_makes_size_exact_and_reads_match(harness, emulator) -> None:
    series = (await harness.series())[0]
    (name, attr), *_ = await harness.readdir(series.st_ino)
    ops = harness.ops
    info = await ops.open(attr.st_ino, os.O_RDONLY, None)
    after = await ops.getattr(attr.st_ino, None)
    assert after.st_size > 1000 and after.attr_timeout > 0
    data = await ops.read(info.fh, 0, after.st_size + 4096)
    assert len(data) == after.st_size and data[128:132] == b"DICM"
    assert await ops.read(info.fh, after.st_size + 10, 100) == b""
    await ops.release(info.fh)


@pytest.mark.parametrize("harm", ["deleted", "cut short"])
async def test_a_file_harmed_while_open_is_fetched_again_not_read_short(
        harness, emulator, harm: str) -> None:
    series = (await harness.series())[0]
    (_, attr), *_ = await harness.readdir(series.st_ino)
    ops = harness.ops
    info = await ops.open(attr.st_ino, os.O_RDONLY, None)
    size = (await ops.getattr(attr.st_ino, None)).st_size
    entry = ops._files[info.fh].entry
    if harm == "deleted":  # before the first read opens it
        whole = Path(entry.path).read_bytes()
        os.unlink(entry.path)
    else:
        whole = await ops.read(info.fh, 0, size)
        os.truncate(entry.path, size // 2)  # the inode the handle has open
    reset_stats(emulator.url)
    assert await ops.read(info.fh, 0, size) == whole
    assert await ops.read(info.fh, size - 10, 100) == whole[-10:]
    assert stats(emulator.url)["requests"] == {"getSingleImage": 1}
    await ops.release(info.fh)
    assert os.path.getsize(entry.path) == size


async def test_writes_are_refused(harness) -> None:
    series = (await harness.series())[0]
    (_, attr), *_ = await harness.readdir(series.st_ino)
    ops = harness.ops
    for call in (ops.open(attr.st_ino, os.O_RDWR, None),
                 ops.open(attr.st_ino, os.O_WRONLY | os.O_TRUNC, None),
                 ops.mkdir(ROOT_INODE, b"x", 0o755, None),
                 ops.unlink(series.st_ino, b"x", None),
                 ops.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0, None),
                 ops.setattr(attr.st_ino, None, None, None, None),
                 ops.create(ROOT_INODE, b"new", 0o644, os.O_WRONLY, None),
                 ops.setxattr(attr.st_ino, b"user.x", b"1", None)):
        with pytest.raises(pyfuse3.FUSEError) as err:
            await call
        assert err.value.errno == errno.EROFS


async def test_lookup_counts_are_kept(harness) -> None:
    ops = harness.ops
    entries = await harness.readdir(ROOT_INODE)
    ino = entries[0][1].st_ino
    await ops.lookup(ROOT_INODE, os.fsencode(entries[0][0]), None)
    assert ops.lookups[ino] == 2  # one from readdir, one from lookup
    await ops.forget([(ino, 2)])
    assert ino not in ops.lookups


async def test_concurrent_opens_download_once(harness, emulator) -> None:
    series = (await harness.series())[1]
    (_, attr), *_ = await harness.readdir(series.st_ino)
    reset_stats(emulator.url)
    handles = []

    async def opener() -> None:
        handles.append(await harness.ops.open(attr.st_ino, os.O_RDONLY, None))

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(opener)
    assert count_requests(emulator.url, "getSingleImage") == 1
    for info in handles:
        await harness.ops.release(info.fh)


async def test_server_failure_is_eio_within_bounds(harness, emulator) -> None:
    series = (await harness.series())[2]
    (_, attr), *_ = await harness.readdir(series.st_ino)
    set_faults(emulator.url, p503=1.0, endpoints=["getSingleImage"])
    try:
        with trio.fail_after(60), pytest.raises(pyfuse3.FUSEError) as err:
            await harness.ops.open(attr.st_ino, os.O_RDONLY, None)
        assert err.value.errno == errno.EIO
    finally:
        set_faults(emulator.url)


async def test_a_silent_nlst_server_does_not_erase_its_stored_collections(emulator,
                                                                         tmp_path: Path
                                                                         ) -> None:
    async with NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=5) as client:
        tree = Tree(client, Catalog(tmp_path / "catalog.sqlite", "test"), listing_ttl=0)
        first = {n.name for n in await tree.children(ROOT_INODE)}
        assert "NLST-Demo" in first
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port here
    async with NbiaSource(emulator.url, nlst_server=dead, timeout=2, retries=0) as client:
        tree = Tree(client, Catalog(tmp_path / "catalog.sqlite", "test"), listing_ttl=0)
        again = {n.name for n in await tree.children(ROOT_INODE)}
    assert again == first


async def test_once_the_service_fails_a_listing_stale_ones_are_served_without_asking(
        emulator, tmp_path: Path) -> None:
    async with NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=5,
                          retries=0) as client:
        tree = Tree(client, Catalog(tmp_path / "catalog.sqlite", "test"), listing_ttl=0)
        listed = await tree.children(ROOT_INODE)
        collections = [n.name for n in listed]
        lung = next(n for n in listed if n.name == "Demo-Lung CT_2024")
        patients = [n.name for n in await tree.children(lung.ino)]
        set_faults(emulator.url, p503=1.0)
        try:
            reset_stats(emulator.url)
            names = [n.name for n in await tree.children(ROOT_INODE)]
            assert names == collections  # tried, then served as stored
            tried = stats(emulator.url)["requests_total"]
            assert tried >= 1
            names = [n.name for n in await tree.children(lung.ino)]
            assert names == patients and patients  # stored, and not tried
            assert stats(emulator.url)["requests_total"] == tried
        finally:
            set_faults(emulator.url)


async def test_concurrent_patient_listings_share_one_bulk_request(harness, emulator) -> None:
    collection = next(a for n, a in await harness.readdir(ROOT_INODE)
                      if n == "Demo-Lung CT_2024")
    # Straight from the tree: readdir would render .LICENSE, which lists a patient.
    reset_stats(emulator.url)
    patients = [n.ino for n in await harness.ops.tree.children(collection.st_ino)
                if n.kind is Kind.PATIENT]
    assert len(patients) >= 3
    async with trio.open_nursery() as nursery:
        for ino in patients:
            nursery.start_soon(harness.readdir, ino)
    assert count_requests(emulator.url, "getSeries") == 1


class RecordingPusher:
    """Stands in for /dev/fuse, which needs a mount: records what the feeder pushes."""

    def __init__(self) -> None:
        self.pushed: list[int] = []
        self.closed = False

    def push(self, ino: int, fd: int, size: int) -> None:
        assert os.fstat(fd).st_size == size  # the whole cache file, and it is open
        self.pushed.append(ino)

    def close(self) -> None:
        self.closed = True


async def _cached_series(harness) -> list[int]:
    """The inodes of a series' instances in the order `ls` shows, each fetched once."""
    series = (await harness.series())[0]
    inodes = [attr.st_ino for _, attr in sorted(await harness.readdir(series.st_ino),
                                                key=lambda item: item[0])
              if harness.ops.tree.node(attr.st_ino).kind is Kind.INSTANCE]
    for ino in inodes:
        await harness.ops.release((await harness.ops.open(ino, os.O_RDONLY, None)).fh)
    return inodes


async def _feeder_settled(ops: Operations) -> None:
    """Every task blocked, and no file being read from disk in a worker thread (a task
    waiting for a thread counts as blocked): what the feeder will push, it has."""
    with trio.fail_after(30):
        await trio.testing.wait_all_tasks_blocked()
        while ops.pages.reading_from_disk:
            await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()


def _holds(ops: Operations, inodes: list[int]) -> list[int]:
    return [ops.cache.open_count(ops.tree.node(ino).ident) for ino in inodes]


async def test_read_ahead_pushes_only_files_nobody_has_open(harness) -> None:
    ops = harness.ops
    inodes = await _cached_series(harness)
    assert len(inodes) >= 8
    pusher = RecordingPusher()
    await harness.nursery.start(lambda task_status: ops.pages.run(pusher=pusher,
                                                                  task_status=task_status))
    first = await ops.open(inodes[0], os.O_RDONLY, None)
    assert pusher.pushed == [inodes[0]]  # at open, before the handle is handed out
    await _feeder_settled(ops)
    assert pusher.pushed == inodes[:1 + ops.pages.ahead_files]  # then the next, in order
    assert _holds(ops, inodes) == [1] + [0] * (len(inodes) - 1)  # the queue let go

    # The kernel dropped one file's pages while another handle holds it open: a second
    # open must not push into it, since the first handle's reads may lock its pages.
    await ops.forget([(inodes[0], 1)])
    second = await ops.open(inodes[0], os.O_RDONLY, None)
    await _feeder_settled(ops)
    assert pusher.pushed.count(inodes[0]) == 1
    for info in (first, second):
        await ops.release(info.fh)
    assert ops.pages.counters["pushed_at_open"] == 1
    assert ops.pages.counters["pushed_ahead"] == ops.pages.ahead_files


async def test_a_queued_file_is_pushed_at_its_open_and_holds_end_with_the_feeder(
        harness) -> None:
    ops = harness.ops
    inodes = await _cached_series(harness)
    pusher = RecordingPusher()
    feeder = trio.CancelScope()
    harness.nursery.start_soon(_run_in, feeder, ops.pages.run(pusher=pusher))
    await _feeder_settled(ops)
    first = await ops.open(inodes[0], os.O_RDONLY, None)
    # Opened before the feeder had its turn: pushed by its own open, not twice.
    second = await ops.open(inodes[1], os.O_RDONLY, None)
    assert pusher.pushed == inodes[:2]
    assert _holds(ops, inodes[2:2 + ops.pages.ahead_files]) == [1] * ops.pages.ahead_files
    feeder.cancel()
    await _feeder_settled(ops)
    assert pusher.closed and ops.pages.state == "stopped"
    assert _holds(ops, inodes) == [1, 1] + [0] * (len(inodes) - 2)
    for info in (first, second):
        await ops.release(info.fh)
    assert _holds(ops, inodes) == [0] * len(inodes)


async def _run_in(scope: trio.CancelScope, job) -> None:
    with scope:
        await job


async def test_a_full_cache_fails_every_open_but_is_logged_once(harness, caplog) -> None:
    series = (await harness.series())[0]
    files = [attr for _, attr in await harness.readdir(series.st_ino)
             if harness.ops.tree.node(attr.st_ino).kind is Kind.INSTANCE]
    ops = harness.ops
    held = [await ops.open(attr.st_ino, os.O_RDONLY, None) for attr in files[:2]]
    ops.cache.max_bytes = ops.cache.used_bytes + META_SLACK + 1000  # full of open files
    with caplog.at_level("ERROR", logger="tciafs.fs"):
        for _ in range(10):
            with pytest.raises(pyfuse3.FUSEError) as err:
                await ops.open(files[2].st_ino, os.O_RDONLY, None)
            assert err.value.errno == errno.ENOSPC
    full = [r for r in caplog.records if "cache full" in r.getMessage()]
    assert len(full) == 1, [r.getMessage() for r in caplog.records]
    for info in held:
        await ops.release(info.fh)
    await ops.release((await ops.open(files[2].st_ino, os.O_RDONLY, None)).fh)  # room again


async def _read_whole(ops: Operations, ino: int) -> bytes:
    info = await ops.open(ino, os.O_RDONLY, None)
    try:
        return await ops.read(info.fh, 0, 1 << 24)
    finally:
        await ops.release(info.fh)


@pytest.mark.parametrize("pinned", [False, True])
async def test_a_series_re_submitted_to_the_service_is_fetched_again(
        emulator, tmp_path: Path, pinned: bool) -> None:
    client = NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=10)
    catalog = Catalog(tmp_path / "catalog.sqlite", "test")
    cache = Cache(tmp_path / "cache", 1 << 30, client, prefetch=False)
    ops = assemble(client, Tree(client, catalog, listing_ttl=0), cache).ops
    async with client, trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        harness = Harness(ops, nursery)
        series = (await harness.series())[0]
        node = ops.tree.node(series.st_ino)
        study = node.parent
        (_, first), *_ = await harness.readdir(series.st_ino)
        sop = ops.tree.node(first.st_ino).ident
        original = await _read_whole(ops, first.st_ino)
        if pinned:
            cache.pin_series(node.ident, node.collection)
        assert cache.is_cached(sop) and cache.known_size(sop) == len(original)

        await ops.tree.children(study)  # listed again, same submission date: kept
        assert cache.is_cached(sop)

        # The stored listing is from before a re-submission (an older date).
        catalog.db.execute("UPDATE nodes SET meta=json_set(meta, '$.submission_date', "
                           "'2001-02-03') WHERE ino=?", (series.st_ino,))
        reset_stats(emulator.url)
        await ops.tree.children(study)
        if pinned:  # fetched again by itself
            with trio.fail_after(30):
                while not cache.is_cached(sop):
                    await trio.sleep(0.05)
            assert count_requests(emulator.url, *IMAGE_ENDPOINTS) >= 1
        else:
            assert not cache.is_cached(sop) and cache.known_size(sop) is None
            assert count_requests(emulator.url, *IMAGE_ENDPOINTS) == 0
        assert await _read_whole(ops, first.st_ino) == original
        assert count_requests(emulator.url, *IMAGE_ENDPOINTS) >= 1
        assert ops.tree.catalog.get(series.st_ino).meta["submission_date"] != "2001-02-03"

        reset_stats(emulator.url)
        await ops.tree.children(study)  # the date now stored is the service's: kept
        assert cache.is_cached(sop)
        assert count_requests(emulator.url, *IMAGE_ENDPOINTS) == 0
        nursery.cancel_scope.cancel()


async def test_a_traversal_lists_the_next_patients_ahead_when_not_listed_in_bulk(
        emulator, tmp_path: Path) -> None:
    async with NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=10) as client, \
            trio.open_nursery() as nursery:
        # bulk_patients=0: every patient is listed on its own, as in a collection of
        # thousands of patients
        tree = Tree(client, Catalog(tmp_path / "catalog.sqlite", "test"), bulk_patients=0)
        await nursery.start(tree.run)
        lung = next(n for n in await tree.children(ROOT_INODE)
                    if n.name == "Demo-Lung CT_2024")
        first, *others = await tree.children(lung.ino)
        patients = [p for p in others if p.kind is Kind.PATIENT]
        assert patients and all(tree.catalog.get(p.ino).listed is None for p in patients)
        (study,) = await tree.children(first.ino)
        series = [n for n in await tree.children(study.ino) if n.kind is Kind.SERIES]
        assert len(series) >= 2
        for node in series[:2]:  # a traversal reads one series after another
            await tree.children(node.ino)
            tree.list_ahead(node)
        with trio.fail_after(20):
            while any(tree.catalog.get(p.ino).listed is None for p in patients):
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_a_cold_open_lists_the_other_series_of_its_study(emulator, tmp_path: Path
                                                               ) -> None:
    """The study's other series are fetched in the background, and listed too: `cp -r`
    of the study then finds each listed when it gets there."""
    client, ops = _build(emulator, tmp_path, prefetch=True)
    async with client, trio.open_nursery() as nursery:
        await nursery.start(ops.cache.run)
        await nursery.start(ops.tree.run)
        harness = Harness(ops, nursery)
        lung = next(a for name, a in await harness.readdir(ROOT_INODE)
                    if name == "Demo-Lung CT_2024")
        (_, patient), *_ = await harness.readdir(lung.st_ino)
        (_, study), *_ = await harness.readdir(patient.st_ino)
        series = [a.st_ino for _, a in await harness.readdir(study.st_ino)
                  if ops.tree.node(a.st_ino).kind is Kind.SERIES]
        assert len(series) >= 2
        first, *others = series
        assert all(ops.tree.catalog.get(ino).listed is None for ino in others)
        instance = next(a.st_ino for _, a in await harness.readdir(first)
                        if ops.tree.node(a.st_ino).kind is Kind.INSTANCE)
        reset_stats(emulator.url)
        await ops.release((await ops.open(instance, os.O_RDONLY, None)).fh)
        with trio.fail_after(30):
            while any(ops.tree.catalog.get(ino).listed is None for ino in others):
                await trio.sleep(0.02)
        assert stats(emulator.url)["requests"].get("getSOPInstanceUIDs") == len(others)
        nursery.cancel_scope.cancel()


async def test_with_one_connection_nothing_is_listed_ahead(emulator, tmp_path: Path) -> None:
    async with NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=10) as client, \
            trio.open_nursery() as nursery:
        # --max-connections 1 gives ahead_at_once 0: the one connection is the reader's
        tree = Tree(client, Catalog(tmp_path / "catalog.sqlite", "test"), bulk_patients=0,
                    ahead_at_once=0)
        await nursery.start(tree.run)
        lung = next(n for n in await tree.children(ROOT_INODE)
                    if n.name == "Demo-Lung CT_2024")
        first, *others = await tree.children(lung.ino)
        (study,) = await tree.children(first.ino)
        for node in [n for n in await tree.children(study.ino) if n.kind is Kind.SERIES][:2]:
            await tree.children(node.ino)
            tree.list_ahead(node)
        await trio.sleep(0.5)
        assert all(tree.catalog.get(p.ino).listed is None
                   for p in others if p.kind is Kind.PATIENT)
        nursery.cancel_scope.cancel()


async def test_a_catalog_found_damaged_after_start_is_eio_and_one_clear_line(
        emulator, tmp_path: Path, caplog) -> None:
    client, ops = _build(emulator, tmp_path)
    async with client:
        series = [a.st_ino for a in await Harness(ops, None).series()]  # all listed, stored
    ops.tree.catalog.close()
    ops.cache.close()
    path = tmp_path / "catalog.sqlite"
    size = path.stat().st_size
    with path.open("r+b") as db:  # a disk fault in the rows stored last: the last series'
        db.seek(size - size // 4)
        db.write(b"\xde\xad" * (size // 8))
    client, ops = _build(emulator, tmp_path)  # opens: the rows read at start are sound
    async with client:
        with caplog.at_level("ERROR", logger="tciafs.fs"):
            for _ in range(3):
                with pytest.raises(pyfuse3.FUSEError) as err:
                    await Harness(ops, None).readdir(series[-1])
                assert err.value.errno == errno.EIO
    lines = [r.getMessage() for r in caplog.records]
    assert sum("a database of the cache is damaged" in line for line in lines) == 1, lines
    assert not any(r.exc_info for r in caplog.records)  # no traceback
    ops.cache.close()
