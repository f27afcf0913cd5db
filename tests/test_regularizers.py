"""tfqreg.regularizers: every value and gradient against NumPy closed forms and float64 finite
differences, the limits of methods.md, numerics, arguments, aliases, learnable state (fit, larq,
TFMOT) and MirroredStrategy. Model save/load round trips: test_serialization_regularizers.py."""

import json
import logging

import numpy as np
import pytest

import tfqreg
from tfqreg import regularizers as R
from tfqreg._keras import keras, tf

F32_MAX = float(np.finfo(np.float32).max)


# ------------------------------------------------------------------------------ references
def np_f(x, a, b):
    return a * x * np.tanh(b * x / 2)


def np_signswish(x, b):
    s = 1.0 / (1.0 + np.exp(-b * x))
    return 2 * s * (1 + b * x * (1 - s)) - 1


def np_smax(w, a):
    z = a * w
    e = np.exp(z - z.max())
    return float((e * w).sum() / e.sum())


def np_rms(w):
    return float(np.sqrt(np.mean(np.square(np.asarray(w, np.float64)))))


def np_quantize(w, step, bits, narrow=False):
    if bits == 1:
        return step * np.where(w >= 0, 1.0, -1.0)
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if narrow else -qmax - 1
    return step * np.clip(np.round(w / step), qmin, qmax)  # np.round: half to even


def np_partial_l2(w, r):
    a = np.abs(w).ravel()
    theta = np.percentile(a, 100 * r, method="inverted_cdf")
    mask = np.abs(w) <= theta
    return float((w[mask] ** 2).sum() / w.size), mask


def t64(x):
    return tf.constant(np.asarray(x, np.float64))


def value_and_grads(fn, *arrays):
    """fn(*tensors) -> scalar; returns (value, [gradients]) in float64."""
    vs = [tf.Variable(np.asarray(a, np.float64)) for a in arrays]
    with tf.GradientTape() as tape:
        out = fn(*vs)
    grads = tape.gradient(out, vs)
    return float(out), [g.numpy() for g in grads]


def finite_diff(fn, arrays, index, eps=1e-6):
    """Central differences of fn w.r.t. arrays[index], every element, in float64."""
    arrays = [np.array(a, np.float64) for a in arrays]
    x = arrays[index]
    out = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        hi = [a.copy() for a in arrays]
        lo = [a.copy() for a in arrays]
        hi[index][i] += eps
        lo[index][i] -= eps
        out[i] = (float(fn(*map(t64, hi))) - float(fn(*map(t64, lo)))) / (2 * eps)
    return out


@pytest.fixture
def w():
    # distinct magnitudes, no zeros, unique max: every function is smooth at these points
    rng = np.random.default_rng(1)
    return rng.uniform(-1.0, 1.0, size=(4, 5)) + np.sign(rng.uniform(-1, 1, (4, 5))) * 0.01


# ------------------------------------------------------------------------------ Foothill
@pytest.mark.parametrize("alpha,beta,center", [(1.0, 2.0, 0.0), (0.7, 5.0, 0.0), (1.3, 3.0, 0.4)])
def test_foothill_value_and_gradient(w, alpha, beta, center):
    reg = R.Foothill(l=0.3, alpha=alpha, beta=beta, center=center)
    x = np.abs(w) - center
    expected = 0.3 * np_f(x, alpha, beta).sum()
    value, (g,) = value_and_grads(reg, w)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    # closed form: l · α · SignSwish_β(|w| − c) · sign(w)   (methods.md §1)
    np.testing.assert_allclose(g, 0.3 * alpha * np_signswish(x, beta) * np.sign(w), rtol=1e-9)
    np.testing.assert_allclose(g, finite_diff(reg, [w], 0), rtol=1e-6, atol=1e-9)


def test_foothill_limits():
    x = np.array([-3.0, -0.5, 0.2, 1.0, 2.5])
    # beta -> inf: f -> alpha |x|  (error shrinks with beta)
    errs = [abs(float(R.foothill_penalty(t64(x), 0.8, b)) - 0.8 * np.abs(x).sum())
            for b in (1e1, 1e2, 1e3)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-12
    # with a center: -> alpha Σ ||x| - c|
    np.testing.assert_allclose(float(R.foothill_penalty(t64(x), 0.8, 1e4, 0.3)),
                               0.8 * np.abs(np.abs(x) - 0.3).sum(), rtol=1e-9)
    # beta -> 0 with alpha*beta = 2*lam: f -> lam x²
    lam = 0.25
    errs = [abs(float(R.foothill_penalty(t64(x), 2 * lam / b, b)) - lam * (x ** 2).sum())
            for b in (1e-1, 1e-2, 1e-3)]
    # f = lam x² (1 - (βx)²/12 + ...): the error is lam β² Σx⁴ / 12, 100x smaller per decade
    np.testing.assert_allclose(errs, [lam * b * b * (x ** 4).sum() / 12 for b in (1e-1, 1e-2, 1e-3)],
                               rtol=1e-2)
    # default (alpha=1, beta=2) equals keras L2(l) near zero
    small = np.array([1e-3, -2e-3, 5e-4])
    np.testing.assert_allclose(float(R.Foothill(l=0.1)(t64(small))),
                               float(keras.regularizers.L2(0.1)(t64(small))), rtol=1e-5)


# ------------------------------------------------------------------------------ L-inf
def test_linf_value_and_gradient(w):
    value, (g,) = value_and_grads(R.LInf(0.2, normalize="none"), w)
    np.testing.assert_allclose(value, 0.2 * np.abs(w).max(), rtol=1e-15)
    expected = np.zeros_like(w)
    i = np.unravel_index(np.abs(w).argmax(), w.shape)
    expected[i] = 0.2 * np.sign(w[i])
    np.testing.assert_allclose(g, expected)
    np.testing.assert_allclose(g, finite_diff(R.LInf(0.2, normalize="none"), [w], 0), atol=1e-8)


def test_linf_gradient_shared_by_tied_maxima():
    _, (g,) = value_and_grads(R.linf_penalty, np.array([1.0, -1.0, 0.5]))
    np.testing.assert_allclose(g, [0.5, -0.5, 0.0])


# ------------------------------------------------------------------------------ Margin
@pytest.mark.parametrize("power,gamma", [(2.0, 1.0), (1.5, 0.3), (3.0, 2.0)])
def test_margin_value_and_gradients(w, power, gamma):
    m = 0.55  # about half of the weights lie beyond it; none sits on it
    fn = lambda ww, mm: R.margin_penalty(ww, mm, power, gamma)  # noqa: E731
    value, (gw, gm) = value_and_grads(fn, w, m)
    d = np.maximum(np.abs(w) - m, 0)
    assert (d > 0).sum() >= 3
    np.testing.assert_allclose(value, (d ** power).sum() + gamma * m, rtol=1e-12)
    np.testing.assert_allclose(gw, power * d ** (power - 1) * np.sign(w), rtol=1e-10)
    np.testing.assert_allclose(gm, -(power * d ** (power - 1)).sum() + gamma, rtol=1e-10)
    np.testing.assert_allclose(gw, finite_diff(fn, [w, m], 0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(gm, finite_diff(fn, [w, m], 1), rtol=1e-5)
    # |M|: a negative M acts like its magnitude
    np.testing.assert_allclose(float(fn(t64(w), t64(-m))), value, rtol=1e-12)


def test_margin_term_zero_inside_the_margin(w):
    m = np.abs(w).max() + 0.1
    value, (gw, gm) = value_and_grads(lambda a, b: R.margin_penalty(a, b, 2.0, 0.7), w, m)
    assert value == pytest.approx(0.7 * m, rel=1e-15)
    assert np.all(gw == 0)
    assert gm == pytest.approx(0.7)


# ------------------------------------------------------------------------------ soft-min-max
@pytest.mark.parametrize("a", [0.5, 3.0, 20.0])
def test_soft_min_max_value_and_gradients(w, a):
    fn = lambda ww, aa: R.soft_min_max_penalty(ww, aa, eta=0.7)  # noqa: E731
    value, (gw, ga) = value_and_grads(fn, w, a)
    flat = w.ravel()
    smax, smin = np_smax(flat, a), -np_smax(-flat, a)
    np.testing.assert_allclose(value, smax - smin + 0.7 * np.exp(-a), rtol=1e-12)
    # closed forms: d smax/dw_i = p_i (1 + a (w_i - smax)), d smax/da = Var_p(w)
    p = np.exp(a * flat - (a * flat).max()); p /= p.sum()
    q = np.exp(-a * flat - (-a * flat).max()); q /= q.sum()
    gw_ref = p * (1 + a * (flat - smax)) - q * (1 - a * (flat - smin))
    ga_ref = (p * (flat - smax) ** 2).sum() + (q * (flat - smin) ** 2).sum() - 0.7 * np.exp(-a)
    np.testing.assert_allclose(gw.ravel(), gw_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ga, ga_ref, rtol=1e-9)
    np.testing.assert_allclose(gw, finite_diff(fn, [w, a], 0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(ga, finite_diff(fn, [w, a], 1), rtol=1e-5, atol=1e-10)


def test_soft_min_max_tends_to_max_minus_min(w):
    true_range = w.max() - w.min()
    errs = [abs(float(R.soft_min_max_penalty(t64(w), a, eta=1e-300)) - true_range)
            for a in (1.0, 10.0, 100.0, 1e4)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] < 1e-12
    # and it collapses to 0 (plus eta) as a -> 0: the reason for the eta·e^{-a} term
    assert float(R.soft_min_max_penalty(t64(w), 1e-8, eta=1.0)) == pytest.approx(1.0, abs=1e-6)
    # soft max alone
    assert float(R.soft_max(t64(w), 1e4)) == pytest.approx(w.max(), abs=1e-12)


# ------------------------------------------------------------------------------ normalize="scale"
def np_scale_chain(w, g_u):
    """Gradient w.r.t. w of R(w / rms(w)) given g_u = dR/du at u = w/rms(w), rms(w) held
    constant (as documented): g_u / rms(w)."""
    return g_u / np_rms(w)


def test_scale_normalized_is_w_over_rms(w):
    value, (g,) = value_and_grads(lambda t: tf.reduce_sum(R.scale_normalized(t) * t64(w)), w)
    r = np_rms(w)
    np.testing.assert_allclose(R.scale_normalized(t64(w)).numpy(), w / r, rtol=1e-14)
    np.testing.assert_allclose(float(R.rms(t64(w))), r, rtol=1e-14)
    np.testing.assert_allclose(g, w / r, rtol=1e-12)  # rms is a constant for the gradient
    # all zeros stays zeros (no 0/0), with a zero gradient
    z = R.scale_normalized(tf.zeros([3]))
    assert z.numpy().tolist() == [0.0, 0.0, 0.0]
    # overflow-safe: rms of weights whose squares overflow float32
    big = tf.constant([3e30, -4e30], tf.float32)
    np.testing.assert_allclose(float(R.rms(big)), np.sqrt(12.5) * 1e30, rtol=1e-6)


def test_linf_scale_value_and_gradient(w):
    reg = R.LInf(0.2)  # normalize="scale" is the default
    assert reg.normalize == "scale"
    value, (g,) = value_and_grads(reg, w)
    r = np_rms(w)
    np.testing.assert_allclose(value, 0.2 * np.abs(w).max() / r, rtol=1e-13)
    # closed form (rms held constant): l · sign(w_k) e_k / rms, k = argmax |w|: only the
    # largest weight is touched, as with the raw penalty
    k = np.unravel_index(np.abs(w).argmax(), w.shape)
    expected = np.zeros_like(w)
    expected[k] = 0.2 * np.sign(w[k]) / r
    np.testing.assert_allclose(g, expected, rtol=1e-12, atol=0)
    # against finite differences of l·max|w| / c with c = rms(w) frozen at the point
    frozen = lambda t: 0.2 * R.linf_penalty(t) / r  # noqa: E731
    np.testing.assert_allclose(g, finite_diff(frozen, [w], 0), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("power,gamma", [(2.0, 1.0), (1.5, 0.3)])
def test_margin_scale_value_and_gradient(w, power, gamma):
    reg = R.Margin(0.3, power=power, margin_weight=gamma, margin=1.2)
    value, (g,) = value_and_grads(reg, w)   # detached: M = the given initial margin
    u = w / np_rms(w)
    excess = np.maximum(np.abs(u) - 1.2, 0)
    assert excess.max() > 0  # the test exercises the relu branch
    np.testing.assert_allclose(value, 0.3 * ((excess ** power).sum() + gamma * 1.2), rtol=1e-12)
    g_u = 0.3 * power * excess ** (power - 1) * np.sign(u)
    np.testing.assert_allclose(g, np_scale_chain(w, g_u), rtol=1e-9, atol=1e-13)
    assert np.all(g[excess == 0] == 0)  # only the weights beyond the margin are pulled
    r = np_rms(w)
    frozen = lambda t: 0.3 * R.margin_penalty(t / r, 1.2, power, gamma)  # noqa: E731
    np.testing.assert_allclose(g, finite_diff(frozen, [w], 0), rtol=1e-5, atol=1e-9)


def test_soft_min_max_scale_value_and_gradient(w):
    reg = R.SoftMinMax(0.4, eta=0.7, hardness=3.0)
    value, (g,) = value_and_grads(reg, w)
    u = (w / np_rms(w)).ravel()
    smax, smin = np_smax(u, 3.0), -np_smax(-u, 3.0)
    np.testing.assert_allclose(value, 0.4 * (smax - smin + 0.7 * np.exp(-3.0)), rtol=1e-12)
    p = np.exp(3.0 * u - (3.0 * u).max()); p /= p.sum()
    q = np.exp(-3.0 * u - (-3.0 * u).max()); q /= q.sum()
    g_u = 0.4 * (p * (1 + 3.0 * (u - smax)) - q * (1 - 3.0 * (u - smin)))
    np.testing.assert_allclose(g.ravel(), np_scale_chain(w.ravel(), g_u), rtol=1e-9, atol=1e-13)
    r = np_rms(w)
    frozen = lambda t: 0.4 * R.soft_min_max_penalty(t / r, 3.0, 0.7)  # noqa: E731
    np.testing.assert_allclose(g, finite_diff(frozen, [w], 0), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("make", [lambda: R.LInf(0.3), lambda: R.Margin(0.3, margin=1.5),
                                  lambda: R.SoftMinMax(0.3, hardness=2.0)],
                         ids=["linf", "margin", "soft_min_max"])
def test_scale_normalized_penalty_is_scale_free(w, make, caplog):
    reg = make()
    value, (g,) = value_and_grads(reg, w)
    for c in (1e-3, 7.0, 1e4):
        np.testing.assert_allclose(float(reg(t64(c * w))), value, rtol=1e-12)
        _, (gc,) = value_and_grads(reg, c * w)
        np.testing.assert_allclose(gc, g / c, rtol=1e-9, atol=1e-12)  # homogeneous of degree -1
    # the old meaning is the raw penalty, which does scale
    raw = type(reg).from_config({**reg.get_config(), "normalize": "none"})
    assert float(raw(t64(7.0 * w))) > float(raw(t64(w)))


def test_scale_normalized_penalty_of_the_folded_kernel():
    # a Conv + BatchNorm: the penalty is l · max|w'| / rms(w'), w' = w·γ/√(σ²+ε)
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, use_bias=False, kernel_regularizer=R.LInf(0.5), name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, h)
    bn = model.get_layer("bn")
    rng = np.random.default_rng(4)
    bn.gamma.assign(rng.uniform(0.2, 3.0, 4).astype(np.float32))
    bn.moving_variance.assign(rng.uniform(0.1, 4.0, 4).astype(np.float32))
    k = model.get_layer("conv").kernel.numpy().astype(np.float64)
    folded = k * bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    assert float(model.losses[0]) == pytest.approx(0.5 * np.abs(folded).max() / np_rms(folded),
                                                   rel=1e-5)
    # scaling all of γ by a constant leaves it unchanged: only the per-channel spread counts
    bn.gamma.assign(bn.gamma * 5.0)
    assert float(model.losses[0]) == pytest.approx(0.5 * np.abs(folded).max() / np_rms(folded),
                                                   rel=1e-5)


@pytest.mark.parametrize("cls", [R.LInf, R.Margin, R.SoftMinMax])
def test_config_without_normalize_loads_with_the_old_meaning(cls):
    # a config saved before `normalize` existed meant the raw penalty: it must train the same
    old = {"l": 0.05, "fold_batchnorm": True}
    reg = cls.from_config(old)
    assert reg.normalize == "none"
    restored = keras.regularizers.deserialize(
        {"class_name": f"tfqreg>{cls.__name__}", "config": old})
    assert restored.normalize == "none"
    assert cls().normalize == "scale" and cls().get_config()["normalize"] == "scale"
    x = tf.constant([[0.5, -2.0], [1.0, 0.25]])
    if cls is R.LInf:
        assert float(restored(x)) == pytest.approx(0.05 * 2.0)


@pytest.mark.parametrize("cls", [R.LInf, R.Margin, R.SoftMinMax, R.Foothill])
def test_default_strengths_are_documented(cls):
    # the default in the signature is the one the module docstring's alias list states
    import re

    stated = re.findall(rf"``{cls.__name__}\(l=([0-9.e-]+)", R.__doc__)
    assert stated and all(float(v) == cls().l for v in stated), (cls, stated, cls().l)


# ------------------------------------------------------------------------------ MSQE
@pytest.mark.parametrize("bits,narrow", [(1, False), (2, False), (3, True), (4, False), (8, False)])
def test_msqe_default_step_value_and_gradient(w, bits, narrow):
    reg = R.MSQE(l=2.0, bits=bits, narrow_range=narrow)
    value, (g,) = value_and_grads(reg, w)
    step = np.abs(w).mean() if bits == 1 else np.abs(w).max() / (2 ** (bits - 1) - 1)
    err = w - np_quantize(w, step, bits, narrow)
    np.testing.assert_allclose(value, 2.0 * (err ** 2).mean(), rtol=1e-10)
    # the default step is a constant for autodiff: dR/dw = 2 (w - Q(w)) / N
    np.testing.assert_allclose(g, 2.0 * 2 * err / w.size, rtol=1e-9, atol=1e-15)


def test_msqe_per_channel(w):
    reg = R.MSQE(l=1.0, bits=3, per_channel=True)
    step = np.abs(w).max(axis=0, keepdims=True) / 3
    expected = ((w - np_quantize(w, step, 3)) ** 2).mean()
    np.testing.assert_allclose(float(reg(t64(w))), expected, rtol=1e-10)
    assert abs(float(R.MSQE(l=1.0, bits=3)(t64(w))) - expected) > 1e-6  # per-tensor differs


def test_msqe_given_step_gradients(w):
    fn = lambda ww, s: R.msqe_penalty(ww, 3, step=s)  # noqa: E731
    step = 0.173
    value, (gw, gs) = value_and_grads(fn, w, step)
    k = np.clip(np.round(w / step), -4, 3)
    err = w - step * k
    np.testing.assert_allclose(value, (err ** 2).mean(), rtol=1e-12)
    np.testing.assert_allclose(gw, 2 * err / w.size, rtol=1e-10)
    np.testing.assert_allclose(gs, -2 * (err * k).sum() / w.size, rtol=1e-10)
    np.testing.assert_allclose(gw, finite_diff(fn, [w, step], 0, eps=1e-7), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(gs, finite_diff(fn, [w, step], 1, eps=1e-7), rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16])
def test_msqe_zero_on_the_grid(bits):
    rng = np.random.default_rng(bits)
    if bits == 1:
        w = 0.37 * np.where(rng.uniform(size=30) > 0.5, 1.0, -1.0)
    else:
        qmax = 2 ** (bits - 1) - 1
        k = rng.integers(-qmax, qmax + 1, size=30).astype(np.float64)
        k[0] = qmax
        w = 0.013 * k
    assert float(R.MSQE(l=1.0, bits=bits)(t64(w))) < 1e-30 + 1e-25 * float((w ** 2).mean())
    # and not zero off the grid
    assert float(R.MSQE(l=1.0, bits=bits)(t64(w + 0.001))) > 0


# ------------------------------------------------------------------------------ partial L2
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.77])
def test_partial_l2_value_and_gradient(w, fraction):
    reg = R.PartialL2(l=3.0, fraction=fraction)
    expected, mask = np_partial_l2(w, fraction)
    assert mask.sum() == int(np.ceil(fraction * w.size))
    value, (g,) = value_and_grads(reg, w)
    np.testing.assert_allclose(value, 3.0 * expected, rtol=1e-12)
    np.testing.assert_allclose(g, 3.0 * 2 * w * mask / w.size, rtol=1e-12)
    np.testing.assert_allclose(g, finite_diff(reg, [w], 0), rtol=1e-5, atol=1e-9)


def test_partial_l2_sums_only_the_weights_under_the_percentile(w):
    _, mask = np_partial_l2(w, 0.5)
    moved = w.copy()
    moved[~mask] *= 7.0  # large weights grow: theta and the sum must not change
    a, b = float(R.partial_l2_penalty(t64(w), 0.5)), float(R.partial_l2_penalty(t64(moved), 0.5))
    assert a == b
    np.testing.assert_allclose(float(R.percentile_threshold(t64(w), 0.5)),
                               np.percentile(np.abs(w), 50, method="inverted_cdf"))


# ------------------------------------------------------------------------------ numerics
def _all_with_state():
    """(name, fn(w, state) -> R, initial state)."""
    return [
        ("foothill", lambda w, s: R.Foothill(1.0, center=0.5)(w) + 0 * s, 1.0),
        ("linf", lambda w, s: R.LInf(1.0)(w) + 0 * s, 1.0),
        ("margin", lambda w, s: R.margin_penalty(w, s, 2.0, 1.0), 0.5),
        ("margin_p3", lambda w, s: R.margin_penalty(w, s, 3.0, 1.0), 0.5),
        ("soft_min_max", lambda w, s: R.soft_min_max_penalty(w, s, 1.0), 10.0),
        ("msqe", lambda w, s: R.MSQE(1.0, 4)(w) + 0 * s, 1.0),
        ("msqe_step", lambda w, s: R.msqe_penalty(w, 4, step=s), 0.3),
        ("partial_l2", lambda w, s: R.PartialL2(1.0, 0.5)(w) + 0 * s, 1.0),
    ]


@pytest.mark.parametrize("name,fn,s0", _all_with_state(), ids=[c[0] for c in _all_with_state()])
@pytest.mark.parametrize("scale", [1e-30, 1e-10, 1.0, 1e10, 1e30, "mixed"])
def test_finite_loss_and_gradient_for_any_magnitude(name, fn, s0, scale):
    rng = np.random.default_rng(0)
    base = rng.uniform(-1, 1, size=(6, 7)).astype(np.float32)
    if scale == "mixed":
        w = base * np.float32(10.0) ** rng.integers(-30, 31, size=base.shape).astype(np.float32)
        w[0, 0], w[0, 1] = 1e30, -1e-30
    else:
        w = base * np.float32(scale)
    wv, sv = tf.Variable(w), tf.Variable(np.float32(s0))
    with tf.GradientTape() as tape:
        out = fn(wv, sv)
    gw, gs = tape.gradient(out, [wv, sv])
    assert out.dtype == tf.float32 and np.isfinite(out.numpy()), out
    assert np.all(np.isfinite(gw.numpy()))
    if gs is not None:
        assert np.isfinite(gs.numpy())


@pytest.mark.parametrize("reg", [R.MSQE(1.0, 2), R.PartialL2(1.0, 0.9),
                                 R.Margin(1.0, margin=1.0, normalize="none")],
                         ids=["msqe", "partial_l2", "margin"])
def test_quadratic_terms_saturate_at_float32_max(reg, caplog):
    w = tf.constant([[3e30, -1e29], [2e30, 5e29]], tf.float32)
    assert float(reg(w)) == F32_MAX  # true value ~1e60: saturates, documented


def test_squares_beyond_float32_whose_mean_fits_are_exact():
    # every square overflows float32 (4e38 > 3.4e38) but the mean fits: no inf, correct value
    w = np.array([2e19, -1.3e19, 1.9e19, 0.4e19, 3e18, -1e18, 2e18, 1.5e19], np.float32)
    w64 = w.astype(np.float64)
    expected, _ = np_partial_l2(w64, 0.99)
    np.testing.assert_allclose(float(R.PartialL2(1.0, 0.99)(tf.constant(w))), expected, rtol=1e-5)
    step = np.abs(w64).max() / 1
    expected = ((w64 - np_quantize(w64, step, 2)) ** 2).mean()
    np.testing.assert_allclose(float(R.MSQE(1.0, 2)(tf.constant(w))), expected, rtol=1e-5)


def test_foothill_no_nan_when_beta_x_overflows():
    wv = tf.Variable([1e30, -1e30, 1e-30], tf.float32)
    with tf.GradientTape() as tape:
        out = R.Foothill(1.0, alpha=1.0, beta=1e10)(wv)
    g = tape.gradient(out, wv).numpy()
    assert float(out) == pytest.approx(2e30, rel=1e-6)
    np.testing.assert_allclose(g[:2], [1.0, -1.0])
    assert np.isfinite(g).all()


REGS = [R.Foothill(0.1, center=0.2), R.LInf(0.1), R.Margin(0.1, margin=0.3),
        R.SoftMinMax(0.1, hardness=5.0), R.MSQE(0.1, 3), R.PartialL2(0.1, 0.5)]


@pytest.mark.parametrize("reg", REGS, ids=lambda r: type(r).__name__)
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_precision_weights_accumulate_in_float32(reg, dtype, caplog):
    rng = np.random.default_rng(3)
    w32 = tf.cast(tf.cast(rng.uniform(-1, 1, (16, 8)), dtype), tf.float32)  # exactly representable
    wv = tf.Variable(tf.cast(w32, dtype))
    with tf.GradientTape() as tape:
        out = reg(wv)
    g = tape.gradient(out, wv)
    assert out.dtype == tf.float32
    np.testing.assert_allclose(float(out), float(reg(w32)), rtol=1e-7)
    assert g.dtype == dtype and np.all(np.isfinite(g.numpy().astype(np.float32)))
    # float32 accumulation: 4096 copies of a weight that float16 sums would round off
    big = tf.Variable(tf.fill([4096], tf.constant(0.1, dtype)))
    expected = float(reg(tf.fill([4096], tf.cast(tf.constant(0.1, dtype), tf.float32))))
    np.testing.assert_allclose(float(reg(big)), expected, rtol=1e-6)


def test_float64_stays_float64():
    for reg in REGS:
        assert reg(t64([0.1, -0.4, 0.3])).dtype == tf.float64


# ------------------------------------------------------------------------------ arguments
BAD_ARGS = [
    (R.Foothill, dict(l=0.0), ValueError, "l"),
    (R.Foothill, dict(l=-1.0), ValueError, "l"),
    (R.Foothill, dict(alpha=0.0), ValueError, "alpha"),
    (R.Foothill, dict(beta=-2.0), ValueError, "beta"),
    (R.Foothill, dict(center=-0.1), ValueError, "center"),
    (R.Foothill, dict(beta="2"), TypeError, "beta"),
    (R.Foothill, dict(l=float("nan")), ValueError, "l"),
    (R.LInf, dict(l=True), TypeError, "l"),
    (R.LInf, dict(l=float("inf")), ValueError, "l"),
    (R.LInf, dict(l=None), TypeError, "l"),
    (R.Margin, dict(power=0.5), ValueError, "power"),
    (R.Margin, dict(margin_weight=0.0), ValueError, "margin_weight"),
    (R.Margin, dict(margin=-1.0), ValueError, "margin"),
    (R.Margin, dict(margin="max"), TypeError, "margin"),
    (R.SoftMinMax, dict(eta=0.0), ValueError, "eta"),
    (R.SoftMinMax, dict(hardness=-3.0), ValueError, "hardness"),
    (R.MSQE, dict(bits=0), ValueError, "bits"),
    (R.MSQE, dict(bits=17), ValueError, "bits"),
    (R.MSQE, dict(bits=4.0), TypeError, "bits"),
    (R.MSQE, dict(bits="4"), TypeError, "bits"),
    (R.MSQE, dict(step=0.0), ValueError, "step"),
    (R.MSQE, dict(per_channel=1), TypeError, "per_channel"),
    (R.MSQE, dict(narrow_range="yes"), TypeError, "narrow_range"),
    (R.MSQE, dict(trainable_step=None), TypeError, "trainable_step"),
    (R.PartialL2, dict(fraction=0.0), ValueError, "fraction"),
    (R.PartialL2, dict(fraction=1.0), ValueError, "fraction"),
    (R.PartialL2, dict(fraction=1.5), ValueError, "fraction"),
    (R.PartialL2, dict(fraction="half"), TypeError, "fraction"),
    (R.LInf, dict(normalize="max"), ValueError, "normalize"),
    (R.Margin, dict(normalize=None), TypeError, "normalize"),
    (R.SoftMinMax, dict(normalize=1), TypeError, "normalize"),
]


@pytest.mark.parametrize("cls,kwargs,exc,name", BAD_ARGS,
                         ids=[f"{c.__name__}-{k}" for c, k, _, _ in BAD_ARGS])
def test_bad_arguments_name_the_argument(cls, kwargs, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        cls(**kwargs)


# ------------------------------------------------------------------------------ config, aliases
CONFIGURED = [R.Foothill(0.02, alpha=0.5, beta=3.0, center=0.25), R.LInf(0.07),
              R.LInf(0.07, normalize="none"),
              R.Margin(0.03, power=1.5, margin_weight=0.2, margin=0.4),
              R.Margin(0.03, margin=0.4, normalize="none"),
              R.SoftMinMax(0.04, eta=0.5, hardness=7.0),
              R.SoftMinMax(0.04, hardness=7.0, fold_batchnorm=False, normalize="none"),
              R.MSQE(0.5, bits=3, step=0.1, per_channel=True, narrow_range=True,
                     trainable_step=True),
              R.PartialL2(0.6, fraction=0.3)]


@pytest.mark.parametrize("reg", CONFIGURED, ids=lambda r: type(r).__name__)
def test_config_round_trip(reg, caplog):
    config = reg.get_config()
    assert json.loads(json.dumps(config)) == config  # plain values
    clone = type(reg).from_config(config)
    assert type(clone) is type(reg) and clone.get_config() == config
    restored = keras.regularizers.deserialize(keras.regularizers.serialize(reg))
    assert type(restored) is type(reg) and restored.get_config() == config
    assert keras.utils.get_registered_name(type(reg)) == f"tfqreg>{type(reg).__name__}"
    x = tf.constant(np.linspace(-1, 1, 24).reshape(4, 6), tf.float32)
    assert float(clone(x)) == float(reg(x))


@pytest.mark.parametrize("alias,cls", sorted(R.ALIASES.items()))
def test_string_aliases(alias, cls):
    a, b = keras.regularizers.get(alias), keras.regularizers.get(alias)
    assert type(a) is cls and a is not b  # a fresh instance per lookup
    assert a.get_config() == cls().get_config()  # the documented defaults
    layer = keras.layers.Dense(3, kernel_regularizer=alias)
    layer.build((None, 4))
    assert type(layer.kernel_regularizer) is cls
    assert len(layer.losses) == 1 and np.isfinite(float(layer.losses[0]))
    np.testing.assert_allclose(float(layer.losses[0]),
                               float(layer.kernel_regularizer(layer.kernel)))
    # an alias given to add_weight directly also gets its state
    custom = keras.layers.Layer()
    v = custom.add_weight("w", shape=(3, 2), regularizer=alias)
    assert len(custom.losses) == 1
    assert len(custom.weights) == 1 + len(cls()._state_suffixes)
    assert custom.weights[0] is v


def test_foothill_alias_is_a_regularizer_and_a_loss():
    assert type(keras.regularizers.get("foothill")) is R.Foothill
    assert type(keras.losses.get("foothill")) is tfqreg.losses.Foothill


# ------------------------------------------------------------------------------ learnable state
def _dense_model(reg_factory, units=(6, 3), input_dim=5):
    inp = keras.Input((input_dim,))
    x = inp
    for i, u in enumerate(units):
        x = keras.layers.Dense(u, kernel_regularizer=reg_factory(), name=f"d{i}")(x)
    return keras.Model(inp, x)


def _data(n=32, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, k)).astype(np.float32)


@pytest.mark.parametrize("factory,suffix,init", [
    (lambda: R.Margin(0.05, normalize="none"), "margin", lambda k: np.abs(k).max()),
    (lambda: R.SoftMinMax(0.05, normalize="none"), "hardness", lambda k: 10.0 / np.abs(k).max()),
    # normalize="scale": the parameters live in units of rms(w)
    (lambda: R.Margin(0.05), "margin", lambda k: np.abs(k).max() / np_rms(k)),
    (lambda: R.SoftMinMax(0.05), "hardness", lambda k: 10.0 * np_rms(k) / np.abs(k).max()),
    (lambda: R.MSQE(1.0, 3, trainable_step=True), "step", lambda k: np.abs(k).max() / 3),
    (lambda: R.MSQE(1.0, 3, per_channel=True, trainable_step=True), "step",
     lambda k: np.abs(k).max(axis=0, keepdims=True) / 3),
], ids=["margin", "hardness", "margin_scale", "hardness_scale", "step", "step_per_channel"])
def test_learnable_state_is_keras_state(factory, suffix, init):
    model = _dense_model(factory)
    names = [v.name for v in model.weights]
    assert names == ["d0/kernel:0", f"d0/kernel_{suffix}:0", "d0/bias:0",
                     "d1/kernel:0", f"d1/kernel_{suffix}:0", "d1/bias:0"]
    states = [v for v in model.trainable_weights if suffix in v.name]
    assert len(states) == 2
    for i, state in enumerate(states):
        kernel = model.get_layer(f"d{i}").kernel.numpy()
        np.testing.assert_allclose(state.numpy(), init(kernel), rtol=1e-6)
        reg = model.get_layer(f"d{i}").kernel_regularizer
        assert reg.state(model.get_layer(f"d{i}").kernel)[suffix] is state
    before = [s.numpy().copy() for s in states]
    model.compile(keras.optimizers.SGD(0.5), "mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for s, b in zip(states, before):
        assert np.all(s.numpy() != b), s.name  # trained by a plain fit


def test_margin_gradient_through_model_losses():
    model = _dense_model(lambda: R.Margin(0.2, power=2.0, margin_weight=0.5, margin=0.3,
                                          normalize="none"))
    layer = model.get_layer("d0")
    m = layer.weights[1]
    with tf.GradientTape() as tape:
        loss = model.losses[0]
    g = tape.gradient(loss, [layer.kernel, m])
    k = layer.kernel.numpy()
    d = np.maximum(np.abs(k) - 0.3, 0)
    np.testing.assert_allclose(float(loss), 0.2 * ((d ** 2).sum() + 0.5 * 0.3), rtol=1e-6)
    np.testing.assert_allclose(g[0].numpy(), 0.2 * 2 * d * np.sign(k), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(g[1]), 0.2 * (-2 * d.sum() + 0.5), rtol=1e-5)


def test_shared_instance_gets_one_state_per_weight():
    reg = R.Margin(0.05, normalize="none")
    model = _dense_model(lambda: reg)
    m0, m1 = model.get_layer("d0").weights[1], model.get_layer("d1").weights[1]
    assert m0 is not m1 and len(reg.variables) == 2
    for i, m in enumerate((m0, m1)):
        np.testing.assert_allclose(float(m), np.abs(model.get_layer(f"d{i}").kernel).max())
    np.testing.assert_allclose([float(v) for v in model.losses],
                               [0.05 * float(m0), 0.05 * float(m1)], rtol=1e-6)


def test_frozen_layer_state_is_not_trainable():
    layer = keras.layers.Dense(3, kernel_regularizer=R.Margin(), trainable=False)
    layer.build((None, 2))
    assert layer.trainable_weights == [] and len(layer.non_trainable_weights) == 3


def test_detached_call_uses_initial_values_and_warns(caplog):
    reg = R.Margin(0.5, margin_weight=2.0, normalize="none")
    w = tf.constant([0.3, -0.9, 0.1])
    with caplog.at_level(logging.WARNING, logger="tfqreg.regularizers"):
        value = float(reg(w))
    assert value == pytest.approx(0.5 * 2.0 * 0.9)  # M = max|w|: nothing beyond, γ|M| only
    assert "not attached" in caplog.text


def test_state_in_tf1_graph_mode():
    with tf.Graph().as_default():
        layer = keras.layers.Dense(4, kernel_regularizer=R.Margin(0.5, normalize="none"))
        layer.build((None, 3))
        sess = tf.compat.v1.keras.backend.get_session()
        kernel, margin, loss = sess.run([layer.kernel, layer.weights[1], layer.losses[0]])
    assert margin == pytest.approx(np.abs(kernel).max())
    assert loss == pytest.approx(0.5 * margin, rel=1e-6)


def test_functional_cores_in_eager_and_graph_mode(eager_and_graph_mode):
    w = np.linspace(-1.2, 0.9, 12).reshape(3, 4)
    tensors = [R.foothill_penalty(t64(w), 1.0, 2.0, 0.1), R.linf_penalty(t64(w)),
               R.margin_penalty(t64(w), 0.5), R.soft_min_max_penalty(t64(w), 4.0),
               R.msqe_penalty(t64(w), 3), R.partial_l2_penalty(t64(w), 0.4)]
    if eager_and_graph_mode == "graph":
        with tf.compat.v1.Session() as sess:
            values = sess.run(tensors)
    else:
        values = [t.numpy() for t in tensors]
    d = np.maximum(np.abs(w) - 0.5, 0)
    expected = [np_f(np.abs(w) - 0.1, 1.0, 2.0).sum(), np.abs(w).max(), (d ** 2).sum() + 0.5,
                np_smax(w.ravel(), 4.0) + np_smax(-w.ravel(), 4.0) + np.exp(-4.0),
                ((w - np_quantize(w, 1.2 / 3, 3)) ** 2).mean(), np_partial_l2(w, 0.4)[0]]
    np.testing.assert_allclose(values, expected, rtol=1e-12)


# ------------------------------------------------------------------------------ larq, TFMOT
def test_larq_quant_layers():
    import larq as lq

    inp = keras.Input((8, 8, 1))
    x = lq.layers.QuantConv2D(4, 3, kernel_quantizer="ste_sign", kernel_constraint="weight_clip",
                              kernel_regularizer=R.SoftMinMax(0.05), name="qc")(inp)
    x = keras.layers.Flatten()(x)
    x = lq.layers.QuantDense(2, input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                             kernel_constraint="weight_clip",
                             kernel_regularizer=R.Margin(0.05), name="qd")(x)
    model = keras.Model(inp, x)
    margin = model.get_layer("qd").weights[1]
    hardness = model.get_layer("qc").weights[1]
    assert margin.name == "qd/kernel_margin:0" and hardness.name == "qc/kernel_hardness:0"
    kernel = model.get_layer("qd").kernel.numpy()
    assert float(margin) == pytest.approx(np.abs(kernel).max() / np_rms(kernel), rel=1e-6)
    assert len(model.losses) == 2
    before = float(margin), float(hardness)
    model.compile(keras.optimizers.SGD(1.0), "mse")
    rng = np.random.default_rng(0)
    model.fit(rng.normal(size=(16, 8, 8, 1)), rng.normal(size=(16, 2)), verbose=0, epochs=2)
    assert float(margin) != before[0] and float(hardness) != before[1]


def test_tfmot_quantize_apply(tmp_path):
    import tensorflow_model_optimization as tfmot

    model = _dense_model(lambda: R.Margin(0.05))
    q = tfmot.quantization.keras.quantize_model(model)
    margins = [v for v in q.trainable_weights if "margin" in v.name]
    assert len(margins) == 2
    np.testing.assert_allclose([float(m) for m in margins],
                               [float(model.get_layer(f"d{i}").weights[1]) for i in range(2)])
    np.testing.assert_allclose([float(v) for v in q.losses], [float(v) for v in model.losses])
    before = [float(m) for m in margins]
    q.compile(keras.optimizers.SGD(0.5), "mse")
    q.fit(*_data(), batch_size=8, verbose=0, epochs=2)
    assert all(float(m) != b for m, b in zip(margins, before))
    # .h5 round trip of the quantized model (TFMOT's QuantizeLayer does not reload from .keras,
    # with or without tfqreg)
    path = str(tmp_path / "q.h5")
    q.save(path)
    with tfmot.quantization.keras.quantize_scope():
        q2 = keras.models.load_model(path)
    np.testing.assert_array_equal([float(v) for v in q2.losses], [float(v) for v in q.losses])
    m2 = [v for v in q2.trainable_weights if "margin" in v.name]
    np.testing.assert_array_equal([float(m) for m in m2], [float(m) for m in margins])


# ------------------------------------------------------------------------------ distribution
def _all_regs_model():
    inp = keras.Input((5,))
    x = keras.layers.Dense(8, activation="tanh", kernel_regularizer=R.Foothill(0.01, center=0.1),
                           name="foothill")(inp)
    x = keras.layers.Dense(8, activation="tanh", kernel_regularizer=R.LInf(0.05), name="linf")(x)
    x = keras.layers.Dense(8, activation="tanh", kernel_regularizer=R.Margin(0.05),
                           name="margin")(x)
    x = keras.layers.Dense(8, activation="tanh", kernel_regularizer=R.SoftMinMax(0.05),
                           name="smm")(x)
    x = keras.layers.Dense(8, activation="tanh",
                           kernel_regularizer=R.MSQE(1.0, 3, per_channel=True,
                                                     trainable_step=True), name="msqe")(x)
    x = keras.layers.Dense(3, kernel_regularizer=R.PartialL2(1.0, 0.5), name="pl2")(x)
    return keras.Model(inp, x)


def test_mirrored_strategy_matches_one_device(distribute_scope):
    x, y = _data(n=64)
    reference = _all_regs_model()
    init = reference.get_weights()
    reference.compile(keras.optimizers.SGD(0.2), "mse")
    h1 = reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    with distribute_scope.scope():
        mirrored = _all_regs_model()
        mirrored.set_weights(init)
        mirrored.compile(keras.optimizers.SGD(0.2), "mse")
    assert mirrored.distribute_strategy.num_replicas_in_sync == 2
    h2 = mirrored.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    np.testing.assert_allclose(h2.history["loss"], h1.history["loss"], rtol=1e-5)
    names = [v.name for v in reference.weights]
    assert any("margin" in n for n in names) and any("hardness" in n for n in names)
    for name, a, b in zip(names, reference.get_weights(), mirrored.get_weights()):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)
    # the state moved, identically
    for name, a, b0 in zip(names, reference.get_weights(), init):
        if "margin" in name or "step" in name:
            assert np.any(a != b0), name
    np.testing.assert_allclose([float(v) for v in mirrored.losses],
                               [float(v) for v in reference.losses], rtol=1e-5)


def test_mixed_precision_and_bias_state():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inp = keras.Input((4,))
        x = keras.layers.Dense(3, kernel_regularizer="margin", bias_regularizer="soft_min_max",
                               bias_initializer="ones", name="mp")(inp)
        model = keras.Model(inp, x)
        names = [(v.name, v.dtype) for v in model.weights]
        assert names == [("mp/kernel:0", tf.float32), ("mp/kernel_margin:0", tf.float32),
                         ("mp/bias:0", tf.float32), ("mp/bias_hardness:0", tf.float32)]
        assert all(v.dtype == tf.float32 and np.isfinite(float(v)) for v in model.losses)
        model.compile(keras.optimizers.SGD(0.1), "mse")
        history = model.fit(*_data(d=4), batch_size=8, epochs=1, verbose=0)
        assert np.isfinite(history.history["loss"][0])
    finally:
        keras.mixed_precision.set_global_policy("float32")


# ----------------------------------------------------------------------------- no silent wrong
ALL_REGS = [lambda: R.Foothill(), lambda: R.LInf(), lambda: R.Margin(margin=0.5),
            lambda: R.SoftMinMax(hardness=5.0), lambda: R.MSQE(), lambda: R.PartialL2(),
            lambda: R.MSQE(step=0.1), lambda: R.MSQE(per_channel=True)]


@pytest.mark.parametrize("make", ALL_REGS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_gives_a_nan_penalty(make, bad):
    w = np.array([[0.5, 0.2], [0.1, -0.3]], np.float32)
    w[0, 1] = bad
    assert np.isnan(float(make()(tf.constant(w))))


@pytest.mark.parametrize("make", ALL_REGS)
def test_empty_tensor_gives_zero(make):
    assert float(make()(tf.zeros((0, 3)))) == 0.0


@pytest.mark.parametrize("ctor,arg", [(lambda: R.Foothill(l=1e308), "l"),
                                      (lambda: R.LInf(1e308), "l"),
                                      (lambda: R.SoftMinMax(hardness=1e308), "hardness"),
                                      (lambda: R.Foothill(alpha=1e7), "alpha"),
                                      (lambda: R.Margin(power=100), "power")])
def test_huge_constructor_values_are_refused(ctor, arg):
    with pytest.raises(ValueError, match=f"`{arg}` must be at most"):
        ctor()


@pytest.mark.parametrize("make", [lambda: R.Foothill(l=1e6, alpha=1e6), lambda: R.LInf(1e6),
                                  lambda: R.SoftMinMax(1e6, eta=1e6, hardness=1e6),
                                  lambda: R.Margin(1e6, margin_weight=1e6, margin=0.1)])
def test_largest_accepted_values_keep_gradients_finite(make):
    v = tf.Variable([[0.5, -0.2, 3.0], [1e3, -1e-3, 0.0]])
    with tf.GradientTape() as tape:
        y = make()(v)
    g = tape.gradient(y, v)
    assert np.isfinite(float(y)) and np.isfinite(g.numpy()).all()


@pytest.mark.parametrize("factory, name", [
    (lambda: R.Foothill(beta=1e308), "beta"), (lambda: R.Foothill(center=1e308), "center"),
    (lambda: R.MSQE(step=1e308), "step"), (lambda: R.Margin(margin=1e308), "margin"),
])
def test_huge_shape_arguments_are_refused(factory, name):
    with pytest.raises(ValueError, match=f"`{name}` must be at most"):
        factory()
