"""Which failures of a fetch may pass (the network's, the service's) and which are final.

The cache calls two methods of its source (tciafs.sources.base.Source): `open_instance`
(one file, as a stream of chunks with its size when known) and `open_series` (the whole
series as members of chunks, then the source's checksums), nothing else.
"""

from __future__ import annotations

from tciafs.sources.base import AuthError, MalformedResponse, NotFound, ServerError

from .model import CacheDiskError, CacheFull, IntegrityError


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
