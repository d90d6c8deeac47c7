"""Which IDC object holds which instance: read once from the objects' headers, kept on disk.

IDC names an object by a UUID, NBIA an instance by its SOP Instance UID; only the DICOM
header of the object says which instance it is. An object never changes (a new version
of a file is a new object under a new key), so what a header once said of a key stays
true for good: the mapping is never refreshed, only completed. It lives in a private
SQLite file in the mount's cache directory, so that a remount reads no header again.

A series' prefix is `mapped` once every object its listing named has an answer; an
object whose header could not be read then has no row, and the instance it holds is
read from NBIA.
"""

from __future__ import annotations

import io
import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_partial
from pydicom.tag import Tag

from tciafs.sqlitedb import is_damaged, open_db, set_aside, transaction

log = logging.getLogger("tciafs.auto")

FIRST_HEAD = 8 << 10  # most headers name the SOP Instance UID within this
LONGEST_HEAD = 1 << 20  # past this, the object is not the DICOM file it should be
_SOP_INSTANCE_UID = Tag(0x0008, 0x0018)

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL, key TEXT NOT NULL, sop TEXT NOT NULL, size INTEGER NOT NULL,
    etag TEXT, PRIMARY KEY (bucket, key));
CREATE INDEX IF NOT EXISTS objects_by_sop ON objects (sop);
CREATE TABLE IF NOT EXISTS mapped (bucket TEXT NOT NULL, prefix TEXT NOT NULL,
    objects INTEGER NOT NULL, PRIMARY KEY (bucket, prefix));
"""


class HeaderTooLong(Exception):
    """The bytes read end inside the header, before the SOP Instance UID: read more."""


class NotDicom(Exception):
    """The bytes are no DICOM header that names an instance."""


def sop_of(head: bytes, complete: bool) -> str:
    """The SOP Instance UID the first bytes of a DICOM file name (pydicom, stopping
    before the pixels and past the UID). HeaderTooLong when `head` ends before it and
    more bytes exist (`complete` false); NotDicom when no UID can be found in them."""
    try:
        ds = read_partial(io.BytesIO(head), stop_when=lambda tag, vr, length:
                          tag > _SOP_INSTANCE_UID, specific_tags=[_SOP_INSTANCE_UID])
        sop = ds.get("SOPInstanceUID")
        # The meta header's UID stands in only for a dataset read to its end: pydicom
        # stops quietly at the end of bytes cut inside the dataset.
        if not sop and complete:
            sop = ds.file_meta.get("MediaStorageSOPInstanceUID")
    except Exception as exc:  # pydicom raises many kinds for bytes cut inside an element
        if not complete:
            raise HeaderTooLong(str(exc)) from exc
        raise NotDicom(f"not a DICOM file: {exc}") from exc
    if not sop:
        if not complete:
            raise HeaderTooLong("no SOP Instance UID in the first bytes")
        raise NotDicom("a DICOM file without a SOP Instance UID")
    return str(sop)


@dataclass(frozen=True, slots=True)
class MappedObject:
    """An object of a series, and the instance its header names."""

    bucket: str
    key: str
    sop: str
    size: int  # exact, from the listing
    etag: str | None  # as listed: the MD5 of the bytes when stored in one piece


class ObjectMap:
    """The key → SOP Instance UID answers found so far, on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                raise
            # Only a saving: headers can be read again.
            log.warning("the IDC object map %s is damaged; set aside as %s", path,
                        set_aside(path))
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = open_db(self.path)
        db.executescript(SCHEMA)
        return db

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def is_mapped(self, bucket: str, prefix: str) -> bool:
        with self._lock:
            row = self.db.execute("SELECT 1 FROM mapped WHERE bucket = ? AND prefix = ?",
                                  (bucket, prefix)).fetchone()
        return row is not None

    def objects(self, bucket: str, prefix: str) -> list[MappedObject]:
        """Every object of the prefix whose instance is known, in key order."""
        # The prefix ends with "/", which no key prefix can follow but keys of it.
        with self._lock:
            rows = self.db.execute(
                "SELECT key, sop, size, etag FROM objects WHERE bucket = ? AND key >= ? "
                "AND key < ? ORDER BY key", (bucket, prefix, prefix[:-1] + "0")).fetchall()
        return [MappedObject(bucket, *row) for row in rows]

    def add(self, found: list[MappedObject]) -> None:
        with self._lock, transaction(self.db):
            self.db.executemany(
                "INSERT OR REPLACE INTO objects (bucket, key, sop, size, etag) "
                "VALUES (?, ?, ?, ?, ?)",
                [(o.bucket, o.key, o.sop, o.size, o.etag) for o in found])

    def mark_mapped(self, bucket: str, prefix: str, objects: int) -> None:
        with self._lock:
            self.db.execute("INSERT OR REPLACE INTO mapped (bucket, prefix, objects) "
                            "VALUES (?, ?, ?)", (bucket, prefix, objects))
