"""What the tree, the catalog and the cache know of an archive: the source boundary.

A source is one archive tciafs can mount (NBIA today). It hands out plain records and
raises the errors below; the layers above never see a wire key, a wire date format, a
server name or a token. `Source` is the protocol every source implements,
`Capabilities` what it can do. docs/design/sources.md tells how to add one.

Records are plain frozen values: a source fills them from whatever its service
answered, so a listing looks the same whichever source made it.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

if TYPE_CHECKING:
    import trio

__all__ = [
    "MAIN_HOST",
    "AuthError",
    "Capabilities",
    "ChecksumMismatch",
    "ClientError",
    "Collection",
    "CollectionFacts",
    "Instance",
    "InstanceStream",
    "MalformedResponse",
    "NotFound",
    "Patient",
    "RequestStats",
    "Series",
    "SeriesMember",
    "SeriesStream",
    "ServerError",
    "Source",
    "Study",
    "TruncatedStream",
    "plain",
    "series_from_plain",
]

MAIN_HOST = "main"


# -- records ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Collection:
    name: str
    # Which of the source's servers answers for it (NBIA: "main" or "nlst"). The tree
    # stores it and gives it back to the source; only the source knows what it means.
    host: str = MAIN_HOST


@dataclass(frozen=True, slots=True)
class Patient:
    collection: str
    patient_id: str
    patient_name: str | None = None
    patient_sex: str | None = None
    ethnic_group: str | None = None
    species_description: str | None = None
    phantom: str | None = None


@dataclass(frozen=True, slots=True)
class Study:
    collection: str
    patient_id: str
    study_uid: str
    study_date: datetime.date | None = None
    study_description: str | None = None
    study_id: str | None = None
    patient_age: str | None = None
    series_count: int | None = None


@dataclass(frozen=True, slots=True)
class Series:
    collection: str
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str | None = None
    series_description: str | None = None
    series_number: float | None = None
    body_part: str | None = None
    image_count: int | None = None
    file_size: int | None = None  # sum of the uncompressed DICOM files, in bytes
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    protocol_name: str | None = None
    series_date: datetime.date | None = None
    study_date: datetime.date | None = None
    study_description: str | None = None
    license_name: str | None = None
    license_uri: str | None = None
    data_description_uri: str | None = None
    date_released: datetime.date | None = None
    software_versions: str | None = None
    third_party_analysis: str | None = None
    # Latest submission into the archive (v4 MaxSubmissionTimestamp, v1/v2 TimeStamp):
    # a change means the series' files changed, so cached bytes may be stale.
    submission_date: datetime.date | None = None


def plain(record: Any) -> dict[str, Any]:
    """A record's fields (or a mapping's items) that are set, with dates as ISO strings:
    ready for JSON."""
    items: Iterable[tuple[str, Any]]
    if isinstance(record, dict):
        items = record.items()
    else:  # records are flat: asdict's deep copy of each field was a listing's main cost
        items = ((f.name, getattr(record, f.name)) for f in dataclasses.fields(record))
    return {k: v.isoformat() if isinstance(v, datetime.date) else v
            for k, v in items if v is not None}


_SERIES_DATES = frozenset(f.name for f in dataclasses.fields(Series) if "date" in str(f.type))


def series_from_plain(doc: dict[str, Any]) -> Series:
    """The Series that plain() turned into `doc`."""
    fields: dict[str, Any] = {k: datetime.date.fromisoformat(v) if k in _SERIES_DATES and v
                              else v for k, v in doc.items()}
    return Series(**fields)


@dataclass(frozen=True, slots=True)
class Instance:
    """One file of a series, as its listing names it."""

    uid: str  # SOP Instance UID: the file's name in the tree and its key in the cache
    size: int | None = None  # exact bytes, where the source knows them before a read


@dataclass(frozen=True, slots=True)
class CollectionFacts:
    """What a source says of a collection without listing it: license, DOI, citation.

    A fact the source does not know here is None; the tree then takes it from the first
    series record listed (Series.license_name, license_uri, data_description_uri).
    """

    license_name: str | None = None
    license_uri: str | None = None
    doi: str | None = None  # the data set's DOI or description URI
    archive: str | None = None  # the archive's name, e.g. "The Cancer Imaging Archive (TCIA)"
    archive_citation: str | None = None  # the sentence that says how to cite the archive

    def as_meta(self) -> dict[str, str]:
        """The known facts under the keys series records use (see Tree.collection_facts)."""
        return plain({"license_name": self.license_name, "license_uri": self.license_uri,
                      "data_description_uri": self.doi, "archive": self.archive,
                      "archive_citation": self.archive_citation})


# -- errors -----------------------------------------------------------------------------


class ClientError(Exception):
    """Base of every error a source raises; the message names the request, never a secret."""


class ServerError(ClientError):
    """The server kept failing (status or network) after the retries allowed."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class MalformedResponse(ClientError):
    """The body is not the expected shape: HTML with 200, wrong JSON, a bad CSV."""


class NotFound(ClientError):
    """The series or instance does not exist, or this user may not see it."""


class TruncatedStream(ServerError):
    """A body ended early: a ZIP without its end, a Content-Length not reached."""


class ChecksumMismatch(ServerError):
    """Bytes do not match the checksum or size their source declared (a ZIP entry's
    CRC-32, a stream's length)."""


class AuthError(ClientError):
    """Login or token refresh failed; the message names the user, never the password."""


# -- what a source can do ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a source can do; the layers above branch on these, never on its name."""

    # Instance.size is filled by listings: exact sizes before any byte is read.
    known_sizes: bool
    # open_instance() takes a byte_range: a read needs only the bytes it asks for.
    ranges: bool
    # open_series() streams a whole series at once (cheaper than file by file).
    series_streams: bool
    # A series stream ends with the source's checksum of each member (SeriesStream.md5s).
    series_checksums: bool
    # Users may log in (and out, back to public access); tokens need renewing.
    auth: bool
    # instance_md5() gives the source's MD5 of one instance: a file fetched alone can be
    # checked before a reader sees it (for some instances only, maybe: see instance_md5).
    instance_checksums: bool = False
    # Instance names are SOP Instance UIDs, so a fetched file's header must name the one
    # asked for. False: names are the source's own keys (IDC's object UUIDs).
    names_are_sop_uids: bool = True


# -- streams the cache reads ------------------------------------------------------------


class InstanceStream(Protocol):
    """The bytes of one instance (or of the byte range asked for)."""

    @property
    def size(self) -> int | None:
        """How many bytes the stream holds, when known before they come."""

    def chunks(self) -> AsyncIterator[bytes]:
        """The bytes, in order; raises TruncatedStream when the body ends early."""


class SeriesMember(Protocol):
    """One file of a series stream; its bytes are read before the next member comes."""

    @property
    def name(self) -> str:
        """The member's name in the stream: the key of SeriesStream.md5s."""

    def chunks(self) -> AsyncIterator[bytes]:
        """The file's bytes; ChecksumMismatch when they fail the stream's own checks."""


class SeriesStream(Protocol):
    """A whole series in one stream: its files as members, then their checksums."""

    def members(self) -> AsyncIterator[SeriesMember]:
        """Each file of the series once, in the order the source sends them."""

    @property
    def md5s(self) -> dict[str, str]:
        """The source's lowercase MD5 of each member by name, known once members() is
        exhausted; empty when the source gives none."""

    @property
    def from_shared_cache(self) -> bool:
        """The bytes are a copy a shared site cache stored earlier (docs/cluster.md), not
        the source's own answer now: damage in them may be that copy's, and a fresh
        request replaces it."""


class RequestStats(Protocol):
    """A source's request counters, as `tciafs status` shows them."""

    def as_dict(self) -> dict[str, object]: ...


# -- the source -------------------------------------------------------------------------


class Source(Protocol):
    """One archive, as the tree, the catalog and the cache use it.

    Listings return records; an empty list means the source holds nothing there (a
    source whose service can answer "nothing" by mistake re-asks before it says so).
    Every method raises only the errors of this module.
    """

    @property
    def name(self) -> str:
        """The name the registry builds it by, e.g. "nbia"."""

    @property
    def capabilities(self) -> Capabilities: ...

    # -- lifecycle --

    async def start(self) -> None:
        """Log in where needed and check that the service answers. AuthError: the login
        is refused; ServerError or MalformedResponse: the service cannot be asked now
        (a mount may go on from what its cache holds)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None:
        """The source's background work (renewing tokens); runs until cancelled."""

    async def become_guest(self) -> None:
        """Drop the user's login and go on with public access only (`tciafs logout`)."""

    async def aclose(self) -> None:
        """Log out what start() logged in, and close connections."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...

    # -- status --

    @property
    def stats(self) -> RequestStats: ...

    @property
    def unreachable(self) -> Mapping[str, Mapping[str, object]]:
        """Servers that could not be reached lately, with when and why."""

    def traffic(self) -> dict[str, int]:
        """Bytes received so far from each archive the source reads, by the archive's
        source name ({"idc": 123}); a source that reads two archives gives both."""

    # -- listings --

    def remember_collections(self, stored: Iterable[Collection]) -> None:
        """Collections a previous mount stored, to route requests without a listing."""

    def collection_named(self, name: str) -> Collection:
        """The record of a collection known by name alone (a manifest's), without a
        request: from what the source has seen so far."""

    async def collections(self, stored: Sequence[Collection] = ()) -> list[Collection]:
        """Every collection. `stored`: what the last listing gave; a source that could
        ask only some of its servers keeps the others' collections from it."""

    async def patients(self, collection: str) -> list[Patient]: ...

    async def studies(self, collection: str, patient_id: str | None = None) -> list[Study]:
        ...

    async def series(self, collection: str, patient_id: str | None = None) -> list[Series]:
        """The series of one patient, or of the whole collection."""

    async def series_by_uid(self, series_uid: str) -> list[Series]:
        """The series with this UID, wherever it is (for manifests); [] if unknown."""

    async def cart(self, name: str) -> list[Series]:
        """The series of a shared cart; ClientError from a source without carts."""

    async def instances(self, collection: str, series_uid: str) -> list[Instance]:
        """The files of a series, with their sizes where `known_sizes`."""

    def collection_facts(self, collection: str) -> CollectionFacts:
        """What the source says of a collection without a request."""

    # -- bytes --

    def open_instance(self, collection: str, series_uid: str, sop_uid: str, *,
                      byte_range: tuple[int, int] | None = None, fresh: bool = False
                      ) -> AbstractAsyncContextManager[InstanceStream]:
        """One instance's bytes; with `byte_range` (start, end), bytes start to end-1
        only, for a source with `ranges` (any other raises ValueError). NotFound: the
        source does not serve it. fresh: the last copy came damaged or short, so ask
        past any shared site cache, whose copy the answer then replaces."""

    def open_series(self, collection: str, series_uid: str, *, md5: bool = True,
                    hash_entries: bool = True, fresh: bool = False
                    ) -> AbstractAsyncContextManager[SeriesStream]:
        """The whole series as one stream, for a source with `series_streams`. md5
        asks for the source's checksums; hash_entries=False leaves hashing the bytes to
        the caller; fresh as for open_instance."""

    async def instance_md5(self, collection: str, series_uid: str, sop_uid: str, *,
                           fresh: bool = False) -> str | None:
        """The source's lowercase MD5 of one instance, for a source with
        `instance_checksums`; None where it gives none for this instance (NBIA: restricted
        collections). fresh as for open_instance: asked again after bytes that failed it."""
