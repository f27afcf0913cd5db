"""tfqreg.deploy.convert: TFLite float/dynamic/int8 and LCE conversion, parity, errors.

Oracles: Keras' own predictions, the LiteRT interpreter driven directly (not through
tfqreg.deploy.Runner), and LCE's interpreter.
"""

import numpy as np
import pytest

import larq as lq
from ai_edge_litert.interpreter import Interpreter

from tfqreg import deploy, models
from tfqreg._keras import keras, tf


def _litert_predict(flat, x):
    """Run a batch-1 model sample by sample, straight through ai_edge_litert."""
    it = Interpreter(model_content=flat)
    it.allocate_tensors()
    d, o = it.get_input_details()[0], it.get_output_details()[0]
    s, z = d["quantization"]
    so, zo = o["quantization"]
    ys = []
    for i in range(len(x)):
        xi = x[i:i + 1]
        if d["dtype"] != np.float32:
            info = np.iinfo(d["dtype"])
            xi = np.clip(np.round(xi / s + z), info.min, info.max).astype(d["dtype"])
        it.set_tensor(d["index"], xi)
        it.invoke()
        y = it.get_tensor(o["index"]).astype(np.float32)
        ys.append((y - zo) * so if o["dtype"] != np.float32 else y)
    return np.concatenate(ys)


@pytest.fixture(scope="module")
def tiny():
    keras.utils.set_random_seed(1)
    return models.tiny_cnn()


def test_float_parity_and_static_batch(tiny):
    x = np.random.default_rng(0).uniform(size=(40, 28, 28, 1)).astype("float32")
    res = deploy.to_tflite(tiny, mode="float", sample=x)
    r = res.report
    assert r.inputs[0]["shape_signature"] == [1, 28, 28, 1]  # static batch 1
    assert r.parity.passed and r.parity.samples == 40
    direct = _litert_predict(res.flatbuffer, x)
    keras_y = tiny.predict(x, verbose=0)
    np.testing.assert_allclose(direct, keras_y, atol=1e-5)
    assert r.parity.max_abs_diff == pytest.approx(np.abs(direct - keras_y).max(), abs=1e-7)
    assert r.tflite_bytes == len(res.flatbuffer)
    assert r.keras_float32_bytes == 4 * tiny.count_params()
    assert "CONV_2D x2" in r.to_text()


def test_dynamic_batch_is_kept_when_asked(tiny):
    res = deploy.to_tflite(tiny, mode="float", batch_size=None)
    assert res.report.inputs[0]["shape_signature"][0] == -1
    x = np.random.default_rng(1).uniform(size=(7, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(res.predict(x), tiny.predict(x, verbose=0), atol=1e-5)


@pytest.mark.parametrize("io_dtype", ["int8", "uint8", "float32"])
def test_int8_io_types_and_runner(tiny, fashion_small, io_dtype):
    x = fashion_small[0][0][:200]
    res = deploy.to_tflite(tiny, mode="int8", representative_data=x, io_dtype=io_dtype,
                           min_agreement=0.0)
    assert res.report.inputs[0]["dtype"] == io_dtype
    assert res.report.outputs[0]["dtype"] == io_dtype
    graph = deploy.read_tflite(res.flatbuffer)
    kinds = {graph.tensor(i).dtype for op in graph.ops if op.name == "CONV_2D"
             for i in op.outputs}
    assert kinds == {"int8"}  # activations are integer inside, whatever the io type
    xt = fashion_small[1][0][:50]
    np.testing.assert_allclose(res.predict(xt), _litert_predict(res.flatbuffer, xt), atol=1e-6)
    # a few int8 steps of the softmax output away from Keras at most
    assert res.report.parity.max_abs_diff < 0.05


def test_dynamic_range_mode(tiny, fashion_small):
    res = deploy.to_tflite(tiny, mode="dynamic", sample=fashion_small[1][0][:100],
                           min_agreement=0.9)
    assert res.report.inputs[0]["dtype"] == "float32"
    assert res.report.tflite_bytes < deploy.to_tflite(tiny, check=False).report.tflite_bytes


@pytest.mark.slow
def test_int8_top1_agreement_on_fashion_mnist_test_set(data_dir, tfds_dir):
    """A small CNN trained 1 epoch on real Fashion-MNIST keeps >= 99% of its top-1 decisions
    after full-integer conversion, on the 10,000 test images."""
    from tfqreg import datasets

    (x, y), (xt, yt) = datasets.load_numpy("fashion_mnist", data_dir, tfds_dir)
    model = keras.Sequential([
        keras.layers.InputLayer((28, 28, 1)),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0)
    res = deploy.to_tflite(model, mode="int8", representative_data=x[:500], sample=xt)
    p = res.report.parity
    print(p.to_text())
    # counting a tie of the int8 softmax with Keras' class as agreement (parity's rule); the
    # strict figure is lower by the ties (one run: 98.99 % strict)
    assert p.samples == 10_000 and p.passed and p.top1_agreement_ties >= 0.99
    assert p.top1_agreement_ties >= p.top1_agreement >= 0.98
    keras_acc = np.mean(model.predict(xt, verbose=0).argmax(1) == yt)
    tflite_acc = np.mean(res.predict(xt).argmax(1) == yt)
    assert keras_acc > 0.8
    assert abs(keras_acc - tflite_acc) < 0.01


# ---- bad input ---------------------------------------------------------------------------


def test_representative_data_wrong_shape_names_expected_shape(tiny):
    with pytest.raises(ValueError, match=r"expects \(N, 28, 28, 1\)"):
        deploy.to_tflite(tiny, mode="int8", representative_data=np.zeros((10, 28, 28), "f4"))


def test_representative_data_wrong_dtype(tiny):
    with pytest.raises(TypeError, match=r"dtype uint8.*float32.*\(N, 28, 28, 1\)"):
        deploy.to_tflite(tiny, mode="int8",
                         representative_data=np.zeros((10, 28, 28, 1), np.uint8))


def test_representative_data_generator_and_dataset_forms(tiny, fashion_small):
    x = fashion_small[0][0][:64]
    ds = tf.data.Dataset.from_tensor_slices((x, fashion_small[0][1][:64])).batch(16)
    a = deploy.to_tflite(tiny, mode="int8", representative_data=ds, check=False)
    b = deploy.to_tflite(tiny, mode="int8", representative_data=lambda: ([x[i:i + 1]]
                                                                          for i in range(64)),
                         check=False)
    c = deploy.to_tflite(tiny, mode="int8", representative_data=x, check=False)
    assert a.report.inputs[0]["scale"] == b.report.inputs[0]["scale"] == \
        c.report.inputs[0]["scale"]
    bad = tf.data.Dataset.from_tensor_slices(np.zeros((8, 32, 32, 1), "f4")).batch(4)
    with pytest.raises(ValueError, match="expects"):
        deploy.to_tflite(tiny, mode="int8", representative_data=bad)


def test_int8_requires_representative_data(tiny):
    with pytest.raises(ValueError, match="representative_data"):
        deploy.to_tflite(tiny, mode="int8")


@pytest.mark.parametrize("kwargs, name", [
    (dict(mode="int4"), "mode"),
    (dict(mode="float", io_dtype="int8"), "io_dtype"),
    (dict(batch_size=0), "batch_size"),
    (dict(min_agreement=2.0), "min_agreement"),
])
def test_bad_arguments_are_named(tiny, kwargs, name):
    with pytest.raises(ValueError, match=name):
        deploy.to_tflite(tiny, **kwargs)


def test_not_a_keras2_model():
    with pytest.raises(TypeError, match="model"):
        deploy.to_tflite("model.keras")


def _lambda_model(fn):
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, name="conv")(inp)
    h = keras.layers.Lambda(fn, name="odd")(h)
    out = keras.layers.Dense(3)(keras.layers.Flatten()(h))
    return keras.Model(inp, out)


def test_op_without_int8_kernel_is_named():
    """TFLite keeps CUMSUM in float even with int8-only ops: caught and named."""
    model = _lambda_model(lambda t: tf.math.cumsum(t, axis=1))
    x = np.random.default_rng(0).uniform(size=(20, 8, 8, 1)).astype("float32")
    with pytest.raises(deploy.ConversionError, match=r"CUMSUM \(op #\d+") as e:
        deploy.to_tflite(model, mode="int8", representative_data=x)
    assert "allow_float_ops" in str(e.value)
    res = deploy.to_tflite(model, mode="int8", representative_data=x, allow_float_ops=True,
                           min_agreement=0.0)
    assert any("CUMSUM" in n for n in res.report.notes)
    assert "CUMSUM" in res.report.ops


def test_converter_error_names_the_op_and_chains_the_cause():
    model = _lambda_model(tf.math.erf)
    with pytest.raises(deploy.ConversionError) as e:
        deploy.to_tflite(model, mode="float")
    msg = str(e.value)
    assert "tf.Erf" in msg and "odd" in msg  # the op and the Keras layer it came from
    assert "callsite(" not in msg  # not the raw MLIR dump
    assert e.value.__cause__ is not None


def test_parity_failure_raises_with_report(tiny):
    with pytest.raises(deploy.ParityError) as e:
        deploy.to_tflite(tiny, mode="float", atol=1e-12)
    p = e.value.report.parity
    assert not p.passed and p.max_abs_diff > 1e-12


def test_save_writes_tflite_and_json(tiny, tmp_path):
    import json

    res = deploy.to_tflite(tiny, path=str(tmp_path / "m.tflite"))
    assert (tmp_path / "m.tflite").read_bytes() == res.flatbuffer
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["tflite_bytes"] == len(res.flatbuffer) and data["parity"]["passed"]


def test_existing_path_is_refused_unless_overwrite(tiny, tmp_path):
    path = tmp_path / "m.tflite"
    path.write_bytes(b"old")
    with pytest.raises(FileExistsError, match=r"^`path`: .*m\.tflite.*overwrite=True"):
        deploy.to_tflite(tiny, path=str(path))
    assert path.read_bytes() == b"old"            # refused before anything was written
    (tmp_path / "r.json").write_text("{}")       # the report beside it counts too
    with pytest.raises(FileExistsError, match=r"r\.json"):
        deploy.to_tflite(tiny, path=str(tmp_path / "r.tflite"))
    with pytest.raises(IsADirectoryError, match="`path`"):
        deploy.to_tflite(tiny, path=str(tmp_path))
    with pytest.raises(TypeError, match="`overwrite`"):
        deploy.to_tflite(tiny, path=str(path), overwrite="yes")
    with pytest.raises(TypeError, match="`path`"):
        deploy.to_tflite(tiny, path=5)
    res = deploy.to_tflite(tiny, path=str(path), overwrite=True)
    assert path.read_bytes() == res.flatbuffer
    with pytest.raises(FileExistsError, match="`path`"):
        deploy.to_lce(models.bnn(), check=False, path=str(path))


# ---- Larq Compute Engine --------------------------------------------------------------------


def _trained_bnn(fashion_small, **kw):
    (x, y), _ = fashion_small
    model = models.bnn(**kw)
    model.compile(keras.optimizers.Adam(0.01), "sparse_categorical_crossentropy")
    model.fit(x[:3000], y[:3000], batch_size=64, epochs=1, verbose=0)
    return model


def test_lce_bnn_converts_to_bconv_and_matches(fashion_small):
    model = _trained_bnn(fashion_small)
    xt = fashion_small[1][0][:300]
    res = deploy.to_lce(model, sample=xt)
    r = res.report
    # qconv2 binarizes inputs and kernel: LCE turns it into LceBconv2d
    assert r.extra["binary_conv_layers"] == ["qconv2"]
    assert r.op_counts.get("LceBconv2d") == 1 and r.extra["not_binarized"] == []
    assert r.parity.passed and r.parity.top1_agreement >= 0.99
    direct = deploy.Runner(res.flatbuffer, "lce").predict(xt)
    np.testing.assert_allclose(direct, model.predict(xt, verbose=0), atol=1e-4)


def test_lce_with_foothill_quantizer(fashion_small):
    import tfqreg.quantizers  # noqa: F401  (registers "foothill_sign")

    model = _trained_bnn(fashion_small, input_quantizer="foothill_sign",
                         kernel_quantizer="foothill_sign")
    res = deploy.to_lce(model, sample=fashion_small[1][0][:300])
    r = res.report
    assert r.parity.passed
    # every binary conv layer is either an LceBconv2d or reported as not binarized
    assert r.extra["lce_bconv2d"] + len(r.extra["not_binarized"]) == \
        len(r.extra["binary_conv_layers"]) == 1
    print("LCE ops with foothill_sign:", r.ops, "not binarized:", r.extra["not_binarized"])


def _ste(forward):
    @tf.custom_gradient
    def q(x):
        return forward(x), lambda dy: dy * tf.cast(tf.abs(x) <= 1, dy.dtype)
    return q


class _WhereSign(lq.quantizers.Quantizer):
    """A binary quantizer whose forward pass LCE does not pattern-match (tf.where)."""
    precision = 1

    def call(self, x):
        return _ste(lambda t: tf.where(t >= 0, tf.ones_like(t), -tf.ones_like(t)))(x)


class _LarqSign(lq.quantizers.Quantizer):
    """The same values and gradient, forward through larq.math.sign, which LCE matches."""
    precision = 1

    def call(self, x):
        return _ste(lq.math.sign)(x)


@pytest.mark.parametrize("quantizer, batch_size, converted", [
    (_LarqSign, None, True), (_WhereSign, None, False), (_WhereSign, 1, True)])
def test_lce_reports_binary_layers_it_did_not_binarize(quantizer, batch_size, converted):
    """LCE 0.16 matches larq.math.sign always, a tf.where sign only with a static batch (where
    ones_like folds to a constant): to_lce's default batch_size=1 binarizes both."""
    model = models.bnn(input_quantizer=quantizer(), kernel_quantizer=quantizer())
    res = deploy.to_lce(model, check=False, batch_size=batch_size)
    extra = res.report.extra
    assert extra["binary_conv_layers"] == ["qconv2"]
    if converted:
        assert extra["lce_bconv2d"] == 1 and extra["not_binarized"] == []
    else:
        assert extra["lce_bconv2d"] == 0 and extra["not_binarized"] == ["qconv2"]
        assert "GREATER_EQUAL" in res.report.ops  # the sign ran as float ops
        assert any("NOT converted to LceBconv2d" in n for n in res.report.notes)


def test_lce_binarizes_foothill_sign_at_any_batch_size():
    """FoothillSign's forward is written as larq.math.sign writes it, so LCE packs the binary
    convolution with a dynamic batch too."""
    model = models.bnn(input_quantizer="foothill_sign", kernel_quantizer="foothill_sign")
    res = deploy.to_lce(model, check=False, batch_size=None)
    assert res.report.extra["lce_bconv2d"] == 1 and res.report.extra["not_binarized"] == []
    assert "LceBconv2d" in res.report.ops


@pytest.mark.parametrize("kwargs,err,arg", [
    ({"calibration_samples": -250}, ValueError, "calibration_samples"),
    ({"calibration_samples": "all"}, TypeError, "calibration_samples"),
    ({"check": "no"}, TypeError, "check"),
    ({"min_agreement": "x"}, TypeError, "min_agreement"),
    ({"atol": "x"}, TypeError, "atol"),
    ({"representative_data": "x"}, TypeError, "representative_data"),
    ({"batch_size": True}, TypeError, "batch_size"),
])
def test_bad_argument_types_name_the_argument(kwargs, err, arg):
    from tfqreg import models

    x = np.zeros((8, 28, 28, 1), np.float32)
    call = {"mode": "int8", "representative_data": x, **kwargs}
    with pytest.raises(err, match=f"`{arg}`"):
        deploy.to_tflite(models.tiny_cnn(), **call)
