"""``tfqreg sweep MODEL --data fashion_mnist --bits 8 6 4 [--per-tensor] [--activation-bits N]
[--json out.json] [--csv out.csv] [--plot out.png]``: check, load, sweep, print, write."""

from __future__ import annotations

from tfqreg._keras import keras
from tfqreg.ptq.evaluate import sweep

__all__ = ["add_arguments", "run_cli"]


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """Arguments of ``tfqreg sweep`` (defined TensorFlow-free in
    :func:`tfqreg.cli_args.add_sweep_arguments`)."""
    from tfqreg import cli_args

    cli_args.add_sweep_arguments(parser)


def _load_model(path: str) -> keras.Model:
    """The model in ``path``, every tfqreg object registered; a file that only Keras 3 reads
    is loaded as a Keras 3 model (:func:`tfqreg.deploy.loading.load_model`)."""
    from tfqreg.deploy.loading import load_model

    return load_model(path)


def _check_cli(args) -> None:
    """Everything ``tfqreg sweep`` can check before loading and evaluating: raises ValueError
    with a one-line message naming the option."""
    import os

    if not os.path.exists(args.model):
        raise ValueError(f"MODEL {args.model!r} does not exist (a .keras / .h5 file or a "
                         "SavedModel folder).")
    if args.model.endswith(".tflite"):
        raise ValueError(f"MODEL {args.model!r} is a .tflite file; sweep takes the Keras model "
                         "(.keras, .h5 or SavedModel) it came from.")
    for b in args.bits:
        if not 2 <= b <= 16:
            raise ValueError(f"--bits {b}: each weight width must be in 2..16.")
    if args.activation_bits is not None and not 2 <= args.activation_bits <= 16:
        raise ValueError(f"--activation-bits {args.activation_bits}: must be in 2..16.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: must be at least 1 (omit it for all images).")
    if args.calibration_samples < 1:
        raise ValueError(f"--calibration-samples {args.calibration_samples}: must be >= 1.")
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is a folder; give a file name.")
        if not os.path.isdir(parent):
            raise ValueError(f"{flag} {path!r}: the folder {parent!r} does not exist.")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"{flag} {path!r}: the folder {parent!r} is not writable.")
        if os.path.exists(path) and not args.overwrite:
            raise ValueError(f"{flag} {path!r} exists; pass --overwrite to replace it.")


def run_cli(args) -> int:
    """Run ``tfqreg sweep``: print the table and return 0; on bad input print one line to
    stderr and return 2 (checked before any work starts)."""
    import sys

    from tfqreg import datasets

    try:
        _check_cli(args)
        try:
            model = _load_model(args.model)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"could not load a Keras model from {args.model!r}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        (x, _), (xt, yt) = datasets.load_numpy(args.data, args.data_dir, args.tfds_dir)
        if args.limit:
            xt, yt = xt[: args.limit], yt[: args.limit]
        result = sweep(model, (xt, yt), weight_bits=tuple(args.bits),
                       activation_bits=args.activation_bits, per_channel=not args.per_tensor,
                       calibration_data=x[: args.calibration_samples])
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"tfqreg sweep: error: {e}", file=sys.stderr)
        return 2
    print(result)
    for path, write in ((args.json, result.to_json), (args.csv, result.to_csv),
                        (args.plot, result.plot)):
        if path:
            write(path)
            print(f"wrote {path}")
    return 0
