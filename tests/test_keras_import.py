"""The one-Keras rule, checked in fresh interpreters (the environment variable and the order of
imports only matter before TensorFlow resolves ``tf.keras``, so each case needs its own process):

1. ``import tfqreg`` with TF_USE_LEGACY_KERAS unset makes ``tf.keras`` Keras 2 (tf_keras) and
   leaves the variable set; Keras 3 objects (the ``keras`` 3 package, imported before or after
   tfqreg) are rejected by ``check_keras2`` with a TypeError that says what to do.
   Module-style imports (``from tensorflow.keras.x import y``, as larq does) resolve to tf_keras
   even though Keras 3 imported TensorFlow first.
2. TensorFlow imported and ``tf.keras`` touched (Keras 3) before tfqreg, as an attribute or as a
   module import: ``import tfqreg`` still works (its Keras 2 code uses tf_keras), and only the
   larq-based parts raise an ImportError that names TF_USE_LEGACY_KERAS, when used.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(code: str):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_import_without_env_var_and_keras3_objects_are_rejected():
    code = """
import json, os
import keras as keras3                      # the Keras 3 package, imported first
early = keras3.layers.Dense(2)
import tfqreg
from tfqreg._keras import check_keras2, keras, tf
import tf_keras
out = {"env": os.environ.get("TF_USE_LEGACY_KERAS"),
       "tf_keras_is_keras2": tf.keras.layers.Layer is tf_keras.layers.Layer,
       "keras_is_tf_keras": keras is tf_keras, "keras3_version": keras3.__version__}
late = keras3.Sequential([keras3.Input((3,)), keras3.layers.Dense(2)])
for name, obj in (("early", early), ("late", late)):
    try:
        check_keras2(obj, "model")
        out[name] = "accepted"
    except TypeError as e:
        out[name] = str(e)
try:
    check_keras2(object(), "layer")
except TypeError as e:
    out["other"] = str(e)
ok = keras.layers.Dense(2)
out["keras2_accepted"] = check_keras2(ok) is ok
import larq  # larq imports `from tensorflow.keras.optimizers.legacy import ...`: must be tf_keras
from tensorflow.keras.optimizers.legacy import Optimizer
out["module_import"] = Optimizer.__module__
print("RESULT" + json.dumps(out))
"""
    proc = run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["env"] == "1"
    assert out["tf_keras_is_keras2"] and out["keras_is_tf_keras"]
    assert out["keras3_version"].startswith("3.")
    for name in ("early", "late"):
        assert "Keras 3" in out[name] and "`model`" in out[name] and "tf_keras" in out[name]
    assert "`layer`" in out["other"] and "Keras 3" not in out["other"]
    assert out["keras2_accepted"]
    assert out["module_import"].startswith("tf_keras.")


@pytest.mark.parametrize("prelude", [
    "import tensorflow as tf\ntf.keras.layers.Dense\n",
    "import tensorflow as tf\nfrom tensorflow.keras import layers\n",
    "",
], ids=["attribute", "module_import", "tfqreg_first"])
def test_import_tfqreg_works_whatever_was_imported_first(prelude):
    """``tf.keras`` already Keras 3: ``import tfqreg`` works, its Keras 2 regularizers train in
    tf_keras, and only the larq parts raise the clear ImportError, when used. tfqreg first: larq
    works."""
    code = prelude + """
import json
import numpy as np
import tfqreg
from tfqreg import _keras
from tfqreg._keras import keras
out = {"k3": _keras.TF_KERAS_IS_KERAS3, "keras": keras.__name__}
m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, kernel_regularizer="margin")])
m.compile("sgd", "mse")
margin = m.layers[0].weights[1]
before = float(margin.numpy())
m.fit(np.ones((8, 3)), np.zeros((8, 2)), epochs=2, verbose=0)
out["names"] = [w.name for w in m.layers[0].weights]
out["margin_moved"] = float(margin.numpy()) != before
errors = {}
for what, use in (("attribute", lambda: tfqreg.quantizers),
                  ("import", lambda: __import__("tfqreg.quantizers")),
                  ("require_larq", lambda: _keras.require_larq("the BNN builder")),
                  ("models.bnn", lambda: tfqreg.models.bnn())):
    try:
        use()
        errors[what] = None
    except ImportError as e:
        errors[what] = str(e)
out["errors"] = errors
print("RESULT" + json.dumps(out))
"""
    proc = run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["keras"] == "tf_keras"
    assert out["names"] == ["dense/kernel:0", "dense/kernel_margin:0", "dense/bias:0"]
    assert out["margin_moved"]
    if not prelude:
        assert out["k3"] is False and set(out["errors"].values()) == {None}
        return
    assert out["k3"] is True
    for what, feature in (("attribute", "tfqreg.quantizers"), ("import", "tfqreg.quantizers"),
                          ("require_larq", "the BNN builder"),
                          ("models.bnn", "tfqreg.models.bnn")):
        msg = out["errors"][what]
        assert msg and msg.startswith(f"{feature}") and "needs larq" in msg, (what, msg)
        assert "TF_USE_LEGACY_KERAS=1" in msg and "Keras 3" in msg and "import tfqreg" in msg


def test_the_cli_silences_tensorflow_info_logs_library_users_keep_them():
    import subprocess
    import sys

    code = ("import os, sys; sys.argv[0] = {!r}; import tfqreg; "
            "print(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    for argv0, want in (("/usr/local/bin/tfqreg", "2"), ("script.py", "None")):
        out = subprocess.run([sys.executable, "-c", code.format(argv0)], env=env,
                             capture_output=True, text=True, timeout=300).stdout.split()
        assert out[-1] == want, (argv0, out)


def test_model_loaded_before_import_tfqreg_is_named(tmp_path):
    """tf_keras' ``regularizers.get`` turns a class it cannot find into its bare name (it does
    not import the ``module`` saved in the config), so ``keras.models.load_model`` without
    ``import tfqreg`` gives layers whose regularizer is the string ``'MSQE'``; training then
    fails with "'str' object is not callable". tfqreg's entry points name the cause."""
    path = str(tmp_path / "reg.keras")
    save = (f"import tfqreg\nfrom tfqreg._keras import keras\n"
            "m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, "
            "kernel_regularizer=tfqreg.regularizers.MSQE(bits=4)), keras.layers.Dense(2, "
            f"kernel_regularizer='linf')])\nm.save({path!r})\n")
    proc = run(save)
    assert proc.returncode == 0, proc.stderr[-2000:]
    load = f"""
import json, os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import tf_keras as keras
m = keras.models.load_model({path!r})
out = {{"regularizers": [l.kernel_regularizer for l in m.layers],
       "tfqreg_imported": "tfqreg" in sys.modules}}
import tfqreg
for name, call in (("ptq", lambda: tfqreg.ptq.quantize(m, 8)),
                   ("to_tflite", lambda: tfqreg.deploy.to_tflite(m)),
                   ("summary", lambda: tfqreg.summary(m))):
    try:
        call()
        out[name] = "accepted"
    except TypeError as e:
        out[name] = str(e)
again = tfqreg.deploy.load_model({path!r})
out["reloaded"] = [type(l.kernel_regularizer).__name__ for l in again.layers]
print("RESULT" + json.dumps(out))
"""
    proc = run(load)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert out["regularizers"] == ["MSQE", "LInf"] and not out["tfqreg_imported"]  # tf_keras
    for name in ("ptq", "to_tflite", "summary"):
        msg = out[name]
        assert msg.startswith("`model`: layer 'dense' has kernel_regularizer 'MSQE'"), msg
        assert "before `import tfqreg`" in msg and "\n" not in msg
    assert out["reloaded"] == ["MSQE", "LInf"]


@pytest.mark.parametrize("first", ["tfqreg", "keras"])
def test_learnable_regularizer_in_a_keras3_layer_gets_keras3_state(first):
    """Whichever is imported first, a learnable tfqreg regularizer in a Keras 3 layer creates its
    parameter as a Keras 3 weight of the layer (was: a TypeError), and a stateless one gives the
    closed-form penalty."""
    imports = "import tfqreg\nimport keras as keras3\n" if first == "tfqreg" else \
        "import keras as keras3\nimport tfqreg\n"
    code = imports + """
import numpy as np
layer = keras3.layers.Dense(4, kernel_regularizer=tfqreg.regularizers.Margin(l=0.01, normalize="none"))
layer.build((None, 3))
m = [w for w in layer.weights if w.name == "kernel_margin"][0]
k = np.abs(layer.kernel.numpy())
print("MARGIN", type(m).__module__.split(".")[0], float(m.numpy()), float(k.max()),
      float(layer.losses[0]), 0.01 * float(m.numpy()))
plain = keras3.layers.Dense(4, kernel_regularizer=tfqreg.regularizers.LInf(normalize="none"))
plain.build((None, 3))
print("LINF", float(plain.losses[0]), 0.01 * float(np.abs(plain.kernel.numpy()).max()))
"""
    out = run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("MARGIN")).split()
    assert line[1] == "keras"
    margin, kmax, loss, expected = map(float, line[2:])
    assert margin == pytest.approx(kmax, rel=1e-6)  # M starts at max|w|: no relu term
    assert loss == pytest.approx(expected, rel=1e-5)
    line = next(l for l in out.stdout.splitlines() if l.startswith("LINF"))
    got, expected = map(float, line.split()[1:])
    assert abs(got - expected) < 1e-6 * max(1.0, expected)
