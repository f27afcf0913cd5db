"""``tfqreg export MODEL --target tflite|int8|edgetpu|micro|lce [--weight-bits 8|4|2]
[--runtime litert|micro] --out DIR``.

The top of :mod:`tfqreg.deploy`: it checks the arguments (:func:`check_cli_arguments`, before
anything is loaded or written), loads the model (:func:`~tfqreg.deploy.convert.load_model`),
reads calibration/check data, calls the converter for the target and, for ``edgetpu``, the
pre-flight check, and prints the reports. :mod:`tfqreg.cli` wires :func:`add_arguments` and
:func:`run_cli` in as the ``export`` subcommand.

``--weight-bits 4`` / ``2`` writes packed INT4 / INT2 weights on the grid
:func:`tfqreg.ptq.quantize` simulates (:func:`~tfqreg.deploy.convert.to_tflite` with
``weight_bits``; the parity check compares with the simulated model):

=============================================  ==============================================
command                                        file
=============================================  ==============================================
``--target int8 --weight-bits 4``               INT4 weights, int8 activations, LiteRT
``--target int8 --weight-bits 2``               INT2 FULLY_CONNECTED, INT4 convolutions holding
                                                the 2-bit grid, int8 activations, LiteRT
``--target int8 --weight-bits 4 --runtime       INT4 (Dense per tensor), checked in TFLite
micro``                                         Micro; no C source
``--target micro --weight-bits 4``              the same + C source and measured arena
                                                (:func:`~tfqreg.deploy.micro.to_micro`)
``--target tflite --mode dynamic               packed INT4 / INT2 weights, float activations
--weight-bits 4|2``                             (DEQUANTIZE ops), LiteRT
=============================================  ==============================================

Refused (one line ``tfqreg export: error: ...``, exit code 2): ``--weight-bits 4|2`` with
``--target edgetpu`` (the Edge TPU runs int8 only) or ``--target lce``; ``--weight-bits 2`` on
TFLite Micro (no INT2 kernels); float activations on TFLite Micro; ``--target tflite --mode
float`` with fewer than 8 bits; ``--target micro --runtime litert``; ``--runtime`` with 8-bit
weights on a target that does not run there.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Tuple

import numpy as np

from tfqreg import cli_args
from tfqreg.deploy.convert import ConversionError, ParityError, check_arguments, \
    load_model, to_lce, to_tflite
from tfqreg.deploy.edgetpu import check_edgetpu
from tfqreg.deploy.micro import to_micro

__all__ = ["TARGETS", "WEIGHT_BITS", "RUNTIMES", "add_arguments", "check_cli_arguments",
           "output_files", "run_cli"]

TARGETS = cli_args.EXPORT_TARGETS
WEIGHT_BITS = cli_args.EXPORT_WEIGHT_BITS
RUNTIMES = cli_args.EXPORT_RUNTIMES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of ``tfqreg export`` to ``parser`` (defined TensorFlow-free in
    :func:`tfqreg.cli_args.add_export_arguments`)."""
    cli_args.add_export_arguments(parser)


def check_cli_arguments(args: argparse.Namespace) -> str:
    """Check the arguments of ``tfqreg export`` before anything is loaded or written (last,
    ``--out``: a folder that can be made, is then made, and holds no output file unless
    ``--overwrite``).

    Returns:
        The runtime the file is made for (``"litert"`` or ``"micro"``).

    Raises:
        ValueError: naming the argument and, for a refused combination, why.
        FileNotFoundError: ``--data`` names a ``.npy`` file that does not exist.
    """
    bits, target, mode = args.weight_bits, args.target, args.mode
    if bits not in WEIGHT_BITS:
        raise ValueError(f"--weight-bits must be one of {WEIGHT_BITS}, got {bits!r}.")
    if target == "edgetpu" and bits != 8:
        raise ValueError(
            f"--target edgetpu runs int8 only: the Edge TPU has no INT4/INT2 kernels, so "
            f"--weight-bits {bits} cannot run on it (use --weight-bits 8; for 4-bit weights use "
            "--target int8 (LiteRT) or --target micro (TFLite Micro)).")
    if target == "lce" and bits != 8:
        raise ValueError(
            f"--target lce runs int8 and binary (1-bit) kernels only: Larq Compute Engine "
            f"writes no INT4/INT2 weights, so --weight-bits {bits} is refused (use --target "
            "int8, micro, or tflite --mode dynamic).")
    own = "micro" if target == "micro" else "litert"
    runtime = args.runtime or own
    if target in ("edgetpu", "lce") and runtime != "litert":
        raise ValueError(f"--runtime {runtime} does not apply to --target {target}.")
    if target == "micro" and runtime != "micro":
        raise ValueError("--target micro makes a TFLite Micro model, --runtime litert "
                         "contradicts it (use --target int8 for LiteRT).")
    if bits == 8 and runtime != own:
        raise ValueError(f"--runtime {runtime} is for --weight-bits 4|2; an 8-bit model for "
                         "TFLite Micro is --target micro.")
    io = args.io_dtype
    if bits != 8:
        if target == "tflite" and mode != "dynamic":
            raise ValueError(
                f"--weight-bits {bits} with --target tflite needs --mode dynamic (packed "
                "weights, float activations, LiteRT); --target int8 gives int8 activations.")
        if runtime == "micro" and bits == 2:
            raise ValueError("--weight-bits 2 cannot run on TFLite Micro: it has no INT2 "
                             "kernels (use --weight-bits 4, or --runtime litert for INT2 "
                             "FULLY_CONNECTED weights).")
        if runtime == "micro" and target == "tflite":
            raise ValueError("--mode dynamic cannot run low-bit weights on TFLite Micro: its "
                             "DEQUANTIZE has no INT4/INT2 (use --target micro, or --target "
                             "int8 --runtime micro).")
        allowed = {"tflite": ("float32",), "micro": ("int8",)}.get(target, ("int8", "float32"))
        if io is not None and io not in allowed:
            raise ValueError(f"--io-dtype {io} is not available with --weight-bits {bits} and "
                             f"--target {target} (choose from {', '.join(allowed)}).")
    elif target == "tflite" and io not in (None, "float32"):
        raise ValueError(f"--io-dtype {io} needs an int8 target (int8, edgetpu, micro); "
                         "--target tflite is float32 in and out.")
    if args.batch_size < 0:
        raise ValueError(f"--batch-size must be >= 0 (0: dynamic), got {args.batch_size}.")
    for flag, value in (("--samples", args.samples), ("--check-samples", args.check_samples)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    if args.arena_margin < 0:
        raise ValueError(f"--arena-margin must be >= 0, got {args.arena_margin}.")
    check_arguments(batch_size=args.batch_size or None, min_agreement=args.min_agreement)
    if args.data.endswith(".npy"):
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data {args.data!r} does not exist.")
    else:
        from tfqreg.datasets import DATASETS

        if args.data not in DATASETS:
            raise ValueError(f"--data must be one of {', '.join(DATASETS)} or a .npy file, "
                             f"got {args.data!r}.")
    _check_out(args)  # last: it makes the folder
    return runtime


def output_files(args: argparse.Namespace) -> List[str]:
    """The files ``tfqreg export`` writes into ``--out``."""
    base = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    if args.target == "micro":
        names = [f"{base}{s}" for s in (".tflite", "_model_data.cc", "_model_data.h",
                                           "_micro.json")]
    else:
        names = [f"{base}.tflite", f"{base}.json"]
        if args.target == "edgetpu":
            names.append(f"{base}_edgetpu.json")
    return [os.path.join(args.out, n) for n in names]


def _check_out(args: argparse.Namespace) -> None:
    """``--out``: a folder that exists and is writable or can be made; existing output files
    only with ``--overwrite``."""
    out = args.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file; give a folder.")
    if os.path.isdir(out):
        if not os.access(out, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out!r} is not writable.")
    else:
        parent = os.path.dirname(os.path.abspath(out))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"--out {out!r}: cannot create it in {parent!r}.")
    existing = [p for p in output_files(args) if os.path.exists(p)]
    if existing and not getattr(args, "overwrite", False):
        raise ValueError(f"--out: {', '.join(repr(p) for p in existing)} exist(s); pass "
                         "--overwrite to replace.")
    try:  # made now, so that a folder that cannot be made is refused before any work
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out!r}: cannot create it ({type(e).__name__}: "
                         f"{e.strerror or e}).") from None


def _cli_data(args: argparse.Namespace,
              need: bool) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    if not need:
        return None, None
    if args.data.endswith(".npy"):  # its existence was checked by check_cli_arguments
        x = np.load(args.data)
        return x[: args.samples], x[: args.check_samples]
    from tfqreg import datasets

    (x, _), (xt, _) = datasets.load_numpy(args.data, args.data_dir, args.tfds_dir)
    return x[: args.samples], xt[: args.check_samples]


def _weights_text(flatbuffer: bytes) -> str:
    from tfqreg.deploy.lowbit import weight_report

    return "\n" + weight_report(flatbuffer).to_text()


def _export(args: argparse.Namespace) -> str:
    runtime = check_cli_arguments(args)
    model = load_model(args.model)
    base = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    batch = args.batch_size or None
    check = not args.no_check
    tflite_path = os.path.join(args.out, f"{base}.tflite")
    target = args.target
    lowbit = args.weight_bits != 8
    bits = dict(weight_bits=args.weight_bits, runtime=runtime) if lowbit else {}
    need_data = target in ("int8", "edgetpu", "micro") or check or lowbit
    rep, sample = _cli_data(args, need_data)
    os.makedirs(args.out, exist_ok=True)
    if target == "tflite":
        res = to_tflite(model, mode=args.mode, batch_size=batch, check=check, sample=sample,
                        path=tflite_path, min_agreement=args.min_agreement,
                        representative_data=rep if lowbit else None, overwrite=args.overwrite,
                        **bits)
        return res.report.to_text() + (_weights_text(res.flatbuffer) if lowbit else "") + \
            f"\nwrote {tflite_path}"
    if target in ("int8", "edgetpu"):
        res = to_tflite(model, mode="int8", representative_data=rep, io_dtype=args.io_dtype,
                        batch_size=batch, check=check, sample=sample, path=tflite_path,
                        min_agreement=args.min_agreement, overwrite=args.overwrite, **bits)
        text = res.report.to_text() + (_weights_text(res.flatbuffer) if lowbit else "") + \
            f"\nwrote {tflite_path}"
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
                       min_agreement=args.min_agreement,
                       weight_bits=args.weight_bits if lowbit else None,
                       overwrite=args.overwrite)
        return res.to_text() + (_weights_text(res.flatbuffer) if lowbit else "")
    res = to_lce(model, batch_size=batch, check=check, sample=sample, path=tflite_path,
                 min_agreement=args.min_agreement, overwrite=args.overwrite)
    return res.report.to_text() + f"\nwrote {tflite_path}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first if isinstance(e, (ValueError, TypeError, ConversionError)) else \
        f"{type(e).__name__}: {first}"


def run_cli(args: argparse.Namespace) -> int:
    """Run ``tfqreg export``: print the report, return 0; on bad input print one clear error
    line (no traceback) to stderr and return 2 (1 for a failed parity check)."""
    try:
        text = _export(args)
    except ParityError as e:
        print(e.report.to_text(), file=sys.stdout)
        print(f"tfqreg export: parity check failed: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError, ConversionError) as e:  # OSError: files, folders
        print(f"tfqreg export: error: {_one_line(e)}", file=sys.stderr)
        return 2
    print(text)
    return 0
