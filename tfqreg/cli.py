"""The ``tfqreg`` command line.

    tfqreg run       train plain + regularized CNNs on Fashion-MNIST, PTQ sweep, export (main job)
    tfqreg export    convert a saved Keras model for TFLite / int8 / Edge TPU / micro / LCE
    tfqreg compress  prune -> quantize -> entropy-code a saved Keras model
    tfqreg sweep     post-training-quantization accuracy vs. bits of a saved Keras model

The arguments of every subcommand are defined in :mod:`tfqreg.cli_args`, which does not import
TensorFlow, so ``tfqreg --help``, ``tfqreg <command> --help`` and argument errors answer at
once; the subcommand's module (``run_cli(args) -> int``) is imported after parsing, together
with the rest of tfqreg (:func:`tfqreg.load`). ``python -m tfqreg`` is the same command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

from tfqreg import cli_args

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = (
    ("run", "tfqreg.main_job", cli_args.add_run_arguments,
     "train, quantize and export on Fashion-MNIST end to end"),
    ("export", "tfqreg.deploy.cli", cli_args.add_export_arguments,
     "convert a saved Keras model for a deployment target"),
    ("compress", "tfqreg.compression", cli_args.add_compress_arguments,
     "prune -> quantize -> entropy-code a saved model"),
    ("sweep", "tfqreg.ptq.cli", cli_args.add_sweep_arguments,
     "post-training quantization accuracy vs. bit width"),
)
"""``(name, module with run_cli, add_arguments, help)`` per subcommand."""


def build_parser() -> argparse.ArgumentParser:
    """The ``tfqreg`` parser with every subcommand (TensorFlow is not imported)."""
    parser = argparse.ArgumentParser(prog="tfqreg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, _module, add_arguments, help_text in COMMANDS:
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), then import and run the subcommand.

    Returns:
        The subcommand's exit status (argparse exits with 2 on a bad argument).
    """
    args = build_parser().parse_args(argv)
    import tfqreg

    tfqreg.load()  # registers tfqreg's Keras objects before a saved model is read
    module = dict((name, m) for name, m, _, _ in COMMANDS)[args.command]
    return int(importlib.import_module(module).run_cli(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
