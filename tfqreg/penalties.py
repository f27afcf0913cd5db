"""Functional cores of the tfqreg regularizers (methods.md §1-3): tensors in, the unweighted
penalty ``R(W)`` out, with closed-form, overflow-safe gradients. :mod:`tfqreg.regularizers`
re-exports the public ones and wraps them as Keras regularizers (``l · R``, learnable state,
BatchNorm folding, ``normalize``).

Numerics: weights of any float dtype are accumulated in float32 (float64 stays float64). Values
and gradients are finite for finite weights of any magnitude: squares are summed as
``(sqrt(Σ(|x|/m)²)·m)²`` with ``m = max|x|``, and a value or gradient whose true size exceeds the
largest float of the compute dtype saturates at that value (sign kept) instead of becoming inf.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from tfqreg import foothill as _foothill
from tfqreg import grid
from tfqreg._keras import tf

__all__ = [
    "NORMALIZATIONS",
    "rms",
    "scale_normalized",
    "foothill_penalty",
    "linf_penalty",
    "margin_penalty",
    "soft_max",
    "soft_min_max_penalty",
    "msqe_penalty",
    "percentile_threshold",
    "partial_l2_penalty",
]

# --------------------------------------------------------------------------------------------
# Numerically safe building blocks
# --------------------------------------------------------------------------------------------

def _compute_dtype(dtype) -> tf.DType:
    """float64 stays float64; every other dtype (float16, bfloat16, float32, ints) -> float32."""
    return tf.float64 if tf.as_dtype(dtype) == tf.float64 else tf.float32


def _to_compute(x) -> tf.Tensor:
    x = tf.convert_to_tensor(x)
    if not (x.dtype.is_floating or x.dtype.is_integer):
        raise TypeError(f"expected a real tensor, got dtype {x.dtype.name}.")
    return tf.cast(x, _compute_dtype(x.dtype))


def _as(x, dtype) -> tf.Tensor:
    """``x`` (a Python number, array or tensor) as a ``dtype`` tensor; Python floats are converted
    straight to ``dtype`` (``tf.cast(0.4, tf.float64)`` would round through float32 first)."""
    return tf.cast(tf.convert_to_tensor(x, dtype_hint=dtype), dtype)


def _fmax(dtype) -> float:
    return float(np.finfo(tf.as_dtype(dtype).as_numpy_dtype).max)


def _saturate(x: tf.Tensor) -> tf.Tensor:
    """Forward: clip to ±(largest finite float) (so ±inf -> ±max); backward: identity."""
    fmax = _fmax(x.dtype)

    @tf.custom_gradient
    def _sat(t):
        return tf.clip_by_value(t, -fmax, fmax), lambda dy: dy

    return _sat(x)


def _finite_grad(x: tf.Tensor) -> tf.Tensor:
    """Forward: identity; backward: the incoming gradient clipped to ±(largest finite float)."""
    fmax = _fmax(x.dtype)

    @tf.custom_gradient
    def _fg(t):
        return tf.identity(t), lambda dy: tf.clip_by_value(dy, -fmax, fmax)

    return _fg(x)


def _power_sum(x: tf.Tensor, power: float, scale=1.0) -> tf.Tensor:
    """``scale · Σ |x|^power`` (a scalar), overflow-safe, with gradient
    ``scale · power · |x|^(power−1) · sign(x)`` (saturated to the dtype's range).

    The sum is formed as ``(( scale · Σ (|x|/m)^p )^(1/p) · m)^p`` with ``m = max|x|``, so it is
    only infinite (and then saturates) when the true value exceeds the dtype's range.
    """
    x = tf.convert_to_tensor(x)
    dtype = x.dtype
    fmax = _fmax(dtype)
    p = float(power)
    scale = _as(scale, dtype)

    @tf.custom_gradient
    def _ps(t):
        a = tf.abs(t)
        m = tf.reduce_max(a) if a.shape.rank != 0 else a
        m_safe = tf.where(m > 0, m, tf.ones_like(m))
        inner = scale * tf.reduce_sum(tf.pow(a / m_safe, p))
        out = tf.pow(tf.pow(inner, 1.0 / p) * m_safe, p)
        out = tf.where(m > 0, out, tf.zeros_like(out))
        out = tf.clip_by_value(out, 0.0, fmax)

        def grad(dy):
            mag = tf.minimum(tf.pow(a, p - 1.0), fmax) if p != 1.0 else tf.ones_like(a)
            coef = tf.clip_by_value(dy * scale * p, -fmax, fmax)
            return tf.clip_by_value(tf.sign(t) * coef * mag, -fmax, fmax)

        return out, grad

    return _ps(x)


def _foothill_elementwise(x: tf.Tensor, alpha: float, beta: float) -> tf.Tensor:
    """``f(x)`` elementwise with the exact, bounded derivative ``f'(x)`` as gradient."""

    @tf.custom_gradient
    def _f(t):
        def grad(dy):
            return dy * _foothill.first_derivative(t, alpha, beta)

        return _foothill.value(t, alpha, beta), grad

    return _f(x)


NORMALIZATIONS = ("scale", "none")
"""Values of the range regularizers' ``normalize`` argument (see the module docstring)."""


def rms(w) -> tf.Tensor:
    """``sqrt(mean(w²))`` over all elements, overflow-safe (formed as ``m·sqrt(mean((w/m)²))``
    with ``m = max|w|``; 0 for an all-zero tensor)."""
    w = _to_compute(w)
    m = tf.reduce_max(tf.abs(w))
    m_safe = tf.where(m > 0, m, tf.ones_like(m))
    r = m_safe * tf.sqrt(tf.reduce_mean(tf.square(w / m_safe)))
    return tf.where(m > 0, r, tf.zeros_like(r))


def scale_normalized(w) -> tf.Tensor:
    """``w / rms(w)``: the tensor in units of its own root-mean-square (all zeros stays zeros),
    with ``rms(w)`` a constant for autodiff (the gradient of ``R(w / rms(w))`` is
    ``R'(u) / rms(w)``).

    A penalty ``R(w / rms(w))`` is then invariant to rescaling ``w`` (or the BatchNorm γ that
    folds into it) by a constant, and its gradient touches the same weights as ``R``'s (for L∞
    only the largest). Letting the gradient flow through ``rms`` would add a dense term
    ``−u·(R'(u)·u)/N`` that pushes every weight outward; Adam scales each weight's step by its
    own gradient history, so on weights with little task gradient that tiny push becomes a full
    learning-rate step and inflates them (measured: small_cnn per-tensor W3 56% against plain's
    84%).

    >>> [round(float(v), 4) for v in scale_normalized(tf.constant([3.0, -4.0]))]
    [0.8485, -1.1314]
    """
    w = _to_compute(w)
    r = tf.stop_gradient(rms(w))
    r_safe = tf.where(r > 0, r, tf.ones_like(r))
    return tf.where(r > 0, w / r_safe, tf.zeros_like(w))


# --------------------------------------------------------------------------------------------
# Functional cores: unweighted penalties R(W)
# --------------------------------------------------------------------------------------------

def foothill_penalty(w, alpha: float = 1.0, beta: float = 2.0, center: float = 0.0) -> tf.Tensor:
    """``Σ f(|w| − c)`` with ``f(x) = α·x·tanh(βx/2)`` (for ``c = 0`` this is ``Σ f(w)``).

    >>> float(foothill_penalty(tf.constant([0.0, 100.0]), alpha=1.0, beta=2.0))
    100.0
    """
    w = _to_compute(w)
    x = w if center == 0 else tf.abs(w) - _as(center, w.dtype)
    return _saturate(tf.reduce_sum(_foothill_elementwise(x, alpha, beta)))


def linf_penalty(w) -> tf.Tensor:
    """``max|w|``. Its gradient is ``sign(w)`` shared equally by the arg-max weight(s).

    >>> float(linf_penalty(tf.constant([0.5, -2.0, 1.0])))
    2.0
    """
    w = _to_compute(w)
    return tf.reduce_max(tf.abs(w))


def margin_penalty(w, margin, power: float = 2.0, margin_weight: float = 1.0) -> tf.Tensor:
    """``Σ relu(|w| − |M|)^p + γ·|M|``: zero penalty inside the margin, M itself is penalised.

    >>> float(margin_penalty(tf.constant([0.5, -2.0]), margin=1.0))   # 1² + 1
    2.0
    """
    w = _to_compute(w)
    m = _finite_grad(_as(margin, w.dtype))
    excess = tf.nn.relu(tf.abs(w) - tf.abs(m))
    return _saturate(_power_sum(excess, power) + margin_weight * tf.abs(m))


def _soft_max_core(w: tf.Tensor, a: tf.Tensor) -> tf.Tensor:
    """``Σ w_i e^{a w_i} / Σ e^{a w_i}`` of a flat tensor, shifted so exponents are ≤ 0, with
    closed-form gradients ``p_i(1 + a(w_i − s))`` (w) and ``Σ p_i (w_i − s)²`` (a)."""
    fmax = _fmax(w.dtype)

    @tf.custom_gradient
    def _smax(t, hardness):
        ref = tf.where(hardness >= 0, tf.reduce_max(t), tf.reduce_min(t))
        p = tf.nn.softmax(hardness * (t - ref))
        s = tf.reduce_sum(p * t)

        def grad(dy):
            d = t - s
            pa = p * hardness
            gw = tf.clip_by_value(dy * (p + tf.clip_by_value(pa * d, -fmax, fmax)), -fmax, fmax)
            scale = tf.reduce_max(tf.abs(d))
            scale = tf.where(scale > 0, scale, tf.ones_like(scale))
            var = tf.square(tf.sqrt(tf.reduce_sum(p * tf.square(d / scale))) * scale)
            ga = tf.clip_by_value(dy * tf.minimum(var, fmax), -fmax, fmax)
            return gw, ga

        return s, grad

    return _smax(w, a)


def soft_max(w, hardness) -> tf.Tensor:
    """Soft maximum ``Σ w_i e^{a w_i} / Σ e^{a w_i}`` over all elements (→ max w as a → ∞);
    ``soft_max(-w, a)`` is ``-smin``."""
    w = _to_compute(w)
    a = _finite_grad(_as(hardness, w.dtype))
    return _soft_max_core(tf.reshape(w, [-1]), a)


def soft_min_max_penalty(w, hardness, eta: float = 1.0) -> tf.Tensor:
    """``(smax − smin) + η·e^{−a}`` (methods.md §2), with log-sum-exp shifted softmaxes.

    As a → ∞ the range term tends to ``max w − min w``.

    >>> round(float(soft_min_max_penalty(tf.constant([-1.0, 0.0, 2.0]), 1e3, eta=1.0)), 4)
    3.0
    """
    w = tf.reshape(_to_compute(w), [-1])
    a = _finite_grad(_as(hardness, w.dtype))
    smax = _soft_max_core(w, a)
    smin = -_soft_max_core(-w, a)
    return _saturate(smax - smin + eta * _saturate(tf.exp(-a)))


def msqe_penalty(
    w,
    bits: int,
    step=None,
    channel_axes: Optional[Sequence[int]] = None,
    narrow_range: bool = False,
) -> tf.Tensor:
    """Mean squared quantization error ``(1/N) Σ (w − Q(w))²`` on the grid of :mod:`tfqreg.grid`.

    Args:
        w: weight tensor.
        bits: 1..16.
        step: the step δ (scalar, or broadcastable per channel). ``None``: the default step
            ``grid.default_step`` computed from ``w`` and treated as a constant. A given step
            receives the gradient ``−(2/N) Σ (w − Q(w))·k`` (round treated as constant).
        channel_axes: per-channel default step (e.g. ``(-1,)``); ignored when ``step`` is given.
        narrow_range: symmetric range ``−(2^(n−1)−1)..2^(n−1)−1``.

    >>> round(float(msqe_penalty(tf.constant([0.0, 0.5, 1.0]), bits=2)), 6)  # grid {-1,0,1}: .5²/3
    0.083333
    """
    bits = grid.check_bits(bits)
    w = _to_compute(w)
    if step is None:
        delta = tf.stop_gradient(grid.default_step(w, bits, channel_axes, narrow_range))
    else:
        delta = _finite_grad(_as(step, w.dtype))
    err = w - grid.fake_quant(w, delta, bits, narrow_range)
    n = tf.cast(tf.size(w), w.dtype)
    return _saturate(_power_sum(err, 2.0, 1.0 / n))


def percentile_threshold(w, fraction: float) -> tf.Tensor:
    """θ_r: the ⌈r·N⌉-th smallest ``|w|`` (NumPy ``percentile(|w|, 100r, method="inverted_cdf")``),
    so that exactly the ⌈r·N⌉ smallest magnitudes (plus ties) satisfy ``|w| ≤ θ_r``."""
    a = tf.reshape(tf.abs(_to_compute(w)), [-1])
    n = tf.size(a)
    k = tf.cast(tf.math.ceil(fraction * tf.cast(n, tf.float64)), tf.int32) - 1
    k = tf.clip_by_value(k, 0, tf.maximum(n - 1, 0))
    return tf.gather(tf.sort(a), k)


def partial_l2_penalty(w, fraction: float) -> tf.Tensor:
    """``(1/N) Σ_{|w_i| ≤ θ_r} w_i²`` with θ_r = :func:`percentile_threshold` (recomputed on
    every call, a constant for autodiff).

    >>> round(float(partial_l2_penalty(tf.constant([0.1, -0.2, 3.0, 4.0]), 0.5)), 6)  # .05/4
    0.0125
    """
    w = _to_compute(w)
    theta = tf.stop_gradient(percentile_threshold(w, fraction))
    kept = tf.where(tf.abs(w) <= theta, w, tf.zeros_like(w))
    n = tf.cast(tf.size(w), w.dtype)
    return _saturate(_power_sum(kept, 2.0, 1.0 / n))
