"""Typed records the client returns, and the errors it raises.

Records are plain frozen values: the client fills them from whichever API generation
answered, so the layers above never see a wire key or a wire date format.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AuthError",
    "ChecksumMismatch",
    "ClientError",
    "Collection",
    "MalformedResponse",
    "NotFound",
    "Patient",
    "Series",
    "ServerError",
    "Study",
    "TruncatedStream",
    "plain",
    "series_from_plain",
]


@dataclass(frozen=True, slots=True)
class Collection:
    name: str
    host: str = "main"  # "main" or "nlst": which server answers for it


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
    fields = record if isinstance(record, dict) else dataclasses.asdict(record)
    return {k: v.isoformat() if isinstance(v, datetime.date) else v
            for k, v in fields.items() if v is not None}


_SERIES_DATES = frozenset(f.name for f in dataclasses.fields(Series) if "date" in str(f.type))


def series_from_plain(doc: dict[str, Any]) -> Series:
    """The Series that plain() turned into `doc`."""
    return Series(**{k: datetime.date.fromisoformat(v) if k in _SERIES_DATES and v else v
                     for k, v in doc.items()})


class ClientError(Exception):
    """Base of every error the client raises; the message names the request, never a secret."""


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
    """A ZIP entry's bytes do not match its CRC-32 or its declared size."""


class AuthError(ClientError):
    """Login or token refresh failed; the message names the user, never the password."""
