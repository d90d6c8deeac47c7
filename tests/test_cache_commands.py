"""The cache commands and prefetch jobs, through the CLI and real mounts: jobs that wait out
an outage, start their series a few at a time, go on after a killed daemon and end for
good with `clear`; a followed prefetch stopped by Ctrl-C, cut off by an unmount, or too
large for the cache; pin, unpin, stats and clear."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from cacheutil import _cli, _present, _series, _sops, _truth, _with_cache
from cliutil import start_tciafs, status_json, status_text

from tciafs.cache import Cache
from tciafs.catalog import Kind, Node
from tciafs.control import Control
from tciafs.sources.nbia import NbiaSource

from mountutil import lazy_unmount, mounted, needs_fuse, reset_stats, set_faults, stats

DEFAULT_TIER = "handler"  # the Cache against the emulator; marked tests mount


@pytest.mark.unit
def test_finished_prefetch_jobs_are_forgotten_beyond_the_last_twenty(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache", 100 << 20)
    control = Control(tree=None, cache=cache)  # type: ignore[arg-type]  # unused here
    cache._mark_complete("done", "C")
    for uid in ("running", "failing"):  # fetches under way: a job does not restart them
        cache._series_tasks[uid] = trio.Event()

    def series(uid: str) -> Node:
        return Node(0, 0, uid, Kind.SERIES, uid, "C", uid)

    running = control._start_job("/m/running", [series("running")])
    failing = control._start_job("/m/failing", [series("failing")])
    ids = [control._start_job(f"/m/{i}", [series("done")]) for i in range(40)]
    assert list(control.jobs) == [running, failing, *ids[-20:]]  # unfinished jobs stay
    cache.failed_series["failing"] = "503"  # now it has ended, if badly
    ids.append(control._start_job("/m/last", [series("done")]))
    assert list(control.jobs) == [running, *ids[-20:]]
    assert control.progress()[str(running)]["series_done"] == 0
    cache.close()


async def test_a_prefetch_job_waits_out_an_outage(emulator, tmp_path: Path) -> None:
    """A series that failed because the service did (503 here; a network gone the same)
    is fetched again later; one the service refuses (an unknown UID) fails at once."""
    uid, other = (row["SeriesInstanceUID"] for row in _series(emulator.url)[2:4])

    def series(ident: str) -> Node:
        return Node(0, 0, ident, Kind.SERIES, ident, "Demo-Lung CT_2024", ident)

    async def progress(control: Control, job: int, until) -> dict:  # noqa: ANN001
        with trio.fail_after(30):
            while not until(doc := control.progress()[str(job)]):
                await trio.sleep(0.05)
        return doc

    set_faults(emulator.url, p503=1.0, endpoints=["getImage"])
    try:
        async with (NbiaSource(emulator.url, nlst_server=None, timeout=10,
                               retries=0) as client, trio.open_nursery() as nursery):
            cache = Cache(tmp_path / "c", 1 << 30, client)
            patient = Control(tree=None, cache=cache, retry_first=0.3,  # type: ignore[arg-type]
                              retry_max=0.6, retry_for=60)
            await nursery.start(cache.run)
            await nursery.start(patient.run_jobs)
            job = patient._start_job("t", [series(uid), series(other)])
            doc = await progress(patient, job, lambda d: d["series_waiting"] == 2)
            assert doc["series_failed"] == 0 and "503" in doc["waiting_reason"]
            assert doc["retry_at"] is not None
            first = dict(patient.jobs[job].fetches)
            # One series goes first; while it fails again, the other is not asked for.
            with trio.fail_after(30):
                while patient.jobs[job].fetches[uid] is first[uid] or patient._state(
                        patient.jobs[job], uid) != "waiting":
                    await trio.sleep(0.05)
            assert patient.jobs[job].fetches[other] is first[other]
            set_faults(emulator.url)  # the service is back
            doc = await progress(patient, job, lambda d: d["series_done"] == 2)
            assert doc["series_waiting"] == 0 and cache.series_complete(other)

            job = patient._start_job("t", [series("1.2.840.99.1")])  # no such series
            doc = await progress(patient, job, lambda d: d["series_failed"] == 1)
            assert doc["series_waiting"] == 0

            set_faults(emulator.url, p503=1.0, endpoints=["getImage"])
            cache.clear(uid)
            hasty = Control(tree=None, cache=cache, retry_first=0.3,  # type: ignore[arg-type]
                            retry_for=0.1)
            hasty._nursery = patient._nursery
            job = hasty._start_job("t", [series(uid)])
            doc = await progress(hasty, job, lambda d: d["series_failed"] == 1)
            assert doc["series_waiting"] == 0  # out of patience: failed for good
            nursery.cancel_scope.cancel()
        cache.close()
    finally:
        set_faults(emulator.url)


async def test_a_job_starts_its_series_a_few_at_a_time(emulator, client,
                                                      tmp_path: Path) -> None:
    """A task per series waiting its turn costs about 4 kB: a job of 200,000 series would
    hold 800 MB before fetching anything."""
    from tciafs import control as control_module

    cache = Cache(tmp_path / "c", 1 << 30, client)
    control = Control(tree=None, cache=cache)  # type: ignore[arg-type]  # unused here
    series = [Node(0, 0, f"1.2.840.99.{n}", Kind.SERIES, f"1.2.840.99.{n}",
                   "Demo-Lung CT_2024", f"1.2.840.99.{n}") for n in range(60)]
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run)
        await nursery.start(control.run_jobs)
        slots = [object() for _ in range(4)]
        for slot in slots:  # every fetch started waits for its turn
            await cache._series_limiter.acquire_on_behalf_of(slot)
        job = str(control._start_job("t", series))
        await trio.sleep(0.2)
        assert len(cache._series_tasks) == control_module.JOB_WINDOW
        for slot in slots:
            cache._series_limiter.release_on_behalf_of(slot)
        with trio.fail_after(60):  # unknown series fail at once, the rest follow in turn
            while control.progress()[job]["series_failed"] < len(series):
                assert len(cache._series_tasks) <= control_module.JOB_WINDOW
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    cache.close()


@needs_fuse
@pytest.mark.mount
def test_a_prefetch_left_by_a_killed_daemon_goes_on_at_the_next_mount(emulator,
                                                                      tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    set_faults(emulator.url, bandwidth=1_000_000, endpoints=["getImage"])  # 21 MB: ~20 s
    try:
        with mounted(emulator, mnt, cache_dir) as daemon:
            series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
            target = str(series.relative_to(mnt))
            assert _cli("prefetch", "--no-wait", str(series)).returncode == 0
            deadline = time.monotonic() + 30
            while not _present(cache_dir, series):  # under way
                assert time.monotonic() < deadline
                time.sleep(0.1)
            daemon.kill()  # a crash, an OOM kill, a reboot
            daemon.wait()
            lazy_unmount(mnt)
    finally:
        set_faults(emulator.url)
    left = json.loads(_cli("stats", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert [(j["command"], j["target"]) for j in left["unfinished_jobs"]] == [
        ("prefetch", target)]
    assert f"prefetch  {target}  (since " in _cli("stats", "--cache-dir", str(cache_dir)).stdout
    count = len(_truth(emulator.url, uid))
    with mounted(emulator, mnt, cache_dir):  # nobody asks again: the mount goes on by itself
        deadline = time.monotonic() + 60
        while _present(cache_dir, series) < count:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        jobs = status_json(mnt)["jobs"]
        assert [j["target"] for j in jobs.values()] == [target]
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert f"prefetch of {target}, left unfinished by the last mount, goes on" in log
    with mounted(emulator, mnt, cache_dir):  # it ended: nothing to take up any more
        status = status_json(mnt)
        assert status["jobs"] == {}
    left = json.loads(_cli("stats", "--json", "--cache-dir", str(cache_dir)).stdout)
    assert left["unfinished_jobs"] == []


@needs_fuse
@pytest.mark.mount
@pytest.mark.parametrize("what", ["the series", "its UID", "everything",
                                  "the series, unmounted", "everything, unmounted"])
def test_clear_ends_a_prefetch_for_good(emulator, tmp_path: Path, what: str) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    set_faults(emulator.url, bandwidth=1_000_000, endpoints=["getImage"])
    try:
        with mounted(emulator, mnt, cache_dir):
            series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
            assert _cli("prefetch", "--no-wait", str(series)).returncode == 0
            if not what.endswith("unmounted"):
                named = {"the series": [str(series)], "its UID": [uid]}.get(what, [])
                # A job started by path, ended by UID too. --mount: other mounts may run
                # on this machine (the demo), and "everything" means all of theirs too.
                clear = _cli("clear", "--mount", str(mnt), *named)
                assert clear.returncode == 0, clear.stderr
        if what.endswith("unmounted"):  # the job was cut short: stored for the next mount
            clear = _cli("clear", "--cache-dir", str(cache_dir),
                         *([uid] if what.startswith("the series") else []))
            assert clear.returncode == 0, clear.stderr
    finally:
        set_faults(emulator.url)
    with mounted(emulator, mnt, cache_dir):
        status = status_json(mnt)
        assert status["jobs"] == {}
    assert "left unfinished by the last mount" not in (tmp_path / "mnt-daemon.log").read_text()


@contextlib.contextmanager
def _slow_prefetch(emulator, mnt: Path, cache_dir: Path  # noqa: ANN001
                   ) -> Iterator[subprocess.Popen]:
    """`cache prefetch` of the largest lung series at 500 kB/s (21 MB: about 40 s),
    yielded once under way."""
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    series = next(mnt.glob(f"Demo-Lung CT_2024/*/*/{uid}"))
    set_faults(emulator.url, bandwidth=500_000)
    try:
        follower = start_tciafs("cache", "prefetch", str(series), stderr=subprocess.PIPE,
                                text=True)
        deadline = time.monotonic() + 30
        while not _present(cache_dir, series):
            assert time.monotonic() < deadline and follower.poll() is None
            time.sleep(0.1)
        yield follower
    finally:
        set_faults(emulator.url)


@needs_fuse
@pytest.mark.mount
def test_ctrl_c_stops_following_a_prefetch_not_the_prefetch(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir), _slow_prefetch(emulator, mnt, cache_dir) as cli:
        cli.send_signal(signal.SIGINT)
        _, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, err
        assert "goes on in the mount" in err and "tciafs cache clear" in err
        assert "Traceback" not in err
        status = status_json(mnt)
        assert status["in_flight"]  # still fetching


@needs_fuse
@pytest.mark.mount
def test_a_prefetch_whose_mount_goes_away_says_so(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir), _slow_prefetch(emulator, mnt, cache_dir) as cli:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1, err
    assert "the mount went away while" in err and "Traceback" not in err


@needs_fuse
@pytest.mark.mount
def test_a_prefetch_the_cache_cannot_hold_ends_with_the_reason(emulator, tmp_path: Path) -> None:
    """Before, such a job evicted its own first series to fetch its last ones and never
    ended: `cache prefetch` waited forever."""
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir, "--cache-size", "30M"):
        lung = mnt / "Demo-Lung CT_2024"
        reset_stats(emulator.url)
        whole = _cli("prefetch", str(lung))  # 46 MB
        assert whole.returncode == 1
        assert "larger than the cache can hold (its bound is 30.0 MiB)" in whole.stderr
        assert "getImage" not in stats(emulator.url)["requests"]
        assert _cli("pin", str(mnt / "Demo_PET-CT Lymphoma")).returncode == 0  # 11 MB stay
        crowded = _cli("prefetch", str(lung / "LUNG-001"))  # 21 MB: not beside the pinned
        assert crowded.returncode == 1, crowded.stderr
        assert re.search(r"[12] of 2 series were fetched but did not stay", crowded.stderr)
        text = status_text(mnt)
        assert ", 0 running" in text
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert "evicted, as the cache cannot hold it beside the data in use" in log


def _read_all(series: Path) -> None:
    for path in sorted(series.glob("*.dcm")):
        path.read_bytes()


@needs_fuse
@pytest.mark.mount
def test_pin_unpin_stats_clear_and_a_resumed_prefetch(emulator, tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with mounted(emulator, mnt, cache_dir, "--cache-size", "30M"):
        lung = mnt / "Demo-Lung CT_2024"
        pinned, big, other = (next(lung.glob(f"{patient}/*/*")) for patient in
                              ("LUNG%2F003", "LUNG-001", "LUNG 002"))
        big = max(big.parent.iterdir(), key=lambda s: len(list(s.iterdir())))  # 21 MB
        count = len(list(pinned.glob("*.dcm")))
        pin = _cli("pin", str(pinned))
        assert pin.returncode == 0, pin.stderr
        assert "(1/1 series)" in pin.stderr and "ETA" in pin.stderr
        assert _present(cache_dir, pinned) == count
        stats_text = _cli("stats", "--cache-dir", str(cache_dir)).stdout
        assert f"({count} pinned)" in stats_text and "of 30.0 MiB" in stats_text
        unknown = _cli("pin", "--mount", str(mnt), "1.2.3.4.5")
        assert unknown.returncode == 1 and "no study or series with this UID is listed" in (
            unknown.stderr)
        unknown = _cli("pin", str(lung / "nobody"))
        assert unknown.returncode == 1 and unknown.stderr.endswith("nobody: no such entry\n")

        _read_all(big)
        _read_all(other)  # 38 MB through a 30 MB cache: evictions, but not the pinned
        assert _present(cache_dir, pinned) == count
        set_faults(emulator.url, p503=1.0)  # the service is down: pinned data still reads
        try:
            reset_stats(emulator.url)
            for path in pinned.glob("*.dcm"):
                assert path.read_bytes()[128:132] == b"DICM"
            assert stats(emulator.url)["requests_total"] == 0
        finally:
            set_faults(emulator.url)
        doc = json.loads(_cli("stats", "--json", "--cache-dir", str(cache_dir)).stdout)
        assert doc["mounted_at"] == str(mnt) and doc["hits"] >= count  # the mount's own

        assert _cli("unpin", str(pinned)).returncode == 0
        assert "(0 pinned)" in _cli("stats", "--cache-dir", str(cache_dir)).stdout
        _read_all(big)
        _read_all(other)  # now the least recently used, it is evicted first
        assert _present(cache_dir, pinned) < count

        assert _present(cache_dir, other) > 0
        assert _cli("clear", str(other)).returncode == 0
        assert _present(cache_dir, other) == 0

        brain = mnt / "Demo MR-Brain_2023"
        assert _cli("prefetch", str(brain)).returncode == 0
        every = [s for s in brain.glob("*/*/*") if s.is_dir()]
        assert all(_present(cache_dir, s) == len(list(s.glob("*.dcm"))) for s in every)
        assert _cli("clear", str(every[0])).returncode == 0
        reset_stats(emulator.url)
        again = _cli("prefetch", str(brain))  # resumed: only what is missing is fetched
        assert again.returncode == 0, again.stderr
        assert stats(emulator.url)["requests"].get("getImage") == 1
        assert _present(cache_dir, every[0]) == len(list(every[0].glob("*.dcm")))


async def test_stats_of_a_cache_in_use_show_recent_hits(emulator, client,
                                                        tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c", 1 << 30, client, prefetch=False)
    uid = _series(emulator.url)[0]["SeriesInstanceUID"]
    sop = _sops(emulator.url, uid)[0]

    async def body() -> None:
        for _ in range(300):  # one miss, then hits, while the cache stays open
            cache.release(await cache.acquire("Demo-Lung CT_2024", uid, sop))

    await _with_cache(cache, body)
    seen = _cli("stats", "--json", "--cache-dir", str(tmp_path / "c"))
    doc = json.loads(seen.stdout)
    assert doc["misses"] == 1 and 255 <= doc["hits"] <= 299, doc
    cache.close()
    doc = json.loads(_cli("stats", "--json", "--cache-dir", str(tmp_path / "c")).stdout)
    assert doc["hits"] == 299
    du = subprocess.run(["du", "-sb", str(tmp_path / "c")], capture_output=True, text=True,
                        check=True).stdout.split()[0]
    assert doc["used"] == int(du)  # what the bound counts: files, databases, directories
