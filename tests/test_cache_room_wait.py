"""A cache too small for every download at once: a download that finds the room held by
other downloads waits for them to free it instead of failing; two that outgrow the room
together both finish without waiting out the idle limit; one that waits on a download that
never ends gives up after it, with a clear error.

The tests run on trio's autojump clock (pytest-trio's `autojump_clock`): waits take no
real time, and the time a test waited is exact, so "did not wait out ROOM_IDLE" is a
statement of logic, not of speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio.testing

from tciafs.cache import META_SLACK, Cache, CacheFull
from tciafs.cache.space import ROOM_IDLE

DEFAULT_TIER = "handler"  # the Cache's own space and tmp files, no server


def _small_cache(tmp_path: Path, room: int) -> Cache:
    probe = Cache(tmp_path / "probe", 1 << 30, None)
    overhead = probe.used_bytes + META_SLACK
    probe.close()
    return Cache(tmp_path / "c", overhead + room, None)


async def _download(cache: Cache, size: int, parts: int, events: list[str], name: str,
                    between: trio.Event | None = None) -> None:
    """Write `size` bytes in `parts` chunks to a tmp file, as a download does; wait for
    `between` after the first chunk; then drop the file (its room comes back)."""
    with cache.space.reservation("series", None) as room:
        tmp = cache.store.tmpfile(room)
        try:
            for i in range(parts):
                await tmp.write(b"x" * (size // parts))
                if i == 0 and between is not None:
                    events.append(f"{name} waits")
                    await between.wait()
            events.append(f"{name} wrote")
        except CacheFull:
            events.append(f"{name} full")
        finally:
            tmp.discard()


async def test_a_download_waits_for_the_room_another_frees(tmp_path: Path,
                                                          autojump_clock) -> None:
    cache = _small_cache(tmp_path, 1_000_000)
    events: list[str] = []
    go_on = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_download, cache, 800_000, 1, events, "first", go_on)
            await trio.sleep(0.05)
            nursery.start_soon(_download, cache, 800_000, 1, events, "second")
            await trio.sleep(ROOM_IDLE / 2)  # no room for the second while the first holds it
            assert events == ["first waits"]
            go_on.set()
    assert events == ["first waits", "first wrote", "second wrote"]
    assert trio.current_time() < ROOM_IDLE  # woken by the room freed, not by the limit
    assert cache.used_bytes <= cache.max_bytes
    cache.close()


async def test_two_downloads_that_outgrow_the_room_together_both_finish(
        tmp_path: Path, autojump_clock) -> None:
    cache = _small_cache(tmp_path, 1_000_000)
    events: list[str] = []
    both_begun = trio.Event()
    with trio.fail_after(30):  # each would otherwise wait for the other for ever
        async with trio.open_nursery() as nursery:
            for name in ("a", "b"):  # 400 kB each, then 400 kB more: 1.6 MB in all
                nursery.start_soon(_download, cache, 800_000, 2, events, name, both_begun)
            await trio.sleep(0.05)
            both_begun.set()
    assert sorted(events) == ["a waits", "a wrote", "b waits", "b wrote"]
    assert trio.current_time() < ROOM_IDLE  # neither waited out the limit for the other
    assert cache.used_bytes <= cache.max_bytes
    cache.close()


async def test_room_held_by_a_download_that_never_ends_is_refused_in_time(
        tmp_path: Path, autojump_clock) -> None:
    cache = _small_cache(tmp_path, 1_000_000)
    events: list[str] = []
    never = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_download, cache, 800_000, 1, events, "held", never)
            await trio.sleep(0.05)
            began = trio.current_time()
            await _download(cache, 800_000, 1, events, "late")
            assert events == ["held waits", "late full"]
            # It waited for the room, then gave up once nothing had moved for ROOM_IDLE.
            assert trio.current_time() - began == pytest.approx(ROOM_IDLE, abs=0.01)
            nursery.cancel_scope.cancel()
    cache.close()


@pytest.mark.parametrize("parts", [1, 4])
async def test_a_download_with_room_to_spare_does_not_wait(tmp_path: Path, parts: int,
                                                           autojump_clock) -> None:
    cache = _small_cache(tmp_path, 4_000_000)
    events: list[str] = []
    async with trio.open_nursery() as nursery:
        for name in ("a", "b", "c"):
            nursery.start_soon(_download, cache, 800_000, parts, events, name)
    assert sorted(events) == ["a wrote", "b wrote", "c wrote"]
    assert trio.current_time() == 0
    cache.close()


async def test_extra_downloads_start_only_while_the_cache_has_room_to_spare(
        tmp_path: Path, autojump_clock) -> None:
    """Singles beside a ZIP only speed it up: they are not started while downloads hold
    a quarter of the bound, or while one waits for room."""
    cache = _small_cache(tmp_path, 4_000_000)
    space = cache.space
    assert space.room_for_extras()
    with space.reservation("series", None) as room:
        room.take(space.max_bytes // 8)
        assert space.room_for_extras()
        room.take(space.max_bytes // 8)
        assert not space.room_for_extras()  # a quarter of the bound held
    assert space.room_for_extras()  # given back when the download ended
    # A download waiting for room, with nothing reserved: no extras either.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(space.room_freed, trio.current_time() + 10)
        await trio.testing.wait_all_tasks_blocked()
        assert not space.room_for_extras()
        nursery.cancel_scope.cancel()
    assert space.room_for_extras()
    events: list[str] = []
    go_on = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_download, cache, 3_000_000, 2, events, "first", go_on)
        await trio.sleep(0.05)
        nursery.start_soon(_download, cache, 3_000_000, 2, events, "second")
        await trio.sleep(ROOM_IDLE / 4)  # the second waits for the first's room
        assert space.wanted() and not space.room_for_extras()
        go_on.set()
    assert space.room_for_extras()
