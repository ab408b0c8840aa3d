"""``python -m dkl ...`` and ``torchrun ... -m dkl train ...``."""

import sys

from dkl.cli import main

if __name__ == "__main__":
    sys.exit(main())
