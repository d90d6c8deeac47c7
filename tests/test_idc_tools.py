"""Real tools on a mount of IDC (the emulator's buckets): find -size and du are exact
before any byte is read, rsync -a copies a study and finds nothing to do the second
time, a pydicom header scan, dcm2niix and gdcmscanner see what they see in a plain copy
of the bucket's objects. (cp -r is in test_idc_source.py.)

The tests share one mount, with series prefetch on as a user has it.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from faultutil import _assert_clean_log, _log_of
from test_idc_source import CATALOG, bucket_bytes, reset, s3_requests, s3_url, source_of

from tciafs.emulator import launch
from tciafs.names import encode

from mountutil import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]


@dataclass(frozen=True)
class Mounted:
    emulator: launch.RunningEmulator
    study: Path  # on the mount
    series: Path  # on the mount, in `study`
    plain: Path  # the same series' objects, fetched without tciafs
    truth: dict[str, bytes]  # the series' files by name


@pytest.fixture(scope="module")
def idc(demo_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mounted]:
    base = tmp_path_factory.mktemp("idc-tools")
    with launch.start("--profile", "demo", data_dir=demo_data_dir, s3=True) as emu:
        url = s3_url(emu)
        source = source_of(emu)
        series = next(s for n in source.catalog.collection_names()
                      for s in source.catalog.series_of(n, None) if (s.image_count or 0) >= 8)
        truth = {f"{n}.dcm": d for n, d in bucket_bytes(emu, source, series.series_uid).items()}
        plain = base / "plain" / series.series_uid
        plain.mkdir(parents=True)
        for name, data in truth.items():
            (plain / name).write_bytes(data)
        mnt, cache = base / "mnt", base / "cache"
        with mounted(emu, mnt, cache, "--source", "idc", "--s3-endpoint", url,
                     "--idc-catalog", url + CATALOG):
            study = mnt / encode(series.collection) / encode(series.patient_id) \
                / series.study_uid
            yield Mounted(emu, study, study / series.series_uid, plain, truth)
        _assert_clean_log(_log_of(mnt, cache))


def run(*cmd: str | Path, cwd: Path | None = None) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                          timeout=120, cwd=cwd).stdout


@pytest.mark.timeout(120)
def test_find_size_and_du_are_exact_before_any_read(idc: Mounted) -> None:
    reset(idc.emulator)
    sizes = {name: len(data) for name, data in idc.truth.items()}
    size = sorted(sizes.values())[len(sizes) // 2]
    found = run("find", idc.series, "-name", "*.dcm", "-size", f"{size}c").splitlines()
    assert sorted(Path(p).name for p in found) \
        == sorted(n for n, s in sizes.items() if s == size)
    bigger = run("find", idc.series, "-name", "*.dcm", "-size", f"+{size}c").splitlines()
    assert len(bigger) == sum(1 for s in sizes.values() if s > size)
    apparent = run("du", "-b", "--apparent-size", "-s", "--exclude=.*", idc.series).split()[0]
    assert int(apparent) - sum(sizes.values()) in range(0, 4096 + 1)  # the directory's own
    assert "GetObject" not in s3_requests(idc.emulator)


@pytest.mark.timeout(180)
def test_rsync_copies_a_study_and_then_has_nothing_to_do(idc: Mounted, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run("rsync", "-a", f"{idc.study}/", out)
    copied = out / idc.series.name
    assert {p.name: p.read_bytes() for p in copied.glob("*.dcm")} == idc.truth
    again = run("rsync", "-a", "--itemize-changes", f"{idc.study}/", out)
    assert again.strip() == ""  # sizes and times stable: nothing changed


@pytest.mark.timeout(120)
def test_a_pydicom_header_scan(idc: Mounted) -> None:
    for path in sorted(idc.series.glob("*.dcm")):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        want = pydicom.dcmread(io.BytesIO(idc.truth[path.name]), stop_before_pixels=True)
        assert ds == want and ds.SeriesInstanceUID == idc.series.name


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("dcm2niix") is None, reason="needs dcm2niix")
def test_dcm2niix_converts_as_from_a_plain_copy(idc: Mounted, tmp_path: Path) -> None:
    outputs = {}
    for label, source in (("mount", idc.series), ("plain", idc.plain)):
        out = tmp_path / label
        out.mkdir()
        run("dcm2niix", "-b", "n", "-z", "n", "-f", "%s_%p", "-o", out, source)
        outputs[label] = {p.name: p.read_bytes() for p in out.glob("*.nii")}
    assert outputs["mount"] and outputs["mount"] == outputs["plain"]


@pytest.mark.timeout(180)
@pytest.mark.skipif(shutil.which("gdcmscanner") is None, reason="needs gdcmscanner")
def test_gdcmscanner_reads_the_same_uids(idc: Mounted) -> None:
    def scanned(where: Path) -> list[str]:
        text = run("gdcmscanner", "-d", where, "-t", "0008,0018", "-t", "0020,000e", "-p")
        return sorted(line.split(None, 1)[1].strip() for line in text.splitlines()
                      if line.startswith(("(0008,0018)", "(0020,000e)")))

    want = scanned(idc.plain)
    assert len(want) == 2 * len(idc.truth) and scanned(idc.series) == want
