"""tfqreg: train Keras models that survive quantization, and ship them to edge hardware.

Importing tfqreg makes Keras 2 (``tf_keras``) the Keras of this process (see
:mod:`tfqreg._keras`), so import it before anything touches ``tf.keras``.
"""

from tfqreg import _keras  # noqa: F401  (must run first: sets TF_USE_LEGACY_KERAS)
from tfqreg import datasets, foothill, grid, losses, ptq, quantization, quantizers, regularizers, training  # noqa: F401,E501
from tfqreg import compression  # noqa: F401,E402  (after training: the pipeline uses it)
from tfqreg.summary import summarize, summary  # noqa: F401  (tfqreg.summary(model) prints)

__version__ = "0.1.0"

# Deployment is imported on first use (``tfqreg.deploy.to_tflite(...)``, ``tfqreg.export``):
# ~35 ms today, and it keeps ``import tfqreg`` free of whatever the deploy modules import.
_LAZY_MODULES = ("deploy", "export", "edgetpu", "micro")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        import importlib

        return importlib.import_module(f"tfqreg.{name}")  # also sets the attribute
    raise AttributeError(f"module 'tfqreg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES))
