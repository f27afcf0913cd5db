"""Tests of tfqreg.training against independent computations (NumPy closed forms, separately
computed gradients, float64 finite differences, the single-device step)."""

import glob
import os
import warnings

import numpy as np
import pytest

import tfqreg
from tfqreg import grid, models, training
from tfqreg._keras import keras, tf

F64 = "float64"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def mlp64(seed=0, hidden=4, inputs=3, classes=2):
    """A tiny float64 Functional MLP with a smooth activation (second derivatives exist)."""
    tf.random.set_seed(seed)
    inp = keras.Input((inputs,), dtype=F64)
    h = keras.layers.Dense(hidden, activation="tanh", dtype=F64, name="d1")(inp)
    out = keras.layers.Dense(classes, dtype=F64, name="d2")(h)
    return keras.Model(inp, out, name="mlp64")


def batch64(n=6, inputs=3, classes=2, seed=1):
    # float32-representable: Keras' fit/train_on_batch cast NumPy inputs to floatx (float32)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, inputs)).astype("float32").astype(F64)
    return x, rng.integers(0, classes, size=n)


CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def manual_norms(model, x, y, lambda_w, lambda_a):
    """Gradient-ℓ1 of the mlp64 computed without tfqreg: layer by layer, watching the outputs."""
    d1, d2 = model.get_layer("d1"), model.get_layer("d2")
    with tf.GradientTape() as tape:
        h = d1(tf.constant(x))
        tape.watch(h)
        out = d2(h)
        tape.watch(out)
        loss = CE(y, out)
    gk1, gk2, gh, go = tape.gradient(loss, [d1.kernel, d2.kernel, h, out])
    norm_w = sum(np.abs(g.numpy()).sum() for g in (gk1, gk2))
    norm_a = sum(np.abs(g.numpy()).sum() for g in (gh, go))
    return loss.numpy(), norm_w, norm_a, lambda_w * norm_w + lambda_a * norm_a


def np_msqe(w, step, bits, narrow=False):
    q_max = 2 ** (bits - 1) - 1
    q_min = -q_max if narrow else -q_max - 1
    k = np.clip(np.round(w / step), q_min, q_max)
    return k, step * k


# ------------------------------------------------------------------------------------------
# gradient-ℓ1: value, gradient, closed form
# ------------------------------------------------------------------------------------------


def test_gradient_l1_value_equals_l1_of_separate_gradients():
    model = mlp64()
    x, y = batch64()
    term = training.GradientL1(lambda_w=0.3, lambda_a=0.7, reduction="sum")
    out = term.penalty(model, x, y, CE)
    loss, norm_w, norm_a, pen = manual_norms(model, x, y, 0.3, 0.7)
    np.testing.assert_allclose(out["task_loss"].numpy(), loss, rtol=1e-12)
    np.testing.assert_allclose(out["norm_w"].numpy(), norm_w, rtol=1e-12)
    np.testing.assert_allclose(out["norm_a"].numpy(), norm_a, rtol=1e-12)
    np.testing.assert_allclose(out["penalty"].numpy(), pen, rtol=1e-12)
    # "mean" divides each tensor's norm by its (per-example) size
    term_m = training.GradientL1(lambda_w=1.0, lambda_a=1.0, reduction="mean")
    out_m = term_m.penalty(model, x, y, CE)
    d1, d2 = model.get_layer("d1"), model.get_layer("d2")
    with tf.GradientTape() as tape:
        loss_t = CE(y, model(x))
    g1, g2 = tape.gradient(loss_t, [d1.kernel, d2.kernel])
    expected = np.abs(g1.numpy()).sum() / g1.shape.num_elements() + \
        np.abs(g2.numpy()).sum() / g2.shape.num_elements()
    np.testing.assert_allclose(out_m["norm_w"].numpy(), expected, rtol=1e-12)


def test_gradient_l1_gradient_matches_finite_differences():
    model = mlp64(seed=3)
    x, y = batch64(seed=4)
    term = training.GradientL1(lambda_w=0.5, lambda_a=0.25, reduction="sum")
    with tf.GradientTape() as tape:
        pen = term.penalty(model, x, y, CE)["penalty"]
    grads = tape.gradient(pen, model.trainable_variables)
    eps = 1e-6
    for var, g in zip(model.trainable_variables, grads):
        base = var.numpy()
        fd = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            vals = []
            for sgn in (1, -1):
                w = base.copy()
                w[idx] += sgn * eps
                var.assign(w)
                vals.append(manual_norms(model, x, y, 0.5, 0.25)[3])
            fd[idx] = (vals[0] - vals[1]) / (2 * eps)
        var.assign(base)
        np.testing.assert_allclose(g.numpy(), fd, rtol=1e-5, atol=1e-8, err_msg=var.name)


def test_gradient_l1_linear_least_squares_closed_form():
    rng = np.random.default_rng(0)
    B, d = 8, 5
    X, t = rng.normal(size=(B, d)), rng.normal(size=(B, 1))
    inp = keras.Input((d,), dtype=F64)
    out = keras.layers.Dense(1, use_bias=False, dtype=F64, name="lin")(inp)
    model = keras.Model(inp, out)
    w = model.get_layer("lin").kernel
    lw, la = 0.3, 0.2
    term = training.GradientL1(lambda_w=lw, lambda_a=la, reduction="sum")
    with tf.GradientTape() as tape:
        pen = term.penalty(model, X, t, keras.losses.MeanSquaredError())["penalty"]
    dpen = tape.gradient(pen, w).numpy()
    W = w.numpy()
    r = X @ W - t                      # residual
    g = 2.0 / B * X.T @ r              # ∇_W L for L = mean(r²)
    ga = 2.0 / B * r                   # ∇_a L, a = XW
    np.testing.assert_allclose(pen.numpy(), lw * np.abs(g).sum() + la * np.abs(ga).sum(),
                               rtol=1e-12)
    expected = lw * 2.0 / B * X.T @ X @ np.sign(g) + la * 2.0 / B * X.T @ np.sign(r)
    np.testing.assert_allclose(dpen, expected, rtol=1e-10)


def test_train_step_equals_manual_double_backprop_sgd():
    x, y = batch64(n=8, seed=5)
    model = training.TrainingModel(mlp64(seed=6), terms=[training.GradientL1(0.2, 0.1, reduction="sum")])
    model.compile(keras.optimizers.SGD(0.125), CE)  # exact in float32 (the optimizer's lr)
    ref = mlp64(seed=6)
    ref.set_weights(model.inner.get_weights())
    logs = model.train_on_batch(x, y, return_dict=True)
    with tf.GradientTape() as tape:
        loss, _, _, _ = manual_norms(ref, x, y, 0.2, 0.1)  # value only; redo under the tape
        d1, d2 = ref.get_layer("d1"), ref.get_layer("d2")
        with tf.GradientTape() as inner:
            h = d1(tf.constant(x))
            inner.watch(h)
            o = d2(h)
            inner.watch(o)
            task = CE(y, o)
        gs = inner.gradient(task, [d1.kernel, d2.kernel, h, o])
        total = task + 0.2 * (tf.reduce_sum(tf.abs(gs[0])) + tf.reduce_sum(tf.abs(gs[1]))) \
            + 0.1 * (tf.reduce_sum(tf.abs(gs[2])) + tf.reduce_sum(tf.abs(gs[3])))
    grads = tape.gradient(total, ref.trainable_variables)
    for v, g, new in zip(ref.trainable_variables, grads, model.inner.trainable_variables):
        np.testing.assert_allclose(new.numpy(), v.numpy() - 0.125 * g.numpy(), rtol=1e-10,
                                   atol=1e-12)
    # logged values go through float32 Keras Mean metrics
    np.testing.assert_allclose(logs["loss"], total.numpy(), rtol=1e-6)
    np.testing.assert_allclose(logs["task_loss"], task.numpy(), rtol=1e-6)
    np.testing.assert_allclose(logs["gradient_l1"], total.numpy() - task.numpy(), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# learnable coefficient: MSQE and partial L2
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_msqe_value_dalpha_and_delta_gradient(per_channel):
    model = mlp64(seed=7, hidden=6, inputs=5, classes=3)
    term = training.LearnableMSQE(bits=3, per_channel=per_channel, beta=0.7, alpha_init=1.3)
    term.attach(model)
    kernels = [model.get_layer("d1").kernel, model.get_layer("d2").kernel]
    # perturb the learned steps away from their initial value
    for s in term._log_steps:
        s.assign(s - 0.1)
    with tf.GradientTape(persistent=True) as tape:
        cost, metrics = term.cost()
    steps = [np.exp(s.numpy()) for s in term._log_steps]
    R = 0.0
    dR_dstep = []
    for k, st in zip(kernels, steps):  # R = Σ_l mean_l (w − Q)²
        w = k.numpy()
        idx, q = np_msqe(w, st, 3)
        R += ((w - q) ** 2).mean()
        dR_dstep.append((-2.0 * (w - q) * idx) / w.size)
    ea = np.exp(1.3)
    np.testing.assert_allclose(metrics["msqe"].numpy(), R, rtol=1e-12)
    np.testing.assert_allclose(cost.numpy(), ea * R - 0.7 * 1.3, rtol=1e-12)
    # dC/dα = e^α R − β
    np.testing.assert_allclose(tape.gradient(cost, term.alpha).numpy(), ea * R - 0.7,
                               rtol=1e-10)
    # δ receives the MSQE gradient: dC/dlogδ = e^α · δ · dR/dδ (round treated as constant)
    for s, st, d in zip(term._log_steps, steps, dR_dstep):
        axes = None if not per_channel else tuple(range(d.ndim - 1))
        expected = ea * st * d.sum(axis=axes, keepdims=per_channel)
        np.testing.assert_allclose(tape.gradient(cost, s).numpy(), np.reshape(expected, st.shape),
                                   rtol=1e-9, atol=1e-15)
    # kernels receive e^α · 2 (w − Q) / N
    for k, st in zip(kernels, steps):
        _, q = np_msqe(k.numpy(), st, 3)
        np.testing.assert_allclose(tape.gradient(cost, k).numpy(),
                                   ea * 2 * (k.numpy() - q) / q.size, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(metrics["delta"].numpy(),
                               np.concatenate([s.ravel() for s in steps]).mean(), rtol=1e-12)


def test_msqe_delta_gradient_matches_finite_differences():
    model = mlp64(seed=8, hidden=5, inputs=4)
    term = training.LearnableMSQE(bits=4, alpha_init=0.5, beta=2.0)
    term.attach(model)
    s = term._log_steps[0]
    with tf.GradientTape() as tape:
        cost, _ = term.cost()
    g = tape.gradient(cost, s).numpy()
    eps = 1e-7  # small enough that no weight changes its grid index
    base = s.numpy()
    vals = []
    for sgn in (1, -1):
        s.assign(base + sgn * eps)
        vals.append(term.cost()[0].numpy())
    s.assign(base)
    np.testing.assert_allclose(g, (vals[0] - vals[1]) / (2 * eps), rtol=1e-5)


def test_msqe_default_step_and_fixed_step_mode():
    model = mlp64(seed=9)
    term = training.LearnableMSQE(bits=4, per_channel=True)
    term.attach(model)
    k = model.get_layer("d1").kernel.numpy()
    np.testing.assert_allclose(np.exp(term._log_steps[0].numpy()),
                               np.abs(k).max(axis=0, keepdims=True) / 7, rtol=1e-12)
    fixed = training.LearnableMSQE(bits=2, learn_step=False)
    m2 = mlp64(seed=9)
    fixed.attach(m2)
    assert not [w for w in fixed.weights if "log_step" in w.name]
    w2 = m2.get_layer("d1").kernel.numpy()
    np.testing.assert_allclose(fixed.steps()[0].numpy(), np.abs(w2).max() / 1, rtol=1e-12)


def test_partial_l2_value_and_gradient():
    model = mlp64(seed=10, hidden=10, inputs=6)
    term = training.LearnablePartialL2(fraction=0.6, beta=0.5, alpha_init=0.4)
    term.attach(model)
    kernels = [model.get_layer("d1").kernel, model.get_layer("d2").kernel]
    with tf.GradientTape() as tape:
        cost, metrics = term.cost()
    P, masks = 0.0, []
    for k in kernels:
        w = k.numpy()
        a = np.sort(np.abs(w).ravel())
        theta = a[int(np.floor(0.6 * w.size)) - 1]
        mask = np.abs(w) <= theta
        masks.append(mask)
        P += (w[mask] ** 2).sum() / w.size
    np.testing.assert_allclose(metrics["partial_l2"].numpy(), P, rtol=1e-12)
    np.testing.assert_allclose(cost.numpy(), np.exp(0.4) * P - 0.5 * 0.4, rtol=1e-12)
    for k, g, mask in zip(kernels, tape.gradient(cost, kernels), masks):
        np.testing.assert_allclose(g.numpy(), np.exp(0.4) * 2 * k.numpy() * mask / mask.size,
                                   rtol=1e-10)
    keep = term.pruning_masks()
    assert sum(m.sum() for m in keep.values()) == sum((~m).sum() for m in masks)


def test_msqe_train_step_updates_alpha_and_delta_by_their_gradients():
    x, y = batch64(n=8, seed=11)
    term = training.LearnableMSQE(bits=3, beta=0.9, alpha_init=0.2)
    model = training.TrainingModel(mlp64(seed=12), terms=[term])
    lr = 0.0625  # exact in float32 (the optimizer's lr)
    model.compile(keras.optimizers.SGD(lr), CE)
    kernels = [model.inner.get_layer("d1").kernel, model.inner.get_layer("d2").kernel]
    ws = [k.numpy() for k in kernels]
    logsteps = [s.numpy() for s in term._log_steps]
    logs = model.train_on_batch(x, y, return_dict=True)
    R, dRds = 0.0, []
    for w, ls in zip(ws, logsteps):
        idx, q = np_msqe(w, np.exp(ls), 3)
        R += ((w - q) ** 2).mean()
        dRds.append((-2.0 * (w - q) * idx).sum() / w.size)
    ea = np.exp(0.2)
    np.testing.assert_allclose(term.alpha.numpy(), 0.2 - lr * (ea * R - 0.9), rtol=1e-10)
    for s, ls, d in zip(term._log_steps, logsteps, dRds):
        np.testing.assert_allclose(s.numpy(), ls - lr * ea * np.exp(ls) * d, rtol=1e-10)
    np.testing.assert_allclose(logs["msqe"], R, rtol=1e-6)  # float32 Keras metrics
    np.testing.assert_allclose(logs["exp_alpha"], ea, rtol=1e-6)
    np.testing.assert_allclose(logs["loss"] - logs["task_loss"], ea * R - 0.9 * 0.2, rtol=1e-4)


def test_alpha_is_capped():
    term = training.LearnableMSQE(bits=4, alpha_init=1.0, alpha_max=1.05, beta=5.0)
    model = training.TrainingModel(mlp64(), terms=[term])
    model.compile(keras.optimizers.SGD(1.0), CE)
    x, y = batch64()
    for _ in range(3):
        model.train_on_batch(x, y)
    assert term.alpha.numpy() == pytest.approx(1.05)


def test_round_to_grid_puts_kernels_on_the_learned_grid():
    term = training.LearnableMSQE(bits=3, per_channel=True)
    model = training.TrainingModel(mlp64(seed=13, hidden=6), terms=[term])
    model.compile(keras.optimizers.Adam(0.01), CE)
    x, y = batch64(n=16)
    model.fit(x, y, epochs=2, verbose=0)
    out = training.round_to_grid(model)
    assert out is model
    for k, st in zip([model.inner.get_layer("d1").kernel, model.inner.get_layer("d2").kernel],
                     term.steps()):
        idx = k.numpy() / st.numpy()
        np.testing.assert_allclose(idx, np.round(idx), atol=1e-9)
        assert idx.min() >= -4 - 1e-9 and idx.max() <= 3 + 1e-9
    # a plain model with the default grid
    plain = mlp64(seed=14)
    training.round_to_grid(plain, bits=2)
    k = plain.get_layer("d1").kernel.numpy()
    assert len(np.unique(np.round(k / (np.abs(k).max() / 1), 9))) <= 3
    with pytest.raises(ValueError, match="bits"):
        training.round_to_grid(mlp64())


# ------------------------------------------------------------------------------------------
# model kinds, metrics, schedule, TensorBoard
# ------------------------------------------------------------------------------------------


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__(name="subclassed")
        self.conv = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv")
        self.pool = keras.layers.GlobalAveragePooling2D()
        self.fc = keras.layers.Dense(10, name="fc")

    def call(self, x, training=None):
        return self.fc(self.pool(self.conv(x)))


def _functional():
    inp = keras.Input((12, 12, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inp)
    h = keras.layers.DepthwiseConv2D(3, activation="relu", name="dw")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inp, keras.layers.Dense(10, name="fc")(h))


def _larq_bnn():
    import larq as lq

    kw = dict(kernel_quantizer="ste_sign", kernel_constraint="weight_clip", use_bias=False)
    return keras.Sequential([
        keras.layers.InputLayer((12, 12, 1)),
        lq.layers.QuantConv2D(8, 3, name="qconv", **kw),
        keras.layers.BatchNormalization(),
        lq.layers.QuantConv2D(8, 3, input_quantizer="ste_sign", name="qconv2", **kw),
        keras.layers.BatchNormalization(),
        keras.layers.GlobalAveragePooling2D(),
        lq.layers.QuantDense(10, input_quantizer="ste_sign", name="qfc", **kw),
    ])


def _tfmot():
    import tensorflow_model_optimization as tfmot

    base = keras.Sequential([
        keras.layers.InputLayer((12, 12, 1)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.Flatten(),
        keras.layers.Dense(10, name="fc"),
    ])
    annotated = tfmot.quantization.keras.quantize_annotate_model(base)
    return tfmot.quantization.keras.quantize_apply(annotated)


def _sequential():
    return models.tiny_cnn(input_shape=(12, 12, 1))


def _subclassed():
    m = Subclassed()
    m.build((None, 12, 12, 1))
    return m


KINDS = {"sequential": _sequential, "functional": _functional, "subclassed": _subclassed,
         "larq_bnn": _larq_bnn, "tfmot_qat": _tfmot}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_terms_train_on_every_model_kind(kind):
    inner = KINDS[kind]()
    rng = np.random.default_rng(0)
    x = rng.random((16, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 10, 16)
    # the second-order path exists: the penalty has a non-zero gradient w.r.t. every kernel
    probe = training.GradientL1(lambda_w=1.0, lambda_a=1.0, reduction="sum")
    with tf.GradientTape() as tape:
        pen = probe.penalty(inner, x, y, keras.losses.SparseCategoricalCrossentropy(
            from_logits=kind != "sequential"), training=True)["penalty"]
    grads = tape.gradient(pen, probe.kernels)
    assert len(probe.kernels) >= 2
    for k, g in zip(probe.kernels, grads):
        assert g is not None and np.abs(g.numpy()).sum() > 0, k.name

    inner = KINDS[kind]()
    bits = 1 if kind == "larq_bnn" else 4
    model = training.TrainingModel(inner, terms=[
        training.GradientL1(lambda_w=1e-4, lambda_a=1e-4, reduction="sum"),
        training.LearnableMSQE(bits=bits, per_channel=True),
        training.LearnablePartialL2(fraction=0.5)])
    model.compile(keras.optimizers.Adam(1e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=kind != "sequential"),
                  metrics=["accuracy"])
    before = [v.numpy().copy() for v in model.trainable_variables]
    hist = model.fit(x, y, batch_size=8, epochs=2, verbose=0).history
    for key in ("loss", "task_loss", "accuracy", "gradient_l1", "grad_l1_w", "grad_l1_a", "msqe",
                "delta", "partial_l2", "learnable_msqe_exp_alpha",
                "learnable_partial_l2_exp_alpha"):
        assert key in hist, (key, sorted(hist))
        assert np.all(np.isfinite(hist[key])), key
    assert hist["grad_l1_w"][-1] > 0 and hist["grad_l1_a"][-1] > 0
    changed = [not np.allclose(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
    assert all(changed), [v.name for v, c in zip(model.trainable_variables, changed) if not c]
    ev = model.evaluate(x, y, verbose=0, return_dict=True)
    assert set(ev) == {"loss", "accuracy"}


def test_metric_names_single_terms_and_alias():
    model = training.TrainingModel(mlp64(), terms=["msqe"])
    model.compile("sgd", CE)
    logs = model.train_on_batch(*batch64(), return_dict=True)
    assert {"loss", "task_loss", "msqe", "exp_alpha", "delta"} <= set(logs)
    m2 = training.TrainingModel(mlp64(), terms=["partial_l2", "gradient_l1"])
    m2.compile("sgd", CE)
    logs = m2.train_on_batch(*batch64(), return_dict=True)
    assert {"partial_l2", "exp_alpha", "gradient_l1"} <= set(logs)
    # α and δ are model weights, metric accumulators are not
    names = [w.name for w in model.weights]
    assert any(n.endswith("alpha:0") for n in names)
    assert any("log_step" in n for n in names)
    assert not any(n.startswith(("total", "count")) for n in names)


def test_late_start_by_step_and_epoch():
    x, y = batch64(n=8)
    model = training.TrainingModel(mlp64(), terms=[training.GradientL1(1e-2, start_step=2,
                                                                          reduction="mean")])
    model.compile(keras.optimizers.SGD(0.01), CE)
    vals = [model.train_on_batch(x, y, return_dict=True)["gradient_l1"] for _ in range(4)]
    assert vals[0] == 0 and vals[1] == 0 and vals[2] > 0 and vals[3] > 0
    model = training.TrainingModel(mlp64(), terms=[training.GradientL1(1e-2, start_epoch=1,
                                                                          reduction="mean")])
    model.compile(keras.optimizers.SGD(0.01), CE)
    hist = model.fit(x, y, batch_size=4, epochs=3, verbose=0).history
    assert hist["gradient_l1"][0] == 0 and hist["gradient_l1"][1] > 0 and \
        hist["gradient_l1"][2] > 0


def test_metrics_appear_in_tensorboard(tmp_path):
    x, y = batch64(n=8)
    model = training.TrainingModel(mlp64(), terms=[training.GradientL1(1e-3, 1e-3,
                                                                          start_step=1, reduction="sum"),
                                                   training.LearnableMSQE(bits=4)])
    model.compile(keras.optimizers.SGD(0.01), CE)
    model.fit(x, y, epochs=2, verbose=0,
              callbacks=[keras.callbacks.TensorBoard(log_dir=str(tmp_path))])
    tags = set()
    for path in glob.glob(str(tmp_path / "train" / "events.out.tfevents.*")):
        for record in tf.data.TFRecordDataset(path):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(v.tag for v in event.summary.value)
    for key in ("loss", "task_loss", "gradient_l1", "msqe", "exp_alpha", "delta"):
        assert f"epoch_{key}" in tags, (key, sorted(tags))


def test_tfmot_fake_quant_first_order_gradient_unchanged():
    rng = np.random.default_rng(2)
    x = tf.constant(rng.uniform(-1.5, 1.5, size=(50, 3)).astype("float32"))
    lo, hi = tf.constant(-1.0), tf.constant(0.8)
    lo_c, hi_c = tf.constant([-1.0, -0.5, -1.2]), tf.constant([0.8, 1.0, 0.3])
    up = tf.constant(rng.normal(size=(50, 3)).astype("float32"))

    def first_order():
        with tf.GradientTape(persistent=True) as t:
            t.watch([x, lo, hi, lo_c, hi_c])
            a = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=4)
            b = tf.quantization.fake_quant_with_min_max_vars_per_channel(x, lo_c, hi_c)
        return ([g.numpy() for g in t.gradient(a, [x, lo, hi], output_gradients=up)] +
                [g.numpy() for g in t.gradient(b, [x, lo_c, hi_c], output_gradients=up)])

    # reference: TensorFlow's own gradient kernels
    ref = [tf.quantization.fake_quant_with_min_max_vars_gradient(up, x, lo, hi, num_bits=4),
           tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient(up, x, lo_c, hi_c)]
    ref = [r.numpy() for r in ref[0]] + [r.numpy() for r in ref[1]]
    training.register_fake_quant_second_order()
    for got, want in zip(first_order(), ref):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # and now the first-order gradient is differentiable in the upstream gradient
    with tf.GradientTape() as outer:
        outer.watch(up)
        with tf.GradientTape() as inner:
            inner.watch(x)
            a = tf.quantization.fake_quant_with_min_max_vars(x, lo, hi, num_bits=4)
        g = inner.gradient(a, x, output_gradients=up)
        s = tf.reduce_sum(g)
    np.testing.assert_allclose(outer.gradient(s, up).numpy(), ref[0] / np.where(
        up.numpy() == 0, 1, up.numpy()), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# distribution, XLA
# ------------------------------------------------------------------------------------------


def _dist_terms():
    return [training.GradientL1(lambda_w=1e-2, lambda_a=1e-2, reduction="mean"),
            training.LearnableMSQE(bits=4)]


def test_mirrored_strategy_matches_single_device(distribute_scope):
    rng = np.random.default_rng(3)
    x = rng.random((32, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 10, 32)
    single = training.TrainingModel(_functional(), terms=_dist_terms())
    single.compile(keras.optimizers.SGD(0.1),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = single.get_weights()
    with distribute_scope.scope():
        dist = training.TrainingModel(_functional(), terms=_dist_terms())
        dist.compile(keras.optimizers.SGD(0.1),
                     keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    dist.set_weights(weights)
    assert dist.distribute_strategy.num_replicas_in_sync == 2
    h1 = single.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    h2 = dist.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0).history
    for a, b in zip(single.get_weights(), dist.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for key in ("loss", "task_loss", "gradient_l1", "grad_l1_w", "grad_l1_a", "msqe"):
        np.testing.assert_allclose(h1[key], h2[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert h1["grad_l1_a"][-1] > 0


def test_xla_jit_compile_matches_default():
    rng = np.random.default_rng(4)
    x = rng.random((16, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 10, 16)
    results = []
    for jit in (False, True):
        model = training.TrainingModel(_functional(), terms=_dist_terms())
        if results:
            model.set_weights(results[0][0])
        init = model.get_weights()
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit)
        hist = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0).history
        results.append((init, model.get_weights(), hist))
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert results[1][2]["gradient_l1"][0] > 0


# ------------------------------------------------------------------------------------------
# save / load, config
# ------------------------------------------------------------------------------------------


def _trained_model():
    rng = np.random.default_rng(5)
    x = rng.random((16, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, 16)
    terms = [training.GradientL1(1e-4, 1e-5, layers=["conv2", "fc"], reduction="sum"),
             training.LearnableMSQE(bits=3, per_channel=True, alpha_init=0.5),
             training.LearnablePartialL2(fraction=0.7)]
    model = training.TrainingModel(models.tiny_cnn(), terms=terms)
    model.compile(keras.optimizers.Adam(0.05), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model, x


def _learned(model):
    return {w.name: w.numpy() for w in model.weights if "alpha" in w.name or "log_step" in w.name}


@pytest.mark.parametrize("fmt", ["keras", "tf"])
def test_save_load_restores_alpha_and_delta(tmp_path, fmt):
    model, x = _trained_model()
    learned = _learned(model)
    assert len(learned) == 5 and all(abs(v).sum() > 0 for v in learned.values())
    assert not np.isclose(learned["learnable_msqe_alpha:0"], 0.5)
    path = str(tmp_path / ("m.keras" if fmt == "keras" else "saved"))
    model.save(path, save_format=None if fmt == "keras" else "tf")
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, training.TrainingModel)
    got = _learned(loaded)
    assert got.keys() == learned.keys()
    for k in learned:
        np.testing.assert_allclose(got[k], learned[k], rtol=0, atol=0)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-6)
    assert [type(t).__name__ for t in loaded.terms] == [
        "GradientL1", "LearnableMSQE", "LearnablePartialL2"]
    assert loaded.terms[0].layer_names == ["conv2", "fc"]
    # training resumes with the restored state
    loaded.fit(x, np.zeros(len(x)), epochs=1, verbose=0)


def test_h5_weights_and_inner_model_formats(tmp_path):
    model, x = _trained_model()
    learned = _learned(model)
    model.save_weights(str(tmp_path / "w.h5"))
    fresh = training.TrainingModel(models.tiny_cnn(), terms=[
        training.GradientL1(1e-4, 1e-5, layers=["conv2", "fc"], reduction="sum"),
        training.LearnableMSQE(bits=3, per_channel=True, alpha_init=0.5),
        training.LearnablePartialL2(fraction=0.7)])
    fresh.load_weights(str(tmp_path / "w.h5"))
    got = _learned(fresh)  # Keras numbers the new terms' names (learnable_msqe_1...): by order
    assert len(got) == len(learned) == 5
    for a, b in zip(got.values(), learned.values()):
        np.testing.assert_array_equal(a, b)
    ref = model.inner.predict(x, verbose=0)
    for name in ("inner.h5", "inner.keras"):
        model.inner.save(str(tmp_path / name))
        np.testing.assert_allclose(
            keras.models.load_model(str(tmp_path / name)).predict(x, verbose=0), ref, rtol=1e-6)


def test_term_configs_round_trip():
    for term in (training.GradientL1(2e-4, 1e-5, layers=["a"], activations=["b"],
                                     start_step=3, start_epoch=1, reduction="mean"),
                 training.LearnableMSQE(bits=2, per_channel=True, beta=0.3, alpha_init=0.1,
                                        alpha_max=4.0, narrow_range=True, layers=["x"],
                                        learn_step=False),
                 training.LearnablePartialL2(fraction=0.3, beta=2.0, alpha_init=-1.0)):
        clone = training.get(training.serialize(term))
        assert type(clone) is type(term)
        assert clone.get_config() == term.get_config()
    for alias, cls in (("gradient_l1", training.GradientL1), ("msqe", training.LearnableMSQE),
                       ("partial_l2", training.LearnablePartialL2)):
        assert type(training.get(alias)) is cls
    with pytest.raises(ValueError, match="terms"):
        training.get("nope")


# ------------------------------------------------------------------------------------------
# bad configuration
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factory, match", [
    (lambda: training.GradientL1(lambda_w=-1.0, reduction="sum"), "lambda_w"),
    (lambda: training.GradientL1(lambda_a=-1e-3, reduction="sum"), "lambda_a"),
    (lambda: training.GradientL1(reduction="max"), "reduction"),
    (lambda: training.GradientL1(start_step=-1, reduction="sum"), "start_step"),
    (lambda: training.LearnableMSQE(beta=0.0), "beta"),
    (lambda: training.LearnableMSQE(beta=-1.0), "beta"),
    (lambda: training.LearnableMSQE(bits=0), "bits"),
    (lambda: training.LearnableMSQE(bits=17), "bits"),
    (lambda: training.LearnableMSQE(alpha_init=5.0, alpha_max=1.0), "alpha_init"),
    (lambda: training.LearnablePartialL2(fraction=1.0), "fraction"),
    (lambda: training.LearnablePartialL2(beta=-2), "beta"),
])
def test_bad_configuration_raises(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_layer_names_and_types():
    with pytest.raises(ValueError, match="'nope'.*not found"):
        training.TrainingModel(models.tiny_cnn(), terms=[training.GradientL1(layers=["nope"], reduction="sum")])
    with pytest.raises(ValueError, match="'gap' has no trainable kernel"):
        training.TrainingModel(models.tiny_cnn(), terms=[training.LearnableMSQE(layers=["gap"])])
    with pytest.raises(ValueError, match="activations"):
        training.TrainingModel(models.tiny_cnn(), terms=[
            training.GradientL1(lambda_a=1e-4, activations=["missing"], reduction="sum")])
    with pytest.raises(TypeError, match="bits"):
        training.LearnableMSQE(bits=2.5)
    with pytest.raises(TypeError, match="inner"):
        training.TrainingModel("not a model")
    with pytest.raises(ValueError, match="at most one GradientL1"):
        training.TrainingModel(models.tiny_cnn(), terms=["gradient_l1", "gradient_l1"])


def test_large_lambda_warns_unless_late_start():
    with pytest.warns(UserWarning, match="collapse"):
        training.GradientL1(lambda_w=1e-2, lambda_a=0.0, reduction="sum")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        training.GradientL1(lambda_w=1e-2, start_step=1000, lambda_a=0.0, reduction="sum")
        training.GradientL1(lambda_w=1e-4, lambda_a=0.0, reduction="sum")


# ------------------------------------------------------------------------------------------
# real data
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_fashion_mnist_msqe_falls_alpha_rises_and_rounding_is_harmless(fashion_small):
    (x, y), (xt, yt) = fashion_small
    inner = models.small_cnn()
    pre = training.TrainingModel(inner, terms=[])
    pre.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
    pre.fit(x, y, batch_size=64, epochs=1, verbose=0)  # 94 steps to a trained float model
    # R of a trained small_cnn is ~1e-5, so e^α must be ~1e5+ to pull the weights onto the grid;
    # β is large enough that e^α·R < β from the start (α rises)
    term = training.LearnableMSQE(bits=4, per_channel=True, beta=1000.0, alpha_init=15.0,
                                  alpha_max=20.0)
    model = training.TrainingModel(inner, terms=[term])
    # a small lr: Adam moves every weight by ~lr per step, which sets how close to the grid
    # the weights can settle (fc1's step δ is ~7e-3)
    model.compile(keras.optimizers.Adam(3e-4), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    hist = model.fit(x, y, batch_size=64, epochs=2, verbose=0).history  # 188 steps
    print("msqe", hist["msqe"], "exp_alpha", hist["exp_alpha"])
    model.optimizer.learning_rate.assign(3e-5)  # settle: less jitter around the grid points
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert hist["msqe"][-1] < 0.1 * hist["msqe"][0], hist["msqe"]
    assert hist["exp_alpha"][-1] > hist["exp_alpha"][0], hist["exp_alpha"]
    acc = model.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
    training.round_to_grid(model)
    acc_q = model.evaluate(xt, yt, verbose=0, return_dict=True)["accuracy"]
    assert acc > 0.7, acc
    print("accuracy before / after round_to_grid", acc, acc_q)
    assert abs(acc - acc_q) <= 0.002 + 1e-9, (acc, acc_q)


def test_wrong_argument_types_name_the_argument(subclassed_model):
    with pytest.raises(TypeError, match="`layers` must be a list of layer names"):
        training.GradientL1(layers=5, reduction="sum")
    model = training.TrainingModel(models.tiny_cnn(), terms="gradient_l1")
    assert [type(t).__name__ for t in model.terms] == ["GradientL1"]

    with pytest.raises(ValueError, match="not built"):
        training.TrainingModel(subclassed_model(), terms=[training.LearnableMSQE()])
