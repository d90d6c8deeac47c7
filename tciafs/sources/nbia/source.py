"""NbiaSource: NBIA as a tciafs source, on top of NbiaClient.

What NBIA gives, and what it does not (docs/design/sources.md says more):
- no instance sizes before a download, and no byte ranges: a file comes whole;
- a whole series as one ZIP, whose md5hashes.csv member lists each file's MD5 (not on
  the legacy API); a single image comes without any checksum, but a second request
  (v1 getM5HashForImage) gives the MD5 of a public image;
- license and DOI only in series rows, so its collection facts name the archive alone.

The NBIA-only knowledge the tree once held lives here: which server (main or NLST)
holds a collection, and that an empty listing on a token due for renewal may be the
service's answer to the token rather than to the question.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

import trio

from tciafs.credentials import Login
from tciafs.sources.base import (
    Capabilities,
    Collection,
    CollectionFacts,
    Instance,
    InstanceStream,
    Patient,
    Series,
    SeriesStream,
    Study,
)

from .auth import Credentials
from .client import MAIN, NLST, NbiaClient
from .http import ClientStats

log = logging.getLogger("tciafs.client")

T = TypeVar("T")

ARCHIVE = "The Cancer Imaging Archive (TCIA)"
ARCHIVE_CITATION = ("Cite TCIA as: Clark K, Vendt B, Smith K, et al. The Cancer Imaging "
                    "Archive (TCIA): Maintaining and Operating a Public Information "
                    "Repository. J Digit Imaging 26(6), 1045-1057 (2013). "
                    "https://doi.org/10.1007/s10278-013-9622-7")


class NbiaSource:
    """The Source protocol (tciafs.sources.base) over one NbiaClient.

    Options are NbiaClient's: server, api, nlst_server, credentials, api_key, ...
    """

    name = "nbia"

    def __init__(self, server: str = "https://services.cancerimagingarchive.net",
                 **options: Any) -> None:
        self.client = NbiaClient(server, **options)
        # The legacy API's server gives no MD5 at all, neither in ZIPs nor per image.
        checksums = self.client.api != "legacy"
        self.capabilities = Capabilities(
            known_sizes=False, ranges=False, series_streams=True,
            series_checksums=checksums, auth=True, instance_checksums=checksums)

    def __repr__(self) -> str:
        return f"NbiaSource({self.client!r})"

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.client.start()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        await self.client.run_token_refresher(task_status=task_status)

    async def become_guest(self) -> None:
        await self.client.become_guest()

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __aenter__(self) -> NbiaSource:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def stats(self) -> ClientStats:
        return self.client.stats

    @property
    def unreachable(self) -> Mapping[str, Mapping[str, object]]:
        return self.client.unreachable

    def traffic(self) -> dict[str, int]:
        return {self.name: self.client.stats.bytes_received}

    # -- listings ------------------------------------------------------------------------

    def remember_collections(self, stored: Iterable[Collection]) -> None:
        self.client.remember_hosts(stored)

    def collection_named(self, name: str) -> Collection:
        return Collection(name, self.client.host_of(name) or MAIN)

    async def collections(self, stored: Sequence[Collection] = ()) -> list[Collection]:
        found = await self._nonempty(self.client.collections)
        return found + self._unanswered_nlst(found, stored)

    def _unanswered_nlst(self, found: list[Collection], stored: Sequence[Collection]
                         ) -> list[Collection]:
        """Stored NLST collections to keep when the NLST server did not answer this time.

        The client leaves a silent NLST server out of the listing rather than failing
        it; that must not erase what a previous listing stored under those collections.
        """
        if any(c.host == NLST for c in found) or not self.client.has_nlst_server:
            return []
        kept = [Collection(c.name, NLST) for c in stored if c.host == NLST]
        if kept:
            log.warning("the NLST server did not answer; keeping its %d stored collections",
                        len(kept))
        return kept

    async def patients(self, collection: str) -> list[Patient]:
        return await self._nonempty(self.client.patients, collection)

    async def studies(self, collection: str, patient_id: str | None = None) -> list[Study]:
        return await self.client.studies(collection, patient_id)

    async def series(self, collection: str, patient_id: str | None = None) -> list[Series]:
        if patient_id is None:
            return await self._nonempty(self.client.series, collection)
        return await self._nonempty(self.client.series, collection, patient_id)

    async def series_by_uid(self, series_uid: str) -> list[Series]:
        return await self.client.series_by_uid(series_uid)

    async def cart(self, name: str) -> list[Series]:
        return await self.client.cart(name)

    async def instances(self, collection: str, series_uid: str) -> list[Instance]:
        # getSOPInstanceUIDs names the files, and nothing tells their sizes before a read.
        uids = await self._nonempty(self.client.instance_uids, collection, series_uid)
        return [Instance(uid) for uid in uids]

    def collection_facts(self, collection: str) -> CollectionFacts:
        # License and DOI come in every series row (LicenseName, LicenseURI, the
        # collection's URI), so the tree finds them there.
        return CollectionFacts(archive=ARCHIVE, archive_citation=ARCHIVE_CITATION)

    async def _nonempty(self, fetch: Callable[..., Awaitable[list[T]]], *args: str
                        ) -> list[T]:
        """Ask once more after a token renewal before believing an empty answer.

        The real service answers several listings with an empty 200 when the token
        has expired; an empty directory must never be stored for that reason. The
        client already re-asks answers that came back on an old token; this covers a
        token whose renewal is overdue or failed.
        """
        rows = await fetch(*args)
        if not rows and self.client.token_may_be_stale():
            await self.client.ensure_fresh_token()
            rows = await fetch(*args)
        return rows

    # -- bytes ---------------------------------------------------------------------------

    def open_instance(self, collection: str, series_uid: str, sop_uid: str, *,
                      byte_range: tuple[int, int] | None = None, fresh: bool = False
                      ) -> AbstractAsyncContextManager[InstanceStream]:
        if byte_range is not None:
            raise ValueError("NBIA serves whole instances only: it takes no byte range")
        return self.client.open_instance(collection, series_uid, sop_uid, fresh=fresh)

    def open_series(self, collection: str, series_uid: str, *, md5: bool = True,
                    hash_entries: bool = True, fresh: bool = False
                    ) -> AbstractAsyncContextManager[SeriesStream]:
        return self.client.open_series(collection, series_uid, md5=md5,
                                       hash_entries=hash_entries, fresh=fresh)

    async def instance_md5(self, collection: str, series_uid: str, sop_uid: str, *,
                           fresh: bool = False) -> str | None:
        # Public images only: NBIA gives one image's MD5 to the guest alone, so for a
        # restricted collection the series ZIP's md5hashes.csv is the only checksum.
        if not self.capabilities.instance_checksums:
            return None
        return await self.client.instance_md5(collection, sop_uid, fresh=fresh)


def build(*, login: Login | None = None, **options: Any) -> NbiaSource:
    """The registry's entry (tciafs.sources.build("nbia", ...)): NbiaClient's options,
    with the user's login as tciafs.credentials finds it."""
    if login is not None:
        options["credentials"] = Credentials(login.user, login.password)
    return NbiaSource(**options)


async def check_login(server: str, login: Login) -> None:
    """Ask the token endpoint whether `login` is good (`tciafs login`); AuthError if not.
    The token is revoked again on the way out."""
    async with NbiaClient(server, api="v2", nlst_server=None,
                          credentials=Credentials(login.user, login.password)) as client:
        await client.tokens[MAIN].login()
