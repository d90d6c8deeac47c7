"""What a researcher sees besides the images: sidecars, xattrs, status, other views."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import subprocess
import zipfile
from pathlib import Path

import httpx
import pytest
from cliutil import run_tciafs, status_json, status_text
from test_mount import _first_ct_series, _series_dirs

from mountutil import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

LUNG = "Demo-Lung CT_2024"


def _xattrs(path: Path) -> dict[str, str]:
    return {k: os.getxattr(path, k).decode() for k in os.listxattr(path)}


def test_sidecars_and_xattrs(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache"):
        coll = mnt / LUNG
        plain = subprocess.run(["ls", str(coll)], capture_output=True, text=True).stdout
        every = subprocess.run(["ls", "-a", str(coll)], capture_output=True, text=True).stdout
        assert ".LICENSE" not in plain and ".LICENSE" in every and ".CITATION" in every
        series = _first_ct_series(mnt)
        in_series = subprocess.run(["ls", str(series)], capture_output=True, text=True).stdout
        assert ".series.json" not in in_series and (series / ".series.json").exists()
        meta = json.loads((series / ".series.json").read_text())
        assert meta["series_uid"] == series.name and meta["modality"] == "CT"
        # .LICENSE names the license the service states in every ZIP of the collection
        # (the listing gives its full name where the ZIP uses the short one).
        body = httpx.get(f"{emulator.url}/nbia-api/services/v4/getImage",
                         params={"SeriesInstanceUID": series.name}, timeout=60).content
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            assert zf.namelist()[0] == "LICENSE"
            in_zip = zf.read("LICENSE").decode()
        ours = (coll / ".LICENSE").read_text()
        uri = meta["license_uri"]
        assert uri in in_zip and uri in ours and meta["license_name"] in ours
        assert ours.startswith(f"License Information. The {LUNG} collection is distributed")
        citation = (coll / ".CITATION").read_text().splitlines()
        # The collection's DOI from its series, then the archive's own citation.
        assert citation[0] == f"Data from the {LUNG} collection, The Cancer Imaging " \
            "Archive (TCIA)."
        assert citation[1] == f"Cite the data set as: {meta['data_description_uri']}"
        assert citation[2].startswith("Cite TCIA as: Clark K") and "https://doi.org/" in \
            citation[2]
        assert os.stat(coll / ".LICENSE").st_size == len((coll / ".LICENSE").read_bytes())

        assert _xattrs(coll)["user.tcia.level"] == "collection"
        assert _xattrs(coll)["user.tcia.source"] == "nbia"
        # What `ls -l` and others ask: a namespace the mount has none of is unsupported
        # (ls then stops asking), a user attribute of another program is absent.
        for foreign, error in (("security.selinux", errno.ENOTSUP),
                               ("user.other", errno.ENODATA)):
            with pytest.raises(OSError) as missing:
                os.getxattr(coll, foreign)
            assert missing.value.errno == error
        assert _xattrs(coll)["user.tcia.license_uri"].startswith("http")
        patient = series.parent.parent
        pattrs = _xattrs(patient)
        assert pattrs["user.dicom.PatientID"] == patient.name
        assert pattrs["user.tcia.doi"].startswith("https://doi.org/")
        sattrs = _xattrs(series)
        assert sattrs["user.dicom.Modality"] == "CT"
        assert int(sattrs["user.dicom.ImageCount"]) == len(list(series.glob("*.dcm")))
        untouched = next(p for p in (mnt / "Demo_PET-CT Lymphoma").glob("*/*/*") if p.is_dir())
        assert _xattrs(untouched)["user.tcia.cached"] == "none"
        first = sorted(untouched.glob("*.dcm"))[0]
        assert "user.tcia.md5" not in _xattrs(first)
        assert _xattrs(first)["user.tcia.cached"] == "none"
        data = first.read_bytes()
        series = untouched
        iattrs = _xattrs(first)
        assert iattrs["user.tcia.cached"] == "full"
        assert iattrs["user.dicom.SOPInstanceUID"] == first.name.removesuffix(".dcm")
        dump = subprocess.run(["getfattr", "-d", str(series)], capture_output=True, text=True)
        assert "user.dicom.SeriesDescription" in dump.stdout
        # Once the series fetch confirmed it, the file's MD5 is shown.
        status = run_tciafs("cache", "prefetch", str(series), timeout=120)
        assert status.returncode == 0, status.stderr
        assert _xattrs(first)["user.tcia.md5"] == hashlib.md5(data).hexdigest()
        assert _xattrs(series)["user.tcia.cached"] == "full"


def test_status_json_follows_activity(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache", "--cache-size", "200M"):
        series = _series_dirs(mnt)[0]
        files = sorted(series.glob("*.dcm"))
        files[0].read_bytes()
        files[0].read_bytes()
        doc = status_json(mnt)
        assert doc["server"] == emulator.url and doc["api"] == "v4"
        assert doc["cache_dir"] == str(tmp_path / "cache")
        assert doc["cache"]["bound"] == 200 * 2**20
        assert 0 < doc["cache"]["used"] <= doc["cache"]["bound"]
        assert doc["cache"]["entries"] >= 1 and doc["cache"]["misses"] >= 1
        assert doc["requests"]["requests"]["getSOPInstanceUIDs"] >= 1
        assert doc["requests"]["bytes_received"] > 0
        text = status_text(mnt)
        assert "getSOPInstanceUIDs" in text and "cache" in text
        run_tciafs("cache", "prefetch", str(series), check=True, timeout=120)
        text = status_text(mnt)
        assert "prefetch jobs: 1, 0 running" in text
        assert re.search(r"fetched  \d+ series whole, 0 completed from their missing files, "
                         r"\d+ single files", text), text


def test_descriptive_layout(emulator, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache", "--layout", "descriptive"):
        studies = [p for p in (mnt / LUNG).glob("*/*") if p.is_dir()]
        assert studies
        for study in studies:
            assert re.fullmatch(r"\d\d-\d\d-\d{4}-[^-]+-.+-\d{5}", study.name), study.name
            for series in (p for p in study.iterdir() if p.is_dir()):
                assert re.fullmatch(r"(\d+\.\d{6}|NA)-(.+-)?\d{5}", series.name), series.name
                assert os.getxattr(series, "user.tcia.id").decode().endswith(series.name[-5:])
        one = next(p for p in studies[0].iterdir() if p.is_dir())
        f = next(one.glob("*.dcm"))
        assert f.read_bytes()[128:132] == b"DICM"


def test_manifest_and_cart_mounts(emulator, tmp_path: Path) -> None:
    rows = httpx.get(f"{emulator.url}/nbia-api/services/v4/getSeries",
                     params={"Collection": LUNG}, timeout=30).json()
    nlst = httpx.get(f"{emulator.nlst_url}/nbia-api/services/v4/getSeries",
                     params={"Collection": "NLST-Demo"}, timeout=30).json()
    chosen = [rows[0]["SeriesInstanceUID"], nlst[0]["SeriesInstanceUID"]]
    tcia = tmp_path / "pick.tcia"
    tcia.write_text("downloadServerUrl=https://example.invalid/x\nincludeAnnotation=true\n"
                    "noOfrRetry=4\ndatabasketId=pick.tcia\nmanifestVersion=3.0\n"
                    "ListOfSeriesToDownload=\n" + "\n".join(chosen) + "\n1.2.3.404\n")
    mnt = tmp_path / "mnt"
    with mounted(emulator, mnt, tmp_path / "cache", "--manifest", str(tcia)):
        assert sorted(os.listdir(mnt)) == sorted([LUNG, "NLST-Demo"])
        found = sorted(p.name for p in mnt.glob("*/*/*/*") if p.is_dir())
        assert found == sorted(chosen)
        f = next(mnt.glob(f"NLST-Demo/*/*/{chosen[1]}/*.dcm"))
        assert f.read_bytes()[128:132] == b"DICM"
    cart = httpx.get(f"{emulator.url}/nbia-api/services/v1/getContentsByName",
                     params={"name": "nbia-demo-cart"}, timeout=30).json()
    with mounted(emulator, tmp_path / "mnt2", tmp_path / "cache", "--cart", "nbia-demo-cart"):
        found = sorted(p.name for p in (tmp_path / "mnt2").glob("*/*/*/*") if p.is_dir())
        assert found == sorted(r["SeriesInstanceUID"] for r in cart)
