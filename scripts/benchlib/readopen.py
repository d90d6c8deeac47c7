"""Time reading files whose descriptors are already open, as `cat` reads them.

`python readopen.py FILE...` opens every file first, untimed, then reads each to its
end in 128 KiB reads (coreutils' buffer), and prints the seconds the reads took. Beside
a timed `cat` of the same files it separates what reading costs from what opening and
closing cost, which through FUSE are round trips to the daemon.
"""

from __future__ import annotations

import os
import sys
import time

BLOCK = 128 << 10


def read_open(paths: list[str]) -> float:
    fds = [os.open(path, os.O_RDONLY | os.O_CLOEXEC) for path in paths]
    try:
        buffer = bytearray(BLOCK)
        started = time.perf_counter()
        for fd in fds:
            while os.readv(fd, [buffer]):
                pass
        return time.perf_counter() - started
    finally:
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    print(f"{read_open(sys.argv[1:]):.6f}")
