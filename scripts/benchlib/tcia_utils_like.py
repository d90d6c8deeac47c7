"""Baseline of figure 3: download series the way the official tcia_utils does.

tcia_utils' `nbia.downloadSeries` asks getImage with NewFileNames=Yes for each series,
one after another, takes the whole response body into memory and extracts it with
zipfile. This does the same with httpx (one plain GET per series, as tcia_utils does
with requests). Holding each ZIP in memory is the point of this baseline.

    python tcia_utils_like.py ROOT_URL DEST SERIES_UID...
"""

from __future__ import annotations

import io
import sys
import zipfile
from pathlib import Path

import httpx


def download_series(root_url: str, dest: Path, uid: str) -> int:
    url = f"{root_url}/nbia-api/services/v4/getImage"
    reply = httpx.get(url, params={"NewFileNames": "Yes", "SeriesInstanceUID": uid},
                      timeout=600)
    reply.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        archive.extractall(dest / uid)
        return sum(1 for name in archive.namelist() if name.endswith(".dcm"))


def main(argv: list[str]) -> int:
    root_url, dest, uids = argv[0], Path(argv[1]), argv[2:]
    for uid in uids:
        if download_series(root_url, dest, uid) == 0:
            print(f"{uid}: no DICOM file in the ZIP", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
