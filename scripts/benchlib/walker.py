"""Walk a tree depth first as `find` does (readdir and the entries' types, no stat),
stopping once `limit` files are seen; print what it saw as JSON.

    python walker.py ROOT LIMIT [--long]

`--long` also stats every file, as `ls -lR` or an indexer does.
"""

from __future__ import annotations

import json
import os
import sys
import time


def walk(root: str, limit: int, long: bool) -> dict[str, float]:
    files = dirs = 0
    started = time.perf_counter()
    stack = [root]
    while stack and files < limit:
        path = stack.pop()
        dirs += 1
        below = []
        with os.scandir(path) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    below.append(entry.path)
                else:
                    files += 1
                    if long:
                        entry.stat(follow_symlinks=False)
        stack += reversed(below)
    return {"files": files, "dirs": dirs, "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    print(json.dumps(walk(sys.argv[1], int(sys.argv[2]), "--long" in sys.argv[3:])))
