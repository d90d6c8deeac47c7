"""The SQLite files of tciafs (the catalogs, the cache index): opened crash-safe,
found damaged and set aside, written many rows to a transaction."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path


def open_db(path: Path) -> sqlite3.Connection:
    """A private SQLite file in WAL mode; synchronous=NORMAL is crash-safe under WAL."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # Small checkpoints keep the WAL, which counts against the cache bound, small.
        db.execute("PRAGMA wal_autocheckpoint=100")
        db.execute("PRAGMA journal_size_limit=524288")
    except BaseException:
        db.close()
        raise
    return db


def is_damaged(exc: sqlite3.DatabaseError) -> bool:
    """Whether SQLite found the file itself damaged (not busy, not full)."""
    return getattr(exc, "sqlite_errorcode", 0) & 0xFF in (sqlite3.SQLITE_CORRUPT,
                                                           sqlite3.SQLITE_NOTADB)


def set_aside(path: Path) -> Path:
    """Move a damaged database out of the way, keeping the last one to look at; its
    WAL belongs to it and goes."""
    aside = path.with_name(path.name + ".damaged")
    os.replace(path, aside)
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    return aside


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One transaction for many statements on a connection in autocommit mode: a
    commit per statement would write the WAL once per row."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
