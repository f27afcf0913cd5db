"""tfqreg.losses.Foothill: mean f(y_true − y_pred) against NumPy, gradients against the SignSwish
closed form and finite differences, the L1 / L2 limits, numerics, arguments and serialization."""

import json

import numpy as np
import pytest

import tfqreg
from tfqreg._keras import keras, tf
from tfqreg.losses import Foothill, foothill_loss


def np_f(x, a, b):
    return a * x * np.tanh(b * x / 2)


def np_signswish(x, b):
    s = 1.0 / (1.0 + np.exp(-b * x))
    return 2 * s * (1 + b * x * (1 - s)) - 1


@pytest.fixture
def yy():
    rng = np.random.default_rng(0)
    return rng.normal(size=(6, 4)) * 3, rng.normal(size=(6, 4)) * 3


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.4, 3.0), (2.0, 0.2)])
def test_value_and_gradient(yy, alpha, beta):
    y_true, y_pred = yy
    loss = Foothill(alpha, beta)
    pred = tf.Variable(y_pred)
    with tf.GradientTape() as tape:
        value = loss(tf.constant(y_true), pred)
    g = tape.gradient(value, pred).numpy()
    r = y_true - y_pred
    np.testing.assert_allclose(float(value), np_f(r, alpha, beta).mean(), rtol=1e-12)
    # d/dy_pred mean f(y_true - y_pred) = -α SS_β(r) / N
    np.testing.assert_allclose(g, -alpha * np_signswish(r, beta) / r.size, rtol=1e-9)
    eps, fd = 1e-6, np.zeros_like(y_pred)
    for i in np.ndindex(y_pred.shape):
        hi, lo = y_pred.copy(), y_pred.copy()
        hi[i] += eps
        lo[i] -= eps
        fd[i] = (float(loss(y_true, hi)) - float(loss(y_true, lo))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-10)


def test_per_sample_values_and_weights(yy):
    y_true, y_pred = yy
    per_sample = np_f(y_true - y_pred, 1.0, 1.0).mean(axis=-1)
    none = Foothill(reduction=keras.losses.Reduction.NONE)(y_true, y_pred)
    np.testing.assert_allclose(none.numpy(), per_sample, rtol=1e-12)
    np.testing.assert_allclose(foothill_loss(y_true, y_pred).numpy(), per_sample, rtol=1e-12)
    sw = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 3.0])
    np.testing.assert_allclose(float(Foothill()(y_true, y_pred, sample_weight=sw)),
                               (per_sample * sw).sum() / 6, rtol=1e-12)


def test_limits(yy):
    y_true, y_pred = yy
    r = y_true - y_pred
    # beta -> inf: alpha · MAE
    np.testing.assert_allclose(float(Foothill(0.7, 1e4)(y_true, y_pred)), 0.7 * np.abs(r).mean(),
                               rtol=1e-9)
    # beta -> 0 with alpha·beta = 2·lam: lam · MSE
    lam, beta = 0.3, 1e-4
    np.testing.assert_allclose(float(Foothill(2 * lam / beta, beta)(y_true, y_pred)),
                               lam * (r ** 2).mean(), rtol=1e-6)
    # the defaults: x²/2 near 0 (like log-cosh), |x| far away
    small = np.array([[1e-3, -2e-3]])
    np.testing.assert_allclose(float(Foothill()(np.zeros_like(small), small)),
                               (small ** 2 / 2).mean(), rtol=1e-5)
    np.testing.assert_allclose(float(Foothill()(np.zeros((1, 2)), np.array([[80.0, -60.0]]))),
                               70.0, rtol=1e-12)


def test_huge_residuals_are_finite():
    pred = tf.Variable([[1e30, -1e30, 3e38, 1e-30]], dtype=tf.float32)
    with tf.GradientTape() as tape:
        value = Foothill(1.0, 1e10)(tf.zeros((1, 4)), pred)
    g = tape.gradient(value, pred).numpy()
    assert np.isfinite(float(value)) and np.isfinite(g).all()
    np.testing.assert_allclose(g[0, :3], [0.25, -0.25, 0.25])


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_in_float32(dtype):
    y = tf.cast([[1.0, 2.0, 300.0]], dtype)
    value = Foothill()(tf.zeros_like(y), y)
    assert value.dtype == tf.float32
    np.testing.assert_allclose(float(value), np_f(np.array([1.0, 2.0, 300.0]), 1, 1).mean(),
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(alpha=0.0), ValueError, "alpha"), (dict(beta=-1.0), ValueError, "beta"),
    (dict(alpha="1"), TypeError, "alpha"), (dict(beta=None), TypeError, "beta"),
    (dict(alpha=float("inf")), ValueError, "alpha"), (dict(beta=True), TypeError, "beta")])
def test_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        Foothill(**kwargs)


def test_config_alias_and_fit(yy):
    loss = Foothill(0.5, 2.5, name="fh")
    config = loss.get_config()
    assert json.loads(json.dumps(config)) == config
    clone = Foothill.from_config(config)
    assert clone.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is Foothill and restored.get_config() == config
    assert keras.utils.get_registered_name(Foothill) == "tfqreg>FoothillLoss"
    got = keras.losses.get("foothill")
    assert type(got) is Foothill and got is not keras.losses.get("foothill")
    # compile with the alias: a robust fit of y = 2x with one gross outlier
    x = np.linspace(-1, 1, 64, dtype=np.float32)[:, None]
    y = 2 * x
    y[5] = 500.0
    fitted = {}
    for name in ("foothill", "mse"):
        tf.random.set_seed(0)
        model = keras.Sequential([keras.layers.Dense(1, input_shape=(1,))])
        model.compile(keras.optimizers.Adam(0.05), loss=name)
        model.fit(x, y, epochs=200, batch_size=64, verbose=0)
        fitted[name] = float(model.layers[0].kernel[0, 0]), float(model.layers[0].bias[0])
    assert abs(fitted["foothill"][0] - 2.0) < 0.1 and abs(fitted["foothill"][1]) < 0.1, fitted
    assert abs(fitted["mse"][0] - 2.0) > 1.0, fitted  # MSE is dragged off by the outlier
