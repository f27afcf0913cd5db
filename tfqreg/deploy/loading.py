"""Loading saved Keras models for export, with every tfqreg / larq / TFMOT object registered.

``tf_keras`` cannot load a model holding tfqreg objects unless tfqreg's modules were imported
(it does not import the ``module`` saved in the config); :func:`load_model` imports them first.
A ``.keras`` / ``.h5`` file that ``tf_keras`` cannot read but Keras 3 can (a model saved by
Keras 3) is loaded with Keras 3: :func:`tfqreg.deploy.to_tflite`, :func:`tfqreg.deploy.to_micro`
and :func:`tfqreg.ptq.sweep` take Keras 3 Sequential / Functional models
(:mod:`tfqreg.keras3_bridge`), so ``tfqreg export`` and ``tfqreg sweep`` work on such files too.

>>> from tfqreg.deploy import load_model
>>> model = load_model("model.keras")   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any

from tfqreg._keras import keras, keras3_module

__all__ = ["load_model"]


def _register_custom_objects() -> None:
    """Import the modules that register tfqreg/larq objects, so saved models load. larq (and
    tfqreg.quantizers, built on it) are skipped when ``tf.keras`` is Keras 3 in this process:
    larq cannot be imported there (``_keras.TF_KERAS_IS_KERAS3``)."""
    from tfqreg import _keras

    larq = () if _keras.TF_KERAS_IS_KERAS3 else ("larq", "tfqreg.quantizers")
    for name in larq + ("tfqreg.regularizers", "tfqreg.quantization", "tfqreg.losses",
                        "tfqreg.training"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def load_model(path: str) -> Any:
    """Load a ``.keras`` / ``.h5`` file or a SavedModel folder saved by ``tf_keras``.

    Args:
        path: the file or folder.

    Returns:
        The ``tf_keras`` model (not compiled); a Keras 3 model for a file only Keras 3 reads.

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
        model = _load_keras3(path, e)
    if not isinstance(model, keras.Model) and not _is_keras3_model(model):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a Keras model (a "
                         "SavedModel written by tf.saved_model.save cannot be exported here; "
                         "save with model.save()).")
    return model


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _is_keras3_model(obj: Any) -> bool:
    from tfqreg import keras3_bridge

    return keras3_bridge.is_keras3_model(obj)


def _load_keras3(path: str, keras2_error: BaseException) -> Any:
    """``path`` with Keras 3 when tf_keras could not read it (a file Keras 3 saved);
    otherwise the ValueError names both attempts."""
    k3 = keras3_module()
    if k3 is None or os.path.isdir(path):
        raise ValueError(f"could not load a Keras model from {path!r}: "
                         f"{_first_line(keras2_error)}") from keras2_error
    try:
        return k3.models.load_model(path, compile=False)
    except Exception as e:
        raise ValueError(f"could not load a Keras model from {path!r}: tf_keras: "
                         f"{_first_line(keras2_error)}; Keras 3: {_first_line(e)}") from e
