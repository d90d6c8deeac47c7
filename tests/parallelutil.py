"""What the tests of parallel fetching share (tests/test_parallel_*.py): counting the
downloads a source has open at once, measured at the client, where the caps apply (the
emulator ends a request a little after the client has read its last byte)."""

from __future__ import annotations

import collections
import contextlib
from typing import Any


class OpenDownloads:
    """Wraps a source's openers (`open_instance`, and `open_series` where it has one):
    how many are open now, the most there were at once, and how often each file was
    asked for alone."""

    def __init__(self, source: Any) -> None:
        self.now = 0
        self.peak = 0
        self.alone: collections.Counter[str] = collections.Counter()
        for name in ("open_instance", "open_series"):
            if hasattr(source, name):
                setattr(source, name, self._counted(name, getattr(source, name)))

    def _counted(self, name: str, opener):  # type: ignore[no-untyped-def]
        @contextlib.asynccontextmanager
        async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            if name == "open_instance":
                self.alone[args[2]] += 1  # (collection, series, sop)
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                async with opener(*args, **kwargs) as stream:
                    yield stream
            finally:
                self.now -= 1
        return counted
