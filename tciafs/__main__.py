import sys

from tciafs.cli import main

sys.exit(main())
