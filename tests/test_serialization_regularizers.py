"""Models with every tfqreg regularizer (and the Foothill loss) saved as .keras, .h5 and SavedModel
and reloaded with ``keras.models.load_model`` without custom_objects: same weights (including the
learnable margin / hardness / step), same regularization losses, same predictions; the same through
``tf.train.Checkpoint``; and a fresh interpreter that only runs ``import tfqreg`` loads them."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tfqreg
from tfqreg import regularizers as R
from tfqreg._keras import keras, tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(aliases=False):
    """Three layers carrying the six regularizers (kernel and bias regularizers, configured with
    non-default values, or by alias; ``normalize`` both ways); few layers keep SavedModel tracing
    short."""
    regs = dict(R.ALIASES) if aliases else {
        "foothill": R.Foothill(0.02, alpha=0.5, beta=3.0, center=0.2),
        "linf": R.LInf(0.07),
        "margin": R.Margin(0.03, power=1.5, margin_weight=0.4, normalize="none"),
        "soft_min_max": R.SoftMinMax(0.04, eta=0.5),
        "msqe": R.MSQE(0.5, bits=3, per_channel=True, narrow_range=True, trainable_step=True),
        "partial_l2": R.PartialL2(0.6, fraction=0.3),
    }
    pick = (lambda k: k) if aliases else regs.get
    inp = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(3, 3, kernel_regularizer=pick("margin"),
                            bias_regularizer=pick("linf"), bias_initializer="ones",
                            name="conv")(inp)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, activation="tanh", kernel_regularizer=pick("soft_min_max"),
                           bias_regularizer=pick("foothill"), bias_initializer="ones",
                           name="dense1")(x)
    x = keras.layers.Dense(5, kernel_regularizer=pick("msqe"),
                           bias_regularizer=pick("partial_l2"), bias_initializer="ones",
                           name="dense2")(x)
    model = keras.Model(inp, x)
    model.compile(keras.optimizers.SGD(0.3), loss=tfqreg.losses.Foothill(alpha=1.5, beta=0.5))
    return model


def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 6, 6, 1)).astype(np.float32), \
        rng.normal(size=(16, 5)).astype(np.float32)


@pytest.fixture(scope="module")
def trained():
    """A model trained for a few steps, so that every learnable parameter moved off its init."""
    keras.utils.set_random_seed(1)
    model = build()
    init = {v.name: v.numpy().copy() for v in model.weights}
    x, y = data()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    for v in model.weights:
        if v.name.endswith(("_margin:0", "_hardness:0", "_step:0")):
            assert np.any(v.numpy() != init[v.name]), v.name
    return model


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """The trained model saved once in each format: {fmt: path}."""
    root = tmp_path_factory.mktemp("saved")
    paths = {}
    for fmt in ("keras", "h5", "tf"):
        paths[fmt] = str(root / ("model" if fmt == "tf" else f"model.{fmt}"))
        trained.save(paths[fmt], save_format=fmt)
    return paths


def assert_same_model(a, b, x):
    assert [v.name for v in a.weights] == [v.name for v in b.weights]
    for va, vb in zip(a.weights, b.weights):
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.name)
    assert len(a.losses) == len(b.losses) == 6
    np.testing.assert_array_equal([float(v) for v in a.losses], [float(v) for v in b.losses])
    np.testing.assert_array_equal(a.predict(x, verbose=0), b.predict(x, verbose=0))
    for la, lb in zip(a.layers, b.layers):
        ra = getattr(la, "kernel_regularizer", None)
        if ra is not None:
            assert type(ra) is type(lb.kernel_regularizer)
            assert ra.get_config() == lb.kernel_regularizer.get_config()


@pytest.mark.parametrize("fmt", ["keras", "h5", "tf"])
def test_save_and_load_all_formats(trained, saved, fmt):
    loaded = keras.models.load_model(saved[fmt])  # no custom_objects
    x, y = data()
    assert_same_model(trained, loaded, x)
    assert isinstance(loaded.loss, tfqreg.losses.Foothill) or fmt == "tf"
    if fmt != "tf":
        assert loaded.loss.get_config()["alpha"] == 1.5
    # the reloaded learnable state is live: training continues identically
    assert any(v.name.endswith("_margin:0") for v in loaded.trainable_weights)
    np.testing.assert_allclose(loaded.evaluate(x, y, verbose=0), trained.evaluate(x, y, verbose=0),
                               rtol=1e-6)


def test_checkpoint_round_trip(trained, tmp_path):
    path = tf.train.Checkpoint(model=trained).write(str(tmp_path / "ckpt"))
    fresh = build()
    status = tf.train.Checkpoint(model=fresh).read(path)
    status.assert_existing_objects_matched().expect_partial()  # (the fresh model has no slots)
    assert_same_model(trained, fresh, data()[0])


def test_aliases_round_trip(tmp_path):
    model = build(aliases=True)
    regs = [type(layer.kernel_regularizer) for layer in model.layers
            if getattr(layer, "kernel_regularizer", None) is not None]
    assert regs == [R.Margin, R.SoftMinMax, R.MSQE]
    path = str(tmp_path / "aliases.keras")
    model.save(path)
    assert_same_model(model, keras.models.load_model(path), data()[0])


def test_loss_alias_round_trip(tmp_path):
    model = keras.Sequential([keras.layers.Dense(2, input_shape=(3,))])
    model.compile("sgd", loss="foothill")
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    expected = model.evaluate(x, y, verbose=0)
    for name in ("loss.keras", "loss.h5"):
        model.save(str(tmp_path / name))
        loaded = keras.models.load_model(str(tmp_path / name))
        assert loaded.evaluate(x, y, verbose=0) == pytest.approx(expected, rel=1e-7)


def test_fresh_interpreter_needs_only_import_tfqreg(trained, saved, tmp_path):
    x, _ = data()
    paths = saved
    np.save(tmp_path / "x.npy", x)
    script = (
        "import json, sys, numpy as np\n"
        "import tfqreg\n"
        "from tfqreg._keras import keras\n"
        "out = {}\n"
        "for fmt, path in json.loads(sys.argv[1]).items():\n"
        "    m = keras.models.load_model(path)\n"
        "    out[fmt] = dict(losses=[float(v) for v in m.losses],\n"
        "                    state=[v.numpy().tolist() for v in m.weights\n"
        "                           if v.name.endswith(('_margin:0', '_hardness:0', '_step:0'))],\n"
        "                    pred=m.predict(np.load(sys.argv[2]), verbose=0).tolist())\n"
        "print('RESULT' + json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(paths),
                           str(tmp_path / "x.npy")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    state = [v.numpy().tolist() for v in trained.weights
             if v.name.endswith(("_margin:0", "_hardness:0", "_step:0"))]
    assert len(state) == 3
    for fmt in ("keras", "h5", "tf"):
        assert result[fmt]["losses"] == [float(v) for v in trained.losses], fmt
        assert result[fmt]["state"] == state, fmt
        np.testing.assert_array_equal(result[fmt]["pred"], trained.predict(x, verbose=0))


def _drop_normalize(config):
    """A model config as tfqreg wrote it before the range regularizers had ``normalize``."""
    if isinstance(config, dict):
        return {k: _drop_normalize(v) for k, v in config.items() if k != "normalize"}
    if isinstance(config, list):
        return [_drop_normalize(v) for v in config]
    return config


@pytest.mark.parametrize("fmt", ["keras", "h5"])
def test_model_saved_before_normalize_keeps_the_old_meaning(tmp_path, fmt):
    # a model saved by an older tfqreg has regularizer configs without `normalize`; it must load
    # with the raw penalty (normalize="none"), so it keeps training exactly as before
    import h5py
    import zipfile

    inp = keras.Input((4,))
    x = keras.layers.Dense(3, kernel_regularizer=R.LInf(0.05, normalize="none"), name="a")(inp)
    x = keras.layers.Dense(2, kernel_regularizer=R.SoftMinMax(0.05, normalize="none"),
                           name="b")(x)
    model = keras.Model(inp, x)
    path = str(tmp_path / f"old.{fmt}")
    model.save(path, save_format=fmt)
    if fmt == "keras":
        old = str(tmp_path / "old_edited.keras")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(old, "w") as dst:
            for item in src.infolist():
                data = src.read(item.filename)
                if item.filename == "config.json":
                    data = json.dumps(_drop_normalize(json.loads(data))).encode()
                dst.writestr(item, data)
        path = old
    else:
        with h5py.File(path, "r+") as f:
            config = f.attrs["model_config"]
            config = json.loads(config.decode() if isinstance(config, bytes) else config)
            f.attrs["model_config"] = json.dumps(_drop_normalize(config))
    if fmt == "keras":
        with zipfile.ZipFile(path) as z:
            assert "normalize" not in z.read("config.json").decode()
    else:
        with h5py.File(path, "r") as f:
            assert "normalize" not in str(f.attrs["model_config"])
    loaded = keras.models.load_model(path)
    for name in ("a", "b"):
        assert loaded.get_layer(name).kernel_regularizer.normalize == "none"
    kernel = loaded.get_layer("a").kernel.numpy()
    assert float(loaded.losses[0]) == pytest.approx(0.05 * np.abs(kernel).max(), rel=1e-6)
    np.testing.assert_array_equal([float(v) for v in loaded.losses],
                                  [float(v) for v in model.losses])
