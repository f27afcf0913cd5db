"""The ``tfqreg`` command line.

    tfqreg run       train plain + regularized CNNs on Fashion-MNIST, PTQ sweep, export (main job)
    tfqreg export    convert a saved Keras model for TFLite / int8 / Edge TPU / micro / LCE
    tfqreg compress  prune -> quantize -> entropy-code a saved Keras model
    tfqreg sweep     post-training-quantization accuracy vs. bits of a saved Keras model

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and
``run_cli(args) -> int``; this file only wires them up.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

_COMMANDS = (
    ("run", "tfqreg.main_job", "train, quantize and export on Fashion-MNIST end to end"),
    ("export", "tfqreg.deploy.cli", "convert a saved Keras model for a deployment target"),
    ("compress", "tfqreg.compression", "prune -> quantize -> entropy-code a saved model"),
    ("sweep", "tfqreg.ptq", "post-training quantization accuracy vs. bit width"),
)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tfqreg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    modules = {}
    for name, module, help_text in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        modules[name] = importlib.import_module(module)
        modules[name].add_arguments(p)
    args = parser.parse_args(argv)
    return int(modules[args.command].run_cli(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
