"""`python -m dsv3 ...` (and `torchrun --nproc-per-node N -m dsv3 train ...`): the `dsv3` command."""

import sys

from dsv3.cli import main

if __name__ == "__main__":
    sys.exit(main())
