"""An answer must agree with the size the listing gave: a 200 that is whole by its own
Content-Length but shorter than the object is continued by range, and one that makes the
object longer is refused. Against a scripted server that writes those answers."""

from __future__ import annotations

import httpx
import pytest

from tciafs.backoff import Backoff
from tciafs.sources.base import MalformedResponse
from tciafs.sources.idc import RetryPolicy, S3Client

from scripted_server import ScriptedServer

BUCKET = "idc-open-data"
QUICK = RetryPolicy(retries=3, backoff=Backoff(base=0.001, cap=0.01, jitter=1.0), deadline=30)
BODY = bytes(range(256)) * 4


def short_whole_then_ranges(request: httpx.Request) -> httpx.Response:
    """A whole-object GET gets its first 300 bytes as a complete 200; ranges are right."""
    spec = request.headers.get("range")
    if spec is None:
        return httpx.Response(200, content=BODY[:300], headers={"ETag": '"e"'})
    first = int(spec.removeprefix("bytes=").partition("-")[0])
    return httpx.Response(206, content=BODY[first:], headers={
        "ETag": '"e"', "Content-Range": f"bytes {first}-{len(BODY) - 1}/{len(BODY)}"})


async def test_a_short_whole_200_is_continued_to_the_listed_size() -> None:
    with ScriptedServer(short_whole_then_ranges) as url:
        async with S3Client(url, policy=QUICK) as s3:
            # Without the listing's size, the answer is taken at its word...
            assert await s3.read(BUCKET, "a/b.dcm") == BODY[:300]
            async with s3.open(BUCKET, "a/b.dcm", listed_size=len(BODY)) as stream:
                got = b"".join([c async for c in stream.chunks()])
            # ... with it, the rest is asked for by range.
            assert got == BODY and stream.size == len(BODY)
            assert s3.stats.resumes == 1


async def test_an_answer_longer_than_the_listing_is_refused() -> None:
    def longer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=BODY, headers={"ETag": '"e"'})

    with ScriptedServer(longer) as url:
        async with S3Client(url, policy=QUICK) as s3:
            with pytest.raises(MalformedResponse, match="the listing 1000"):
                async with s3.open(BUCKET, "a/b.dcm", listed_size=1000):
                    pass
