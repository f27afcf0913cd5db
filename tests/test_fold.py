"""The BatchNorm fold (tfqreg.fold) and the stations that use it: PTQ, the regularizers.

Oracles: a NumPy fold + quantize written here from the formulas, the TFLite converter's own
folded kernels, and LiteRT's int8 accuracy."""

import numpy as np
import pytest

import tfqreg
from tfqreg import fold, models, ptq, regularizers
from tfqreg._keras import keras, tf


# ----------------------------------------------------------------------------- NumPy oracles
def np_scale(bn):
    gamma = bn.gamma.numpy() if bn.gamma is not None else 1.0
    return gamma / np.sqrt(bn.moving_variance.numpy().astype(np.float64) + bn.epsilon)


def np_fold(layer, bn):
    """(w', b') from the formulas of methods.md, in float64."""
    s = np_scale(bn)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        w = layer.depthwise_kernel.numpy().astype(np.float64)
        w = w * s.reshape(w.shape[-2], w.shape[-1])
    else:
        w = layer.kernel.numpy().astype(np.float64) * s
    b = layer.bias.numpy() if layer.use_bias else 0.0
    beta = bn.beta.numpy() if bn.beta is not None else 0.0
    return w, (b - bn.moving_mean.numpy()) * s + beta


def np_grid(w, bits, axes):
    if axes is None:
        m = np.abs(w).max()
    else:
        keep = {a % w.ndim for a in axes}
        m = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a not in keep), keepdims=True)
    step = m / (2 ** (bits - 1) - 1)
    return step * np.clip(np.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def bn_model(use_bias=False, center=True, scale=True):
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(8, 3, use_bias=use_bias, name="conv")(inp)
    h = keras.layers.BatchNormalization(center=center, scale=scale, name="bn1")(h)
    h = keras.layers.ReLU(6.0, name="relu1")(h)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=use_bias, name="dw")(h)
    h = keras.layers.BatchNormalization(center=center, scale=scale, name="bn2")(h)
    h = keras.layers.ReLU(name="relu2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(12, use_bias=use_bias, name="fc")(h)
    h = keras.layers.BatchNormalization(center=center, scale=scale, name="bn3")(h)
    h = keras.layers.Activation("relu", name="relu3")(h)
    out = keras.layers.Dense(5, activation="softmax", name="out")(h)
    return keras.Model(inp, out)


def randomize_bn(model, seed=0):
    """BatchNorm statistics far from their initial values, channels very different in scale."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            values = {"gamma": rng.uniform(0.2, 3.0, n), "beta": rng.normal(0, 1, n),
                      "moving_mean": rng.normal(0, 1, n),
                      "moving_variance": rng.uniform(0.05, 5.0, n) ** 2}
            layer.set_weights([values[w.name.split("/")[-1].split(":")[0]].astype(np.float32)
                               for w in layer.weights])
    return model


# ----------------------------------------------------------------------------- the fold
@pytest.mark.parametrize("use_bias,center,scale", [(False, True, True), (True, True, True),
                                                   (False, False, False), (True, False, True)])
def test_fold_model_matches_numpy_and_the_original(use_bias, center, scale):
    model = randomize_bn(bn_model(use_bias, center, scale))
    plan = fold.find_folds(model)
    assert plan.folds == [("conv", "bn1"), ("dw", "bn2"), ("fc", "bn3")] and not plan.unfolded
    folded = fold.fold_model(model)
    assert [l.name for l in folded.layers if "folded" in l.name] == [
        "bn1_folded", "bn2_folded", "bn3_folded"]
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    for name, bn in (("conv", "bn1"), ("dw", "bn2"), ("fc", "bn3")):
        w, b = np_fold(model.get_layer(name), model.get_layer(bn))
        new = folded.get_layer(name)
        k = new.depthwise_kernel if name == "dw" else new.kernel
        np.testing.assert_allclose(k.numpy(), w, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(new.bias.numpy(), np.broadcast_to(b, new.bias.shape),
                                   rtol=1e-5, atol=1e-6)
    x = np.random.default_rng(1).random((8, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), atol=2e-5)
    # the input model is untouched
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers) == 3


def test_folded_kernel_equals_the_converters():
    """The kernels in a float .tflite are the converter's fold: ours equal them bit for bit."""
    model = randomize_bn(bn_model())
    flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=flat)
    interp.allocate_tensors()
    consts = []
    for d in interp.get_tensor_details():
        try:
            consts.append(interp.get_tensor(d["index"]))
        except ValueError:
            continue
    layouts = {"conv": lambda k: np.transpose(k, (3, 0, 1, 2)),      # OHWI
               "dw": lambda k: k.reshape(1, k.shape[0], k.shape[1], -1),  # 1HW(C·M)
               "fc": lambda k: k.T}                                   # (out, in)
    for name in layouts:
        ours = layouts[name](fold.folded_kernel(model.get_layer(name)).numpy())
        matches = [c for c in consts if c.shape == ours.shape and c.dtype == np.float32]
        assert any(np.array_equal(c, ours) for c in matches), name


def test_what_does_not_fold_and_why():
    inp = keras.Input((10, 10, 2))
    a = keras.layers.Conv2D(4, 3, activation="relu", name="conv_relu")(inp)
    a = keras.layers.BatchNormalization(name="bn_after_relu")(a)
    b = keras.layers.Conv2D(4, 3, name="conv_shared_out")(inp)
    b1 = keras.layers.BatchNormalization(name="bn_shared")(b)
    b2 = keras.layers.Activation("relu", name="other_consumer")(b)
    c = keras.layers.Conv2D(4, 3, name="conv_axis")(inp)
    c = keras.layers.BatchNormalization(axis=1, name="bn_axis1")(c)
    d = keras.layers.BatchNormalization(name="bn_input")(inp)
    d = keras.layers.Conv2D(4, 3, name="conv_after_bn")(d)
    out = keras.layers.Concatenate()([a, b1, b2, c, d])
    model = keras.Model(inp, out)
    plan = fold.find_folds(model)
    assert plan.folds == []
    reasons = dict(plan.unfolded)
    assert set(reasons) == {"bn_after_relu", "bn_shared", "bn_axis1", "bn_input"}
    assert "activation 'relu'" in reasons["bn_after_relu"]
    assert "also feeds other layers" in reasons["bn_shared"]
    assert "axis [1]" in reasons["bn_axis1"]
    assert "InputLayer" in reasons["bn_input"]
    assert "stays a float multiply-add" in str(plan)
    for name in ("conv_relu", "conv_shared_out", "conv_axis"):
        assert fold.following_batchnorm(model.get_layer(name)) is None
    folded = fold.fold_model(model)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers) == 4


def test_nested_models_fold_inside():
    inner = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, name="c"),
                              keras.layers.BatchNormalization(name="b")], name="inner")
    randomize_bn(inner)
    outer = keras.Sequential([keras.Input((8, 8, 1)), inner, keras.layers.Flatten(),
                              keras.layers.Dense(3)])
    folded = fold.fold_model(outer)
    assert [l.name for l in folded.get_layer("inner").layers] == ["c", "b_folded"]
    x = np.random.default_rng(0).random((4, 8, 8, 1)).astype(np.float32)
    np.testing.assert_allclose(folded(x).numpy(), outer(x).numpy(), atol=1e-5)


def test_fold_model_rejects_subclassed():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        fold.fold_model(Sub())


# ----------------------------------------------------------------------------- PTQ
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_ptq_quantizes_the_folded_kernel(bits, per_channel):
    model = randomize_bn(bn_model(), seed=3)
    q = ptq.quantize(model, bits, per_channel=per_channel)
    for name, bn, axes in (("conv", "bn1", (-1,)), ("dw", "bn2", (2, 3)), ("fc", "bn3", (-1,))):
        w, _ = np_fold(model.get_layer(name), model.get_layer(bn))
        expected = np_grid(w, bits, axes if per_channel else None)
        layer = q.get_layer(name)
        got = (layer.depthwise_kernel if name == "dw" else layer.kernel).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # and the model computes the folded network with those kernels (no BatchNorm left)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in q.layers)


def test_per_tensor_on_raw_kernels_is_not_what_the_device_runs():
    """Per channel, folding commutes with quantizing; per tensor it does not (methods.md)."""
    model = randomize_bn(bn_model(), seed=4)
    rng = np.random.default_rng(4)
    for name in ("conv", "dw", "fc", "out"):  # kernels drawn here: independent of TF's seeds
        layer = model.get_layer(name)
        var = layer.depthwise_kernel if name == "dw" else layer.kernel
        var.assign(rng.normal(0, 0.3, var.shape).astype(np.float32))
    x = np.random.default_rng(0).random((32, 12, 12, 3)).astype(np.float32)
    folded = fold.fold_model(model)
    for per_channel in (True, False):
        device = ptq.quantize(model, 4, per_channel=per_channel)(x).numpy()
        raw = keras.models.clone_model(model)
        raw.set_weights(model.get_weights())
        for name in ("conv", "dw", "fc", "out"):  # the old way: quantize w, BN stays float
            layer = raw.get_layer(name)
            var = layer.depthwise_kernel if name == "dw" else layer.kernel
            axes = (2, 3) if name == "dw" else (-1,)
            var.assign(np_grid(var.numpy(), 4, axes if per_channel else None))
        diff = np.abs(device - raw(x).numpy()).max()
        if per_channel:
            assert diff < 1e-4
        else:
            assert diff > 1e-2
    assert np.abs(folded(x).numpy() - model(x).numpy()).max() < 1e-5


def test_activation_quantizers_sit_after_the_fused_op():
    model = randomize_bn(bn_model())
    calib = np.random.default_rng(0).random((64, 12, 12, 3)).astype(np.float32)
    q = ptq.quantize(model, 8, activation_bits=4, calibration_data=calib)
    wrapped = {l.layer.name: l for l in q.layers if isinstance(l, ptq.ActivationFakeQuant)}
    # conv+bn1+relu1 is one op: quantized after the ReLU6, never between conv and its BN
    assert set(wrapped) == {"conv", "relu1", "relu2", "gap", "relu3", "out"}
    assert wrapped["conv"].quantize_input and not wrapped["conv"].quantize_output
    assert wrapped["out"].activation is not None  # logits, then softmax, each quantized
    probe = keras.Model(q.inputs, [q.get_layer("afq_relu1").output,
                                   q.get_layer("afq_conv").output])
    after_relu, conv_out = probe.predict(calib[:8], verbose=0)
    assert len(np.unique(after_relu)) <= 16           # on the 4-bit grid
    assert len(np.unique(conv_out)) > 16              # the conv output is not quantized
    w = wrapped["relu1"]
    lo, hi = float(w.output_min.numpy()), float(w.output_max.numpy())
    assert lo == 0.0 and 0 < hi <= 6.0                # calibrated on the ReLU6 output


def test_sweep_reports_the_fold_plan():
    model = randomize_bn(bn_model())
    x = np.random.default_rng(0).random((40, 12, 12, 3)).astype(np.float32)
    y = np.random.default_rng(1).integers(0, 5, 40)
    result = ptq.sweep(model, (x, y), weight_bits=(8,), progress=False)
    assert result.folding["folds"] == [["conv", "bn1"], ["dw", "bn2"], ["fc", "bn3"]]
    assert "BatchNorm: 3 folded" in str(result)
    assert result.rows[0].accuracy == pytest.approx(
        np.mean(model.predict(x, verbose=0).argmax(-1) == y))


def test_separable_conv_is_refused():
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.SeparableConv2D(4, 3),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="DepthwiseConv2D \\+ Conv2D"):
        ptq.quantize(model, 4)


def test_transposed_conv_is_quantized():
    model = keras.Sequential([keras.Input((4, 4, 2)),
                              keras.layers.Conv2DTranspose(3, 3, name="up"),
                              keras.layers.Flatten(), keras.layers.Dense(2)])
    q = ptq.quantize(model, 3)
    k = q.get_layer("up").kernel.numpy()
    np.testing.assert_allclose(k, np_grid(model.get_layer("up").kernel.numpy(), 3, (-2,)),
                               rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- regularizers
def _conv_bn(regularizer, relu_first=False):
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, use_bias=False, kernel_regularizer=regularizer,
                            activation="relu" if relu_first else None, name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inp, h)
    return randomize_bn(model, seed=5)


@pytest.mark.parametrize("make,penalty", [
    (lambda: regularizers.LInf(0.5, normalize="none"), lambda w: 0.5 * np.abs(w).max()),
    (lambda: regularizers.MSQE(2.0, bits=3),
     lambda w: 2.0 * np.mean((w - np_grid(w, 3, None)) ** 2)),
])
def test_regularizer_penalises_the_folded_kernel(make, penalty):
    model = _conv_bn(make())
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    w_folded, _ = np_fold(conv, bn)
    assert float(model.losses[0]) == pytest.approx(penalty(w_folded), rel=1e-5)
    # the gradient reaches the kernel and the BatchNorm's gamma, not its statistics
    with tf.GradientTape() as tape:
        loss = tf.add_n(model.losses)
    g_w, g_gamma, g_var = tape.gradient(loss, [conv.kernel, bn.gamma, bn.moving_variance])
    assert g_w is not None and g_gamma is not None and g_var is None
    assert float(tf.reduce_sum(tf.abs(g_gamma))) > 0


def test_regularizer_fold_finite_difference_in_gamma():
    model = _conv_bn(regularizers.Margin(0.3, normalize="none"))
    bn = model.get_layer("bn")
    with tf.GradientTape() as tape:
        loss = tf.add_n(model.losses)
    g = tape.gradient(loss, bn.gamma).numpy()
    gamma = bn.gamma.numpy()
    eps, i = 1e-3, int(np.argmax(np.abs(g)))
    values = []
    for sign in (1, -1):
        bumped = gamma.copy()
        bumped[i] += sign * eps
        bn.gamma.assign(bumped)
        values.append(float(tf.add_n(model.losses)))
    bn.gamma.assign(gamma)
    assert (values[0] - values[1]) / (2 * eps) == pytest.approx(g[i], rel=1e-2)


def test_regularizer_raw_kernel_where_nothing_folds_or_when_asked():
    raw = _conv_bn(regularizers.LInf(0.5, normalize="none"), relu_first=True)   # ReLU before BN: no fold
    w = raw.get_layer("conv").kernel.numpy()
    assert float(raw.losses[0]) == pytest.approx(0.5 * np.abs(w).max(), rel=1e-6)
    off = _conv_bn(regularizers.LInf(0.5, fold_batchnorm=False, normalize="none"))
    w = off.get_layer("conv").kernel.numpy()
    assert float(off.losses[0]) == pytest.approx(0.5 * np.abs(w).max(), rel=1e-6)
    assert regularizers.LInf(0.5, fold_batchnorm=False).get_config()["fold_batchnorm"] is False
    with pytest.raises(TypeError, match="fold_batchnorm"):
        regularizers.SoftMinMax(fold_batchnorm="yes")


def test_folded_regularizer_round_trips(tmp_path):
    model = _conv_bn(regularizers.SoftMinMax(0.1))
    expected = float(model.losses[0])
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("conv").kernel_regularizer.fold_batchnorm is True
    assert float(loaded.losses[0]) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- the real runtime
def _file_activation_scales(flat) -> np.ndarray:
    """The distinct scales of the file's int8 activation tensors (non-constant, one scale)."""
    from tfqreg.deploy.tflite_file import read_tflite

    return np.unique(np.float32([t.scale[0] for t in read_tflite(flat).tensors
                                 if not t.constant and t.dtype == "int8" and len(t.scale) == 1]))


def _simulated_activation_scales(q) -> np.ndarray:
    """The distinct 8-bit scales ``(max − min) / 255`` of a PTQ model's calibrated ranges."""
    out = []
    for w in q.layers:
        if not isinstance(w, ptq.ActivationFakeQuant):
            continue
        pairs = [(w.input_min, w.input_max)] if w.quantize_input else []
        if w.activation is not None:
            pairs.append((w.preactivation_min, w.preactivation_max))
        if w.quantize_output:
            pairs.append((w.output_min, w.output_max))
        out += [(float(hi) - float(lo)) / 255.0 for lo, hi in pairs]
    return np.unique(np.float32(out))


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_activation_ranges_are_computed_as_the_files_converter_computes_them(weight_bits):
    """The TF converter calibrates the float model, then quantizes it (int8 file); the INT4
    file is calibrated by ai-edge-quantizer on a float file whose kernels are already on the
    grid. ptq.quantize gives each file's activation scales, and the other rule would not."""
    from tfqreg import export

    model = randomize_bn(bn_model())
    x = np.random.default_rng(3).random((64, 12, 12, 3)).astype(np.float32)
    lowbit = {} if weight_bits == 8 else {"weight_bits": 4}
    res = export.to_tflite(model, mode="int8", representative_data=x, check=False, **lowbit)
    want = _file_activation_scales(res.flatbuffer)
    assert len(want) >= 6  # input, three fused ops, the pooled mean, logits, softmax (1/256)
    q = ptq.quantize(model, weight_bits, activation_bits=8, calibration_data=x)
    np.testing.assert_allclose(_simulated_activation_scales(q), want, rtol=2e-6)
    # the other rule: kernels on the 8-bit grid while calibrating / float kernels at W4
    other = (ptq.quantize(ptq.quantize(model, 8), 8, activation_bits=8, calibration_data=x)
             if weight_bits == 8 else
             ptq.quantize(model, 8, activation_bits=8, calibration_data=x))
    got = _simulated_activation_scales(other)
    assert len(got) != len(want) or np.abs(got / want - 1).max() > 1e-4


@pytest.fixture(scope="module")
def trained_bn(data_dir, tfds_dir):
    """A small BatchNorm model, 1 epoch on all 60,000 images (938 steps: the moving statistics
    settle; a few hundred steps leave them far from the batch statistics). Seeded with
    ``keras.utils.set_random_seed``: tf_keras draws its initializers' seeds from Python's
    ``random``, which ``tf.random.set_seed`` alone does not reset (the model would depend on
    the tests that ran before)."""
    (x, y), _ = tfqreg.datasets.load_numpy("fashion_mnist", data_dir, tfds_dir)
    keras.utils.set_random_seed(0)
    model = models.ds_cnn(filters=(16, 32, 64, 64))
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    return model


@pytest.mark.slow
def test_w8a8_ptq_computes_what_litert_int8_computes_on_a_batchnorm_model(trained_bn,
                                                                          fashion_small):
    from tfqreg import export

    (x, _), (xt, yt) = fashion_small
    res = export.to_tflite(trained_bn, mode="int8", representative_data=x[:500], check=False)
    lite = res.predict(xt)
    q = ptq.quantize(trained_bn, 8, activation_bits=8, calibration_data=x[:500])
    sim = q.predict(xt, verbose=0)
    np.testing.assert_allclose(_simulated_activation_scales(q),
                               _file_activation_scales(res.flatbuffer), rtol=2e-6)
    # per image: both outputs lie on the int8 softmax grid (1/256); most are identical, the
    # others a few steps apart (int32 accumulation and fixed-point rescaling differ from float)
    diff = np.abs(sim - lite).max(-1)
    agree = np.mean(sim.argmax(-1) == lite.argmax(-1))
    result = ptq.sweep(trained_bn, (xt, yt), weight_bits=(8,), activation_bits=8,
                       calibration_data=x[:500], progress=False)
    lite_acc = float(np.mean(lite.argmax(-1) == yt))
    print(f"\nBN model: fp32 {result.float_accuracy:.4f} PTQ W8A8 {result.accuracy(8, 8):.4f} "
          f"LiteRT int8 {lite_acc:.4f}; identical outputs {np.mean(diff == 0):.3f}, "
          f"top-1 agreement {agree:.4f}, mean max|diff| {diff.mean():.4f}")
    assert len(result.folding["folds"]) == 7
    assert result.float_accuracy > 0.6  # trained
    assert result.accuracy(8, 8) == pytest.approx(float(np.mean(sim.argmax(-1) == yt)))
    assert np.mean(diff == 0) >= 0.6 and diff.mean() <= 0.005 and agree >= 0.99
    assert abs(result.accuracy(8, 8) - lite_acc) <= 0.003


# ----------------------------------------------------------------------------- QAT
def test_qat_quantizes_after_the_fused_op_not_between_conv_and_batchnorm():
    from tfqreg import quantization

    model = randomize_bn(bn_model())
    qat = quantization.quantize_model(model, weight_bits=4, activation_bits=8)
    wrapped = {l.layer.name: l for l in qat.layers if hasattr(l, "quantize_config")}
    for name in ("conv", "dw", "fc"):  # weights quantized, output not (a BatchNorm follows)
        config = wrapped[name].quantize_config
        assert config.weight_bits == 4 and config.activation_bits is None
        assert config.get_activations_and_quantizers(wrapped[name].layer) == []
    for bn in ("bn1", "bn2", "bn3"):  # followed by ReLU: float, not wrapped
        assert bn not in wrapped
        assert isinstance(qat.get_layer(bn), keras.layers.BatchNormalization)
    for relu in ("relu1", "relu2", "relu3"):
        assert wrapped[relu].quantize_config.get_output_quantizers(wrapped[relu].layer)
    # without BatchNorm the layer's own output is quantized, as before
    plain = quantization.quantize_model(models.tiny_cnn(), weight_bits=4, activation_bits=8)
    config = plain.get_layer("quant_conv1").quantize_config
    assert config.activation_bits == 8
    x = np.random.default_rng(0).random((4, 12, 12, 3)).astype(np.float32)
    assert np.isfinite(qat(x).numpy()).all()


# ----------------------------------------------------------------------------- training terms
def _trainable_bn_model():
    inp = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.ReLU(name="relu")(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(3, activation="softmax", name="fc")(h)
    return randomize_bn(keras.Model(inp, out), seed=7)


def test_gradient_l1_uses_the_gradient_wrt_the_folded_kernel():
    from tfqreg import training

    model = _trainable_bn_model()
    rng = np.random.default_rng(0)
    x = rng.random((8, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, 3, 8)
    loss = keras.losses.SparseCategoricalCrossentropy()
    term = training.GradientL1(lambda_w=1.0, reduction="sum")
    got = float(term.penalty(model, x, y, loss)["norm_w"])
    conv, fc = model.get_layer("conv"), model.get_layer("fc")
    with tf.GradientTape() as tape:
        task = loss(y, model(x))
    g_conv, g_fc = tape.gradient(task, [conv.kernel, fc.kernel])
    expected = np.abs(g_conv.numpy() / np_scale(model.get_layer("bn"))).sum() + \
        np.abs(g_fc.numpy()).sum()
    assert got == pytest.approx(expected, rel=1e-5)


def test_learnable_msqe_and_round_to_grid_act_on_the_folded_kernel():
    from tfqreg import training

    model = _trainable_bn_model()
    term = training.LearnableMSQE(bits=3, learn_step=False)
    training.TrainingModel(model, [term])
    r, _ = term.regularizer_value()
    w_conv, _ = np_fold(model.get_layer("conv"), model.get_layer("bn"))
    w_fc = model.get_layer("fc").kernel.numpy().astype(np.float64)
    expected = sum(np.mean((w - np_grid(w, 3, None)) ** 2) for w in (w_conv, w_fc))
    assert float(r) == pytest.approx(expected, rel=1e-4)
    training.round_to_grid(model, bits=3)
    folded = fold.fold_model(model).get_layer("conv").kernel.numpy()
    step = np.abs(folded).max() / 3
    np.testing.assert_allclose(folded / step, np.round(folded / step), atol=1e-4)
    assert len(np.unique(np.round(folded / step))) <= 8


# ----------------------------------------------------------------------------- compression
@pytest.mark.slow
def test_compression_codes_the_folded_kernels(fashion_small):
    from tfqreg import compression
    from tfqreg.compression.fileformat import coded_kernels, decode_model

    (x, y), (xt, yt) = fashion_small
    keras.utils.set_random_seed(0)
    model = models.ds_cnn(filters=(8, 16))
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x[:3000], y[:3000], batch_size=64, epochs=1, verbose=0)
    comp = compression.Compressor(fraction=0.5, bits=4, prune_epochs=1, quant_epochs=1,
                                  batch_size=64, steps_per_epoch=10, verbose=0)
    res = comp.run(model, (x, y), (xt[:300], yt[:300]))
    assert res.report.settings["batchnorm_folded"] == [["stem", "bn_stem"], ["dw1", "bn_dw1"],
                                                       ["pw1", "bn_pw1"]]
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in res.model.layers)
    kernels = coded_kernels(res.model)
    assert {"stem/kernel", "dw1/depthwise_kernel", "pw1/kernel", "fc/kernel"} <= set(kernels)
    for key, (_, var, _) in kernels.items():  # the folded kernels are exactly δ·index
        w, step = var.numpy(), res.steps[key]
        idx = np.round(w / step)
        assert np.array_equal((idx * step).astype(np.float32), w), key
        assert np.abs(idx).max() <= 8
    decoded = decode_model(res.compressed.to_bytes())
    np.testing.assert_array_equal(decoded.predict(xt[:50], verbose=0),
                                  res.model.predict(xt[:50], verbose=0))
