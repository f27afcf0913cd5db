"""Unusual model inputs through the converters and runners: several inputs that the TFLite
converter reorders (matched by name), inputs of unknown height x width, and integer (token id)
inputs that TFLite does not quantize.

Oracles: the Keras model's own outputs, the order the converter actually chose (read from the
file), and LiteRT driven directly.
"""

import numpy as np
import pytest

from tfqreg import ptq
from tfqreg._keras import keras, tf
from tfqreg.deploy import Runner, read_tflite, to_micro, to_tflite


@pytest.fixture(scope="module")
def img_meta():
    """Two inputs, ``img`` then ``meta`` in Keras; the converter puts ``meta`` first."""
    keras.utils.set_random_seed(0)
    img = keras.Input((6, 6, 1), name="img")
    meta = keras.Input((3,), name="meta")
    h = keras.layers.Flatten()(keras.layers.Conv2D(4, 3, activation="relu")(img))
    out = keras.layers.Dense(5, activation="softmax")(
        keras.layers.Concatenate()([h, keras.layers.Dense(8, activation="relu")(meta)]))
    model = keras.Model([img, meta], out)
    rng = np.random.default_rng(0)
    xs = [rng.uniform(size=(200, 6, 6, 1)).astype(np.float32),
          rng.uniform(size=(200, 3)).astype(np.float32)]
    return model, xs


def test_the_converter_reorders_the_two_inputs(img_meta):
    model, _ = img_meta
    flat = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    graph = read_tflite(flat)
    # the setup this module tests: file order differs from Keras order
    assert [graph.input_name(k) for k in range(2)] == ["meta", "img"]
    assert model.input_names == ["img", "meta"]
    assert [graph.tensor(i).shape[1:] for i in graph.inputs] == [[3], [6, 6, 1]]


@pytest.mark.parametrize("mode", ["float", "int8"])
def test_two_inputs_end_to_end(img_meta, mode):
    model, xs = img_meta
    kwargs = {"representative_data": xs} if mode == "int8" else {}
    res = to_tflite(model, mode=mode, sample=[a[:64] for a in xs], **kwargs)
    assert res.report.parity.passed
    assert res.input_names == ["img", "meta"]
    want = model.predict(xs, verbose=0)
    got = res.predict(xs)                                   # a list, in Keras' order
    got_dict = res.predict({"meta": xs[1], "img": xs[0]})   # by name
    np.testing.assert_array_equal(got, got_dict)
    if mode == "float":
        assert res.report.parity.max_abs_diff < 1e-5
        np.testing.assert_allclose(got, want, atol=1e-5)
    else:
        assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.97
        assert np.abs(got - want).max() < 0.1
    # the runner on its own takes a list in the FILE's order (meta first), or names
    runner = Runner(res.flatbuffer)
    assert runner.input_names == ["meta", "img"]
    np.testing.assert_array_equal(runner.predict([xs[1], xs[0]]), got)
    with pytest.raises(ValueError, match=r"`x` has the inputs \['img'\]"):
        runner.predict({"img": xs[0]})
    with pytest.raises(ValueError, match="input_names"):
        Runner(res.flatbuffer, input_names=["img", "other"])


def test_two_inputs_in_keras_order_would_be_wrong(img_meta):
    """The failure the name matching prevents: the arrays fed by position in Keras' order
    reach the wrong tensors (here they do not even fit)."""
    model, xs = img_meta
    res = to_tflite(model, mode="float", sample=[a[:8] for a in xs])
    with pytest.raises(Exception):
        Runner(res.flatbuffer).predict([a[:8] for a in xs])


def test_ptq_refuses_several_inputs_by_name(img_meta):
    model, xs = img_meta
    y = np.zeros(len(xs[0]), np.int64)
    with pytest.raises(ValueError, match=r"^`model` has 2 inputs \['img', 'meta'\]"):
        ptq.sweep(model, (xs, y))
    with pytest.raises(ValueError, match=r"^`model` has 2 inputs"):
        ptq.quantize(model, 8, activation_bits=8, calibration_data=xs)
    with pytest.raises(ValueError, match=r"^`model` has 2 inputs"):
        ptq.sweep(model, (xs, y), weight_bits=(8,))


@pytest.fixture(scope="module")
def any_size():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((None, None, 1)), keras.layers.Conv2D(3, 3),
                             keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4)])


def test_unknown_height_width(any_size, tmp_path):
    x = np.random.default_rng(1).uniform(size=(6, 10, 12, 1)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^`sample` is needed.*unknown size \(N, \?, \?, 1\)"):
        to_tflite(any_size, mode="float")           # no data to make up inputs from
    res = to_tflite(any_size, mode="float", sample=x)
    assert res.report.parity.passed and res.report.parity.max_abs_diff < 1e-5
    np.testing.assert_allclose(res.predict(x), any_size.predict(x, verbose=0), atol=1e-5)
    # another size in the same runner
    x2 = np.random.default_rng(2).uniform(size=(3, 7, 5, 1)).astype(np.float32)
    np.testing.assert_allclose(res.predict(x2), any_size.predict(x2, verbose=0), atol=1e-5)
    with pytest.raises(ValueError, match=r"^`backend`='micro' needs static input shapes"):
        Runner(res.flatbuffer, "micro")
    with pytest.raises(ValueError, match=r"^`model` input\(s\) .* unknown size"):
        to_micro(any_size, x, tmp_path)
    y = any_size.predict(x, verbose=0).argmax(1)
    sweep = ptq.sweep(any_size, (x, y), weight_bits=(8,), progress=False)  # PTQ: any size
    assert sweep.rows[0].accuracy == 1.0 and sweep.rows[1].weight_bits == 8


def test_embedding_token_ids_are_not_quantized():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(10, 4),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    ids = np.random.default_rng(0).integers(0, 10, (300, 5)).astype(np.int32)
    with pytest.raises(ValueError, match=r"^`sample` is needed.*takes int32 values"):
        to_tflite(model, mode="float")
    want = model.predict(ids, verbose=0)
    res = to_tflite(model, mode="float", sample=ids)
    np.testing.assert_allclose(res.predict(ids), want, atol=1e-5)
    res8 = to_tflite(model, mode="int8", representative_data=ids)
    graph = read_tflite(res8.flatbuffer)
    assert graph.tensor(graph.inputs[0]).dtype == "int32"     # ids as they are
    assert graph.tensor(graph.outputs[0]).dtype == "int8"
    assert res8.report.parity.passed
    got = res8.predict(ids)
    # an untrained softmax is near uniform: int8 (1/256 steps) ties Keras' class often
    assert np.mean(got[np.arange(len(got)), want.argmax(1)] == got.max(1)) >= 0.99
    assert np.abs(got - want).max() <= 2 / 256
    with pytest.raises(TypeError, match="takes int32 values"):
        to_tflite(model, mode="float", sample=ids.astype(np.float32))
    with pytest.raises(TypeError, match=r"`x\['.*'\]` has dtype float32"):
        res.predict(ids.astype(np.float32))


def test_two_inputs_on_tflite_micro(img_meta, tmp_path):
    """to_micro feeds TFLite Micro and LiteRT by name too: both agree with Keras."""
    model, xs = img_meta
    res = to_micro(model, xs, str(tmp_path), name="two", sample=[a[:40] for a in xs])
    assert res.micro_vs_litert["identical_fraction"] == 1.0
    assert "PASS" in res.report.extra["micro_parity"]
    want = model.predict([a[:40] for a in xs], verbose=0)
    got = Runner(res.flatbuffer, "micro", input_names=["img", "meta"]).predict(
        [a[:40] for a in xs])
    assert np.abs(got - want).max() < 0.1
