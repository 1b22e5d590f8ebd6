"""`python -m experiments`: runs metagrad's experiment suite (see `--help`)."""

import sys

from experiments.cli import main

if __name__ == "__main__":
    sys.exit(main())
