"""The arguments every converter shares, checked in one place before any work: modes, I/O
types, batch size, thresholds, representative / sample data, the output path and
``overwrite``, and the low-bit options (``weight_bits``, ``runtime``, ``per_channel``).

Below the converters (:mod:`tfqreg.deploy.convert`, :mod:`tfqreg.deploy.micro`); every check
raises ``TypeError`` / ``ValueError`` (``FileExistsError`` for an existing output) with one
line naming the argument.

>>> from tfqreg.deploy import arguments
>>> arguments.check_arguments(mode="int8", representative_data=None)   # doctest: +SKIP
Traceback (most recent call last):
ValueError: `representative_data` is required for mode='int8': ...
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from tfqreg.deploy.report import check_overwrite

__all__ = ["MODES", "IO_DTYPES", "MAX_BATCH_SIZE", "RUNTIMES", "CALIBRATION_SAMPLES",
           "check_arguments", "check_path", "check_lowbit_arguments"]

MODES = ("float", "dynamic", "int8")
MAX_BATCH_SIZE = 1 << 16
"""Largest static batch size of an exported model (the parity check pads a batch to it)."""
IO_DTYPES = ("int8", "uint8", "float32")
RUNTIMES = ("litert", "micro")
"""Runtimes a low-bit file is made for (``tfqreg.deploy.lowbit.RUNTIMES``)."""
CALIBRATION_SAMPLES = 500
"""Representative samples used for calibration by default
(``tfqreg.deploy.samples.CALIBRATION_SAMPLES``)."""


def check_arguments(mode: Optional[str] = None, io_dtype: Optional[str] = None,
                    batch_size: Optional[int] = 1, representative_data: Any = None,
                    min_agreement: float = 0.99, atol: float = 1e-5, check: bool = True,
                    allow_float_ops: bool = False,
                    calibration_samples: Optional[int] = CALIBRATION_SAMPLES,
                    sample: Any = None) -> None:
    """The one place export arguments are checked (``None`` for ``mode`` / ``io_dtype``: not
    checked).

    Raises:
        TypeError / ValueError: naming the argument.
    """
    from tfqreg import _checks

    if mode is not None and mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if io_dtype is not None and io_dtype not in IO_DTYPES:
        raise ValueError(f"`io_dtype` must be one of {IO_DTYPES}, got {io_dtype!r}.")
    if mode == "int8" and representative_data is None:
        raise ValueError(
            "`representative_data` is required for mode='int8': pass a few hundred typical "
            "inputs (an array shaped like the model's input with a batch axis, a tf.data.Dataset "
            "or a generator) so the converter can calibrate the activation ranges."
        )
    for name, data in (("representative_data", representative_data), ("sample", sample)):
        if isinstance(data, (str, bytes)) or isinstance(data, (bool, int, float)) and \
                data is not None:
            raise TypeError(f"`{name}` must be an array, a list of arrays, a tf.data.Dataset "
                            f"or a generator, got {type(data).__name__} {data!r}.")
    if mode is not None and mode != "int8" and io_dtype not in (None, "float32"):
        raise ValueError(f"`io_dtype`={io_dtype!r} needs mode='int8' (mode is {mode!r}).")
    if batch_size is not None:
        _checks.check_int("batch_size", batch_size, low=1, high=MAX_BATCH_SIZE)
    _checks.check_real("min_agreement", min_agreement, low=0.0, high=1.0)
    _checks.check_real("atol", atol, low=0.0)
    _checks.check_bool("check", check)
    _checks.check_bool("allow_float_ops", allow_float_ops)
    if calibration_samples is not None:
        _checks.check_int("calibration_samples", calibration_samples, low=1)


def check_path(path: Any, overwrite: bool) -> None:
    """``path`` (``None``, or a file name for the ``.tflite`` and its ``.json`` report) and
    ``overwrite``, checked before any work.

    Raises:
        TypeError: ``path`` is not a string / path, ``overwrite`` not a bool.
        FileExistsError / IsADirectoryError: see
            :func:`~tfqreg.deploy.report.check_overwrite`.
    """
    if path is None:
        if not isinstance(overwrite, bool):
            raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}.")
        return
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"`path` must be a file name, got {type(path).__name__} {path!r}.")
    path = os.fspath(path)
    check_overwrite("path", [path, os.path.splitext(path)[0] + ".json"], overwrite)


def check_lowbit_arguments(weight_bits: Any, runtime: Any, per_channel: Any) -> None:
    """``weight_bits`` (None, 8, 4 or 2), ``runtime`` and ``per_channel``, checked whatever
    ``weight_bits`` is (so a misspelled ``runtime`` is never ignored silently).

    Raises:
        TypeError / ValueError: naming the argument.
    """
    if isinstance(weight_bits, (bool, np.bool_)) or weight_bits not in (None, 8, 4, 2) or \
            isinstance(weight_bits, float):
        raise ValueError(f"`weight_bits` must be None, 8, 4 or 2, got {weight_bits!r}.")
    if not isinstance(runtime, str) or runtime not in RUNTIMES:
        raise ValueError(f"`runtime` must be one of {RUNTIMES}, got {runtime!r}.")
    if not isinstance(per_channel, (bool, np.bool_)):
        raise TypeError(f"`per_channel` must be a bool, got {per_channel!r}.")
