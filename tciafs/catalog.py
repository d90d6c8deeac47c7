"""The persisted catalog: every directory entry the archive has shown us, in SQLite.

Row ids are the inode numbers, so they stay stable across remounts. A directory's
`listed` time says when its children were fetched; NULL means never. The catalog
holds names and metadata only, never image bytes.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tciafs.sources.base import Series, plain, series_from_plain
from tciafs.sqlitedb import is_damaged, open_db, set_aside, transaction

log = logging.getLogger(__name__)

ROOT_INODE = 1
SCHEMA_VERSION = 2
# A cold walk stores 10^4 listings: checkpoints every 100 pages, each with an fsync on
# the event loop, took a fifth of its time. A mount checkpoints from a worker thread
# instead (run_checkpoints), often enough that the WAL, which counts against the cache's
# bound (cache.space.META_SLACK: 1 MiB), stays small; the WAL checkpoints itself on the
# loop only past this many pages (800 KiB), should the thread fall behind.
AUTOCHECKPOINT_PAGES = 200
CHECKPOINT_EVERY = 0.2  # seconds
CHECKPOINT_FROM = 64 << 10  # bytes of WAL worth a checkpoint


class ListingUnavailable(Exception):
    """The server could not be asked and nothing usable is stored."""


class Kind(enum.IntEnum):
    ROOT = 0
    COLLECTION = 1
    PATIENT = 2
    STUDY = 3
    SERIES = 4
    INSTANCE = 5
    SIDECAR = 6  # a small generated file: .LICENSE, .CITATION, .series.json

    @property
    def is_dir(self) -> bool:
        return self < Kind.INSTANCE  # the levels come first: asked of every entry served


@dataclass(slots=True)
class Node:
    ino: int
    parent: int
    name: str
    kind: Kind
    ident: str  # the archive's own identifier: collection name, patient id or a UID
    collection: str = ""
    series_uid: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    listed: float | None = None


@dataclass(slots=True)
class NewChild:
    """A child as a listing produced it, before it has an inode."""

    name: str
    kind: Kind
    ident: str
    collection: str = ""
    series_uid: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


# Written into the partial index and into find_uid's query: an IN list of parameters
# would hide from SQLite that the index covers the query (a single `kind=?` does not).
_UID_KINDS = f"{int(Kind.STUDY)}, {int(Kind.SERIES)}"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS nodes(
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    kind INTEGER NOT NULL,
    ident TEXT NOT NULL,
    collection TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    meta TEXT NOT NULL DEFAULT '{{}}',
    listed REAL,
    UNIQUE(parent, name));
CREATE TABLE IF NOT EXISTS settings(key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- Studies and series by UID, for commands that name one; instances, the millions, stay out.
CREATE INDEX IF NOT EXISTS nodes_uid ON nodes(ident) WHERE kind IN ({_UID_KINDS});
CREATE INDEX IF NOT EXISTS series_by_collection ON nodes(collection)
    WHERE kind = {int(Kind.SERIES)};
-- A directory's entries in readdir order (by inode): readdir and the look ahead page
-- through a listing of 10^5 entries without reading all of it (UNIQUE(parent, name)
-- orders by name, which would make each page sort the whole listing).
CREATE INDEX IF NOT EXISTS nodes_by_parent ON nodes(parent);
CREATE TABLE IF NOT EXISTS withdrawn(
    series_uid TEXT PRIMARY KEY,
    meta TEXT NOT NULL,
    since REAL NOT NULL);
-- Prefetch and pin jobs not yet ended: the next mount takes them up again.
CREATE TABLE IF NOT EXISTS jobs(
    command TEXT NOT NULL,
    target TEXT NOT NULL,
    started REAL NOT NULL,
    PRIMARY KEY(command, target));
"""


def stored_rows(cache_dir: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    """Rows of a query over every catalog in a cache directory, read-only; a catalog
    that cannot answer (damaged, or older than the table asked for) adds none."""
    rows: list[tuple] = []
    for path in sorted(cache_dir.glob("catalog-*.sqlite")):
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                rows += db.execute(sql, params).fetchall()
        except sqlite3.Error:
            continue
    return rows


def listed_series(cache_dir: Path) -> dict[str, tuple[str, int | None]]:
    """Collection and image count of each series the catalogs in a cache directory list."""
    rows = stored_rows(cache_dir, "SELECT ident, collection, meta FROM nodes WHERE kind=?",
                       (int(Kind.SERIES),))
    return {uid: (collection, json.loads(meta).get("image_count"))
            for uid, collection, meta in rows}


# The stored jobs of a command that `clear` or `unpin` of `target` ends: every one for
# no target, else those of the target itself or of a path ending in it (a UID).
_FORGET_JOBS = ("DELETE FROM jobs WHERE command=? AND (? IS NULL OR target=? "
                "OR target LIKE '%/' || ?)")


def job_ended_by(job_target: str, target: str | None) -> bool:
    """The same rule, for a job held in memory."""
    return target is None or job_target == target or job_target.endswith("/" + target)


def forget_stored_jobs(cache_dir: Path, command: str, target: str | None = None) -> int:
    """End the stored jobs of `command` that `target` ends, in every catalog of an
    unmounted cache directory. Returns how many; a catalog that cannot answer is left
    as it is."""
    forgotten = 0
    for path in sorted(cache_dir.glob("catalog-*.sqlite")):
        try:
            with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
                forgotten += db.execute(_FORGET_JOBS, (command, target, target, target)
                                        ).rowcount
        except sqlite3.Error:
            continue
    return forgotten


class Catalog:
    def __init__(self, path: Path, source: str) -> None:
        self.path = path
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            if not is_damaged(exc):
                raise
            aside = set_aside(path)
            log.warning("catalog %s was damaged (%s); set aside as %s: listings are "
                        "fetched again", path, exc, aside)
            self._open()
        self._check_source(source)
        self.db.execute(
            "INSERT OR IGNORE INTO nodes(ino, parent, name, kind, ident) VALUES (?, ?, '', ?, '')",
            (ROOT_INODE, ROOT_INODE, int(Kind.ROOT)))

    def _open(self) -> None:
        # Damage found later (a catalog of millions of rows is not read through here)
        # fails the listing that meets it, as an I/O error.
        self.db = open_db(self.path)
        self._checkpointer: sqlite3.Connection | None = None
        try:
            self._migrate()
            self.db.executescript(_SCHEMA)
            self.children(ROOT_INODE)  # what a mount reads first: damage there shows now
        except BaseException:
            self.db.close()
            raise

    def _migrate(self) -> None:
        """An older layout is dropped: the catalog only caches what the server says."""
        has_settings = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE name='settings'").fetchone()
        row = self.db.execute("SELECT value FROM settings WHERE key='schema'").fetchone() \
            if has_settings else None
        if row is not None and row[0] != str(SCHEMA_VERSION):
            self.db.execute("DROP TABLE IF EXISTS nodes")

    def _check_source(self, source: str) -> None:
        """A catalog belongs to one server and user; another source starts it afresh."""
        row = self.db.execute("SELECT value FROM settings WHERE key='source'").fetchone()
        if row is not None and row[0] != source:
            self.db.execute("DELETE FROM nodes")
            self.db.execute("DELETE FROM withdrawn")
            self.db.execute("DELETE FROM jobs")
            self.db.execute("DELETE FROM settings WHERE key='selection'")
        self.db.execute("INSERT OR REPLACE INTO settings VALUES ('source', ?)", (source,))
        self.db.execute("INSERT OR REPLACE INTO settings VALUES ('schema', ?)",
                        (str(SCHEMA_VERSION),))

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.close()
        self.db.close()

    async def run_checkpoints(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
                              ) -> None:
        """Move the WAL into the database from a worker thread, every CHECKPOINT_EVERY
        seconds while it grows; runs until cancelled."""
        self.db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
        wal = self.path.with_name(self.path.name + "-wal")
        task_status.started()
        while True:
            await trio.sleep(CHECKPOINT_EVERY)
            try:
                grown = wal.stat().st_size >= CHECKPOINT_FROM
            except FileNotFoundError:
                continue
            if grown:
                await trio.to_thread.run_sync(self._checkpoint)

    def _checkpoint(self) -> None:
        # A connection of its own: PASSIVE waits for no reader or writer of the loop's.
        try:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(self.path, isolation_level=None,
                                                     check_same_thread=False)
            self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # the next one, or the WAL's own, will do it
            log.debug("checkpoint of %s: %s", self.path, exc)

    def has_listings(self) -> bool:
        """Whether the root was ever listed: then there is a tree to serve offline."""
        root = self.get(ROOT_INODE)
        return root is not None and root.listed is not None

    def save_selection(self, selection: Sequence[Series] | None) -> None:
        """Keep the series a manifest or cart stood for, to mount without the service."""
        if selection is None:
            self.db.execute("DELETE FROM settings WHERE key='selection'")
            return
        self.db.execute("INSERT OR REPLACE INTO settings VALUES ('selection', ?)",
                        (json.dumps([plain(s) for s in selection]),))

    def stored_selection(self) -> list[Series] | None:
        row = self.db.execute("SELECT value FROM settings WHERE key='selection'").fetchone()
        if row is None:
            return None
        try:
            return [series_from_plain(doc) for doc in json.loads(row[0])]
        except (ValueError, TypeError):  # damaged: as if never kept
            return None

    def get(self, ino: int) -> Node | None:
        row = self.db.execute(_SELECT_NODES + "WHERE ino=?", (ino,)).fetchone()
        return _node(row) if row else None

    def children(self, parent: int) -> list[Node]:
        """The listing of `parent`, in readdir order."""
        return self.children_after(parent, 0, -1)  # LIMIT -1: no limit

    def children_after(self, parent: int, ino: int, limit: int) -> list[Node]:
        """Up to `limit` children of `parent` that follow `ino` in readdir order."""
        rows = self.db.execute(
            _SELECT_NODES + "WHERE parent=? AND ino > ? AND ino != ? ORDER BY ino LIMIT ?",
            (parent, ino, ROOT_INODE, limit))
        return [_node(r) for r in rows]

    def idents(self, parent: int, kind: Kind) -> list[tuple[int, str]]:
        """(inode, identifier) of the children of `kind` of `parent`: a listing checked
        against a new one without parsing each entry's metadata."""
        return self.db.execute("SELECT ino, ident FROM nodes WHERE parent=? AND kind=? "
                               "AND ino != ?", (parent, int(kind), ROOT_INODE)).fetchall()

    def count_children(self, parent: int, kind: Kind, limit: int) -> int:
        """How many children of `kind` `parent` has, counted up to `limit`: a bounded
        look through the index, whatever the size of the listing."""
        return self.db.execute(
            "SELECT count(*) FROM (SELECT 1 FROM nodes WHERE parent=? AND kind=? "
            "AND ino != ? LIMIT ?)", (parent, int(kind), ROOT_INODE, limit)).fetchone()[0]

    def child(self, parent: int, name: str) -> Node | None:
        """The entry `name` of `parent`, by the (parent, name) index: a lookup reads one
        row, never the listing."""
        row = self.db.execute(_SELECT_NODES + "WHERE parent=? AND name=? AND ino != ?",
                              (parent, name, ROOT_INODE)).fetchone()
        return _node(row) if row else None

    def names_after(self, parent: int, name: str, limit: int) -> list[Node]:
        """Up to `limit` children of `parent` whose names follow `name`, in name order
        (the order `ls` shows), by the (parent, name) index."""
        rows = self.db.execute(
            _SELECT_NODES + "WHERE parent=? AND name > ? AND ino != ? ORDER BY name LIMIT ?",
            (parent, name, ROOT_INODE, limit))
        return [_node(r) for r in rows]

    def outline_after(self, parent: int, ino: int, limit: int
                      ) -> list[tuple[int, Kind, float | None]]:
        """(inode, kind, listed) of up to `limit` children after `ino` in readdir order:
        what the look ahead needs, without parsing each entry's metadata."""
        rows = self.db.execute(
            "SELECT ino, kind, listed FROM nodes WHERE parent=? AND ino > ? AND ino != ? "
            "ORDER BY ino LIMIT ?", (parent, ino, ROOT_INODE, limit))
        return [(i, _KINDS[k], listed) for i, k, listed in rows]

    def replace_children(self, parent: int, children: Sequence[NewChild],
                         listed: float | None = None) -> None:
        """Make `children` the listing of `parent`, keeping the inodes of names that stay."""
        listed = time.time() if listed is None else listed
        with transaction(self.db):
            old = dict(self.db.execute(
                "SELECT name, ino FROM nodes WHERE parent=? AND ino != ?", (parent, ROOT_INODE)))
            fresh, kept = [], []
            for child in children:
                ino = old.pop(child.name, None)
                if ino is None:
                    fresh.append(child)
                else:
                    kept.append((int(child.kind), child.ident, child.collection,
                                 child.series_uid, _meta_text(child.meta), ino))
            self.db.executemany("UPDATE nodes SET kind=?, ident=?, collection=?, "
                                "series_uid=?, meta=? WHERE ino=?", kept)
            # One statement for the new entries: a first listing inserts them all, and a
            # cold walk lists 10^4 directories.
            self.db.executemany(
                "INSERT INTO nodes(parent, name, kind, ident, collection, series_uid, meta) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(parent, c.name, int(c.kind), c.ident, c.collection, c.series_uid,
                  _meta_text(c.meta)) for c in fresh])
            for ino in old.values():
                self._delete_subtree(ino)
            self.db.execute("UPDATE nodes SET listed=? WHERE ino=?", (listed, parent))

    def mark_listed(self, inos: Iterable[int], listed: float) -> None:
        self.db.executemany("UPDATE nodes SET listed=? WHERE ino=?",
                            [(listed, ino) for ino in inos])

    def collection_facts(self, collection: str) -> dict[str, Any]:
        """The collection row's metadata merged with the first series row's license/DOI."""
        facts: dict[str, Any] = {}
        # Collections are the first rows; a collection's first series may come after
        # millions of other rows, and is found through series_by_collection.
        for kind in (Kind.COLLECTION, Kind.SERIES):
            row = self.db.execute("SELECT meta FROM nodes WHERE collection=? AND kind=? LIMIT 1",
                                  (collection, int(kind))).fetchone()
            if row:
                meta = json.loads(row[0])
                facts.update({k: meta[k] for k in ("host", "license_name", "license_uri",
                                                   "data_description_uri") if k in meta})
        return facts

    def find_uid(self, uid: str) -> Node | None:
        row = self.db.execute(_SELECT_NODES + f"WHERE ident=? AND kind IN ({_UID_KINDS}) "
                              "LIMIT 1", (uid,)).fetchone()
        return _node(row) if row else None

    def series_under(self, ino: int) -> dict[str, Node]:
        """The series stored anywhere below `ino`, by UID (instances are not walked)."""
        rows = self.db.execute(
            "WITH RECURSIVE sub(i) AS (SELECT ? UNION ALL SELECT n.ino FROM nodes n "
            "JOIN sub ON n.parent = sub.i WHERE n.ino != n.parent AND n.kind <= ?) "
            + _SELECT_NODES + "WHERE ino IN (SELECT i FROM sub) AND kind=?",
            (ino, int(Kind.SERIES), int(Kind.SERIES)))
        return {node.ident: node for node in map(_node, rows)}

    def note_withdrawn(self, series: Iterable[Node]) -> None:
        """Remember what series the archive stopped listing looked like, should they
        come back: their metadata tells whether cached bytes may still be served."""
        now = time.time()
        self.db.executemany("INSERT OR REPLACE INTO withdrawn VALUES (?, ?, ?)",
                            [(n.ident, json.dumps(n.meta, default=str), now) for n in series])

    def take_withdrawn(self, uids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The stored metadata of those of `uids` once withdrawn, now listed again."""
        if self.db.execute("SELECT 1 FROM withdrawn LIMIT 1").fetchone() is None:
            return {}  # nearly always: no lookups per listed series
        found = {}
        for uid in uids:
            row = self.db.execute("SELECT meta FROM withdrawn WHERE series_uid=?",
                                  (uid,)).fetchone()
            if row is not None:
                found[uid] = json.loads(row[0])
        self.db.executemany("DELETE FROM withdrawn WHERE series_uid=?",
                            [(uid,) for uid in found])
        return found

    def save_job(self, command: str, target: str, started: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?)",
                        (command, target, started))

    def forget_job(self, command: str, target: str) -> None:
        """A job that ended, or that the next mount cannot take up."""
        self.db.execute("DELETE FROM jobs WHERE command=? AND target=?", (command, target))

    def forget_jobs_ended_by(self, command: str, target: str | None) -> None:
        """The stored jobs that `clear` or `unpin` of `target` ends (all, for None)."""
        self.db.execute(_FORGET_JOBS, (command, target, target, target))

    def stored_jobs(self) -> list[tuple[str, str, float]]:
        """(command, target, started) of the jobs a mount left unfinished, oldest first."""
        return self.db.execute("SELECT command, target, started FROM jobs "
                               "ORDER BY started").fetchall()

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM nodes").fetchone()[0]

    def highest_inode(self) -> int:
        """At least the number of entries, read off the end of the table: a count walks
        all of it, which for a catalog of millions takes seconds from a cold disk."""
        return self.db.execute("SELECT max(ino) FROM nodes").fetchone()[0] or 0

    def _delete_subtree(self, ino: int) -> None:
        self.db.execute(
            "WITH RECURSIVE sub(i) AS (SELECT ? UNION ALL "
            "SELECT n.ino FROM nodes n JOIN sub ON n.parent = sub.i WHERE n.ino != n.parent) "
            "DELETE FROM nodes WHERE ino IN (SELECT i FROM sub)", (ino,))


_SELECT_NODES = ("SELECT ino, parent, name, kind, ident, collection, series_uid, meta, listed "
                 "FROM nodes ")


def _meta_text(meta: dict[str, Any]) -> str:
    return json.dumps(meta, separators=(",", ":"), default=str) if meta else "{}"


_KINDS = tuple(Kind)  # by value: an index is cheaper than Kind(), per row read


def _node(row: tuple) -> Node:
    ino, parent, name, kind, ident, collection, series_uid, meta, listed = row
    return Node(ino, parent, name, _KINDS[kind], ident, collection, series_uid,
                json.loads(meta) if meta != "{}" else {}, listed)
