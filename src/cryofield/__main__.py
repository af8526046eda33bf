"""``python -m cryofield`` (and ``torchrun ... -m cryofield train ...``): the command line."""

import sys

from cryofield.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
