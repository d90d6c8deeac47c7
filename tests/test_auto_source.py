"""`--source auto` against the emulator's two archives: NBIA's tree, each series IDC also
holds read from its bucket (counted at the emulator), the rest from NBIA, the same bytes
either way; the object map kept across a remount; NBIA's bytes when the bucket fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from cliutil import status_json, status_text
from dicomutil import dicom_bytes
from faultutil import _assert_clean_log, _log_of, _series_dirs, _sop, _truth, _wait_quiet

from tciafs.emulator import launch
from tciafs.sources.auto import MappedObject, ObjectMap, sop_of
from tciafs.sources.auto.mapping import HeaderTooLong, NotDicom
from tciafs.sources.auto.source import MAP_FILE

from mountutil import mounted, stats

DEFAULT_TIER = "mount"
CATALOG = "/_emulator/idc/idc_index.parquet"
S3_SIDE = ["s3/GetObject", "s3/ListObjectsV2", "s3/HeadObject"]


@pytest.fixture(scope="module")
def both_archives(demo_data_dir: Path) -> Iterator[launch.RunningEmulator]:
    emu = launch.start("--profile", "demo", data_dir=demo_data_dir, nlst=True, s3=True)
    try:
        yield emu
    finally:
        emu.stop()


def s3_url(emu: launch.RunningEmulator) -> str:
    assert emu.s3_url is not None
    return emu.s3_url


def mount_auto(emu: launch.RunningEmulator, mnt: Path, cache: Path, *extra: str
               ) -> contextlib.AbstractContextManager:
    url = s3_url(emu)
    return mounted(emu, mnt, cache, "--source", "auto", "--s3-endpoint", url,
                   "--idc-catalog", url + CATALOG, *extra)


def reset(emu: launch.RunningEmulator) -> None:
    httpx.post(f"{emu.url}/_emulator/reset", timeout=10).raise_for_status()


def faults(emu: launch.RunningEmulator, config: dict) -> None:
    httpx.post(f"{emu.url}/_emulator/faults", json=config, timeout=10).raise_for_status()


def requests(emu: launch.RunningEmulator, server: str) -> dict[str, int]:
    return dict(stats(emu.url)["servers"].get(server, {}).get("requests", {}))


def nbia_images(emu: launch.RunningEmulator) -> int:
    got = requests(emu, "main")
    return got.get("getImage", 0) + got.get("getSingleImage", 0)


def series_by_source(mnt: Path) -> dict[str, list[Path]]:
    """The main server's series directories (NLST has its own server), by where
    user.tcia.source says their bytes come from, largest series first."""
    found: dict[str, list[Path]] = {}
    for where in _series_dirs(mnt):
        if "NLST" in where.parts[len(mnt.parts)]:
            continue
        source = os.getxattr(where, "user.tcia.source").decode()
        found.setdefault(source, []).append(where)
    for dirs in found.values():
        dirs.sort(key=lambda d: -len(list(d.iterdir())))
    return found


def copy_and_compare(emu: launch.RunningEmulator, series: Path, out: Path) -> None:
    """cp -r the series; each file must be NBIA's bytes of its instance."""
    truth, _ = _truth(emu.url, series.name)
    subprocess.run(["cp", "-r", str(series), str(out)], check=True, timeout=120)
    copied = {_sop(p): p.read_bytes() for p in out.glob("*.dcm")}
    assert copied.keys() == truth.keys() and copied == truth


def check_with_dicom_tools(path: Path) -> None:
    ds = pydicom.dcmread(path)
    assert ds.SOPInstanceUID == _sop(path) and ds.pixel_array.size > 0
    dump = subprocess.run(["dcmdump", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and ds.SOPInstanceUID in dump.stdout


@pytest.mark.timeout(240)
def test_series_idc_holds_come_from_the_bucket_the_rest_from_nbia(
        both_archives: launch.RunningEmulator, tmp_path: Path) -> None:
    emu, mnt, cache = both_archives, tmp_path / "mnt", tmp_path / "cache"
    faults(emu, {})
    with mount_auto(emu, mnt, cache):
        by_source = series_by_source(mnt)
        assert by_source.keys() == {"idc", "nbia"}
        both, only_nbia = by_source["idc"][0], by_source["nbia"][0]
        assert os.getxattr(both / next(iter(os.listdir(both))), "user.tcia.source") == b"idc"
        assert os.getxattr(mnt, "user.tcia.level") == b"root"

        copy_and_compare(emu, both, tmp_path / "both")  # truth first: it asks NBIA
        _wait_quiet(emu.url)
        reset(emu)
        subprocess.run(["cp", "-r", str(both), str(tmp_path / "again")], check=True)
        assert requests(emu, "s3") == {}, "cached files are not fetched again"

        check_with_dicom_tools(next(both.glob("*.dcm")))
        truth, _ = _truth(emu.url, only_nbia.name)
        reset(emu)
        subprocess.run(["cp", "-r", str(only_nbia), str(tmp_path / "only")], check=True)
        _wait_quiet(emu.url)
        assert {_sop(p): p.read_bytes() for p in (tmp_path / "only").glob("*.dcm")} == truth
        assert requests(emu, "s3") == {} and nbia_images(emu) >= 1
        status = status_json(mnt)
        assert status["source"] == "auto" and status["server"] == emu.url
        assert status["requests"]["requests"]["s3/GetObject"] > 0
        assert status["requests"]["idc"]["requests"]["GetObject"] > 0
        assert "s3/GetObject" in status_text(mnt)
        # Bytes from both archives, and the IDC catalog that chose the bucket's series.
        assert status["traffic"]["idc"] > 0 and status["traffic"]["nbia"] > 0
        assert status["catalog_version"]
    _assert_clean_log(_log_of(mnt, cache))


@pytest.mark.timeout(240)
def test_a_study_in_both_is_read_from_idc_alone(
        both_archives: launch.RunningEmulator, tmp_path: Path) -> None:
    """A cold copy of a series of a study whose series IDC all holds (a cold open fetches
    the study's other series too): no image from NBIA (its listings only); per series one
    listing and one GET per object."""
    emu, mnt, cache = both_archives, tmp_path / "mnt", tmp_path / "cache"
    faults(emu, {})
    with mount_auto(emu, mnt, cache):
        by_source = series_by_source(mnt)
        both = next(d for d in by_source["idc"]
                    if not any(s.parent == d.parent for s in by_source.get("nbia", [])))
        study = sorted(p for p in both.parent.iterdir() if p.is_dir())
        objects = sum(len(list(d.glob("*.dcm"))) for d in study)
        truth, _ = _truth(emu.url, both.name)
        reset(emu)
        subprocess.run(["cp", "-r", str(both), str(tmp_path / "out")], check=True)
        _wait_quiet(emu.url)
        assert {_sop(p): p.read_bytes() for p in (tmp_path / "out").glob("*.dcm")} == truth
        assert nbia_images(emu) == 0
        s3 = requests(emu, "s3")
        assert s3["ListObjectsV2"] == len(study)
        # A stream waits for the series: the pass that maps it reads each object whole,
        # once, and the stream (and the file the reader opened first) take those bytes.
        assert s3["GetObject"] == objects


@pytest.mark.timeout(240)
def test_the_map_is_kept_and_what_it_lacks_comes_from_nbia(
        both_archives: launch.RunningEmulator, tmp_path: Path) -> None:
    emu, mnt, cache = both_archives, tmp_path / "mnt", tmp_path / "cache"
    faults(emu, {})
    with mount_auto(emu, mnt, cache, "--no-prefetch"):
        both = series_by_source(mnt)["idc"][0]
        files = sorted(both.glob("*.dcm"))
        assert len(files) >= 4
        truth, _ = _truth(emu.url, both.name)
        reset(emu)
        assert files[0].read_bytes() == truth[_sop(files[0])]
        _wait_quiet(emu.url)  # the header pass goes on after the reader's object is found
        # One listing, a header per object, then the object itself.
        assert requests(emu, "s3") == {"ListObjectsV2": 1, "GetObject": len(files) + 1}
        assert nbia_images(emu) == 0
    map_file = cache / MAP_FILE
    assert stat.S_IMODE(map_file.stat().st_mode) == 0o600
    # Closed at the end (not only committed), so that the WAL is folded back in.
    with contextlib.closing(sqlite3.connect(map_file)) as db, db:
        # IDC lacks one instance (NBIA revised the series since), and the object of
        # another is gone from the bucket.
        lacking, gone = _sop(files[2]), _sop(files[3])
        assert db.execute("DELETE FROM objects WHERE sop = ?", (lacking,)).rowcount == 1
        db.execute("UPDATE objects SET key = substr(key, 1, instr(key, '/')) || 'gone.dcm' "
                   "WHERE sop = ?", (gone,))
    with mount_auto(emu, mnt, cache, "--no-prefetch"):
        reset(emu)
        assert files[1].read_bytes() == truth[_sop(files[1])]
        assert requests(emu, "s3") == {"GetObject": 1}, "no second header pass"
        assert nbia_images(emu) == 0
        assert files[2].read_bytes() == truth[lacking]
        assert requests(emu, "s3") == {"GetObject": 1} and nbia_images(emu) == 1
        assert files[3].read_bytes() == truth[gone]
        assert requests(emu, "s3") == {"GetObject": 2} and nbia_images(emu) == 2
        check_with_dicom_tools(files[3])
    _assert_clean_log(_log_of(mnt, cache))
    # The same map, an empty cache, the series streamed: the two instances come from
    # NBIA inside the stream, the rest from the bucket.
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    (streamed / MAP_FILE).write_bytes(map_file.read_bytes())
    with mount_auto(emu, mnt, streamed):
        reset(emu)
        subprocess.run(["cp", "-r", str(both), str(tmp_path / "out")], check=True)
        _wait_quiet(emu.url)
        assert {_sop(p): p.read_bytes() for p in (tmp_path / "out").glob("*.dcm")} == truth
        assert requests(emu, "main").get("getSingleImage", 0) >= 2
        assert requests(emu, "s3")["GetObject"] >= len(files) - 1
    _assert_clean_log(_log_of(mnt, streamed))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("fault", "extra"), [
    ({"p503": 1.0}, ()),  # SlowDown at every request, past the retries
    ({"preset": 0.6, "seed": 3}, ()),  # connections reset mid-body
    # A 206 that ends before the range asked for: ranges are read where no stream waits
    # for the series (headers are read alone).
    ({"pshort": 0.6, "seed": 4}, ("--no-prefetch",)),
    ({"pcorrupt": 0.5, "seed": 5}, ()),  # bytes that are not the object's: its ETag tells
    ({"pcorrupt": 0.5, "seed": 6}, ("--no-prefetch",)),
], ids=["slowdown", "reset", "short", "corrupt", "corrupt-alone"])
def test_the_bucket_failing_falls_back_to_nbia(both_archives: launch.RunningEmulator,
                                               tmp_path: Path, fault: dict,
                                               extra: tuple[str, ...]) -> None:
    emu, mnt, cache = both_archives, tmp_path / "mnt", tmp_path / "cache"
    faults(emu, {})
    with mount_auto(emu, mnt, cache, *extra):
        both = series_by_source(mnt)["idc"][:2]
        truths = {d: _truth(emu.url, d.name)[0] for d in both}
        reset(emu)
        faults(emu, {**fault, "endpoints": S3_SIDE})
        try:
            for where, truth in truths.items():
                out = tmp_path / where.name
                subprocess.run(["cp", "-r", str(where), str(out)], check=True, timeout=240)
                assert {_sop(p): p.read_bytes() for p in out.glob("*.dcm")} == truth
                check_with_dicom_tools(next(out.glob("*.dcm")))
            _wait_quiet(emu.url)
        finally:
            faults(emu, {})
        struck = stats(emu.url)["servers"]["s3"]["faults"]
        assert sum(struck.values()) > 0
        if "p503" in fault:
            assert nbia_images(emu) >= 1
    _assert_clean_log(_log_of(mnt, cache))


# -- the map's parts, without a mount ---------------------------------------------------------


@pytest.mark.unit
def test_a_header_longer_than_the_first_read_asks_for_more() -> None:
    long_header = dicom_bytes("1.2.3.4.5")
    ds = pydicom.dcmread(io.BytesIO(long_header))
    ds.ImageType = ["ORIGINAL"] * 4000  # before the SOP Instance UID: 36 KB of header
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    with pytest.raises(HeaderTooLong):
        sop_of(data[:8192], complete=False)
    assert sop_of(data[:64 << 10], complete=False) == "1.2.3.4.5"
    assert sop_of(data, complete=True) == "1.2.3.4.5"
    # Cut inside the dataset and called whole: the meta header names it.
    assert sop_of(data[:8192], complete=True) == "1.2.3.4.5"
    with pytest.raises(NotDicom):
        sop_of(b"<html>SlowDown</html>", complete=True)


@pytest.mark.unit
def test_the_map_holds_each_prefix_apart(tmp_path: Path) -> None:
    path = tmp_path / "map.sqlite"
    objects = ObjectMap(path)
    rows = [MappedObject("b", f"{prefix}/{n}.dcm", f"1.{prefix}.{n}", 10 + n, None)
            for prefix in ("a", "a0", "a-") for n in range(3)]
    objects.add(rows)
    objects.mark_mapped("b", "a/", 3)
    objects.close()
    again = ObjectMap(path)
    assert again.is_mapped("b", "a/") and not again.is_mapped("b", "a0/")
    assert again.objects("b", "a/") == rows[:3]
    assert again.objects("b", "a0/") == rows[3:6] and again.objects("c", "a/") == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again.close()
