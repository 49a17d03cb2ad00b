"""`python -m opdx.train` / `torchrun -m opdx.train`: the trainer's command line (opdx.train.loop.main)."""

import sys

from opdx.train.loop import main

if __name__ == "__main__":
    sys.exit(main())
