"""Smoke test of the benchmark harness (scripts/bench, scripts/benchlib).

Checks the pieces, never the timings: the copy verifier catches a wrong byte, a
missing or an extra file; the reference parser maps MD5s to SOPInstanceUIDs; the JSON
has the documented shape; the chart is a PNG and an SVG naming every figure, with the
bars coloured by verdict and each target restated as a ratio; a tiny real run (figures 1 and
4, one repetition, no shaping) completes; SIGTERM leaves no mount behind; the
do-nothing file system that figure 5 compares opens with mounts, lists and unmounts.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from dicomutil import dicom_bytes
from PIL import Image  # Pillow comes with matplotlib, the bench extra

from mountutil import needs_fuse

DEFAULT_TIER = "unit"  # three tests mount

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "scripts" / "bench"
sys.path.insert(0, str(ROOT / "scripts"))
verify = importlib.import_module("benchlib.verify")
report = importlib.import_module("benchlib.report")
figures = importlib.import_module("benchlib.figures")
fig_walk = importlib.import_module("benchlib.fig_walk")
procs = importlib.import_module("benchlib.procs")

FIELDS = {"value", "baseline", "ratio", "target", "holds"}


def _instances(root: Path, count: int = 3) -> dict[str, str]:
    expected = {}
    for k in range(count):
        sop = f"1.2.826.0.1.3680043.9.{k + 1}"
        data = os.urandom(4096 + k)
        (root / f"{sop}.dcm").write_bytes(data)
        expected[sop] = hashlib.md5(data).hexdigest()
    return expected


def test_verifier_accepts_an_exact_copy(tmp_path: Path) -> None:
    expected = _instances(tmp_path)
    assert verify.verify_copy(tmp_path, expected) == []
    verify.check_copy(tmp_path, expected, "exact")


def test_verifier_catches_one_wrong_byte(tmp_path: Path) -> None:
    expected = _instances(tmp_path)
    victim = sorted(tmp_path.glob("*.dcm"))[1]
    data = bytearray(victim.read_bytes())
    data[1234] ^= 0x01
    victim.write_bytes(bytes(data))
    problems = verify.verify_copy(tmp_path, expected)
    assert len(problems) == 1 and victim.name in problems[0]
    with pytest.raises(procs.BenchError, match="verification failed"):
        verify.check_copy(tmp_path, expected, "corrupt")


def test_verifier_catches_missing_and_extra_files(tmp_path: Path) -> None:
    expected = _instances(tmp_path)
    sorted(tmp_path.glob("*.dcm"))[0].unlink()
    (tmp_path / "9.9.9.dcm").write_bytes(b"stray")
    problems = verify.verify_copy(tmp_path, expected)
    assert any("missing" in p for p in problems)
    assert any("9.9.9.dcm" in p for p in problems)


def test_reference_zip_maps_md5_to_sop_uid(tmp_path: Path) -> None:
    sops = ["1.2.3.7", "1.2.3.5", "1.2.3.6"]
    blobs = {f"{k + 1:08d}.dcm": dicom_bytes(sop, patient="SMOKE") for k, sop in enumerate(sops)}
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["Filename", "MD5Hash"])
    for name in reversed(blobs):  # the service's list is in no particular order
        writer.writerow([name, hashlib.md5(blobs[name]).hexdigest()])
    with zipfile.ZipFile(tmp_path / "ref.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("LICENSE", "CC BY 4.0")
        for name, blob in blobs.items():
            zf.writestr(name, blob)
        zf.writestr("md5hashes.csv", table.getvalue())
    expected = verify.expected_from_zip(tmp_path / "ref.zip")
    assert list(expected) == sops  # in the ZIP's order
    copy = tmp_path / "copy"
    copy.mkdir()
    for sop, blob in zip(sops, blobs.values(), strict=True):
        (copy / f"{sop}.dcm").write_bytes(blob)
    assert verify.verify_copy(copy, expected) == []
    # Two files swapped under each other's names: every byte right, the mapping wrong.
    a, b = (copy / f"{sops[0]}.dcm"), (copy / f"{sops[1]}.dcm")
    first = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(first)
    assert len(verify.verify_copy(copy, expected)) == 2


def _declared_with_results() -> list:
    declared = figures.declare()
    by_key = {f.key: f for f in declared}
    by_key["1_cold_series_copy"].set(1.0, 2.5)
    by_key["2_cold_study_copy"].error = "emulator gone"
    by_key["8_peak_rss"].set(70.0, 60.0)
    return declared


def test_json_shape(tmp_path: Path) -> None:
    declared = _declared_with_results()
    assert {figures.number(f.key) for f in declared} == set(range(1, 15))
    # 5b needs root to drop the page cache, and is declared only where it can run.
    assert any(f.key == "5b_warm_read_from_disk" for f in declared) == figures.can_drop_caches()
    assert len(declared) == 17 + figures.can_drop_caches()
    doc = report.figures_json(declared)
    for key, entry in doc.items():
        assert set(entry) >= FIELDS, key
        assert isinstance(entry["holds"], bool) and isinstance(entry["target"], str)
    assert doc["1_cold_series_copy"]["ratio"] == pytest.approx(0.4)
    assert doc["1_cold_series_copy"]["holds"] is True
    assert doc["2_cold_study_copy"]["holds"] is False and "error" in doc["2_cold_study_copy"]
    assert doc["8_peak_rss"]["holds"] is True  # 10 MB apart: within 30 MB
    assert "ratio" in report.table(declared)


@pytest.mark.parametrize(("target", "baseline", "limit"), [
    (report.Target("<=", 1.25), None, 1.25),
    (report.Target("==", 0, "value", "requests"), 1000.0, 0.0),
    (report.Target("<=", 30, "difference", "MB"), 60.0, 1.5),
    (report.Target("<=", 30, "difference", "MB"), 0.0, None),
])
def test_target_as_a_ratio_limit(target: report.Target, baseline: float | None,
                                 limit: float | None) -> None:
    assert target.ratio_limit(baseline) == limit
    if limit is None or baseline is None:
        return
    # The chart's tick is where the target itself changes its verdict.
    below, at, above = ([target.holds(r * baseline, baseline, r)
                         for r in (limit - 0.01, limit, limit + 0.01)])
    assert (below, at, above) == {"<=": (True, True, False),
                                  "==": (False, True, False)}[target.op]


RED = (0xCF, 0x22, 0x2E)  # chart.COLOURS["misses"]


def _red_pixels(png: Path) -> int:
    with Image.open(png) as image:
        return sum(n for n, colour in image.convert("RGB").getcolors(1 << 20) if colour == RED)


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> ModuleType:
    """benchlib.chart, with matplotlib's font cache kept out of the user's own ~/.cache."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MPLCONFIGDIR", str(tmp_path_factory.mktemp("matplotlib")))
        return importlib.import_module("benchlib.chart")


def test_chart_is_written_with_every_figure_and_its_verdict(chart: ModuleType,
                                                             tmp_path: Path) -> None:
    declared = _declared_with_results()
    holding, missing = tmp_path / "holding", tmp_path / "missing"
    _write_chart(chart, holding, declared)
    declared[0].set(5.0, 2.0)  # figure 1 now misses its target, ratio <= 0.5
    _write_chart(chart, missing, declared)
    _check_chart(missing, [f.key for f in declared])
    with Image.open(missing / "chart.png") as image:
        assert image.width > 800 and image.height > 40 * len(declared)
    # Only the legend is red while every measured figure holds; a miss adds its red bar.
    assert _red_pixels(missing / "chart.png") > _red_pixels(holding / "chart.png") + 2000
    svg = (missing / "chart.svg").read_text()
    assert "abc1234" in svg and "emulator gone" in svg


def _write_chart(chart: ModuleType, folder: Path, shown: list) -> None:
    folder.mkdir()
    paths = chart.write_chart(folder, shown, "tciafs bench (smoke) at abc1234 on host",
                              "latency 1 ms")
    assert paths == [folder / "chart.png", folder / "chart.svg"]


def _check_chart(folder: Path, keys: list[str]) -> None:
    with Image.open(folder / "chart.png") as image:
        assert image.format == "PNG"
        image.verify()
    svg = (folder / "chart.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "</svg>" in svg
    for key in keys:
        assert key in svg, key


def test_find_listing_count(tmp_path: Path) -> None:
    listing = tmp_path / "find.txt"
    mnt = "/m"
    lines = [mnt, f"{mnt}/C", f"{mnt}/C/P", f"{mnt}/C/.LICENSE", f"{mnt}/C/P/S",
             f"{mnt}/C/P/S/R", f"{mnt}/C/P/S/R/1.dcm", f"{mnt}/C/P/S/R/2.dcm"]
    listing.write_text("\n".join(lines) + "\n")
    assert fig_walk.count_listing(listing) == (5, 8)


# -- a tiny real run ------------------------------------------------------------------------

def _tciafs_mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mounts") as mounts:
        return [line.split()[1] for line in mounts
                if line.split()[2].startswith("fuse") and line.split()[1].startswith(str(root))]


def _bench_env(tmp_path: Path) -> dict[str, str]:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(scratch),  # the harness's mounts live in here
            "MPLCONFIGDIR": str(tmp_path / "matplotlib")}  # not the user's own ~/.cache


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(90)
def test_quick_run_of_figures_1_and_4(tmp_path: Path) -> None:
    out, doc_path = tmp_path / "results", tmp_path / "bench.json"
    done = subprocess.run(
        [str(BENCH), "--quick", "--only", "1,4", "--repeat", "1", "--latency-ms", "1",
         "--bandwidth", "0", "--json", str(doc_path), "--out", str(out)],
        capture_output=True, text=True, timeout=85, env=_bench_env(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    doc = json.loads(doc_path.read_text())
    assert set(doc) == {"1_cold_series_copy", "4_first_byte"}
    for entry in doc.values():
        assert set(entry) >= FIELDS and "error" not in entry
        assert all(isinstance(entry[k], float | int) for k in ("value", "baseline", "ratio"))
        assert isinstance(entry["holds"], bool)
    assert json.loads((out / "results.json").read_text()) == doc
    _check_chart(out, list(doc))
    assert "1_cold_series_copy" in done.stdout and "wall time" in done.stdout
    assert _tciafs_mounts_under(tmp_path) == []


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(60)
def test_null_file_system_serves_empty_files_and_unmounts(tmp_path: Path) -> None:
    mnt = tmp_path / "null"
    with procs.null_mounted(mnt, 7, tmp_path / "nullfs.log"):
        files = sorted(mnt.iterdir())
        assert [f.name for f in files] == [f"{i:06d}.dcm" for i in range(7)]
        assert all(f.is_file() and f.read_bytes() == b"" for f in files)
        assert not (mnt / "000007.dcm").exists()
        subprocess.run(["head", "-q", "-c", "0", *files], check=True)
    assert _tciafs_mounts_under(tmp_path) == []


@needs_fuse
@pytest.mark.mount
@pytest.mark.timeout(60)
def test_sigterm_leaves_no_mount(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(BENCH), "--only", "5", "--repeat", "3", "--latency-ms", "1", "--bandwidth", "0",
         "--out", str(tmp_path / "results")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_bench_env(tmp_path))
    try:
        deadline = time.monotonic() + 40
        while not _tciafs_mounts_under(tmp_path) and proc.poll() is None:
            assert time.monotonic() < deadline, "no mount appeared"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _tciafs_mounts_under(tmp_path) == []
    assert not any((tmp_path / "scratch").iterdir())  # the scratch area is removed too
