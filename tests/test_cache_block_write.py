"""A block's file is written in one worker-thread job (Store.put_block): whole and in
place under its name afterwards, nothing left in tmp/, and tmp/ made again when a
cleaner of old, empty directories took it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tciafs.cache import Cache
from tciafs.cache.blocks import block_path

DEFAULT_TIER = "handler"  # the Cache's own store, no server


def _never() -> None:
    raise AssertionError("the disk is not full: no room should be made")


async def test_a_block_is_written_whole_under_its_name(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, None)
    data = os.urandom(16 << 10)
    final = block_path(cache.store.root, "1.2.3.4", 0)
    await cache.store.put_block(data, final, _never)
    assert final.read_bytes() == data
    assert os.stat(final).st_mode & 0o777 == 0o600
    assert os.listdir(cache.store.root / "tmp") == []
    cache.close()


async def test_tmp_taken_by_a_cleaner_is_made_again(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, None)
    shutil.rmtree(cache.store.root / "tmp")
    data = b"block" * 1000
    final = block_path(cache.store.root, "1.2.3.5", 3)
    await cache.store.put_block(data, final, _never)
    assert final.read_bytes() == data
    assert (cache.store.root / "tmp").is_dir()
    assert os.stat(cache.store.root / "tmp").st_mode & 0o777 == 0o700
    cache.close()
