"""The emulator with a scale profile of chosen size (for `--quick`).

    python scale_emulator.py COLLECTIONS PATIENTS [emulator options...]

The full benchmark uses `--profile scale` (10 collections x 10 patients x 2 studies x
5 series x 100 instances); the quick one shrinks the number of collections and patients.
"""

from __future__ import annotations

import argparse
import sys

from tciafs.emulator import cli
from tciafs.emulator.archive import load_archive
from tciafs.emulator.profiles import scale


def main(argv: list[str]) -> int:
    collections, patients = int(argv[0]), int(argv[1])
    parser = argparse.ArgumentParser(prog="scale_emulator")
    cli.add_arguments(parser)
    args = parser.parse_args(argv[2:])
    return cli.run(args, load_archive(scale(collections=collections, patients=patients)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
