"""Keras losses. :class:`Foothill` is the Foothill function (methods.md §1) as a robust regression
loss: ``mean f(y_true − y_pred)`` with ``f(x) = α·x·tanh(βx/2)``, quadratic (≈ αβ/2·x²) for small
residuals and linear (≈ α|x|) for large ones, like Huber or log-cosh but infinitely
differentiable. The defaults ``alpha=1, beta=1`` give ``x²/2`` near 0 and ``|x|`` far away (the
same two limits as ``keras.losses.LogCosh`` up to its constant ``log 2``).

>>> import tfqreg
>>> from tfqreg._keras import keras, keras3_module, register, tf
>>> loss = tfqreg.losses.Foothill()
>>> round(float(loss(tf.constant([[0.0, 0.0]]), tf.constant([[0.0, 100.0]]))), 4)   # (0 + 100)/2
50.0

``model.compile(loss="foothill")`` works after ``import tfqreg`` (a string alias in Keras' loss
namespace, kept apart from the regularizer alias ``"foothill"``).

Keras 3 (TensorFlow backend): the user writes the same thing. ``keras3_model.compile(loss=
tfqreg.losses.Foothill(...))`` and ``compile(loss="foothill")`` use :data:`FoothillKeras3`, a thin
Keras 3 loss over the same :func:`foothill_loss` (a Keras 3 ``compile`` turns a ``Foothill`` into
it; ``reduction="auto"`` becomes ``"sum_over_batch_size"``), registered with Keras 3 as
``tfqreg>FoothillLoss``, so a compiled model round-trips through ``.keras``:

>>> import keras as keras3
>>> model = keras3.Sequential([keras3.Input((2,)), keras3.layers.Dense(1)])
>>> model.compile("sgd", loss=tfqreg.losses.Foothill(alpha=2.0))
>>> type(model.loss).__name__, model.loss.alpha
('FoothillKeras3', 2.0)
>>> type(keras3.losses.get("foothill")).__name__
'FoothillKeras3'
"""

from __future__ import annotations

from tfqreg import _checks
from tfqreg import foothill as _foothill
from tfqreg._keras import keras, keras3_module, register, tf

__all__ = ["Foothill", "FoothillKeras3", "foothill_loss", "to_keras3", "ALIASES"]


_MAX_ARG = 1e6
"""Upper bound of α (as the regularizers' strengths): the loss is ≈ α|x| far from 0, so a
larger α overflows float32 (inf loss) for ordinary residuals."""
_MAX_BETA = 1e30
"""Upper bound of β: the exact bounded derivative keeps β up to ~1e38 finite, but β itself
must fit a float32 (``beta=1e308`` is inf there)."""


def _check_arg(name: str, value) -> float:
    """``value`` as a float in (0, 1e6] (β: (0, 1e30]), else ``TypeError``/``ValueError``
    naming ``name``."""
    high = _MAX_BETA if name == "beta" else _MAX_ARG
    return _checks.check_real(name, value, low=0.0, high=high, low_open=True,
                              owner="Foothill")


def _check_reduction(reduction) -> str:
    """One of Keras' reduction keys; Keras' own error (``Invalid Reduction Key``) does not name
    the argument."""
    keys = tuple(keras.losses.Reduction.all())
    if not isinstance(reduction, str):
        raise TypeError(f"Foothill: `reduction` must be a string, one of {list(keys)}, got "
                        f"{reduction!r} ({type(reduction).__name__}).")
    if reduction not in keys:
        raise ValueError(f"Foothill: `reduction` must be one of {list(keys)}, got "
                         f"{reduction!r}.")
    return reduction


def foothill_loss(y_true, y_pred, alpha: float = 1.0, beta: float = 1.0) -> tf.Tensor:
    """Per-sample ``mean over the last axis of f(y_true − y_pred)``, computed in float32 (float64
    stays float64), with the exact bounded derivative f' as gradient (no NaN for huge |βx|)."""
    y_pred = tf.convert_to_tensor(y_pred)
    dtype = tf.float64 if y_pred.dtype == tf.float64 else tf.float32
    y_true = tf.convert_to_tensor(y_true, dtype_hint=dtype)
    x = tf.cast(y_true, dtype) - tf.cast(y_pred, dtype)

    @tf.custom_gradient
    def _f(t):
        def grad(dy):
            return dy * _foothill.first_derivative(t, alpha, beta)

        return _foothill.value(t, alpha, beta), grad

    return tf.reduce_mean(_f(x), axis=-1)


class _FoothillLoss:
    """What the Keras 2 and the Keras 3 class share: the checked arguments, ``call`` and the
    config (mixed in before each Keras' ``Loss``)."""

    def _set_args(self, alpha, beta) -> None:
        self.alpha, self.beta = _check_arg("alpha", alpha), _check_arg("beta", beta)

    def call(self, y_true, y_pred):
        return foothill_loss(y_true, y_pred, self.alpha, self.beta)

    def get_config(self):
        config = super().get_config()
        config.update({"alpha": self.alpha, "beta": self.beta})
        return config


@keras.utils.register_keras_serializable(package="tfqreg", name="FoothillLoss")
class Foothill(_FoothillLoss, keras.losses.Loss):
    """``mean f(y_true − y_pred)``, ``f(x) = α·x·tanh(βx/2)`` (registered as
    ``tfqreg>FoothillLoss``; alias ``"foothill"`` in ``compile(loss=...)``).

    Args:
        alpha: slope of the linear tails (0 < α ≤ 1e6). Default 1.
        beta: sharpness (0 < β ≤ 1e30); the quadratic→linear switch sits near |x| = 2/β.
            Default 1.
        reduction, name: as for every Keras loss.
    """

    def __init__(self, alpha=1.0, beta=1.0, reduction=keras.losses.Reduction.AUTO,
                 name="foothill"):
        self._set_args(alpha, beta)
        super().__init__(reduction=_check_reduction(reduction), name=name)


ALIASES = {"foothill": Foothill}
"""String aliases accepted by ``keras.losses.get`` / ``model.compile(loss=...)``."""


# --------------------------------------------------------------------------------------------
# Keras 3: a thin adapter over the same foothill_loss, chosen transparently
# --------------------------------------------------------------------------------------------
# A Keras 2 and a Keras 3 loss cannot be one class: Keras 3 expects a ``keras.losses.Loss`` (it
# wraps any other callable as a per-sample function) whose reduction already divides by the
# number of replicas, tf_keras expects its own ``Loss`` and scales in the compile container.
# So Keras 3 gets ``FoothillKeras3`` (registered there as "tfqreg>FoothillLoss", the name the
# Keras 2 class has in tf_keras), and a Keras 3 ``model.compile`` turns a ``Foothill`` it is
# given into it: the user writes the same ``tfqreg.losses.Foothill(...)`` or ``"foothill"``.

_KERAS2_TO_KERAS3_REDUCTION = {"auto": "sum_over_batch_size"}

FoothillKeras3 = None
"""The Keras 3 form of :class:`Foothill` (same arguments; ``reduction`` takes Keras 3's values,
default ``"sum_over_batch_size"``); ``None`` when Keras 3 is not installed."""


def _define_keras3_loss(k3) -> type:
    @register(name="FoothillLoss")
    class FoothillKeras3(_FoothillLoss, k3.losses.Loss):
        """:class:`Foothill` for Keras 3 models: ``mean f(y_true − y_pred)``,
        ``f(x) = α·x·tanh(βx/2)``, by :func:`foothill_loss`.

        Args:
            alpha: slope of the linear tails (0 < α ≤ 1e6). Default 1.
            beta: sharpness (0 < β ≤ 1e30). Default 1.
            reduction, name, dtype: as for every Keras 3 loss.
        """

        def __init__(self, alpha=1.0, beta=1.0, reduction="sum_over_batch_size",
                     name="foothill", dtype=None):
            self._set_args(alpha, beta)
            super().__init__(name=name, reduction=reduction, dtype=dtype)

    FoothillKeras3.__module__ = __name__
    FoothillKeras3.__qualname__ = "FoothillKeras3"
    return FoothillKeras3


def to_keras3(loss):
    """``loss`` with every :class:`Foothill` (anywhere in a list/tuple/dict) replaced by the
    equivalent ``FoothillKeras3``; anything else unchanged. ``reduction="auto"`` becomes Keras
    3's ``"sum_over_batch_size"`` (what ``"auto"`` means in ``compile``)."""
    if isinstance(loss, Foothill):
        reduction = _KERAS2_TO_KERAS3_REDUCTION.get(loss.reduction, loss.reduction)
        return FoothillKeras3(alpha=loss.alpha, beta=loss.beta, reduction=reduction,
                              name=loss.name)
    if isinstance(loss, dict):
        return {k: to_keras3(v) for k, v in loss.items()}
    if isinstance(loss, (list, tuple)):
        return type(loss)(to_keras3(v) for v in loss)
    return loss


def _install_keras3_compile_hook(k3) -> None:
    """Wrap ``keras.Model.compile`` (Keras 3) so that ``loss=tfqreg.losses.Foothill()`` becomes
    its Keras 3 form."""
    import functools
    import inspect

    # on the class that defines it (Keras' Trainer): Keras 3 recompiles a loaded model only when
    # `type(model).compile` is that class's compile
    owner = next(c for c in k3.Model.__mro__ if "compile" in vars(c))
    original = vars(owner)["compile"]
    if getattr(original, "_tfqreg_hook", False):
        return
    signature = inspect.signature(original)

    @functools.wraps(original)
    def compile(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        if "loss" in bound.arguments:
            bound.arguments["loss"] = to_keras3(bound.arguments["loss"])
        return original(*bound.args, **bound.kwargs)

    compile._tfqreg_hook = True
    owner.compile = compile


def _install_aliases() -> None:
    # "FoothillLoss" too: the legacy deserializer (``.h5``, SavedModel) looks a serialized loss
    # up by its bare class name.
    global FoothillKeras3
    namespace = keras.losses.get.__globals__
    for alias, cls in ALIASES.items():
        namespace.setdefault(alias, cls)
    namespace.setdefault("FoothillLoss", Foothill)
    k3 = keras3_module()
    if k3 is None:  # pragma: no cover - Keras 3 not installed
        return
    FoothillKeras3 = _define_keras3_loss(k3)
    # Keras 3's losses.get("name") reads its module's ALL_OBJECTS_DICT (not the custom objects)
    k3.losses.get.__globals__["ALL_OBJECTS_DICT"].setdefault("foothill", FoothillKeras3)
    _install_keras3_compile_hook(k3)


_install_aliases()
