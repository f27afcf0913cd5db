"""The package's argument checks: one place decides what a bool, an integer and a real number
are, so that ``per_channel="False"``, ``batch_size=True`` or ``beta=True`` are refused the same
way everywhere (Python would take the first two as ``True`` and the last as ``1``).

Every function returns the value as a plain Python type and raises ``TypeError`` (wrong type)
or ``ValueError`` (out of range) with a message that names the argument, prefixed by ``owner``
when given (e.g. ``"LearnableMSQE: `per_channel` must be a bool, got 'False' (str)."``).

>>> from tfqreg import _checks
>>> _checks.check_bool("per_channel", True)
True
>>> _checks.check_int("batch_size", 32, low=1)
32
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np

__all__ = ["check_bool", "check_int", "check_real"]


def _prefix(owner: Optional[str]) -> str:
    return f"{owner}: " if owner else ""


def check_bool(name: str, value, owner: Optional[str] = None) -> bool:
    """``value`` if it is a bool (``numpy.bool_`` included); strings, numbers and ``None``
    are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{_prefix(owner)}`{name}` must be a bool, got {value!r} "
                        f"({type(value).__name__}).")
    return bool(value)


def check_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None,
              owner: Optional[str] = None) -> int:
    """``value`` if it is an integer (not a bool) in ``[low, high]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{_prefix(owner)}`{name}` must be an integer, got {value!r} "
                        f"({type(value).__name__}).")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{_prefix(owner)}`{name}` must be >= {low}, got {value}.")
    if high is not None and value > high:
        raise ValueError(f"{_prefix(owner)}`{name}` must be <= {high}, got {value}.")
    return value


def check_real(name: str, value, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, owner: Optional[str] = None) -> float:
    """``value`` if it is a finite real number (not a bool) in ``[low, high]`` (``(low, high]``
    with ``low_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{_prefix(owner)}`{name}` must be a real number, got {value!r} "
                        f"({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{_prefix(owner)}`{name}` must be finite, got {value}.")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{_prefix(owner)}`{name}` must be {'>' if low_open else '>='} {low:g}, "
                         f"got {value:g}.")
    if high is not None and value > high:
        raise ValueError(f"{_prefix(owner)}`{name}` must be at most {high:g}, got {value:g}.")
    return value
