"""TFMOT n-bit quantizers, QuantizeConfigs, quantize_model and int8 TFLite conversion."""

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot

import tfqreg
from tfqreg import models, quantization
from tfqreg._keras import keras, tf
from tfqreg.quantization import (ActivationQuantizer, Conv2DQuantizeConfig, DenseQuantizeConfig,
                                 DepthwiseConv2DQuantizeConfig, WeightQuantizer)


# ----------------------------------------------------------------------------- NumPy oracles
def np_weight_grid(w, bits, axes=None):
    """Symmetric grid in NumPy: δ = max|w|/(2^(b-1)-1) per channel (axes kept) or per tensor."""
    w = np.asarray(w, np.float64)
    if axes is None:
        m = np.abs(w).max()
    else:
        keep = {a % w.ndim for a in axes}
        red = tuple(a for a in range(w.ndim) if a not in keep)
        m = np.abs(w).max(axis=red, keepdims=True)
    step = np.maximum(m / (2 ** (bits - 1) - 1), 1e-30)
    q_max = 2 ** (bits - 1) - 1
    return step * np.clip(np.round(w / step), -q_max - 1, q_max), step


def np_fake_quant_activation(x, lo, hi, bits):
    """TFLite's nudged asymmetric fake quantization (tf.quantization.fake_quant_* semantics)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = 0, 2 ** bits - 1
    scale = (hi - lo) / (qmax - qmin)
    zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    nlo, nhi = (qmin - zp) * scale, (qmax - zp) * scale
    x = np.clip(np.asarray(x, np.float64), nlo, nhi)
    return np.round((x - nlo) / scale) * scale + nlo


class _Holder(keras.layers.Layer):
    """A bare layer that owns quantizer variables (as a QuantizeWrapper would)."""


# ----------------------------------------------------------------------------- quantizers
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_quantizer_matches_numpy_grid(bits, per_channel):
    w = np.random.default_rng(bits).normal(size=(3, 3, 4, 6)).astype(np.float32)
    w[..., 2] *= 10.0  # one channel with a much larger range
    q = WeightQuantizer(bits, per_channel=per_channel)
    out = q(tf.constant(w), training=True, weights=q.build(w.shape, "k", _Holder())).numpy()
    ref, _ = np_weight_grid(w, bits, (-1,) if per_channel else None)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-7)
    for c in range(6):
        assert len(np.unique(out[..., c])) <= 2 ** bits
    if bits == 2 and per_channel:  # per tensor, the small channels would collapse to zero
        assert len(np.unique(out[..., 0])) > 1


def test_weight_quantizer_depthwise_axes_and_ste_gradient():
    w = tf.constant(np.random.default_rng(0).normal(size=(3, 3, 4, 2)), tf.float32)
    q = WeightQuantizer(3, per_channel=True, channel_axes=(2, 3))
    with tf.GradientTape() as tape:
        tape.watch(w)
        out = q(w, True, {})
        loss = tf.reduce_sum(2.0 * out)
    ref, _ = np_weight_grid(w.numpy(), 3, (2, 3))
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6, atol=1e-7)
    # straight-through: the default step covers every weight, so d out / d w = 1 everywhere
    np.testing.assert_allclose(tape.gradient(loss, w).numpy(), 2.0 * np.ones((3, 3, 4, 2)))


def test_activation_quantizer_calibrates_then_moves_and_matches_numpy():
    holder = _Holder()
    q = ActivationQuantizer(bits=4, ema_decay=0.9)
    weights = q.build(None, "act", holder)
    x1 = np.random.default_rng(1).uniform(-0.5, 3.0, (8, 5)).astype(np.float32)
    x2 = np.random.default_rng(2).uniform(-2.0, 1.0, (8, 5)).astype(np.float32)
    out1 = q(tf.constant(x1), True, weights).numpy()
    # first training batch: the range is that batch's range
    assert weights["min_var"].numpy() == pytest.approx(x1.min())
    assert weights["max_var"].numpy() == pytest.approx(x1.max())
    np.testing.assert_allclose(out1, np_fake_quant_activation(x1, x1.min(), x1.max(), 4),
                               atol=1e-5)
    q(tf.constant(x2), True, weights)
    lo = 0.9 * x1.min() + 0.1 * x2.min()  # x2.min() < 0
    hi = 0.9 * x1.max() + 0.1 * max(x2.max(), 0.0)
    assert weights["min_var"].numpy() == pytest.approx(lo, rel=1e-5)
    assert weights["max_var"].numpy() == pytest.approx(hi, rel=1e-5)
    # inference: stored range, not updated
    out3 = q(tf.constant(x2 * 3), False, weights).numpy()
    assert weights["max_var"].numpy() == pytest.approx(hi, rel=1e-5)
    np.testing.assert_allclose(out3, np_fake_quant_activation(x2 * 3, lo, hi, 4), atol=1e-5)
    assert len(np.unique(out3)) <= 16


def test_configs_serialize_and_validate():
    for cls in (DenseQuantizeConfig, Conv2DQuantizeConfig, DepthwiseConv2DQuantizeConfig):
        cfg = cls(weight_bits=3, activation_bits=None, per_channel=False, narrow_range=True)
        name = keras.utils.get_registered_name(cls)
        assert name == f"tfqreg>{cls.__name__}"
        ser = keras.utils.serialize_keras_object(cfg)
        assert keras.utils.deserialize_keras_object(ser) == cfg
        assert cls.from_config(cfg.get_config()) == cfg
    for obj in (WeightQuantizer(bits=5), ActivationQuantizer(bits=5),
                quantization.OutputQuantizeConfig(activation_bits=5)):
        assert keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(obj)) == obj
    with pytest.raises(ValueError, match="weight_bits"):
        DenseQuantizeConfig(weight_bits=1)
    with pytest.raises(ValueError, match="activation_bits"):
        Conv2DQuantizeConfig(weight_bits=4, activation_bits=17)
    with pytest.raises(TypeError, match="per_channel"):
        WeightQuantizer(4, per_channel="yes")
    with pytest.raises(ValueError, match="ema_decay"):
        ActivationQuantizer(8, ema_decay=1.0)


# ----------------------------------------------------------------------------- quantize_model
def _depthwise_model(l2=None):
    reg = None if l2 is None else keras.regularizers.L2(l2)
    inp = keras.Input((12, 12, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu", kernel_regularizer=reg, name="conv")(inp)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    out = keras.layers.Dense(3, kernel_regularizer=reg, name="fc")(h)
    return keras.Model(inp, out, name="dw_model")


def _inner(qat, name):
    layer = qat.get_layer(f"quant_{name}")
    assert isinstance(layer, tfmot.quantization.keras.QuantizeWrapperV2)
    return layer


def _var(wrapper, attr="kernel"):
    """The float variable behind a wrapped layer's kernel (the attribute holds the quantized
    tensor after quantize_apply)."""
    return [w for w in wrapper.weights if w.name.split("/")[-1] == f"{attr}:0"][0]


def test_quantize_model_wraps_with_tfqreg_configs_and_quantizes_kernels():
    model = _depthwise_model()
    qat = quantization.quantize_model(model, weight_bits=3, activation_bits=None)
    assert isinstance(_inner(qat, "conv").quantize_config, Conv2DQuantizeConfig)
    assert isinstance(_inner(qat, "dw").quantize_config, DepthwiseConv2DQuantizeConfig)
    assert isinstance(_inner(qat, "fc").quantize_config, DenseQuantizeConfig)
    # weights are copied into the QAT model
    np.testing.assert_array_equal(_var(_inner(qat, "dw"), "depthwise_kernel").numpy(),
                                  model.get_layer("dw").depthwise_kernel.numpy())
    # the wrapped depthwise layer computes with the 3-bit kernel, per (in, multiplier) channel
    x = np.random.default_rng(0).normal(size=(2, 10, 10, 4)).astype(np.float32)
    dw = model.get_layer("dw")
    qk, _ = np_weight_grid(dw.depthwise_kernel.numpy(), 3, (2, 3))
    ref = tf.nn.relu(tf.nn.depthwise_conv2d(x, qk.astype(np.float32), [1, 1, 1, 1], "VALID")
                     + dw.bias).numpy()
    np.testing.assert_allclose(_inner(qat, "dw")(x, training=False).numpy(), ref, atol=1e-5)


def test_regularizers_keep_working_after_quantize_model():
    l2 = 1e-2
    model = _depthwise_model(l2)
    qat = quantization.quantize_model(model, weight_bits=4, activation_bits=8)
    expected = sum(l2 * np.sum(model.get_layer(n).kernel.numpy() ** 2) for n in ("conv", "fc"))
    assert len(qat.losses) == 2
    assert float(tf.add_n(qat.losses)) == pytest.approx(expected, rel=1e-5)
    # the penalty acts on the float (latent) kernel: it follows assignments to the variable
    kernel = _var(_inner(qat, "conv"))
    kernel.assign(kernel * 2.0)
    expected2 = expected + 3 * l2 * np.sum(model.get_layer("conv").kernel.numpy() ** 2)
    assert float(tf.add_n(qat.losses)) == pytest.approx(expected2, rel=1e-5)


def test_tfqreg_regularizer_after_quantize_model():
    regularizers = pytest.importorskip("tfqreg.regularizers")
    candidates = [getattr(regularizers, n) for n in getattr(regularizers, "__all__", [])]
    candidates = [c for c in candidates if isinstance(c, type)
                  and issubclass(c, keras.regularizers.Regularizer)]
    if not candidates:
        pytest.skip("tfqreg.regularizers defines no Regularizer class yet")
    reg_cls = candidates[0]
    try:
        reg = reg_cls()
    except TypeError:
        pytest.skip(f"{reg_cls.__name__} needs arguments")
    model = models.tiny_cnn(kernel_regularizer=reg)
    model.build((None, 28, 28, 1))
    before = float(tf.add_n(model.losses))
    qat = quantization.quantize_model(model, weight_bits=4, activation_bits=8)
    assert len(qat.losses) == len(model.losses) == 3
    assert float(tf.add_n(qat.losses)) == pytest.approx(before, rel=1e-5)


def test_quantize_model_trains_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (64, 12, 12, 2)).astype(np.float32)
    y = rng.integers(0, 3, 64)
    qat = quantization.quantize_model(_depthwise_model(1e-3), weight_bits=4, activation_bits=4)
    qat.compile(keras.optimizers.Adam(1e-2),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    qat.fit(x, y, batch_size=16, epochs=1, verbose=0)
    wrapper = _inner(qat, "conv")
    lo = [w for w in wrapper.weights if "post_activation_min" in w.name][0].numpy()
    hi = [w for w in wrapper.weights if "post_activation_max" in w.name][0].numpy()
    assert lo == 0.0 and 0.0 < hi < 6.0  # calibrated on ReLU outputs, not TFMOT's ±6 start
    sub = keras.Model(qat.inputs, wrapper.output)
    assert len(np.unique(sub.predict(x, verbose=0))) <= 16  # 4-bit activations
    expected = qat.predict(x[:8], verbose=0)
    for path in (tmp_path / "q.h5", tmp_path / "saved"):
        qat.save(str(path))
        with quantization.quantize_scope():
            loaded = keras.models.load_model(str(path))
        np.testing.assert_allclose(loaded.predict(x[:8], verbose=0), expected, atol=1e-5)
        assert isinstance(_inner(loaded, "dw").quantize_config, DepthwiseConv2DQuantizeConfig)


@pytest.mark.xfail(strict=True, reason="TFMOT 0.8.1 QAT wrappers do not load from .keras "
                   "(upstream; TFMOT's own quantize_model fails the same way)")
def test_qat_model_keras_format(tmp_path):
    import tensorflow_model_optimization as tfmot_

    for qat in (quantization.quantize_model(models.tiny_cnn(), 4, 8),
                tfmot_.quantization.keras.quantize_model(models.tiny_cnn())):
        qat.save(str(tmp_path / "q.keras"))
        with quantization.quantize_scope():
            keras.models.load_model(str(tmp_path / "q.keras"))


def test_quantize_model_bad_input():
    with pytest.raises(ValueError, match="weight_bits"):
        quantization.quantize_model(models.tiny_cnn(), weight_bits=17)
    with pytest.raises(ValueError, match="activation_bits"):
        quantization.quantize_model(models.tiny_cnn(), weight_bits=4, activation_bits=1)
    flat = keras.Sequential([keras.layers.InputLayer((4, 4)), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no Dense"):
        quantization.quantize_model(flat)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    with pytest.raises(TypeError, match="subclassed"):
        quantization.quantize_model(Sub())
    keras3 = pytest.importorskip("keras")
    k3 = keras3.Sequential([keras3.Input((3,)), keras3.layers.Dense(2)])
    with pytest.raises(TypeError, match="Keras 3"):
        quantization.quantize_model(k3)


# ----------------------------------------------------------------------------- TFLite
def _convert_int8(model, rep):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rep[i:i + 1]] for i in range(len(rep)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _tensors_and_ops(flatbuffer):
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    graph = model.subgraphs[0]
    names = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    tensors = [(t.name.decode(), names[t.type], t, model.buffers[t.buffer].data)
               for t in graph.tensors]
    op_names = [ops[model.operatorCodes[o.opcodeIndex].builtinCode] for o in graph.operators]
    return tensors, op_names


@pytest.fixture(scope="module")
def trained_qat8(fashion_small):
    (x, y), _ = fashion_small
    keras.utils.set_random_seed(1)
    qat = quantization.quantize_model(models.small_cnn(), weight_bits=8, activation_bits=8)
    qat.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy",
                metrics=["accuracy"])
    qat.fit(x[:2048], y[:2048], batch_size=64, epochs=1, verbose=0)
    return qat


def test_8bit_model_converts_to_full_int8_tflite(trained_qat8, fashion_small):
    (x, _), (xt, yt) = fashion_small
    flatbuffer = _convert_int8(trained_qat8, x[:32])
    tensors, ops = _tensors_and_ops(flatbuffer)
    assert {dtype for _, dtype, _, _ in tensors} <= {"INT8", "INT32"}
    assert "DEQUANTIZE" not in ops and "QUANTIZE" not in ops
    assert {"CONV_2D", "MAX_POOL_2D", "FULLY_CONNECTED", "SOFTMAX"} <= set(ops)
    # the int8 kernels are tfqreg's 8-bit per-channel grid of the trained kernel
    conv = _var(_inner(trained_qat8, "conv2")).numpy()
    ours, step = np_weight_grid(conv, 8, (-1,))
    name, _, t, data = [t for t in tensors if t[0].endswith("quant_conv2/Conv2D")][0]
    q = np.frombuffer(bytes(data), np.int8).reshape(t.shape)  # (out, kh, kw, in)
    scale = np.asarray(t.quantization.scale)
    np.testing.assert_allclose(scale, step.reshape(-1), rtol=1e-5)
    got = (q * scale[:, None, None, None]).transpose(1, 2, 3, 0)
    off = ~np.isclose(got, ours, atol=1e-6)
    # the converter rounds w/δ in its own float arithmetic: an index may differ by one step only
    # where w/δ sits on a rounding tie (x.5 to float32 precision), never elsewhere
    ratio = conv / step
    assert np.all(np.abs(np.abs(ratio[off] - np.floor(ratio[off])) - 0.5) < 1e-3)
    assert np.all(np.abs(got - ours)[off] <= np.broadcast_to(step, ours.shape)[off] * 1.001)
    # and the integer model classifies like the QAT model
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=flatbuffer)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], (500, 28, 28, 1))
    interp.allocate_tensors()
    s, z = inp["quantization"]
    interp.set_tensor(inp["index"], np.clip(np.round(xt[:500] / s + z), -128, 127)
                      .astype(np.int8))
    interp.invoke()
    lite = interp.get_tensor(out["index"]).argmax(-1)
    keras_pred = trained_qat8.predict(xt[:500], verbose=0).argmax(-1)
    assert np.mean(lite == keras_pred) > 0.97
    assert abs(np.mean(lite == yt[:500]) - np.mean(keras_pred == yt[:500])) < 0.02


def test_4bit_model_converts_to_int8_on_the_coarse_grid(fashion_small):
    """Below 8 bits TFLite stores int8, but each channel keeps at most 2^b distinct values."""
    (x, y), _ = fashion_small
    qat = quantization.quantize_model(models.tiny_cnn(), weight_bits=4, activation_bits=8)
    qat.compile("adam", "sparse_categorical_crossentropy")
    qat.fit(x[:256], y[:256], batch_size=64, epochs=1, verbose=0)
    tensors, ops = _tensors_and_ops(_convert_int8(qat, x[:16]))
    assert {dtype for _, dtype, _, _ in tensors} <= {"INT8", "INT32"} and "MEAN" in ops
    name, dtype, t, data = [t for t in tensors if t[0].endswith("quant_conv2/Conv2D")][0]
    assert dtype == "INT8"
    q = np.frombuffer(bytes(data), np.int8).reshape(t.shape)
    counts = [len(np.unique(q[c])) for c in range(q.shape[0])]
    assert max(counts) <= 16 and min(counts) > 3
