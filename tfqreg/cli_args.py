"""The arguments of every ``tfqreg`` subcommand, without TensorFlow.

``tfqreg --help``, ``tfqreg <command> --help`` and argument errors are answered from this
module alone: it imports only :mod:`argparse` and :mod:`os`, so the command answers them without
importing TensorFlow (about 5 s on a small machine). The subcommand's implementation is imported
after parsing (see :mod:`tfqreg.cli`). The constants below repeat a few values of modules that
import TensorFlow (``datasets.DATASETS``, ``deploy.TARGETS``, ``Compressor``'s epochs, ...);
``tests/test_cli.py`` checks that each copy equals its source.

>>> import argparse
>>> from tfqreg import cli_args
>>> p = argparse.ArgumentParser()
>>> cli_args.add_sweep_arguments(p)
>>> p.parse_args(["model.keras", "--bits", "8", "4"]).bits
[8, 4]
"""

from __future__ import annotations

import argparse
import os

__all__ = ["DATASETS", "DATA_ENV_VAR", "EXPORT_TARGETS", "EXPORT_WEIGHT_BITS",
           "EXPORT_RUNTIMES", "EXPORT_IO_DTYPES", "CALIBRATION_SAMPLES", "CHECK_SAMPLES",
           "REFERENCE_MODELS", "CODING_MODES", "PRUNE_EPOCHS", "QUANT_EPOCHS",
           "SWEEP_BITS", "add_run_arguments", "add_export_arguments",
           "add_compress_arguments", "add_sweep_arguments"]

DATASETS = ("mnist", "fashion_mnist")
"""``tfqreg.datasets.DATASETS``."""
DATA_ENV_VAR = "TFQREG_DATA_DIR"
"""``tfqreg.datasets.ENV_VAR``."""
EXPORT_TARGETS = ("tflite", "int8", "edgetpu", "micro", "lce")
EXPORT_WEIGHT_BITS = (8, 4, 2)
EXPORT_RUNTIMES = ("litert", "micro")
EXPORT_IO_DTYPES = ("int8", "uint8", "float32")
"""``tfqreg.deploy.convert.IO_DTYPES``."""
CALIBRATION_SAMPLES = 500
"""``tfqreg.deploy.samples.CALIBRATION_SAMPLES``."""
CHECK_SAMPLES = 1000
"""``tfqreg.deploy.samples.CHECK_SAMPLES``."""
REFERENCE_MODELS = ("small_cnn", "tiny_cnn")
CODING_MODES = ("auto", "sparse", "dense")
"""``tfqreg.compression.codec.MODES``."""
PRUNE_EPOCHS = 3
"""``Compressor``'s default ``prune_epochs``."""
QUANT_EPOCHS = 3
"""``Compressor``'s default ``quant_epochs``."""
SWEEP_BITS = [8, 6, 5, 4, 3, 2]


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tfqreg run`` (the same as ``tfqreg.main_job.add_arguments``)."""
    parser.add_argument("--data", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with the IDX files (default ${DATA_ENV_VAR}, else "
                             "../shared/data if present, else a tensorflow-datasets download)")
    parser.add_argument("--tfds-dir", default=None, help="tensorflow-datasets data_dir")
    parser.add_argument("--regularizer", default="linf",
                        help="tfqreg regularizer alias for the regularized model (default linf)")
    parser.add_argument("--strength", type=float, default=None,
                        help="its strength l (default: the regularizer's own default)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", default=os.path.join("runs", "main"),
                        help="folder for the table (JSON) and the plot")
    parser.add_argument("--export-dir", default=os.path.join("tflite_models", "main_job"),
                        help="folder for the .tflite and micro artifacts")
    parser.add_argument("--no-export", action="store_true", help="skip the TFLite/micro export")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2,000 training and 1,000 test images, 1 epoch")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tfqreg export`` (:mod:`tfqreg.deploy.cli`)."""
    parser.add_argument("model", metavar="MODEL", help=".keras / .h5 file or SavedModel folder")
    parser.add_argument("--target", choices=EXPORT_TARGETS, required=True,
                        help="tflite: float (or --mode dynamic); int8: full integer; edgetpu: "
                             "int8 + Edge TPU pre-flight; micro: int8 + TFLite Micro C source; "
                             "lce: Larq Compute Engine")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--name", default=None, help="base name of the files (default: MODEL's)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace output files that exist (otherwise they are refused)")
    parser.add_argument("--mode", choices=("float", "dynamic"), default="float",
                        help="for --target tflite")
    parser.add_argument("--weight-bits", type=int, choices=EXPORT_WEIGHT_BITS, default=8,
                        help="8: the TF converter's int8 weights; 4 / 2: packed INT4 / INT2 "
                             "weights on tfqreg's grid (2: INT2 FULLY_CONNECTED, INT4 "
                             "convolutions; LiteRT only), checked against the simulated model "
                             "(targets int8, micro, and tflite with --mode dynamic)")
    parser.add_argument("--runtime", choices=EXPORT_RUNTIMES, default=None,
                        help="runtime of a --weight-bits 4|2 file: decides what is refused and "
                             "where the check runs (default: micro for --target micro, "
                             "otherwise litert)")
    parser.add_argument("--io-dtype", choices=EXPORT_IO_DTYPES, default=None,
                        help="int8 targets: input/output type (default int8)")
    parser.add_argument("--batch-size", type=int, default=1, help="static batch size (0: dynamic)")
    parser.add_argument("--data", default="fashion_mnist",
                        help="calibration/check data: fashion_mnist, mnist, or a .npy file of "
                             "float inputs")
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with the IDX files (default ${DATA_ENV_VAR})")
    parser.add_argument("--tfds-dir", default=None, help="tensorflow-datasets data_dir")
    parser.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES,
                        help="calibration samples (int8 targets)")
    parser.add_argument("--check-samples", type=int, default=CHECK_SAMPLES,
                        help="samples for the parity check")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--arena-margin", type=int, default=1024,
                        help="micro: bytes added to the measured arena (plus 10%%)")


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tfqreg compress`` (:mod:`tfqreg.compression.cli`)."""
    parser.add_argument("model", metavar="MODEL",
                        help="saved Keras model (.keras, .h5, SavedModel folder) or one of "
                             f"{', '.join(REFERENCE_MODELS)} (trained in float first)")
    parser.add_argument("--prune", type=float, default=0.8, metavar="R",
                        help="fraction of each kernel's weights to prune (default 0.8)")
    parser.add_argument("--bits", type=int, default=4, help="grid bit width (default 4)")
    parser.add_argument("--data", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder for model.tfqz and report.json")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of each training stage (sets both of the next two)")
    parser.add_argument("--prune-epochs", type=int, default=PRUNE_EPOCHS,
                        help=f"epochs with the learnable partial L2 (default {PRUNE_EPOCHS})")
    parser.add_argument("--quant-epochs", type=int, default=QUANT_EPOCHS,
                        help=f"epochs of MSQE fine-tuning with the mask fixed (default "
                             f"{QUANT_EPOCHS})")
    parser.add_argument("--float-epochs", type=int, default=4,
                        help="float training of a reference MODEL name (default 4)")
    parser.add_argument("--per-channel", action="store_true", help="one step per channel")
    parser.add_argument("--narrow-range", action="store_true", help="symmetric narrow grid")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--mode", default="auto", choices=CODING_MODES,
                        help="coding of the zeros: smaller of sparse/dense per kernel (auto)")
    parser.add_argument("--grid-tol", type=float, default=None,
                        help="stop MSQE fine-tuning once the RMS distance to the grid "
                             "(in steps) is below this")
    parser.add_argument("--layers", nargs="+", default=None,
                        help="compress only these layers (default: every Dense/Conv kernel)")
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with the IDX files (default: ${DATA_ENV_VAR})")
    parser.add_argument("--tfds-dir", default=None, help="tensorflow-datasets data_dir")
    parser.add_argument("--train-limit", type=int, default=None, help="use N training images")
    parser.add_argument("--test-limit", type=int, default=None, help="use N test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DIR/model.tfqz and DIR/report.json if they exist")


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tfqreg sweep`` (:func:`tfqreg.ptq.cli.run_cli`)."""
    parser.add_argument("model", help="saved Keras model (.keras, .h5 or SavedModel folder)")
    parser.add_argument("--data", default="fashion_mnist", choices=DATASETS)
    parser.add_argument("--data-dir", default=None,
                        help=f"folder with the IDX files (default ${DATA_ENV_VAR})")
    parser.add_argument("--tfds-dir", default=None, help="tensorflow-datasets data_dir")
    parser.add_argument("--bits", nargs="+", type=int, default=list(SWEEP_BITS),
                        help="weight bit widths (2..16)")
    parser.add_argument("--per-tensor", action="store_true", help="one step per kernel")
    parser.add_argument("--activation-bits", type=int, default=None,
                        help="also quantize activations to this width")
    parser.add_argument("--calibration-samples", type=int, default=1024,
                        help="training images used to calibrate activation ranges")
    parser.add_argument("--limit", type=int, default=None,
                        help="evaluate on the first N test images only")
    parser.add_argument("--json", default=None, help="write the result as JSON")
    parser.add_argument("--csv", default=None, help="write the result as CSV")
    parser.add_argument("--plot", default=None, help="write an accuracy-vs-bits plot (PNG)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing --json / --csv / --plot files")
