"""Smoke test of examples/keras3_cnn.py (``--quick``, real Fashion-MNIST, a fresh interpreter).

The numbers the example prints are checked against independent reruns in this process: the
saved ``.keras`` file reloaded with Keras 3 and evaluated, and both ``.tflite`` files run again in
LiteRT on the same test images (their accuracies must be the printed ones; the INT4 file must
hold INT4 weights and compute within a point of the PTQ sweep's simulated W4A8 row).
"""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

import tfqreg
from tfqreg import deploy

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(REPO, "tflite_models", "examples", "keras3_cnn")
QUICK_TEST = 1000  # test images the example keeps with --quick (examples/_setup.py)


def _number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not found in output:\n{text[-3000:]}"
    return float(m.group(1))


def _fresh(name, since):
    path = os.path.join(FOLDER, name)
    assert os.path.isfile(path) and os.path.getsize(path) > 0, f"{path} missing or empty"
    assert os.path.getmtime(path) >= since - 1, f"{path} was not written by this run"
    return path


def test_example_keras3_cnn(data_dir):
    keras3 = pytest.importorskip("keras")
    env = dict(os.environ, TFQREG_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "examples/keras3_cnn.py", "--quick"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    out = proc.stdout
    float_acc = _number(r"Keras 3 float32 test accuracy \(reloaded from .*\): ([0-9.]+)", out)
    int8_acc = _number(r"int8 TFLite test accuracy \(LiteRT\): ([0-9.]+)", out)
    int4_acc = _number(r"int4 TFLite test accuracy \(LiteRT\): ([0-9.]+)", out)
    assert float_acc > 0.5  # learned something (quick mode reaches ~70 %)
    assert "BatchNorm: 2 folded into the layer before (conv1_bn, conv2_bn), 0 not" in out

    _, (xt, yt) = tfqreg.datasets.load_numpy("fashion_mnist", data_dir)
    xt, yt = xt[:QUICK_TEST], yt[:QUICK_TEST]
    model = keras3.models.load_model(_fresh("keras3_cnn.keras", t0))
    assert type(model.get_layer("conv1").kernel_regularizer).__name__ == "LInf"
    acc = float(np.mean(model.predict(xt, verbose=0).argmax(-1) == yt))
    assert acc == pytest.approx(float_acc, abs=5e-5)

    files = {}
    for name, printed in (("int8", int8_acc), ("int4", int4_acc)):
        flat = open(_fresh(f"keras3_cnn_{name}.tflite", t0), "rb").read()
        got = deploy.Runner(flat, "litert").predict(xt)
        assert float(np.mean(got.argmax(-1) == yt)) == pytest.approx(printed, abs=5e-5)
        files[name] = deploy.weight_report(flat)
    assert set(files["int8"].weight_bytes) == {"int8"}
    assert {t.dtype for t in files["int4"].tensors} == {"int4"}
    assert files["int4"].total_weight_bytes < 0.6 * files["int8"].total_weight_bytes

    with open(_fresh("sweep.json", t0)) as f:
        sweep = json.load(f)
    rows = {(r["weight_bits"], r["activation_bits"]): r["accuracy"] for r in sweep["rows"]}
    assert set(rows) == {(None, None), (8, 8), (6, 8), (4, 8), (3, 8)}
    assert rows[(None, None)] == pytest.approx(float_acc, abs=5e-5)
    assert sweep["num_examples"] == QUICK_TEST
    # the 4-bit file computes the simulated W4A8 model (same grid, same calibration images)
    assert abs(rows[(4, 8)] - int4_acc) <= 0.01
    with open(_fresh("summary.json", t0)) as f:
        summary = json.load(f)
    assert summary["files"]["int4"]["test_accuracy"] == pytest.approx(int4_acc, abs=5e-5)
