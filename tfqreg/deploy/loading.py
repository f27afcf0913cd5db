"""Loading saved Keras models for export, with every tfqreg / larq / TFMOT object registered.

``tf_keras`` cannot load a model holding tfqreg objects unless tfqreg's modules were imported
(it does not import the ``module`` saved in the config); :func:`load_model` imports them first.

>>> from tfqreg.deploy import load_model
>>> model = load_model("model.keras")   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

from tfqreg._keras import keras

__all__ = ["load_model"]


def _register_custom_objects() -> None:
    """Import the modules that register tfqreg/larq objects, so saved models load."""
    for name in ("larq", "tfqreg.quantizers", "tfqreg.regularizers", "tfqreg.quantization",
                 "tfqreg.losses", "tfqreg.training"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def load_model(path: str) -> Any:
    """Load a ``.keras`` / ``.h5`` file or a SavedModel folder saved by ``tf_keras``.

    Args:
        path: the file or folder.

    Returns:
        The ``tf_keras`` model (not compiled).

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder without ``saved_model.pb``).
        ValueError: the file is not a Keras model.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"MODEL {path!r} does not exist (expected a .keras or .h5 file "
                                "or a SavedModel folder).")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"MODEL {path!r} is a folder without saved_model.pb, so it is "
                                "not a SavedModel.")
    _register_custom_objects()
    try:
        try:
            from tfqreg.quantization import quantize_scope
        except ImportError:  # pragma: no cover
            quantize_scope = contextlib.nullcontext
        with quantize_scope():
            model = keras.models.load_model(path, compile=False)
    except Exception as e:
        raise ValueError(f"could not load a Keras model from {path!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a Keras model (a "
                         "SavedModel written by tf.saved_model.save cannot be exported here; "
                         "save with model.save()).")
    return model
