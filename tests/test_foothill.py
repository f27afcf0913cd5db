"""tfqreg.foothill: f, f', f'' against NumPy closed forms and float64 finite differences, the
SignSwish identity, the properties of methods.md §1 and overflow safety."""

import numpy as np
import pytest

from tfqreg import foothill
from tfqreg._keras import tf

X = np.concatenate([np.linspace(-12, 12, 97), [-1e-8, 1e-8, 0.0]])


def np_f(x, a, b):
    return a * x * np.tanh(b * x / 2)


def np_sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def np_f1_signswish(x, a, b):
    s = np_sigmoid(b * x)
    return a * (2 * s * (1 + b * x * (1 - s)) - 1)


def np_f2(x, a, b):
    return a * b * (2 - b * x * np.tanh(b * x / 2)) / (1 + np.cosh(b * x))


PARAMS = [(1.0, 1.0), (0.3, 2.0), (2.5, 0.4), (1.0, 7.0)]


@pytest.mark.parametrize("a,b", PARAMS)
def test_value_and_derivatives_closed_forms(a, b):
    x = tf.constant(X, tf.float64)
    np.testing.assert_allclose(foothill.value(x, a, b).numpy(), np_f(X, a, b), rtol=1e-13,
                               atol=1e-300)
    # f' equals α times BNN+'s SignSwish 2σ(βx)[1 + βx(1 − σ(βx))] − 1
    np.testing.assert_allclose(foothill.first_derivative(x, a, b).numpy(),
                               np_f1_signswish(X, a, b), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(foothill.second_derivative(x, a, b).numpy(), np_f2(X, a, b),
                               rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("a,b", PARAMS)
def test_derivatives_match_finite_differences(a, b):
    eps = 1e-6
    x = tf.constant(X, tf.float64)
    fd1 = (foothill.value(x + eps, a, b) - foothill.value(x - eps, a, b)).numpy() / (2 * eps)
    fd2 = (foothill.first_derivative(x + eps, a, b)
           - foothill.first_derivative(x - eps, a, b)).numpy() / (2 * eps)
    np.testing.assert_allclose(foothill.first_derivative(x, a, b).numpy(), fd1, atol=1e-7 * a * b)
    np.testing.assert_allclose(foothill.second_derivative(x, a, b).numpy(), fd2,
                               atol=1e-7 * a * b * b)
    # and autodiff of the value agrees with the closed-form f'
    v = tf.Variable(X)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(foothill.value(v, a, b))
    np.testing.assert_allclose(tape.gradient(y, v).numpy(), foothill.first_derivative(x, a, b),
                               rtol=1e-9, atol=1e-12)


def test_properties():
    a, b = 1.7, 3.0
    x = tf.constant(np.linspace(-8, 8, 2001), tf.float64)
    f = foothill.value(x, a, b).numpy()
    np.testing.assert_array_equal(foothill.value(-x, a, b).numpy(), f)  # even
    assert float(foothill.value(tf.constant(0.0, tf.float64), a, b)) == 0.0
    assert np.all(f >= 0)
    right = f[1000:]
    assert np.all(np.diff(right) > 0)  # increasing in |x|
    f1 = foothill.first_derivative(x, a, b).numpy()
    assert np.abs(f1).max() <= 1.2 * a and np.abs(f1).max() > 1.19 * a  # bounded by ~1.2α
    f2 = foothill.second_derivative(x, a, b).numpy()
    xs = x.numpy()
    assert np.all(f2[np.abs(xs) > 2.4 / b] < 0) and np.all(f2[np.abs(xs) < 2.39 / b] > 0)
    # near 0 ≈ αβ/2 x², far ≈ α|x|
    np.testing.assert_allclose(float(foothill.value(tf.constant(1e-4, tf.float64), a, b)),
                               a * b / 2 * 1e-8, rtol=1e-7)
    np.testing.assert_allclose(float(foothill.value(tf.constant(-50.0, tf.float64), a, b)),
                               a * 50, rtol=1e-12)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16, tf.float32, tf.float64])
def test_no_nan_for_huge_beta_x(dtype):
    big = float(tf.as_dtype(dtype).max) / 2
    x = tf.constant([big, -big, 1e4, -1e4, 0.0], dtype)
    for beta in (1.0, 1e10 if dtype in (tf.float32, tf.float64) else 1e3):
        for fn in (foothill.value, foothill.first_derivative, foothill.second_derivative):
            out = tf.cast(fn(x, 1.0, beta), tf.float64).numpy()
            assert np.all(np.isfinite(out)), (fn.__name__, dtype, beta, out)
        f1 = tf.cast(foothill.first_derivative(x, 1.0, beta), tf.float64).numpy()
        np.testing.assert_allclose(f1[:4], [1, -1, 1, -1], rtol=1e-2)
        f2 = foothill.second_derivative(x, 1.0, beta).numpy()
        assert np.all(f2[:4] == 0)  # |βx| > 80: exactly 0
