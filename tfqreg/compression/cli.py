"""``tfqreg compress``: prune → quantize → entropy-code a Keras model from the command line.

    tfqreg compress MODEL --prune 0.8 --bits 4 --data fashion_mnist --out DIR [--epochs 2]

``MODEL`` is a saved Keras model (``.keras``, ``.h5`` or a SavedModel folder), or the name of a
reference model in :mod:`tfqreg.models` (``small_cnn``, ``tiny_cnn``), which is then first
trained in float for ``--float-epochs``. Progress is shown by Keras' progress bars and one line
per stage; the report is printed and written to ``DIR/report.json``, the model to
``DIR/model.tfqz`` (load it with :func:`tfqreg.compression.load_compressed`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from tfqreg import cli_args, datasets, models
from tfqreg._keras import keras
from tfqreg.compression.pipeline import Compressor

__all__ = ["add_arguments", "run_cli", "load_model"]

_REFERENCE_MODELS = cli_args.REFERENCE_MODELS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tfqreg compress`` (defined TensorFlow-free in
    :func:`tfqreg.cli_args.add_compress_arguments`)."""
    cli_args.add_compress_arguments(parser)


def load_model(spec: str, data, float_epochs: int, lr: float, batch_size: int, verbose: int):
    """A saved model, or a reference model trained in float on ``data``."""
    if spec in _REFERENCE_MODELS and not os.path.exists(spec):
        (x, y), _ = data
        model = getattr(models, spec)(input_shape=x.shape[1:])
        model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy",
                      metrics=["accuracy"])
        if float_epochs:
            if verbose:
                print(f"[tfqreg compress] training {spec} in float for {float_epochs} epoch(s)")
            model.fit(x, y, epochs=float_epochs, batch_size=batch_size, verbose=verbose)
        return model
    from tfqreg.export import load_model as _load

    return _load(spec)


def _check_cli(args: argparse.Namespace) -> None:
    """Everything that can be checked before training: raises ValueError (one line)."""
    if args.model not in _REFERENCE_MODELS and not os.path.exists(args.model):
        raise ValueError(f"MODEL {args.model!r} does not exist (a .keras / .h5 file, a "
                         f"SavedModel folder, or one of {', '.join(_REFERENCE_MODELS)}).")
    if args.model.endswith(".tflite"):
        raise ValueError(f"MODEL {args.model!r} is a .tflite file; compress takes a Keras model.")
    if not 0.0 <= args.prune < 1.0:
        raise ValueError(f"--prune {args.prune:g}: the pruned fraction must be in [0, 1).")
    if not 2 <= args.bits <= 16:
        raise ValueError(f"--bits {args.bits}: must be in 2..16.")
    for flag, v in (("--epochs", args.epochs), ("--prune-epochs", args.prune_epochs),
                    ("--quant-epochs", args.quant_epochs), ("--float-epochs", args.float_epochs)):
        if v is not None and v < 0:
            raise ValueError(f"{flag} {v}: must be >= 0.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: must be >= 1.")
    for flag, v in (("--train-limit", args.train_limit), ("--test-limit", args.test_limit)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v}: must be >= 1 (omit it for all images).")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file; give a folder.")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(args.out) and not os.access(parent, os.W_OK):
        raise ValueError(f"--out {args.out!r}: cannot create it in {parent!r}.")
    if os.path.isdir(args.out) and not os.access(args.out, os.W_OK):
        raise ValueError(f"--out {args.out!r} is not writable.")
    for name in ("model.tfqz", "report.json"):
        target = os.path.join(args.out, name)
        if os.path.exists(target) and not args.overwrite:
            raise ValueError(f"{target!r} exists; pass --overwrite to replace it.")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``tfqreg compress``: 0 on success; bad input is one line on stderr and exit code 2,
    checked before any training starts."""
    try:
        _check_cli(args)
        return _run(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"tfqreg compress: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    verbose = 0 if args.quiet else (1 if sys.stdout.isatty() else 2)
    prune_epochs = args.epochs if args.epochs is not None else args.prune_epochs
    quant_epochs = args.epochs if args.epochs is not None else args.quant_epochs
    compressor = Compressor(fraction=args.prune, bits=args.bits, prune_epochs=prune_epochs,
                            quant_epochs=quant_epochs, per_channel=args.per_channel,
                            narrow_range=args.narrow_range, layers=args.layers,
                            learning_rate=args.lr, batch_size=args.batch_size, mode=args.mode,
                            grid_tol=args.grid_tol, verbose=verbose)
    keras.utils.set_random_seed(args.seed)
    (x, y), (xt, yt) = datasets.load_numpy(args.data, args.data_dir, args.tfds_dir)
    if args.train_limit:
        x, y = x[:args.train_limit], y[:args.train_limit]
    if args.test_limit:
        xt, yt = xt[:args.test_limit], yt[:args.test_limit]
    model = load_model(args.model, ((x, y), (xt, yt)), args.float_epochs, args.lr,
                       args.batch_size, verbose)
    result = compressor.run(model, (x, y), (xt, yt))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "model.tfqz")
    result.save(path)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        f.write(result.report.to_json())
    print(result.report)
    print(f"wrote {path} and {os.path.join(args.out, 'report.json')}")
    return 0


def main(argv: Optional[list] = None) -> int:  # pragma: no cover - `tfqreg compress` wraps it
    parser = argparse.ArgumentParser(prog="tfqreg compress")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))
