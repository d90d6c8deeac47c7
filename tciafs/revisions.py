"""What a mount does when the archive revises or withdraws a series it has listed.

The tree notices (a listing asked again shows a series re-submitted, or no longer
there) and calls these reactions; they steer the cache and the kernel's copies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tciafs.cache import Cache
from tciafs.catalog import Node
from tciafs.pagecache import PageFeeder
from tciafs.tree import Tree

log = logging.getLogger(__name__)


class Revisions:
    def __init__(self, tree: Tree, cache: Cache, pages: PageFeeder,
                 kernel_knows: Callable[[int], bool]) -> None:
        self.tree = tree
        self.cache = cache
        self.pages = pages
        self.kernel_knows = kernel_knows  # whether the kernel holds an inode (looked up)

    async def series_revised(self, series: Node) -> None:
        """The service re-submitted the series: drop the cached bytes, which may be stale,
        and what the kernel holds of them; a pinned series is fetched again."""
        dropped, pinned = self.cache.drop_revised(series.ident)
        log.warning("series %s: %d cached files dropped as possibly stale%s", series.ident,
                    len(dropped), "; fetching it again, as it is pinned" if pinned else "")
        for child in self.tree.catalog.children(series.ino):
            if self.kernel_knows(child.ino):  # the kernel may hold its size or pages
                await self.pages.invalidate(child.ino)
        if pinned:
            self.cache.start_series_fetch(series.collection, series.ident)

    async def series_withdrawn(self, uids: list[str], back: list[str]) -> None:
        """Series the archive stopped listing go first when room is needed; those listed
        again are kept as before."""
        for uid in back:
            self.cache.series_back(uid)
        for uid in uids:
            files, nbytes, pinned = self.cache.series_withdrawn(uid)
            if files:
                log.warning("series %s is withdrawn: its %d cached files (%d bytes) go first "
                            "when room is needed%s", uid, files, nbytes,
                            f"; {pinned} are pinned and stay until `tciafs cache unpin {uid}`"
                            if pinned else "")
