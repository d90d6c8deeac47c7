"""The emulator with a `scale` profile of any shape, made on demand (metadata only until
a series is asked for), for the scale figures until a profile of the wanted shape exists.

    python sized_emulator.py COLLECTIONS PATIENTS STUDIES SERIES IMAGES [emulator options...]
"""

from __future__ import annotations

import argparse
import sys

from tciafs.emulator import cli
from tciafs.emulator.archive import load_archive
from tciafs.emulator.profiles import scale


def main(argv: list[str]) -> int:
    collections, patients, studies, series, images = map(int, argv[:5])
    parser = argparse.ArgumentParser(prog="sized_emulator")
    cli.add_arguments(parser)
    args = parser.parse_args(argv[5:])
    return cli.run(args, load_archive(scale(collections=collections, patients=patients,
                                            studies=studies, series=series, images=images)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
