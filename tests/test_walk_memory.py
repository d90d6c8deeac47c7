"""A walk's memory follows what is in use, not what was seen; a cold walk asks once per
directory, with listings fetched ahead of it.

The handler tests drive the real Operations, tree, catalog and cache against the
emulator's `scale` profile (1,000 series, 100,000 instances) with no mount;
pyfuse3.readdir_reply needs a kernel request, so it is replaced by a counter. The mount
test runs `find` over a real mount.
"""

from __future__ import annotations

import gc
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pyfuse3
import pytest
import trio
from cliutil import status_json

from tciafs.cache import Cache
from tciafs.catalog import ROOT_INODE, Catalog, Kind, Node
from tciafs.fs import KNOWN_TTL, UNKNOWN_TTL, Operations
from tciafs.inodes import KernelInodes
from tciafs.mount import assemble
from tciafs.sources.nbia import NbiaSource
from tciafs.tree import NODES_HELD, Tree

from conftest import EmulatorProcess
from mountutil import mounted, needs_fuse, reset_stats, stats


@pytest.fixture(autouse=True)
def _count_readdir(monkeypatch: pytest.MonkeyPatch) -> None:
    def reply(token: list, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        token.append((attr.st_ino, attr.st_mode & 0o040000 != 0))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)


@pytest.fixture
async def ops(scale_emulator: EmulatorProcess, tmp_path: Path) -> AsyncIterator[Operations]:
    client = NbiaSource(scale_emulator.url, timeout=10)
    cache = Cache(tmp_path / "cache", 1 << 30, client, prefetch=False)
    ops = assemble(client, Tree(client, Catalog(tmp_path / "catalog.sqlite", "test")),
                   cache).ops
    async with client, trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        await nursery.start(ops.tree.run)
        yield ops
        nursery.cancel_scope.cancel()


async def _walk(ops: Operations, directories: int) -> int:
    """Read `directories` directories depth first, as `find` does; the files seen."""
    files, stack = 0, [ROOT_INODE]
    while stack and directories:
        fh = await ops.opendir(stack.pop(), None)
        entries: list[tuple[int, bool]] = []
        await ops.readdir(fh, 0, entries)
        directories -= 1
        files += sum(not is_dir for _, is_dir in entries)
        stack += reversed([ino for ino, is_dir in entries if is_dir])
    return files


def _nodes_alive() -> int:
    gc.collect()
    return sum(isinstance(o, Node) for o in gc.get_objects())


@pytest.mark.handler
async def test_nodes_held_do_not_grow_with_the_walk(ops: Operations) -> None:
    before = _nodes_alive()
    small = await _walk(ops, 60)
    after_small = _nodes_alive() - before
    large = await _walk(ops, 600)
    after_large = _nodes_alive() - before
    assert large > 10 * small > 0  # the second walk saw ten times the entries ...
    assert after_large <= NODES_HELD + 64  # ... and holds no more nodes than a bound
    assert after_small <= NODES_HELD + 64
    assert large > 4 * NODES_HELD  # which is far below what it saw


@pytest.mark.handler
async def test_unfetched_sizes_are_kept_briefly_and_dropped_at_open(ops: Operations) -> None:
    await _walk(ops, 40)  # down to the first series
    series = _first_series(ops)
    fh = await ops.opendir(series.ino, None)
    entries: list[tuple[int, bool]] = []
    await ops.readdir(fh, 0, entries)
    sop = next(ino for ino, is_dir in entries if ino != _sidecar(ops, series))
    attr = await ops.getattr(sop, None)
    assert attr.st_size == 0 and attr.attr_timeout == UNKNOWN_TTL
    handle = await ops.open(sop, os.O_RDONLY, None)
    assert not ops.lookups.take_provisional(sop)  # taken by the open: the kernel was told
    attr = await ops.getattr(sop, None)
    assert attr.st_size > 0 and attr.attr_timeout == KNOWN_TTL
    assert not ops.lookups.take_provisional(sop)  # a known size is nothing to take back
    await ops.release(handle.fh)


def _first_series(ops: Operations) -> Node:
    row = ops.tree.catalog.db.execute("SELECT ino FROM nodes WHERE kind=? LIMIT 1",
                                      (int(Kind.SERIES),)).fetchone()
    node = ops.tree.node(row[0])
    assert node is not None
    return node


def _sidecar(ops: Operations, series: Node) -> int | None:
    node = ops.tree.catalog.child(series.ino, ".series.json")
    return node.ino if node is not None else None


@pytest.mark.unit
def test_kernel_inodes_count_in_a_byte_and_overflow() -> None:
    table = KernelInodes()
    table.add(5)
    table.add(5, 300)  # past a byte's count
    table.mark_provisional(5)
    assert table[5] == 301 and 5 in table and 6 not in table
    assert not table.drop(5, 200) and table[5] == 101
    assert table.take_provisional(5) and not table.take_provisional(5)
    table.mark_provisional(5)
    assert table.drop(5, 101) and 5 not in table
    assert not table.take_provisional(5)  # forgotten: nothing left to tell the kernel
    big = 1 << 62
    table.add(big)
    assert big in table and table.drop(big, 1) and big not in table
    assert len(table._bytes) < 16  # inodes are indexed, not stored: one byte each


@pytest.mark.mount
@needs_fuse
@pytest.mark.timeout(600)
def test_a_cold_walk_asks_once_per_directory_and_lists_ahead(
        scale_emulator: EmulatorProcess, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(scale_emulator, mnt, cache_dir):
        collection = sorted(p for p in mnt.iterdir() if not p.name.startswith("."))[0]
        reset_stats(scale_emulator.url)
        found = subprocess.run(["find", str(collection), "-type", "d"], capture_output=True,
                               text=True, timeout=500, check=True).stdout.splitlines()
        asked = stats(scale_emulator.url)["requests"]
        ahead = _status_listed_ahead(mnt)
    series = [p for p in found if p.count("/") - str(collection).count("/") == 3]
    assert len(series) == 100  # 10 patients, 2 studies each, 5 series each
    assert asked.get("getSOPInstanceUIDs", 0) == len(series)  # each series once
    assert sum(asked.values()) <= len(found)  # at most one request per directory
    assert ahead > len(series) // 2  # most listings were fetched ahead of the walk


def _status_listed_ahead(mnt: Path) -> int:
    return int(status_json(mnt)["listed_ahead"])
