"""Baseline of figure 3: download series as the official tcia_utils does.

With tcia_utils installed, this runs its own `nbia.downloadSeries` (input_type="list",
its defaults otherwise: getImage with NewFileNames=Yes, `max_workers=10` series at once),
pointed at the emulator by replacing the one function that names TCIA's hosts
(`setApiUrl`). Without it, the same download done like for like: each series one plain
GET in a pool of ten threads, the whole body held in memory, extracted with zipfile
(tcia_utils' `_download_and_unzip_series`, with httpx in place of requests).

Only the download is timed, not the import (tcia_utils loads pandas and IPython). It
prints one JSON line: {"seconds": ..., "client": "tcia_utils 3.3.5" | "like tcia_utils"}.

    python tcia_utils_like.py [--like] ROOT_URL DEST SERIES_UID...
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import io
import json
import logging
import sys
import time
import zipfile
from pathlib import Path

import httpx

MAX_WORKERS = 10  # tcia_utils' default for downloadSeries


def download_series(root_url: str, dest: Path, uid: str) -> int:
    url = f"{root_url}/nbia-api/services/v4/getImage"
    reply = httpx.get(url, params={"NewFileNames": "Yes", "SeriesInstanceUID": uid},
                      timeout=600)
    reply.raise_for_status()
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        archive.extractall(dest / uid)
        return sum(1 for name in archive.namelist() if name.endswith(".dcm"))


def like_tcia_utils(root_url: str, dest: Path, uids: list[str]) -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=MAX_WORKERS) as pool:
        counts = list(pool.map(lambda uid: download_series(root_url, dest, uid), uids))
    if 0 in counts:
        raise SystemExit(f"{uids[counts.index(0)]}: no DICOM file in the ZIP")


def real_tcia_utils(root_url: str, dest: Path, uids: list[str]) -> None:
    from tcia_utils import nbia

    # The one place tcia_utils names TCIA's hosts: every endpoint URL is built here.
    nbia.setApiUrl = lambda endpoint, api_url="nbia": f"{root_url}/nbia-api/services/v4/"
    logging.getLogger().setLevel(logging.WARNING)  # it logs each series at INFO
    nbia.downloadSeries(uids, input_type="list", path=str(dest))


def main(argv: list[str]) -> int:
    like = argv[:1] == ["--like"]
    root_url, dest, uids = argv[like], Path(argv[like + 1]), argv[like + 2:]
    client = "like tcia_utils"
    run = like_tcia_utils
    if not like:
        try:
            client = f"tcia_utils {importlib.metadata.version('tcia_utils')}"
            import tcia_utils.nbia  # noqa: F401 (loaded before the clock starts)
            run = real_tcia_utils
        except ImportError:
            client = "like tcia_utils"
    started = time.perf_counter()
    run(root_url, dest, uids)
    print(json.dumps({"seconds": time.perf_counter() - started, "client": client}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
