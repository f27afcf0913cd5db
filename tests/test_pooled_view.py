"""Gradient-ℓ1 on an activation that a non-overlapping max pool reads: the term takes the
gradient at the pool's output (``tfqreg.training._capture.pooled_view``). Checked against TF's
own gradients, a hand-written double backprop at the activations themselves, the eager path
(which has no graph to read and takes the full-size gradient) and the traced graph's op shapes.
"""

import keras as keras3
import numpy as np
import pytest

import tfqreg  # noqa: F401
from tfqreg import training
from tfqreg._keras import keras, tf
from tfqreg.training._capture import pooled_view

# the strengths here are large on the sum scale, so the term's effect is far above round-off
pytestmark = pytest.mark.filterwarnings("ignore:GradientL1.*SUM of gradient magnitudes")

F64 = "float64"


@pytest.mark.parametrize("pool, expected", [
    (lambda a: tf.nn.max_pool2d(a, 2, 2, "VALID"), True),
    (lambda a: tf.nn.max_pool2d(a, 3, 3, "SAME"), True),       # 8 = 3 + 3 + 2: partial windows
    (lambda a: tf.nn.max_pool2d(a, 2, 3, "VALID"), True),      # gaps between windows
    (lambda a: tf.nn.max_pool2d(a, 3, 2, "VALID"), False),     # overlapping windows
    (lambda a: tf.nn.avg_pool2d(a, 2, 2, "VALID"), False),     # not a max pool
    (lambda a: tf.nn.max_pool2d(a, 2, 2, "VALID") + tf.reduce_sum(a), False),  # two readers
])
def test_pooled_view_only_for_a_sole_non_overlapping_max_pool(pool, expected):
    got = {}

    @tf.function
    def f(x):
        a = tf.nn.relu(x)
        pool(a)
        got["view"] = pooled_view(a)
        got["pool_out"] = next((op.outputs[0] for op in a.consumers()
                                if op.type == "MaxPool"), None)
        return tf.constant(0.0)

    f(tf.random.normal([2, 8, 8, 3]))
    if expected:
        assert got["view"] is not None and got["view"].name == got["pool_out"].name
    else:
        assert got["view"] is None


def test_pooled_view_is_none_in_eager_execution_and_for_3d_pools_works():
    assert pooled_view(tf.nn.relu(tf.random.normal([1, 4, 4, 1]))) is None
    got = {}

    @tf.function
    def f(x):
        a = tf.nn.relu(x)
        tf.nn.max_pool3d(a, 2, 2, "VALID")
        got["view"] = pooled_view(a)
        return tf.constant(0.0)

    f(tf.random.normal([1, 4, 4, 4, 2]))
    assert got["view"] is not None and got["view"].op.type == "MaxPool3D"


@pytest.mark.parametrize("ksize, strides, padding, same_norm", [
    (2, 2, "VALID", True), (3, 3, "SAME", True), (2, 3, "VALID", True), (3, 2, "VALID", False)])
def test_the_norm_identity_holds_exactly_when_windows_do_not_overlap(ksize, strides, padding,
                                                                     same_norm):
    # tie-heavy input (few distinct values), odd sizes: partial windows and uncovered borders
    rng = np.random.default_rng(3)
    x = tf.constant(rng.integers(-2, 3, size=(2, 9, 9, 2)).astype("float64"))
    with tf.GradientTape(persistent=True) as t:
        t.watch(x)
        a = tf.nn.relu(x)
        p = tf.nn.max_pool2d(a, ksize, strides, padding)
        # ∇_p L = r: every window's gradient non-zero, of either sign
        r = tf.constant(rng.normal(size=p.shape.as_list()))
        loss = tf.reduce_sum(p * r)
    ga, gp = t.gradient(loss, [a, p])
    na, np_ = float(tf.reduce_sum(tf.abs(ga))), float(tf.reduce_sum(tf.abs(gp)))
    if same_norm:
        assert na == pytest.approx(np_, rel=1e-12)
        # one element per window, ties included: as many non-zeros as windows
        assert np.count_nonzero(ga.numpy()) == gp.shape.num_elements()
    else:  # overlapping windows sum several windows' gradients into one element
        assert na != pytest.approx(np_, rel=1e-6)


# ------------------------------------------------------------------------------------------
# the term on a CNN with a pooled, an overlapping-pooled and a dense activation
# ------------------------------------------------------------------------------------------


def cnn64(kmod=keras, seed=0):
    """conv(tanh) → 2×2 max pool → conv(tanh) → overlapping max pool → dense → dense, float64,
    weights drawn by NumPy (the same in both Keras)."""
    L = kmod.layers
    inp = kmod.Input((10, 10, 1), dtype=F64)
    h = L.Conv2D(3, 3, activation="tanh", dtype=F64, name="c1")(inp)             # 8x8x3
    h = L.MaxPooling2D(2, dtype=F64, name="p1")(h)                                 # 4x4x3
    h = L.Conv2D(4, 2, activation="tanh", dtype=F64, name="c2")(h)                 # 3x3x4
    h = L.MaxPooling2D(2, strides=1, dtype=F64, name="p2")(h)       # overlapping: 2x2x4
    h = L.Flatten(dtype=F64)(h)
    h = L.Dense(5, activation="tanh", dtype=F64, name="d1")(h)
    out = L.Dense(3, dtype=F64, name="d2")(h)
    model = kmod.Model(inp, out)
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape) * 0.5 for w in model.get_weights()])
    return model


def ce(kmod):
    # a Keras 3 loss computes in its own dtype (floatx unless given)
    kw = {"dtype": F64} if kmod is keras3 else {}
    return kmod.losses.SparseCategoricalCrossentropy(from_logits=True, **kw)


@pytest.fixture(params=["keras2", "keras3"])
def kmod(request):
    return keras if request.param == "keras2" else keras3


def cnn_batch(n=6, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 10, 10, 1)).astype(F64), rng.integers(0, 3, size=n)


def hand_written_exact_update(model, x, y, lambda_w, lambda_a, lr, loss_fn):
    """One SGD step on ``CE + λ_w Σ‖∇_W CE‖₁ + λ_a Σ‖∇_a CE‖₁`` (every layer with a kernel), the
    activation gradients taken at the layer outputs themselves, with TensorFlow's own rules."""
    L = model.get_layer
    variables = list(model.trainable_variables)
    with tf.GradientTape() as tape:
        with tf.GradientTape() as inner:
            h1 = L("c1")(tf.constant(x))
            inner.watch(h1)
            h2 = L("c2")(L("p1")(h1))
            inner.watch(h2)
            h3 = L("d1")(tf.reshape(L("p2")(h2), [len(x), -1]))
            inner.watch(h3)
            o = L("d2")(h3)
            inner.watch(o)
            task = loss_fn(y, o)
        kernels = [L(n).kernel for n in ("c1", "c2", "d1", "d2")]
        gs = inner.gradient(task, kernels + [h1, h2, h3, o])
        total = task + lambda_w * tf.add_n([tf.reduce_sum(tf.abs(g)) for g in gs[:4]]) \
            + lambda_a * tf.add_n([tf.reduce_sum(tf.abs(g)) for g in gs[4:]])
    grads = tape.gradient(total, variables)
    norm_a = float(tf.add_n([tf.reduce_sum(tf.abs(g)) for g in gs[4:]]))
    return [np.asarray(v) - lr * g.numpy() for v, g in zip(variables, grads)], norm_a


def _step(kmod, method, x, y, run_eagerly=False, epsilon=1e-3):
    model = training.TrainingModel(cnn64(kmod, seed=4), terms=[training.GradientL1(
        0.05, 0.02, method=method, epsilon=epsilon, reduction="sum")])
    model.compile(kmod.optimizers.SGD(0.25), ce(kmod), run_eagerly=run_eagerly)
    logs = model.train_on_batch(x, y, return_dict=True)
    return [np.asarray(v) for v in model.inner.trainable_variables], logs


def _relative_error(got, expected, start):
    num = sum(np.sum((g - e) ** 2) for g, e in zip(got, expected))
    den = sum(np.sum((e - s) ** 2) for e, s in zip(expected, start))
    return np.sqrt(num / den)


def test_exact_step_equals_the_hand_written_step_at_the_activations_and_the_eager_step(kmod):
    x, y = cnn_batch()
    ref = cnn64(kmod, seed=4)
    start = [np.asarray(v) for v in ref.trainable_variables]
    expected, norm_a = hand_written_exact_update(ref, x, y, 0.05, 0.02, 0.25, ce(kmod))
    graph, logs = _step(kmod, "exact", x, y)
    eager, logs_eager = _step(kmod, "exact", x, y, run_eagerly=True)  # no graph: full size
    # the pooled (graph) and full-size (eager) computations agree to round-off
    for g, e in zip(graph, eager):
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-12)
    # and both are the hand-written update (the logged metrics are float32, and so is the
    # compiled loss in Keras 3)
    assert _relative_error(graph, expected, start) < 1e-6
    np.testing.assert_allclose(logs["grad_l1_a"], norm_a, rtol=1e-6)
    np.testing.assert_allclose(logs_eager["grad_l1_a"], norm_a, rtol=1e-6)


def test_finite_difference_step_on_pooled_activations_converges_to_the_exact_step(kmod):
    x, y = cnn_batch()
    ref = cnn64(kmod, seed=4)
    start = [np.asarray(v) for v in ref.trainable_variables]
    expected, norm_a = hand_written_exact_update(ref, x, y, 0.05, 0.02, 0.25, ce(kmod))
    errors = []
    for eps in (1e-3, 1e-4, 1e-5):  # float64: round-off stays far below the step's error
        got, logs = _step(kmod, "finite_difference", x, y, epsilon=eps)
        errors.append(_relative_error(got, expected, start))
        np.testing.assert_allclose(logs["grad_l1_a"], norm_a, rtol=1e-6)
    assert errors[2] < 1e-3, errors
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors


def _traced_ops(kmod, method):
    """The op types and output shapes of one traced term computation on cnn64."""
    model = cnn64(kmod, seed=4)
    term = training.GradientL1(0.05, 0.02, method=method, reduction="sum")
    term.attach(model)
    x, y = cnn_batch()
    loss_fn = ce(kmod)

    def forward():
        y_pred = model(tf.constant(x), training=True)
        return loss_fn(y, y_pred), y_pred

    @tf.function
    def f():
        if method == "exact":
            with tf.GradientTape() as tape:
                task, _, norm_w, norm_a = term.forward(forward)
                total = task + 0.05 * norm_w + 0.02 * norm_a
            return tape.gradient(total, model.trainable_variables)
        grads, *_ = term.finite_difference(model, forward, lambda: None,
                                           model.trainable_variables)
        return grads

    graph = f.get_concrete_function().graph
    return [(op.type, tuple(o.shape.as_list()) if o.shape.rank is not None else None)
            for op in graph.get_operations() for o in op.outputs[:1]]


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_element_wise_passes_run_at_the_pool_output_only_where_the_windows_do_not_overlap(
        kmod, method):
    ops = _traced_ops(kmod, method)
    n = len(cnn_batch()[0])
    signs = {shape for t, shape in ops if t == "Sign"}
    abs_ = {shape for t, shape in ops if t == "Abs"}
    # c1's output (8x8x3) is read by a 2x2 pool: its passes run on the pool's 4x4x3 output
    assert (n, 8, 8, 3) not in signs | abs_
    assert (n, 4, 4, 3) in abs_
    # c2's output (3x3x4) is read by an overlapping pool: its passes stay at full size
    assert (n, 3, 3, 4) in abs_
    if method == "finite_difference":
        assert (n, 4, 4, 3) in signs and (n, 3, 3, 4) in signs
        # the second pass offsets the pool output (an add of that shape), not c1's output
        adds = {shape for t, shape in ops if t == "AddV2"}
        assert (n, 4, 4, 3) in adds and (n, 8, 8, 3) not in adds


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_pooled_activations_under_mirrored_strategy_match_single_device(distribute_scope,
                                                                         method):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(16, 10, 10, 1)), rng.integers(0, 3, size=16)

    def build():
        m = training.TrainingModel(cnn64(keras, seed=4), terms=[training.GradientL1(
            0.05, 0.02, method=method, reduction="sum")])
        m.compile(keras.optimizers.SGD(0.25), ce(keras))
        return m

    single = build()
    with distribute_scope.scope():
        dist = build()
    start = single.get_weights()
    dist.set_weights(start)
    h1 = single.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
    h2 = dist.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
    for a, b in zip(single.get_weights(), dist.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    for key in ("loss", "grad_l1_w", "grad_l1_a"):
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-5, err_msg=key)
    assert not np.allclose(start[0], single.get_weights()[0])
