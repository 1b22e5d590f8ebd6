"""`python -m experiments`: runs metagrad's experiment suite (see `--help`)."""

import sys

from experiments.runner import main

if __name__ == "__main__":
    sys.exit(main())
