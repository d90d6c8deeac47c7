"""The archives tciafs can mount, each a package here, and a registry by name.

tciafs.sources.base holds the protocol they share; the tree, the catalog and the cache
use nothing else. A source package exposes `build(**options) -> Source`, and is
imported only when a mount asks for it by name.
"""

from __future__ import annotations

import importlib
from typing import Any

from tciafs.sources.base import Capabilities, Source

__all__ = ["Capabilities", "Source", "build", "names"]

# Source name -> the package that builds it.
_PACKAGES = {"nbia": "tciafs.sources.nbia", "idc": "tciafs.sources.idc",
             "auto": "tciafs.sources.auto"}


def names() -> tuple[str, ...]:
    return tuple(_PACKAGES)


def build(name: str, **options: Any) -> Source:
    """The source `name`, built from its own options (its package's build() names them).

    ValueError for an unknown name or an option the source cannot use (a bad URL).
    """
    package = _PACKAGES.get(name)
    if package is None:
        raise ValueError(f"unknown source {name!r}; expected one of {', '.join(names())}")
    source: Source = importlib.import_module(package).build(**options)
    return source
