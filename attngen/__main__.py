"""`python -m attngen ...`: the same command line as the `attngen` script."""

import sys

from attngen.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
