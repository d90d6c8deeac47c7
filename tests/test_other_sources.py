"""The tree, the cache and the adapter follow a source's capabilities, not NBIA's habits.

A second source differs from NBIA in what it can do: it may send no whole-series stream,
and it may know every file's exact size from its listing. `SizedFileSource` is such a
source, built on NBIA itself (its listings carry the sizes the test read from the
service's own files), so the parts above are exercised against a real server.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import trio
from cacheutil import _series, _truth, _with_cache

from tciafs.cache import Cache
from tciafs.catalog import ROOT_INODE, Catalog, Kind
from tciafs.mount import assemble
from tciafs.sources.base import Instance
from tciafs.sources.nbia import NbiaSource
from tciafs.tree import Tree

from mountutil import reset_stats, stats

LUNG = "Demo-Lung CT_2024"


class SizedFileSource:
    """NBIA, but with no series streams and with exact sizes in its listings."""

    def __init__(self, nbia: NbiaSource, sizes: dict[str, int]) -> None:
        self._nbia = nbia
        self._sizes = sizes
        self.capabilities = dataclasses.replace(nbia.capabilities, series_streams=False,
                                                series_checksums=False, known_sizes=True)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nbia, name)

    async def __aenter__(self) -> SizedFileSource:
        await self._nbia.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._nbia.__aexit__(*exc)

    async def instances(self, collection: str, series_uid: str) -> list[Instance]:
        listed = await self._nbia.instances(collection, series_uid)
        return [Instance(i.uid, self._sizes[i.uid]) for i in listed]

    def open_series(self, *args: object, **kwargs: object) -> Any:
        raise AssertionError("a source without series streams was asked for one")


def _source(emulator, truth: dict[str, bytes]) -> SizedFileSource:
    nbia = NbiaSource(emulator.url, nlst_server=emulator.nlst_url, timeout=10)
    return SizedFileSource(nbia, {sop: len(data) for sop, data in truth.items()})


async def test_a_series_without_a_stream_comes_file_by_file(emulator, tmp_path: Path) -> None:
    uid = _series(emulator.url)[1]["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    source = _source(emulator, truth)
    cache = Cache(tmp_path / "c", 1 << 30, source, prefetch=True)  # type: ignore[arg-type]

    async def listed(series: str) -> list[str]:
        return [i.uid for i in await source.instances(LUNG, series)]

    cache.instances_of = listed
    reset_stats(emulator.url)

    async def body() -> None:
        with trio.fail_after(60):
            await cache.start_series_fetch(LUNG, uid).wait()
        assert cache.series_complete(uid), cache.failed_series
        for sop, data in truth.items():
            entry = await cache.acquire(LUNG, uid, sop)
            cache.release(entry)
            assert Path(entry.path).read_bytes() == data

    async with source:
        await _with_cache(cache, body)
    cache.close()
    requests = stats(emulator.url)["requests"]
    assert "getImage" not in requests
    assert requests["getSingleImage"] == len(truth)
    assert cache.stats.series_fetches == 1 and cache.stats.series_resumed == 0


async def test_listed_sizes_are_exact_before_any_read(emulator, tmp_path: Path) -> None:
    uid = _series(emulator.url)[1]["SeriesInstanceUID"]
    truth = _truth(emulator.url, uid)
    source = _source(emulator, truth)
    catalog = Catalog(tmp_path / "catalog.sqlite", "test")
    cache = Cache(tmp_path / "c", 1 << 30, source, prefetch=False)  # type: ignore[arg-type]
    ops = assemble(source, Tree(source, catalog), cache).ops  # type: ignore[arg-type]
    async with source:
        reset_stats(emulator.url)
        series = ops.tree.catalog.find_uid(uid)
        assert series is None  # not listed yet: walk down to it
        node = ops.tree.node(ROOT_INODE)
        assert node is not None
        for name in (LUNG, _series(emulator.url)[1]["PatientID"],
                     _series(emulator.url)[1]["StudyInstanceUID"], uid):
            attr = await ops.lookup(node.ino, name.encode())
            node = ops.tree.node(attr.st_ino)
            assert node is not None
        files = [c for c in await ops.tree.children(node.ino) if c.kind is Kind.INSTANCE]
        sizes = {f.ident: (await ops.getattr(f.ino)).st_size for f in files}
        attrs = [await ops.getattr(f.ino) for f in files]
    assert sizes == {sop: len(data) for sop, data in truth.items()}
    assert all(a.attr_timeout > 0 for a in attrs)  # exact: the kernel may keep them
    requests = stats(emulator.url)["requests"]
    assert not {"getImage", "getSingleImage"} & set(requests)  # listing alone
    cache.close()
