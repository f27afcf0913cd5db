"""The one place where tfqreg resolves Keras.

larq and TFMOT are built on Keras 2, which TensorFlow 2.16+ ships as the separate package
``tf_keras`` and exposes as ``tf.keras`` only when ``TF_USE_LEGACY_KERAS=1`` is in effect the
first time ``tf.keras`` is touched. This module:

1. sets ``TF_USE_LEGACY_KERAS=1`` when the user has not (before TensorFlow resolves ``tf.keras``),
2. imports ``tf_keras`` (``keras`` below: tfqreg's Keras 2 code always uses it directly) and
   records whether ``tf.keras`` is that same Keras 2 (:data:`TF_KERAS_IS_KERAS3` is ``False``)
   or was already resolved to Keras 3 before tfqreg was imported (``import tensorflow as tf;
   tf.keras.layers.Dense`` first: :data:`TF_KERAS_IS_KERAS3` is ``True``). ``import tfqreg``
   works in both cases: TFMOT picks ``tf_keras`` itself, and only larq, which imports
   ``tensorflow.keras`` at import time, cannot work then: :func:`require_larq` raises a clear
   ``ImportError`` naming the feature when one of its users (``tfqreg.quantizers``,
   ``deploy.to_lce``, the BNN builder) is used,
3. gives the Keras 3 package (:func:`keras3_module`) and :func:`is_keras3`: no other tfqreg
   module imports ``keras`` or checks a Keras version,
4. offers :func:`check_keras2` so that Keras-2-only public functions reject Keras 3 objects with
   a ``TypeError`` instead of failing deep inside, and :func:`register`, which registers a
   tfqreg class for serialization with the Keras (or both Kerases) that can use it.

Every other tfqreg module imports Keras as ``from tfqreg._keras import keras``.

>>> from tfqreg import _keras
>>> _keras.keras.__name__, _keras.keras3_module().__version__[:2]
('tf_keras', '3.')
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Optional

_ENV = "TF_USE_LEGACY_KERAS"
_TRUE = ("1", "true", "yes")

_previous = os.environ.get(_ENV)
if _previous is None or _previous.strip().lower() not in _TRUE:
    if _previous is not None:
        warnings.warn(
            f"{_ENV}={_previous!r} was set, but tfqreg (like larq and TFMOT) needs Keras 2; "
            f"setting {_ENV}=1.",
            stacklevel=2,
        )
    os.environ[_ENV] = "1"

# The `tfqreg` command: TensorFlow's C++ INFO/WARNING lines (tens of them from the converter)
# would bury the command's own output; errors still show. Set TF_CPP_MIN_LOG_LEVEL to override.
# Library users keep TensorFlow's defaults.
from tfqreg._command import is_command  # noqa: E402  (TensorFlow-free)

if is_command():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

_KERAS3_HELP = (
    "tfqreg needs Keras 2 (the `tf_keras` package) for this, but `tf.keras` in this process is "
    "Keras 3: TensorFlow was imported and `tf.keras` was used before tfqreg could set "
    "TF_USE_LEGACY_KERAS=1, and larq (which imports `tensorflow.keras`) cannot work then. Fix: "
    "set the environment variable before Python starts (`export TF_USE_LEGACY_KERAS=1`), or "
    "`import tfqreg` (or `os.environ['TF_USE_LEGACY_KERAS'] = '1'`) before anything touches "
    "`tf.keras`."
)


def _tf_keras_is_keras2() -> bool:
    try:
        return tf.keras.layers.Layer is keras.layers.Layer
    except Exception:  # pragma: no cover - a broken lazy loader counts as "not Keras 2"
        return False


TF_KERAS_IS_KERAS3: bool = not _tf_keras_is_keras2()
"""``True`` when ``tf.keras`` was resolved to Keras 3 before tfqreg was imported: tfqreg's
Keras 2 code still works (it uses ``tf_keras``), larq does not (:func:`require_larq`)."""


def require_larq(feature: str):
    """The ``larq`` module, or a clear ``ImportError`` naming ``feature`` when larq cannot be
    used in this process (``tf.keras`` is Keras 3, see :data:`TF_KERAS_IS_KERAS3`, or larq is
    not installed).

    Args:
        feature: what needs larq, for the message (e.g. ``"tfqreg.quantizers"``).

    Raises:
        ImportError: larq is unusable here; the message says what to do.
    """
    if TF_KERAS_IS_KERAS3:
        raise ImportError(f"{feature} needs larq. {_KERAS3_HELP}")
    try:
        import larq
    except ImportError as e:
        raise ImportError(f"{feature} needs larq (`pip install larq`): {e}") from e
    return larq


def _route_tensorflow_keras_imports() -> None:
    """Make ``from tensorflow.keras.x import y`` (used by larq at import) resolve to tf_keras.

    TensorFlow decides this once, when it is first imported, by putting the Keras API folder that
    matches TF_USE_LEGACY_KERAS at the front of ``tensorflow.__path__``. When TensorFlow was
    imported before tfqreg set the variable (``import tensorflow`` or Keras 3's ``import keras``
    first, ``tf.keras`` not touched yet), do the same now; if Keras 3 modules were already
    imported under ``tensorflow.keras``, that cannot be undone: record it in
    :data:`TF_KERAS_IS_KERAS3` (larq is then unusable).
    """
    import importlib.util

    spec = importlib.util.find_spec("tf_keras.api._v2.keras")
    global TF_KERAS_IS_KERAS3
    if spec is None or not spec.origin:  # pragma: no cover - tf_keras layout changed
        return
    api_dir = os.path.dirname(os.path.dirname(spec.origin))
    for name, module in list(sys.modules.items()):
        if name == "tensorflow.keras" or name.startswith("tensorflow.keras."):
            if "tf_keras" not in (getattr(module, "__file__", None) or "tf_keras"):
                TF_KERAS_IS_KERAS3 = True  # `from tensorflow.keras import x` ran already
                return
    path = list(getattr(tf, "__path__", []))
    if path and path[0] != api_dir:
        tf.__path__ = [api_dir] + [p for p in path if p != api_dir]


if not TF_KERAS_IS_KERAS3:
    _route_tensorflow_keras_imports()


def _is_keras3_object(obj) -> bool:
    """A Keras 3 object, or an instance of a user's subclass of a Keras 3 class (``class
    M(keras.Model)`` defined in ``__main__``): some class of its MRO lives in ``keras.``."""
    if isinstance(obj, keras.layers.Layer):
        return False
    return any((getattr(cls, "__module__", "") or "").split(".")[0] == "keras"
               for cls in type(obj).__mro__)


def keras3_module():
    """The Keras 3 package (``import keras``) when it is installed, else ``None``.

    Keras 3 support in tfqreg (issue 15) goes through this one accessor: no other module
    imports ``keras`` or checks a Keras version."""
    try:
        import keras as _k3  # noqa: F401  (imported by TensorFlow already: ~0 s)
    except ImportError:  # pragma: no cover - keras 3 not installed
        return None
    if not str(getattr(_k3, "__version__", "")).startswith("3."):  # pragma: no cover
        return None
    return _k3


def is_keras3(obj) -> bool:
    """``True`` when ``obj`` is a Keras 3 object (layer, model, optimizer, variable...)."""
    return _is_keras3_object(obj)


def _check_loaded_before_tfqreg(layer, name: str) -> None:
    """A model loaded by ``keras.models.load_model`` before ``import tfqreg`` holds each tfqreg
    regularizer as its bare class name: tf_keras' ``regularizers.get`` returns the name of a
    class it cannot find (it never imports the saved ``module``), and training later fails with
    "'str' object is not callable". Say so, naming tfqreg."""
    try:
        layers = [layer] + list(layer._flatten_layers(include_self=False, recursive=True))
    except Exception:  # pragma: no cover - a half-built layer: nothing to inspect
        return
    for sub in layers:
        for attr, value in vars(sub).items():
            if attr.endswith("_regularizer") and isinstance(value, str) and value:
                raise TypeError(
                    f"`{name}`: layer '{sub.name}' has {attr} {value!r}, a bare name instead of "
                    "a regularizer: the model was loaded before `import tfqreg`, so Keras "
                    "could not find tfqreg's class (and training fails with \"'str' object is "
                    "not callable\"). `import tfqreg` before keras.models.load_model, or load "
                    "with tfqreg.deploy.load_model.")


def check_keras2(obj, name: str = "model", kind=None):
    """Raise ``TypeError`` unless ``obj`` is a Keras 2 (``tf_keras``) object.

    Args:
        obj: the object a user handed in.
        name: the argument's name, used in the message.
        kind: the expected ``tf_keras`` class (default ``keras.layers.Layer``, which covers models).

    Returns:
        ``obj``, so the call can be used inline.

    Raises:
        TypeError: ``obj`` is not a ``kind`` (or is a Keras 3 object), or a layer/model that
            was loaded before ``import tfqreg`` (a regularizer kept as its class name).
    """
    kind = kind or keras.layers.Layer
    if isinstance(obj, kind):
        if isinstance(obj, keras.layers.Layer):
            _check_loaded_before_tfqreg(obj, name)
        return obj
    if _is_keras3_object(obj):
        raise TypeError(
            f"`{name}` is a Keras 3 object ({type(obj).__module__}.{type(obj).__name__}). "
            "tfqreg, larq and TFMOT work with Keras 2: build it with `tf_keras` "
            "(or `tf.keras` after `import tfqreg`, which sets TF_USE_LEGACY_KERAS=1)."
        )
    raise TypeError(
        f"`{name}` must be a {kind.__module__}.{kind.__name__}, got {type(obj).__name__}."
    )


def _keras2_only_bases() -> tuple:
    """tf_keras base classes whose subclasses Keras 3 cannot use (a Keras 2 layer, model, loss,
    metric, optimizer or callback): :func:`register` keeps those out of Keras 3's registry, so a
    Keras 3 class of the same name (a Keras 3 adapter) is not shadowed."""
    return (keras.layers.Layer, keras.losses.Loss, keras.metrics.Metric,
            keras.optimizers.Optimizer, keras.callbacks.Callback)


def _is_keras3_class(cls) -> bool:
    k3 = keras3_module()
    return k3 is not None and any((getattr(base, "__module__", "") or "").split(".")[0] == "keras"
                                  for base in getattr(cls, "__mro__", ())[:-1])


def register(cls=None, *, name: Optional[str] = None):
    """Class decorator: register a tfqreg class for serialization as ``"tfqreg>Name"``.

    A Keras 3 class (a subclass of a ``keras`` 3 class) is registered with Keras 3; a tf_keras
    layer, model, loss, metric, optimizer or callback with Keras 2 only; anything else (the
    regularizers and constraints, which both Kerases call the same way) with both, so a saved
    ``.keras`` file of either Keras finds it after ``import tfqreg``.

    Args:
        cls: the class (``@register``), or ``None`` (``@register(name="X")``).
        name: the registered name in the package (default: the class name).

    Returns:
        The class, unchanged.
    """
    def decorate(klass):
        k3 = keras3_module()
        if _is_keras3_class(klass):
            return k3.saving.register_keras_serializable(package="tfqreg", name=name)(klass)
        klass = keras.utils.register_keras_serializable(package="tfqreg", name=name)(klass)
        if k3 is not None and not issubclass(klass, _keras2_only_bases()):
            k3.saving.register_keras_serializable(package="tfqreg", name=name)(klass)
        return klass

    return decorate if cls is None else decorate(cls)


__all__ = ["keras", "tf", "check_keras2", "register", "keras3_module", "is_keras3",
           "require_larq", "TF_KERAS_IS_KERAS3"]
