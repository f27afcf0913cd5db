"""``tfqreg export MODEL --target tflite|int8|edgetpu|micro|lce --out DIR``.

The top of :mod:`tfqreg.deploy`: it loads the model (:func:`~tfqreg.deploy.convert.load_model`),
reads calibration/check data, calls the converter for the target and, for ``edgetpu``, the
pre-flight check, and prints the reports. :mod:`tfqreg.cli` wires :func:`add_arguments` and
:func:`run_cli` in as the ``export`` subcommand.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Tuple

import numpy as np

from tfqreg.deploy.convert import IO_DTYPES, ConversionError, ParityError, load_model, to_lce, \
    to_tflite
from tfqreg.deploy.edgetpu import check_edgetpu
from tfqreg.deploy.micro import to_micro
from tfqreg.deploy.samples import CALIBRATION_SAMPLES, CHECK_SAMPLES

__all__ = ["TARGETS", "add_arguments", "run_cli"]

TARGETS = ("tflite", "int8", "edgetpu", "micro", "lce")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``tfqreg export`` to ``parser``."""
    parser.add_argument("model", metavar="MODEL", help=".keras / .h5 file or SavedModel folder")
    parser.add_argument("--target", choices=TARGETS, required=True,
                        help="tflite: float (or --mode dynamic); int8: full integer; edgetpu: "
                             "int8 + Edge TPU pre-flight; micro: int8 + TFLite Micro C source; "
                             "lce: Larq Compute Engine")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--name", default=None, help="base name of the files (default: MODEL's)")
    parser.add_argument("--mode", choices=("float", "dynamic"), default="float",
                        help="for --target tflite")
    parser.add_argument("--io-dtype", choices=IO_DTYPES, default=None,
                        help="int8 targets: input/output type (default int8)")
    parser.add_argument("--batch-size", type=int, default=1, help="static batch size (0: dynamic)")
    parser.add_argument("--data", default="fashion_mnist",
                        help="calibration/check data: fashion_mnist, mnist, or a .npy file of "
                             "float inputs")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the IDX files (default $TFQREG_DATA_DIR)")
    parser.add_argument("--tfds-dir", default=None, help="tensorflow-datasets data_dir")
    parser.add_argument("--samples", type=int, default=CALIBRATION_SAMPLES,
                        help="calibration samples (int8 targets)")
    parser.add_argument("--check-samples", type=int, default=CHECK_SAMPLES,
                        help="samples for the parity check")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--arena-margin", type=int, default=1024,
                        help="micro: bytes added to the measured arena (plus 10%%)")


def _cli_data(args: argparse.Namespace,
              need: bool) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    if not need:
        return None, None
    if args.data.endswith(".npy"):
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data {args.data!r} does not exist.")
        x = np.load(args.data)
        return x[: args.samples], x[: args.check_samples]
    from tfqreg import datasets

    (x, _), (xt, _) = datasets.load_numpy(args.data, args.data_dir, args.tfds_dir)
    return x[: args.samples], xt[: args.check_samples]


def _export(args: argparse.Namespace) -> str:
    model = load_model(args.model)
    base = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    os.makedirs(args.out, exist_ok=True)
    batch = args.batch_size or None
    check = not args.no_check
    tflite_path = os.path.join(args.out, f"{base}.tflite")
    target = args.target
    need_data = target in ("int8", "edgetpu", "micro") or check
    rep, sample = _cli_data(args, need_data)
    if target == "tflite":
        res = to_tflite(model, mode=args.mode, batch_size=batch, check=check, sample=sample,
                        path=tflite_path, min_agreement=args.min_agreement)
        return res.report.to_text() + f"\nwrote {tflite_path}"
    if target in ("int8", "edgetpu"):
        res = to_tflite(model, mode="int8", representative_data=rep, io_dtype=args.io_dtype,
                        batch_size=batch, check=check, sample=sample, path=tflite_path,
                        min_agreement=args.min_agreement)
        text = res.report.to_text() + f"\nwrote {tflite_path}"
        if target == "edgetpu":
            tpu = check_edgetpu(res.flatbuffer, out_dir=args.out)
            rpath = os.path.join(args.out, f"{base}_edgetpu.json")
            with open(rpath, "w") as f:
                f.write(tpu.to_json())
            text += "\n\n" + tpu.to_text() + f"\nwrote {rpath}"
        return text
    if target == "micro":
        res = to_micro(model, rep, args.out, name=base, io_dtype=args.io_dtype or "int8",
                       check=check, sample=sample, arena_margin=(args.arena_margin, 0.10),
                       min_agreement=args.min_agreement)
        return res.to_text()
    res = to_lce(model, batch_size=batch, check=check, sample=sample, path=tflite_path,
                 min_agreement=args.min_agreement)
    return res.report.to_text() + f"\nwrote {tflite_path}"


def run_cli(args: argparse.Namespace) -> int:
    """Run ``tfqreg export``: print the report, return 0; on bad input print one clear error
    line (no traceback) to stderr and return 2 (1 for a failed parity check)."""
    try:
        text = _export(args)
    except ParityError as e:
        print(e.report.to_text(), file=sys.stdout)
        print(f"tfqreg export: parity check failed: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, TypeError, ConversionError) as e:
        print(f"tfqreg export: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
