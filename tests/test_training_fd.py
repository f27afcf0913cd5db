"""Gradient-ℓ1's fast forms and its scale-free strength, against independent computations: the
exact double backprop written out by hand, NumPy, and the single-device step."""

import numpy as np
import pytest

import tfqreg  # noqa: F401
from tfqreg import training
from tfqreg._keras import keras, tf

F64 = "float64"
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def mlp64(seed=0, act="tanh", hidden=5):
    tf.random.set_seed(seed)
    inp = keras.Input((3,), dtype=F64)
    h = keras.layers.Dense(hidden, activation=act, dtype=F64, name="d1")(inp)
    out = keras.layers.Dense(2, dtype=F64, name="d2")(h)
    return keras.Model(inp, out, name="mlp64")


def batch64(n=8, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype("float32").astype(F64)
    return x, rng.integers(0, 2, size=n)


def bn_cnn(seed=0, batchnorm=True):
    # python, numpy and TF: tf_keras' unseeded initializers draw their seeds from python's random
    keras.utils.set_random_seed(seed)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, name="c1")(inp)
    if batchnorm:
        h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(6, activation="tanh", name="d1")(h)
    out = keras.layers.Dense(3, name="d2")(h)
    return keras.Model(inp, out)


def exact_sgd_update(model, x, y, lambda_w, lambda_a, lr):
    """One SGD step on ``CE + λ_w Σ‖∇_W CE‖₁ + λ_a Σ‖∇_a CE‖₁`` of mlp64, by hand."""
    d1, d2 = model.get_layer("d1"), model.get_layer("d2")
    with tf.GradientTape() as tape:
        with tf.GradientTape() as inner:
            h = d1(tf.constant(x))
            inner.watch(h)
            o = d2(h)
            inner.watch(o)
            task = CE(y, o)
        gs = inner.gradient(task, [d1.kernel, d2.kernel, h, o])
        total = task + lambda_w * sum(tf.reduce_sum(tf.abs(g)) for g in gs[:2]) \
            + lambda_a * sum(tf.reduce_sum(tf.abs(g)) for g in gs[2:])
    grads = tape.gradient(total, model.trainable_variables)
    return [v.numpy() - lr * g.numpy() for v, g in zip(model.trainable_variables, grads)]


def fd_model(epsilon, **kw):
    m = training.TrainingModel(mlp64(seed=6), terms=[training.GradientL1(
        0.2, 0.1, method="finite_difference", epsilon=epsilon, **kw, reduction="sum")])
    m.compile(keras.optimizers.SGD(0.125), CE)
    return m


# ------------------------------------------------------------------------------------------
# finite-difference form
# ------------------------------------------------------------------------------------------


def test_finite_difference_step_converges_to_the_exact_step():
    x, y = batch64()
    ref = mlp64(seed=6)
    expected = exact_sgd_update(ref, x, y, 0.2, 0.1, 0.125)
    start = [v.numpy() for v in ref.trainable_variables]
    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        model = fd_model(eps)
        model.inner.set_weights(start)
        logs = model.train_on_batch(x, y, return_dict=True)
        got = [v.numpy() for v in model.inner.trainable_variables]
        # error of the update (not of the weights, which barely move)
        num = sum(np.sum((g - e) ** 2) for g, e in zip(got, expected))
        den = sum(np.sum((e - s) ** 2) for e, s in zip(expected, start))
        errors.append(np.sqrt(num / den))
    assert errors[2] < 1e-3, errors
    # first-order convergence: a wrong direction or scale would not shrink with ε
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors
    # the logged norms are the exact ones (first pass), and task_loss is the unperturbed loss
    with tf.GradientTape() as t:
        task = CE(y, ref(tf.constant(x)))
    gk = t.gradient(task, [ref.get_layer("d1").kernel, ref.get_layer("d2").kernel])
    np.testing.assert_allclose(logs["grad_l1_w"], sum(np.abs(g.numpy()).sum() for g in gk),
                               rtol=1e-6)
    np.testing.assert_allclose(logs["task_loss"], task.numpy(), rtol=1e-6)


def test_finite_difference_with_batchnorm_matches_exact_and_restores_state():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(16, 8, 8, 1)).astype("float32"))
    y = tf.constant(rng.integers(0, 3, 16))
    model = bn_cnn()
    bn = model.get_layer("bn")
    bn.moving_variance.assign(tf.constant([0.5, 2.0, 1.0, 4.0]))  # the fold scale matters
    term = training.GradientL1(1e-2, 1e-2, method="finite_difference", epsilon=1e-3, reduction="sum")
    term.attach(model)
    variables = model.trainable_variables

    def forward():
        return CE(y, model(x, training=True)), None

    moving = (bn.moving_mean, bn.moving_variance)
    moving_before = [v.numpy() for v in moving]
    with tf.GradientTape() as tape:
        task, _, nw, na = term.forward(forward)
        total = task + 1e-2 * nw + 1e-2 * na
    exact = tape.gradient(total, variables)
    before = [v.numpy() for v in variables]
    for v, b in zip(moving, moving_before):
        v.assign(b)
    grads, task2, _, _, nw2, na2 = term.finite_difference(model, forward, lambda: None, variables)
    moving_fd = [v.numpy() for v in moving]
    # trainable weights restored bit for bit; BatchNorm statistics as ONE forward pass leaves them
    for b, v in zip(before, variables):
        np.testing.assert_array_equal(b, v.numpy())
    for v, b in zip(moving, moving_before):
        v.assign(b)
    model(x, training=True)
    for f, v in zip(moving_fd, moving):
        np.testing.assert_array_equal(f, v.numpy())
    assert not np.array_equal(moving_fd[0], moving_before[0])
    np.testing.assert_allclose(nw2.numpy(), nw.numpy(), rtol=1e-5)
    np.testing.assert_allclose(na2.numpy(), na.numpy(), rtol=1e-5)
    with tf.GradientTape() as tape:
        plain = CE(y, model(x, training=True))
    g0 = tape.gradient(plain, variables)
    # the exact form also differentiates the fold scale's γ inside the norm; the FD form holds
    # the direction constant, so γ is compared more loosely
    scale = np.sqrt(sum(np.sum((e - p).numpy() ** 2) for e, p in zip(exact, g0)))
    for i, v in enumerate(variables):
        a, b = (exact[i] - g0[i]).numpy().ravel(), (grads[i] - g0[i]).numpy().ravel()
        err = np.linalg.norm(a - b) / scale  # (the conv bias before a BatchNorm has ~0)
        assert err < (0.15 if "gamma" in v.name else 0.02), (v.name, err)


def test_finite_difference_refuses_random_layers():
    inp = keras.Input((4,))
    h = keras.layers.Dropout(0.5, name="drop")(keras.layers.Dense(4)(inp))
    model = keras.Model(inp, keras.layers.Dense(2)(h))
    with pytest.raises(ValueError, match="drop.*method='exact'"):
        training.TrainingModel(model, terms=[training.GradientL1(method="finite_difference", reduction="sum")])
    training.TrainingModel(model, terms=[training.GradientL1(reduction="sum")])  # exact is fine


def test_finite_difference_under_mirrored_strategy_matches_single_device(distribute_scope):
    rng = np.random.default_rng(3)
    x = rng.random((32, 8, 8, 1)).astype("float32")
    y = rng.integers(0, 3, 32)

    def build():
        # no BatchNorm: its batch statistics are per replica, so no model with one matches
        m = training.TrainingModel(bn_cnn(seed=4, batchnorm=False), terms=[training.GradientL1(
            1e-2, 1e-2, method="finite_difference", every=2, reduction="sum")])
        m.compile(keras.optimizers.SGD(0.1), CE)
        return m

    single = build()
    weights = single.get_weights()
    with distribute_scope.scope():
        dist = build()
    dist.set_weights(weights)
    h1 = single.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    h2 = dist.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    for a, b in zip(single.get_weights(), dist.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for key in ("loss", "task_loss", "grad_l1_w", "grad_l1_a"):
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert not np.allclose(weights[0], single.get_weights()[0])


# ------------------------------------------------------------------------------------------
# lazy regularization
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_lazy_term_is_applied_every_kth_step_scaled_by_k(method):
    x, y = batch64(seed=7)
    k = 3
    lazy = training.TrainingModel(mlp64(seed=6), terms=[training.GradientL1(
        0.2, 0.1, method=method, every=k, epsilon=1e-5, reduction="sum")])
    lazy.compile(keras.optimizers.SGD(0.125), CE)
    ref = mlp64(seed=6)
    ref.set_weights(lazy.inner.get_weights())
    logs = [lazy.train_on_batch(x, y, return_dict=True, reset_metrics=False)
            for _ in range(k + 1)]
    plain = training.TrainingModel(mlp64(seed=6))
    plain.compile(keras.optimizers.SGD(0.125), CE)
    for step in range(k + 1):
        if step % k == 0:
            new = exact_sgd_update(ref, x, y, 0.2 * k, 0.1 * k, 0.125)
            for v, w in zip(ref.trainable_variables, new):
                v.assign(w)
        else:
            plain.inner.set_weights(ref.get_weights())
            plain.train_on_batch(x, y)
            ref.set_weights(plain.inner.get_weights())
    tol = 1e-9 if method == "exact" else 1e-5
    for a, b in zip(lazy.inner.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    # plain steps add nothing to the term's mean: it stays the first step's value
    assert logs[1]["grad_l1_w"] == logs[0]["grad_l1_w"] > 0


def test_lazy_fit_switches_and_survives_a_second_fit():
    x, y = batch64(n=32, seed=8)
    model = training.TrainingModel(mlp64(seed=1), terms=[training.GradientL1(
        0.1, method="finite_difference", every=4, start_step=2, reduction="sum")])
    model.compile(keras.optimizers.SGD(0.1), CE)
    h = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    h2 = model.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert h["grad_l1_w"][0] > 0 and h2["grad_l1_w"][0] > 0
    assert np.isfinite(h2["loss"][0])


# ------------------------------------------------------------------------------------------
# reduction="step": the first-order bound on the loss increase at `bits` bits
# ------------------------------------------------------------------------------------------


def test_step_reduction_value_equals_numpy():
    x, y = batch64(seed=9)
    model = mlp64(seed=3, act="relu")
    term = training.GradientL1(0.3, 0.7, reduction="step", bits=3)
    out = term.penalty(model, tf.constant(x), y, CE, training=False)
    d1, d2 = model.get_layer("d1"), model.get_layer("d2")
    with tf.GradientTape() as tape:
        h = d1(tf.constant(x))
        tape.watch(h)
        o = d2(h)
        tape.watch(o)
        loss = CE(y, o)
    gk1, gk2, gh, go = [g.numpy() for g in tape.gradient(loss, [d1.kernel, d2.kernel, h, o])]
    norm_w = sum(0.5 * np.abs(k.numpy()).max() / 3 * np.abs(g).sum()
                 for k, g in ((d1.kernel, gk1), (d2.kernel, gk2)))
    norm_a = sum(0.5 * (max(a.max(), 0) - min(a.min(), 0)) / 7 * np.abs(g).sum()
                 for a, g in ((h.numpy(), gh), (o.numpy(), go)))
    np.testing.assert_allclose(out["norm_w"].numpy(), norm_w, rtol=1e-10)
    np.testing.assert_allclose(out["norm_a"].numpy(), norm_a, rtol=1e-10)
    np.testing.assert_allclose(out["penalty"].numpy(), 0.3 * norm_w + 0.7 * norm_a, rtol=1e-10)


def test_step_reduction_is_invariant_to_moving_scale_between_relu_layers():
    x, y = batch64(seed=10)
    a, b = mlp64(seed=2, act="relu"), mlp64(seed=2, act="relu")
    b.set_weights(a.get_weights())
    c = 8.0
    d1, d2 = b.get_layer("d1"), b.get_layer("d2")
    d1.kernel.assign(d1.kernel * c)
    d1.bias.assign(d1.bias * c)
    d2.kernel.assign(d2.kernel / c)  # relu(c·z)/c = relu(z): the same function
    np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), rtol=1e-10)
    for reduction, invariant in (("step", True), ("sum", False)):
        pa = training.GradientL1(1.0, reduction=reduction).penalty(a, x, y, CE)["norm_w"]
        pb = training.GradientL1(1.0, reduction=reduction).penalty(b, x, y, CE)["norm_w"]
        assert np.isclose(pa.numpy(), pb.numpy(), rtol=1e-9) == invariant, reduction


# ------------------------------------------------------------------------------------------
# arguments and configs
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "fd"}, "`method`"), ({"every": 0}, "`every`"), ({"every": 2.0}, "`every`"),
    ({"epsilon": 0.0}, "`epsilon`"), ({"epsilon": "1e-3"}, "`epsilon`"),
    ({"reduction": "max"}, "`reduction`"), ({"bits": 1}, "`bits`"),
])
def test_bad_fast_form_arguments_name_the_argument(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        training.GradientL1(**kwargs)


def test_new_arguments_round_trip_and_old_configs_keep_their_meaning():
    term = training.GradientL1(0.05, 0.02, reduction="step", bits=3, method="finite_difference",
                               every=4, epsilon=1e-3)
    again = training.get(training.serialize(term))
    for key in ("lambda_w", "lambda_a", "reduction", "bits", "method", "every", "epsilon"):
        assert getattr(again, key) == getattr(term, key), key
    old = {k: v for k, v in term.get_config().items()
           if k not in ("bits", "method", "every", "epsilon")}
    old["reduction"] = "sum"
    restored = training.GradientL1.from_config(old)
    assert (restored.method, restored.every, restored.reduction) == ("exact", 1, "sum")


def test_finite_difference_through_a_softmax_output_matches_exact():
    # Keras' cross-entropy on a softmax output reads the logits; perturbing the softmax output
    # (whose gradient is then unconnected) would switch it to log(probabilities)
    tf.random.set_seed(5)
    inp = keras.Input((6,))
    h = keras.layers.Dense(8, activation="tanh", name="d1")(inp)
    model = keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="d2")(h))
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(size=(16, 6)).astype("float32"))
    y = tf.constant(rng.integers(0, 3, 16))
    loss = keras.losses.SparseCategoricalCrossentropy()
    term = training.GradientL1(1e-2, 1e-2, method="finite_difference", epsilon=1e-3, reduction="sum")
    term.attach(model)

    def forward():
        return loss(y, model(x, training=True)), None

    with tf.GradientTape() as tape:
        task, _, nw, na = term.forward(forward)
        total = task + 1e-2 * (nw + na)
    exact = tape.gradient(total, model.trainable_variables)
    grads = term.finite_difference(model, forward, lambda: None, model.trainable_variables)[0]
    with tf.GradientTape() as tape:
        plain = loss(y, model(x, training=True))
    g0 = tape.gradient(plain, model.trainable_variables)
    a = np.concatenate([(e - p).numpy().ravel() for e, p in zip(exact, g0)])
    b = np.concatenate([(f - p).numpy().ravel() for f, p in zip(grads, g0)])
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.02


@pytest.mark.parametrize("factory, match", [
    (lambda: training.GradientL1(lambda_w=1e308, reduction="sum"), "`lambda_w`"),
    (lambda: training.GradientL1(lambda_a=1e7, reduction="sum"), "`lambda_a`"),
    (lambda: training.LearnableMSQE(beta=1e308), "`beta`"),
    (lambda: training.LearnablePartialL2(alpha_init=-1e308), "`alpha_init`"),
    (lambda: training.TrainingModel(mlp64(), terms=5), "`terms`"),
])
def test_out_of_range_strengths_and_terms_are_refused(factory, match):
    with pytest.raises((TypeError, ValueError), match=match):
        factory()


# ------------------------------------------------------------------------------------------
# LearnableMSQE on a kernel a BatchNorm folds into: the step follows the statistics
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("folded_step", ["relative", "absolute"])
def test_learnable_msqe_step_follows_the_batchnorm_statistics(folded_step):
    model = bn_cnn(seed=3)
    bits = 4
    term = training.LearnableMSQE(bits=bits, per_channel=True, folded_step=folded_step)
    trainer = training.TrainingModel(model, terms=[term])
    bn = model.get_layer("bn")
    bn.moving_variance.assign(bn.moving_variance * 100.0)  # as training moves the statistics
    w = model.get_layer("c1").kernel.numpy()
    s = (bn.gamma / np.sqrt(bn.moving_variance + bn.epsilon)).numpy()
    folded = w * s
    default = np.abs(folded).reshape(-1, folded.shape[-1]).max(0) / (2 ** (bits - 1) - 1)
    delta = term.steps()[0].numpy().reshape(-1)
    if folded_step == "relative":  # ρ = 0: exactly the current default step of the fold
        np.testing.assert_allclose(delta, default, rtol=1e-6)
    else:  # the step of the fold at attach time, 10x too coarse now
        np.testing.assert_allclose(delta, 10.0 * default, rtol=1e-3)  # (ε of the BatchNorm)
    training.round_to_grid(trainer)
    idx = (model.get_layer("c1").kernel.numpy() * s) / delta
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)  # the fold is on the grid
    zeros = np.mean(np.round(idx) == 0)
    assert zeros == pytest.approx(np.mean(np.abs(folded) / delta < 0.5))  # NumPy's rounding
    # the lagging absolute step (10x coarse) zeroes most of the fold (|w'| < 0.71·max), the
    # relative one only |w'| < max/14
    assert (zeros < 0.3) if folded_step == "relative" else (zeros > 0.5)


def test_learnable_msqe_configs_without_folded_step_load_as_absolute():
    term = training.LearnableMSQE(bits=3)
    config = term.get_config()
    assert config["folded_step"] == "relative"
    del config["folded_step"]
    assert training.LearnableMSQE.from_config(config).folded_step == "absolute"


def test_documented_defaults_are_the_constructors():
    term = training.GradientL1()
    assert (term.lambda_w, term.lambda_a, term.reduction, term.bits, term.method, term.every,
            term.epsilon) == (1e-3, 1e-3, "step", 4, "exact", 1, 1e-3)
    doc = training.GradientL1.__doc__
    assert "Default 1e-3 on the ``\"step\"`` scale" in doc and "``\"step\"`` (default)" in doc
