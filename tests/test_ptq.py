"""Post-training quantization on demand: grid checks, calibration, sweeps, TFLite agreement."""

import csv
import json

import numpy as np
import pytest

import tfqreg
from tfqreg import models, ptq
from tfqreg._keras import keras, tf


# ----------------------------------------------------------------------------- NumPy oracles
def np_grid_values(w, bits, axes):
    """The tfqreg grid computed in NumPy (float64): δ·clip(round(w/δ)), δ = max|w|/(2^(b-1)-1)."""
    w = np.asarray(w, np.float64)
    if axes is None:
        m = np.abs(w).max()
    else:
        keep = {a % w.ndim for a in axes}
        m = np.abs(w).max(axis=tuple(a for a in range(w.ndim) if a not in keep), keepdims=True)
    step = m / (2 ** (bits - 1) - 1)
    return step * np.clip(np.round(w / step), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1), step


def np_fake_quant_activation(x, lo, hi, bits):
    """TFLite's nudged asymmetric scheme in NumPy."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    q = 2 ** bits - 1
    scale = (hi - lo) / q
    zp = np.clip(np.round(-lo / scale), 0, q)
    nlo, nhi = -zp * scale, (q - zp) * scale
    return np.round((np.clip(x, nlo, nhi) - nlo) / scale) * scale + nlo


def _channels(w, axes):
    """Iterate the per-channel slices of a kernel (``axes`` = channel axes) or the whole."""
    if axes is None:
        yield w.reshape(-1)
        return
    keep = sorted(a % w.ndim for a in axes)
    moved = np.moveaxis(w, keep, list(range(w.ndim - len(keep), w.ndim)))
    flat = moved.reshape(-1, int(np.prod([w.shape[a] for a in keep])))
    for c in range(flat.shape[1]):
        yield flat[:, c]


def functional_model():
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="conv")(inp)
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, activation="relu", name="dw")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(16, activation="relu", name="fc1")(h)
    out = keras.layers.Dense(10, activation="softmax", name="fc2")(h)
    return keras.Model(inp, out, name="functional")


def _randomize(model, seed=0):
    """Spread kernels unevenly across channels (so per-channel and per-tensor differ)."""
    rng = np.random.default_rng(seed)
    for layer in ptq.quantizable_layers(model):
        var = layer.depthwise_kernel if isinstance(layer, keras.layers.DepthwiseConv2D) \
            else layer.kernel
        w = rng.normal(size=var.shape) * rng.uniform(0.1, 3.0, size=var.shape[-1])
        var.assign(w.astype(np.float32))
    return model


def _kernel(layer):
    return (layer.depthwise_kernel if isinstance(layer, keras.layers.DepthwiseConv2D)
            else layer.kernel).numpy()


# ----------------------------------------------------------------------------- weights
@pytest.mark.parametrize("builder", [models.tiny_cnn, functional_model])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False])
def test_kernels_on_grid_and_input_model_untouched(builder, bits, per_channel):
    model = _randomize(builder())
    before = [w.copy() for w in model.get_weights()]
    q = ptq.quantize(model, bits, per_channel=per_channel)
    assert q is not model
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)  # input model untouched
    orig = {l.name: l for l in ptq.quantizable_layers(model)}
    qlayers = ptq.quantizable_layers(q)
    assert [l.name for l in qlayers] == list(orig)
    for layer in qlayers:
        w, qw = _kernel(orig[layer.name]), _kernel(layer)
        axes = tfqreg.grid.channel_axes_for(layer) if per_channel else None
        ref, step = np_grid_values(w, bits, axes)
        np.testing.assert_allclose(qw, ref, rtol=1e-6, atol=1e-7)
        for channel in _channels(qw, axes):
            assert len(np.unique(channel)) <= 2 ** bits
        # indices are integers on the grid
        idx = qw / step
        np.testing.assert_allclose(idx, np.round(idx), atol=1e-3)
        # biases and everything else are copied unchanged
        for a, b in zip(orig[layer.name].get_weights()[1:], layer.get_weights()[1:]):
            np.testing.assert_array_equal(a, b)
    if "bn" in [l.name for l in model.layers]:  # BatchNorm statistics copied unchanged
        for a, b in zip(model.get_layer("bn").get_weights(), q.get_layer("bn").get_weights()):
            np.testing.assert_array_equal(a, b)


def test_per_channel_beats_per_tensor_on_uneven_channels():
    model = _randomize(models.tiny_cnn())
    x = np.random.default_rng(0).uniform(0, 1, (64, 28, 28, 1)).astype(np.float32)
    ref = model.predict(x, verbose=0)
    err = {pc: np.abs(ptq.quantize(model, 3, per_channel=pc).predict(x, verbose=0) - ref).mean()
           for pc in (True, False)}
    assert err[True] < err[False]


def test_larq_binary_layers_are_left_alone():
    assert ptq.quantizable_layers(models.bnn()) == []
    with pytest.raises(ValueError, match="no quantizable layer"):
        ptq.quantize(models.bnn(), 4)


# ----------------------------------------------------------------------------- activations
@pytest.mark.parametrize("builder", [models.tiny_cnn, functional_model])
def test_activations_calibrated_and_quantized(builder):
    model = _randomize(builder(), seed=1)
    rng = np.random.default_rng(2)
    calib = rng.uniform(0, 1, (96, 28, 28, 1)).astype(np.float32)
    x = rng.uniform(-0.2, 1.3, (16, 28, 28, 1)).astype(np.float32)  # partly outside the range
    q = ptq.quantize(model, 8, activation_bits=3, calibration_data=calib)
    wrappers = [l for l in q.layers if isinstance(l, ptq.ActivationFakeQuant)]
    # where TFLite quantizes: every fused op's output, the pooled average, the BatchNorm that
    # follows a ReLU (it cannot fold: a float multiply-add), and the logits of the softmax layer
    expected = (["conv1", "conv2", "gap", "fc"] if builder is models.tiny_cnn
                else ["conv", "dw", "bn", "gap", "fc1", "fc2"])
    assert sorted(w.layer.name for w in wrappers) == sorted(expected)
    split = [w for w in wrappers if w.activation is not None]
    assert [w.layer.name for w in split] == (["fc"] if builder is models.tiny_cnn else ["fc2"])
    assert all(w.layer.activation is keras.activations.linear for w in split)
    first = [w for w in wrappers if w.quantize_input]
    assert len(first) == 1
    assert first[0].layer.name == ("conv1" if builder is models.tiny_cnn else "conv")
    # the input range is the calibration data's min/max (widened to contain 0)
    assert first[0].input_min.numpy() == 0.0
    assert first[0].input_max.numpy() == pytest.approx(calib.max())
    # every quantized output has at most 2^3 distinct values
    probe = keras.Model(q.inputs, [w.output for w in wrappers])
    for out in probe.predict(x, verbose=0):
        assert len(np.unique(out)) <= 8
    # the first wrapper computes Q_out(layer(Q_in(x))) with TFLite's scheme
    w = first[0]
    inner = w.layer(np_fake_quant_activation(x, 0.0, calib.max(), 3).astype(np.float32))
    expected = np_fake_quant_activation(inner.numpy(), float(w.output_min.numpy()),
                                        float(w.output_max.numpy()), 3)
    np.testing.assert_allclose(w(tf.constant(x)).numpy(), expected, atol=1e-5)


def test_ptq_model_round_trips(tmp_path):
    model = _randomize(functional_model())
    calib = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype(np.float32)
    q = ptq.quantize(model, 4, activation_bits=6, calibration_data=calib)
    expected = q.predict(calib, verbose=0)
    for path in (tmp_path / "p.keras", tmp_path / "p.h5", tmp_path / "saved"):
        q.save(str(path))
        loaded = keras.models.load_model(str(path))
        np.testing.assert_allclose(loaded.predict(calib, verbose=0), expected, atol=1e-6)
        assert sum(isinstance(l, ptq.ActivationFakeQuant) for l in loaded.layers) == 6
    wrapper = q.layers[1]
    back = ptq.ActivationFakeQuant.from_config(wrapper.get_config())
    assert back.bits == 6 and back.quantize_input


# ----------------------------------------------------------------------------- bad input
def test_bad_input_raises_clear_errors():
    model = models.tiny_cnn()
    x = np.zeros((4, 28, 28, 1), np.float32)
    for bits in (1, 17):
        with pytest.raises(ValueError, match="weight_bits"):
            ptq.quantize(model, bits)
        with pytest.raises(ValueError, match="activation_bits"):
            ptq.quantize(model, 8, activation_bits=bits, calibration_data=x)
    with pytest.raises(TypeError, match="weight_bits"):
        ptq.quantize(model, 4.0)
    with pytest.raises(ValueError, match="calibration_data"):
        ptq.quantize(model, 8, activation_bits=8)
    with pytest.raises(ValueError, match="calibration_data.*shape"):
        ptq.quantize(model, 8, activation_bits=8, calibration_data=np.zeros((4, 32, 32, 3)))
    with pytest.raises(ValueError, match="calibration_data.*shape"):
        ptq.quantize(model, 8, activation_bits=8, calibration_data=np.zeros((28, 28, 1)))
    with pytest.raises(TypeError, match="per_channel"):
        ptq.quantize(model, 8, per_channel=1)
    flat = keras.Sequential([keras.layers.InputLayer((4, 4)), keras.layers.Flatten()])
    with pytest.raises(ValueError, match="no quantizable layer"):
        ptq.quantize(flat, 4)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    with pytest.raises(TypeError, match="subclassed"):
        ptq.quantize(Sub(), 4)
    keras3 = pytest.importorskip("keras")
    k3 = keras3.Sequential([keras3.Input((3,)), keras3.layers.Dense(2)])
    assert isinstance(ptq.quantize(k3, 4), keras.Model)  # Keras 3: through its tf_keras mirror

    class Sub3(keras3.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed Keras 3 model"):
        ptq.quantize(Sub3(), 4)
    with pytest.raises(ValueError, match="labels"):
        ptq.sweep(k3, (np.zeros((2, 3), np.float32), np.zeros(3)), progress=False)
    with pytest.raises(ValueError, match="labels"):
        ptq.sweep(model, (x, np.zeros(3)), weight_bits=(8,), progress=False)


# ----------------------------------------------------------------------------- sweeps
@pytest.fixture(scope="module")
def trained(fashion_small):
    (x, y), (xt, yt) = fashion_small
    keras.utils.set_random_seed(0)
    model = models.small_cnn()
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=2, verbose=0)
    return model


def test_sweep_on_trained_model(trained, fashion_small, tmp_path):
    (x, _), (xt, yt) = fashion_small
    before = [w.copy() for w in trained.get_weights()]
    result = ptq.sweep(trained, (xt, yt), weight_bits=(16, 8, 4, 2), calibration_data=x[:512],
                       extra=[(8, 8), (4, 4)], progress=False)
    for a, b in zip(before, trained.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [(r.weight_bits, r.activation_bits) for r in result.rows] == [
        (None, None), (16, None), (8, None), (4, None), (2, None), (8, 8), (4, 4)]
    # float row = the model's own accuracy and loss
    loss, acc = trained.evaluate(xt, yt, verbose=0)
    assert result.float_accuracy == pytest.approx(acc, abs=1e-6)
    assert result.rows[0].loss == pytest.approx(loss, rel=1e-3)
    assert result.float_accuracy > 0.75
    # 16-bit PTQ is lossless to < 0.1 pt; 8 bits nearly so; 2 bits hurts
    assert abs(result.accuracy(16) - result.float_accuracy) < 0.001
    assert abs(result.accuracy(8) - result.float_accuracy) < 0.005
    assert result.accuracy(2) < result.accuracy(8)
    # each row equals the accuracy of the model `quantize` returns
    q4 = ptq.quantize(trained, 4)
    assert result.accuracy(4) == pytest.approx(
        np.mean(q4.predict(xt, verbose=0).argmax(-1) == yt), abs=1e-9)
    q44 = ptq.quantize(trained, 4, activation_bits=4, calibration_data=x[:512])
    assert result.accuracy(4, 4) == pytest.approx(
        np.mean(q44.predict(xt, verbose=0).argmax(-1) == yt), abs=1e-9)

    # reports: table, JSON, CSV, plot
    text = str(result)
    assert "fp32" in text and f"{100 * result.float_accuracy:.2f}%" in text
    assert len(text.splitlines()) == 2 + len(result.rows)
    path = result.to_json(str(tmp_path / "r.json"))
    data = json.load(open(path))
    assert data["rows"][3] == {"weight_bits": 4, "activation_bits": None,
                               "accuracy": result.accuracy(4), "loss": result.rows[3].loss}
    assert ptq.SweepResult.from_dict(data) == result
    rows = list(csv.DictReader(open(result.to_csv(str(tmp_path / "r.csv")))))
    assert len(rows) == 7 and rows[6]["weight_bits"] == "4" and rows[6]["activation_bits"] == "4"
    assert float(rows[2]["accuracy"]) == pytest.approx(result.accuracy(8), abs=1e-6)
    png = result.plot(str(tmp_path / "r.png"))
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_sweep(trained, data_dir, tfds_dir, tmp_path):
    from tfqreg import cli

    path = str(tmp_path / "m.keras")
    trained.save(path)
    out = str(tmp_path / "out.json")
    code = cli.main(["sweep", path, "--data", "fashion_mnist", "--data-dir", data_dir,
                     "--tfds-dir", tfds_dir, "--bits", "8", "3", "--per-tensor",
                     "--activation-bits", "8", "--limit", "500", "--json", out])
    assert code == 0
    data = json.load(open(out))
    assert data["per_channel"] is False and data["num_examples"] == 500
    assert [(r["weight_bits"], r["activation_bits"]) for r in data["rows"]] == [
        (None, None), (8, 8), (3, 8)]


def _tflite_int8_accuracy(model, rep, xt, yt):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([rep[i:i + 1]] for i in range(len(rep)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=converter.convert())
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.resize_tensor_input(inp["index"], (1000, 28, 28, 1))
    interp.allocate_tensors()
    s, z = inp["quantization"]
    correct = 0
    for i in range(0, len(xt), 1000):
        interp.set_tensor(inp["index"],
                          np.clip(np.round(xt[i:i + 1000] / s + z), -128, 127).astype(np.int8))
        interp.invoke()
        correct += int((interp.get_tensor(out["index"]).argmax(-1) == yt[i:i + 1000]).sum())
    return correct / len(xt)


@pytest.mark.slow
def test_8bit_ptq_agrees_with_tflite_int8(trained, data_dir, tfds_dir):
    (x, _), (xt, yt) = tfqreg.datasets.load_numpy("fashion_mnist", data_dir, tfds_dir)
    assert len(xt) == 10_000
    rep = x[:200]
    lite = _tflite_int8_accuracy(trained, rep, xt, yt)
    result = ptq.sweep(trained, (xt, yt), weight_bits=(8,), activation_bits=8,
                       calibration_data=rep, progress=False)
    print(f"\nPTQ-W8A8 {result.accuracy(8, 8):.4f} TFLite-int8 {lite:.4f} "
          f"fp32 {result.float_accuracy:.4f}")
    assert abs(result.accuracy(8, 8) - lite) < 0.005, (result.accuracy(8, 8), lite)
    assert abs(result.float_accuracy - lite) < 0.01


# ----------------------------------------------------------------------------- no silent wrong
def test_labels_follow_keras_rule_and_out_of_range_is_refused(trained, fashion_small):
    (x, _), (xt, yt) = fashion_small
    xt, yt = xt[:500], yt[:500]
    flat = ptq.sweep(trained, (xt, yt), weight_bits=(8,), progress=False)
    column = ptq.sweep(trained, (xt, yt[:, None]), weight_bits=(8,), progress=False)
    onehot = ptq.sweep(trained, (xt, np.eye(10)[yt]), weight_bits=(8,), progress=False)
    keras_acc = np.mean(trained.predict(xt, verbose=0).argmax(-1) == yt)
    assert column.rows == flat.rows == onehot.rows
    assert flat.float_accuracy == pytest.approx(keras_acc, abs=1e-6)
    for bad in (np.where(yt == 0, 10, yt), np.where(yt == 0, -1, yt)):
        with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
            ptq.sweep(trained, (xt, bad), weight_bits=(8,), progress=False)
    with pytest.raises(ValueError, match="whole numbers"):
        ptq.sweep(trained, (xt, yt + 0.5), weight_bits=(8,), progress=False)


def test_calibration_data_is_checked_like_to_tflite(trained, fashion_small):
    (x, _), _ = fashion_small
    calib = x[:512].copy()
    calib[3, 5, 5, 0] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*example\(s\) \[3\]"):
        ptq.quantize(trained, 8, activation_bits=8, calibration_data=calib)
    calib[3, 5, 5, 0] = np.inf
    with pytest.raises(ValueError, match="non-finite"):
        ptq.quantize(trained, 8, activation_bits=8, calibration_data=calib)
    with pytest.raises(TypeError, match="x / 255"):
        ptq.quantize(trained, 8, activation_bits=8,
                     calibration_data=(x[:64] * 255).astype(np.uint8))


def test_cli_sweep_errors_are_one_line_before_any_work(trained, tmp_path, capsys):
    from tfqreg import cli

    path = str(tmp_path / "m.keras")
    trained.save(path)
    existing = tmp_path / "r.json"
    existing.write_text("{}")
    (tmp_path / "bad.keras").write_bytes(b"not a model")
    cases = [
        ([str(tmp_path / "missing.keras")], "does not exist"),
        ([str(tmp_path / "bad.keras")], "could not load a Keras model"),
        ([path, "--bits", "1"], "--bits 1"),
        ([path, "--limit", "0"], "--limit 0"),
        ([path, "--limit", "-5"], "--limit -5"),
        ([path, "--json", str(tmp_path)], "is a folder"),
        ([path, "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
        ([path, "--json", str(existing)], "--overwrite"),
    ]
    for argv, message in cases:
        assert cli.main(["sweep"] + argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("tfqreg sweep: error:") and message in err, (argv, err)
        assert "\n" not in err and "Traceback" not in err
