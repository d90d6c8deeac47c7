"""The two download bodies NbiaClient hands out: one getSingleImage answer, and a
series ZIP read entry by entry with its LICENSE and MD5 list taken aside."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx

from tciafs.sources.base import TruncatedStream

from .http import OpenResponse
from .zipstream import ZipMember, ZipStreamReader, parse_md5_csv

_LICENSE_CAP = 1024 * 1024


class SingleImageStream:
    """The body of one getSingleImage answer; `size` is its Content-Length when sent."""

    def __init__(self, opened: OpenResponse, what: str) -> None:
        self._opened = opened
        self.what = what
        encoded = opened.response.headers.get("content-encoding", "identity") != "identity"
        length = opened.response.headers.get("content-length")
        self.size: int | None = int(length) if length and length.isdigit() and not encoded \
            else None
        self.received = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._opened.response.aiter_bytes():
                self.received += len(chunk)
                yield chunk
        except httpx.RequestError as exc:
            raise TruncatedStream(f"{self.what}: body cut short after {self.received} of "
                                  f"{self.size if self.size is not None else '?'} bytes "
                                  f"({type(exc).__name__})") from None
        # No length check of our own: httpx's parser holds the body to its
        # Content-Length, and a shorter one raises above.

    async def read(self) -> bytes:
        """The whole body at once: for tests and small files."""
        return b"".join([chunk async for chunk in self.chunks()])


class SeriesZipStream:
    """The whole-series ZIP, entry by entry, with the LICENSE and MD5 list taken aside.

    After `members()` is exhausted: `md5s` maps entry names to the server's lowercase
    MD5s (empty when it sent none), `computed_md5s` the MD5s of the bytes received, and
    `license_text` holds the LICENSE entry's text if there was one.
    """

    def __init__(self, opened: OpenResponse, what: str, hash_entries: bool = True) -> None:
        self._opened = opened
        self.what = what
        self.hash_entries = hash_entries
        self.md5s: dict[str, str] = {}
        self.computed_md5s: dict[str, str] = {}
        self.license_text: str | None = None
        self.complete = False  # the ZIP's end was seen and every entry checked
        # The site cache's configuration (contrib/nginx) says HIT when it answered from
        # its stored copy.
        cache_status = opened.response.headers.get("x-cache-status", "")
        self.from_shared_cache = cache_status.upper() == "HIT"
        self._started = False

    async def members(self) -> AsyncIterator[ZipMember]:
        if self._started:
            raise RuntimeError("SeriesZipStream.members() can be iterated only once")
        self._started = True
        reader = ZipStreamReader(self._body(), label=self.what,
                                 compute_md5=self.hash_entries)
        async for member in reader:
            base = member.name.rsplit("/", 1)[-1]
            if base == "LICENSE":
                self.license_text = await _read_capped(member, _LICENSE_CAP)
                continue
            if base.lower() == "md5hashes.csv":
                self.md5s = parse_md5_csv(await member.read(), f"{self.what}: md5hashes.csv")
                continue
            yield member
            if not member.done:
                await member.skip()  # the caller moved on early: check the rest anyway
            if member.md5 is not None:
                self.computed_md5s[member.name] = member.md5
        self.complete = True

    def md5_mismatches(self) -> list[str]:
        """Entries whose bytes differ from the server's MD5 list (or are missing from it).

        Meaningful only when `md5s` is non-empty, i.e. the server sent a list.
        """
        if not self.md5s:
            return []
        return sorted(name for name, digest in self.computed_md5s.items()
                      if self.md5s.get(name) != digest)

    async def _body(self) -> AsyncIterator[bytes]:
        received = 0
        try:
            async for chunk in self._opened.response.aiter_bytes():
                received += len(chunk)
                yield chunk
        except httpx.RequestError as exc:
            raise TruncatedStream(f"{self.what}: body cut short after {received} bytes "
                                  f"({type(exc).__name__})") from None


async def _read_capped(member: ZipMember, cap: int) -> str:
    data = bytearray()
    async for chunk in member.chunks():
        if len(data) < cap:
            data += chunk[:cap - len(data)]
    return data.decode("utf-8", errors="replace")
