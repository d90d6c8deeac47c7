"""The emulator as a process: URL lines, flags, signals, and no secrets in its output."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

SUPPORT = Path(__file__).with_name("test_emulator_support.py")
V4 = "/nbia-api/services/v4/"


def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """One stdout line ("" at EOF), or fail after ``timeout`` (readline alone could hang)."""
    if proc.pid not in _readers:
        _readers[proc.pid] = _start_reader(proc)
    try:
        return _readers[proc.pid][0].get(timeout=timeout).strip()
    except queue.Empty:
        raise AssertionError("no output from the emulator in time") from None


_readers: dict[int, tuple[queue.Queue[str], threading.Thread]] = {}


def _start_reader(proc: subprocess.Popen) -> tuple[queue.Queue[str], threading.Thread]:
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout

    def pump() -> None:
        for line in stdout:
            lines.put(line)
        lines.put("")  # EOF

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


@contextmanager
def emulator(*args: str, command: tuple[str, ...] = (str(SUPPORT),)
             ) -> Iterator[subprocess.Popen]:
    """The real CLI (``cli.run``), by default serving the tiny test archive."""
    proc = subprocess.Popen([sys.executable, *command, "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        reader = _readers.pop(proc.pid, None)
        if reader:
            reader[1].join(timeout=5)  # it sees EOF now that the process is gone
        for stream in (proc.stdout, proc.stderr):
            if stream:
                stream.close()


def stop(proc: subprocess.Popen, sig: signal.Signals) -> tuple[int, str]:
    proc.send_signal(sig)
    code = proc.wait(timeout=10)
    assert proc.stderr is not None
    return code, proc.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_prints_urls_first_and_exits_0_on_signal(sig: signal.Signals) -> None:
    with emulator("--nlst-port", "0") as proc:
        url, nlst_url = read_line(proc), read_line(proc)
        assert url.startswith("http://127.0.0.1:") and nlst_url.startswith("http://127.0.0.1:")
        assert url != nlst_url
        assert httpx.get(url + V4 + "getCollectionValues", timeout=10).json()
        assert httpx.get(nlst_url + V4 + "getCollectionValues", timeout=10).json() == [
            {"Collection": "NLST-Tiny"}]
        assert stop(proc, sig)[0] == 0


def test_flags_reach_the_server(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"dave": {"password": "s3cret-pw", "collections": ["*"]},
                                 "api_keys": ["file-key"]}))
    faults = json.dumps({"p503": 1.0, "endpoints": ["getPatient"]})
    with emulator("--users-file", str(users), "--faults", faults,
                  "--latency-ms", "50", "--token-lifetime", "60", "--verbose") as proc:
        url = read_line(proc)
        config = httpx.get(url + "/_emulator/faults", timeout=10).json()
        assert (config["p503"], config["latency_ms"]) == (1.0, 50.0)
        assert httpx.get(url + V4 + "getPatient", timeout=10).status_code == 503
        token = httpx.post(url + "/nbia-api/oauth/token", timeout=10, data={
            "grant_type": "password", "username": "dave", "password": "s3cret-pw"}).json()
        assert token["expires_in"] == 60
        legacy = url + "/services/v3/TCIA/query/getCollectionValues"
        assert httpx.get(legacy, params={"api_key": "file-key"}, timeout=10).status_code == 200
        code, stderr = stop(proc, signal.SIGTERM)
    assert code == 0
    assert "getCollectionValues" in stderr  # --verbose logs requests ...
    for secret in ("s3cret-pw", token["access_token"], "file-key"):
        assert secret not in stderr  # ... but never a password, token or key


def test_bad_users_file_is_a_clear_error(tmp_path: Path) -> None:
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"dave": {"collections": []}}))
    with emulator("--users-file", str(users)) as proc:
        code = proc.wait(timeout=30)
        assert proc.stderr is not None and proc.stdout is not None
        assert code == 2 and "needs a string 'password'" in proc.stderr.read()
        assert read_line(proc, timeout=5) == ""  # EOF: nothing on stdout


def test_busy_port_fails_cleanly() -> None:
    with emulator() as first:
        port = read_line(first).rsplit(":", 1)[1]
        with emulator("--port", port) as second:
            assert second.wait(timeout=30) == 1


def test_module_entry_point_with_demo_profile(demo_data_dir: Path) -> None:
    """`python -m tciafs.emulator` on the real generated demo archive, stopped by SIGTERM."""
    with emulator("--profile", "demo", "--data-dir", str(demo_data_dir),
                  command=("-m", "tciafs.emulator")) as proc:
        url = read_line(proc, timeout=180)  # the first run generates the archive
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + V4 + "getSeries", timeout=30).json()
        assert stop(proc, signal.SIGTERM)[0] == 0


def test_demo_profile_urls(emulator) -> None:  # noqa: ANN001 (conftest fixture)
    assert emulator.url.startswith("http://") and emulator.nlst_url.startswith("http://")
    main = {c["Collection"] for c in httpx.get(emulator.url + V4 + "getCollectionValues",
                                               timeout=30).json()}
    nlst = {c["Collection"] for c in httpx.get(emulator.nlst_url + V4 + "getCollectionValues",
                                               timeout=30).json()}
    assert main and nlst and not main & nlst
    start = time.monotonic()
    assert httpx.get(emulator.url + "/_emulator/stats", timeout=10).status_code == 200
    assert time.monotonic() - start < 2
