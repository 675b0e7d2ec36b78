"""`python -m mtmerge merge ...`: the same as the `mtmerge` console script."""

import sys

from mtmerge.cli import main

if __name__ == "__main__":
  sys.exit(main())
