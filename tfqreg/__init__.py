"""tfqreg: train Keras models that survive quantization, and ship them to edge hardware.

Importing tfqreg makes Keras 2 (``tf_keras``) the Keras of this process (see
:mod:`tfqreg._keras`), so import it before anything touches ``tf.keras``.
"""

from tfqreg import _keras  # noqa: F401  (must run first: sets TF_USE_LEGACY_KERAS)
from tfqreg import datasets, foothill, grid, losses, ptq, quantization, quantizers, regularizers, training  # noqa: F401,E501
from tfqreg import compression  # noqa: F401,E402  (after training: the pipeline uses it)
from tfqreg.summary import summary  # noqa: F401  (tfqreg.summary(model))

__version__ = "0.1.0"
