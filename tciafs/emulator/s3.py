"""An S3-compatible server for the IDC side of the archive: anonymous, read-only.

It answers as S3 answers an anonymous reader of a public bucket (docs/idc.md):

* ``GET /<bucket>?list-type=2&prefix=&delimiter=&max-keys=&continuation-token=&start-after=``:
  ListObjectsV2, keys in UTF-8 order, at most 1,000 a page;
* ``GET /<bucket>/<key>``, with or without ``Range: bytes=a-b | a- | -n``: 200 with the
  object, or 206 with ``Content-Range``; ``HEAD`` the same headers without a body;
* errors as S3's XML: NoSuchBucket and NoSuchKey (404), InvalidRange (416),
  InvalidArgument (400), AccessDenied (403) for every method but GET and HEAD and for
  listing the buckets, NotImplemented (501) for other list and bucket requests; injected
  503s are SlowDown, injected 500s InternalError.

Buckets are addressed path-style (``/<bucket>/<key>``), or virtual-host style when the
Host header starts with a bucket's name (``idc-open-data.s3.localhost:PORT``).
Faults and shaping are the server's, as on the NBIA side; of the content faults,
``pshort`` ends a 206 early but well-formed (its Content-Range says so), and ``pcorrupt``
changes the last byte a GET sends.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import re
import secrets
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from tciafs.emulator.context import Context, Request
from tciafs.emulator.downloads import CONTENT_FAULTS
from tciafs.emulator.faults import FaultPlan, damaged
from tciafs.emulator.idc import Holdings, StoredObject, holdings_for
from tciafs.emulator.idccatalog import Catalog
from tciafs.emulator.model import Archive
from tciafs.emulator.service import Route
from tciafs.emulator.wire import Reply, Sink

XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
PAGE_KEYS = 1000  # the most keys one ListObjectsV2 page holds
CATALOG_PATH = "/_emulator/idc/"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


# --- replies -----------------------------------------------------------------------------

def _xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8",
                                                                    xml_declaration=False)


def _request_id() -> str:
    return secrets.token_hex(8).upper()


def error(status: int, code: str, message: str, **fields: str) -> Reply:
    """An S3 error document: Code, Message, what it concerns, RequestId."""
    request_id = _request_id()
    root = ET.Element("Error")
    for name, value in (("Code", code), ("Message", message), *fields.items(),
                        ("RequestId", request_id)):
        ET.SubElement(root, name).text = value
    return Reply(status, _xml(root), "application/xml",
                 [("x-amz-request-id", request_id)])


def _slow_down() -> Reply:
    return error(503, "SlowDown", "Please reduce your request rate.")


def _internal_error() -> Reply:
    return error(500, "InternalError", "We encountered an internal error. Please try again.")


def _access_denied() -> Reply:
    return error(403, "AccessDenied", "Access Denied")


def _no_such_bucket(bucket: str) -> Reply:
    return error(404, "NoSuchBucket", "The specified bucket does not exist.",
                 BucketName=bucket)


# --- ListObjectsV2 -----------------------------------------------------------------------

class _BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class ListQuery:
    prefix: str = ""
    delimiter: str = ""
    start_after: str = ""
    token: str | None = None  # as sent
    after: str | None = None  # the last key or common prefix the token's page ended with
    max_keys: int = PAGE_KEYS
    url_encoded: bool = False

    @classmethod
    def parse(cls, req: Request) -> ListQuery:
        raw_max = req.q("max-keys")
        try:
            max_keys = PAGE_KEYS if raw_max is None else int(raw_max)
        except ValueError:
            raise _BadRequest("Provided max-keys not an integer or within integer range"
                              ) from None
        if max_keys < 0:
            raise _BadRequest("Argument maxKeys must be an integer between 0 and 2147483647")
        encoding = req.q("encoding-type")
        if encoding not in (None, "url"):
            raise _BadRequest("Invalid Encoding Method specified in Request")
        token = req.q("continuation-token")
        return cls(prefix=req.q("prefix") or "", delimiter=req.q("delimiter") or "",
                   start_after=req.q("start-after") or "", token=token,
                   after=None if token is None else _token_key(token),
                   max_keys=min(max_keys, PAGE_KEYS), url_encoded=encoding == "url")


def _token(after: str) -> str:
    return base64.urlsafe_b64encode(after.encode("utf-8")).decode("ascii")


def _token_key(token: str) -> str:
    try:
        key = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True)
        if key:
            return key.decode("utf-8")
    except (ValueError, binascii.Error, UnicodeError):
        pass
    raise _BadRequest("The continuation token provided is incorrect")


def _rolled(key: str, q: ListQuery) -> str | None:
    """The common prefix `key` rolls up into under the delimiter, if it does."""
    if not q.delimiter:
        return None
    at = key.find(q.delimiter, len(q.prefix))
    return None if at < 0 else key[:at + len(q.delimiter)]


def _all_before(prefix: str, marker: str) -> bool:
    """Whether every key that starts with `prefix` sorts at or before `marker`."""
    return marker > prefix and not marker.startswith(prefix)


def entries(holdings: Holdings, bucket: str, q: ListQuery) -> Iterator[StoredObject | str]:
    """The listing's objects and common prefixes (str), in order, after the start."""
    last_rolled: str | None = None
    for series in holdings.series_in(bucket):
        p = series.prefix
        if not (p.startswith(q.prefix) or q.prefix.startswith(p)):
            continue
        if _all_before(p, q.start_after) or (q.after is not None and _all_before(p, q.after)):
            continue
        whole = _rolled(p, q)
        if whole is not None and not q.start_after.startswith(p):
            # The whole series folds into one common prefix: no need to list its objects.
            if whole != last_rolled and (q.after is None or whole > q.after):
                last_rolled = whole
                yield whole
            continue
        for obj in holdings.objects(series):
            if not obj.key.startswith(q.prefix) or obj.key <= q.start_after:
                continue
            rolled = _rolled(obj.key, q)
            name = rolled or obj.key
            if (q.after is not None and name <= q.after) or (rolled and rolled == last_rolled):
                continue
            last_rolled = rolled
            yield rolled or obj


def _timestamp(obj: StoredObject) -> str:
    return obj.last_modified.strftime("%Y-%m-%dT%H:%M:%S.000Z")


def list_objects(holdings: Holdings, bucket: str, q: ListQuery) -> Reply:
    page: list[StoredObject | str] = []
    truncated = False
    for item in entries(holdings, bucket, q) if q.max_keys else ():  # max-keys=0: nothing
        if len(page) == q.max_keys:
            truncated = True
            break
        page.append(item)
    def enc(text: str) -> str:
        return urllib.parse.quote(text, safe="/") if q.url_encoded else text

    root = ET.Element("ListBucketResult", xmlns=XMLNS)

    def add(parent: ET.Element, name: str, text: str) -> None:
        ET.SubElement(parent, name).text = text

    add(root, "Name", bucket)
    add(root, "Prefix", enc(q.prefix))
    if q.token is not None:
        add(root, "ContinuationToken", q.token)
    if truncated:
        last = page[-1]
        add(root, "NextContinuationToken", _token(last if isinstance(last, str) else last.key))
    add(root, "KeyCount", str(len(page)))
    add(root, "MaxKeys", str(q.max_keys))
    if q.delimiter:
        add(root, "Delimiter", enc(q.delimiter))
    if q.url_encoded:
        add(root, "EncodingType", "url")
    add(root, "IsTruncated", "true" if truncated else "false")
    if q.start_after:
        add(root, "StartAfter", enc(q.start_after))
    for item in page:
        if isinstance(item, str):
            continue
        contents = ET.SubElement(root, "Contents")
        add(contents, "Key", enc(item.key))
        add(contents, "LastModified", _timestamp(item))
        add(contents, "ETag", f'"{item.md5}"')
        add(contents, "Size", str(item.size))
        add(contents, "StorageClass", "STANDARD")
    for item in page:
        if isinstance(item, str):
            add(ET.SubElement(root, "CommonPrefixes"), "Prefix", enc(item))
    return Reply(200, _xml(root), "application/xml", [("x-amz-request-id", _request_id())])


# --- objects -----------------------------------------------------------------------------

class _Unsatisfiable(ValueError):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive (first, last) byte a Range header asks for, clamped to the object;
    None when there is none or it is not one S3 honours (several ranges, bad syntax):
    then the whole object is sent. _Unsatisfiable when it starts past the end."""
    match = _RANGE.fullmatch(header.strip()) if header else None
    if match is None or match[1] == match[2] == "":
        return None
    if match[1] == "":  # the last n bytes
        n = int(match[2])
        if n == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - n), size - 1
    first = int(match[1])
    if match[2] and int(match[2]) < first:
        return None  # not a valid range: ignored
    if first >= size:
        raise _Unsatisfiable
    return first, min(int(match[2]), size - 1) if match[2] else size - 1


def _window(chunks: Iterator[bytes], first: int, last: int) -> Iterator[bytes]:
    """Bytes first..last (inclusive) of a stream of chunks."""
    offset = 0
    for chunk in chunks:
        end = offset + len(chunk)
        if end > first and offset <= last:
            yield chunk[max(0, first - offset):last + 1 - offset]
        if end > last:
            return
        offset = end


def _object_headers(obj: StoredObject) -> list[tuple[str, str]]:
    return [("Accept-Ranges", "bytes"), ("ETag", f'"{obj.md5}"'),
            ("Last-Modified", email.utils.format_datetime(obj.last_modified, usegmt=True)),
            ("x-amz-request-id", _request_id())]


def get_object(ctx: Context, req: Request, obj: StoredObject) -> Reply:
    """GET or HEAD of one object, whole or a range of it."""
    try:
        window = parse_range(req.headers.get("range"), obj.size)
    except _Unsatisfiable:
        reply = error(416, "InvalidRange", "The requested range is not satisfiable",
                      RangeRequested=req.headers.get("range", ""),
                      ActualObjectSize=str(obj.size))
        reply.headers.append(("Content-Range", f"bytes */{obj.size}"))
        return reply
    headers = _object_headers(obj)
    first, last = window if window is not None else (0, obj.size - 1)
    faults = CONTENT_FAULTS.get() if req.method == "GET" else None
    if window is not None and faults is not None:
        kept = faults.kept(last - first + 1)
        if kept is not None and 0 < kept <= last - first:
            ctx.stats.fault(ctx.host, "short")
            last = first + kept - 1
    if window is not None:
        headers.append(("Content-Range", f"bytes {first}-{last}/{obj.size}"))
    corrupt = faults is not None and faults.strikes()
    if corrupt:
        ctx.stats.fault(ctx.host, "corrupt")
    series = obj.series

    def stream(sink: Sink) -> None:
        chunks = series.archive.iter_instance_chunks(series.record.series_instance_uid,
                                                     obj.sop_instance_uid)
        body = _window(iter(chunks), first, last)
        for chunk in damaged(body) if corrupt else body:
            sink(chunk)

    length = last - first + 1
    return Reply(206 if window is not None else 200, content_type="application/dicom",
                 headers=headers, stream=stream, length=length, size_hint=length)


# --- routing -----------------------------------------------------------------------------

def _address(req: Request, buckets: Collection[str]) -> tuple[str, str]:
    """(bucket, key) of a request, virtual-host style or path-style; bucket "" for /."""
    host = req.headers.get("host", "")
    name = host if host.startswith("[") else host.rsplit(":", 1)[0]  # [::1]: no bucket
    label, dot, _rest = name.partition(".")
    if dot and label in buckets:
        return label, req.path.lstrip("/")
    bucket, _, key = req.path.lstrip("/").partition("/")
    return bucket, key


class S3Service:
    """The S3 server's routes over what IDC holds of the archive, and its catalog."""

    def __init__(self, holdings: Holdings) -> None:
        self.holdings = holdings
        self.catalog = Catalog(holdings)

    @classmethod
    def for_archive(cls, archive: Archive) -> S3Service:
        return cls(holdings_for(archive))

    def route(self, ctx: Context, req: Request) -> Route:
        bucket, key = _address(req, self.holdings.buckets)
        if req.method not in ("GET", "HEAD"):
            return Route(req.method, f"s3/{req.method}", _access_denied)
        if not bucket:
            return Route("ListBuckets", "s3/ListBuckets", _access_denied)
        if bucket not in self.holdings.buckets:
            name = "GetObject" if key else "ListObjectsV2"
            return Route(name, f"s3/{name}", lambda: _no_such_bucket(bucket))
        if key:
            name = "GetObject" if req.method == "GET" else "HeadObject"
            return Route(name, f"s3/{name}", lambda: self._object(ctx, req, bucket, key))
        if req.q("list-type") == "2":
            return Route("ListObjectsV2", "s3/ListObjectsV2", lambda: self._list(req, bucket))
        return Route("ListObjects", "s3/ListObjects", lambda: error(
            501, "NotImplemented", "Only ListObjectsV2 (list-type=2) is emulated.",
            BucketName=bucket))

    def _object(self, ctx: Context, req: Request, bucket: str, key: str) -> Reply:
        obj = self.holdings.find(bucket, key)
        if obj is None:
            return error(404, "NoSuchKey", "The specified key does not exist.", Key=key)
        return get_object(ctx, req, obj)

    def _list(self, req: Request, bucket: str) -> Reply:
        try:
            query = ListQuery.parse(req)
        except _BadRequest as exc:
            return error(400, "InvalidArgument", str(exc))
        return list_objects(self.holdings, bucket, query)

    def fault_reply(self, plan: FaultPlan) -> Reply | None:
        if plan.status == 503:
            return _slow_down()
        if plan.status == 404:  # as for an object deleted after it was listed
            return error(404, "NoSuchKey", "The specified key does not exist.")
        return _internal_error() if plan.status == 500 else None

    def crash_reply(self, exc: Exception) -> Reply:
        return _internal_error()

    def control(self, ctx: Context, req: Request) -> Reply | None:
        if not req.path.startswith(CATALOG_PATH):
            return None
        return self.catalog.reply(req.path[len(CATALOG_PATH):])
