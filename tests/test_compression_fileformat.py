"""The .tfqz file: bit-identical round trip, byte accounting, and rejection of damaged files."""

import os
import struct
import zlib

import numpy as np
import pytest

from tfqreg import models
from tfqreg._keras import keras
from tfqreg.compression import (ACCOUNTING, TfqzError, encode_model, fileformat, inspect_compressed,
                                load_compressed, quantize_weights, save_compressed)


def bn_depthwise_model():
    """Functional model with BatchNorm (float-kept), a depthwise kernel (per-channel axes
    (2, 3)) and a separable conv (depthwise + pointwise kernels)."""
    inp = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, name="c")(inp)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    x = keras.layers.SeparableConv2D(6, 3, name="s")(x)  # two kernels in one layer
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(5, name="d")(x)
    return keras.Model(inp, out)


def randomize(model, seed=0, sparsity=0.7):
    rng = np.random.default_rng(seed)
    values = []
    for w in model.get_weights():
        v = rng.normal(0, 0.3, size=w.shape).astype(np.float32)
        if w.ndim > 1:
            v[rng.random(w.shape) < sparsity] = 0.0
        values.append(v)
    model.set_weights(values)


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("build", [models.tiny_cnn, bn_depthwise_model])
def test_round_trip_is_bit_identical(tmp_path, build, bits, per_channel):
    model = build()
    randomize(model)
    steps = quantize_weights(model, bits=bits, per_channel=per_channel)
    path = tmp_path / "m.tfqz"
    report = save_compressed(model, path, bits=bits, steps=steps)
    assert report.settings["lossless"] and report.settings["max_abs_error"] == 0.0
    restored = load_compressed(path)
    assert [w.name for w in restored.weights] == [w.name for w in model.weights]
    for a, b in zip(model.get_weights(), restored.get_weights()):
        assert same_bits(a, b)
    x = np.random.default_rng(1).random((4,) + model.input_shape[1:]).astype(np.float32)
    assert same_bits(model.predict(x, verbose=0), restored.predict(x, verbose=0))
    assert report.file_bytes == os.path.getsize(path)


def test_quantize_weights_matches_numpy_grid_and_keeps_zeros():
    model = models.tiny_cnn()
    randomize(model, sparsity=0.5)
    before = {w.name: w.numpy() for w in model.weights}
    steps = quantize_weights(model, bits=3)
    for key, (layer, var, _) in fileformat.coded_kernels(model).items():
        w = before[var.name]
        step = np.float32(np.abs(w).max() / 3)  # default step max|w| / (2^(n-1) - 1)
        assert steps[key] == pytest.approx(step, rel=1e-6)
        expected = np.clip(np.round(w / steps[key]), -4, 3).astype(np.float32) * steps[key]
        np.testing.assert_array_equal(var.numpy(), expected)
        assert np.all(var.numpy()[w == 0] == 0)
        assert not np.signbit(var.numpy()[w == 0]).any()  # +0.0, not -0.0
    assert np.array_equal(model.get_layer("conv1").bias.numpy(), before[model.get_layer("conv1")
                                                                         .bias.name])


def test_off_grid_model_is_quantized_on_the_way_in():
    model = models.tiny_cnn()
    randomize(model)
    w = model.get_layer("fc").kernel.numpy()
    compressed = encode_model(model, bits=4, steps={"fc/kernel": 0.05})
    assert not compressed.report.settings["lossless"]
    restored = compressed.to_model()
    expected = np.clip(np.round(w / np.float32(0.05)), -8, 7).astype(np.float32) * np.float32(0.05)
    np.testing.assert_array_equal(restored.get_layer("fc").kernel.numpy(), expected)


def test_report_accounting_is_consistent(tmp_path):
    model = bn_depthwise_model()
    randomize(model, sparsity=0.8)
    steps = quantize_weights(model, bits=4, per_channel=True)
    report = save_compressed(model, tmp_path / "m.tfqz", bits=4, steps=steps)
    assert report.float32_bytes == 4 * model.count_params()
    assert report.params == model.count_params()
    by_name = {l.name: l for l in report.layers}
    assert set(by_name) == {"c", "bn", "dw", "s", "d"}
    # BatchNorm (4 vectors of 8) and all biases stay float32
    assert by_name["bn"].float_bytes == 4 * 4 * 8 and by_name["bn"].bits is None
    assert by_name["c"].float_bytes == 4 * 8 and by_name["d"].float_bytes == 4 * 5
    # per-channel steps: one float32 per output channel (depthwise: in-channels x multiplier)
    assert by_name["c"].step_bytes == 4 * 8
    assert by_name["dw"].step_bytes == 4 * 8 * 2
    assert by_name["d"].step_bytes == 4 * 5
    assert by_name["s"].step_bytes == 4 * (16 + 6)  # depthwise (16 = 16 x 1) + pointwise (6)
    assert by_name["s"].kernel_params == 3 * 3 * 16 + 16 * 6
    for l in report.layers:
        total = l.coded_bytes + l.table_bytes + l.index_bytes + l.float_bytes + l.step_bytes
        assert l.total_bytes == total
        assert l.ratio == pytest.approx(l.float32_bytes / total)
        if l.bits is not None:
            kernels = [w.numpy() for w in model.get_layer(l.name).weights if w.shape.rank > 1]
            zeros = sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels)
            assert l.pruned_fraction == pytest.approx(zeros)
            assert l.coded_bytes + l.index_bytes >= l.stream_entropy_bytes - 2
    totals = report.to_dict()["total"]
    parts = sum(totals[k] for k in ("coded_bytes", "table_bytes", "index_bytes", "float_bytes",
                                    "step_bytes"))
    assert totals["total_bytes"] == parts
    assert totals["ratio"] == pytest.approx(report.float32_bytes / parts)
    assert report.to_dict()["accounting"] == ACCOUNTING
    text = str(report)
    assert "TOTAL" in text and f"{report.ratio:.2f}x" in text
    # the report travels inside the file
    stored = inspect_compressed(tmp_path / "m.tfqz")
    assert stored.to_dict()["total"]["total_bytes"] == parts
    assert stored.file_bytes == os.path.getsize(tmp_path / "m.tfqz")


@pytest.fixture
def good_file(tmp_path):
    model = models.tiny_cnn()
    randomize(model)
    path = tmp_path / "good.tfqz"
    save_compressed(model, path, bits=4, steps=quantize_weights(model, bits=4))
    return path, path.read_bytes()


def _write(tmp_path, data):
    p = tmp_path / "bad.tfqz"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("keep", [0, 5, 20, 100, -1])
def test_truncated_file_is_rejected(tmp_path, good_file, keep):
    _, data = good_file
    cut = data[:keep] if keep >= 0 else data[:-1]
    with pytest.raises(TfqzError, match="truncated"):
        load_compressed(_write(tmp_path, cut))


def test_flipped_byte_is_rejected(tmp_path, good_file):
    _, data = good_file
    rng = np.random.default_rng(0)
    for pos in list(rng.integers(24, len(data) - 4, size=10)) + [len(data) - 1]:
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(TfqzError, match="corrupted|CRC"):
            load_compressed(_write(tmp_path, bytes(bad)))


def test_wrong_magic_version_and_trailing_bytes(tmp_path, good_file):
    _, data = good_file
    with pytest.raises(TfqzError, match="not a .tfqz file"):
        load_compressed(_write(tmp_path, b"PK\x03\x04" + data[4:]))
    bumped = data[:8] + struct.pack("<H", 2) + data[10:]
    with pytest.raises(TfqzError, match="version 2"):
        load_compressed(_write(tmp_path, bumped))
    with pytest.raises(TfqzError, match="trailing"):
        load_compressed(_write(tmp_path, data + b"\x00"))
    # a well-formed container with a consistent CRC but a flag we do not know
    body = bytearray(data[:-4])
    body[10] = 1
    with pytest.raises(TfqzError, match="flags"):
        load_compressed(_write(tmp_path, bytes(body) + struct.pack("<I", zlib.crc32(body))))


def test_argument_errors_name_the_argument():
    model = models.tiny_cnn()
    with pytest.raises(ValueError, match="bits"):
        encode_model(model, bits=1)
    with pytest.raises(ValueError, match="layers"):
        encode_model(model, bits=4, layers=["nope"])
    with pytest.raises(ValueError, match="mode"):
        encode_model(model, bits=4, mode="zip")
    with pytest.raises(ValueError, match="steps"):
        encode_model(model, bits=4, steps={"fc/kernel": np.ones(3)})
    with pytest.raises(TypeError, match="model"):
        encode_model("model.keras", bits=4)


def test_only_named_layers_are_coded():
    model = models.tiny_cnn()
    report = encode_model(model, bits=4, layers=["fc"]).report
    coded = {l.name for l in report.layers if l.bits is not None}
    assert coded == {"fc"}
    conv1 = next(l for l in report.layers if l.name == "conv1")
    assert conv1.float_bytes == conv1.float32_bytes


def test_misspelled_step_key_and_subclassed_model_are_refused(subclassed_model):
    model = models.tiny_cnn()
    with pytest.raises(ValueError, match="not coded kernels.*fc1/kernel"):
        encode_model(model, bits=4, steps={"fc1/kernel": np.float32(0.1)})

    sub = subclassed_model()
    sub(np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="subclassed"):
        encode_model(sub, bits=4)
