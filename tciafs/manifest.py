"""Reading `.tcia` manifests (NBIA Data Retriever) and turning them into series records.

A manifest is a few `key=value` header lines, then `ListOfSeriesToDownload=` and one
SeriesInstanceUID per line. Like the Retriever, every line after that marker counts,
reduced to the characters a UID may hold ([0-9.]); blank lines and `#` comments are
skipped. A file without the marker is read as a bare list of UIDs, one per line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import trio

from tciafs.sources.base import Series, Source

log = logging.getLogger(__name__)

_MARKER = "listofseriestodownload="
_NOT_UID = re.compile(r"[^.0-9]")


class ManifestError(Exception):
    pass


def parse(text: str) -> list[str]:
    lines = text.splitlines()
    markers = [i for i, line in enumerate(lines) if line.strip().lower() == _MARKER]
    body = lines[markers[0] + 1:] if markers else [ln for ln in lines if "=" not in ln]
    uids = []
    for line in body:
        if line.strip().startswith("#"):
            continue
        uid = _NOT_UID.sub("", line)
        if uid:
            uids.append(uid)
    return list(dict.fromkeys(uids))


def read(path: Path) -> list[str]:
    try:
        uids = parse(path.read_text(errors="replace"))
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror}") from None
    if not uids:
        raise ManifestError(f"manifest {path} lists no series")
    return uids


async def resolve(source: Source, uids: list[str], parallel: int = 8) -> list[Series]:
    """The records of the manifest's series, in manifest order; unknown ones are logged."""
    found: dict[str, Series] = {}
    limiter = trio.CapacityLimiter(parallel)

    async def one(uid: str) -> None:
        async with limiter:
            rows = await source.series_by_uid(uid)
        if rows:
            found[uid] = rows[0]

    async with trio.open_nursery() as nursery:
        for uid in uids:
            nursery.start_soon(one, uid)
    missing = [u for u in uids if u not in found]
    if missing:
        log.warning("%d series of the manifest are unknown to the server or not visible: %s",
                    len(missing), ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return [found[u] for u in uids if u in found]
