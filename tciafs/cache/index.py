"""The cache index, index.sqlite: the only code that runs SQL on it.

`Index` is the daemon's connection. The functions at the end read a cache directory
for `tciafs cache stats` and `verify`: read-only connections, which never block the
daemon's writes (WAL).

Rows: `instances` holds every file ever fetched, present (its bytes are in objects/)
or not (evicted; its size and MD5 stay known); `series` what is known of a series as a
whole (held whole, pinned); `settings` the bound and the hit counts.
"""

from __future__ import annotations

import collections
import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tciafs.sqlitedb import is_damaged, open_db, set_aside, transaction

from .model import CacheDiskError, CacheFull

INDEX_NAME = "index.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances(
    sop TEXT PRIMARY KEY,
    series TEXT NOT NULL,
    collection TEXT NOT NULL,
    size INTEGER NOT NULL,
    md5 TEXT NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0,
    present INTEGER NOT NULL DEFAULT 1,
    last_access REAL NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series);
CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS series(
    uid TEXT PRIMARY KEY,
    collection TEXT NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0,
    pinned INTEGER NOT NULL DEFAULT 0,
    fetched REAL);
CREATE TABLE IF NOT EXISTS blocks(
    sop TEXT NOT NULL,
    idx INTEGER NOT NULL,
    series TEXT NOT NULL,
    size INTEGER NOT NULL,
    last_access REAL NOT NULL,
    PRIMARY KEY(sop, idx));
"""

_DB_DISK_ERRORS = (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR)  # primary result codes

# What any read of a cache directory's index may raise: damage, a table it lacks.
IndexUnreadable = sqlite3.DatabaseError


@dataclass(frozen=True, slots=True)
class FoundFile:
    """A cached file as its own header names it, for an index made anew."""

    sop: str
    series: str
    size: int
    md5: str
    mtime: float


class Index:
    def __init__(self, db: sqlite3.Connection, root: Path) -> None:
        self.db = db
        self.root = root

    @classmethod
    def open(cls, root: Path) -> tuple[Index, list[tuple], str | None]:
        """The index, the files it lists as present (sop, series, size, pinned; least
        recently used first), and why it must be made anew from the files, if it must:
        it was damaged (then it is set aside) or is missing or empty."""
        path = root / INDEX_NAME
        lost = None
        try:
            db, rows = _open_db(path)
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                raise
            lost = f"damaged ({exc}); set aside as {set_aside(path)}"
            db, rows = _open_db(path)
        index = cls(db, root)
        if lost is None and db.execute("SELECT 1 FROM instances LIMIT 1").fetchone() is None:
            lost = "missing or empty"  # deleted, or a rebuild was cut short
        return index, rows, lost

    @property
    def path(self) -> Path:
        return self.root / INDEX_NAME

    def rebuild(self, found: list[FoundFile], listed: dict[str, tuple[str, int | None]]
                ) -> list[tuple]:
        """Index the files found on disk anew (unverified, unpinned); returns the rows as
        open() does. `listed`: the collection and image count of each series the mounts'
        catalogs list; a series holding as many files as that needs no fetch again."""
        with transaction(self.db):
            self.db.executemany(
                "INSERT OR REPLACE INTO instances(sop, series, collection, size, md5, "
                "verified, present, last_access, pinned) VALUES (?, ?, ?, ?, ?, 0, 1, ?, 0)",
                [(f.sop, f.series, listed.get(f.series, ("", None))[0], f.size, f.md5, f.mtime)
                 for f in found])
            counts = collections.Counter(f.series for f in found)
            self.db.executemany("INSERT OR REPLACE INTO series(uid, collection, complete) "
                                "VALUES (?, ?, 1)",
                                [(series, listed[series][0]) for series, n in counts.items()
                                 if series in listed and listed[series][1] == n])
        return _present(self.db)

    # -- start-up ------------------------------------------------------------------------

    def set_bound(self, max_bytes: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO settings VALUES ('bound', ?)", (str(max_bytes),))

    def counters(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM settings"))

    def known_sizes(self) -> Iterator[tuple[str, int]]:
        return self.db.execute("SELECT sop, size FROM instances")

    def complete_series(self) -> set[str]:
        return {uid for uid, in self.db.execute("SELECT uid FROM series WHERE complete=1")}

    def forget_lost(self, sops: list[str]) -> None:
        """Files the index listed whose bytes were missing or partial at start."""
        self.mark_absent(sops)
        self.db.execute("UPDATE series SET complete=0 WHERE uid IN (SELECT series FROM "
                        "instances WHERE present=0)")

    # -- files ---------------------------------------------------------------------------

    def add(self, sop: str, series: str, collection: str, size: int, md5: str, *,
            verified: bool, last_access: float, make_room: Callable[[], None]) -> None:
        """Record a file as present, pinned if its series is. When the disk is too full
        for the index to grow, `make_room` once and try again."""
        self._write("INSERT OR REPLACE INTO instances(sop, series, collection, size, md5, "
                    "verified, present, last_access, pinned) VALUES (?, ?, ?, ?, ?, ?, 1, ?, "
                    "(SELECT pinned FROM series WHERE uid=?))",
                    (sop, series, collection, size, md5, int(verified), last_access, series),
                    make_room)

    def _write(self, sql: str, values: tuple, make_room: Callable[[], None]) -> None:
        """One row written; a disk too full for the index to grow gets `make_room` once."""
        for attempt in range(2):
            try:
                self.db.execute(sql, values)
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF in _DB_DISK_ERRORS:
                    raise CacheDiskError(f"cache index in {self.root}: {exc}") from exc
                if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                    raise
                full = f"disk full ({self.root}): the cache index cannot grow"
                if attempt:
                    raise CacheFull(full) from exc
                try:
                    make_room()
                except CacheFull:
                    raise CacheFull(f"{full}; every cached file is open or pinned") from exc

    def file_pinned(self, sop: str) -> bool:
        return bool(self.db.execute("SELECT pinned FROM instances WHERE sop=?",
                                    (sop,)).fetchone()[0])

    def mark_absent(self, sops: Iterable[str]) -> None:
        self.db.executemany("UPDATE instances SET present=0 WHERE sop=?", [(s,) for s in sops])

    def delete(self, sops: Iterable[str]) -> None:
        self.db.executemany("DELETE FROM instances WHERE sop=?", [(s,) for s in sops])

    def md5(self, sop: str, *, verified: bool = False) -> str | None:
        """The MD5 of a file's bytes as stored; with `verified`, only one the service's
        own MD5 list confirmed."""
        row = self.db.execute("SELECT md5 FROM instances WHERE sop=? AND verified>=?",
                              (sop, int(verified))).fetchone()
        return row[0] if row else None

    def confirm(self, sop: str) -> None:
        """The service's MD5 list agrees with the file."""
        self.db.execute("UPDATE instances SET verified=1 WHERE sop=?", (sop,))

    def save_use(self, touched: list[tuple[float, str]], counts: list[tuple[str, str]]) -> None:
        """When files were last used, and the hit counts. Hints, never worth a failed open:
        an error leaves them unsaved."""
        with contextlib.suppress(sqlite3.Error), transaction(self.db):
            self.db.executemany("UPDATE instances SET last_access=? WHERE sop=?", touched)
            self.db.executemany("INSERT OR REPLACE INTO settings VALUES (?, ?)", counts)

    # -- blocks: parts of objects read by range (blocks.py) --------------------------------

    def blocks(self) -> list[tuple[str, int, str, int]]:
        """Every block listed (sop, idx, series, size), least recently fetched first."""
        return self.db.execute("SELECT sop, idx, series, size FROM blocks "
                               "ORDER BY last_access").fetchall()

    def add_block(self, sop: str, idx: int, series: str, size: int,
                  make_room: Callable[[], None]) -> None:
        """Record a block as present, once its file is in place; `make_room` as for add()."""
        self._write("INSERT OR REPLACE INTO blocks(sop, idx, series, size, last_access) "
                    "VALUES (?, ?, ?, ?, ?)", (sop, idx, series, size, time.time()), make_room)

    def delete_blocks(self, blocks: Iterable[tuple[str, int]]) -> None:
        self.db.executemany("DELETE FROM blocks WHERE sop=? AND idx=?", list(blocks))

    # -- series --------------------------------------------------------------------------

    def files_of(self, series: str, *, present: bool | None = None,
                 verified: bool = False) -> list[str]:
        """The files of a series the index knows, present or not (None) or as given; with
        `verified`, only those the service's MD5 list confirmed."""
        return [sop for sop, in self.db.execute(
            "SELECT sop FROM instances WHERE series=? AND (? IS NULL OR present=?) "
            "AND verified>=?", (series, present, present, int(verified)))]

    def collection_of(self, series: str) -> str | None:
        """The collection of a series the cache holds or has held, or None."""
        row = self.db.execute("SELECT collection FROM series WHERE uid=? UNION ALL "
                              "SELECT collection FROM instances WHERE series=? LIMIT 1",
                              (series, series)).fetchone()
        return row[0] if row else None

    def series_pinned(self, series: str) -> bool:
        row = self.db.execute("SELECT pinned FROM series WHERE uid=?", (series,)).fetchone()
        return bool(row and row[0])

    def pin(self, series: str, collection: str, pinned: bool) -> list[str]:
        """Pin a series (or unpin it), the files it has now and those it gets later;
        returns the files it has now."""
        self.db.execute("INSERT INTO series(uid, collection, pinned) VALUES (?, ?, ?) "
                        "ON CONFLICT(uid) DO UPDATE SET pinned=?",
                        (series, collection, int(pinned), int(pinned)))
        self.db.execute("UPDATE instances SET pinned=? WHERE series=?", (int(pinned), series))
        return self.files_of(series)

    def mark_complete(self, series: str, collection: str) -> None:
        now = time.time()
        self.db.execute("INSERT INTO series(uid, collection, complete, fetched) VALUES "
                        "(?, ?, 1, ?) ON CONFLICT(uid) DO UPDATE SET complete=1, fetched=?",
                        (series, collection, now, now))

    def mark_incomplete(self, series: str | None) -> None:
        """One series, or all of them (None), no longer hold every file."""
        self.db.execute("UPDATE series SET complete=0 WHERE ? IS NULL OR uid=?",
                        (series, series))

    def withdraw(self, series: str) -> None:
        """Its files are the first to go, at the next start too."""
        self.db.execute("UPDATE instances SET last_access=0 WHERE series=?", (series,))

    def close(self) -> None:
        self.db.close()


def _open_db(path: Path) -> tuple[sqlite3.Connection, list[tuple]]:
    """The index, and the files it lists: reading them all shows damage now."""
    db = open_db(path)
    try:
        db.executescript(_SCHEMA)
        return db, _present(db)
    except BaseException:
        db.close()
        raise


def _present(db: sqlite3.Connection) -> list[tuple]:
    """The files the index lists as present, least recently used first."""
    return db.execute("SELECT sop, series, size, pinned FROM instances WHERE present=1 "
                      "ORDER BY last_access").fetchall()


# -- a cache directory, read by the cache commands ------------------------------------------

@dataclass
class Summary:
    entries: int
    stored: int  # bytes of the present files
    pinned: int
    settings: dict[str, str]  # bound, hits, misses
    largest: list[tuple[str, str, int, int]]  # series, collection, files, bytes


class IndexReader:
    """The index of a cache directory, read-only: it never blocks the daemon's writes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    @classmethod
    def open(cls, root: Path) -> IndexReader | None:
        """None when the directory has no index."""
        path = root / INDEX_NAME
        if not path.exists():
            return None
        return cls(sqlite3.connect(f"file:{path}?mode=ro", uri=True))

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.db.close()

    def summary(self) -> Summary:
        """What `tciafs cache stats` shows of the index."""
        entries, stored = self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM instances WHERE present=1").fetchone()
        pinned = self.db.execute("SELECT count(*) FROM instances WHERE present=1 AND pinned=1"
                                 ).fetchone()[0]
        has_settings = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='settings'").fetchone()
        settings = dict(self.db.execute("SELECT key, value FROM settings")) if has_settings else {}
        largest = self.db.execute(
            "SELECT series, collection, count(*), sum(size) FROM instances WHERE present=1 "
            "GROUP BY series ORDER BY sum(size) DESC LIMIT 5").fetchall()
        return Summary(entries, stored, pinned, settings, largest)

    def series_held(self, series: str) -> tuple[int, int, int]:
        """Files, bytes and pinned files of a series present in the cache."""
        return self.db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(pinned), 0) "
            "FROM instances WHERE series=? AND present=1", (series,)).fetchone()

    def present_files(self) -> Iterator[tuple[str, int, str, bool]]:
        """Every present file: SOP UID, size, MD5 and whether the service's list confirmed it."""
        for sop, size, md5, verified in self.db.execute(
                "SELECT sop, size, md5, verified FROM instances WHERE present=1"):
            yield sop, size, md5, bool(verified)

    def still_present(self, sop: str) -> bool:
        row = self.db.execute("SELECT present FROM instances WHERE sop=?", (sop,)).fetchone()
        return bool(row and row[0])

    def stored_bound(self) -> int | None:
        """The bound the last mount of the directory used."""
        bound = dict(self.db.execute("SELECT key, value FROM settings")).get("bound")
        return int(bound) if bound else None
