"""tfqreg.grid against NumPy: integer ranges, the default step (per tensor, per channel, 1 bit),
indices and fake quantization (round half to even, clipping, narrow range), the straight-through
gradients, the δ gradient, TFLite's asymmetric activation scheme, and per-layer channel axes."""

import numpy as np
import pytest

from tfqreg import grid
from tfqreg._keras import keras, tf


def np_indices(w, step, bits, narrow=False):
    if bits == 1:
        return np.where(w >= 0, 1.0, -1.0)
    qmax = 2 ** (bits - 1) - 1
    return np.clip(np.round(w / step), -qmax if narrow else -qmax - 1, qmax)


@pytest.fixture
def w():
    return np.random.default_rng(0).normal(size=(3, 3, 4, 5)) * 0.2


@pytest.mark.parametrize("bits", range(1, 17))
def test_ranges_and_levels(bits):
    if bits == 1:
        assert grid.qrange(1) == (-1, 1) and grid.levels(1) == 2
        return
    assert grid.qrange(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert grid.qrange(bits, narrow_range=True) == (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    assert grid.levels(bits) == 2 ** bits and grid.levels(bits, True) == 2 ** bits - 1


@pytest.mark.parametrize("bad,exc", [(0, ValueError), (17, ValueError), (-3, ValueError),
                                     (4.0, TypeError), ("4", TypeError), (True, TypeError),
                                     (None, TypeError)])
def test_check_bits(bad, exc):
    with pytest.raises(exc, match="`bits`"):
        grid.check_bits(bad)
    assert grid.check_bits(np.int64(5)) == 5 and type(grid.check_bits(np.int64(5))) is int


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_default_step_per_tensor_and_per_channel(w, bits):
    qmax = 2 ** (bits - 1) - 1
    np.testing.assert_allclose(grid.default_step(tf.constant(w), bits).numpy(),
                               np.abs(w).max() / qmax, rtol=1e-15)
    per_out = grid.default_step(tf.constant(w), bits, channel_axes=(-1,)).numpy()
    assert per_out.shape == (1, 1, 1, 5)
    np.testing.assert_allclose(per_out, np.abs(w).max(axis=(0, 1, 2), keepdims=True) / qmax,
                               rtol=1e-15)
    depthwise = grid.default_step(tf.constant(w), bits, channel_axes=(2, 3)).numpy()
    assert depthwise.shape == (1, 1, 4, 5)
    np.testing.assert_allclose(depthwise, np.abs(w).max(axis=(0, 1), keepdims=True) / qmax,
                               rtol=1e-15)
    # the largest weight lies on the grid, no index leaves [-qmax, qmax]
    k = grid.quantize_indices(tf.constant(w), per_out, bits).numpy()
    assert np.abs(k).max() == qmax
    np.testing.assert_allclose(np.abs(k).max(axis=(0, 1, 2)), qmax)


def test_default_step_one_bit_and_zeros(w):
    np.testing.assert_allclose(grid.default_step(tf.constant(w), 1).numpy(), np.abs(w).mean(),
                               rtol=1e-14)
    np.testing.assert_allclose(grid.default_step(tf.constant(w), 1, (-1,)).numpy(),
                               np.abs(w).mean(axis=(0, 1, 2), keepdims=True), rtol=1e-14)
    zeros = tf.zeros((4, 3))
    step = grid.default_step(zeros, 4)
    assert float(step) > 0
    assert np.all(grid.fake_quant(zeros, step, 4).numpy() == 0)


@pytest.mark.parametrize("bits,narrow", [(1, False), (2, False), (2, True), (4, False),
                                         (4, True), (8, False)])
def test_indices_and_fake_quant_against_numpy(w, bits, narrow):
    step = 0.07
    x = np.concatenate([w.ravel(), [0.0, 0.5 * step, 1.5 * step, 2.5 * step, -0.5 * step, 9.0,
                                    -9.0]])
    k = grid.quantize_indices(tf.constant(x), step, bits, narrow).numpy()
    np.testing.assert_array_equal(k, np_indices(x, step, bits, narrow))
    np.testing.assert_allclose(grid.fake_quant(tf.constant(x), step, bits, narrow).numpy(),
                               step * np_indices(x, step, bits, narrow), rtol=1e-15)
    if bits > 2:  # round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
        assert list(k[-7:-2]) == [0, 0, 2, 2, 0]
    elif bits == 2:  # ... and clipped to q_max = 1
        assert list(k[-7:-2]) == [0, 0, 1, 1, 0]
    else:
        assert k[-7] == 1  # sign(0) = +1


def test_fake_quant_gradients_flow_to_the_step_only(w):
    wv, sv = tf.Variable(w), tf.Variable(0.05, dtype=tf.float64)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(grid.fake_quant(wv, sv, 3) * tf.constant(np.cos(w)))
    gw, gs = tape.gradient(y, [wv, sv])
    assert gw is None or np.all(gw.numpy() == 0)
    k = np_indices(w, 0.05, 3)
    np.testing.assert_allclose(float(gs), (k * np.cos(w)).sum(), rtol=1e-12)
    eps = 1e-7  # finite difference in δ (indices piecewise constant)
    f = lambda s: float(tf.reduce_sum(grid.fake_quant(tf.constant(w), s, 3)  # noqa: E731
                                      * tf.constant(np.cos(w))))
    np.testing.assert_allclose(float(gs), (f(0.05 + eps) - f(0.05 - eps)) / (2 * eps), rtol=1e-6)


@pytest.mark.parametrize("bits,narrow", [(2, False), (3, True), (4, False)])
def test_straight_through_gradient_is_clipped(bits, narrow):
    step = 0.1
    q_min, q_max = grid.qrange(bits, narrow)
    x = np.linspace(-1.2, 1.2, 241)
    xv = tf.Variable(x)
    with tf.GradientTape() as tape:
        y = grid.fake_quant_ste(xv, step, bits, narrow)
    g = tape.gradient(y, xv).numpy()
    np.testing.assert_allclose(y.numpy(), step * np_indices(x, step, bits, narrow), rtol=1e-15)
    inside = (x / step >= q_min - 0.5) & (x / step <= q_max + 0.5)
    np.testing.assert_array_equal(g, inside.astype(float))
    assert 0 < inside.sum() < x.size


def test_straight_through_keeps_the_largest_weight_with_the_default_step():
    # δ·q_max can round just below max|w| in float32; the largest weight must still learn.
    rng = np.random.default_rng(3)
    for _ in range(20):
        w = tf.Variable(rng.normal(size=200).astype(np.float32))
        step = grid.default_step(w, 4)
        with tf.GradientTape() as tape:
            y = grid.fake_quant_ste(w, step, 4)
        g = tape.gradient(y, w).numpy()
        np.testing.assert_array_equal(g, np.ones(200, np.float32))


def test_straight_through_one_bit_is_identity_gradient():
    xv = tf.Variable([-3.0, -0.2, 0.0, 0.4, 5.0])
    with tf.GradientTape() as tape:
        y = grid.fake_quant_ste(xv, 0.5, 1)
    np.testing.assert_array_equal(y.numpy(), [-0.5, -0.5, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(tape.gradient(y, xv).numpy(), np.ones(5))


def np_tflite_fake_quant(x, x_min, x_max, bits, narrow):
    """TensorFlow's FakeQuantWithMinMaxVars kernel: nudge zero onto the grid, clamp, round."""
    quant_min, quant_max = (1 if narrow else 0), 2 ** bits - 1
    scale = (x_max - x_min) / (quant_max - quant_min)
    zp_from_min = quant_min - x_min / scale
    zp = quant_min if zp_from_min < quant_min else quant_max if zp_from_min > quant_max \
        else np.round(zp_from_min)
    lo, hi = (quant_min - zp) * scale, (quant_max - zp) * scale
    return np.floor((np.clip(x, lo, hi) - lo) / scale + 0.5) * scale + lo


@pytest.mark.parametrize("bits,narrow", [(8, False), (4, False), (8, True), (2, False)])
def test_activation_fake_quant_tflite_scheme(bits, narrow):
    x = np.linspace(-1.5, 3.5, 301).astype(np.float32)
    out = grid.fake_quant_activation(tf.constant(x), -0.8, 3.1, bits, narrow).numpy()
    ref = np_tflite_fake_quant(x.astype(np.float64), -0.8, 3.1, bits, narrow)
    # points within float32 noise of a rounding tie may round either way: leave them out
    scale = 3.9 / (2 ** bits - 1 - (1 if narrow else 0))
    frac = ((x - ref) / scale) % 1.0
    clear = np.abs(np.abs(frac - 0.5) - 0.5) > 1e-4
    clear &= np.abs(np.abs(((x.astype(np.float64) - ref) / scale)) - 0.5) > 1e-4
    assert clear.sum() > 250
    np.testing.assert_allclose(out[clear], ref[clear], atol=2e-6)
    assert 0.0 in out  # zero is exactly representable
    with pytest.raises(ValueError, match="activation_bits"):
        grid.fake_quant_activation(tf.constant(x), 0.0, 1.0, bits=1)


def test_channel_axes_for_layers():
    assert grid.channel_axes_for(keras.layers.Dense(3)) == (-1,)
    assert grid.channel_axes_for(keras.layers.Conv2D(3, 3)) == (-1,)
    assert grid.channel_axes_for(keras.layers.DepthwiseConv2D(3)) == (2, 3)
    assert grid.channel_axes_for(keras.layers.BatchNormalization()) is None


@pytest.mark.parametrize("cls,shape", [(keras.layers.Conv1DTranspose, (6, 3)),
                                       (keras.layers.Conv2DTranspose, (6, 6, 3))])
def test_transposed_conv_steps_are_per_output_filter(cls, shape):
    # Transposed-conv kernels are (..., filters, in_channels): one step per *filter*, not per
    # input channel, so every output channel gets the grid that its own weights need.
    layer = cls(5, 3)
    layer.build((None,) + shape)
    kernel = layer.kernel.numpy()
    axes = grid.channel_axes_for(layer)
    assert kernel.shape[axes[0]] == 5
    step = grid.default_step(tf.constant(kernel), 4, axes).numpy()
    reduce = tuple(i for i in range(kernel.ndim) if i != kernel.ndim - 2)
    np.testing.assert_allclose(step.ravel(), np.abs(kernel).max(axis=reduce) / 7, rtol=1e-6)


def test_eight_bit_default_step_is_tflite_symmetric_int8(w):
    step = grid.default_step(tf.constant(w), 8, (-1,)).numpy()
    k = grid.quantize_indices(tf.constant(w), step, 8).numpy()
    assert k.min() >= -127 and k.max() <= 127  # TFLite's symmetric weight range
    np.testing.assert_allclose(step.ravel(), np.abs(w).max(axis=(0, 1, 2)) / 127, rtol=1e-15)


def test_float64_python_step_keeps_precision():
    w = tf.constant([0.4 * 3], tf.float64)
    np.testing.assert_array_equal(grid.fake_quant(w, 0.4, 4).numpy(), [0.4 * 3])
