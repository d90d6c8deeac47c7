"""The IDC source against the emulator's S3 side: the tree from the catalog with no
request above a series, one ListObjectsV2 per series, exact sizes before any read, and
files through the cache equal to the bucket's bytes; then a real mount with cp and pydicom.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from cacheutil import _with_cache
from cliutil import run_tciafs, status_json

from tciafs.cache import Cache
from tciafs.catalog import ROOT_INODE, Catalog, Kind
from tciafs.emulator import launch
from tciafs.mount import assemble
from tciafs.names import encode
from tciafs.sources import build
from tciafs.sources.base import Series
from tciafs.sources.idc import IdcSource, leaf_name
from tciafs.sources.idc import catalog as idc_catalog
from tciafs.tree import Tree

from mountutil import lazy_unmount, mounted

DEFAULT_TIER = "handler"
CATALOG = "/_emulator/idc/idc_index.parquet"


@pytest.fixture(scope="module")
def idc_emulator(demo_data_dir: Path) -> Iterator[launch.EmulatorProcess]:
    emu = launch.start("--profile", "demo", data_dir=demo_data_dir, s3=True)
    try:
        yield emu
    finally:
        emu.stop()


def s3_url(emu: launch.EmulatorProcess) -> str:
    assert emu.s3_url is not None
    return emu.s3_url


def source_of(emu: launch.EmulatorProcess) -> IdcSource:
    source = build("idc", endpoint=s3_url(emu), catalog=s3_url(emu) + CATALOG, timeout=10)
    assert isinstance(source, IdcSource)
    return source


def first_series(source: IdcSource) -> Series:
    return source.catalog.series_of(source.catalog.collection_names()[0], None)[0]


def bucket_bytes(emu: launch.EmulatorProcess, source: IdcSource, series_uid: str
                 ) -> dict[str, bytes]:
    """Each object of the series by its leaf name, by plain GETs."""
    place = source.catalog.place(series_uid)
    assert place is not None
    with httpx.Client(base_url=s3_url(emu), timeout=10) as http:
        listed = http.get(f"/{place.bucket}", params={"list-type": "2",
                                                      "prefix": place.prefix})
        keys = [k.split("</Key>")[0] for k in listed.text.split("<Key>")[1:]]
        return {leaf_name(k, place.prefix): http.get(f"/{place.bucket}/{k}").content
                for k in keys}


def test_the_catalog_from_a_directory_or_a_path(idc_emulator: launch.EmulatorProcess,
                                                tmp_path: Path) -> None:
    for name in (idc_catalog.INDEX, idc_catalog.COLLECTIONS):
        got = httpx.get(f"{s3_url(idc_emulator)}/_emulator/idc/{name}", timeout=10)
        (tmp_path / name).write_bytes(got.raise_for_status().content)
    from_dir = idc_catalog.load(str(tmp_path))
    from_url = idc_catalog.load(s3_url(idc_emulator) + CATALOG)
    names = from_dir.collection_names()
    assert names == from_url.collection_names() and from_dir.facts == from_url.facts
    assert [from_dir.series_of(n, None) for n in names] \
        == [from_url.series_of(n, None) for n in names]
    assert sum(len(from_dir.series_of(n, None)) for n in names) == len(from_dir) > 0
    assert from_dir.version is not None
    # Without collections_index, a collection is known by its collection_id alone.
    (tmp_path / idc_catalog.COLLECTIONS).unlink()
    bare = idc_catalog.load(str(tmp_path / idc_catalog.INDEX))
    assert len(bare) == len(from_dir) and not bare.facts
    assert set(bare.collection_names()) != set(names)
    with pytest.raises(ValueError, match="cannot read the IDC catalog"):
        build("idc", catalog=str(tmp_path / "nowhere.parquet"))


def s3_requests(emu: launch.EmulatorProcess) -> dict[str, int]:
    stats = httpx.get(s3_url(emu) + "/_emulator/stats", timeout=10).json()
    return dict(stats["servers"]["s3"]["requests"])


def reset(emu: launch.EmulatorProcess) -> None:
    httpx.post(s3_url(emu) + "/_emulator/reset", timeout=10).raise_for_status()


async def test_the_tree_from_the_catalog_and_one_listing_per_series(
        idc_emulator: launch.EmulatorProcess, tmp_path: Path) -> None:
    source = source_of(idc_emulator)
    catalog = Catalog(tmp_path / "catalog.sqlite", "idc-test")
    cache = Cache(tmp_path / "c", 1 << 30, source, prefetch=False)
    ops = assemble(source, Tree(source, catalog), cache).ops
    series = first_series(source)
    truth = bucket_bytes(idc_emulator, source, series.series_uid)
    reset(idc_emulator)
    async with source:
        node = ops.tree.node(ROOT_INODE)
        assert node is not None
        for name in (series.collection, series.patient_id, series.study_uid,
                     series.series_uid):
            attr = await ops.lookup(node.ino, encode(name).encode())
            node = ops.tree.node(attr.st_ino)
            assert node is not None
        assert s3_requests(idc_emulator) == {}  # above the series: the catalog alone
        files = [c for c in await ops.tree.children(node.ino) if c.kind is Kind.INSTANCE]
        assert s3_requests(idc_emulator) == {"ListObjectsV2": 1}
        sizes = {f.ident: (await ops.getattr(f.ino)).st_size for f in files}
        assert sizes == {name: len(data) for name, data in truth.items()}
        attrs = {os.fsdecode(n): v for n, v in [
            (n, await ops.getxattr(files[0].ino, n)) for n in await ops.listxattr(files[0].ino)]}
        assert attrs["user.tcia.source"] == b"idc"
        assert "user.dicom.SOPInstanceUID" not in attrs  # the name is the object's UUID
        assert s3_requests(idc_emulator) == {"ListObjectsV2": 1}  # sizes before any read

        async def read_all() -> None:
            for name, data in truth.items():
                entry = await cache.acquire(series.collection, series.series_uid, name)
                cache.release(entry)
                assert Path(entry.path).read_bytes() == data

        await _with_cache(cache, read_all)
    cache.close()
    assert s3_requests(idc_emulator)["GetObject"] == len(truth)


async def test_a_series_read_by_uid_alone(idc_emulator: launch.EmulatorProcess) -> None:
    """A manifest's series, or one the tree stored earlier, is found without a listing."""
    known = first_series(source_of(idc_emulator))
    source = source_of(idc_emulator)
    async with source:
        files = await source.instances(known.collection, known.series_uid)
        async with source.open_instance(known.collection, known.series_uid,
                                        files[0].uid) as stream:
            data = b"".join([c async for c in stream.chunks()])
    assert len(data) == files[0].size


async def test_listings_ranges_and_what_idc_does_not_have(
        idc_emulator: launch.EmulatorProcess) -> None:
    source = source_of(idc_emulator)
    async with source:
        collections = await source.collections()
        assert [c.name for c in collections] == source.catalog.collection_names()
        name = collections[0].name
        patients = await source.patients(name)
        studies = await source.studies(name, patients[0].patient_id)
        assert studies and all(s.patient_id == patients[0].patient_id for s in studies)
        listed = await source.series(name)
        assert listed and all(s.collection == name for s in listed)
        assert listed[0].license_name and listed[0].data_description_uri
        assert await source.series_by_uid(listed[0].series_uid) == [listed[0]]
        assert await source.series_by_uid("1.2.3.nowhere") == []
        assert source.collection_facts(name).license_name
        first = (await source.instances(name, listed[0].series_uid))[0]
        async with source.open_instance(name, listed[0].series_uid, first.uid,
                                        byte_range=(0, 132)) as stream:
            head = b"".join([c async for c in stream.chunks()])
        assert len(head) == 132 and head[128:] == b"DICM"
        with pytest.raises(Exception, match="shared cart"):
            await source.cart("mine")
        with pytest.raises(ValueError, match="series streams"):
            source.open_series(name, listed[0].series_uid)


@pytest.mark.mount
@pytest.mark.timeout(180)
def test_a_mount_of_idc_copies_the_bucket(idc_emulator: launch.EmulatorProcess,
                                          tmp_path: Path) -> None:
    source = source_of(idc_emulator)
    series = first_series(source)
    truth = bucket_bytes(idc_emulator, source, series.series_uid)
    mnt = tmp_path / "mnt"
    url = s3_url(idc_emulator)
    with mounted(idc_emulator, mnt, tmp_path / "cache", "--source", "idc",
                 "--s3-endpoint", url, "--idc-catalog", url + CATALOG):
        reset(idc_emulator)
        where = mnt / encode(series.collection) / encode(series.patient_id) / series.study_uid
        assert series.series_uid in [p.name for p in where.iterdir()]
        assert s3_requests(idc_emulator) == {}
        ls = subprocess.run(["ls", "-l", str(where / series.series_uid)], check=True,
                            capture_output=True, text=True).stdout
        sizes = {line.split()[-1]: int(line.split()[4])
                 for line in ls.splitlines()[1:]}
        assert sizes == {f"{name}.dcm": len(data) for name, data in truth.items()}
        assert s3_requests(idc_emulator) == {"ListObjectsV2": 1}
        subprocess.run(["cp", "-r", str(where / series.series_uid), str(tmp_path / "out")],
                       check=True, timeout=120)
        copied = {p.stem: p.read_bytes() for p in (tmp_path / "out").glob("*.dcm")}
        assert copied == truth
        name = sorted(truth)[0]
        ds = pydicom.dcmread(where / series.series_uid / f"{name}.dcm")
        assert ds.SeriesInstanceUID == series.series_uid
        status = status_json(mnt)
        assert status["source"] == "idc" and status["server"] == url
        assert status["requests"]["requests"]["ListObjectsV2"] == 1


@pytest.mark.unit
def test_the_leaf_name_is_the_object_uuid() -> None:
    prefix = "5c6b3f0e-0000-5000-8000-000000000001/"
    assert leaf_name(prefix + "0a1b2c3d-0000-5000-8000-000000000002.dcm", prefix) \
        == "0a1b2c3d-0000-5000-8000-000000000002"
    assert leaf_name(prefix + "extra", prefix) == "extra"  # no suffix: the key's rest


@pytest.mark.mount
@pytest.mark.timeout(180)
def test_the_demo_mounts_the_emulators_buckets(demo_data_dir: Path, tmp_path: Path) -> None:
    """`--demo --source idc`: the demo emulator starts with its S3 side, and the mount
    shows the catalog's collections, the IDC-only one included."""
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"),
           "XDG_CONFIG_HOME": str(tmp_path / "config"),
           "XDG_DATA_HOME": str(tmp_path / "data"),
           "XDG_CACHE_HOME": str(tmp_path / "cache-home")}
    archive = tmp_path / "data" / "tciafs" / "emulator" / "demo"  # where --demo looks
    archive.parent.mkdir(parents=True)
    archive.symlink_to(demo_data_dir)  # generated once for the whole session
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        started = run_tciafs("mount", "--demo", "--source", "idc", str(mnt), env=env)
        assert started.returncode == 0, started.stderr
        status = status_json(mnt)
        assert status["source"] == "idc" and status["server"].startswith("http://127.0.0.1:")
        listed = sorted(p.name for p in mnt.iterdir() if not p.name.startswith("."))
        assert any("IDC Only" in name for name in listed), listed
    finally:
        run_tciafs("umount", str(mnt), env=env)
        lazy_unmount(mnt)
