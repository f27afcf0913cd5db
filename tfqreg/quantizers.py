"""Larq quantizers built on the Foothill function (methods.md §1, use 2).

``FoothillSign`` binarizes in the forward pass and uses the second derivative of the Foothill
function, normalised by α, as pseudo-gradient:

    forward:   q(x) = sign(x),  sign(0) = +1                 (as larq.math.sign)
    backward:  dq/dx ≈ f''(x)/α = β·(2 − βx·tanh(βx/2)) / (1 + cosh βx)

f'(x)/α is BNN+'s SignSwish, a smooth surrogate of sign(x) (bounded by 1.2, → ±1 away from 0);
the backward pass is its exact derivative. Where |βx| > 80 the gradient is exactly 0 (no
inf/inf = NaN).

It is a larq quantizer in every sense: pass it by instance or by its alias ``"foothill_sign"``
to ``input_quantizer=`` / ``kernel_quantizer=`` of ``larq.layers.Quant*`` layers;
``larq.models.summary`` counts it as 1-bit (``precision = 1``); it supports larq's
``flip_ratio`` metric; ``larq.context.quantized_scope(True)`` returns binarized kernels; it is
registered as ``"tfqreg>FoothillSign"`` and round-trips through ``.keras``, ``.h5`` and
SavedModel.

>>> import larq as lq
>>> import tfqreg.quantizers  # registers "foothill_sign"
>>> layer = lq.layers.QuantDense(4, input_quantizer="foothill_sign",
...                              kernel_quantizer="foothill_sign")
>>> type(layer.kernel_quantizer).__name__
'FoothillSign'
>>> import tensorflow as tf
>>> tfqreg.quantizers.foothill_sign(tf.constant([-0.5, 0.0, 2.0])).numpy()
array([-1.,  1.,  1.], dtype=float32)
"""

from __future__ import annotations

from typing import Optional, Sequence

from tfqreg._keras import require_larq

lq = require_larq("tfqreg.quantizers (FoothillSign)")

from tfqreg import _checks, foothill, grid  # noqa: E402
from tfqreg._keras import keras, register, tf  # noqa: E402

__all__ = ["foothill_sign", "FoothillSign", "ALIASES"]

# larq's private base class adds the optional ``flip_ratio`` metric and the kernel-quantizer
# metrics larq switches on with ``larq.context.metrics_scope``; fall back to the public base.
_LarqBase = getattr(lq.quantizers, "_BaseQuantizer", lq.quantizers.Quantizer)


_MAX_BETA = 1e6
"""Upper bound of β (as the regularizers' strengths): the pseudo-gradient peaks at β, and a
larger β (``1e308``) makes ``cosh βx`` and the gradient overflow float32 near 0."""


def _check_beta(beta) -> float:
    return _checks.check_real("beta", beta, low=0.0, high=_MAX_BETA, low_open=True)


def _check_metrics(metrics) -> Optional[list]:
    """``None`` (larq's defaults from ``larq.context.metrics_scope``) or a list of larq metric
    names (``["flip_ratio"]``), as larq's quantizers take them; anything else (a bare string,
    a number, a bool, a list of non-names) is refused naming `metrics`."""
    if metrics is None:
        return None
    available = sorted(getattr(lq.context, "_available_metrics", {"flip_ratio"}))
    if isinstance(metrics, (str, bytes)) or not isinstance(metrics, (list, tuple, set, frozenset)):
        raise TypeError(f"FoothillSign: `metrics` must be None or a list of larq metric names "
                        f"(from {available}), got {metrics!r} ({type(metrics).__name__}).")
    bad = [m for m in metrics if not isinstance(m, str)]
    if bad:
        raise TypeError(f"FoothillSign: `metrics` must be larq metric names (str), got {bad!r}.")
    unknown = [m for m in metrics if m not in available]
    if unknown:
        raise ValueError(f"FoothillSign: `metrics` must be larq metric names from {available}, "
                         f"got {unknown!r}.")
    return list(metrics)


def foothill_sign(x, beta: float = 5.0) -> tf.Tensor:
    """Binarize ``x`` to ±1 (0 → +1) with the Foothill pseudo-gradient ``dy·f''(x)/α``.

    Args:
        x: a float tensor.
        beta: the Foothill sharpness β > 0; larger β gives a narrower, taller gradient bump
            around 0 (its peak is ``f''(0)/α = β`` at x = 0).

    Returns:
        A tensor of the same shape and dtype as ``x`` holding ±1.
    """
    beta = _check_beta(beta)

    @tf.custom_gradient
    def _call(x):
        def grad(dy):
            return dy * tf.cast(foothill.second_derivative(x, alpha=1.0, beta=beta), dy.dtype)

        return grid.quantize_indices(x, 1.0, bits=1), grad

    return _call(tf.convert_to_tensor(x))


@register
class FoothillSign(_LarqBase):
    r"""Binary larq quantizer with the Foothill (SignSwish-derivative) pseudo-gradient.

    \[ q(x) = \begin{cases} -1 & x < 0 \\ +1 & x \ge 0 \end{cases}, \qquad
       \frac{\partial q}{\partial x} \approx \frac{f''(x)}{\alpha}
       = \frac{\beta\,(2 - \beta x \tanh(\beta x / 2))}{1 + \cosh \beta x} \]

    Example:
        >>> import larq as lq
        >>> conv = lq.layers.QuantConv2D(16, 3, input_quantizer=FoothillSign(beta=5.0),
        ...                               kernel_quantizer="foothill_sign",
        ...                               kernel_constraint="weight_clip")

    Args:
        beta: Foothill sharpness, 0 < β ≤ 1e6 (default 5.0, larq's SwishSign default). The α
            of the Foothill function cancels in the normalised gradient and is not a parameter.
        metrics: larq metrics to track (a list of names: ``["flip_ratio"]``, the only one larq
            has) or ``None`` for larq's defaults.
    """

    precision = 1

    def __init__(self, beta: float = 5.0, metrics: Optional[Sequence[str]] = None, **kwargs):
        self.beta = _check_beta(beta)
        super().__init__(metrics=_check_metrics(metrics), **kwargs)

    def call(self, inputs):
        return super().call(foothill_sign(inputs, beta=self.beta))

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


ALIASES = {"foothill_sign": FoothillSign, "FoothillSign": FoothillSign}
"""Names resolvable by ``larq.quantizers.get`` and Keras deserialization: the short alias, and
the plain class name, which larq's legacy (``.h5``) deserialization path looks up."""

# larq resolves strings through Keras' global custom objects (``larq.utils.register_alias`` and
# ``register_keras_custom_object`` do the same for larq's own quantizers).
keras.utils.get_custom_objects().update(ALIASES)
