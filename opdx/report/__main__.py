"""``python -m opdx.report <output_dir> [--out DIR]``."""

import sys

from opdx.report import main

if __name__ == "__main__":
    sys.exit(main())
