"""NBIA, the service behind TCIA, as a tciafs source.

`NbiaSource` is what the rest of tciafs uses (through tciafs.sources.build("nbia")).
Below it, the wire client: typed records, streams, retries, tokens, all four API
generations and the NLST server; it knows nothing of files.
"""

from .auth import Credentials, Token, TokenManager
from .client import NbiaClient
from .http import ClientStats, RetryPolicy
from .source import NbiaSource, build, check_login
from .streams import SeriesZipStream, SingleImageStream
from .zipstream import ZipMember, ZipStreamReader, parse_md5_csv

__all__ = [
    "ClientStats",
    "Credentials",
    "NbiaClient",
    "NbiaSource",
    "RetryPolicy",
    "SeriesZipStream",
    "SingleImageStream",
    "Token",
    "TokenManager",
    "ZipMember",
    "ZipStreamReader",
    "build",
    "check_login",
    "parse_md5_csv",
]
