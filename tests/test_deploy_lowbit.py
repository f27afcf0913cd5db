"""tfqreg.deploy.lowbit: packed INT4 / INT2 weights that are exactly tfqreg's grid.

Oracles: the grid computed with NumPy and with tfqreg.grid on the Keras kernels (integers and
scales compared bit for bit), packing done by hand in NumPy and by ai-edge-quantizer's own
packer, and the real runtimes (LiteRT, TFLite Micro): an INT4 file must compute exactly what an
INT8 file holding the same integers computes, and a weights-only file what the float model
computes.
"""

import numpy as np
import pytest

from tfqreg import grid, ptq
from tfqreg._keras import keras, tf
from tfqreg.deploy import lowbit
from tfqreg.export import Runner

pytest.importorskip("ai_edge_quantizer")

SHAPE = (10, 10, 1)


def _model():
    keras.utils.set_random_seed(3)
    inp = keras.Input(SHAPE, batch_size=1)
    h = keras.layers.Conv2D(6, 3, activation="relu", bias_initializer="glorot_uniform",
                            name="conv")(inp)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu",
                                     bias_initializer="glorot_uniform", name="dw")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    out = keras.layers.Dense(10, bias_initializer="glorot_uniform", name="fc")(h)
    return keras.Model(inp, out)


def _flat(model):
    return tf.lite.TFLiteConverter.from_keras_model(model).convert()


@pytest.fixture(scope="module")
def setup():
    model = _model()
    x = np.random.default_rng(0).random((32,) + SHAPE, dtype=np.float32)
    return {
        "model": model, "x": x,
        "f4": _flat(ptq.quantize(model, 4)),
        "f4t": _flat(ptq.quantize(model, 4, per_channel=False)),
        "f2": _flat(ptq.quantize(model, 2)),
        "float": _flat(model),
    }


def _tflite_layout(layer, a):
    """A Keras kernel-shaped array in the layout TFLite stores that layer's weights."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):  # (H, W, C, M) -> (1, H, W, C*M)
        return a.reshape((1,) + a.shape[:2] + (-1,))
    if isinstance(layer, keras.layers.Conv2D):  # HWIO -> OHWI
        return np.transpose(a, (3, 0, 1, 2))
    return a.T  # Dense (in, out) -> (out, in)


def _kernel(layer):
    kernel = layer.depthwise_kernel if hasattr(layer, "depthwise_kernel") else layer.kernel
    return kernel.numpy()


def _raw_buffers(flat):
    from tensorflow.lite.tools import flatbuffer_utils

    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(flat))
    return {t.name.decode(): np.asarray(m.buffers[t.buffer].data, np.uint8).tobytes()
            for t in m.subgraphs[0].tensors if m.buffers[t.buffer].data is not None}


def _by_op(report):
    return {t.op: t for t in report.tensors}


def test_int4_integers_and_scales_are_tfqregs_grid_bit_for_bit(setup):
    q = lowbit.quantize_tflite(setup["f4"], 4, "litert", [setup["x"]])
    tensors = _by_op(lowbit.weight_report(q))
    raw = _raw_buffers(q)
    model = setup["model"]
    for name, op in (("conv", "CONV_2D"), ("dw", "DEPTHWISE_CONV_2D"), ("fc", "FULLY_CONNECTED")):
        layer = model.get_layer(name)
        w = _kernel(layer)  # the float kernel; ptq put delta * k into the float file
        step = grid.default_step(w, 4, grid.channel_axes_for(layer))
        k = grid.quantize_indices(w, step, 4).numpy().astype(np.int8)
        t = tensors[op]
        assert t.dtype == "int4"
        np.testing.assert_array_equal(t.integers, _tflite_layout(layer, k))
        np.testing.assert_array_equal(np.asarray(t.scales, np.float32),
                                      step.numpy().reshape(-1))  # bit for bit
        assert t.quantized_dimension == {"DEPTHWISE_CONV_2D": 3}.get(op, 0)
        flat_k = _tflite_layout(layer, k).reshape(-1).astype(np.uint8) & 0xF
        flat_k = np.concatenate([flat_k, np.zeros(len(flat_k) % 2, np.uint8)])
        packed = (flat_k[0::2] | (flat_k[1::2] << 4)).astype(np.uint8).tobytes()  # low first
        assert raw[t.name] == packed
        assert t.nbytes == (w.size + 1) // 2


def test_numpy_grid_of_the_float_file_equals_the_file(setup):
    """Per-channel delta = max|w|/7 in float32 of the float file's own weights, as NumPy."""
    q = lowbit.quantize_tflite(setup["f4"], 4, "litert", [setup["x"]])
    floats = {t.op: t for t in lowbit.weight_report(setup["f4"]).tensors}
    raw = _raw_buffers(setup["f4"])
    for op, t in _by_op(lowbit.weight_report(q)).items():
        assert floats[op].dtype == "float32" and floats[op].integers is None
        w = np.frombuffer(raw[t.name], np.float32).reshape(t.shape)
        axis = t.quantized_dimension
        red = tuple(a for a in range(w.ndim) if a != axis)
        delta = np.max(np.abs(w), axis=red, keepdims=True) / np.float32(7)
        np.testing.assert_array_equal(t.integers, np.round(w / delta).astype(np.int8))
        np.testing.assert_array_equal(t.scales, delta.reshape(-1).astype(np.float32))
        np.testing.assert_array_equal(t.dequantized(), w)  # the file holds w exactly


def test_int4_file_computes_what_int8_file_with_the_same_integers_computes(setup):
    x = setup["x"]
    q4 = lowbit.quantize_tflite(setup["f4"], 4, "litert", [x])
    q8 = lowbit.quantize_tflite(setup["f4"], 8, "litert", [x])
    t4, t8 = _by_op(lowbit.weight_report(q4)), _by_op(lowbit.weight_report(q8))
    for op in t4:
        assert t8[op].dtype == "int8"
        np.testing.assert_array_equal(t4[op].integers, t8[op].integers)
    for kernels in ("builtin", "reference"):
        y4 = Runner(q4, "litert", kernels=kernels).predict(x, raw=True)
        y8 = Runner(q8, "litert", kernels=kernels).predict(x, raw=True)
        assert y4.dtype == np.int8
        np.testing.assert_array_equal(y4, y8)
    # XNNPACK (the default) takes the int8 file's ops, not all of the int4 one's: its own
    # rounding differs from the builtin kernels' by at most one unit
    y4 = Runner(q4, "litert").predict(x, raw=True).astype(int)
    assert np.abs(y4 - Runner(q8, "litert").predict(x, raw=True)).max() <= 1
    y_float = Runner(setup["f4"]).predict(x)
    y = Runner(q4).predict(x)
    assert np.mean(y.argmax(1) == y_float.argmax(1)) >= 0.9
    assert np.abs(y - y_float).max() < 0.1 * np.abs(y_float).max()


def test_activation_ranges_are_min_max_over_all_samples(setup):
    """As the TF converter and tfqreg.ptq calibrate (the tool's default is a moving average)."""
    from tfqreg.export import read_tflite

    x = setup["x"]
    q = lowbit.quantize_tflite(setup["f4"], 4, "litert", [x])
    g = read_tflite(q)
    y = Runner(setup["f4"]).predict(x)  # the float model's logits
    for values, index in ((x, g.inputs[0]), (y, g.outputs[0])):
        lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
        np.testing.assert_allclose(g.tensor(index).scale[0], (hi - lo) / 255, rtol=1e-5)


def test_micro_per_tensor_fc_runs_in_tflite_micro_as_in_litert(setup, tmp_path):
    x = setup["x"]
    path = tmp_path / "m.tflite"
    q = lowbit.quantize_tflite(setup["f4t"], 4, "micro", [x], path=str(path))
    assert path.read_bytes() == q
    t = _by_op(lowbit.weight_report(q))
    assert len(t["FULLY_CONNECTED"].scales) == 1
    # a per-tensor grid on a convolution is written per channel, every scale the same delta
    w = _kernel(setup["model"].get_layer("conv"))
    delta = grid.default_step(w, 4).numpy()
    assert t["CONV_2D"].scales == [float(delta)] * 6
    y_micro = Runner(q, "micro").predict(x, raw=True)
    y_litert = Runner(q, "litert", kernels="builtin").predict(x, raw=True)
    assert np.abs(y_micro.astype(int) - y_litert.astype(int)).max() <= 1
    assert np.mean(y_micro.argmax(1) == y_litert.argmax(1)) >= 0.95


def test_int2_fully_connected_on_litert(setup):
    x = setup["x"]
    plans = {p.op: p for p in lowbit.plan(setup["f2"], 2, "litert")}
    assert plans["FULLY_CONNECTED"].granularity == "CHANNELWISE"  # XNNPACK: per channel
    q = lowbit.quantize_tflite(setup["f2"], 2, "litert", [x])
    t = _by_op(lowbit.weight_report(q))
    fc = _kernel(setup["model"].get_layer("fc"))
    step = grid.default_step(fc, 2, (-1,))  # = max|w| per output channel
    k = grid.quantize_indices(fc, step, 2).numpy().astype(np.int8).T
    assert t["FULLY_CONNECTED"].dtype == "int2" and t["FULLY_CONNECTED"].nbytes == fc.size // 4
    np.testing.assert_array_equal(t["FULLY_CONNECTED"].integers, k)
    np.testing.assert_array_equal(t["FULLY_CONNECTED"].scales, step.numpy().reshape(-1))
    # convolutions: INT4 holding their 2-bit grid, integers -1, 0, 1 with delta = max|w|
    conv = _kernel(setup["model"].get_layer("conv"))
    assert t["CONV_2D"].dtype == "int4" and plans["CONV_2D"].grid_bits == 2
    np.testing.assert_array_equal(t["CONV_2D"].scales, np.abs(conv).max(axis=(0, 1, 2)))
    assert set(np.unique(t["CONV_2D"].integers)) == {-1, 0, 1}
    y_float = Runner(setup["f2"]).predict(x)
    for kernels in ("auto", "builtin"):
        y = Runner(q, "litert", kernels=kernels).predict(x)
        assert np.isfinite(y).all()
        assert np.mean(y.argmax(1) == y_float.argmax(1)) >= 0.9


def test_weights_only_file_computes_the_float_model(setup):
    x = setup["x"]
    q = lowbit.quantize_tflite(setup["f4"], 4, "litert", activations="float")
    report = lowbit.weight_report(q)
    assert {t.dtype for t in report.tensors} == {"int4"}
    np.testing.assert_allclose(Runner(q).predict(x), Runner(setup["f4"]).predict(x),
                               atol=1e-5)


def test_float_io_adds_quantize_and_dequantize(setup):
    from tfqreg.export import read_tflite

    x = setup["x"]
    q = lowbit.quantize_tflite(setup["f4"], 4, "litert", [x], io_dtype="float32")
    g = read_tflite(q)
    assert g.tensor(g.inputs[0]).dtype == "float32" and g.tensor(g.outputs[0]).dtype == "float32"
    assert g.op_names[0] == "QUANTIZE" and g.op_names[-1] == "DEQUANTIZE"
    q8 = lowbit.quantize_tflite(setup["f4"], 4, "litert", [x])
    # the same integers; only the final dequantization runs in the graph instead of on the host
    np.testing.assert_allclose(Runner(q, kernels="builtin").predict(x),
                               Runner(q8, kernels="builtin").predict(x), atol=1e-6)


@pytest.mark.parametrize("key,bits,runtime,kwargs,words", [
    ("f2", {"CONV_2D": 2}, "litert", {}, ["CONV_2D", "INT2", "'litert'"]),
    ("f2", {"DEPTHWISE_CONV_2D": 2}, "micro", {}, ["DEPTHWISE_CONV_2D", "INT2", "'micro'"]),
    ("f2", 2, "micro", {}, ["FULLY_CONNECTED", "INT2", "'micro'"]),
    ("f4", 4, "micro", {}, ["FULLY_CONNECTED", "'micro'", "per tensor"]),
    ("f4t", 4, "micro", {"activations": "float"}, ["CONV_2D", "float activations", "'micro'"]),
    ("float", 4, "litert", {}, ["CONV_2D", "do not lie on a grid of 4 bits or fewer"]),
    ("f4", 2, "litert", {}, ["FULLY_CONNECTED", "grid of 2 bits or fewer"]),
])
def test_refusals_name_op_and_runtime_and_write_nothing(setup, tmp_path, key, bits, runtime,
                                                        kwargs, words):
    path = tmp_path / "never.tflite"
    with pytest.raises(ValueError) as info:
        lowbit.quantize_tflite(setup[key], bits, runtime, [setup["x"]], path=str(path), **kwargs)
    for word in words:
        assert word in str(info.value)
    assert not path.exists()


def test_a_tool_that_misses_the_grid_is_an_error(setup, tmp_path, monkeypatch):
    from ai_edge_quantizer.algorithms.uniform_quantize import uniform_quantize_tensor as uqt

    original = uqt.tensor_zp_scale_from_min_max

    def off_by_a_little(*args, **kwargs):
        zp, scale = original(*args, **kwargs)
        return zp, scale * np.float32(1.001)

    monkeypatch.setattr(uqt, "tensor_zp_scale_from_min_max", off_by_a_little)
    path = tmp_path / "never.tflite"
    with pytest.raises(RuntimeError, match="did not reproduce the 4-bit grid"):
        lowbit.quantize_tflite(setup["f4"], 4, "litert", [setup["x"]], path=str(path))
    assert not path.exists()


def test_argument_checks_name_the_argument(setup):
    f4, x = setup["f4"], setup["x"]
    for kwargs, word in [({"runtime": "gpu"}, "`runtime`"), ({"weight_bits": 3}, "`weight_bits`"),
                         ({"weight_bits": {"CONV": 4}}, "`weight_bits`"),
                         ({"activations": "int16"}, "`activations`"),
                         ({"io_dtype": "uint8"}, "`io_dtype`"),
                         ({"representative_data": None}, "`representative_data`"),
                         ({"representative_data": [x, x]}, "`representative_data`"),
                         ({"representative_data": [x[:, :5]]}, "`representative_data`")]:
        args = {"weight_bits": 4, "runtime": "litert", "representative_data": [x]}
        args.update(kwargs)
        with pytest.raises(ValueError, match=word):
            lowbit.quantize_tflite(f4, **args)
    with pytest.raises(ValueError, match="TFLite flatbuffer"):
        lowbit.quantize_tflite(b"not a model at all", 4, "litert", [x])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_integers_inverts_ai_edge_quantizers_packer(bits):
    from ai_edge_quantizer.transformations.transformation_utils import pack_data

    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    k = np.random.default_rng(bits).integers(lo, hi + 1, 37).astype(np.int8)
    packed = pack_data(bits, k.copy()).astype(np.uint8).tobytes() if bits < 8 else k.tobytes()
    assert len(packed) == -(-37 * bits // 8)
    np.testing.assert_array_equal(lowbit.unpack_integers(packed, bits, 37), k)


def test_report_counts_bytes_by_type(setup):
    q = lowbit.quantize_tflite(setup["f4"], 4, "litert", [setup["x"]])
    r, rf = lowbit.weight_report(q), lowbit.weight_report(setup["f4"])
    sizes = {t.op: int(np.prod(t.shape)) for t in rf.tensors}
    assert r.weight_bytes == {"int4": sum((n + 1) // 2 for n in sizes.values())}
    assert rf.weight_bytes == {"float32": 4 * sum(sizes.values())}
    assert r.constant_bytes["int4"] == r.weight_bytes["int4"]
    assert sum(r.constant_bytes.values()) < r.size_bytes == len(q)
    assert "int4" in r.to_text() and r.to_dict()["weight_bytes"] == r.weight_bytes


def test_two_inputs_take_one_array_each_in_model_order():
    keras.utils.set_random_seed(4)
    image, vector = keras.Input((8, 8, 1), batch_size=1), keras.Input((4,), batch_size=1)
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(image))
    out = keras.layers.Dense(3)(keras.layers.Concatenate()([h, vector]))
    model = keras.Model([image, vector], out)
    flat = _flat(ptq.quantize(model, 4))
    rng = np.random.default_rng(5)
    xs = [rng.random((16, 8, 8, 1), dtype=np.float32), rng.random((16, 4), dtype=np.float32)]
    q = lowbit.quantize_tflite(flat, 4, "litert", xs)
    y_float, y = Runner(flat).predict(xs), Runner(q).predict(xs)
    assert np.abs(y - y_float).max() < 0.05 * np.abs(y_float).max()
    with pytest.raises(ValueError, match="representative_data"):
        lowbit.quantize_tflite(flat, 4, "litert", xs[::-1])
