"""The Foothill function and its derivatives (Belbahri et al., arXiv 1901.06414), as tensor
functions. The regularizer, the binary quantizer and the loss are thin wrappers over these.

    f(x)   = α · x · tanh(β x / 2)
    f'(x)  = α · SS_β(x),  SS_β(x) = 2σ(βx)[1 + βx(1 − σ(βx))] − 1        (SignSwish)
    f''(x) = α · β · (2 − βx · tanh(βx/2)) / (1 + cosh βx)

f is even, f(0) = 0, L2-like near 0 (≈ αβ/2 · x²) and L1-like far away (→ α|x|).

>>> import tensorflow as tf
>>> from tfqreg import foothill
>>> float(foothill.value(tf.constant(100.0), alpha=1.0, beta=1.0))   # ≈ |x| far from 0
100.0
"""

from __future__ import annotations

from tfqreg._keras import tf

__all__ = ["value", "first_derivative", "second_derivative"]

# Beyond |βx| = 80, 1 + cosh(βx) > 2.7e34 and f''(x) underflows to 0 in float32: return 0 there
# instead of inf/inf.
_COSH_LIMIT = 80.0


def value(x, alpha: float = 1.0, beta: float = 1.0) -> tf.Tensor:
    """``f(x) = α · x · tanh(βx/2)``: finite for every finite ``x`` (tanh saturates)."""
    x = tf.convert_to_tensor(x)
    return alpha * x * tf.tanh(beta * x / 2.0)


def first_derivative(x, alpha: float = 1.0, beta: float = 1.0) -> tf.Tensor:
    """``f'(x) = α · SS_β(x)``, bounded by 1.2α.

    Computed as ``α·[tanh(βx/2) + (βx/2)·sech²(βx/2)]`` (the same function as the SignSwish
    form); ``sech²`` is evaluated as ``4 e^{-|βx|} / (1 + e^{-|βx|})²``, so nothing overflows.
    """
    x = tf.convert_to_tensor(x)
    u = beta * x / 2.0
    e = tf.exp(-2.0 * tf.abs(u))
    sech2 = 4.0 * e / tf.square(1.0 + e)
    # Where e underflows (|u| > ~44 in float32), u·sech²(u) is 0; guard it explicitly so that an
    # overflowing βx (u = ±inf) gives 0 instead of inf·0 = NaN.
    u_safe = tf.where(e > 0, u, tf.zeros_like(u))
    return alpha * (tf.tanh(u) + u_safe * sech2)


def second_derivative(x, alpha: float = 1.0, beta: float = 1.0) -> tf.Tensor:
    """``f''(x) = α·β·(2 − βx·tanh(βx/2)) / (1 + cosh βx)``, exactly 0 where ``|βx| > 80``."""
    x = tf.convert_to_tensor(x)
    bx = beta * x
    safe = tf.abs(bx) <= _COSH_LIMIT
    bx_safe = tf.where(safe, bx, tf.zeros_like(bx))
    out = alpha * beta * (2.0 - bx_safe * tf.tanh(bx_safe / 2.0)) / (1.0 + tf.cosh(bx_safe))
    return tf.where(safe, out, tf.zeros_like(out))
