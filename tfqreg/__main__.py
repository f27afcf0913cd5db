"""``python -m tfqreg``: the ``tfqreg`` command (:mod:`tfqreg.cli`)."""

import sys

from tfqreg.cli import main

if __name__ == "__main__":  # pragma: no cover - run as a command
    sys.exit(main())
