"""Copy verification: every copied file must carry the service's MD5 for its instance.

The reference is a getImage ZIP fetched with IncludeMD5=Yes: its `md5hashes.csv` gives
the MD5 of each entry and each entry's DICOM header gives its SOPInstanceUID, so the
expectation is {SOPInstanceUID: MD5}. A copy from the mount names each file
`<SOPInstanceUID>.dcm`; a missing, extra, renamed or altered file is a problem.
Files are hashed in chunks: no series is ever held in memory.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pydicom

from .procs import BenchError

CHUNK = 1 << 20
MAX_REPORTED = 5


def md5_file(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def expected_from_zip(zip_path: Path) -> dict[str, str]:
    """{SOPInstanceUID: MD5} from a getImage ZIP downloaded with IncludeMD5=Yes."""
    with zipfile.ZipFile(zip_path) as zf:
        with zf.open("md5hashes.csv") as raw:
            rows = csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
            md5_of = {row["Filename"]: row["MD5Hash"].lower() for row in rows}
        expected: dict[str, str] = {}  # in the ZIP's order of entries
        for name in zf.namelist():
            if name not in md5_of:
                continue
            with zf.open(name) as member:
                header = pydicom.dcmread(member, stop_before_pixels=True,
                                         specific_tags=["SOPInstanceUID"])
            expected[str(header.SOPInstanceUID)] = md5_of[name]
    if not expected:
        raise BenchError(f"{zip_path.name}: no instances in the reference ZIP")
    return expected


def verify_copy(root: Path, expected: Mapping[str, str]) -> list[str]:
    """Problems found comparing the `.dcm` files under `root` with {SOP UID: MD5}."""
    problems: list[str] = []
    seen: set[str] = set()
    for path in sorted(root.rglob("*.dcm")):
        sop = path.name.removesuffix(".dcm")
        if sop in seen:
            problems.append(f"{sop}: copied twice")
        seen.add(sop)
        if sop not in expected:
            problems.append(f"{path.name}: not an instance of the reference")
        elif md5_file(path) != expected[sop]:
            problems.append(f"{path.name}: MD5 differs from the service's")
    missing = sorted(set(expected) - seen)
    if missing:
        problems.append(f"{len(missing)} instance(s) missing, e.g. {missing[0]}")
    return problems


def check_copy(root: Path, expected: Mapping[str, str], what: str) -> None:
    """Raise BenchError when the copy under `root` is not byte-exact."""
    problems = verify_copy(root, expected)
    if problems:
        shown = "; ".join(problems[:MAX_REPORTED])
        more = f" (+{len(problems) - MAX_REPORTED} more)" if len(problems) > MAX_REPORTED else ""
        raise BenchError(f"{what}: copy verification failed: {shown}{more}")
