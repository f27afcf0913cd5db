"""Whether this process is the ``tfqreg`` command (TensorFlow-free; used before it is imported).

The console script ``tfqreg`` and ``python -m tfqreg`` import the package before they parse
their arguments; :mod:`tfqreg` then defers its TensorFlow imports (see :func:`is_command`) so
that ``--help`` and argument errors answer at once, and :mod:`tfqreg._keras` quiets
TensorFlow's C++ logging for the command only.
"""

from __future__ import annotations

import os
import sys

__all__ = ["is_command"]


def is_command() -> bool:
    """True in the ``tfqreg`` console script and in ``python -m tfqreg`` / ``-m tfqreg.cli``.

    The console script's ``sys.argv[0]`` ends in ``tfqreg``; while ``python -m`` imports the
    package, ``sys.argv[0]`` is ``"-m"`` and ``sys.orig_argv`` names the module.
    """
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "tfqreg":
        return True
    orig = list(getattr(sys, "orig_argv", []) or [])
    if "-m" in orig[:-1]:
        return orig[orig.index("-m") + 1] in ("tfqreg", "tfqreg.cli")
    return False
