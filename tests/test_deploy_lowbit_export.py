"""to_tflite(weight_bits=4 / 2) and to_micro(weight_bits=4): the file holds exactly the grid
tfqreg.ptq simulates (BatchNorm folded), runs in LiteRT and TFLite Micro, agrees with the
simulation, and is refused where no runtime kernel exists."""

import numpy as np
import pytest

import tfqreg
from tfqreg import fold, grid, ptq
from tfqreg._keras import keras
from tfqreg.deploy import lowbit, micro, to_tflite, Runner


def bn_model(seed=0):
    """Stem conv + BN + ReLU6, depthwise + BN + ReLU, pointwise + BN, GAP, two Dense."""
    inp = keras.Input((12, 12, 1))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv")(inp)
    h = keras.layers.BatchNormalization(name="bn1")(h)
    h = keras.layers.ReLU(6.0)(h)
    h = keras.layers.DepthwiseConv2D(3, use_bias=False, name="dw")(h)
    h = keras.layers.BatchNormalization(name="bn2")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(16, activation="relu", name="fc1")(h)
    out = keras.layers.Dense(5, activation="softmax", name="fc2")(h)
    model = keras.Model(inp, out)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.set_weights([rng.uniform(0.3, 2.5, n), rng.normal(0, 0.5, n),
                               rng.normal(0, 0.3, n), rng.uniform(0.2, 3.0, n) ** 2])
    return model


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    return rng.random((200, 12, 12, 1)).astype(np.float32)


def _np_grid_indices(w, bits, axes):
    """NumPy oracle: (k, δ) of the tfqreg grid, δ = max|w|/(2^(b-1)-1)."""
    w = np.asarray(w, np.float32)
    if axes is None:
        m = np.abs(w).max()
    else:
        keep = {a % w.ndim for a in axes}
        m = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a not in keep), keepdims=True)
    step = (m / np.float32(2 ** (bits - 1) - 1)).astype(np.float32)
    return np.clip(np.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1), step


@pytest.mark.parametrize("runtime", ["litert", "micro"])
def test_int4_file_holds_the_folded_grid_bit_for_bit(data, runtime):
    model = bn_model()
    res = to_tflite(model, mode="int8", representative_data=data, weight_bits=4,
                    runtime=runtime, sample=data[:100])
    report = lowbit.weight_report(res.flatbuffer)
    by_op = {}
    for t in report.tensors:
        by_op.setdefault(t.op, []).append(t)
    assert {t.dtype for t in report.tensors} == {"int4"}
    folded = fold.fold_model(model)
    # conv: TFLite layout OHWI, per output channel (axis 0)
    w = folded.get_layer("conv").kernel.numpy()
    k, _ = _np_grid_indices(w, 4, (-1,))
    (conv,) = by_op["CONV_2D"]
    np.testing.assert_array_equal(conv.integers, np.transpose(k, (3, 0, 1, 2)).astype(np.int8))
    # depthwise: 1HW(C·M), per channel
    w = folded.get_layer("dw").depthwise_kernel.numpy()
    k, _ = _np_grid_indices(w, 4, (2, 3))
    (dw,) = by_op["DEPTHWISE_CONV_2D"]
    np.testing.assert_array_equal(dw.integers, k.reshape(1, 3, 3, -1).astype(np.int8))
    # dense: (out, in); per channel on LiteRT, one scale per tensor on TFLite Micro
    for t, name in zip(by_op["FULLY_CONNECTED"], ("fc1", "fc2")):
        w = model.get_layer(name).kernel.numpy()
        axes = None if runtime == "micro" else (-1,)
        k, step = _np_grid_indices(w, 4, axes)
        np.testing.assert_array_equal(t.integers, k.T.astype(np.int8))
        assert len(t.scales) == (1 if runtime == "micro" else 5 if name == "fc2" else 16)
        np.testing.assert_array_equal(np.asarray(t.scales, np.float32),
                                      np.ravel(step).astype(np.float32))
    # ... which is what ptq.quantize simulates, dequantized bit for bit
    sim = ptq.quantize(model, 4, per_channel="conv" if runtime == "micro" else True)
    np.testing.assert_array_equal(
        conv.dequantized(), np.transpose(sim.get_layer("conv").kernel.numpy(), (3, 0, 1, 2)))
    # the report: sizes by type, the simulated reference, parity (counting ties) passed
    extra = res.report.extra
    assert extra["weight_bits"] == 4 and extra["weight_bytes_by_type"] == {"int4": sum(
        t.nbytes for t in report.tensors)}
    assert res.report.parity.passed
    assert "simulated model" in " ".join(res.report.notes)


def test_int4_runs_in_litert_and_micro_as_simulated(data):
    model = bn_model(seed=2)
    res = to_tflite(model, mode="int8", representative_data=data, weight_bits=4,
                    runtime="micro", check=False)
    sim = ptq.quantize(model, 4, activation_bits=8, per_channel="conv",
                       calibration_data=data)
    lite = Runner(res.flatbuffer, "litert", kernels="builtin").predict(data)
    mic = Runner(res.flatbuffer, "micro").predict(data)
    want = sim.predict(data, verbose=0)
    assert np.mean(lite.argmax(-1) == mic.argmax(-1)) >= 0.99
    assert np.abs(lite - want).max() < 0.05  # a few int8 output steps (1/256)
    int8 = to_tflite(model, mode="int8", representative_data=data, check=False)
    w4 = lowbit.weight_report(res.flatbuffer).total_weight_bytes
    w8 = lowbit.weight_report(int8.flatbuffer).total_weight_bytes
    assert w4 <= 0.6 * w8


def test_two_bit_fc_on_litert(data):
    model = bn_model()
    res = to_tflite(model, mode="int8", representative_data=data, weight_bits=2,
                    runtime="litert", check=False)
    types = {t.op: t.dtype for t in lowbit.weight_report(res.flatbuffer).tensors}
    assert types == {"CONV_2D": "int4", "DEPTHWISE_CONV_2D": "int4", "FULLY_CONNECTED": "int2"}
    for t in lowbit.weight_report(res.flatbuffer).tensors:
        assert set(np.unique(t.integers)) <= {-2, -1, 0, 1}
    out = Runner(res.flatbuffer, "litert").predict(data[:20])
    assert np.isfinite(out).all()


def test_refusals_name_the_op_and_runtime(data, tmp_path):
    model = bn_model()
    path = tmp_path / "never.tflite"
    with pytest.raises(ValueError, match="FULLY_CONNECTED.*micro|micro.*FULLY_CONNECTED"):
        to_tflite(model, mode="int8", representative_data=data, weight_bits=2,
                  runtime="micro", path=str(path))
    assert not path.exists()
    with pytest.raises(ValueError, match="mode='int8'"):
        to_tflite(model, mode="float", weight_bits=4)
    with pytest.raises(ValueError, match="weight_bits"):
        to_tflite(model, mode="int8", representative_data=data, weight_bits=3)
    with pytest.raises(ValueError, match="runtime"):
        to_tflite(model, mode="int8", representative_data=data, weight_bits=4, runtime="tpu")
    with pytest.raises(ValueError, match="micro"):
        micro.to_micro(model, data, str(tmp_path / "m"), name="m", weight_bits=2)


def test_to_micro_int4_writes_c_source_and_measures_arena(data, tmp_path):
    model = bn_model(seed=3)
    res = micro.to_micro(model, data, str(tmp_path), name="m4", weight_bits=4,
                         sample=data[:60])
    assert {t.dtype for t in lowbit.weight_report(res.flatbuffer).tensors} == {"int4"}
    assert res.arena_measured > 0 and res.arena_size >= res.arena_measured
    source = open(res.cc_path).read()
    assert "m4" in source and "alignas" in source
    assert "PASS" in res.report.extra["micro_parity"]
    # both runtimes checked once, against the simulated model: LiteRT here, TFLite Micro above
    parity = res.report.parity
    assert parity.backend == "litert" and parity.passed and parity.samples == 60
    assert parity.reference == "the simulated model"
    assert "vs the simulated model (micro, 60 samples)" in res.report.extra["micro_parity"]
