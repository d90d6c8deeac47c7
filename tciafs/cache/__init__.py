"""Instance bytes on disk: a bounded, persistent, crash-safe cache.

docs/design/cache.md describes its parts, its invariants and its concurrency rules.

The names below load their module on first use, so that a command reading a cache
directory (`tciafs cache stats`) can import `tciafs.cache.index` without the daemon's
parts (trio, pydicom).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .core import Cache
    from .layout import object_path
    from .model import (
        BadCopy,
        CacheDiskError,
        CacheFull,
        CacheStats,
        Entry,
        FetchFailed,
        IntegrityError,
    )
    from .space import META_SLACK

_HOMES = {"BadCopy": "model", "Cache": "core", "CacheDiskError": "model", "CacheFull": "model",
          "CacheStats": "model", "Entry": "model", "FetchFailed": "model",
          "IntegrityError": "model", "META_SLACK": "space", "object_path": "layout"}

__all__ = ["META_SLACK", "BadCopy", "Cache", "CacheDiskError", "CacheFull", "CacheStats", "Entry",
           "FetchFailed", "IntegrityError", "object_path"]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value
