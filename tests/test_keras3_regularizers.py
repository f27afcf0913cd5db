"""The tfqreg regularizers and the Foothill loss in Keras 2 (tf_keras) and Keras 3 layers: the SAME
cases over both Kerases (the ``K`` fixture gives the Keras package), against NumPy closed forms:
penalty values of every class (incl. ``normalize="scale"``), the string aliases, learnable state
(created as weights of the layer, moved by ``fit``, saved and restored by ``.keras`` in a fresh
interpreter), the BatchNorm fold, MirroredStrategy training, the Foothill loss."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import keras as keras3

import tfqreg
from tfqreg import regularizers as R
from tfqreg._keras import keras as keras2, tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["keras2", "keras3"])
def K(request):
    return keras2 if request.param == "keras2" else keras3


W = np.array([[0.3, -1.2, 0.05], [0.8, -0.4, 2.0], [-0.15, 0.6, -0.9],
              [1.1, 0.2, -0.7]], dtype=np.float32)   # a (4, 3) Dense kernel


def _dense(K, regularizer, kernel=W):
    layer = K.layers.Dense(kernel.shape[1], kernel_regularizer=regularizer)
    layer.build((None, kernel.shape[0]))
    layer.kernel.assign(kernel)
    return layer


def _rms(w):
    return np.sqrt(np.mean(w.astype(np.float64) ** 2))


def _smax(u, a):
    p = np.exp(a * (u - u.max()))
    return float(np.sum(u * p) / np.sum(p))


def _foothill(x, alpha, beta):
    return alpha * x * np.tanh(beta * x / 2)


def _fake_quant(w, step, bits):
    return np.clip(np.round(w / step), -2 ** (bits - 1), 2 ** (bits - 1) - 1) * step


CASES = {
    "foothill": (lambda: R.Foothill(0.5, alpha=1.5, beta=3.0, center=0.2),
                 lambda w: 0.5 * np.sum(_foothill(np.abs(w) - 0.2, 1.5, 3.0))),
    "linf_scale": (lambda: R.LInf(0.3), lambda w: 0.3 * np.abs(w).max() / _rms(w)),
    "linf_none": (lambda: R.LInf(0.3, normalize="none"), lambda w: 0.3 * np.abs(w).max()),
    "margin_scale": (lambda: R.Margin(0.2, power=2, margin_weight=0.5, margin=1.1),
                     lambda w: 0.2 * (np.sum(np.maximum(np.abs(w / _rms(w)) - 1.1, 0) ** 2)
                                      + 0.5 * 1.1)),
    "soft_min_max_none": (lambda: R.SoftMinMax(0.1, eta=2.0, hardness=3.0, normalize="none"),
                          lambda w: 0.1 * (_smax(w.ravel(), 3.0) + _smax(-w.ravel(), 3.0)
                                           + 2.0 * np.exp(-3.0))),
    "soft_min_max_scale": (lambda: R.SoftMinMax(0.1, hardness=2.0),
                           lambda w: 0.1 * (_smax((w / _rms(w)).ravel(), 2.0)
                                            + _smax(-(w / _rms(w)).ravel(), 2.0) + np.exp(-2.0))),
    "msqe_trainable": (lambda: R.MSQE(2.0, bits=3, step=0.25, trainable_step=True),
                       lambda w: 2.0 * np.mean((w - _fake_quant(w, 0.25, 3)) ** 2)),
    "msqe_per_channel": (lambda: R.MSQE(1.0, bits=4, per_channel=True),   # step per column
                         lambda w: np.mean((w - _fake_quant(w, np.abs(w).max(0) / 7, 4)) ** 2)),
    "partial_l2": (lambda: R.PartialL2(3.0, fraction=0.5),
                   lambda w: 3.0 * np.sum(np.where(np.abs(w) <= 0.6, w, 0) ** 2) / w.size),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_penalty_of_every_class_matches_numpy(K, case):
    make, expected = CASES[case]
    layer = _dense(K, make())
    assert len(layer.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), expected(W), rtol=2e-5)


@pytest.mark.parametrize("alias", sorted(R.ALIASES))
def test_string_aliases_resolve(K, alias):
    got = K.regularizers.get(alias)
    assert type(got) is R.ALIASES[alias] and got is not K.regularizers.get(alias)
    layer = K.layers.Dense(2, kernel_regularizer=alias)
    layer.build((None, 3))
    assert type(layer.kernel_regularizer) is R.ALIASES[alias]
    assert len(layer.losses) == 1 and np.isfinite(float(layer.losses[0]))


# l = 0.01: at the defaults (3e-4, 1e-3) four SGD steps move the state by less than allclose sees
LEARNABLE = {"margin": (lambda: R.Margin(l=0.01), "kernel_margin"),
             "soft_min_max": (lambda: R.SoftMinMax(l=0.01), "kernel_hardness"),
             "msqe": (lambda: R.MSQE(bits=3, trainable_step=True), "kernel_step")}


def _model(K, regularizer, bn=False):
    layers = [K.Input((3,)), K.layers.Dense(4, kernel_regularizer=regularizer, name="d")]
    if bn:
        layers.append(K.layers.BatchNormalization(name="bn"))
    return K.Sequential(layers + [K.layers.Dense(2, name="out")])


def _state(layer, name):
    return [w for w in layer.weights if w.name.split("/")[-1].split(":")[0] == name]


@pytest.mark.parametrize("which", sorted(LEARNABLE))
def test_learnable_state_is_a_weight_of_the_layer_and_fit_trains_it(K, which):
    make, name = LEARNABLE[which]
    model = _model(K, make())
    layer = model.get_layer("d")
    (state,) = _state(layer, name)
    assert any(state is w for w in layer.trainable_weights)
    assert any(state is w for w in model.trainable_weights)
    assert layer.kernel_regularizer.state(layer.kernel)[name.split("_")[1]] is state
    before = np.array(state.numpy())
    model.compile(K.optimizers.SGD(0.5), "mse")
    x = np.random.rand(32, 3).astype("float32")
    model.fit(x, np.random.rand(32, 2).astype("float32"), epochs=2, batch_size=16, verbose=0)
    assert np.all(np.isfinite(state.numpy())) and not np.allclose(state.numpy(), before)


def test_batchnorm_fold_value_matches_numpy(K):
    model = K.Sequential([K.Input((6, 6, 2)),
                          K.layers.Conv2D(3, 3, use_bias=False, name="conv",
                                          kernel_regularizer=R.LInf(1.0, normalize="none")),
                          K.layers.BatchNormalization(epsilon=1e-3, name="bn"),
                          K.layers.ReLU()])
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    gamma = np.array([0.5, -3.0, 1.5], np.float32)
    var = np.array([0.2, 4.0, 0.01], np.float32)
    bn.gamma.assign(gamma)
    bn.moving_variance.assign(var)
    w = np.asarray(conv.kernel.numpy())
    folded = w * gamma / np.sqrt(var + 1e-3)
    assert tfqreg.fold.following_batchnorm(conv) is bn
    np.testing.assert_allclose(float(model.losses[0]), np.abs(folded).max(), rtol=1e-5)
    assert not np.isclose(np.abs(folded).max(), np.abs(w).max())
    raw = K.Sequential([K.Input((6, 6, 2)), K.layers.Conv2D(
        3, 3, name="conv", kernel_regularizer=R.LInf(1.0, normalize="none"), activation="relu"),
        K.layers.BatchNormalization()])   # activation before BN: nothing folds
    np.testing.assert_allclose(float(raw.losses[0]),
                               np.abs(raw.get_layer("conv").kernel.numpy()).max(), rtol=1e-6)


def test_keras3_shared_layer_does_not_fold_a_rebuilt_sequential_does():
    """A layer called twice in one Keras 3 graph: no fold (as in Keras 2). A Sequential built
    by ``add`` (its graph rebuilt for every layer, the old nodes kept): the fold is found."""
    inp = keras3.Input((4,))
    dense = keras3.layers.Dense(4, use_bias=False,
                                kernel_regularizer=R.LInf(1.0, normalize="none"))
    bn = keras3.layers.BatchNormalization()
    keras3.Model(inp, keras3.layers.Add()([bn(dense(inp)), dense(inp)]))
    assert tfqreg.fold.following_batchnorm(dense) is None
    assert "called more than once" in tfqreg.fold._why_not(dense, bn)
    seq = keras3.Sequential([keras3.Input((4,))])
    for layer in (keras3.layers.Dense(3, use_bias=False, name="d"),
                  keras3.layers.BatchNormalization(name="bn"), keras3.layers.ReLU(),
                  keras3.layers.Dense(2)):
        seq.add(layer)
    assert len(seq.get_layer("d")._inbound_nodes) > 1   # the stale nodes this is about
    assert tfqreg.fold.following_batchnorm(seq.get_layer("d")) is seq.get_layer("bn")


def test_keras3_subclassed_model_penalises_the_raw_kernel():
    class Sub(keras3.Model):
        def __init__(self):
            super().__init__()
            self.d = keras3.layers.Dense(3, use_bias=False,
                                         kernel_regularizer=R.LInf(1.0, normalize="none"))
            self.bn = keras3.layers.BatchNormalization()

        def call(self, x):
            return self.bn(self.d(x))

    model = Sub()
    model(np.ones((2, 4), np.float32))
    model.bn.moving_variance.assign([0.01, 0.01, 0.01])
    assert tfqreg.fold.following_batchnorm(model.d) is None
    np.testing.assert_allclose(float(model.losses[0]), np.abs(model.d.kernel.numpy()).max(),
                               rtol=1e-6)


def test_foothill_loss_trains_and_matches_numpy(K):
    x = np.random.rand(16, 3).astype("float32")
    y = np.random.rand(16, 2).astype("float32")
    for loss in (tfqreg.losses.Foothill(alpha=2.0, beta=0.5), "foothill"):
        model = K.Sequential([K.Input((3,)), K.layers.Dense(2)])
        model.compile(K.optimizers.SGD(0.1), loss=loss)
        first = model.evaluate(x, y, verbose=0)
        model.fit(x, y, epochs=3, batch_size=16, verbose=0)
        r = y - model.predict(x, verbose=0)
        a, b = (2.0, 0.5) if not isinstance(loss, str) else (1.0, 1.0)
        expected = np.mean(a * r * np.tanh(b * r / 2))
        got = model.evaluate(x, y, verbose=0)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        assert got < first


def test_mirrored_strategy_state_is_mirrored_and_training_runs(K, distribute_scope):
    with distribute_scope.scope():
        model = _model(K, R.Margin(), bn=True)
        model.compile(K.optimizers.SGD(0.5), "mse")
    (state,) = _state(model.get_layer("d"), "kernel_margin")
    tf_var = getattr(state, "value", state) if K is keras3 else state
    assert isinstance(tf_var, tf.distribute.DistributedValues), type(tf_var)
    before = float(np.asarray(state.numpy()))
    x = np.random.rand(32, 3).astype("float32")
    model.fit(x, np.random.rand(32, 2).astype("float32"), epochs=2, batch_size=16, verbose=0)
    after = float(np.asarray(state.numpy()))
    assert np.isfinite(after) and after != before
    replicas = [float(np.asarray(v)) for v in tf_var.values]
    assert replicas == [replicas[0]] * len(replicas)


def test_keras_round_trip_in_a_fresh_interpreter(tmp_path):
    """``.keras`` (and ``.weights.h5`` for Keras 3) of both Kerases, loaded after ``import
    tfqreg`` without custom_objects in a new process: same regularizers, same state values, same
    penalties (the BatchNorm fold found again in the reloaded graph), same compiled loss."""
    x = np.random.rand(32, 3).astype("float32")
    y = np.random.rand(32, 2).astype("float32")
    expected = {}
    for name, K in (("keras2", keras2), ("keras3", keras3)):
        model = K.Sequential([K.Input((3,)),
                              K.layers.Dense(4, use_bias=False, kernel_regularizer="margin",
                                             name="d"),
                              K.layers.BatchNormalization(name="bn"),
                              K.layers.Dense(3, kernel_regularizer="soft_min_max", name="e"),
                              K.layers.Dense(2, name="out",
                                             kernel_regularizer=R.MSQE(trainable_step=True))])
        model.compile(K.optimizers.SGD(0.2), loss=tfqreg.losses.Foothill(alpha=2.0))
        model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        path = str(tmp_path / f"{name}.keras")
        model.save(path)
        if K is keras3:
            model.save_weights(str(tmp_path / "keras3.weights.h5"))
            model.save(str(tmp_path / "keras3.h5"))   # Keras 3's legacy HDF5 format
        expected[name] = {
            "weights": {w.name.split(":")[0].split("/")[-1] + "@" + l.name: np.asarray(w).tolist()
                        for l in model.layers for w in l.weights},
            "losses": [float(v) for v in model.losses],
            "eval": float(model.evaluate(x, y, verbose=0)),
        }
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    code = f"""
import json, numpy as np
import tfqreg
import keras as keras3
from tfqreg._keras import keras as keras2
x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
out = {{}}
for name, K in (("keras2", keras2), ("keras3", keras3)):
    m = K.models.load_model({str(tmp_path)!r} + "/" + name + ".keras")
    out[name] = {{
        "weights": {{w.name.split(":")[0].split("/")[-1] + "@" + l.name: np.asarray(w).tolist()
                    for l in m.layers for w in l.weights}},
        "losses": [float(v) for v in m.losses],
        "eval": float(m.evaluate(x, y, verbose=0)),
        "regularizers": [type(l.kernel_regularizer).__name__ for l in m.layers
                         if getattr(l, "kernel_regularizer", None) is not None],
        "loss": type(m.loss).__name__,
        "fold": tfqreg.fold.following_batchnorm(m.get_layer("d")).name}}
legacy = keras3.models.load_model({str(tmp_path / 'keras3.h5')!r})
out["legacy_h5_losses"] = [float(v) for v in legacy.losses]
fresh = keras3.models.load_model({str(tmp_path / 'keras3.keras')!r})
for w in fresh.weights:
    w.assign(np.zeros(w.shape, w.dtype))
fresh.load_weights({str(tmp_path / 'keras3.weights.h5')!r})
out["h5_losses"] = [float(v) for v in fresh.losses]
print("RESULT" + json.dumps(out))
"""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name in ("keras2", "keras3"):
        got, want = out[name], expected[name]
        assert got["regularizers"] == ["Margin", "SoftMinMax", "MSQE"]
        assert got["loss"] == ("Foothill" if name == "keras2" else "FoothillKeras3")
        assert got["fold"] == "bn"   # found again in the reloaded (rebuilt) graph
        assert set(got["weights"]) == set(want["weights"])
        assert {"kernel_margin@d", "kernel_hardness@e", "kernel_step@out"} <= set(want["weights"])
        for key, value in want["weights"].items():
            np.testing.assert_array_equal(np.asarray(got["weights"][key]), np.asarray(value),
                                          err_msg=f"{name} {key}")
        np.testing.assert_allclose(got["losses"], want["losses"], rtol=1e-6)
        np.testing.assert_allclose(got["eval"], want["eval"], rtol=1e-6)
    np.testing.assert_allclose(out["h5_losses"], expected["keras3"]["losses"], rtol=1e-6)
    np.testing.assert_allclose(out["legacy_h5_losses"], expected["keras3"]["losses"], rtol=1e-6)


def test_msqe_per_channel_of_a_depthwise_kernel_uses_one_step_per_output_channel(K):
    layer = K.layers.DepthwiseConv2D(3, depth_multiplier=2,
                                     depthwise_regularizer=R.MSQE(1.0, bits=3, per_channel=True))
    layer.build((None, 5, 5, 2))
    kernel = layer.kernel if K is keras3 else layer.depthwise_kernel
    w = np.asarray(kernel.numpy())                      # (3, 3, in=2, multiplier=2)
    step = np.abs(w).max(axis=(0, 1), keepdims=True) / 3   # per (in, multiplier) channel
    np.testing.assert_allclose(float(layer.losses[0]),
                               np.mean((w - _fake_quant(w, step, 3)) ** 2), rtol=1e-5)
    per_tensor = np.mean((w - _fake_quant(w, np.abs(w).max() / 3, 3)) ** 2)
    assert not np.isclose(float(layer.losses[0]), per_tensor)
