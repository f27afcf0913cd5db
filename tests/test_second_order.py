"""The cheaper second-order rules of tfqreg.training._second_order against NumPy (the selection
``M·g`` at each window's maximum), the adjoint identity ``<Mᵀ·dy, g> = <dy, M·g>`` with ties, and
TensorFlow's own rules (same double-backprop values, fewer kernels, and only inside the scope)."""

import collections

import numpy as np
import pytest

from tfqreg import models, training
from tfqreg._keras import keras, tf

# (ksize, strides, padding, (height, width)): which rule applies
POOLS = {
    "2x2 valid": (2, 2, "VALID", (8, 6)),
    "2x2 valid, odd sizes cropped": (2, 2, "VALID", (7, 9)),
    "2x2 same, even sizes": (2, 2, "SAME", (8, 6)),
    "1x2 valid": ((1, 2), (1, 2), "VALID", (5, 6)),
    "3x3 valid (max + min sum)": (3, 3, "VALID", (9, 7)),
    "3x3 stride 2 (overlapping: TF's rule)": (3, 2, "VALID", (9, 9)),
    "2x2 same, odd sizes (padded: TF's rule)": (2, 2, "SAME", (7, 7)),
}
FAST = {"2x2 valid", "2x2 valid, odd sizes cropped", "2x2 same, even sizes", "1x2 valid",
        "3x3 valid (max + min sum)"}


def _pair(k):
    return (k, k) if isinstance(k, int) else tuple(k)


def _pool_op_args(ksize, strides):
    kh, kw = _pair(ksize)
    sh, sw = _pair(strides)
    return [1, kh, kw, 1], [1, sh, sw, 1]


def _select(x, ksize, strides, padding, g, dy):
    """``(Mᵀ·dy, M·g)`` with M the max-pool selection, through MaxPoolGrad and its gradient."""
    k, s = _pool_op_args(ksize, strides)
    y = tf.nn.max_pool2d(x, k[1:3], s[1:3], padding)
    with tf.GradientTape() as tape:
        tape.watch(dy)
        dx = tf.raw_ops.MaxPoolGrad(orig_input=x, orig_output=y, grad=dy, ksize=k, strides=s,
                                    padding=padding)
        inner = tf.reduce_sum(dx * g)
    return dx, tape.gradient(inner, dy)


def _np_select(x, ksize, strides, g):
    """NumPy ``M·g`` for VALID windows without ties: ``g`` at each window's argmax."""
    (kh, kw), (sh, sw) = _pair(ksize), _pair(strides)
    n, h, w, c = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.zeros((n, ho, wo, c), x.dtype)
    for i in range(ho):
        for j in range(wo):
            win = x[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :].reshape(n, kh * kw, c)
            gw = g[:, i * sh:i * sh + kh, j * sw:j * sw + kw, :].reshape(n, kh * kw, c)
            out[:, i, j, :] = np.take_along_axis(gw, win.argmax(axis=1)[:, None], 1)[:, 0]
    return out


@pytest.mark.parametrize("case", [c for c in POOLS if POOLS[c][2] == "VALID"])
def test_rule_selects_g_at_each_window_maximum_like_numpy(case):
    ksize, strides, padding, (h, w) = POOLS[case]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, h, w, 3))  # float64, no ties
    g = rng.normal(size=x.shape)
    k, s = _pool_op_args(ksize, strides)
    dy = tf.constant(rng.normal(size=tf.nn.max_pool2d(x, k[1:3], s[1:3], padding).shape))
    with training.fast_second_order():
        _, mg = _select(tf.constant(x), ksize, strides, padding, tf.constant(g), dy)
    np.testing.assert_array_equal(mg.numpy(), _np_select(x, ksize, strides, g))


@pytest.mark.parametrize("case", list(POOLS))
def test_rule_is_the_adjoint_of_the_first_order_gradient_with_ties(case):
    """Quantized inputs tie in most windows: ``M·g`` must pick the element ``Mᵀ`` picked."""
    ksize, strides, padding, (h, w) = POOLS[case]
    rng = np.random.default_rng(1)
    x = tf.constant(np.round(rng.uniform(0, 2, size=(2, h, w, 4))).astype("float32"))
    g = tf.constant(rng.normal(size=x.shape).astype("float32"))
    k, s = _pool_op_args(ksize, strides)
    dy_shape = tf.nn.max_pool2d(x, k[1:3], s[1:3], padding).shape
    dy = tf.constant(rng.normal(size=dy_shape).astype("float32"))
    with training.fast_second_order():
        dx, mg = _select(x, ksize, strides, padding, g, dy)
    lhs = np.sum(dx.numpy().astype("float64") * g.numpy())
    rhs = np.sum(dy.numpy().astype("float64") * mg.numpy())
    np.testing.assert_allclose(lhs, rhs, rtol=1e-6)
    # and the values are TensorFlow's own rule's wherever the two pick the same element
    _, tf_mg = _select(x, ksize, strides, padding, g, dy)
    if case not in FAST:
        np.testing.assert_array_equal(mg.numpy(), tf_mg.numpy())


def _double_backprop_graph_ops(ksize, strides, padding, h, w, fast):
    x = tf.random.stateless_normal([2, h, w, 3], seed=[3, 4])
    kernel = tf.Variable(tf.random.stateless_normal([3, 3, 3, 3], seed=[5, 6]))

    @tf.function
    def step():
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                z = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
                k, s = _pool_op_args(ksize, strides)
                loss = tf.reduce_sum(tf.nn.max_pool2d(z, k[1:3], s[1:3], padding) ** 2)
            g = inner.gradient(loss, kernel)
            norm = tf.reduce_sum(tf.abs(g))
        return outer.gradient(norm, kernel)

    if fast:
        with training.fast_second_order():
            graph = step.get_concrete_function().graph
    else:
        graph = step.get_concrete_function().graph
    return collections.Counter(op.type for op in graph.get_operations()), step()


@pytest.mark.parametrize("case", list(POOLS))
def test_rules_apply_only_inside_the_scope_and_only_to_non_overlapping_windows(case):
    ksize, strides, padding, (h, w) = POOLS[case]
    stock, want = _double_backprop_graph_ops(ksize, strides, padding, h, w, fast=False)
    fast, got = _double_backprop_graph_ops(ksize, strides, padding, h, w, fast=True)
    assert stock["MaxPoolGradGrad"] == 1
    assert fast["MaxPoolGradGrad"] == (0 if case in FAST else 1)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)


def test_training_model_step_equals_tf_rules_double_backprop():
    """One exact gradient-ℓ1 SGD step of the benchmark CNN (ReLU, 2×2 max pools) through the
    TrainingModel (the cheaper rules) against a hand-written step with TensorFlow's rules."""
    rng = np.random.default_rng(2)
    x = rng.random((16, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 16)
    lam = 1e-2
    model = training.TrainingModel(models.small_cnn(), terms=[
        training.GradientL1(lambda_w=lam, lambda_a=0.0, reduction="sum")])
    model.compile(keras.optimizers.SGD(0.5), "sparse_categorical_crossentropy")
    ref = models.small_cnn()
    ref.set_weights(model.inner.get_weights())
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    kernels = [v for v in ref.trainable_variables if "kernel" in v.name]
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = loss_fn(y, ref(x, training=True))
        grads = inner.gradient(loss, kernels)
        total = loss + lam * tf.add_n([tf.reduce_sum(tf.abs(g)) for g in grads])
    want = [v.numpy() - 0.5 * g.numpy()
            for v, g in zip(ref.trainable_variables, outer.gradient(total, ref.trainable_variables))]
    model.train_on_batch(x, y)
    moved = 0.0
    for w, new, old in zip(want, model.inner.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(new, w, rtol=1e-4, atol=1e-6)
        moved = max(moved, float(np.abs(new - old).max()))
    assert moved > 1e-3  # the step did move the weights


def test_docstring_example_runs():
    import doctest

    from tfqreg.training import _second_order

    result = doctest.testmod(_second_order)
    assert result.attempted >= 4 and result.failed == 0


def _relu_pool_step(case, fast, second_reader=False, eager=False):
    """First- and second-order gradients through conv → ReLU → max pool on tie-heavy values
    (inputs and kernel on a 0.5 grid: many windows tie, many are all ≤ 0), and the shapes of
    the ReluGrad ops of the traced graph."""
    ksize, strides, padding, (h, w) = POOLS[case]
    rng = np.random.default_rng(4)
    x = tf.constant(np.round(rng.normal(size=(2, h, w, 2)) * 2) / 2, tf.float32)
    kernel = tf.Variable(np.round(rng.normal(size=(3, 3, 2, 3)) * 2) / 2, dtype=tf.float32)
    k, s = _pool_op_args(ksize, strides)

    def step():
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                a = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
                p = tf.nn.max_pool2d(a, k[1:3], s[1:3], padding)
                loss = tf.reduce_sum(p ** 2)
                if second_reader:  # the ReLU output has a reader besides the pool
                    loss += tf.reduce_sum(tf.sin(a))
            g = inner.gradient(loss, [kernel, x])
            norm = tf.add_n([tf.reduce_sum(tf.abs(t)) for t in g])
        return g + outer.gradient(norm, [kernel, x])

    def run():
        if eager:
            return step(), []
        fn = tf.function(step)
        graph = fn.get_concrete_function().graph
        shapes = [tuple(op.outputs[0].shape) for op in graph.get_operations()
                  if op.type == "ReluGrad"]
        return fn(), shapes

    if fast:
        with training.fast_second_order():
            values, shapes = run()
    else:
        values, shapes = run()
    pooled = tuple(tf.nn.max_pool2d(tf.zeros([2, h, w, 3]), k[1:3], s[1:3], padding).shape)
    return [v.numpy() for v in values], shapes, pooled


@pytest.mark.parametrize("case", list(POOLS))
def test_relu_mask_at_the_pool_output_gives_tf_values_bit_for_bit(case):
    """``ReluGrad(MaxPoolGrad(a, p, dp), a) = MaxPoolGrad(a, p, ReluGrad(dp, p))``: the chosen
    element of each window holds ``a = p``. Every ReluGrad of the fast graph (first order, its
    derivative, and the outer pass through the forward ReLU) runs at the pool's output size."""
    want, stock_shapes, pooled = _relu_pool_step(case, fast=False)
    got, fast_shapes, _ = _relu_pool_step(case, fast=True)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert np.abs(want[0]).sum() > 0 and np.abs(want[2]).sum() > 0
    assert stock_shapes and all(s != pooled for s in stock_shapes)
    assert len(fast_shapes) == len(stock_shapes) and all(s == pooled for s in fast_shapes)


def test_relu_rule_keeps_tf_rule_when_the_relu_output_has_another_reader_or_is_eager():
    case = "2x2 valid"
    want, stock_shapes, pooled = _relu_pool_step(case, fast=False, second_reader=True)
    got, fast_shapes, _ = _relu_pool_step(case, fast=True, second_reader=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    assert any(s != pooled for s in fast_shapes)  # the full-size ReLU mask is still there
    eager, _, _ = _relu_pool_step(case, fast=True, eager=True)
    for g, w in zip(eager, _relu_pool_step(case, fast=False)[0]):
        np.testing.assert_array_equal(g, w)
