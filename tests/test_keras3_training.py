"""The training terms on Keras 2 AND Keras 3 models (issue 15): the same cases, run once per
Keras (the ``k`` fixture), each against an independent computation: a hand-written double
backprop, NumPy closed forms, the exact step for the finite-difference one, the single-device
step for MirroredStrategy, and the reloaded model continuing exactly as the original."""

import json
import subprocess
import sys
import textwrap
import warnings

import keras as keras3
import numpy as np
import pytest

from tfqreg import fold, training
from tfqreg._keras import keras as keras2
from tfqreg._keras import tf

F64 = "float64"


class _K:
    """One Keras (module, name) with the few helpers the cases need."""

    def __init__(self, mod, name):
        self.mod, self.name = mod, name

    def ce(self, dtype=F64):
        # a Keras 3 loss computes in its own dtype (floatx unless given); Keras 2 in the input's
        kw = {"dtype": dtype} if self.mod is keras3 else {}
        return self.mod.losses.SparseCategoricalCrossentropy(from_logits=True, **kw)

    def mlp(self, seed=0, dtype=F64, hidden=4, inputs=3, classes=2, l2=None):
        """Functional Dense(tanh) -> Dense with weights drawn by NumPy (same in both Keras)."""
        L = self.mod.layers
        inp = self.mod.Input((inputs,), dtype=dtype)
        reg = self.mod.regularizers.L2(l2) if l2 else None
        h = L.Dense(hidden, activation="tanh", dtype=dtype, name="d1",
                    kernel_regularizer=reg)(inp)
        out = L.Dense(classes, dtype=dtype, name="d2")(h)
        model = self.mod.Model(inp, out, name="mlp")
        rng = np.random.default_rng(seed)
        model.set_weights([rng.normal(size=w.shape).astype(dtype) * 0.7
                           for w in model.get_weights()])
        return model

    def cnn(self, bn=False, seed=0):
        L = self.mod.layers
        inp = self.mod.Input((8, 8, 1))
        h = L.Conv2D(4, 3, use_bias=not bn, name="conv")(inp)
        if bn:
            h = L.BatchNormalization(name="bn")(h)
        h = L.ReLU(name="relu")(h)
        h = L.Flatten()(h)
        out = L.Dense(3, name="dense")(h)
        model = self.mod.Model(inp, out, name="cnn")
        rng = np.random.default_rng(seed)
        model.set_weights([(rng.normal(size=w.shape) * 0.3).astype("float32") + (
            1.0 if "variance" in v.name else 0.0) for v, w in zip(model.weights,
                                                                  model.get_weights())])
        return model


@pytest.fixture(params=["keras2", "keras3"])
def k(request):
    return _K(keras2 if request.param == "keras2" else keras3, request.param)


def batch(n=6, inputs=3, classes=2, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32").astype(F64)
    return x, rng.integers(0, classes, size=n)


def images(n=8, seed=2):
    rng = np.random.default_rng(seed)
    return rng.random((n, 8, 8, 1)).astype("float32"), rng.integers(0, 3, n)


def quiet():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore")
    return ctx


def exact_sgd_update(model, x, y, lambda_w, lambda_a, lr, ce):
    """One SGD step on task + λ_w Σ‖∇_W L‖₁ + λ_a Σ‖∇_a L‖₁, double backprop by hand."""
    d1, d2 = model.get_layer("d1"), model.get_layer("d2")
    variables = list(model.trainable_variables)
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            h = d1(tf.constant(x))
            inner.watch(h)
            out = d2(h)
            inner.watch(out)
            loss = ce(y, out)
        gk1, gk2, gh, go = inner.gradient(loss, [d1.kernel, d2.kernel, h, out])
        total = (loss + lambda_w * (tf.reduce_sum(tf.abs(gk1)) + tf.reduce_sum(tf.abs(gk2)))
                 + lambda_a * (tf.reduce_sum(tf.abs(gh)) + tf.reduce_sum(tf.abs(go))))
    grads = outer.gradient(total, variables)
    return ([np.asarray(v) - lr * g.numpy() for v, g in zip(variables, grads)],
            float(loss), sum(np.abs(g.numpy()).sum() for g in (gk1, gk2)),
            sum(np.abs(g.numpy()).sum() for g in (gh, go)))


def gl1(method="exact", **kw):
    ctx = quiet()  # the sum form with a large λ warns (on purpose here)
    try:
        return training.GradientL1(0.2, 0.1, reduction="sum", method=method, **kw)
    finally:
        ctx.__exit__(None, None, None)


# ------------------------------------------------------------------------------------------
# gradient-ℓ1
# ------------------------------------------------------------------------------------------


def test_dispatch_gives_a_model_of_the_inner_models_keras(k):
    model = training.TrainingModel(k.mlp(), terms=[training.LearnableMSQE(bits=4)])
    assert isinstance(model, k.mod.Model)
    assert training.is_training_model(model)
    assert isinstance(model, training.TrainingModel) == (k.name == "keras2")
    names = [v.path if k.name == "keras3" else v.name for v in model.weights]
    # α and log δ are weights of the model, variables of the model's Keras
    assert sum("alpha" in n for n in names) == 1 and sum("log_step" in n for n in names) == 2
    term = model.terms[0]
    assert isinstance(term.alpha, keras3.Variable) == (k.name == "keras3")
    assert any(v is term.alpha for v in model.trainable_weights)


def test_gradient_l1_step_equals_hand_written_double_backprop(k):
    x, y = batch()
    ref = k.mlp(seed=6)
    expected, loss, norm_w, norm_a = exact_sgd_update(ref, x, y, 0.2, 0.1, 0.125, k.ce())
    model = training.TrainingModel(k.mlp(seed=6), terms=[gl1()])
    model.compile(k.mod.optimizers.SGD(0.125), k.ce())
    logs = model.train_on_batch(x, y, return_dict=True)
    # Keras 3 casts the compiled loss to floatx (float32), so λ·‖g‖₁ is added in float32 and
    # the term's gradient carries float32's λ (relative 1.5e-8); Keras 2 stays in float64
    tol = 1e-9 if k.name == "keras2" else 1e-7
    for got, exp in zip(model.inner.trainable_variables, expected):
        np.testing.assert_allclose(np.asarray(got), exp, rtol=tol, atol=1e-12)
    np.testing.assert_allclose(logs["grad_l1_w"], norm_w, rtol=1e-6)
    np.testing.assert_allclose(logs["grad_l1_a"], norm_a, rtol=1e-6)
    np.testing.assert_allclose(logs["task_loss"], loss, rtol=1e-6)
    np.testing.assert_allclose(logs["loss"], loss + 0.2 * norm_w + 0.1 * norm_a, rtol=1e-6)
    # penalty() outside a TrainingModel: the same norms
    out = gl1().penalty(k.mlp(seed=6), x, y, k.ce())
    np.testing.assert_allclose(out["norm_w"].numpy(), norm_w, rtol=1e-10)
    np.testing.assert_allclose(out["norm_a"].numpy(), norm_a, rtol=1e-10)


def test_finite_difference_step_converges_to_the_exact_step(k):
    x, y = batch()
    ref = k.mlp(seed=6)
    expected = exact_sgd_update(ref, x, y, 0.2, 0.1, 0.125, k.ce())[0]
    start = [np.asarray(v) for v in ref.trainable_variables]
    errors = []
    for eps in (1e-2, 1e-4):
        model = training.TrainingModel(k.mlp(seed=6), terms=[gl1("finite_difference",
                                                                 epsilon=eps)])
        model.compile(k.mod.optimizers.SGD(0.125), k.ce())
        model.train_on_batch(x, y)
        got = [np.asarray(v) for v in model.inner.trainable_variables]
        num = sum(np.sum((g - e) ** 2) for g, e in zip(got, expected))
        den = sum(np.sum((e - s) ** 2) for e, s in zip(expected, start))
        errors.append(np.sqrt(num / den))
    # the Keras 2 suite's tolerance (test_training_fd), and first-order convergence
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 25, errors


def test_finite_difference_restores_batchnorm_statistics(k):
    # the fold lookup: refused on Keras 3 while tfqreg.fold cannot see Keras 3 graphs
    x, y = images()
    model_in = k.cnn(bn=True)
    term = training.GradientL1(1e-2, 1e-2, method="finite_difference", layers=["dense"])
    model = training.TrainingModel(model_in, terms=[term])
    model.compile(k.mod.optimizers.SGD(0.0), k.ce("float32"))
    bn = model.inner.get_layer("bn")
    plain = k.cnn(bn=True)
    plain.compile(k.mod.optimizers.SGD(0.0), k.ce("float32"))
    plain.train_on_batch(x, y)  # one ordinary training-mode pass: the statistics it leaves
    model.train_on_batch(x, y)
    np.testing.assert_allclose(np.asarray(bn.moving_mean),
                               np.asarray(plain.get_layer("bn").moving_mean), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance),
                               np.asarray(plain.get_layer("bn").moving_variance), rtol=1e-6)


def test_lazy_every_k_and_late_start(k):
    x, y = batch(seed=4)

    def make(term):
        m = training.TrainingModel(k.mlp(seed=3), terms=[term] if term else [])
        m.compile(k.mod.optimizers.SGD(0.125), k.ce())
        return m

    ctx = quiet()
    lazy = make(training.GradientL1(0.1, 0.05, reduction="sum", every=2))
    double = make(training.GradientL1(0.2, 0.1, reduction="sum"))  # k·λ on the term's steps
    late = make(training.GradientL1(0.2, 0.1, reduction="sum", start_step=1))
    ctx.__exit__(None, None, None)
    plain = make(None)
    lazy.train_on_batch(x, y)
    double.train_on_batch(x, y)
    for a, b in zip(lazy.inner.get_weights(), double.inner.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-7)  # 2·float32(λ) vs float32(2λ) on Keras 3
    # the second lazy step is a plain step from the same weights
    plain.inner.set_weights(lazy.inner.get_weights())
    lazy.train_on_batch(x, y)
    plain.train_on_batch(x, y)
    for a, b in zip(lazy.inner.get_weights(), plain.inner.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # late start: step 0 plain, step 1 with the term (as `double` from the same weights)
    plain2 = make(None)
    late.train_on_batch(x, y)
    plain2.train_on_batch(x, y)
    for a, b in zip(late.inner.get_weights(), plain2.inner.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not late._gl1_on
    double.inner.set_weights(late.inner.get_weights())
    late.train_on_batch(x, y)
    double.train_on_batch(x, y)
    assert late._gl1_on
    for a, b in zip(late.inner.get_weights(), double.inner.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-9)


# ------------------------------------------------------------------------------------------
# learnable terms
# ------------------------------------------------------------------------------------------


def np_msqe(w, step, bits):
    q_max = 2 ** (bits - 1) - 1
    idx = np.clip(np.round(w / step), -q_max - 1, q_max)
    return idx, step * idx


def test_msqe_one_step_moves_alpha_and_delta_by_the_closed_form(k):
    x, y = batch(n=8, seed=11)
    term = training.LearnableMSQE(bits=3, beta=0.9, alpha_init=0.2)
    model = training.TrainingModel(k.mlp(seed=12), terms=[term])
    lr = 0.0625
    model.compile(k.mod.optimizers.SGD(lr), k.ce())
    ws = [np.asarray(model.inner.get_layer(n).kernel) for n in ("d1", "d2")]
    logsteps = [np.asarray(s) for s in term._log_steps]
    for w, ls in zip(ws, logsteps):  # δ starts at the default (max-based) step
        np.testing.assert_allclose(np.exp(ls), np.abs(w).max() / 3, rtol=1e-12)
    logs = model.train_on_batch(x, y, return_dict=True)
    R, dRds = 0.0, []
    for w, ls in zip(ws, logsteps):
        idx, q = np_msqe(w, np.exp(ls), 3)
        R += ((w - q) ** 2).mean()
        dRds.append((-2.0 * (w - q) * idx).sum() / w.size)
    ea = np.exp(0.2)
    np.testing.assert_allclose(np.asarray(term.alpha), 0.2 - lr * (ea * R - 0.9), rtol=1e-10)
    for s, ls, d in zip(term._log_steps, logsteps, dRds):
        np.testing.assert_allclose(np.asarray(s), ls - lr * ea * np.exp(ls) * d, rtol=1e-10)
    np.testing.assert_allclose(logs["msqe"], R, rtol=1e-6)
    np.testing.assert_allclose(logs["loss"] - logs["task_loss"], ea * R - 0.9 * 0.2, rtol=1e-4)


def test_partial_l2_value_and_alpha_cap(k):
    x, y = batch(seed=5)
    term = training.LearnablePartialL2(fraction=0.5, beta=5.0, alpha_init=1.0, alpha_max=1.05)
    model = training.TrainingModel(k.mlp(seed=7), terms=[term])
    model.compile(k.mod.optimizers.SGD(1.0), k.ce())
    ws = [np.asarray(model.inner.get_layer(n).kernel) for n in ("d1", "d2")]
    p = 0.0
    for w in ws:
        a = np.sort(np.abs(w).ravel())
        theta = a[int(np.floor(0.5 * a.size)) - 1]
        p += np.where(np.abs(w) <= theta, w ** 2, 0.0).mean()
    logs = model.train_on_batch(x, y, return_dict=True)
    np.testing.assert_allclose(logs["partial_l2"], p, rtol=1e-6)
    model.train_on_batch(x, y)
    assert float(np.asarray(term.alpha)) == pytest.approx(1.05)  # the constraint caps α
    masks = term.pruning_masks()
    assert len(masks) == 2 and all(m.mean() == 0.5 for m in masks.values())


def test_round_to_grid_puts_kernels_on_the_learned_grid(k):
    term = training.LearnableMSQE(bits=3)
    model = training.TrainingModel(k.mlp(seed=8), terms=[term])
    assert training.round_to_grid(model) is model
    for (_, kern), step in zip(term.targets, term.steps()):
        idx = np.asarray(kern) / step.numpy()
        np.testing.assert_allclose(idx, np.round(idx), atol=1e-9)
        assert np.abs(np.round(idx)).max() <= 4
    plain = k.mlp(seed=9)
    training.round_to_grid(plain, bits=4)
    w = np.asarray(plain.get_layer("d1").kernel)
    idx = w / (np.abs(w).max() / 7)
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-9)


def test_folded_and_per_channel_terms_equal_keras2():
    """MSQE of the BatchNorm-folded kernel, per-channel MSQE, and gradient-ℓ1 w.r.t. the folded
    kernel: a Keras 3 model gives the Keras 2 values on the same weights."""
    k2, k3 = _K(keras2, "keras2"), _K(keras3, "keras3")
    for bn, per_channel in ((True, False), (False, True), (True, True)):
        m2, m3 = k2.cnn(bn=bn, seed=4), k3.cnn(bn=bn, seed=4)
        t2 = training.LearnableMSQE(bits=4, per_channel=per_channel)
        t3 = training.LearnableMSQE(bits=4, per_channel=per_channel)
        training.TrainingModel(m2, terms=[t2])
        training.TrainingModel(m3, terms=[t3])
        assert (t3._folds[0] is not None) == bn
        np.testing.assert_allclose(t3.regularizer_value()[0].numpy(),
                                   t2.regularizer_value()[0].numpy(), rtol=1e-6)
        if bn and not per_channel:
            x, y = images()
            p2 = training.GradientL1().penalty(m2, x, y, k2.ce("float32"), training=True)
            p3 = training.GradientL1().penalty(m3, x, y, k3.ce("float32"), training=True)
            for key in ("norm_w", "norm_a"):
                np.testing.assert_allclose(p3[key].numpy(), p2[key].numpy(), rtol=1e-5)


def test_keras3_fold_or_axes_unknown_to_tfqreg_fold_is_refused(monkeypatch):
    """If tfqreg.fold cannot read a Keras 3 graph (no consumers, no fold) or knows no channel
    axis, the term is refused instead of measuring the unfolded / per-tensor kernel."""
    k3 = _K(keras3, "keras3")
    monkeypatch.setattr(fold, "batchnorm_for_kernel", lambda layer, kernel: None)
    monkeypatch.setattr(fold, "consumers", lambda layer: [])
    with pytest.raises(ValueError, match="followed by BatchNormalization 'bn'"):
        training.TrainingModel(k3.cnn(bn=True), terms=[training.LearnableMSQE(bits=4)])
    training.TrainingModel(k3.cnn(bn=False), terms=[training.LearnableMSQE(bits=4)])  # no BN
    monkeypatch.setattr(fold, "channel_axes", lambda layer: None)
    with pytest.raises(ValueError, match="per_channel"):
        training.TrainingModel(k3.cnn(), terms=[training.LearnableMSQE(per_channel=True)])


# ------------------------------------------------------------------------------------------
# fit, save / load, distribution
# ------------------------------------------------------------------------------------------


def _terms():
    return [training.GradientL1(lambda_w=1e-2, lambda_a=1e-2, reduction="mean"),
            training.LearnableMSQE(bits=4, beta=0.5)]


def test_fit_one_epoch_logs_the_composed_loss(k):
    x, y = images(n=16)
    model = training.TrainingModel(k.cnn(), terms=_terms())
    model.compile(k.mod.optimizers.Adam(1e-2), k.ce("float32"), metrics=["accuracy"])
    h = model.fit(x, y, batch_size=16, epochs=1, verbose=0).history  # one batch
    assert {"loss", "task_loss", "accuracy", "gradient_l1", "grad_l1_w", "grad_l1_a", "msqe",
            "exp_alpha", "delta"} <= set(h)
    ea = h["exp_alpha"][0]
    np.testing.assert_allclose(
        h["loss"][0], h["task_loss"][0] + h["gradient_l1"][0] + ea * h["msqe"][0]
        - 0.5 * np.log(ea), rtol=1e-5)
    assert h["grad_l1_a"][0] > 0 and h["grad_l1_w"][0] > 0
    ev = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(ev) == {"loss", "accuracy"}
    np.testing.assert_allclose(ev["loss"], float(k.ce("float32")(y, model.inner(x))), rtol=1e-5)


def test_kernel_regularizer_losses_enter_the_total(k):
    x, y = batch(seed=8)
    inner = k.mlp(seed=2, l2=0.05)
    w = np.asarray(inner.get_layer("d1").kernel)
    model = training.TrainingModel(inner, terms=[training.LearnablePartialL2(beta=1.0)])
    model.compile(k.mod.optimizers.SGD(0.0), k.ce())
    logs = model.train_on_batch(x, y, return_dict=True)
    expected = 0.05 * (w ** 2).sum() + logs["exp_alpha"] * logs["partial_l2"]  # α = 0
    np.testing.assert_allclose(logs["loss"] - logs["task_loss"], expected, rtol=1e-5)


def test_keras_file_round_trip_restores_state_and_training_continues(k, tmp_path):
    x, y = images(n=16)
    model = training.TrainingModel(k.cnn(), terms=_terms())
    model.compile(k.mod.optimizers.Adam(1e-2), k.ce("float32"))
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = k.mod.models.load_model(path)
    assert training.is_training_model(loaded) and type(loaded) is type(model)
    assert [t.get_config() for t in loaded.terms] == [t.get_config() for t in model.terms]
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    msqe = loaded.terms[1]
    np.testing.assert_array_equal(np.asarray(msqe.alpha), np.asarray(model.terms[1].alpha))
    # weights only (.weights.h5 on Keras 3, .h5 on Keras 2) into a fresh model
    wpath = str(tmp_path / ("m.weights.h5" if k.name == "keras3" else "m.h5"))
    model.save_weights(wpath)
    fresh = training.TrainingModel(k.cnn(seed=9), terms=_terms())
    fresh.load_weights(wpath)
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    # the optimizer state came back too: one more epoch of each gives the same weights
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_subclassed_inner_model_records_its_layers_activations(k):
    class Net(k.mod.Model):
        def __init__(self):
            super().__init__()
            self.d1 = k.mod.layers.Dense(4, activation="tanh", dtype=F64, name="d1")
            self.d2 = k.mod.layers.Dense(2, dtype=F64, name="d2")

        def call(self, x):
            return self.d2(self.d1(x))

    x, y = batch()
    net, ref = Net(), k.mlp(seed=6)
    net(x[:1])
    net.set_weights(ref.get_weights())
    out = gl1().penalty(net, x, y, k.ce())
    _, _, norm_w, norm_a = exact_sgd_update(ref, x, y, 0.2, 0.1, 0.125, k.ce())
    np.testing.assert_allclose(out["norm_w"].numpy(), norm_w, rtol=1e-10)
    np.testing.assert_allclose(out["norm_a"].numpy(), norm_a, rtol=1e-10)


def test_keras3_xla_jit_compile_matches_default():
    # (Keras 2: tests/test_training.py::test_xla_jit_compile_matches_default)
    k = _K(keras3, "keras3")
    x, y = images(n=16, seed=6)
    models = []
    for jit in (False, True):
        m = training.TrainingModel(k.cnn(seed=7), terms=_terms())
        m.compile(k.mod.optimizers.SGD(0.1), k.ce("float32"), jit_compile=jit)
        m.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        models.append(m)
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mirrored_strategy_matches_single_device(k, distribute_scope):
    x, y = images(n=32, seed=3)

    def make():
        m = training.TrainingModel(k.cnn(seed=5), terms=_terms())
        m.compile(k.mod.optimizers.SGD(0.1), k.ce("float32"))
        return m

    single = make()
    with distribute_scope.scope():
        dist = make()
    assert dist.distribute_strategy.num_replicas_in_sync == 2
    single.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    dist.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(single.get_weights(), dist.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(single.terms[1].alpha.numpy(), 0.0)  # α moved


# ------------------------------------------------------------------------------------------
# what Keras 3 cannot do
# ------------------------------------------------------------------------------------------


def test_keras3_refusals_name_the_argument():
    model = training.TrainingModel(_K(keras3, "keras3").mlp(), terms=["msqe"])
    with pytest.raises(TypeError, match="`optimizer`.*Keras 3"):
        model.compile(keras2.optimizers.SGD(0.1), "mse")
    unbuilt = keras3.Sequential([keras3.layers.Dense(2)])
    with pytest.raises(ValueError, match="`inner`"):
        training.TrainingModel(unbuilt, terms=["msqe"])
    with pytest.raises(TypeError, match="`terms`"):
        training.TrainingModel(_K(keras3, "keras3").mlp(), terms=3)
    term = training.LearnableMSQE(bits=4)
    training.TrainingModel(_K(keras3, "keras3").mlp(), terms=[term])
    with pytest.raises(ValueError, match="already attached"):
        training.TrainingModel(_K(keras2, "keras2").mlp(), terms=[term])
    with pytest.raises(TypeError, match="`model`"):
        training.kernel_layers("net", None)
    with pytest.raises(ValueError, match="`filepath`.*legacy HDF5"):
        model.save("model.h5")


# ------------------------------------------------------------------------------------------
# MultiWorkerMirroredStrategy (Keras 3; Keras 2: tests/test_training_multiworker.py)
# ------------------------------------------------------------------------------------------

KERAS3_WORKER = textwrap.dedent(
    """
    import json, sys
    import keras
    import numpy as np
    import tfqreg
    from tfqreg import training
    from tfqreg._keras import tf

    out, mode = sys.argv[1], sys.argv[2]
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if mode == "multi"
                else tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    x = rng.random((32, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 10, 32).astype("int64")
    # Keras 3 distributes a plain dataset itself (it refuses distributed ones): rebatched to
    # the per-replica batch of 8, then sharded, worker i gets the i-th half of each batch of 16
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    with strategy.scope():
        inp = keras.Input((12, 12, 1))
        h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
        h = keras.layers.Flatten()(h)
        inner = keras.Model(inp, keras.layers.Dense(10, name="dense")(h))
        init = np.random.default_rng(7)  # the same initial weights in every process
        inner.set_weights([init.normal(0, 0.2, w.shape).astype("float32")
                           for w in inner.get_weights()])
        model = training.TrainingModel(
            inner, terms=[training.GradientL1(1e-2, 1e-2, reduction="mean"),
                          training.LearnableMSQE(bits=4)])
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    hist = model.fit(ds, epochs=2, steps_per_epoch=2, verbose=0).history
    np.savez(out, *model.get_weights())
    with open(out + ".json", "w") as f:
        json.dump({k: [float(v) for v in vs] for k, vs in hist.items()}, f)
    """
)


@pytest.mark.slow
def test_keras3_two_workers_agree_and_match_single_process(tmp_path):
    from test_training_multiworker import _env, _free_ports, _load

    script = tmp_path / "worker.py"
    script.write_text(KERAS3_WORKER)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(2)]}
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"w{i}.npz"), "multi"],
            env=_env({"TF_CONFIG": tf_config}), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT))
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single.npz"),
                             "single"], env=_env(), capture_output=True, timeout=300)
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert single.returncode == 0, single.stderr.decode(errors="replace")[-3000:]
    if any(p.returncode and "Attempt to convert a value (PerReplica" in text
           for p, text in zip(procs, outputs)):
        # Keras 3.15's fit under MultiWorkerMirroredStrategy fails before the first step for
        # ANY Keras 3 model (trainer._maybe_symbolic_build reduces a PerReplica batch with
        # strategy.reduce, which the collective ops cannot convert); checked with the plain
        # inner model. This test runs for real once Keras fixes it.
        pytest.xfail("Keras 3 fit under MultiWorkerMirroredStrategy fails in Keras itself")
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    w0, w1 = _load(tmp_path / "w0.npz"), _load(tmp_path / "w1.npz")
    ws = _load(tmp_path / "single.npz")
    assert len(w0) == len(w1) == len(ws) == 7  # 4 kernel/bias + α + 2 log δ
    for a, b, c in zip(w0, w1, ws):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    h0 = json.loads((tmp_path / "w0.npz.json").read_text())
    hs = json.loads((tmp_path / "single.npz.json").read_text())
    for key in ("loss", "task_loss", "gradient_l1", "grad_l1_a", "msqe", "exp_alpha"):
        np.testing.assert_allclose(h0[key], hs[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert hs["gradient_l1"][-1] > 0
