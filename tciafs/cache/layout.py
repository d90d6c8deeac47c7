"""Where a cached instance lives in the cache directory: light enough for the commands
that read a cache directory without the daemon (`tciafs cache verify`)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path


def object_path(root: Path, sop: str) -> Path:
    name = object_name(sop)
    return root / "objects" / name[:2] / name


@functools.lru_cache(maxsize=1 << 16)  # a warm open asks for it again and again
def object_name(sop: str) -> str:
    # Hashing keeps any UID the server sends ('/', '..', 1,000 bytes) a safe file name.
    return hashlib.sha256(sop.encode()).hexdigest()[:40]


def block_path(root: Path, sop: str, idx: int) -> Path:
    """Where block `idx` of an object read by ranges lives (blocks.py)."""
    name = object_name(sop)
    return root / "blocks" / name[:2] / f"{name}.{idx}"
