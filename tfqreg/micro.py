"""TensorFlow Lite Micro export, under its earlier name: re-exports :mod:`tfqreg.deploy.micro`."""

from tfqreg.deploy.micro import (OP_RESOLVER_METHODS, MicroResult, c_source, measure_arena,
                                 micro_runs_with, resolver_methods, to_micro)

__all__ = ["OP_RESOLVER_METHODS", "MicroResult", "measure_arena", "micro_runs_with",
           "resolver_methods", "c_source", "to_micro"]
