"""The mount's guesses at what will be asked for next, fetched or listed before it is.

Each guess is cheap when wrong, and made only while the cache has room for it:
- a cold open in a study fetches the study's other series too, and lists them;
- listing a directory from its start, in a traversal, lists the next directories ahead.
The page feeder (tciafs.pagecache) makes a third guess, for the kernel: the next files
of a series, pushed into its page cache.
"""

from __future__ import annotations

from tciafs.cache import Cache
from tciafs.catalog import Kind, Node
from tciafs.tree import Tree


class ReadAhead:
    def __init__(self, tree: Tree, cache: Cache) -> None:
        self.tree = tree
        self.cache = cache

    async def cold_open(self, instance: Node) -> None:
        """An instance not cached yet is opened: fetch the other series of its study.

        `cp -r` and viewers take a study series after series; fetching the siblings in
        parallel keeps the link busy. Only when the whole study fits comfortably.
        """
        series = self.tree.node(instance.parent)
        study = self.tree.node(series.parent) if series is not None else None
        if series is None or study is None or not self.cache.prefetch:
            return
        siblings = [n for n in await self.tree.children(study.ino) if n.kind is Kind.SERIES]
        total = sum(n.meta.get("file_size") or 0 for n in siblings)
        if len(siblings) < 2 or total > self.cache.max_bytes // 2:
            return
        fetched = [n for n in siblings
                   if n.ino != series.ino and not self.cache.series_complete(n.ident)]
        for sibling in fetched:
            self.cache.start_series_fetch(sibling.collection, sibling.ident)
        # Their readers will list them first: one request each, before they ask, and
        # the listing lets singles run beside their ZIPs. Listings count against the
        # cache's bound and are never evicted: only while they take little of it.
        if self.cache.room_for_guesses():
            self.tree.list_soon(fetched)

    def listed(self, directory: Node) -> None:
        """A directory is listed from its start: in a traversal, the next ones will be."""
        if self.cache.room_for_guesses():
            self.tree.list_ahead(directory)
