"""The archive model: Collection → Patient → Study → Series → Instance, as directories.

The tree turns a source's records (tciafs.sources.base) into named nodes with stable
inodes (via the catalog) and answers listings and lookups. It never downloads image
bytes, and knows no source but through the Source protocol.

Listings per directory, by level (NBIA's endpoints in brackets):
- root: the collections (getCollectionValues, over the main and NLST servers);
- collection: the patients (getPatient);
- patient: the series of that patient (getSeries), which also fill its studies and
  series, so study directories cost nothing; for a collection of at most
  `bulk_patients` patients the series of the whole collection fill every patient at
  once instead;
- series: the instances (getSOPInstanceUIDs).

Listings live in the catalog, not in memory: a lookup reads one row, readdir a page,
and only the few nodes in use are held (NODES_HELD), so a walk of 10^7 entries takes no
more memory than a walk of ten (docs/design/metadata.md).

A traversal (find, ls -R, du, rsync) has the next directories it reads listed ahead,
a few at a time (tciafs.listahead).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import cachetools
import trio

from tciafs import layout, names
from tciafs.catalog import ROOT_INODE, Catalog, Kind, ListingUnavailable, NewChild, Node
from tciafs.listahead import ListAhead
from tciafs.sources.base import (
    MAIN_HOST,
    ClientError,
    Collection,
    NotFound,
    Patient,
    Series,
    ServerError,
    Source,
    plain,
)

log = logging.getLogger(__name__)

INSTANCE_SUFFIX = ".dcm"
# Dotfiles, so a plain `ls` and `*.dcm` globs never see them; no archive name starts
# with a dot (names.encode escapes a leading one), so they cannot clash.
COLLECTION_SIDECARS = (".LICENSE", ".CITATION")
SERIES_SIDECAR = ".series.json"
# After the service failed a listing, stale listings are served as stored for this long:
# `ls -R` would otherwise pay, once per directory, a connection attempt (a server found
# unreachable) or the whole back-off (a service answering 503).
DOWN_PAUSE = 60.0
NODES_HELD = 2048  # nodes kept in memory; any other is read from the catalog



class Tree:
    def __init__(self, source: Source, catalog: Catalog, *, listing_ttl: float = 6 * 3600,
                 bulk_patients: int = 500, layout: str = "uid",
                 selection: Sequence[Series] | None = None, ahead_at_once: int = 4) -> None:
        self.source = source
        self.catalog = catalog
        self.listing_ttl = listing_ttl
        self.bulk_patients = bulk_patients
        self.layout = layout
        # A manifest or cart: only these series exist, and the levels above them come
        # from their own records instead of listings.
        self.selection = list(selection) if selection is not None else None
        # Listings live in the catalog only; memory holds the few nodes used now, so a
        # walk of 10^7 entries takes no more of it than a walk of ten.
        self._nodes: cachetools.LRUCache[int, Node] = cachetools.LRUCache(maxsize=NODES_HELD)
        self._retry_at: dict[int, float] = {}  # directory → when to ask again (trio clock)
        self.last_fetch = -math.inf  # when a listing was last fetched (trio clock)
        self._inflight: dict[int, trio.Event] = {}
        self._facts: dict[str, dict[str, Any]] = {}
        self._bulk_inflight: dict[int, trio.Event] = {}  # collection inode → bulk listing
        self.requests_saved = 0
        # While the service is down, stale listings are served as stored, without a wait
        # for retries per directory (trio clock).
        self._down_until = -math.inf
        # Called for each series the service re-submitted since it was last listed (its
        # submission date moved), once the listing that showed it is stored.
        self.on_series_revised: Callable[[Node], Awaitable[None]] | None = None
        self._revised: list[int] = []
        # Called with the UIDs of series that a listing which answered no longer shows,
        # and of those listed again as they were when withdrawn.
        self.on_series_withdrawn: Callable[[list[str], list[str]], Awaitable[None]] | None = None
        self._withdrawn: list[str] = []
        self._back: list[str] = []
        # Fewer than the source's connections: a reader's own requests must not queue
        # behind guesses (0: none fetched ahead).
        self._list_ahead = ListAhead(self, ahead_at_once)
        # Requests reach the right server from what a previous mount stored, unlisted.
        source.remember_collections(self._stored_collections())

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Host the listings fetched ahead; runs until cancelled."""
        await self._list_ahead.run(task_status=task_status)

    # -- reading -------------------------------------------------------------------------

    def service_down(self, pause: float | None = DOWN_PAUSE) -> None:
        """Serve stored listings without asking the service, for `pause` seconds (None:
        until service_up)."""
        self._down_until = math.inf if pause is None else trio.current_time() + pause

    def service_up(self) -> None:
        """The service answers: stale listings are fetched again as they are read."""
        self._down_until = -math.inf

    def serving_stored(self, now: float) -> bool:
        """Whether stored listings are served as they are at trio time `now`."""
        return now < self._down_until

    def node(self, ino: int) -> Node | None:
        node = self._nodes.get(ino)
        if node is None:
            node = self.catalog.get(ino)
            if node is not None:
                self._nodes[ino] = node
        return node

    async def children(self, ino: int) -> list[Node]:
        """The whole listing of a directory: for the few callers that need all of it;
        readdir pages through it instead (children_page)."""
        await self.listed(ino)
        return self.catalog.children(ino)

    def children_page(self, ino: int, after: int, limit: int) -> list[Node]:
        """Up to `limit` entries of a directory listed already, after inode `after`."""
        return self.catalog.children_after(ino, after, limit)

    async def instance_uids(self, series_uid: str) -> list[str] | None:
        """The SOP Instance UIDs a series lists now (listing it if need be), or None for
        a series the catalog does not hold."""
        node = self.catalog.find_uid(series_uid)
        if node is None or node.kind is not Kind.SERIES:
            return None
        return [c.ident for c in await self.children(node.ino) if c.kind is Kind.INSTANCE]

    def held_instance_uids(self, series_uid: str) -> list[str] | None:
        """The SOP Instance UIDs of a series whose listing the catalog holds fresh
        (someone listed or opened it), in the order `ls` shows; None otherwise: never a
        request."""
        node = self.catalog.find_uid(series_uid)
        if node is None or node.kind is not Kind.SERIES or not self.fresh(node.listed):
            return None
        return [c.ident for c in self.catalog.children(node.ino) if c.kind is Kind.INSTANCE]

    def following(self, node: Node, count: int) -> list[Node]:
        """Up to `count` entries after `node` in its directory, in the order `ls` shows.

        Only from a stored listing: a guess at what comes next is never worth a request.
        """
        return self.catalog.names_after(node.parent, node.name, count)

    async def lookup(self, parent: int, name: str) -> Node | None:
        if names.is_junk(name):
            return None
        await self.listed(parent)
        node = self.catalog.child(parent, name)
        if node is not None and node.kind.is_dir:  # read next, by the walk that asked
            self._nodes[node.ino] = node
        return node

    def list_ahead(self, directory: Node) -> None:
        """A directory is read from its start: a traversal's next ones are listed ahead."""
        self._list_ahead.read(directory)

    def list_soon(self, directories: list[Node]) -> None:
        """Directories the mount guesses will be read soon are listed in the background."""
        self._list_ahead.soon(directories)

    @property
    def listed_ahead(self) -> int:
        """Listings fetched ahead of a traversal so far, for status."""
        return self._list_ahead.listed_ahead

    def fresh(self, listed: float | None) -> bool:
        """Whether a listing stored at `listed` (None: never) is younger than the TTL."""
        return listed is not None and time.time() - listed < self.listing_ttl

    def _drop_node(self, ino: int) -> None:
        """Listings live in the catalog; only the node held in memory goes stale."""
        self._nodes.pop(ino, None)

    async def listed(self, ino: int) -> Node:
        """The directory `ino`, once the catalog holds a listing of it that may be
        served: fresh, or stored while the service cannot be asked. Single flight: one
        request per directory at a time."""
        node = self.node(ino)
        if node is None or not node.kind.is_dir:
            raise NotADirectoryError(ino)
        if self.servable(node):
            return node
        while (pending := self._inflight.get(ino)) is not None:
            await pending.wait()
            node = self.node(ino) or node
            if self.servable(node):
                return node
        # One attempt of our own: what it stored is served, whatever it was.
        return await self._load_once(node)

    async def _load_once(self, node: Node) -> Node:
        done = self._inflight[node.ino] = trio.Event()
        try:
            await self._load(node)
        finally:
            del self._inflight[node.ino]
            done.set()
        return self.node(node.ino) or node

    def servable(self, node: Node) -> bool:
        """Whether the stored listing of `node` may be served without asking: fresh, or
        stored while the service, or this directory, is not asked again for now."""
        if node.listed is None:
            return False
        return (time.time() - node.listed < self.listing_ttl
                or trio.current_time() < max(self._down_until,
                                             self._retry_at.get(node.ino, -math.inf)))

    async def _load(self, node: Node) -> None:
        self.last_fetch = trio.current_time()
        try:
            await self._fetch(node)
            await self._report_changes()
        except NotFound:
            self.catalog.replace_children(node.ino, [])
        except ClientError as exc:
            if node.listed is None:
                raise ListingUnavailable(str(exc)) from exc
            log.warning("serving the stored listing of %s: %s; stored listings are served "
                        "as they are for %.0f s", self.path(node), exc, DOWN_PAUSE)
            if isinstance(exc, ServerError):
                self.service_down()
            else:  # this directory only: not asked again at every lookup in it
                self._retry_later(node.ino)
        finally:
            # A listing rewrites the rows of the directory and of those it fills (a
            # patient's studies and series, a whole collection in bulk): the nodes held
            # may be older than the catalog now.
            self._nodes.clear()

    def _retry_later(self, ino: int) -> None:
        now = trio.current_time()
        self._retry_at = {i: t for i, t in self._retry_at.items() if t > now}
        self._retry_at[ino] = now + DOWN_PAUSE

    def path(self, node: Node) -> str:
        parts = []
        while node.ino != ROOT_INODE:
            parts.append(node.name)
            parent = self.node(node.parent)
            if parent is None:
                break
            node = parent
        return "/" + "/".join(reversed(parts))

    # -- fetching ------------------------------------------------------------------------

    async def _fetch(self, node: Node) -> None:
        match node.kind:
            case Kind.ROOT:
                await self._fetch_root(node)
            case Kind.COLLECTION:
                await self._fetch_collection(node)
            case Kind.PATIENT | Kind.STUDY:
                await self._fetch_patient(node if node.kind is Kind.PATIENT
                                          else self.node(node.parent))
            case Kind.SERIES:
                await self._fetch_series(node)

    async def _fetch_root(self, root: Node) -> None:
        if self.selection is not None:
            collections = [self.source.collection_named(c)
                           for c in dict.fromkeys(s.collection for s in self.selection)]
        else:
            collections = await self.source.collections(self._stored_collections())
        children = [NewChild(names.encode(c.name), Kind.COLLECTION, c.name, c.name,
                             meta={"host": c.host}) for c in collections]
        self.catalog.replace_children(root.ino, _unique(children, "collection"))

    def _stored_collections(self) -> list[Collection]:
        return [Collection(n.ident, n.meta.get("host", MAIN_HOST))
                for n in self.catalog.children(ROOT_INODE) if n.kind is Kind.COLLECTION]

    async def _fetch_collection(self, coll: Node) -> None:
        if self.selection is not None:
            patients = [Patient(coll.ident, pid) for pid in dict.fromkeys(
                s.patient_id for s in self.selection if s.collection == coll.ident)]
        else:
            patients = await self.source.patients(coll.ident)
        children = [NewChild(names.encode(p.patient_id), Kind.PATIENT, p.patient_id,
                             coll.ident, meta=plain(p)) for p in patients]
        children += [NewChild(name, Kind.SIDECAR, name, coll.ident)
                     for name in COLLECTION_SIDECARS]
        gone: list[Node] = []
        if patients and self.selection is None:  # an empty answer may be a glitch
            listed = {p.patient_id for p in patients}
            for ino, ident in self.catalog.idents(coll.ino, Kind.PATIENT):
                if ident not in listed:
                    gone += self.catalog.series_under(ino).values()
        self.catalog.replace_children(coll.ino, _unique(children, "patient"))
        self._note_withdrawn(gone)

    async def _fetch_patient(self, patient: Node | None) -> None:
        if patient is None:
            return
        pending = self._bulk_inflight.get(patient.parent)
        if pending is not None:  # a bulk listing of this collection is on its way
            await pending.wait()
            fresh = self.catalog.get(patient.ino)
            if fresh is not None and fresh.listed is not None:
                return
        # Counted, not read: a collection of 26,410 patients would otherwise be parsed
        # in full for each patient listed on its own.
        bulk = self.catalog.count_children(patient.parent, Kind.PATIENT,
                                           self.bulk_patients + 1) <= self.bulk_patients
        if bulk:
            siblings = [n for n in self.catalog.children(patient.parent)
                        if n.kind is Kind.PATIENT]
            done = self._bulk_inflight[patient.parent] = trio.Event()
            try:
                await self._fill_patients(patient, siblings, None)
            finally:
                del self._bulk_inflight[patient.parent]
                done.set()
        else:
            await self._fill_patients(patient, [patient], patient.ident)

    async def _fill_patients(self, patient: Node, targets: list[Node],
                             who: str | None) -> None:
        """List the series of `who` (or of the whole collection) into `targets`."""
        series = await self._series_rows(patient.collection, who)
        # An empty answer may be a glitch; a manifest's selection is no answer at all.
        answered = bool(series) and self.selection is None
        study_ids = await self._study_ids(patient.collection, who)
        by_patient: dict[str, list[Series]] = defaultdict(list)
        for s in series:
            by_patient[s.patient_id.upper()].append(s)
        listed = time.time()
        for target in targets:
            self._store_patient(target, by_patient.get(target.ident.upper(), []), study_ids,
                                listed, answered=answered)
            self._drop_node(target.ino)
        self.requests_saved += len(targets) - 1

    async def _series_rows(self, collection: str, patient_id: str | None) -> list[Series]:
        if self.selection is not None:
            return [s for s in self.selection if s.collection == collection
                    and (patient_id is None or s.patient_id.upper() == patient_id.upper())]
        return await self.source.series(collection, patient_id)

    async def _study_ids(self, collection: str, patient_id: str | None) -> dict[str, str]:
        """StudyID by study UID: only the descriptive names need it (one more request)."""
        if self.layout != "descriptive":
            return {}
        studies = await self.source.studies(collection, patient_id)
        return {s.study_uid: s.study_id for s in studies if s.study_id}

    def _store_patient(self, patient: Node, series: Sequence[Series],
                       study_ids: dict[str, str], listed: float, *, answered: bool) -> None:
        before = self.catalog.series_under(patient.ino)
        studies: dict[str, list[Series]] = defaultdict(list)
        for s in series:
            studies[s.study_uid].append(s)
        firsts = [rows[0] for rows in studies.values()]
        study_names = self._study_names(firsts, study_ids)
        children = [NewChild(name, Kind.STUDY, first.study_uid, patient.collection,
                             meta=_study_meta(first, study_ids.get(first.study_uid)))
                    for name, first in zip(study_names, firsts, strict=True)]
        self.catalog.replace_children(patient.ino, _unique(children, "study"), listed)
        for study in self.catalog.children(patient.ino):
            rows = studies.get(study.ident, [])
            kids = [NewChild(name, Kind.SERIES, s.series_uid, patient.collection,
                             s.series_uid, plain(s))
                    for name, s in zip(self._series_names(rows), rows, strict=True)]
            self.catalog.replace_children(study.ino, _unique(kids, "series"), listed)
            self._drop_node(study.ino)
        self._note_revised(before, series)
        if answered:
            still = {s.series_uid for s in series}
            self._note_withdrawn([n for uid, n in before.items() if uid not in still])

    def _note_revised(self, before: dict[str, Node], listed: Sequence[Series]) -> None:
        """Series whose submission date moved, or that come back after a withdrawal:
        their instances are listed again and their cached bytes reported
        (_report_changes)."""
        returned = self.catalog.take_withdrawn(s.series_uid for s in listed
                                               if s.series_uid not in before)
        for s in listed:
            old = before.get(s.series_uid)
            meta = old.meta if old is not None else returned.get(s.series_uid)
            if meta is None:
                continue
            was, now = meta.get("submission_date"), plain(s).get("submission_date")
            if not _stale(was, now, back=old is None):
                if old is None:
                    self._back.append(s.series_uid)
                continue
            why = ("was re-submitted to the service" if old is not None
                   else "is listed again after a withdrawal")
            log.warning("series %s %s (%s, before %s)", s.series_uid, why, now, was)
            node = self.catalog.get(old.ino) if old is not None else None
            node = node or self.catalog.find_uid(s.series_uid)  # renamed, or new
            if node is not None:
                self.catalog.mark_listed([node.ino], 0.0)  # stale, but kept for offline
                self._drop_node(node.ino)
                self._nodes.pop(node.ino, None)
                self._revised.append(node.ino)

    def _note_withdrawn(self, gone: list[Node]) -> None:
        """Series that a listing which did answer no longer shows: TCIA withdrew them."""
        if not gone:
            return
        log.warning("%d series no longer listed by the service (withdrawn): %s", len(gone),
                    ", ".join(n.ident for n in gone[:5]) + (", ..." if len(gone) > 5 else ""))
        self.catalog.note_withdrawn(gone)
        self._withdrawn.extend(n.ident for n in gone)

    async def _report_changes(self) -> None:
        while self._revised:
            node = self.node(self._revised.pop())
            if node is not None and self.on_series_revised is not None:
                await self.on_series_revised(node)
        if (self._withdrawn or self._back) and self.on_series_withdrawn is not None:
            gone, back, self._withdrawn, self._back = self._withdrawn, self._back, [], []
            await self.on_series_withdrawn(gone, back)

    def _study_names(self, firsts: list[Series], study_ids: dict[str, str]) -> list[str]:
        if self.layout != "descriptive":
            return [names.encode(s.study_uid) for s in firsts]
        return layout.disambiguate(firsts, lambda s, n: layout.study_name(
            s.study_uid, s.study_date, study_ids.get(s.study_uid), s.study_description, n))

    def _series_names(self, rows: list[Series]) -> list[str]:
        if self.layout != "descriptive":
            return [names.encode(s.series_uid) for s in rows]
        return layout.disambiguate(rows, lambda s, n: layout.series_name(
            s.series_uid, s.series_number, s.series_description, n))

    async def _fetch_series(self, series: Node) -> None:
        instances = await self.source.instances(series.collection, series.ident)
        children = [NewChild(names.encode(i.uid, INSTANCE_SUFFIX), Kind.INSTANCE, i.uid,
                             series.collection, series.ident,
                             {"size": i.size} if i.size is not None else {})
                    for i in instances]
        children.append(NewChild(SERIES_SIDECAR, Kind.SIDECAR, SERIES_SIDECAR,
                                 series.collection, series.ident))
        self.catalog.replace_children(series.ino, _unique(children, "instance"))

    # -- facts for attributes and sidecars -----------------------------------------------

    def collection_facts(self, collection: str) -> dict[str, Any]:
        """License, DOI, citation and server of a collection: what the source says of it,
        completed by the first series already listed."""
        facts = self._facts.get(collection)
        if facts is None:
            facts = {**self.source.collection_facts(collection).as_meta(),
                     **self.catalog.collection_facts(collection)}
            if "license_name" in facts:  # complete: worth remembering
                self._facts[collection] = facts
        return facts

    async def ensure_collection_facts(self, collection: str) -> dict[str, Any]:
        """Collection facts, listing the collection's first patient if none is known yet."""
        facts = self.collection_facts(collection)
        if "license_name" in facts:
            return facts
        try:
            coll = next((n for n in await self.children(ROOT_INODE) if n.ident == collection),
                        None)
            patient = next((n for n in await self.children(coll.ino)
                            if n.kind is Kind.PATIENT), None) if coll else None
            if patient is not None:
                await self.children(patient.ino)
        except (ClientError, ListingUnavailable) as exc:
            # A sidecar must not make its directory unlistable: it says less for now.
            log.info("license facts of %s unavailable: %s", collection, exc)
        return self.collection_facts(collection)

    def listed_count(self, ino: int) -> int | None:
        node = self.node(ino)
        if node is None or node.listed is None:
            return None
        return sum(n.kind is Kind.INSTANCE for n in self.catalog.children(ino))

    # -- invalidation --------------------------------------------------------------------

    def forget_listing(self, ino: int) -> None:
        """Mark a listing stale, so the next access fetches it again."""
        self.catalog.mark_listed([ino], 0.0)
        self._drop_node(ino)


def _stale(was: str | None, now: str | None, *, back: bool) -> bool:
    """Whether bytes cached under submission date `was` may differ from the series now.

    A series listed all along is stale when its date moved (without both dates, nothing
    can tell); one back from a withdrawal is trusted only with the very date it left with.
    """
    if back:
        return not (was and was == now)
    return bool(was and now and was != now)


def _unique(children: list[NewChild], what: str) -> list[NewChild]:
    """Keep the first of entries that share a name (the server sometimes repeats rows)."""
    seen: dict[str, NewChild] = {}
    for child in children:
        if child.name in seen:
            log.warning("server listed %s %r twice; keeping the first", what, child.ident)
            continue
        seen[child.name] = child
    return list(seen.values())


def _study_meta(series: Series, study_id: str | None) -> dict[str, Any]:
    return plain({
        "collection": series.collection, "patient_id": series.patient_id,
        "study_uid": series.study_uid, "study_date": series.study_date,
        "study_description": series.study_description, "study_id": study_id,
        "date_released": series.date_released})
