"""A whole IDC series in the background: parallel object GETs within the caps
(docs/connections.md). IDC has no series stream; each object is one GET, and a series
uses up to `--series-connections` of them at once, all series together no more than
the mount's cap. Counted at the client, where the caps apply; no timing is held.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cacheutil import _with_cache
from parallelutil import OpenDownloads
from test_idc_source import CATALOG, idc_emulator, source_of  # noqa: F401 (a fixture)

from tciafs.cache import Cache
from tciafs.cache.parallel import Connections
from tciafs.emulator import launch
from tciafs.sources.idc import IdcSource

from mountutil import set_faults

DEFAULT_TIER = "handler"


@pytest.fixture
def slowed(idc_emulator: launch.EmulatorProcess  # noqa: F811 (the fixture imported)
           ) -> Iterator[launch.EmulatorProcess]:
    """Each answer a little late, so that GETs overlap as they would over a real link."""
    assert idc_emulator.s3_url is not None
    set_faults(idc_emulator.s3_url, latency_ms=40)
    yield idc_emulator
    set_faults(idc_emulator.s3_url)


@pytest.mark.parametrize(("series", "per_series", "per_mount", "cap"),
                         [(1, 3, 8, 3), (2, 3, 8, 6), (2, 4, 3, 3)])
async def test_series_come_as_parallel_gets_within_the_caps(
        slowed: launch.EmulatorProcess, tmp_path: Path, series: int, per_series: int,
        per_mount: int, cap: int) -> None:
    source = source_of(slowed)
    collection = source.catalog.collection_names()[0]
    chosen = [s for s in source.catalog.series_of(collection, None)
              if (s.image_count or 0) >= 8][:series]
    assert len(chosen) == series, "the demo's IDC side lacks series of 8 files or more"
    async with source:
        names = {s.series_uid: [i.uid for i in await source.instances(collection,
                                                                      s.series_uid)]
                 for s in chosen}
        truth = {s.series_uid: await _bucket_bytes(source, collection, s.series_uid,
                                                   names[s.series_uid]) for s in chosen}
        cache = Cache(tmp_path / "c", 1 << 30, source,
                      connections=Connections(per_series, per_mount))

        async def instances_of(series: str) -> list[str]:
            return names[series]

        cache.instances_of = instances_of
        opened = OpenDownloads(source)

        async def body() -> None:
            events = [cache.start_series_fetch(collection, s.series_uid) for s in chosen]
            for event in events:
                await event.wait()

        await _with_cache(cache, body)
    assert opened.peak == cap  # in parallel, and never past the cap
    assert sorted(opened.alone) == sorted(n for ns in names.values() for n in ns)
    assert max(opened.alone.values()) == 1  # each object once
    for series, files in truth.items():
        assert cache.series_complete(series)
        for name, data in files.items():
            assert cache.store.path(name).read_bytes() == data


async def _bucket_bytes(source: IdcSource, collection: str, series: str,
                        names: list[str]) -> dict[str, bytes]:
    """Each object's bytes, read straight from the source (before the test counts)."""
    out = {}
    for name in names:
        async with source.open_instance(collection, series, name) as stream:
            out[name] = b"".join([chunk async for chunk in stream.chunks()])
    return out
