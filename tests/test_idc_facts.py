"""What a mount tells about itself and its files beyond the bytes: `tciafs status` gives
the catalog's version and the bytes received from each archive; an IDC file, named by
its object's UUID, has its SOP Instance UID as an xattr once it is cached, with no
request for it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pydicom
import pytest
from cliutil import status_json, status_text
from test_idc_source import CATALOG, s3_url, source_of

from tciafs import status
from tciafs.emulator import launch
from tciafs.names import encode
from tciafs.sources.idc import catalog as idc_catalog

from mountutil import mounted, needs_fuse, reset_stats, stats

SOP_XATTR = "user.dicom.SOPInstanceUID"


@pytest.mark.mount
@needs_fuse
@pytest.mark.timeout(180)
def test_status_and_the_sop_uid_of_an_idc_mount(demo_data_dir: Path, tmp_path: Path) -> None:
    with launch.start("--profile", "demo", data_dir=demo_data_dir, s3=True) as emu:
        url = s3_url(emu)
        series = source_of(emu).catalog.series_of(
            source_of(emu).catalog.collection_names()[0], None)[0]
        version = idc_catalog.load(url + CATALOG).version
        assert version
        mnt = tmp_path / "mnt"
        reset_stats(url)
        with mounted(emu, mnt, tmp_path / "cache", "--source", "idc", "--no-prefetch",
                     "--s3-endpoint", url, "--idc-catalog", url + CATALOG):
            where = (mnt / encode(series.collection) / encode(series.patient_id)
                     / series.study_uid / series.series_uid)
            files = sorted(where.glob("*.dcm"))
            assert files and SOP_XATTR not in os.listxattr(files[0])  # not cached yet
            data = files[0].read_bytes()
            sop = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID
            gets = stats(url)["servers"]["s3"]["requests"].get("GetObject", 0)
            assert SOP_XATTR in os.listxattr(files[0])
            assert os.getxattr(files[0], SOP_XATTR).decode() == sop
            assert SOP_XATTR not in os.listxattr(files[1])  # not cached: no fetch for it
            assert stats(url)["servers"]["s3"]["requests"].get("GetObject", 0) == gets

            doc = status_json(mnt)
            assert doc["catalog_version"] == version
            # Every byte the bucket sent (the listing, the file) and nothing else.
            assert doc["traffic"] == {"idc": stats(url)["servers"]["s3"]["bytes_sent"]}
            assert doc["traffic"]["idc"] > len(data)
            text = status_text(mnt)
            assert f"idc-index-data {version}" in text and "from idc" in text


@pytest.mark.unit
def test_status_of_an_nbia_mount_shows_its_traffic_and_no_catalog() -> None:
    doc = {"server": "https://services.cancerimagingarchive.net", "api": "v4",
           "uptime": 61.0, "traffic": {"nbia": 3 << 20},
           "cache": {"used": 0, "bound": 1 << 30, "entries": 0, "hit_ratio": 0.0,
                     "bytes_fetched": 0}}
    text = status.render(Path("/mnt/tcia"), doc)
    assert "3.0 MiB from nbia" in text and "catalog" not in text
    both = status.render(Path("/mnt/tcia"), {**doc, "traffic": {"nbia": 1, "idc": 2 << 20},
                                             "catalog": "idc_index.parquet",
                                             "catalog_version": "25.0.5"})
    assert "idc-index-data 25.0.5" in both and "from idc" in both and "from nbia" in both
