"""What the cache needs of the archive: the two calls that fetch bytes, and the errors
they raise. The only module of the cache that imports the client.

The cache calls `open_instance(collection, series_uid, sop_uid)` (one file, as a
stream of chunks with its size when known) and `open_series(collection, series_uid,
hash_entries=False)` (a ZIP of the series, as members of chunks, then the service's MD5
list), nothing else.
"""

from __future__ import annotations

from typing import TypeAlias

from tciafs.client import (
    AuthError,
    ChecksumMismatch,
    ClientError,
    MalformedResponse,
    NbiaClient,
    NotFound,
    ServerError,
    TruncatedStream,
)

from .model import CacheDiskError, CacheFull, IntegrityError

Source: TypeAlias = NbiaClient

__all__ = ["ChecksumMismatch", "ClientError", "NotFound", "Source", "TruncatedStream",
           "may_pass"]


def may_pass(exc: BaseException | None) -> bool:
    """Whether a failure is the service's or the network's, which may pass, rather than
    a refusal (unknown series, no permission), damage or a full cache."""
    while exc is not None:
        if isinstance(exc, (ServerError, MalformedResponse)):
            return True
        if isinstance(exc, (NotFound, AuthError, IntegrityError, CacheFull, CacheDiskError)):
            return False
        exc = exc.__cause__
    return False
