"""Keras 3 models through PTQ, BatchNorm folding and TFLite export (issue 15).

Oracles: the Keras 3 model's own outputs (the mirror must compute them), the same model built
layer by layer in tf_keras with the same weights (PTQ must give the same numbers), and the
LiteRT interpreter running the exported files (float parity, int8 agreement, INT4 tensors).
"""

import numpy as np
import pytest

from tfqreg import deploy, keras3_bridge, ptq
from tfqreg._keras import keras as k2
from tfqreg.deploy import lowbit

keras3 = pytest.importorskip("keras")
if not keras3.__version__.startswith("3."):  # pragma: no cover
    pytest.skip("Keras 3 is not installed", allow_module_level=True)

SHAPE = (8, 8, 1)


def _randomize_bn(bn, rng):
    n = bn.moving_mean.shape[0]
    bn.moving_mean.assign(rng.normal(0, 0.3, n).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.3, 2.0, n).astype("float32"))
    bn.gamma.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
    bn.beta.assign(rng.normal(0, 0.2, n).astype("float32"))


def _bn_cnn(lib):
    """Conv(no bias) -> BN -> ReLU -> DepthwiseConv -> ReLU -> Flatten -> Dense, in Keras 3
    (``lib=keras3``) or tf_keras (``lib=k2``): the same names and layer graph."""
    inp = lib.Input(SHAPE, name="img")
    h = lib.layers.Conv2D(6, 3, use_bias=False, name="conv")(inp)
    h = lib.layers.BatchNormalization(name="bn")(h)
    h = lib.layers.ReLU(name="relu")(h)
    h = lib.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(h)
    h = lib.layers.Flatten(name="flat")(h)
    out = lib.layers.Dense(4, name="fc")(h)
    return lib.Model(inp, out, name="bn_cnn")


@pytest.fixture(scope="module")
def pair():
    """A Keras 3 BN model with non-trivial weights and BN statistics, its tf_keras twin with
    the same weights assigned by hand, and data the Keras 3 model labels itself."""
    rng = np.random.default_rng(0)
    keras3.utils.set_random_seed(0)
    m3 = _bn_cnn(keras3)
    _randomize_bn(m3.get_layer("bn"), rng)
    fc = m3.get_layer("fc")
    fc.kernel.assign(fc.kernel.numpy() * 20)
    m2 = _bn_cnn(k2)
    for name in ("conv", "dw", "fc"):
        m2.get_layer(name).set_weights([np.asarray(w) for w in m3.get_layer(name).weights])
    bn3, bn2 = m3.get_layer("bn"), m2.get_layer("bn")
    bn2.set_weights([np.asarray(v) for v in (bn3.gamma, bn3.beta, bn3.moving_mean,
                                             bn3.moving_variance)])
    x = rng.random((96,) + SHAPE, dtype=np.float32)
    logits = np.asarray(m3(x))
    y = logits.argmax(-1)
    y[::3] = (y[::3] + 1) % 4  # not all correct: the sweep numbers move with the bits
    return m3, m2, x, y


def test_mirror_computes_every_supported_layer_as_keras3_does():
    rng = np.random.default_rng(1)
    keras3.utils.set_random_seed(1)
    L = keras3.layers
    inp = keras3.Input((8, 8, 3), name="img")
    h = L.Rescaling(0.5, offset=0.1)(inp)
    h = L.Conv2D(4, 3, use_bias=False, padding="same")(h)
    bn = L.BatchNormalization()
    h = L.ReLU(max_value=6.0)(bn(h))
    d = L.DepthwiseConv2D(3, padding="same", depth_multiplier=1)(h)
    s = L.SeparableConv2D(4, 3, padding="same", activation="relu")(h)
    h = L.Add()([h, d, s])
    h = L.Concatenate()([L.MaxPooling2D()(h), L.AveragePooling2D(2)(h)])
    h = L.Dropout(0.5)(h)
    f = L.Flatten()(L.Reshape((4, -1))(L.Flatten()(h)))
    h = L.Concatenate()([f, L.GlobalAveragePooling2D()(h)])
    h = L.Activation("tanh")(L.Dense(6, activation="relu")(h))
    out = L.Dense(3, activation="softmax")(h)
    model = keras3.Model(inp, out)
    _randomize_bn(bn, rng)
    mirror = keras3_bridge.to_keras2(model)
    assert isinstance(mirror, k2.Model)
    assert [l.name for l in mirror.layers] == [l.name for l in model.layers]
    np.testing.assert_array_equal(mirror.get_layer(bn.name).moving_variance.numpy(),
                                  np.asarray(bn.moving_variance))
    x = rng.random((16, 8, 8, 3), dtype=np.float32) * 4
    np.testing.assert_allclose(mirror(x).numpy(), np.asarray(model(x)), atol=1e-6)


def test_sequential_becomes_a_tf_keras_sequential():
    keras3.utils.set_random_seed(2)
    model = keras3.Sequential([keras3.Input((6,)), keras3.layers.Dense(5, name="d1"),
                               keras3.layers.BatchNormalization(name="bn"),
                               keras3.layers.ReLU(name="r"), keras3.layers.Dense(2, name="d2")],
                              name="seq")
    _randomize_bn(model.get_layer("bn"), np.random.default_rng(2))
    mirror = keras3_bridge.to_keras2(model)
    assert isinstance(mirror, k2.Sequential) and mirror.name == "seq"
    assert [l.name for l in mirror.layers] == ["d1", "bn", "r", "d2"]
    x = np.random.default_rng(3).normal(size=(10, 6)).astype("float32")
    np.testing.assert_allclose(mirror(x).numpy(), np.asarray(model(x)), atol=1e-6)


def test_weights_are_copied_by_attribute_not_by_position():
    # an extra (training-only) weight created BEFORE the kernel, of the kernel's shape: a copy
    # by position would put it where the kernel goes
    dense = keras3.layers.Dense(3, name="fc")
    dense.kernel_margin = dense.add_weight(shape=(4, 3), initializer="ones",
                                           name="kernel_margin")
    inp = keras3.Input((4,))
    model = keras3.Model(inp, dense(inp))
    assert dense.weights[0].name == "kernel_margin"
    mirror = keras3_bridge.to_keras2(model)
    np.testing.assert_array_equal(mirror.get_layer("fc").kernel.numpy(),
                                  np.asarray(dense.kernel))
    assert [w.name.split("/")[-1].split(":")[0] for w in mirror.get_layer("fc").weights] == [
        "kernel", "bias"]


def test_unsupported_layers_and_subclassed_models_are_refused_by_name():
    inp = keras3.Input((4,))
    model = keras3.Model(inp, keras3.layers.LayerNormalization(name="ln")(inp))
    with pytest.raises(TypeError, match="layer 'ln'.*LayerNormalization.*not supported"):
        keras3_bridge.to_keras2(model)

    class MyDense(keras3.layers.Dense):
        pass

    model = keras3.Model(inp, MyDense(2, name="mine")(inp))
    with pytest.raises(TypeError, match="layer 'mine'.*not subclasses"):
        ptq.quantize(model, 4)

    class Sub(keras3.Model):
        def __init__(self):
            super().__init__()
            self.d = keras3.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    sub = Sub()
    sub(np.zeros((1, 4), "float32"))
    with pytest.raises(TypeError, match="subclassed Keras 3 model"):
        deploy.to_tflite(sub)
    shared = keras3.layers.Dense(4, name="shared")
    model = keras3.Model(inp, shared(shared(inp)))
    with pytest.raises(TypeError, match="'shared' is called more than once"):
        keras3_bridge.to_keras2(model)
    with pytest.raises(TypeError, match="Keras 3 model: Larq Compute Engine"):
        deploy.to_lce(keras3.Model(inp, keras3.layers.Dense(2)(inp)))


def test_a_mirror_that_differs_is_refused_naming_the_first_layer(pair, monkeypatch):
    m3, _, x, _ = pair
    real = keras3_bridge._translate_config

    def wrong_epsilon(layer):
        config = real(layer)
        if layer.name == "bn":
            config["epsilon"] = 0.5
        return config

    monkeypatch.setattr(keras3_bridge, "_translate_config", wrong_epsilon)
    with pytest.raises(ValueError, match="from layer 'bn' on"):
        keras3_bridge.to_keras2(m3, sample=x)
    with pytest.raises(ValueError, match="from layer 'bn' on"):
        ptq.sweep(m3, (x, np.zeros(len(x), int)), weight_bits=(4,), progress=False)


def test_ptq_of_a_keras3_model_is_the_ptq_of_its_tf_keras_twin(pair):
    m3, m2, x, y = pair
    np.testing.assert_allclose(np.asarray(m3(x)), m2(x).numpy(), atol=1e-5)
    kwargs = dict(weight_bits=(8, 4, 3), extra=[(4, 8)], calibration_data=x[:48],
                  progress=False)
    r3 = ptq.sweep(m3, (x, y), **kwargs)
    r2 = ptq.sweep(m2, (x, y), **kwargs)
    assert r3.folding == r2.folding == {"folds": [["conv", "bn"]], "unfolded": []}
    assert [(r.weight_bits, r.activation_bits) for r in r3.rows] == [
        (None, None), (8, None), (4, None), (3, None), (4, 8)]
    for a, b in zip(r3.rows, r2.rows):
        assert a.accuracy == b.accuracy
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
    assert r3.float_accuracy == pytest.approx(np.mean(np.asarray(m3(x)).argmax(-1) == y))
    assert r3.accuracy(3) != r3.float_accuracy  # the bits do change the numbers here
    q3 = ptq.quantize(m3, 4, activation_bits=8, calibration_data=x[:48])
    q2 = ptq.quantize(m2, 4, activation_bits=8, calibration_data=x[:48])
    assert isinstance(q3, k2.Model)
    np.testing.assert_allclose(q3(x).numpy(), q2(x).numpy(), atol=1e-5)


def test_to_tflite_float_int8_int4_of_a_keras3_model_run_in_litert(pair):
    m3, m2, x, _ = pair
    want = np.asarray(m3(x))
    flt = deploy.to_tflite(m3, mode="float", sample=x)
    assert flt.report.parity.passed and flt.report.parity.reference == "Keras 3"
    got = deploy.Runner(flt, "litert").predict(x)
    assert np.abs(got - want).max() <= 1e-5

    # int8: the same file as the tf_keras twin's, and its agreement is measured vs Keras 3
    int8 = deploy.to_tflite(m3, mode="int8", representative_data=x, min_agreement=0.95)
    twin = deploy.to_tflite(m2, mode="int8", representative_data=x, min_agreement=0.95)
    assert int8.report.parity.passed and int8.report.parity.reference == "Keras 3"
    got = deploy.Runner(int8, "litert").predict(x)
    np.testing.assert_array_equal(got, deploy.Runner(twin, "litert").predict(x))
    assert int8.report.parity.top1_agreement == pytest.approx(
        np.mean(got.argmax(-1) == want.argmax(-1)))
    assert int8.report.parity.top1_agreement >= 0.95
    assert lowbit.weight_report(int8.flatbuffer).weight_bytes.keys() == {"int8"}

    int4 = deploy.to_tflite(m3, mode="int8", representative_data=x, weight_bits=4,
                            min_agreement=0.95)
    assert int4.report.parity.passed
    assert {t.dtype for t in lowbit.weight_report(int4.flatbuffer).tensors} == {"int4"}
    twin4 = deploy.to_tflite(m2, mode="int8", representative_data=x, weight_bits=4,
                             min_agreement=0.95)
    got = deploy.Runner(int4, "litert").predict(x)
    np.testing.assert_array_equal(got, deploy.Runner(twin4, "litert").predict(x))


def test_bridge_arguments_are_checked():
    with pytest.raises(TypeError, match="Keras 3 Sequential or Functional"):
        keras3_bridge.to_keras2(k2.Sequential([k2.Input((2,)), k2.layers.Dense(1)]))
    inp = keras3.Input((2,))
    model = keras3.Model(inp, keras3.layers.Dense(1)(inp))
    with pytest.raises(ValueError, match="`rtol`"):
        keras3_bridge.to_keras2(model, rtol=0)
    with pytest.raises(ValueError, match="no known input shape"):
        keras3_bridge.to_keras2(keras3.Sequential([keras3.layers.Dense(1)]))


def test_nested_and_multi_input_keras3_models_export_with_parity():
    keras3.utils.set_random_seed(4)
    L = keras3.layers
    inner_in = keras3.Input((6,))
    inner = keras3.Model(inner_in, L.Dense(5, activation="relu", name="inner_fc")(inner_in),
                         name="inner")
    a, b = keras3.Input((6,), name="a"), keras3.Input((3,), name="b")
    h = L.Concatenate(name="cat")([inner(a), L.Dense(4, name="side")(b)])
    model = keras3.Model([a, b], L.Dense(3, name="head")(h), name="two_inputs")
    rng = np.random.default_rng(4)
    xs = [rng.normal(size=(20, 6)).astype("float32"), rng.normal(size=(20, 3)).astype("float32")]
    mirror = keras3_bridge.to_keras2(model, sample=xs)
    assert mirror.input_names == ["a", "b"]
    np.testing.assert_allclose(mirror(xs).numpy(), np.asarray(model(xs)), atol=1e-6)
    res = deploy.to_tflite(model, mode="float", sample=xs)
    assert res.report.parity.passed and res.report.parity.reference == "Keras 3"
    got = deploy.Runner(res, "litert").predict({"a": xs[0], "b": xs[1]})
    assert np.abs(got - np.asarray(model(xs))).max() <= 1e-5


def test_to_micro_and_load_model_take_keras3(pair, tmp_path):
    m3, _, x, _ = pair
    path = str(tmp_path / "m3.keras")
    m3.save(path)
    loaded = deploy.load_model(path)  # tf_keras cannot read a Keras 3 file: Keras 3 loads it
    assert keras3_bridge.is_keras3_model(loaded)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(m3(x)))
    res = deploy.to_micro(loaded, x, str(tmp_path / "micro"), name="m3", min_agreement=0.95)
    assert res.report.parity.reference == "Keras 3"
    assert "vs Keras 3" in res.report.extra["micro_parity"]
    got = deploy.Runner(res.flatbuffer, "micro").predict(x)
    want = np.asarray(m3(x)).argmax(-1)
    assert np.mean(got.argmax(-1) == want) >= 0.95


def _layer_cases():
    L = keras3.layers
    return {
        "1d": ((12, 4), [L.Conv1D(4, 3, padding="same"), L.Conv1DTranspose(4, 3),
                         L.SeparableConv1D(4, 3), L.LeakyReLU(0.2), L.PReLU(), L.ELU(0.5),
                         L.MaxPooling1D(), L.AveragePooling1D(2), L.ZeroPadding1D(1),
                         L.Cropping1D(1), L.UpSampling1D(2), L.SpatialDropout1D(0.1),
                         L.GaussianNoise(0.1), L.GaussianDropout(0.1), L.Permute((2, 1)),
                         L.GlobalAveragePooling1D(), L.Softmax()]),
        "1d_max": ((12, 4), [L.GlobalMaxPooling1D()]),
        "2d": ((8, 8, 2), [L.Conv2DTranspose(3, 3, strides=2), L.ZeroPadding2D(1),
                           L.Cropping2D(1), L.UpSampling2D(), L.SpatialDropout2D(0.1),
                           L.GlobalMaxPooling2D()]),
        "3d": ((6, 6, 6, 1), [L.Conv3D(2, 3), L.Flatten()]),
    }


def test_every_supported_layer_type_is_mirrored_exactly():
    rng = np.random.default_rng(5)
    covered = {"InputLayer", "Rescaling", "Conv2D", "BatchNormalization", "ReLU",
               "DepthwiseConv2D", "SeparableConv2D", "Add", "Concatenate", "MaxPooling2D",
               "AveragePooling2D", "Dropout", "Flatten", "Reshape", "GlobalAveragePooling2D",
               "Dense", "Activation"}  # test_mirror_computes_every_supported_layer_...
    for name, (shape, layers) in _layer_cases().items():
        model = keras3.Sequential([keras3.Input(shape)] + layers, name=name)
        for layer in layers:
            for w in layer.weights:  # non-trivial values everywhere (PReLU alpha, biases)
                w.assign(rng.normal(size=w.shape).astype("float32"))
        x = rng.normal(size=(6,) + shape).astype("float32")
        mirror = keras3_bridge.to_keras2(model, sample=x)
        np.testing.assert_allclose(mirror(x).numpy(), np.asarray(model(x)), rtol=1e-5,
                                   atol=1e-5)
        covered |= {type(layer).__name__ for layer in layers}
    inp = keras3.Input((5,))
    a, b = keras3.layers.Dense(5)(inp), keras3.layers.Dense(5)(inp)
    x = rng.normal(size=(6, 5)).astype("float32")
    for cls in ("Subtract", "Multiply", "Average", "Maximum", "Minimum"):
        model = keras3.Model(inp, getattr(keras3.layers, cls)()([a, b]))
        np.testing.assert_allclose(keras3_bridge.to_keras2(model)(x).numpy(),
                                   np.asarray(model(x)), atol=1e-6)
        covered.add(cls)
    assert covered == set(keras3_bridge.SUPPORTED_LAYERS)


def test_tfqreg_export_command_reads_keras3_files(pair, tmp_path, capsys):
    from tfqreg import cli

    m3, _, x, _ = pair
    path = tmp_path / "m3.keras"
    m3.save(str(path))
    np.save(tmp_path / "x.npy", x)
    code = cli.main(["export", str(path), "--target", "int8", "--out", str(tmp_path / "out"),
                     "--data", str(tmp_path / "x.npy"), "--min-agreement", "0.9"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "parity vs Keras 3" in out.out and (tmp_path / "out" / "m3.tflite").is_file()


def test_tfqreg_sweep_command_reads_keras3_files(tmp_path, capsys, monkeypatch):
    from tfqreg import cli, datasets

    rng = np.random.default_rng(6)
    xt = rng.random((300, 28, 28, 1), dtype=np.float32)
    yt = rng.integers(0, 10, 300)
    monkeypatch.setattr(datasets, "load_numpy", lambda *a: ((xt[:64], yt[:64]), (xt, yt)))
    keras3.utils.set_random_seed(6)
    inp = keras3.Input((28, 28, 1))
    h = keras3.layers.Flatten()(keras3.layers.Conv2D(4, 3, strides=2)(inp))
    fm = keras3.Model(inp, keras3.layers.Dense(10)(h), name="fm3")
    fm.save(str(tmp_path / "fm3.keras"))
    code = cli.main(["sweep", str(tmp_path / "fm3.keras"), "--bits", "8", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    want = np.mean(np.asarray(fm(xt)).argmax(-1) == yt)
    assert "PTQ sweep: fm3" in out.out
    assert f"{100 * want:.2f}%" in out.out.splitlines()[2]  # the fp32 row: the Keras 3 model


def test_learnable_regularizer_weights_stay_behind(pair):
    # tfqreg's "margin" regularizer adds a training-only `kernel_margin` weight to each layer
    _, _, x, _ = pair
    keras3.utils.set_random_seed(7)
    inp = keras3.Input(SHAPE)
    h = keras3.layers.Conv2D(4, 3, kernel_regularizer="margin", name="conv")(inp)
    h = keras3.layers.Flatten()(h)
    model = keras3.Model(inp, keras3.layers.Dense(3, kernel_regularizer="margin", name="fc")(h))
    assert "kernel_margin" in [w.name for w in model.get_layer("fc").weights]
    mirror = keras3_bridge.to_keras2(model, sample=x)
    assert [w.name.split("/")[-1] for w in mirror.get_layer("fc").weights] == [
        "kernel:0", "bias:0"]
    np.testing.assert_allclose(mirror(x).numpy(), np.asarray(model(x)), atol=1e-6)
    q = ptq.quantize(model, 4)
    kernel = np.asarray(model.get_layer("fc").kernel)
    step = np.abs(kernel).max(0) / 7
    np.testing.assert_allclose(q.get_layer("fc").kernel.numpy(),
                               np.round(kernel / step) * step, atol=1e-6)
