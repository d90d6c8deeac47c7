"""An anonymous client for S3 buckets: listings, HEAD, and whole or ranged GETs.

What it relies on of S3 is in docs/idc.md: ListObjectsV2 pages of at most 1,000 keys
chained by continuation tokens; `Range: bytes=a-b` answered by 206 with Content-Range,
or by 200 with the whole object, which a server may do; errors as XML. Errors become the
source boundary's (tciafs.sources.base): NoSuchKey, NoSuchBucket and AccessDenied are
NotFound, 416 is RangeNotSatisfiable, a 500 or 503 (SlowDown) that outlasts the retries
is ServerError, a body that ends before it should is TruncatedStream.

A body cut short, or a 206 that covers less than was asked, is continued by a range
request for the rest, with `If-Match` on the ETag, up to the policy's retries: objects
never change, so the bytes fit together.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import trio

from tciafs.sources.base import (
    ClientError,
    MalformedResponse,
    NotFound,
    ServerError,
    TruncatedStream,
)

from .http import Opened, Request, RetryPolicy, S3Stats, Transport
from .s3xml import ListPage, S3Object, parse_error, parse_list, unquote_etag

AWS_ENDPOINT = "https://s3.amazonaws.com"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class RangeNotSatisfiable(ClientError):
    """The range starts at or past the object's end (416 InvalidRange)."""


@dataclass(frozen=True, slots=True)
class ObjectHead:
    size: int
    etag: str | None
    last_modified: str | None
    content_type: str | None


def error_for(status: int, body: bytes, what: str) -> ClientError:
    """The boundary's error for an S3 error answer."""
    doc = parse_error(body)
    detail = f"{what}: HTTP {status}" + "".join(f" {p}" for p in (doc.code, doc.message) if p)
    if status in (403, 404) or doc.code in ("NoSuchKey", "NoSuchBucket", "AccessDenied"):
        return NotFound(detail)  # gone, or not for an anonymous reader: the same to us
    if status == 416:
        return RangeNotSatisfiable(detail)
    if status >= 500:
        return ServerError(detail, status=status)
    return ClientError(detail)


class S3Client:
    """Anonymous requests to one S3 endpoint.

    Buckets are addressed virtual-host style on AWS's own endpoint
    (`https://<bucket>.s3.amazonaws.com/<key>`), as AWS asks, and path-style
    (`<endpoint>/<bucket>/<key>`) on any other, as S3-compatible servers on one host
    expect; `path_style` overrides the choice.
    """

    def __init__(self, endpoint: str = AWS_ENDPOINT, *, path_style: bool | None = None,
                 max_connections: int = 8, timeout: float = 30.0,
                 policy: RetryPolicy | None = None, stats: S3Stats | None = None,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.path_style = self.endpoint != AWS_ENDPOINT if path_style is None else path_style
        self.http = Transport(max_connections=max_connections, timeout=timeout, policy=policy,
                              stats=stats, transport=transport)

    @property
    def stats(self) -> S3Stats:
        return self.http.stats

    @property
    def policy(self) -> RetryPolicy:
        return self.http.policy

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> S3Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def url(self, bucket: str, key: str = "") -> str:
        path = urllib.parse.quote(key, safe="/~")
        if self.path_style:
            return f"{self.endpoint}/{bucket}" + (f"/{path}" if key else "")
        scheme, _, host = self.endpoint.partition("://")
        return f"{scheme}://{bucket}.{host}/{path}"

    # -- listings --

    async def list_page(self, bucket: str, prefix: str = "", *, token: str | None = None,
                        start_after: str | None = None, max_keys: int | None = None,
                        delimiter: str | None = None) -> ListPage:
        """One page of ListObjectsV2."""
        params = {"list-type": "2", "prefix": prefix}
        optional = {"continuation-token": token, "start-after": start_after,
                    "max-keys": None if max_keys is None else str(max_keys),
                    "delimiter": delimiter}
        params.update({k: v for k, v in optional.items() if v is not None})
        what = f"ListObjectsV2 {bucket}/{prefix}"
        status, _headers, body = await self.http.fetch(Request(
            "GET", self.url(bucket), "ListObjectsV2", what, params=params))
        if status != 200:
            raise error_for(status, body, what)
        return parse_list(body, what)

    async def list_objects(self, bucket: str, prefix: str = "", *,
                           max_keys: int | None = None) -> list[S3Object]:
        """Every object under `prefix`, in key order, following the pages to the end."""
        found: list[S3Object] = []
        token: str | None = None
        seen: set[str] = set()
        while True:
            page = await self.list_page(bucket, prefix, token=token, max_keys=max_keys)
            found += page.objects
            if page.next_token is None:
                return found
            if page.next_token in seen:
                raise MalformedResponse(f"ListObjectsV2 {bucket}/{prefix}: a continuation "
                                        "token came twice")
            seen.add(page.next_token)
            token = page.next_token

    # -- objects --

    async def head(self, bucket: str, key: str) -> ObjectHead:
        what = f"HeadObject {bucket}/{key}"
        status, headers, body = await self.http.fetch(Request(
            "HEAD", self.url(bucket, key), "HeadObject", what))
        if status != 200:
            raise error_for(status, body, what)
        length = headers.get("content-length", "")
        if not length.isdigit():
            raise MalformedResponse(f"{what}: no Content-Length")
        return ObjectHead(int(length), unquote_etag(headers.get("etag")),
                          headers.get("last-modified"), headers.get("content-type"))

    @asynccontextmanager
    async def open(self, bucket: str, key: str, byte_range: tuple[int, int] | None = None,
                   *, listed_size: int | None = None) -> AsyncIterator[ObjectStream]:
        """The object's bytes, or bytes start to end-1 of it with `byte_range`.
        `listed_size`: the object's size as a listing gave it, which an answer must
        agree with (ObjectStream)."""
        if byte_range is not None and not 0 <= byte_range[0] < byte_range[1]:
            raise ValueError(f"not a byte range: {byte_range}")
        stream = ObjectStream(self, bucket, key, byte_range, listed_size)
        try:
            await stream.start()
            yield stream
        finally:
            await stream.aclose()

    async def read(self, bucket: str, key: str,
                   byte_range: tuple[int, int] | None = None) -> bytes:
        async with self.open(bucket, key, byte_range) as stream:
            return b"".join([chunk async for chunk in stream.chunks()])


class ObjectStream:
    """The bytes of one GET, continued by range when the body ends early.

    After start(): `size` is how many bytes chunks() yields, `object_size` the whole
    object's size where the answer told it, `etag` its ETag.

    With the size a listing gave (an object never changes, so the listing is right), an
    answer that says the object is shorter (a 200 whose body is whole by its own
    Content-Length, but short) is continued by range like a body cut short, and one
    that says it is longer is refused: no reader gets a file cut or grown.
    """

    def __init__(self, client: S3Client, bucket: str, key: str,
                 byte_range: tuple[int, int] | None, listed_size: int | None = None
                 ) -> None:
        self._client = client
        self.bucket, self.key = bucket, key
        self.what = f"GetObject {bucket}/{key}"
        self._start = byte_range[0] if byte_range else 0
        self._asked_end = byte_range[1] if byte_range else None  # exclusive
        self.position = self._start  # the next byte to yield
        self.end: int | None = None  # exclusive; None: until the body ends
        self.object_size: int | None = None
        self.etag: str | None = None
        self._opened: Opened | None = None
        self._skip = 0  # bytes of the current body before `position` (a 200 to a range)
        self._body_end: int | None = None  # exclusive end of what the current body holds
        self._listed_size = listed_size

    @property
    def size(self) -> int | None:
        return None if self.end is None else self.end - self._start

    async def start(self) -> None:
        await self._request(self._start, self._asked_end, first=True)

    async def aclose(self) -> None:
        if self._opened is not None:
            await self._opened.aclose()
            self._opened = None

    async def _request(self, start: int, end: int | None, first: bool) -> None:
        headers = {"Accept-Encoding": "identity"}
        if start or end is not None:
            headers["Range"] = f"bytes={start}-" + ("" if end is None else str(end - 1))
        if not first and self.etag:
            headers["If-Match"] = f'"{self.etag}"'
        opened = await self._client.http.open(Request(
            "GET", self._client.url(self.bucket, self.key), "GetObject", self.what,
            headers=headers))
        if opened.status not in (200, 206):
            body = await opened.read_capped()
            await opened.aclose()
            raise error_for(opened.status, body, self.what)
        self._opened = opened
        try:
            self._take(opened.response, start, end, first)
        except BaseException:
            await self.aclose()
            raise

    def _take(self, response: httpx.Response, start: int, end: int | None, first: bool) -> None:
        """Where the answer's body lies in the object, checked against what was asked."""
        etag = unquote_etag(response.headers.get("etag"))
        if not first and self.etag and etag and etag != self.etag:
            raise TruncatedStream(f"{self.what}: the object changed while it was read")
        self.etag = self.etag or etag
        length = response.headers.get("content-length")
        if response.status_code == 200:  # the whole object, whatever was asked
            if length is None or not length.isdigit():
                raise MalformedResponse(f"{self.what}: 200 without a Content-Length")
            self.object_size = int(length)
            self._skip, body_end = start, int(length)
        else:
            last_byte, total = self._content_range(response, start, end)
            self._skip, body_end = 0, last_byte + 1
            self.object_size = total if total is not None else self.object_size
        self._body_end = body_end
        self._check_listed_size()
        if first:
            limit = self.object_size if self.object_size is not None else body_end
            self.end = max(start, limit if end is None else min(end, limit))

    def _check_listed_size(self) -> None:
        listed, told = self._listed_size, self.object_size
        if listed is None or told is None or told == listed:
            return
        if told > listed:
            raise MalformedResponse(f"{self.what}: the answer gives the object {told} "
                                    f"bytes, the listing {listed}")
        self.object_size = listed  # a short answer: chunks() asks for the rest by range

    def _content_range(self, response: httpx.Response, start: int,
                       end: int | None) -> tuple[int, int | None]:
        """The last byte a 206 holds, and the object's size if it says."""
        match = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
        if match is None:
            raise MalformedResponse(f"{self.what}: 206 without a usable Content-Range")
        first_byte, last_byte = int(match[1]), int(match[2])
        total = None if match[3] == "*" else int(match[3])
        length = response.headers.get("content-length")
        if first_byte != start or last_byte < first_byte or (end is not None and last_byte >= end) \
                or (length is not None and length.isdigit()
                    and int(length) != last_byte - first_byte + 1):
            raise MalformedResponse(f"{self.what}: Content-Range {match[0]} does not fit "
                                    f"the range asked for, from {start}")
        return last_byte, total

    async def chunks(self) -> AsyncIterator[bytes]:
        """The bytes in order; continues a body that ends early by range, up to the
        policy's retries, then TruncatedStream."""
        resumes = 0
        while True:
            cut: str | None = None
            try:
                async for chunk in self._current():
                    yield chunk
            except httpx.RequestError as exc:
                cut = f"body cut short ({type(exc).__name__})"
            if self.end is not None and self.position >= self.end:
                return
            if self.end is None and cut is None:
                return  # the length was never known: the body's end is the end
            cut = cut or f"the answer ended at byte {self.position}, before {self.end}"
            if resumes >= self._client.policy.retries:
                raise TruncatedStream(f"{self.what}: {cut} (after {resumes} resumes)")
            await self.aclose()
            await trio.sleep(self._client.policy.backoff.delay(resumes))
            resumes += 1
            self._client.stats.resumes += 1
            await self._request(self.position, self.end, first=False)

    async def _current(self) -> AsyncIterator[bytes]:
        """What the current answer holds from `position` on, up to `end`."""
        if self._opened is None:
            return
        stop = self.end if self.end is not None else self._body_end
        async for chunk in self._opened.response.aiter_bytes():
            if self._skip:
                dropped = min(self._skip, len(chunk))
                chunk, self._skip = chunk[dropped:], self._skip - dropped
            if stop is not None:
                chunk = chunk[:max(0, stop - self.position)]
            if chunk:
                self.position += len(chunk)
                yield chunk
            if stop is not None and self.position >= stop:
                if stop == self._body_end:
                    # All the answer held: read on to its end, which yields nothing, so
                    # that its connection goes back to the pool instead of being closed.
                    continue
                return
