"""`tciafs cache ...`: look at and steer the disk cache.

stats and verify read the cache directory itself (SQLite readers never block the
daemon). prefetch, pin, unpin and clear go through a running mount's control file;
clear also works on an unmounted cache directory.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tciafs import config, controlproto, paths
from tciafs.cache.index import IndexReader, IndexUnreadable
from tciafs.cache.layout import object_path
from tciafs.controlproto import read_status
from tciafs.mounts import MountError, locked_cache_dir, own_mounts, tciafs_mounts
from tciafs.parser import build_parser

if TYPE_CHECKING:
    from tciafs.cache import Cache


def run(args: argparse.Namespace) -> int:
    try:
        return _COMMANDS[args.cache_command](args)
    except CommandError as exc:
        print(f"tciafs: {exc}", file=sys.stderr)
        return 1
    except IndexUnreadable as exc:
        print(f"tciafs: the cache's database cannot be read ({exc}); if it is damaged, "
              "the next mount sets it aside and indexes the cached files again",
              file=sys.stderr)
        return 1


class CommandError(Exception):
    pass


# -- offline views -------------------------------------------------------------------------

def cache_root(cache_dir: Path | None) -> Path:
    """--cache-dir, else the directory a mount would use: TCIAFS_CACHE_DIR, then the
    config file's cache_dir, then the XDG default."""
    if cache_dir is not None:
        return cache_dir
    try:
        configured = config.mount_setting(build_parser(), "cache_dir")
    except config.ConfigError as exc:
        raise CommandError(str(exc)) from None
    return configured or paths.cache_home()


def _index(root: Path) -> IndexReader:
    index = IndexReader.open(root)
    if index is None:
        raise CommandError(f"no cache at {root}")
    return index


def _dir_bytes(root: Path) -> int:
    """Apparent bytes under root, directories included, as `du -sb` and the bound count
    them; scandir, since a cache may hold millions of files."""
    total = root.stat().st_size
    pending = [str(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                    if entry.is_dir(follow_symlinks=False):
                        pending.append(entry.path)
                except FileNotFoundError:  # evicted by a running mount meanwhile
                    continue
    return total


def _stats(args: argparse.Namespace) -> int:
    root = cache_root(args.cache_dir)
    with _index(root) as index:
        held = index.summary()
        withdrawn = [(uid, *index.series_held(uid)) for uid in _withdrawn(root)]
    entries, pinned, settings, largest = held.entries, held.pinned, held.settings, held.largest
    jobs = _stored_jobs(root)
    mnt, counts = _counts(root, settings)
    doc: dict[str, Any]  # JSON, of many shapes
    doc = {"cache_dir": str(root), "mounted_at": str(mnt) if mnt else None,
           "used": _dir_bytes(root), "files_bytes": held.stored,
           "bound": int(settings["bound"]) if "bound" in settings else None,
           "entries": entries, "pinned": pinned, **counts,
           "largest_series": [{"series": s, "collection": c, "files": n, "bytes": b}
                              for s, c, n, b in largest],
           "withdrawn": [{"series": s, "files": n, "bytes": b, "pinned": p}
                         for s, n, b, p in withdrawn if n],
           "unfinished_jobs": [{"command": c, "target": t, "started": when}
                               for c, t, when in jobs]}
    looked = doc["hits"] + doc["misses"]
    doc["hit_ratio"] = doc["hits"] / looked if looked else 0.0
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    bound = paths.format_size(doc["bound"]) if doc["bound"] else "unknown"
    print(f"cache {root}" + (f" (in use by the mount at {mnt})" if mnt else "")
          + f"\n  used     {paths.format_size(doc['used'])} of {bound}\n"
          f"  entries  {_files(entries)} ({pinned} pinned)\n"
          f"  hits     {doc['hits']} of {looked} opens ({doc['hit_ratio']:.0%})")
    if largest:
        print("  largest series:")
        for row in doc["largest_series"]:
            print(f"    {paths.format_size(row['bytes']):>10}  {_files(row['files']):>11}  "
                  f"{row['collection']}  {row['series']}")
    if doc["withdrawn"]:
        print("  withdrawn from the archive, evicted first (`tciafs cache clear UID` drops):")
        for row in doc["withdrawn"]:
            pinned_note = f", {row['pinned']} pinned" if row["pinned"] else ""
            print(f"    {paths.format_size(row['bytes']):>10}  {_files(row['files']):>11}  "
                  f"{row['series']}{pinned_note}")
    if jobs:
        print("  jobs not yet ended (a mount goes on with them; `tciafs cache clear PATH` "
              "ends one):")
        for command, target, when in jobs:
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(when))
            print(f"    {command:<8}  {target}  (since {since})")
    return 0


def _counts(root: Path, settings: dict[str, str]) -> tuple[Path | None, dict[str, int]]:
    """The mount using the cache, if one does, and the hit and miss counts: a mount's own,
    as it saves them to the index only every few hundred opens."""
    mnt, doc = _mount_using(root)
    live = doc.get("cache", {})
    return mnt, {key: int(live.get(key, settings.get(key, 0))) for key in ("hits", "misses")}


def _files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def _stored_jobs(root: Path) -> list[tuple[str, str, float]]:
    from tciafs.catalog import stored_rows

    return sorted(stored_rows(root, "SELECT command, target, started FROM jobs"),
                  key=lambda row: row[2])


def _withdrawn(root: Path) -> list[str]:
    """Series the archive stopped listing, as the mounts' catalogs remember them."""
    from tciafs.catalog import stored_rows

    return sorted({uid for uid, in stored_rows(root, "SELECT series_uid FROM withdrawn")})


def _verify(args: argparse.Namespace) -> int:
    root = cache_root(args.cache_dir)
    bad, checked, unconfirmed = [], 0, 0
    with _index(root) as index:
        for sop, size, md5, verified in index.present_files():
            try:
                # Streamed: a whole-slide image can be gigabytes.
                with open(object_path(root, sop), "rb") as stored:
                    found = os.fstat(stored.fileno()).st_size
                    digest = hashlib.file_digest(stored, "md5").hexdigest()
            except FileNotFoundError:
                if index.still_present(sop):  # else a mount evicted it while we looked
                    bad.append((sop, "missing"))
                continue
            checked += 1
            unconfirmed += not verified
            if found != size:
                bad.append((sop, f"size {found} != {size}"))
            elif digest != md5:
                bad.append((sop, "MD5 mismatch"))
    repaired, refused = 0, None
    if args.repair and bad:
        try:
            repaired = _repair(root, [sop for sop, _ in bad])
        except CommandError as exc:
            refused = str(exc)
        if refused is None and repaired < len(bad):
            refused = (f"{len(bad) - repaired} are open now: run it again once they are "
                       "closed")
    doc = {"checked": checked, "bad": [{"sop": s, "problem": p} for s, p in bad],
           "not_confirmed_by_server_md5": unconfirmed, "repaired": repaired,
           "repair_refused": refused}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"checked {checked} files: {len(bad)} bad, {unconfirmed} not yet confirmed "
              "by a server MD5")
        for sop, problem in bad:
            print(f"  {sop}: {problem}")
        if repaired:
            print(f"repaired: {repaired} bad files dropped; a read fetches them again")
        if refused:
            print(f"not repaired: {refused}")
    return 1 if bad and repaired < len(bad) else 0




def _repair(root: Path, sops: list[str]) -> int:
    """Drop the bad files, through the mount that uses the cache if one does; returns
    how many are gone (a mount keeps those open now)."""
    mnt, _ = _mount_using(root)
    if mnt is None:
        # Opening it reconciles: files missing or of the wrong size are forgotten there.
        with _offline_cache(root) as cache:
            cache.discard(sops)
        return len(sops)
    for target in controlproto.drop_targets(sops):
        _send(mnt, "drop", target)
    with _index(root) as index:
        return sum(not index.still_present(sop) for sop in sops)


def _mount_using(root: Path) -> tuple[Path | None, dict]:
    """The running mount whose cache directory is `root`, and its status; (None, {})
    when no mount uses it."""
    for mnt in own_mounts():
        try:
            doc = read_status(mnt)
        except (OSError, ValueError):  # another user's, or a daemon that hangs up
            continue
        used = doc.get("cache_dir")
        if used and Path(used).resolve() == root.resolve():
            return mnt, doc
    return None, {}


@contextlib.contextmanager
def _offline_cache(root: Path) -> Iterator[Cache]:
    """The cache directory itself, opened by this command: no mount may use it."""
    # The cache itself, with trio and pydicom: only for a cache no mount uses.
    from tciafs.cache import Cache

    with _index(root) as index:
        bound = index.stored_bound()
    try:
        with locked_cache_dir(root):
            cache = Cache(root, max_bytes=bound or 1 << 62)
            try:
                yield cache
            finally:
                cache.close()
    except MountError:
        raise CommandError(f"cache directory {root} is in use by a tciafs mount: unmount "
                           "it first, or act through the mount (a PATH on it)") from None


# -- through a mount -----------------------------------------------------------------------

def _mount_of(path: Path) -> Path | None:
    path = path.absolute()
    for mnt in (m.path for m in tciafs_mounts()):  # another user's refuses the command
        if path == mnt or mnt in path.parents:
            return mnt
    return None


def _targets(args: argparse.Namespace) -> list[tuple[Path, str]]:
    out = []
    for raw in args.paths:
        path = Path(raw)
        mnt = _mount_of(path) if ("/" in raw or path.exists()) else None
        if mnt is not None:
            out.append((mnt, str(path.absolute().relative_to(mnt)) or "."))
            continue
        mounts = [args.mount] if args.mount else own_mounts()
        if len(mounts) != 1:
            raise CommandError(f"{raw}: not a path on a tciafs mount; name the mount "
                               "with --mount for a bare UID")
        out.append((mounts[0], raw))
    return out


def _send(mnt: Path, command: str, target: str) -> None:
    try:
        controlproto.send(mnt, command, target)
    except OSError as exc:
        if exc.errno == controlproto.TOO_LARGE and command in ("prefetch", "pin"):
            bound = read_status(mnt)["cache"]["bound"]
            raise CommandError(f"{target}: larger than the cache can hold (its bound is "
                               f"{paths.format_size(bound)}); {command} a part of it, or "
                               "mount with a larger --cache-size") from None
        if exc.errno == controlproto.NO_SUCH_TARGET and command != "drop":
            raise CommandError(
                f"{target}: no study or series with this UID is listed on {mnt} (list its "
                "patient's directory first, or give its path)"
                if controlproto.names_uid(target)
                else f"{mnt / target}: no such entry") from None
        raise CommandError(f"{target}: {command} failed: {exc.strerror}") from None


def _steer(args: argparse.Namespace) -> int:
    command = args.cache_command
    if command == "clear" and not args.paths:
        return _clear_all(args)
    if getattr(args, "cache_dir", None) is not None:
        return _in_cache_dir(args)
    targets = _targets(args)
    for mnt, target in targets:
        _send(mnt, command, target)
    if command in ("prefetch", "pin") and args.wait:
        for raw, (mnt, target) in zip(args.paths, targets, strict=True):
            try:
                _follow(mnt, target)
            except KeyboardInterrupt:
                # Only the following stops: the job is the daemon's, and outlives it.
                undo = "clear" if command == "prefetch" else "unpin"
                print(f"\ntciafs: the {command} of {raw} goes on in the mount, and after a "
                      f"restart; `tciafs cache {undo} {shlex.quote(raw)}` ends it",
                      file=sys.stderr)
                return 130
    return 0


def _clear_all(args: argparse.Namespace) -> int:
    mounts = [args.mount] if args.mount else own_mounts()
    if mounts and args.cache_dir is None:
        for mnt in mounts:
            _send(mnt, "clear", ".")
        return 0
    return _in_cache_dir(args)


def _in_cache_dir(args: argparse.Namespace) -> int:
    """clear or unpin on the cache directory itself, which no mount may use: everything
    (clear without PATH), or the series named by UID, withdrawn ones too."""
    root = cache_root(args.cache_dir)
    with _offline_cache(root) as cache:
        _change_series(cache, args.cache_command, args.paths, root)
    return 0


def _change_series(cache: Cache, command: str, uids: list[str], root: Path) -> None:
    from tciafs.catalog import forget_stored_jobs

    # As through a mount: a job of what is cleared (or unpinned) is not taken up again.
    job = "prefetch" if command == "clear" else "pin"
    if not uids:
        forget_stored_jobs(root, job)
        print(f"dropped {cache.clear()} files")
        return
    ended = {uid: forget_stored_jobs(root, job, uid) for uid in uids}
    unknown = [uid for uid in uids if cache.series_collection(uid) is None and not ended[uid]]
    if unknown:
        raise CommandError(f"{', '.join(unknown)}: no series with this UID in {root}")
    for uid in uids:
        if cache.series_collection(uid) is None:  # nothing cached yet, only the job
            print(f"{uid}: its {job} job ended")
        elif command == "unpin":
            cache.pin_series(uid, cache.series_collection(uid) or "", False)
            print(f"{uid}: unpinned")
        else:
            print(f"{uid}: dropped {cache.clear(uid)} files"
                  + (" (pinned files are kept: unpin first)" if cache.cached_count(uid) else ""))


def _follow(mnt: Path, target: str) -> None:
    """Draw a progress bar for the newest job on `target` until it finishes."""
    start = time.monotonic()
    progress = _Progress(sys.stderr.isatty())
    while True:
        try:
            jobs = read_status(mnt).get("jobs", {})
        except OSError as exc:  # unmounted, or its daemon killed, meanwhile
            raise CommandError(f"{mnt}: the mount went away while {target} was fetched "
                               f"({exc.strerror}); what it fetched stays cached: run the "
                               "command again once it is mounted to go on") from None
        mine = [j for _, j in sorted(jobs.items(), key=lambda kv: int(kv[0]))
                if j["target"] == target]
        if not mine:
            raise CommandError(f"{target}: the mount shows no such job")
        job = mine[-1]
        failed, lost = job.get("series_failed", 0), job.get("series_lost", 0)
        finished = job["series_done"] + failed + lost >= job["series"]
        progress.draw(job, time.monotonic() - start, final=finished)
        if finished:
            if failed:
                reasons = "; ".join(f"{k}: {v}" for k, v in job.get("failures", {}).items())
                raise CommandError(f"{target}: {failed} of {job['series']} series failed "
                                   f"({reasons}); run the command again to retry them")
            if lost:
                raise CommandError(f"{target}: {lost} of {job['series']} series were fetched "
                                   "but did not stay: the cache cannot hold them beside the "
                                   "data in use now; prefetch less at once, or mount with a "
                                   "larger --cache-size")
            return
        time.sleep(0.5)


class _Progress:
    """A bar redrawn in place on a terminal; elsewhere (a log, a pipe) a line now and then."""

    EVERY = 10.0  # seconds between lines when not on a terminal

    def __init__(self, terminal: bool) -> None:
        self.terminal = terminal
        self.start_bytes: int | None = None  # what a resumed job had before this run
        self.last_line = -self.EVERY

    def draw(self, job: dict, elapsed: float, *, final: bool) -> None:
        total, have = job["total_bytes"] or 1, job["bytes"]
        if self.start_bytes is None:
            self.start_bytes = have
        rate = (have - self.start_bytes) / elapsed if elapsed > 0 else 0.0
        eta = f"{(total - have) / rate:.0f}s" if rate > 0 else "?"
        bar = "#" * int(min(1.0, have / total) * 30)
        text = (f"[{bar:<30}] {paths.format_size(have)} / {paths.format_size(total)}"
                f"  {paths.format_size(rate)}/s  ETA {eta}  "
                f"({job['series_done']}/{job['series']} series{_waiting(job)})")
        if self.terminal:
            sys.stderr.write(f"\r{text}" + ("\n" if final else ""))
        elif final or elapsed - self.last_line >= self.EVERY:
            sys.stderr.write(text + "\n")
            self.last_line = elapsed
        sys.stderr.flush()


def _waiting(job: dict) -> str:
    """Series that failed for now and will be fetched again, and when."""
    if not job.get("series_waiting"):
        return ""
    when = (time.strftime(" at %H:%M:%S", time.localtime(job["retry_at"]))
            if job.get("retry_at") else "")
    return f", {job['series_waiting']} to try again{when}: {job.get('waiting_reason')}"


_COMMANDS = {"stats": _stats, "verify": _verify, "prefetch": _steer, "pin": _steer,
             "unpin": _steer, "clear": _steer}
