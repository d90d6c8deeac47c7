"""The emulator as a process of its own, for the tests, the demo mount and the benchmark.

:func:`start` runs ``python -m tciafs.emulator`` (or another command that runs
:func:`tciafs.emulator.cli.run`) on a free port and waits, up to a deadline, for the
URL lines it prints once it serves: generating an archive may come first.  Only the
standard library is used here, so a caller loads nothing of the server to start one.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: ``python -m tciafs.emulator`` under this interpreter.
COMMAND: tuple[str, ...] = (sys.executable, "-m", "tciafs.emulator")


class EmulatorStartError(RuntimeError):
    """The emulator exited, or stayed silent, before it printed its URL."""


@dataclass
class RunningEmulator:
    """A started emulator: where it serves, and how to stop it."""

    url: str
    nlst_url: str | None
    proc: subprocess.Popen[bytes]
    log: Path | None = None  # where its stderr goes; None: this process's stderr
    data_dir: Path | None = None
    s3_url: str | None = None  # the S3 endpoint of the IDC side, with `s3`

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, SIGKILL if it is still there after `timeout` s; its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self) -> RunningEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start(*args: str, data_dir: Path | None = None, nlst: bool = False, s3: bool = False,
          log: Path | None = None, command: Sequence[str] = COMMAND,
          timeout: float = 180.0) -> RunningEmulator:
    """Start `command` on a free port with `args` (later ones win), and wait for its URL
    and, with `nlst`, the NLST server's, with `s3`, the S3 endpoint's (in that order).
    Its stderr goes to `log`, appended."""
    cmd = [*command, "--port", "0"]
    cmd += ["--data-dir", str(data_dir)] if data_dir is not None else []
    cmd += [*args, *(("--nlst-port", "0") if nlst else ()), *(("--s3-port", "0") if s3 else ())]
    wanted = 1 + nlst + s3
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # its log lines appear as they happen
    if log is None:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                env=env)
    else:
        with open(log, "ab") as sink:  # the child keeps its own descriptor
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=sink,
                                    stdin=subprocess.DEVNULL, env=env)
    lines = _url_lines(proc, wanted, timeout)
    if len(lines) < wanted or not all(u.startswith("http://") for u in lines):
        proc.kill()
        status = proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        where = f"see {log}" if log is not None else "see its stderr"
        raise EmulatorStartError(f"the emulator did not start (exit status {status}, "
                                 f"printed {lines!r}); {where}")
    return RunningEmulator(lines[0], lines[1] if nlst else None, proc, log, data_dir,
                           lines[-1] if s3 else None)


def _url_lines(proc: subprocess.Popen[bytes], count: int, timeout: float) -> list[str]:
    """The first `count` lines of `proc`'s stdout; fewer if it ends or the deadline
    passes first."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()  # read raw: a buffered reader would block past the deadline
    deadline = time.monotonic() + timeout
    data = b""
    while data.count(b"\n") < count:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:  # the emulator exited
            break
        data += chunk
    complete = data.split(b"\n")[:-1]  # a line is only whole once its newline came
    return [line.decode(errors="replace").strip() for line in complete[:count]]
