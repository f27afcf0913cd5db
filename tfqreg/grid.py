"""The uniform quantization grid, once, as functions on tensors.

Every part of tfqreg that says "n bits" means the grid defined here (methods.md §3):

    Q(w) = δ · clip(round(w / δ), q_min, q_max)
    q_min, q_max = -2^(n-1), 2^(n-1) - 1          (symmetric signed)
    q_min        = -(2^(n-1) - 1)                  (narrow range)
    Q(w) = δ · sign(w),  sign(0) = +1              (n = 1, binary)

The default step puts the largest weight on the grid: ``δ = max|w| / (2^(n-1) - 1)`` per tensor,
or per output channel (``channel_axes``). For n = 1 the default is ``δ = mean|w|`` (the
L2-optimal binary scale). With the default step, ``round(w/δ)`` never leaves
``[-(2^(n-1)-1), 2^(n-1)-1]``, which is exactly TFLite's symmetric int8 weight grid at n = 8.

The regularizers (MSQE), the TFMOT and larq quantizers, post-training quantization and the
compression pipeline all call these functions.

>>> import tensorflow as tf
>>> from tfqreg import grid
>>> w = tf.constant([-1.0, -0.2, 0.0, 0.4, 0.7])
>>> step = grid.default_step(w, bits=3)        # max|w| / 3
>>> grid.fake_quant(w, step, bits=3).numpy().round(4)
array([-1.    , -0.3333,  0.    ,  0.3333,  0.6667], dtype=float32)
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from tfqreg._keras import tf

__all__ = [
    "check_bits",
    "qrange",
    "levels",
    "reduce_axes",
    "max_abs",
    "default_step",
    "quantize_indices",
    "fake_quant",
    "fake_quant_ste",
    "fake_quant_activation",
    "channel_axes_for",
    "check_quant_args",
]

_TINY = 1e-30  # smallest step used, so that an all-zero tensor quantizes to zeros, not NaN


def check_bits(bits, low: int = 1, high: int = 16, name: str = "bits") -> int:
    """Validate a bit width and return it as ``int``.

    Raises:
        TypeError: ``bits`` is not an integer.
        ValueError: ``bits`` is outside ``[low, high]``.
    """
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"`{name}` must be an integer, got {bits!r} ({type(bits).__name__}).")
    if not low <= int(bits) <= high:
        raise ValueError(f"`{name}` must be in {low}..{high}, got {bits}.")
    return int(bits)


def check_quant_args(weight_bits=None, activation_bits=None, per_channel=None,
                     narrow_range=None) -> None:
    """The shared check of PTQ and QAT arguments; ``None`` means "not given" and passes.

    Raises:
        TypeError: a bit width is not an integer, or a flag is not a bool.
        ValueError: a bit width is outside 2..16.
    """
    for name, bits in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
        if bits is not None:
            check_bits(bits, low=2, high=16, name=name)
    for name, value in (("per_channel", per_channel), ("narrow_range", narrow_range)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def qrange(bits: int, narrow_range: bool = False) -> Tuple[int, int]:
    """Integer range ``(q_min, q_max)`` of the symmetric signed n-bit grid.

    For ``bits == 1`` the grid is ``{-1, +1}`` and this returns ``(-1, 1)``.
    """
    bits = check_bits(bits)
    if bits == 1:
        return -1, 1
    q_max = 2 ** (bits - 1) - 1
    return (-q_max if narrow_range else -q_max - 1), q_max


def levels(bits: int, narrow_range: bool = False) -> int:
    """Number of distinct values on the grid (2 for binary)."""
    q_min, q_max = qrange(bits, narrow_range)
    return 2 if bits == 1 else q_max - q_min + 1


def reduce_axes(rank: int, channel_axes: Optional[Sequence[int]]) -> Optional[list]:
    """Axes to reduce over so that ``channel_axes`` survive (``None``: all axes)."""
    if channel_axes is None:
        return None
    keep = {a % rank for a in channel_axes}
    return [a for a in range(rank) if a not in keep]


def max_abs(w, channel_axes: Optional[Sequence[int]] = None) -> tf.Tensor:
    """``max|w|`` per tensor (scalar) or per channel (kept dims, broadcastable to ``w``)."""
    w = tf.convert_to_tensor(w)
    axes = reduce_axes(w.shape.rank, channel_axes)
    return tf.reduce_max(tf.abs(w), axis=axes, keepdims=channel_axes is not None)


def default_step(
    w, bits: int, channel_axes: Optional[Sequence[int]] = None, narrow_range: bool = False
) -> tf.Tensor:
    """The default step δ: ``max|w| / (2^(n-1) - 1)``, or ``mean|w|`` for one bit.

    Args:
        w: weight tensor.
        bits: bit width, 1..16.
        channel_axes: axes that get their own step (e.g. ``(-1,)`` for a Conv2D/Dense kernel,
            ``(2, 3)`` for a DepthwiseConv2D kernel); ``None`` for one step per tensor.
        narrow_range: accepted for symmetry with :func:`fake_quant`; the default step is the
            same for both ranges.

    Returns:
        A float tensor, scalar or broadcastable to ``w``; never below 1e-30.
    """
    del narrow_range
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w)
    if bits == 1:
        axes = reduce_axes(w.shape.rank, channel_axes)
        step = tf.reduce_mean(tf.abs(w), axis=axes, keepdims=channel_axes is not None)
    else:
        step = max_abs(w, channel_axes) / float(2 ** (bits - 1) - 1)
    return tf.maximum(step, tf.cast(_TINY, step.dtype))


def quantize_indices(w, step, bits: int, narrow_range: bool = False) -> tf.Tensor:
    """Integer grid indices ``clip(round(w/δ), q_min, q_max)`` (as floats; sign for 1 bit).

    ``round`` is round-half-to-even, as in ``tf.round`` and TFLite's reference kernels.
    """
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w)
    step = tf.cast(tf.convert_to_tensor(step, dtype_hint=w.dtype), w.dtype)
    if bits == 1:
        # sign with sign(0) = +1, written as larq.math.sign writes it: Larq Compute Engine's
        # converter recognises this pattern and emits binary kernels at any batch size.
        return tf.sign(tf.sign(w) + 0.1)
    q_min, q_max = qrange(bits, narrow_range)
    return tf.clip_by_value(tf.round(w / step), float(q_min), float(q_max))


def fake_quant(w, step, bits: int, narrow_range: bool = False) -> tf.Tensor:
    """``Q(w) = δ · indices``. The indices are constants for autodiff: the gradient w.r.t. ``w``
    is zero and the gradient w.r.t. ``step`` is the index (methods.md §3, "round treated as
    constant"), which is what makes δ learnable in MSQE."""
    w = tf.convert_to_tensor(w)
    step = tf.cast(tf.convert_to_tensor(step, dtype_hint=w.dtype), w.dtype)
    return step * tf.stop_gradient(quantize_indices(w, step, bits, narrow_range))


def fake_quant_ste(w, step, bits: int, narrow_range: bool = False) -> tf.Tensor:
    """Straight-through fake quantization: forward ``Q(w)``, gradient w.r.t. ``w`` is 1 inside
    the grid's range ``[δ·(q_min − ½), δ·(q_max + ½)]`` and 0 outside (clipped STE); for ``bits == 1`` it is
    1 everywhere (plain STE: clipping at ±δ = ±mean|w| would cut off half of the weights)."""
    w = tf.convert_to_tensor(w)
    step = tf.stop_gradient(tf.cast(tf.convert_to_tensor(step, dtype_hint=w.dtype), w.dtype))
    q = fake_quant(w, step, bits, narrow_range)
    if check_bits(bits) == 1:
        return w + tf.stop_gradient(q - w)
    q_min, q_max = qrange(bits, narrow_range)
    # Gradient 1 where rounding, not clipping, decides the value: w/δ within half a step of the
    # range. (Comparing w with δ·q_max directly loses the largest weight when δ·q_max rounds
    # just below max|w| in float32.)
    scaled = w / step
    inside = tf.cast((scaled >= q_min - 0.5) & (scaled <= q_max + 0.5), w.dtype)
    return inside * w + tf.stop_gradient(q - inside * w)


def fake_quant_activation(x, x_min, x_max, bits: int = 8, narrow_range: bool = False):
    """Asymmetric activation fake quantization on ``[x_min, x_max]`` (nudged so that 0 is on
    the grid), TFLite's activation scheme. Uses ``tf.quantization.fake_quant_with_min_max_vars``
    (2..16 bits), whose gradient is the clipped straight-through estimator."""
    bits = check_bits(bits, low=2, name="activation_bits")
    x = tf.convert_to_tensor(x)
    x_min = tf.minimum(tf.cast(x_min, tf.float32), 0.0)
    x_max = tf.maximum(tf.cast(x_max, tf.float32), 0.0)
    y = tf.quantization.fake_quant_with_min_max_vars(
        tf.cast(x, tf.float32), x_min, x_max, num_bits=bits, narrow_range=narrow_range
    )
    return tf.cast(y, x.dtype)


def channel_axes_for(layer) -> Optional[Tuple[int, ...]]:
    """Per-channel axes of a layer's kernel: the output-channel axis of Dense/Conv kernels
    (``-1``; ``-2`` for transposed convolutions, whose kernels are ``(..., out, in)``),
    ``(2, 3)`` (input channel × multiplier) for depthwise kernels, ``None`` for other layers."""
    from tfqreg._keras import keras  # local: grid stays importable without building layers

    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return (2, 3)
    if isinstance(layer, (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                          keras.layers.Conv3DTranspose)):
        return (-2,)
    if isinstance(layer, (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                          keras.layers.Dense)):
        return (-1,)
    return None
