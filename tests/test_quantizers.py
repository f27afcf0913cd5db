"""FoothillSign: forward sign, backward f''(x)/α, and larq integration."""

import os

import larq as lq
import numpy as np
import pytest

import tfqreg
from tfqreg import models
from tfqreg._keras import keras, tf
from tfqreg.quantizers import FoothillSign, foothill_sign


def _closed_form(x, beta):
    bx = beta * np.asarray(x, np.float64)
    with np.errstate(over="ignore"):  # cosh overflows to inf for huge |βx|: the value is 0
        return beta * (2.0 - bx * np.tanh(bx / 2.0)) / (1.0 + np.cosh(bx))


def _signswish(x, beta):
    """f'(x)/α = SS_β(x) = 2σ(βx)[1 + βx(1 − σ(βx))] − 1, in float64."""
    bx = beta * np.asarray(x, np.float64)
    s = 1.0 / (1.0 + np.exp(-bx))
    return 2.0 * s * (1.0 + bx * (1.0 - s)) - 1.0


def _grad(x, beta, dy=None, dtype=tf.float64):
    x = tf.constant(x, dtype)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = foothill_sign(x, beta)
        target = y if dy is None else y * tf.constant(dy, dtype)
    return y.numpy(), tape.gradient(target, x).numpy()


def test_forward_is_sign_with_zero_to_plus_one():
    x = np.array([-3.0, -1e-7, 0.0, -0.0, 1e-7, 2.5], np.float32)
    y = foothill_sign(tf.constant(x)).numpy()
    np.testing.assert_array_equal(y, [-1, -1, 1, 1, 1, 1])
    assert y.dtype == np.float32
    # same convention as larq's own binary quantizers
    np.testing.assert_array_equal(y, lq.quantizers.SteSign()(tf.constant(x)).numpy())


@pytest.mark.parametrize("beta", [0.5, 1.0, 5.0, 10.0])
def test_backward_matches_closed_form(beta):
    rng = np.random.default_rng(1)
    x = rng.uniform(-3, 3, 200)
    dy = rng.normal(size=200)
    _, g = _grad(x, beta, dy)
    np.testing.assert_allclose(g, dy * _closed_form(x, beta), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 5.0])
def test_backward_matches_finite_differences_of_signswish(beta):
    """The backward pass is the derivative of the smooth surrogate f'(x)/α (SignSwish)."""
    x = np.linspace(-2.0, 2.0, 81) + 0.013
    h = 1e-6
    fd = (_signswish(x + h, beta) - _signswish(x - h, beta)) / (2 * h)
    _, g = _grad(x, beta)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-7)
    # and the peak is β at x = 0
    assert _grad([0.0], beta)[1][0] == pytest.approx(beta)


def test_matches_larq_swish_sign_gradient():
    """BNN+'s SwishSign in larq has the same pseudo-gradient (where it is finite)."""
    x = tf.constant(np.linspace(-2, 2, 41), tf.float32)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a = foothill_sign(x, 5.0)
        b = lq.quantizers.SwishSign(beta=5.0)(x)
    np.testing.assert_allclose(tape.gradient(a, x), tape.gradient(b, x), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float64])
def test_no_nan_for_huge_beta_x(dtype):
    x = [-1e30, -1e4, -100.0, -20.0, 20.0, 100.0, 1e4, 1e30]
    y, g = _grad(x, 50.0, dtype=dtype)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(y, np.sign(x))
    np.testing.assert_allclose(g, _closed_form(np.clip(x, -1e3, 1e3), 50.0), atol=1e-30)
    assert np.all(g[[0, 1, 2, 5, 6, 7]] == 0.0)  # |βx| > 80: exactly zero


def test_forward_and_gradient_in_graph_mode(eager_and_graph_mode):
    x = tf.constant([-1.0, 0.0, 0.3])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = FoothillSign(beta=2.0)(x)
    g = tape.gradient(y, x)
    y, g = keras.backend.get_value(y), keras.backend.get_value(g)
    np.testing.assert_array_equal(y, [-1, 1, 1])
    np.testing.assert_allclose(g, _closed_form([-1.0, 0.0, 0.3], 2.0), rtol=1e-5)


def test_bad_beta_raises():
    with pytest.raises(ValueError, match="beta"):
        FoothillSign(beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        foothill_sign(tf.constant(1.0), beta=-1.0)
    with pytest.raises(TypeError, match="beta"):
        FoothillSign(beta="large")


def test_larq_resolves_alias_and_serialization():
    q = lq.quantizers.get("foothill_sign")
    assert isinstance(q, FoothillSign) and q.precision == 1 and q.beta == 5.0
    q = FoothillSign(beta=2.5, metrics=["flip_ratio"])
    assert keras.utils.get_registered_name(FoothillSign) == "tfqreg>FoothillSign"
    ser = lq.quantizers.serialize(q)
    back = lq.quantizers.get(ser)
    assert isinstance(back, FoothillSign) and back.beta == 2.5
    back2 = FoothillSign.from_config(q.get_config())
    assert back2.beta == 2.5
    layer = lq.layers.QuantDense(3, input_quantizer="foothill_sign",
                                 kernel_quantizer="foothill_sign")
    assert isinstance(layer.input_quantizer, FoothillSign)
    assert isinstance(layer.kernel_quantizer, FoothillSign)


def test_summary_counts_one_bit():
    model = models.bnn("foothill_sign", "foothill_sign")
    profile = lq.models.ModelProfile(model)
    by_name = {p._layer.name: p for p in profile.layer_profiles}
    for name in ("qconv1", "qconv2", "qfc"):
        kernel = [w for w in by_name[name].weight_profiles if w.count > 0]
        assert [w.bitwidth for w in kernel] == [1], name
    assert by_name["qconv2"].input_precision == 1
    assert by_name["qfc"].input_precision == 1
    lines = []
    lq.models.summary(model, print_fn=lines.append)
    assert "# 1-bit" in "\n".join(lines)


def test_quantized_scope_returns_binarized_kernel():
    layer = lq.layers.QuantDense(4, kernel_quantizer="foothill_sign",
                                 kernel_constraint="weight_clip")
    layer.build((None, 6))
    latent = np.random.default_rng(0).uniform(-1, 1, (6, 4)).astype(np.float32)
    latent[0, 0] = 0.0
    layer.kernel.assign(latent)
    with lq.context.quantized_scope(True):
        binary = layer.kernel.numpy()
    np.testing.assert_array_equal(binary, np.where(latent >= 0, 1.0, -1.0))
    np.testing.assert_array_equal(layer.kernel.numpy(), latent)
    # a model's quantized weights (what larq exports) are binary too
    model = keras.Sequential([keras.layers.InputLayer((6,)), layer])
    with lq.context.quantized_scope(True):
        assert set(np.unique(model.get_weights()[0])) == {-1.0, 1.0}


def _data(n=64):
    rng = np.random.default_rng(0)
    return rng.uniform(0, 1, (n, 28, 28, 1)).astype(np.float32), rng.integers(0, 10, n)


def test_bnn_trains_and_round_trips(tmp_path):
    x, y = _data()
    model = models.bnn("foothill_sign", "foothill_sign", filters=(8, 8))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    before = [w.numpy().copy() for w in model.trainable_weights]
    with tf.GradientTape() as tape:
        loss = keras.losses.sparse_categorical_crossentropy(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_weights)
    kernel_grads = [g for g, w in zip(grads, model.trainable_weights) if "kernel" in w.name]
    assert len(kernel_grads) == 3 and all(np.any(g.numpy() != 0) for g in kernel_grads)
    history = model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights)]
    assert all(changed)

    expected = model.predict(x[:8], verbose=0)
    for path in (str(tmp_path / "m.keras"), str(tmp_path / "m.h5"), str(tmp_path / "saved")):
        model.save(path)
        loaded = keras.models.load_model(path)
        np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), expected, atol=1e-6)
        if not os.path.isdir(path):  # SavedModel restores a Keras model from the config too
            q = loaded.get_layer("qconv2").input_quantizer
            assert isinstance(q, FoothillSign) and q.beta == 5.0
