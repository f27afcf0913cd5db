"""TFLite and Larq Compute Engine export, under its earlier name.

The code lives in :mod:`tfqreg.deploy` (reading: :mod:`tfqreg.deploy.tflite_file`, running:
:mod:`tfqreg.deploy.runtime`, reports: :mod:`tfqreg.deploy.report`, converters:
:mod:`tfqreg.deploy.convert`, command line: :mod:`tfqreg.deploy.cli`); this module re-exports
its public names so ``from tfqreg import export; export.to_tflite(...)`` keeps working.
"""

from tfqreg.deploy.cli import TARGETS, add_arguments, run_cli
from tfqreg.deploy.convert import (IO_DTYPES, MODES, ConversionError, ParityError, load_model,
                                   to_lce, to_tflite)
from tfqreg.deploy.report import ExportReport, ExportResult, ParityReport
from tfqreg.deploy.runtime import Runner
from tfqreg.deploy.tflite_file import OpInfo, TensorInfo, TfliteGraph, read_tflite

__all__ = [
    "MODES",
    "IO_DTYPES",
    "TARGETS",
    "ConversionError",
    "ParityError",
    "TensorInfo",
    "OpInfo",
    "TfliteGraph",
    "read_tflite",
    "Runner",
    "ParityReport",
    "ExportReport",
    "ExportResult",
    "to_tflite",
    "to_lce",
    "load_model",
    "add_arguments",
    "run_cli",
]
