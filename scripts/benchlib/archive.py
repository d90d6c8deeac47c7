"""The bench profile's series, found through the API, and their reference MD5s."""

from __future__ import annotations

import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tciafs.names import encode

from .procs import BenchError, Emulator
from .verify import expected_from_zip

COLLECTION = "Bench-CT_Throughput"
API = "nbia-api/services/v4"


@dataclass(frozen=True)
class Series:
    uid: str
    study: str
    patient: str
    collection: str
    images: int
    size: int  # bytes of the instances (the API's FileSize)

    def path(self, mountpoint: Path) -> Path:
        return study_path(mountpoint, self) / encode(self.uid)


def study_path(mountpoint: Path, series: Series) -> Path:
    return mountpoint / encode(series.collection) / encode(series.patient) / encode(series.study)


def image_url(url: str, uid: str, **extra: str) -> str:
    query = "".join(f"&{k}={v}" for k, v in extra.items())
    return f"{url}/{API}/getImage?SeriesInstanceUID={uid}{query}"


def single_image_url(url: str, series: str, sop: str) -> str:
    return f"{url}/{API}/getSingleImage?SeriesInstanceUID={series}&SOPInstanceUID={sop}"


@dataclass(frozen=True)
class BenchSet:
    ct200: Series  # the 200-slice 512x512 CT, ~105 MB
    study4: tuple[Series, ...]  # one study of 4 CT series of 50 slices
    mr100: Series  # ~100 MB in 800 files
    ct1g: Series  # the 2000-slice CT, ~1 GB


def discover(emu: Emulator) -> BenchSet:
    rows = emu.api("getSeries", Collection=COLLECTION)
    series = [Series(r["SeriesInstanceUID"], r["StudyInstanceUID"], r["PatientID"],
                     r["Collection"], int(r["ImageCount"]), int(r["FileSize"])) for r in rows]
    by_study: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        by_study[s.study].append(s)
    studies4 = [v for v in by_study.values() if len(v) == 4 and all(s.images == 50 for s in v)]
    ct200 = [s for s in series if s.images == 200]
    mr = [r["SeriesInstanceUID"] for r in rows if r["Modality"] == "MR"]
    ct1g = [s for s in series if s.images == 2000]
    if not (studies4 and ct200 and mr and ct1g):
        raise BenchError(f"the emulator's {COLLECTION} lacks a bench series: is it --profile "
                         "bench?")
    mr100 = next(s for s in series if s.uid == mr[0])
    return BenchSet(ct200[0], tuple(sorted(studies4[0], key=lambda s: s.uid)), mr100, ct1g[0])


@dataclass
class References:
    """{SOPInstanceUID: MD5} per series, from getImage ZIPs fetched without shaping, and
    the size of each ZIP: the series' bytes as the service sends them."""

    emu: Emulator
    workdir: Path
    _known: dict[str, dict[str, str]] = field(default_factory=dict)
    _zip_bytes: dict[str, int] = field(default_factory=dict)

    def expected(self, series: Series) -> dict[str, str]:
        if series.uid not in self._known:
            self._known[series.uid] = self._fetch(series)
        return self._known[series.uid]

    def zip_bytes(self, series: Series) -> int:
        """Body bytes of the series' getImage ZIP, asked for as tciafs asks (IncludeMD5)."""
        self.expected(series)
        return self._zip_bytes[series.uid]

    def _fetch(self, series: Series) -> dict[str, str]:
        target = self.workdir / f"reference-{series.uid}.zip"
        url = image_url(self.emu.url, series.uid, IncludeMD5="Yes")
        try:
            with self.emu.unshaped():
                # curl streams the ZIP to disk; only md5hashes.csv and headers are read.
                subprocess.run(["curl", "-sS", "-f", "-o", str(target), url], check=True,
                               capture_output=True)
            expected = expected_from_zip(target)
            self._zip_bytes[series.uid] = target.stat().st_size
        except subprocess.CalledProcessError as exc:
            raise BenchError(f"reference download failed: {exc.stderr.decode()[-300:]}") from None
        finally:
            target.unlink(missing_ok=True)
        if len(expected) != series.images:
            raise BenchError(f"reference of {series.uid} has {len(expected)} instances, "
                             f"the API says {series.images}")
        return expected
