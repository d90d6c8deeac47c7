"""A series that a site re-submits to the service while a mount runs.

The service's archive changes under a running mount, as NBIA's does: the same UIDs,
other bytes, a later submission timestamp. The mount notices when the study is listed
again, here at once (--listing-ttl 0).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_emulator_support import CT_LUNG, SeriesPlan, TinyArchive, uid

from tciafs.emulator.server import EmulatorServers, Options
from tciafs.pagecache import PUSH_LIMIT

from mountutil import mounted

# Two instances of 2100 x 2100 16-bit pixels: each file is larger than what the daemon
# hands to the kernel's page cache at open, so the kernel fills it through reads.
LARGE = SeriesPlan("ct-large", CT_LUNG, "TCL 002/b", "s2", "CT", 2, "LUNG", None, size=2100)
FIRST = dt.datetime(2019, 5, 6, 7, 8, 9)
AGAIN = dt.datetime(2024, 1, 2, 3, 4, 5)


@pytest.fixture
def archive() -> Iterator[TinyArchive]:
    archive = TinyArchive()
    archive.submit(LARGE, "before", FIRST)
    yield archive


def _instance(mnt: Path, plan: SeriesPlan, n: int) -> Path:
    series = next(mnt.glob(f"*/*/{uid(plan.study)}/{uid(plan.key)}"))
    return series / f"{uid(plan.key, n)}.dcm"


def test_a_large_file_held_open_across_a_re_submission_reads_anew_once_closed(
        archive: TinyArchive, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with EmulatorServers(archive, Options()) as servers, \
            mounted(servers, mnt, cache_dir, "--no-prefetch", "--listing-ttl", "0"):
        path = _instance(mnt, LARGE, 1)
        before = path.read_bytes()
        assert len(before) > PUSH_LIMIT and b"before" in before
        with path.open("rb") as held:
            # Same length of comment: the size stays, so the kernel sees no change of
            # its own; only the daemon can tell it that its pages are old.
            archive.submit(LARGE, "after ", AGAIN)
            os.listdir(path.parent.parent)  # the study, listed again
            assert held.read() == before  # an open file keeps its bytes until closed
        after = path.read_bytes()
        assert len(after) == len(before) and b"after " in after
