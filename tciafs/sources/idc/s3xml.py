"""The XML documents of S3 that tciafs reads: a ListObjectsV2 page and an error.

Element names are compared without their namespace: S3 puts its listing in
http://s3.amazonaws.com/doc/2006-03-01/ and its errors in none, and other
implementations vary. A document that declares a DTD is refused before parsing: S3
never sends one, and entity expansion is the usual way to make an XML parser suffer.
"""

from __future__ import annotations

import re
import urllib.parse
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from tciafs.sources.base import MalformedResponse

_ETAG_MD5 = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True, slots=True)
class S3Object:
    """One key of a listing."""

    key: str
    size: int
    etag: str | None = None  # as sent, quotes removed
    last_modified: str | None = None  # ISO 8601, as sent

    @property
    def md5(self) -> str | None:
        """The MD5 of the bytes, where the ETag is one: an object stored in one piece has
        its MD5 as ETag, one uploaded in parts "<md5 of the parts' md5s>-<parts>"."""
        return self.etag if self.etag and _ETAG_MD5.fullmatch(self.etag) else None


@dataclass(frozen=True, slots=True)
class ListPage:
    """One page of ListObjectsV2."""

    objects: list[S3Object]
    prefixes: list[str]  # CommonPrefixes, with a delimiter
    next_token: str | None  # NextContinuationToken: None on the last page


@dataclass(frozen=True, slots=True)
class S3ErrorDoc:
    code: str  # "NoSuchKey", "SlowDown", ...; "" when the body is not S3's error XML
    message: str


def unquote_etag(value: str | None) -> str | None:
    return value.strip().strip('"') if value else None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse(body: bytes, what: str) -> ET.Element:
    head = body[:1024].upper()
    if b"<!DOCTYPE" in head or b"<!ENTITY" in body.upper():
        raise MalformedResponse(f"{what}: the XML declares a DTD, which S3 never sends")
    try:
        return ET.fromstring(body)
    except ET.ParseError as exc:
        raise MalformedResponse(f"{what}: not XML ({exc})") from None


def _child_text(element: ET.Element, name: str) -> str | None:
    for child in element:
        if _local(child.tag) == name:
            return child.text or ""
    return None


def _children(element: ET.Element, name: str) -> list[ET.Element]:
    return [child for child in element if _local(child.tag) == name]


def parse_list(body: bytes, what: str) -> ListPage:
    """A ListObjectsV2 page; MalformedResponse when it is not one."""
    root = _parse(body, what)
    if _local(root.tag) != "ListBucketResult":
        raise MalformedResponse(f"{what}: {_local(root.tag)} where ListBucketResult belongs")
    decode = urllib.parse.unquote if _child_text(root, "EncodingType") == "url" else str
    objects = []
    for contents in _children(root, "Contents"):
        key, size = _child_text(contents, "Key"), _child_text(contents, "Size")
        if key is None or size is None or not size.strip().isdigit():
            raise MalformedResponse(f"{what}: an entry without a key or a size")
        objects.append(S3Object(decode(key), int(size), unquote_etag(_child_text(contents, "ETag")),
                                _child_text(contents, "LastModified")))
    prefixes = [decode(_child_text(p, "Prefix") or "") for p in _children(root, "CommonPrefixes")]
    truncated = (_child_text(root, "IsTruncated") or "").strip().lower() == "true"
    token = _child_text(root, "NextContinuationToken") if truncated else None
    if truncated and not token:
        raise MalformedResponse(f"{what}: a truncated page without a NextContinuationToken")
    return ListPage(objects, prefixes, token)


def parse_error(body: bytes) -> S3ErrorDoc:
    """The Code and Message of an S3 error body; empty strings where there are none."""
    try:
        root = _parse(body, "error")
    except MalformedResponse:
        text = body.decode("utf-8", "replace").strip()
        return S3ErrorDoc("", (text.splitlines() or [""])[0][:200])
    if _local(root.tag) != "Error":
        return S3ErrorDoc("", "")
    return S3ErrorDoc((_child_text(root, "Code") or "").strip(),
                      (_child_text(root, "Message") or "").strip()[:200])
