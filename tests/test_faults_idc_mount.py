"""The fault tests of a real mount, for the IDC side: `tciafs mount --source idc` against
the emulator's S3 server with faults injected (docs/emulator.md, docs/idc.md "Errors").

Whatever a reader gets must be the bucket's bytes, compared with what the emulator
serves without faults; a failure must be an error to the reader and a line in the
daemon's log, never wrong bytes and never a hang.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cliutil import status_json
from faultutil import _assert_clean_log, _log_of
from test_idc_source import CATALOG, bucket_bytes, s3_url, source_of

from tciafs.emulator import launch
from tciafs.names import encode

from mountutil import mounted, needs_fuse, reset_stats, set_faults, stats

pytestmark = [needs_fuse, pytest.mark.mount]


@dataclass(frozen=True)
class Bucket:
    """The emulator, one series of it, and that series' bytes as served without faults."""

    emulator: launch.RunningEmulator
    url: str
    series_path: Path  # below the mount point
    truth: dict[str, bytes]  # by file name


@pytest.fixture(scope="module")
def bucket(demo_data_dir: Path) -> Iterator[Bucket]:
    emu = launch.start("--profile", "demo", data_dir=demo_data_dir, s3=True)
    try:
        source = source_of(emu)
        names = source.catalog.collection_names()
        # A series of several files: each read below is a separate GET.
        series = next(s for n in names for s in source.catalog.series_of(n, None)
                      if (s.image_count or 0) >= 4)
        truth = bucket_bytes(emu, source, series.series_uid)
        where = Path(encode(series.collection), encode(series.patient_id), series.study_uid,
                     series.series_uid)
        yield Bucket(emu, s3_url(emu),
                     where, {f"{name}.dcm": data for name, data in truth.items()})
    finally:
        emu.stop()


@contextlib.contextmanager
def idc_mount(bucket: Bucket, tmp_path: Path, *extra: str) -> Iterator[Path]:
    """A mount of the emulator's buckets with its own cache; afterwards, the faults are
    cleared and the daemon's log is checked for escaped exceptions."""
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    set_faults(bucket.url)
    try:
        with mounted(bucket.emulator, mnt, cache, "--source", "idc",
                     "--s3-endpoint", bucket.url, "--idc-catalog", bucket.url + CATALOG,
                     *extra):
            yield mnt
    finally:
        set_faults(bucket.url)
    _assert_clean_log(_log_of(mnt, cache))


def injected(bucket: Bucket, kind: str) -> int:
    return int(stats(bucket.url)["servers"]["s3"]["faults"][kind])


def read_series(bucket: Bucket, mnt: Path) -> dict[str, bytes]:
    """Each file of the series, read one after the other (one GET each, in order, so a
    seeded fault plan falls on the same requests every run)."""
    where = mnt / bucket.series_path
    return {name: (where / name).read_bytes() for name in sorted(bucket.truth)}


def listed(bucket: Bucket, mnt: Path) -> None:
    """The series directory listed, with the exact sizes, before any fault is set."""
    where = mnt / bucket.series_path
    assert {p.name: p.stat().st_size for p in where.glob("*.dcm")} \
        == {name: len(data) for name, data in bucket.truth.items()}


@pytest.mark.timeout(240)
def test_slow_down_is_retried_with_back_off_then_served(bucket: Bucket, tmp_path: Path
                                                        ) -> None:
    with idc_mount(bucket, tmp_path, "--no-prefetch") as mnt:
        reset_stats(bucket.url)
        set_faults(bucket.url, p503=0.4, seed=24, endpoints=["GetObject", "ListObjectsV2"])
        listed(bucket, mnt)  # the listing, too, is retried
        assert read_series(bucket, mnt) == bucket.truth
        slowed = injected(bucket, "503")
        assert slowed >= 2
        requests = status_json(mnt)["requests"]
        assert requests["retries"] == slowed and not requests["errors"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("fault", "kind"), [("preset", "reset"), ("ptruncate", "truncate")])
def test_a_body_cut_short_is_continued_by_range(bucket: Bucket, tmp_path: Path, fault: str,
                                                kind: str) -> None:
    """A connection reset mid-body (preset), or a 200 whose body stops before its
    Content-Length as the connection closes (ptruncate): the rest is asked for by range."""
    with idc_mount(bucket, tmp_path, "--no-prefetch") as mnt:
        listed(bucket, mnt)
        reset_stats(bucket.url)
        set_faults(bucket.url, **{fault: 0.5}, seed=24, endpoints=["GetObject"])
        assert read_series(bucket, mnt) == bucket.truth
        assert injected(bucket, kind) >= 2
        assert status_json(mnt)["requests"]["resumes"] >= 1


@pytest.mark.timeout(240)
def test_a_short_206_is_continued(bucket: Bucket, tmp_path: Path) -> None:
    """pshort: a 206 whose Content-Range ends before the range asked for. A whole-file
    read is a 200, so the cuts make the ranged requests that pshort then shortens."""
    with idc_mount(bucket, tmp_path, "--no-prefetch") as mnt:
        listed(bucket, mnt)
        reset_stats(bucket.url)
        set_faults(bucket.url, ptruncate=0.35, pshort=0.35, seed=24, endpoints=["GetObject"])
        assert read_series(bucket, mnt) == bucket.truth
        assert injected(bucket, "short") >= 1 and injected(bucket, "truncate") >= 1


@pytest.mark.timeout(240)
def test_a_missing_object_is_an_error_to_the_reader(bucket: Bucket, tmp_path: Path) -> None:
    """NoSuchKey for an object the listing named (deleted since, or a catalog out of
    step): EIO, a log line naming it, no bytes; once the bucket serves it, it reads."""
    with idc_mount(bucket, tmp_path, "--no-prefetch") as mnt:
        listed(bucket, mnt)
        name = sorted(bucket.truth)[0]
        reset_stats(bucket.url)
        set_faults(bucket.url, p404=1.0, endpoints=["GetObject"])
        with pytest.raises(OSError) as failed:
            (mnt / bucket.series_path / name).read_bytes()
        assert failed.value.errno in (errno.EIO, errno.ENOENT)
        assert injected(bucket, "404") >= 1
        log = _log_of(mnt, tmp_path / "cache")
        assert "NoSuchKey" in log and name.removesuffix(".dcm") in log
        set_faults(bucket.url)
        assert (mnt / bucket.series_path / name).read_bytes() == bucket.truth[name]
        assert not list((tmp_path / "cache").rglob("*.part"))


@pytest.mark.timeout(300)
def test_a_copy_through_every_fault_at_once_is_exact(bucket: Bucket, tmp_path: Path) -> None:
    """cp -r with the series prefetched in the background, through SlowDown, resets,
    cut 200s and short 206s together."""
    with idc_mount(bucket, tmp_path) as mnt:
        listed(bucket, mnt)
        reset_stats(bucket.url)
        set_faults(bucket.url, p503=0.2, preset=0.15, ptruncate=0.15, pshort=0.15, seed=7,
                   endpoints=["GetObject"])
        shutil.copytree(mnt / bucket.series_path, tmp_path / "out")
        copied = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.dcm")}
        assert copied == bucket.truth
        assert injected(bucket, "503") + injected(bucket, "reset") \
            + injected(bucket, "truncate") >= 2


@pytest.mark.timeout(240)
@pytest.mark.parametrize("fault", [{"p503": 1.0}, {"preset": 1.0}], ids=["503", "reset"])
def test_a_bucket_that_always_fails_is_an_error_not_a_short_file(
        bucket: Bucket, tmp_path: Path, fault: dict[str, float]) -> None:
    """Every answer SlowDown, or every body cut: after the retries and resumes, EIO and a
    log line; nothing of the file is kept, and it reads once the bucket recovers."""
    with idc_mount(bucket, tmp_path, "--no-prefetch") as mnt:
        listed(bucket, mnt)
        name = sorted(bucket.truth)[-1]
        set_faults(bucket.url, **fault, endpoints=["GetObject"])
        with pytest.raises(OSError) as failed:
            (mnt / bucket.series_path / name).read_bytes()
        assert failed.value.errno == errno.EIO
        assert name.removesuffix(".dcm") in _log_of(mnt, tmp_path / "cache")
        set_faults(bucket.url)
        assert (mnt / bucket.series_path / name).read_bytes() == bucket.truth[name]
