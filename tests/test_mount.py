"""Real FUSE mounts against the emulator on loopback, exercised with real tools."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import subprocess
import time
import zipfile
from pathlib import Path

import httpx
import pydicom
import pytest
from cliutil import run_tciafs, status_text

from tciafs import paths

from mountutil import IMAGE_ENDPOINTS, count_requests, mounted, needs_fuse, reset_stats, set_faults

pytestmark = [needs_fuse, pytest.mark.mount]

V4 = "/nbia-api/services/v4"


def _get(url: str, endpoint: str, **params: str) -> httpx.Response:
    r = httpx.get(f"{url}{V4}/{endpoint}", params=params, timeout=60)
    r.raise_for_status()
    return r


def _series_zip(url: str, series_uid: str) -> tuple[dict[str, bytes], dict[str, str]]:
    """The service's own bytes of a series (by SOP UID) and its MD5 list (by SOP UID)."""
    body = _get(url, "getImage", SeriesInstanceUID=series_uid, IncludeMD5="Yes").content
    files, md5_by_name = {}, {}
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        for name in zf.namelist():
            data = zf.read(name)
            if name == "md5hashes.csv":
                rows = data.decode().strip().splitlines()[1:]
                md5_by_name = dict(r.split(",") for r in rows)
            elif name.endswith(".dcm"):
                files[name] = data
    by_sop = {}
    md5s = {}
    for name, data in files.items():
        sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
        by_sop[sop] = data
        md5s[sop] = md5_by_name[name]
    return by_sop, md5s


def _series_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("*/*/*/*") if p.is_dir())


def _first_ct_series(root: Path) -> Path:
    for d in _series_dirs(root):
        files = list(d.glob("*.dcm"))
        if len(files) >= 8:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            if ds.Modality == "CT":
                return d
    raise AssertionError("no CT series in the demo archive")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_listing_downloads_no_image(emulator, tmp_path: Path, cache_dir: Path) -> None:
    reset_stats(emulator.url)
    with mounted(emulator, tmp_path / "mnt", cache_dir):
        listing = subprocess.run(["ls", "-laR", str(tmp_path / "mnt")], capture_output=True,
                                 text=True, check=True).stdout
        found = subprocess.run(["find", str(tmp_path / "mnt"), "-name", "*.dcm"],
                               capture_output=True, text=True, check=True).stdout.split()
        subprocess.run(["du", "-s", str(tmp_path / "mnt")], check=True, capture_output=True)
        assert len(found) > 50
        assert "LUNG%2F003" in listing  # '/' in a patient ID, escaped
        assert "%2Ehidden" in listing or "%2E" in listing  # a leading dot stays visible
        assert "Pétra" in listing
        assert "NLST" in listing  # the NLST server's collection in the same tree
        assert count_requests(emulator.url, *IMAGE_ENDPOINTS) == 0
    # After a remount (whose start-up probe asks for the collections once) the whole
    # walk is answered from the persisted catalog: no request at all.
    with mounted(emulator, tmp_path / "mnt", cache_dir):
        reset_stats(emulator.url)
        again = subprocess.run(["find", str(tmp_path / "mnt"), "-name", "*.dcm"],
                               capture_output=True, text=True, check=True).stdout.split()
        assert sorted(again) == sorted(found)
        listing_calls = count_requests(emulator.url, "getCollectionValues", "getPatient",
                                       "getSeries", "getSOPInstanceUIDs", "getPatientStudy")
        assert listing_calls == 0


def test_reading_a_series_lists_the_next_ones_ahead(emulator, tmp_path: Path,
                                                   cache_dir: Path) -> None:
    with mounted(emulator, tmp_path / "mnt", cache_dir):
        collection = tmp_path / "mnt" / "Demo-Lung CT_2024"
        series = [s.path for p in _dirs(collection) for st in _dirs(p) for s in _dirs(st)]
        assert len(series) >= 4
        reset_stats(emulator.url)
        os.listdir(series[0])  # one series read alone: nothing is guessed from it
        time.sleep(0.5)
        assert count_requests(emulator.url, "getSOPInstanceUIDs") == 1
        os.listdir(series[1])  # a second in a row: a traversal, like `find`
        deadline = time.monotonic() + 20
        while count_requests(emulator.url, "getSOPInstanceUIDs") < len(series):
            assert time.monotonic() < deadline, "the next series were not listed ahead"
            time.sleep(0.05)
        reset_stats(emulator.url)
        for path in series[2:]:
            assert os.listdir(path)
        assert count_requests(emulator.url, "getSOPInstanceUIDs") == 0  # listed already
        shown = status_text(tmp_path / "mnt")
        assert f"listed ahead of a traversal: {len(series) - 2}" in shown


def _dirs(path: str | Path) -> list[os.DirEntry]:
    """Subdirectories in readdir order, the order `find` walks."""
    with os.scandir(path) as entries:
        return [e for e in entries if e.is_dir()]


def test_reads_are_exact_cold_and_warm(emulator, tmp_path: Path, cache_dir: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, cache_dir):
        series = _first_ct_series(mnt)
        truth, md5s = _series_zip(emulator.url, series.name)
        first = next(iter(sorted(series.glob("*.dcm"))))
        with open(first, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            assert f.seek(0, os.SEEK_END) == size
            f.seek(0)
            data = f.read()
        sop = first.name.removesuffix(".dcm")
        assert data == truth[sop] and size == len(truth[sop])
        assert first.stat().st_size == size
        # cp -r and rsync -a of the whole series: byte-identical, MD5s as the service says.
        shutil.copytree(series, tmp_path / "cp")
        subprocess.run(["rsync", "-a", f"{series}/", str(tmp_path / "rsync")], check=True)
        for copy in (tmp_path / "cp", tmp_path / "rsync"):
            got = {p.name.removesuffix(".dcm"): p.read_bytes() for p in copy.glob("*.dcm")}
            assert got.keys() == truth.keys()
            for sop_uid, blob in got.items():
                assert blob == truth[sop_uid]
                assert hashlib.md5(blob).hexdigest() == md5s[sop_uid]
        ls = subprocess.run(["ls", "-l", str(series)], capture_output=True, text=True).stdout
        assert " 0 " not in ls  # every size is known after the copy
    with mounted(emulator, mnt, cache_dir):
        reset_stats(emulator.url)
        again = {p.name.removesuffix(".dcm"): p.read_bytes() for p in series.glob("*.dcm")}
        assert again == truth
        assert count_requests(emulator.url, *IMAGE_ENDPOINTS) == 0


def test_real_dicom_tools(emulator, tmp_path: Path, cache_dir: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, cache_dir):
        series = _first_ct_series(mnt)
        files = sorted(series.glob("*.dcm"))
        ds = pydicom.dcmread(files[0])
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == len(files)
        dump = subprocess.run(["dcmdump", str(files[0])], capture_output=True, text=True)
        assert dump.returncode == 0 and "SOPInstanceUID" in dump.stdout
        out_mount, out_local = tmp_path / "nii-mount", tmp_path / "nii-local"
        out_mount.mkdir()
        out_local.mkdir()
        shutil.copytree(series, tmp_path / "local")
        for src, out in ((series, out_mount), (tmp_path / "local", out_local)):
            subprocess.run(["dcm2niix", "-z", "n", "-f", "vol", "-o", str(out), str(src)],
                           check=True, capture_output=True)
        nii_mount, nii_local = sorted(out_mount.glob("*.nii")), sorted(out_local.glob("*.nii"))
        assert len(nii_mount) == 1 and len(nii_local) == 1
        assert nii_mount[0].read_bytes() == nii_local[0].read_bytes()


def test_read_only_and_bad_names(emulator, tmp_path: Path, cache_dir: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, cache_dir):
        collection = sorted(mnt.iterdir())[0]
        some_file = next(iter(_series_dirs(mnt)[0].glob("*.dcm")))
        for action in (lambda: (collection / "new").mkdir(),
                       lambda: (mnt / "x.txt").write_bytes(b"x"),
                       lambda: os.open(some_file, os.O_RDWR),
                       lambda: some_file.unlink(),
                       lambda: some_file.rename(mnt / "moved"),
                       lambda: os.chmod(some_file, 0o777)):
            with pytest.raises(OSError) as err:
                action()
            assert err.value.errno in (errno.EROFS, errno.EACCES, errno.EPERM)
        for bad in ("no-such", ".Trash-1000", "..%2F", "a" * 300):
            with pytest.raises(OSError) as err:
                os.stat(collection / bad)
            assert err.value.errno in (errno.ENOENT, errno.ENAMETOOLONG)
        with open(some_file, "rb") as f:
            f.seek(10 << 20)
            assert f.read(100) == b""  # past EOF: empty, not an error


def _mount_options(mountpoint: Path) -> list[str]:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if paths.unescape_mount_field(fields[1]) == str(mountpoint):
            return fields[3].split(",")
    raise AssertionError(f"{mountpoint} is not in /proc/self/mounts")


def test_the_kernel_knows_the_mount_is_read_only(emulator, tmp_path: Path,
                                                 cache_dir: Path) -> None:
    """Mounted `ro`: findmnt, backup tools and root's `test -w` see a read-only tree, and
    writes fail in the kernel; commands still reach the daemon, through its socket."""
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, cache_dir):
        assert "ro" in _mount_options(mnt)
        assert not os.access(mnt, os.W_OK)  # even for root
        series = _first_ct_series(mnt)
        some_file = next(series.glob("*.dcm"))
        for write in (lambda: os.open(some_file, os.O_WRONLY),
                      lambda: (series / "new.dcm").touch(),
                      lambda: os.setxattr(some_file, "user.note", b"x"),
                      lambda: os.utime(some_file)):
            with pytest.raises(OSError) as err:
                write()
            assert err.value.errno == errno.EROFS
        prefetch = run_tciafs("cache", "prefetch", str(series))
        assert prefetch.returncode == 0, prefetch.stderr
        assert {os.getxattr(f, "user.tcia.cached") for f in series.glob("*.dcm")} == {b"full"}


def test_failing_server_gives_eio_promptly(emulator, tmp_path: Path, cache_dir: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, cache_dir, "--no-prefetch", "--timeout", "5"):
        series = _series_dirs(mnt)[-1]
        files = sorted(series.glob("*.dcm"))
        try:
            set_faults(emulator.url, p503=1.0, endpoints=["getSingleImage"])
            with pytest.raises(OSError) as err:
                files[0].read_bytes()
            assert err.value.errno == errno.EIO
            set_faults(emulator.url, p503=0.5, endpoints=["getSingleImage"], seed=7)
            assert files[1].read_bytes()[128:132] == b"DICM"  # retried until it worked
        finally:
            set_faults(emulator.url)


def _listed_sizes(series: Path) -> dict[str, int]:
    """Sizes as `ls -l` shows them (a fresh stat of each entry)."""
    out = subprocess.run(["ls", "-ln", str(series)], capture_output=True, text=True,
                         check=True).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    return {row[-1].removesuffix(".dcm"): int(row[4]) for row in rows}


def test_one_open_makes_every_size_in_the_series_exact_for_good(emulator, tmp_path: Path,
                                                                 cache_dir: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, cache_dir):
        series = next(d for d in _series_dirs(mnt)  # chosen without opening a file
                      if os.getxattr(d, "user.dicom.Modality") == b"CT"
                      and len(list(d.glob("*.dcm"))) >= 8)
        truth, _ = _series_zip(emulator.url, series.name)
        assert set(_listed_sizes(series).values()) == {0}  # never fetched: not guessed
        files = sorted(series.glob("*.dcm"))
        assert {p.stat().st_size for p in files} == {0}  # the kernel has seen them so
        first = files[0]
        first.read_bytes()  # one file; the series follows in the background
        deadline = time.monotonic() + 60
        while os.getxattr(series, "user.tcia.cached") != b"full":
            assert time.monotonic() < deadline, "the series prefetch did not finish"
            time.sleep(0.1)
        # The kernel asks again: no size it saw before the prefetch is left.
        exact = {sop: len(data) for sop, data in truth.items()}
        assert {p.name.removesuffix(".dcm"): p.stat().st_size for p in files} == exact
        assert _listed_sizes(series) == exact
        du = subprocess.run(["du", "-cb", *map(str, series.glob("*.dcm"))],
                            capture_output=True, text=True, check=True).stdout
        assert du.splitlines()[-1] == f"{sum(map(len, truth.values()))}\ttotal"
    with mounted(emulator, mnt, cache_dir):
        reset_stats(emulator.url)
        assert _listed_sizes(series) == exact
        assert count_requests(emulator.url, *IMAGE_ENDPOINTS) == 0  # persisted, not fetched
