"""The NBIA wire client: typed records, streams, retries, tokens. Knows nothing of files."""

from .auth import Credentials, Token, TokenManager
from .client import InstanceStream, NbiaClient, SeriesStream
from .http import ClientStats, RetryPolicy
from .records import (
    AuthError,
    ChecksumMismatch,
    ClientError,
    Collection,
    MalformedResponse,
    NotFound,
    Patient,
    Series,
    ServerError,
    Study,
    TruncatedStream,
    plain,
    series_from_plain,
)
from .zipstream import ZipMember, ZipStreamReader, parse_md5_csv

__all__ = [
    "AuthError",
    "ChecksumMismatch",
    "ClientError",
    "ClientStats",
    "Collection",
    "Credentials",
    "InstanceStream",
    "MalformedResponse",
    "NbiaClient",
    "NotFound",
    "Patient",
    "RetryPolicy",
    "Series",
    "SeriesStream",
    "ServerError",
    "Study",
    "Token",
    "TokenManager",
    "TruncatedStream",
    "ZipMember",
    "ZipStreamReader",
    "parse_md5_csv",
    "plain",
    "series_from_plain",
]
