"""``python -m tciafs.emulator [args]``: see :mod:`tciafs.emulator.cli`."""

import sys

from tciafs.emulator.cli import main

if __name__ == "__main__":
    sys.exit(main())
