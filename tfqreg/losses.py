"""Keras losses. :class:`Foothill` is the Foothill function (methods.md §1) as a robust regression
loss: ``mean f(y_true − y_pred)`` with ``f(x) = α·x·tanh(βx/2)``, quadratic (≈ αβ/2·x²) for small
residuals and linear (≈ α|x|) for large ones, like Huber or log-cosh but infinitely
differentiable. The defaults ``alpha=1, beta=1`` give ``x²/2`` near 0 and ``|x|`` far away (the
same two limits as ``keras.losses.LogCosh`` up to its constant ``log 2``).

>>> import tfqreg
>>> from tfqreg._keras import keras, tf
>>> loss = tfqreg.losses.Foothill()
>>> round(float(loss(tf.constant([[0.0, 0.0]]), tf.constant([[0.0, 100.0]]))), 4)   # (0 + 100)/2
50.0

``model.compile(loss="foothill")`` works after ``import tfqreg`` (a string alias in Keras' loss
namespace, kept apart from the regularizer alias ``"foothill"``).
"""

from __future__ import annotations

from tfqreg import _checks
from tfqreg import foothill as _foothill
from tfqreg._keras import keras, tf

__all__ = ["Foothill", "foothill_loss", "ALIASES"]


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


@keras.utils.register_keras_serializable(package="tfqreg", name="FoothillLoss")
class Foothill(keras.losses.Loss):
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
        alpha, beta = _check_arg("alpha", alpha), _check_arg("beta", beta)
        super().__init__(reduction=_check_reduction(reduction), name=name)
        self.alpha, self.beta = alpha, beta

    def call(self, y_true, y_pred):
        return foothill_loss(y_true, y_pred, self.alpha, self.beta)

    def get_config(self):
        config = super().get_config()
        config.update({"alpha": self.alpha, "beta": self.beta})
        return config


ALIASES = {"foothill": Foothill}
"""String aliases accepted by ``keras.losses.get`` / ``model.compile(loss=...)``."""


def _install_aliases() -> None:
    # "FoothillLoss" too: the legacy deserializer (``.h5``, SavedModel) looks a serialized loss
    # up by its bare class name.
    namespace = keras.losses.get.__globals__
    for alias, cls in ALIASES.items():
        namespace.setdefault(alias, cls)
    namespace.setdefault("FoothillLoss", Foothill)


_install_aliases()
