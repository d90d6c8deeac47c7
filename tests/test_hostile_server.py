"""A real mount facing a hostile server: HTML with status 200, JSON of the wrong shape,
huge listings, duplicate UIDs, names of 1,000 bytes and dangerous characters, and DICOM
whose header names another instance than the one asked for.

The server is tests/hostile_server.py (stdlib http.server on loopback). Every case lives
in its own collection of one shared mount, next to a well-formed "Good" collection, so
each test also shows that the rest of the tree keeps answering. The daemon must stay
alive, give the caller a clean errno, and say what went wrong in one log line.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hostile_server import (
    HostileServer,
    Reply,
    dicom_bytes,
    dicom_reply,
    html_reply,
    json_reply,
    once_then,
    series_row,
    zip_bytes,
)

from tciafs import names

from mountutil import mounted, needs_fuse

pytestmark = [needs_fuse, pytest.mark.mount]

NAME_MAX = 255
LISTING_BOUND = 15.0  # seconds: a broken listing is answered at once (200 is not retried)


# -- the hostile archive -----------------------------------------------------------------------

GOOD = {"GOOD-1": {"1.2.826.0.1.1": {"1.2.826.0.1.1.1": ["1.2.826.0.1.1.1.1",
                                                        "1.2.826.0.1.1.1.2",
                                                        "1.2.826.0.1.1.1.3"]}}}
HUGE = 50_000
DUP_SOPS = ["1.2.5.1.1", "1.2.5.1.2"]
LONG_PATIENTS = ["P" * 1000, "é" * 500, "/" * 400, "Q" * 999 + "1", "Q" * 999 + "2"]
LONG_STUDY = "1.2." + "3" * 996
LONG_SERIES = "1.2.9." + "4" * 994
LONG_SOP = "1.2.8." + "5" * 994
DANGEROUS = ["A/B", "..", ".", "./x", "../../etc", "C\x01D", "E\tF", "G\nH", "I\x7fJ",
             "%41", "%2E", " lead", "-rf", "~root", "$(id)"]
DANGER_STUDY, DANGER_SERIES = "../..", "../../series"
DANGER_SOPS = ["../../evil", "a/b", "..", "x\x1by"]
WRONG = {"1.2.7.1": "9.9.9.9",  # a UID no listing knows
         "1.2.7.2": "1.2.7.3",  # a sibling's UID
         "1.2.7.4": ""}  # no SOPInstanceUID at all
WRONG_SOPS = ["1.2.7.1", "1.2.7.2", "1.2.7.3", "1.2.7.4"]


def _one_series(collection: str, patient: str, study: str, series: str,
                sops: list[str]) -> tuple[list[dict], list[dict]]:
    return ([{"PatientId": patient, "Collection": collection}],
            [series_row(collection, patient, study, series, len(sops))])


def build(server: HostileServer) -> dict[str, bytes]:
    """Register every case; returns the good bytes by SOP UID."""
    images = server.add_collection("Good", GOOD)
    cases = ["Good", "Html200", "HtmlSeries", "HtmlInstances", "HtmlImage", "ShapeObject",
             "ShapeStrings", "ShapeNested", "ShapeBoolean", "ShapeSeries", "NumberNames",
             "Huge", "Dups", "LongNames", "LongSop", "Dangerous", "WrongSop"]
    # Duplicate collections in the root listing, too.
    server.set("getCollectionValues", "",
               json_reply([{"Collection": c} for c in cases] + [{"Collection": "Good"}]))

    # HTML error pages with status 200, at each level.
    server.set("getPatient", "Html200", html_reply())
    server.set("getPatient", "HtmlSeries", json_reply([{"PatientId": "HS-1"}]))
    server.set("getSeries", "HtmlSeries", html_reply("502 Bad Gateway"))
    images.update(server.add_collection("HtmlInstances", {"HI-1": {"1.2.6": {"1.2.6.1": []}}}))
    server.set("getSOPInstanceUIDs", "1.2.6.1", html_reply("Maintenance"))
    server.add_collection("HtmlImage", {"HM-1": {"1.2.4": {"1.2.4.1": ["1.2.4.1.1"]}}})
    server.set("getSingleImage", "1.2.4.1.1", html_reply("Error 500"))

    # JSON of the wrong shape.
    server.set("getPatient", "ShapeObject", json_reply({"PatientId": "SO-1"}))
    server.set("getPatient", "ShapeStrings", json_reply(["SS-1", "SS-2"]))
    server.set("getPatient", "ShapeNested", json_reply([{"PatientId": {"id": "SN-1"}}]))
    server.set("getPatient", "ShapeBoolean", json_reply([{"PatientId": True}]))
    server.set("getPatient", "ShapeSeries", json_reply([{"PatientId": "SH-1"}]))
    server.set("getSeries", "ShapeSeries", json_reply({"resultSet": [{"x": 1}]}))
    # Numbers where names belong: written as their decimal text.
    server.set("getPatient", "NumberNames", json_reply(
        [{"PatientId": 12345, "Collection": "NumberNames"}, {"PatientId": 2.5}]))
    server.set("getSeries", "NumberNames", json_reply(
        [series_row("NumberNames", 12345, "1.2.11", "1.2.11.1", 0)]))

    # A huge listing: 50,000 patients in one reply (about 2.5 MB of JSON).
    server.set("getPatient", "Huge", json_reply(
        [{"PatientId": f"H{i:05d}", "Collection": "Huge"} for i in range(HUGE)]))

    # Duplicates at every level.
    server.set("getPatient", "Dups", json_reply(
        [{"PatientId": p} for p in ("DUP-1", "DUP-1", "DUP-2", "DUP-1", "DUP-2")]))
    row = series_row("Dups", "DUP-1", "1.2.5", "1.2.5.1", 2)
    server.set("getSeries", "Dups", json_reply([row, row, series_row("Dups", "DUP-1", "1.2.5",
                                                                     "1.2.5.2", 0), row]))
    server.set("getSOPInstanceUIDs", "1.2.5.1", json_reply(
        [{"SOPInstanceUID": s} for s in (DUP_SOPS[0], DUP_SOPS[0], DUP_SOPS[1], DUP_SOPS[0])]))
    for sop in DUP_SOPS:
        images[sop] = dicom_bytes(sop, "1.2.5.1", "1.2.5", "DUP-1")
        server.set("getSingleImage", sop, dicom_reply(images[sop]))

    # Names of 1,000 bytes: patient IDs, a study and a series UID, and (apart) a SOP UID.
    server.set("getPatient", "LongNames", json_reply([{"PatientId": p} for p in LONG_PATIENTS]))
    server.set("getSeries", "LongNames", json_reply(
        [series_row("LongNames", LONG_PATIENTS[0], LONG_STUDY, LONG_SERIES, 1)]))
    server.set("getSOPInstanceUIDs", LONG_SERIES, json_reply([{"SOPInstanceUID": "1.2.8.1"}]))
    images["1.2.8.1"] = dicom_bytes("1.2.8.1", LONG_SERIES, LONG_STUDY, LONG_PATIENTS[0])
    server.set("getSingleImage", "1.2.8.1", dicom_reply(images["1.2.8.1"]))
    images.update(server.add_collection("LongSop", {"LS-1": {"1.2.10": {"1.2.10.1": [
        LONG_SOP, "1.2.10.1.1"]}}}))

    # IDs with '/', '..', control characters and shell metacharacters.
    patients, rows = _one_series("Dangerous", "../../etc", DANGER_STUDY, DANGER_SERIES,
                                 DANGER_SOPS)
    server.set("getPatient", "Dangerous", json_reply([{"PatientId": p} for p in DANGEROUS]))
    server.set("getSeries", "Dangerous", json_reply(rows))
    server.set("getSOPInstanceUIDs", DANGER_SERIES,
               json_reply([{"SOPInstanceUID": s} for s in DANGER_SOPS]))
    for sop in DANGER_SOPS:
        images[sop] = dicom_bytes(sop, DANGER_SERIES, DANGER_STUDY, "../../etc")
        server.set("getSingleImage", sop, dicom_reply(images[sop]))

    # DICOM whose header names another instance than the one asked for.
    server.set("getPatient", "WrongSop", json_reply([{"PatientId": "WS-1"}]))
    server.set("getSeries", "WrongSop", json_reply(
        [series_row("WrongSop", "WS-1", "1.2.7", "1.2.7.0", len(WRONG_SOPS))]))
    server.set("getSOPInstanceUIDs", "1.2.7.0",
               json_reply([{"SOPInstanceUID": s} for s in WRONG_SOPS]))
    for sop in WRONG_SOPS:
        images[sop] = dicom_bytes(WRONG.get(sop, sop), "1.2.7.0", "1.2.7", "WS-1")
        server.set("getSingleImage", sop, dicom_reply(images[sop]))
    return images


@dataclass
class Mount:
    server: HostileServer
    root: Path
    cache_dir: Path
    daemon: subprocess.Popen
    images: dict[str, bytes]

    def log(self) -> str:
        return (self.cache_dir.parent / f"{self.root.name}-daemon.log").read_text(
            errors="replace")

    def path(self, *idents: str) -> Path:
        """The path of collection/patient/study/series/instance given by identifiers."""
        parts = [names.encode(i) for i in idents]
        if len(parts) == 5:
            parts[4] += ".dcm"
        return self.root.joinpath(*parts)

    def alive(self) -> None:
        """The daemon runs and the good collection still reads exactly."""
        assert self.daemon.poll() is None
        sop = GOOD["GOOD-1"]["1.2.826.0.1.1"]["1.2.826.0.1.1.1"][0]
        path = self.path("Good", "GOOD-1", "1.2.826.0.1.1", "1.2.826.0.1.1.1", sop)
        assert path.read_bytes() == self.images[sop]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("hostile")
    with HostileServer() as server:
        images = build(server)
        with mounted(server, base / "mnt", base / "cache", "--no-prefetch",
                     "--timeout", "5") as daemon:
            yield Mount(server, base / "mnt", base / "cache", daemon, images)
    log = (base / "mnt-daemon.log").read_text(errors="replace")
    assert "Traceback" not in log and "unexpected error" not in log, log[-4000:]


def _errno_of(action, *args) -> tuple[int | None, float]:  # noqa: ANN001
    started = time.monotonic()
    try:
        action(*args)
    except OSError as exc:
        return exc.errno, time.monotonic() - started
    return None, time.monotonic() - started


def _listing(path: Path) -> list[str]:
    """Entries of a directory that stand for archive identifiers (sidecars left out)."""
    return [n for n in os.listdir(path) if not n.startswith(".")]


# -- the tests ---------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_html_with_status_200_is_eio_with_a_log_line(hostile: Mount) -> None:
    broken = [hostile.path("Html200"), hostile.path("HtmlSeries", "HS-1"),
              hostile.path("HtmlInstances", "HI-1", "1.2.6", "1.2.6.1")]
    for directory in broken:
        assert directory.parent.is_dir()
        for action in (os.listdir, lambda d: os.stat(d / "anything")):
            code, seconds = _errno_of(action, directory)
            assert code == errno.EIO, (directory, code)
            assert seconds < LISTING_BOUND
    # An HTML page where a DICOM file belongs is refused, never served as the file.
    image = hostile.path("HtmlImage", "HM-1", "1.2.4", "1.2.4.1", "1.2.4.1.1")
    code, seconds = _errno_of(image.read_bytes)
    assert code == errno.EIO and seconds < 30
    assert os.getxattr(image, "user.tcia.cached") == b"none"
    log = hostile.log()
    assert "expected JSON, got HTML" in log
    assert "Maintenance" in log
    assert "not a DICOM file" in log
    hostile.alive()


@pytest.mark.timeout(60)
def test_json_of_the_wrong_shape_is_eio_with_a_log_line(hostile: Mount) -> None:
    for directory in (hostile.path("ShapeObject"), hostile.path("ShapeStrings"),
                      hostile.path("ShapeNested"), hostile.path("ShapeBoolean"),
                      hostile.path("ShapeSeries", "SH-1")):
        code, seconds = _errno_of(os.listdir, directory)
        assert code == errno.EIO, (directory, code)
        assert seconds < LISTING_BOUND
    log = hostile.log()
    assert "expected a JSON list of objects, got dict" in log
    assert "expected a JSON list of objects, found a str" in log
    assert "PatientId is a dict, not a string" in log
    assert "PatientId is a bool, not a string" in log
    # Numbers for names are listed as their decimal text, and can be entered.
    assert sorted(_listing(hostile.path("NumberNames"))) == ["12345", "2.5"]
    assert _listing(hostile.path("NumberNames", "12345")) == ["1.2.11"]
    hostile.alive()


@pytest.mark.timeout(120)
def test_huge_listing_lists_completely(hostile: Mount) -> None:
    started = time.monotonic()
    listed = _listing(hostile.path("Huge"))
    seconds = time.monotonic() - started
    assert len(listed) == HUGE
    assert set(listed) == {f"H{i:05d}" for i in range(HUGE)}
    assert seconds < 60
    # Listed once: a second listing and lookups are answered without asking again.
    asked = hostile.server.count("getPatient")
    assert len(_listing(hostile.path("Huge"))) == HUGE
    for i in range(0, HUGE, 997):
        assert hostile.path("Huge", f"H{i:05d}").is_dir()
    assert hostile.server.count("getPatient") == asked
    print(f"\n{HUGE} patients listed in {seconds:.1f} s")
    hostile.alive()


@pytest.mark.timeout(60)
def test_duplicates_are_listed_once(hostile: Mount) -> None:
    assert _listing(hostile.root).count("Good") == 1
    assert sorted(_listing(hostile.path("Dups"))) == ["DUP-1", "DUP-2"]
    assert _listing(hostile.path("Dups", "DUP-1")) == ["1.2.5"]
    assert sorted(_listing(hostile.path("Dups", "DUP-1", "1.2.5"))) == ["1.2.5.1", "1.2.5.2"]
    series = hostile.path("Dups", "DUP-1", "1.2.5", "1.2.5.1")
    assert sorted(_listing(series)) == sorted(f"{s}.dcm" for s in DUP_SOPS)
    for sop in DUP_SOPS:
        assert (series / f"{sop}.dcm").read_bytes() == hostile.images[sop]
    log = hostile.log()
    assert "server listed patient 'DUP-1' twice" in log
    hostile.alive()


def _check_long_name(name: str) -> None:
    raw = name.encode()
    assert len(raw) <= NAME_MAX, (len(raw), name[:40])


@pytest.mark.timeout(60)
def test_names_of_1000_bytes_fit_name_max(hostile: Mount) -> None:
    listed = _listing(hostile.path("LongNames"))
    assert len(listed) == len(LONG_PATIENTS) == len(set(listed))
    for name in listed:
        _check_long_name(name)
        assert "%~" in name  # cut, and marked as cut with its hash
    for patient in LONG_PATIENTS:
        path = hostile.path("LongNames", patient)
        assert path.name in listed
        # The full identifier is still there, in the xattr.
        assert os.getxattr(path, "user.tcia.id").decode() == patient
    study = hostile.path("LongNames", LONG_PATIENTS[0], LONG_STUDY)
    series = study / names.encode(LONG_SERIES)
    assert _listing(study.parent) == [study.name]
    assert _listing(study) == [series.name]
    _check_long_name(study.name)
    _check_long_name(series.name)
    assert os.getxattr(series, "user.tcia.id").decode() == LONG_SERIES
    assert (series / "1.2.8.1.dcm").read_bytes() == hostile.images["1.2.8.1"]
    # The same walk with real tools.
    found = subprocess.run(["find", str(hostile.path("LongNames"))], capture_output=True,
                           text=True, timeout=30)
    assert found.returncode == 0 and "1.2.8.1.dcm" in found.stdout
    hostile.alive()


@pytest.mark.timeout(60)
def test_instance_name_of_a_1000_byte_uid_fits_name_max(hostile: Mount) -> None:
    series = hostile.path("LongSop", "LS-1", "1.2.10", "1.2.10.1")
    listed = sorted(_listing(series))
    assert len(listed) == 2 and "1.2.10.1.1.dcm" in listed
    long_name = next(n for n in listed if n != "1.2.10.1.1.dcm")
    try:
        _check_long_name(long_name)
        assert long_name.endswith(".dcm")
        assert (series / long_name).read_bytes() == hostile.images[LONG_SOP]
        # Real tools copy it to a real filesystem.
        copy = hostile.cache_dir.parent / "long-copy"
        subprocess.run(["cp", "-r", str(series), str(copy)], check=True, timeout=30)
    finally:
        hostile.alive()


@pytest.mark.timeout(60)
def test_dangerous_ids_are_escaped_and_stay_inside(hostile: Mount) -> None:
    listed = _listing(hostile.path("Dangerous"))
    assert sorted(listed) == sorted(names.encode(p) for p in DANGEROUS)
    for name in listed:
        assert name not in (".", "..") and "/" not in name
        assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in name), repr(name)
        assert hostile.root.joinpath("Dangerous", name).is_dir()
    patient = hostile.path("Dangerous", "../../etc")
    assert patient.name == "%2E.%2F..%2Fetc"
    assert os.getxattr(patient, "user.tcia.id") == b"../../etc"
    series = hostile.path("Dangerous", "../../etc", DANGER_STUDY, DANGER_SERIES)
    assert sorted(_listing(series)) == sorted(names.encode(s) + ".dcm" for s in DANGER_SOPS)
    for sop in DANGER_SOPS:
        assert (series / (names.encode(sop) + ".dcm")).read_bytes() == hostile.images[sop]
    # Nothing was written outside the cache directory's own layout.
    base = hostile.cache_dir.parent
    assert not (base / "evil").exists() and not (hostile.cache_dir / "evil").exists()
    tops = {p.name for p in hostile.cache_dir.iterdir()}
    assert tops <= {"objects", "tmp", "lock", "index.sqlite", "index.sqlite-wal",
                    "index.sqlite-shm"} | {n for n in tops if n.startswith("catalog-")}
    for path in (hostile.cache_dir / "objects").rglob("*"):
        assert path.resolve().is_relative_to(hostile.cache_dir / "objects")
    hostile.alive()


@pytest.mark.timeout(90)
def test_dicom_naming_another_instance_is_refused(hostile: Mount) -> None:
    series = hostile.path("WrongSop", "WS-1", "1.2.7", "1.2.7.0")
    good = series / "1.2.7.3.dcm"
    for sop in ("1.2.7.1", "1.2.7.2", "1.2.7.4"):
        path = series / f"{sop}.dcm"
        code, seconds = _errno_of(path.read_bytes)
        assert code == errno.EIO, (sop, code)
        assert seconds < 30
        # Refused a few times at most, never stored under the name asked for.
        assert 1 <= hostile.server.count_key("getSingleImage", sop) <= 3
        assert os.getxattr(path, "user.tcia.cached") == b"none"
    assert good.read_bytes() == hostile.images["1.2.7.3"]
    # The sibling's bytes are cached now, yet the instance that was answered with them
    # still is not served.
    code, _ = _errno_of((series / "1.2.7.2.dcm").read_bytes)
    assert code == errno.EIO
    log = hostile.log()
    assert "server sent instance '9.9.9.9' when asked for '1.2.7.1'" in log
    assert "server sent instance '1.2.7.3' when asked for '1.2.7.2'" in log
    assert "without a SOPInstanceUID" in log
    hostile.alive()


@pytest.mark.timeout(60)
def test_daemon_survives_every_hostile_case(hostile: Mount) -> None:
    """Walk the whole hostile tree with find: errors for the broken parts, no crash."""
    found = subprocess.run(["find", str(hostile.root), "-path", f"{hostile.root}/Huge",
                            "-prune", "-o", "-print"], capture_output=True, text=True,
                           timeout=50)
    assert found.returncode != 0  # the broken listings are reported ...
    assert "Input/output error" in found.stderr
    assert "1.2.826.0.1.1.1.3.dcm" in found.stdout  # ... and the rest is walked
    hostile.alive()
    assert sorted(_listing(hostile.root)) == sorted(set(_listing(hostile.root)))


# -- hostile replies at the root, and a server that turns hostile ------------------------------

@pytest.mark.timeout(60)
@pytest.mark.parametrize("reply, message", [
    (html_reply(), "expected JSON, got HTML"),
    (json_reply({"Collection": "X"}), "expected a JSON list of objects, got dict"),
])
def test_mount_refuses_a_hostile_root_listing(tmp_path: Path, reply: Reply,
                                              message: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with HostileServer() as server:
        server.set("getCollectionValues", "", reply)
        result = subprocess.run(
            [sys.executable, "-m", "tciafs", "mount", str(mnt), "-f", "--server", server.url,
             "--cache-dir", str(tmp_path / "cache"), "--timeout", "5"],
            capture_output=True, text=True, timeout=50)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.ismount(mnt)


@pytest.mark.timeout(60)
def test_stored_listings_are_served_when_replies_turn_hostile(tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with HostileServer() as server:
        images = server.add_collection("Good", GOOD)
        server.collections(["Good"])
        with mounted(server, mnt, cache_dir, "--no-prefetch", "--listing-ttl", "1") as daemon:
            before = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
            sop = "1.2.826.0.1.1.1.1"
            cached = mnt / "Good" / "GOOD-1" / "1.2.826.0.1.1" / "1.2.826.0.1.1.1" / f"{sop}.dcm"
            assert str(cached.relative_to(mnt)) in before
            assert cached.read_bytes() == images[sop]
            for endpoint, key in (("getCollectionValues", ""), ("getPatient", "Good"),
                                  ("getSeries", "Good"),
                                  ("getSOPInstanceUIDs", "1.2.826.0.1.1.1")):
                server.set(endpoint, key, html_reply())
            time.sleep(1.5)  # every stored listing is past its TTL now
            asked = server.count()
            after = sorted(str(p.relative_to(mnt)) for p in mnt.rglob("*"))
            assert after == before
            assert server.count() > asked  # it did ask, and kept what it had
            assert cached.read_bytes() == images[sop]
            assert daemon.poll() is None
    log = (tmp_path / "mnt-daemon.log").read_text()
    assert "serving the stored listing" in log and "expected JSON, got HTML" in log


# -- a body cut once, then whole ---------------------------------------------------------------

@pytest.mark.timeout(60)
def test_a_body_cut_once_is_fetched_again(tmp_path: Path) -> None:
    mnt, cache_dir = tmp_path / "mnt", tmp_path / "cache"
    with HostileServer() as server:
        images = server.add_collection("Good", GOOD)
        server.collections(["Good"])
        sops = GOOD["GOOD-1"]["1.2.826.0.1.1"]["1.2.826.0.1.1.1"]
        for sop, cut in zip(sops, (0.5, 0.9, 0.1), strict=True):
            whole = dicom_reply(images[sop])
            server.set("getSingleImage", sop, once_then(
                Reply(200, whole.body, whole.content_type, cut_after=int(len(whole.body) * cut)),
                whole))
        with mounted(server, mnt, cache_dir, "--no-prefetch", "--timeout", "5") as daemon:
            series = mnt / "Good" / "GOOD-1" / "1.2.826.0.1.1" / "1.2.826.0.1.1.1"
            outcomes = {}
            for sop in sops:
                code, seconds = _errno_of((series / f"{sop}.dcm").read_bytes)
                outcomes[sop] = code
                assert seconds < 30
            assert daemon.poll() is None
            # Whatever happened the first time, the next read works.
            for sop in sops:
                assert (series / f"{sop}.dcm").read_bytes() == images[sop]
            assert outcomes == {sop: None for sop in sops}


# -- a stalled background download must not starve a read that fits ---------------------------

@pytest.mark.timeout(60)
def test_a_stalled_prefetch_does_not_starve_a_read_that_fits(tmp_path: Path) -> None:
    tree = {"B-1": {"1.3.1": {"1.3.1.1": ["1.3.1.1.1"]}, "1.3.2": {"1.3.2.1": ["1.3.2.1.1"]}}}
    small = dicom_bytes("1.3.1.1.1", "1.3.1.1", "1.3.1", "B-1", rows=100)  # 20 kB
    big = dicom_bytes("1.3.2.1.1", "1.3.2.1", "1.3.2", "B-1", rows=870)  # 1.5 MB
    cache_dir = tmp_path / "cache"
    with HostileServer() as server:
        server.add_collection("Big", tree)
        server.collections(["Big"])
        server.set("getSingleImage", "1.3.1.1.1", dicom_reply(small))
        server.set("getSingleImage", "1.3.2.1.1", dicom_reply(big))
        # The series ZIP of the small one stops half-way through its entry for a while.
        body = zip_bytes({"1-1.dcm": small})
        server.set("getImage", "1.3.1.1", Reply(200, body, "application/zip",
                                                stall_after=len(body) // 2, stall_seconds=4))
        # A first mount only to learn the size of the metadata databases for this tree.
        with mounted(server, tmp_path / "probe", cache_dir, "--no-prefetch"):
            list((tmp_path / "probe").rglob("*"))
        # The bound counts the databases and the directories (as du does).
        meta = sum(p.stat().st_size for p in cache_dir.iterdir() if ".sqlite" in p.name)
        meta += sum(p.stat().st_size for p in [cache_dir, *cache_dir.rglob("*")] if p.is_dir())
        # Room for data (bound - 1 MiB metadata slack - metadata): about 2 MB, so the big
        # file fits beside the few kB the stalled stream has written.
        bound = (1 << 20) + meta + 2_100_000
        mnt = tmp_path / "mnt"
        with mounted(server, mnt, cache_dir, "--cache-size", str(bound)) as daemon:
            patient = mnt / "Big" / "B-1"
            assert (patient / "1.3.1" / "1.3.1.1" / "1.3.1.1.1.dcm").read_bytes() == small
            time.sleep(0.5)  # its series ZIP is stalled now, half-way through
            code, seconds = _errno_of((patient / "1.3.2" / "1.3.2.1" / "1.3.2.1.1.dcm")
                                      .read_bytes)
            assert daemon.poll() is None
            log = (tmp_path / "mnt-daemon.log").read_text()
            assert code is None, (errno.errorcode.get(code), log[-600:])
