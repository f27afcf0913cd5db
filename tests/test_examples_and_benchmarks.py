"""Smoke tests: every example and benchmark script runs end to end (``--quick``) on real data.

Each script runs in a fresh interpreter (``sys.executable``, cwd = the repository, the real
Fashion-MNIST files through ``TFQREG_DATA_DIR``), and the test checks what it produced: exit
code 0, the JSON with the expected keys and rows, accuracies in [0, 1] and above chance (10 %)
where a model was trained, the artifacts (``.tflite``, ``.cc``/``.h``, ``.keras``/``.h5``)
present and non-empty and consistent with each other. Quick modes train on 2,000 images for one
epoch, so the accuracy floors are set well below what they reach (50-65 %).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tfqreg.export import read_tflite

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
EXAMPLES_OUT = os.path.join(REPO, "tflite_models", "examples")
CHANCE = 0.10
TRAINED_FLOOR = 0.25  # 2.5x chance: a model that learned something


def _run(script, data_dir, timeout, *args):
    env = dict(os.environ, TFQREG_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    start = time.time()
    proc = subprocess.run([sys.executable, script, "--quick", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{script} exited with {proc.returncode}\n--- stdout\n"
                                  f"{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc.stdout, start


def _fresh_file(path, since):
    assert os.path.isfile(path), f"{path} was not written"
    assert os.path.getsize(path) > 0, f"{path} is empty"
    assert os.path.getmtime(path) >= since - 1, f"{path} is stale (not written by this run)"
    return path


def _number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not found in output:\n{text[-3000:]}"
    return float(m.group(1))


def _acc_ok(a, trained=True):
    assert 0.0 <= a <= 1.0
    if trained:
        assert a > TRAINED_FLOOR, a


# ------------------------------------------------------------------------------------ examples
def test_example_regularizer_keras(data_dir):
    out, t0 = _run("examples/regularizer_keras.py", data_dir, 400)
    folder = os.path.join(EXAMPLES_OUT, "regularizer_keras")
    for name in ("plain", "linf"):
        assert f"== {name} ==" in out
        _fresh_file(os.path.join(folder, f"{name}.keras"), t0)
        _fresh_file(os.path.join(folder, f"{name}_sweep.png"), t0)
        with open(_fresh_file(os.path.join(folder, f"{name}_sweep.json"), t0)) as f:
            sweep = json.load(f)
        rows = {(r["weight_bits"], r["activation_bits"]): r["accuracy"] for r in sweep["rows"]}
        assert set(rows) == {(None, None), (8, 8), (6, 8), (4, 8), (3, 8), (2, 8)}
        assert sweep["per_channel"] is False and sweep["num_examples"] == 1000
        _acc_ok(rows[(None, None)])
        _acc_ok(rows[(8, 8)])
        # 8-bit PTQ of a trained model stays within a few points of float
        assert abs(rows[(8, 8)] - rows[(None, None)]) < 0.05
        for a in rows.values():
            _acc_ok(a, trained=False)


def test_example_bnn_larq_foothill(data_dir):
    out, t0 = _run("examples/bnn_larq_foothill.py", data_dir, 400)
    folder = os.path.join(EXAMPLES_OUT, "bnn_larq_foothill")
    assert "Ratio of MACs that are binarized" in out  # larq.models.summary
    keras_acc = _number(r"Keras test accuracy: ([0-9.]+)", out)
    lce_acc = _number(r"test accuracy in LCE's interpreter ([0-9.]+)", out)
    _acc_ok(keras_acc)
    assert abs(lce_acc - keras_acc) <= 0.01  # the converted BNN computes the same network
    _fresh_file(os.path.join(folder, "bnn_foothill.keras"), t0)
    graph = read_tflite(open(_fresh_file(os.path.join(folder, "bnn_foothill_lce.tflite"), t0),
                             "rb").read())
    # the three binary-input convolutions (incl. the dense head written as convs) bit-packed
    assert graph.op_counts.get("LceBconv2d") == 3, graph.op_counts
    assert "FULLY_CONNECTED" not in graph.op_counts


def test_example_qat_tfmot_nbit(data_dir):
    out, t0 = _run("examples/qat_tfmot_nbit.py", data_dir, 400)
    float_acc = _number(r"float32: ([0-9.]+)", out)
    ptq_acc = _number(r"PTQ W4A8: ([0-9.]+)", out)
    qat_acc = _number(r"QAT W4A8 \(fake-quantized forward pass\): ([0-9.]+)", out)
    reloaded = _number(r"reloaded from .*: ([0-9.]+)", out)
    for a in (float_acc, ptq_acc, qat_acc):
        _acc_ok(a)
    assert reloaded == qat_acc  # the saved QAT model reloads with its quantizer state
    _fresh_file(os.path.join(EXAMPLES_OUT, "qat_tfmot_nbit", "small_cnn_qat_w4a8.h5"), t0)


def test_example_edgetpu_export(data_dir):
    out, t0 = _run("examples/edgetpu_export.py", data_dir, 400)
    folder = os.path.join(EXAMPLES_OUT, "edgetpu_export")
    flat = open(_fresh_file(os.path.join(folder, "small_cnn_int8.tflite"), t0), "rb").read()
    with open(_fresh_file(os.path.join(folder, "edgetpu_preflight.json"), t0)) as f:
        report = json.load(f)
    graph = read_tflite(flat)
    assert [o["op"] for o in report["ops"]] == graph.op_names
    assert report["tflite_bytes"] == len(flat)
    # small_cnn in full int8 uses only Edge TPU ops with int8 tensors and static shapes
    assert report["ok"] is True and report["first_cpu_op"] is None and report["cpu_ops"] == 0
    assert all(t.dtype in ("int8", "int32") for t in graph.tensors), \
        {t.dtype for t in graph.tensors}
    assert "verdict: OK, fully mappable" in out
    _acc_ok(_number(r"Keras float32 test accuracy: ([0-9.]+)", out))
    _acc_ok(_number(r"int8 TFLite test accuracy \(LiteRT\): ([0-9.]+)", out))


def test_example_micro_export(data_dir):
    out, t0 = _run("examples/micro_export.py", data_dir, 400)
    folder = os.path.join(EXAMPLES_OUT, "micro_export")
    flat = open(_fresh_file(os.path.join(folder, "fmnist_cnn.tflite"), t0), "rb").read()
    cc = open(_fresh_file(os.path.join(folder, "fmnist_cnn_model_data.cc"), t0)).read()
    h = open(_fresh_file(os.path.join(folder, "fmnist_cnn_model_data.h"), t0)).read()
    assert "g_fmnist_cnn_model" in cc and f"g_fmnist_cnn_model_len = {len(flat)};" in cc
    # the C array holds exactly the .tflite bytes
    arr = cc[cc.index("g_fmnist_cnn_model[]"):]
    arr = arr[arr.index("{") + 1:arr.index("}")]
    assert bytes(int(b, 16) for b in re.findall(r"0x([0-9a-fA-F]{2})", arr)) == flat
    arena = int(_number(r"kTensorArenaSize = (\d+);", out))
    measured = int(_number(r"// measured (\d+) B", out))
    assert 0 < measured < arena
    assert f"constexpr size_t kTensorArenaSize = {arena};" in h
    for op in ("AddConv2D", "AddMaxPool2D", "AddFullyConnected", "AddSoftmax"):
        assert f"resolver.{op}();" in out
    _acc_ok(_number(r"int8 model in TFLite Micro, \d+ test images: accuracy ([0-9.]+)", out))


# ---------------------------------------------------------------------------------- benchmarks
def test_benchmark_robustness_extra_rows_late_start(data_dir):
    # an extra (non-standard) row goes to its own tagged file, and its late start shows in the
    # training log: the gradient-ℓ1 term is exactly 0 in epoch 1 and positive in epoch 2
    out, t0 = _run("benchmarks/robustness.py", data_dir, 600, "--methods",
                   "gradient_l1_1e-2_late", "--tag", "smoke", "--epochs", "2")
    with open(_fresh_file(os.path.join(RESULTS, "robustness_smoke_quick.json"), t0)) as f:
        res = json.load(f)
    assert set(res["aggregate"]) == {"gradient_l1_1e-2_late"} and res["epochs"] == 2
    per_epoch = [float(v) for v in re.findall(r"grad_l1_w: ([0-9.e+-]+)", out)]
    assert len(per_epoch) == 2 and per_epoch[0] == 0.0 and per_epoch[1] > 0.0, per_epoch
    _acc_ok(res["aggregate"]["gradient_l1_1e-2_late"]["per_channel"]["fp32"]["mean"])


def test_benchmark_robustness_quick(data_dir):
    _, t0 = _run("benchmarks/robustness.py", data_dir, 900)
    with open(_fresh_file(os.path.join(RESULTS, "robustness_quick.json"), t0)) as f:
        res = json.load(f)
    _fresh_file(os.path.join(RESULTS, "robustness_quick.png"), t0)
    assert res["quick"] is True and res["seeds_done"] == 1
    expected = {"plain", "foothill", "linf", "margin", "soft_min_max", "msqe_learnable_w4",
                "gradient_l1", "tfmot_qat_w8a8", "qat_w4a4"}
    assert set(res["aggregate"]) == expected
    for name, by in res["aggregate"].items():
        for gran in ("per_channel", "per_tensor"):
            assert set(by[gran]) == set(res["columns"])
            for col, stat in by[gran].items():
                _acc_ok(stat["mean"], trained=False)
        _acc_ok(by["per_channel"]["fp32"]["mean"])
        _acc_ok(by["per_channel"]["W8A8"]["mean"])
    assert res["model"] == "small_cnn" and res["parameters"] == 225034
    assert res["settings"]["histogram"] == "fc1 kernel"


# one row per code path of the ds_cnn table (~2 min; all nine take ~3): a plain model, a
# learnable regularizer (its kernel_hardness is not copied), the two TrainingModel terms, TFMOT's
# QAT (its Conv+BN+ReLU6 pattern wraps the BatchNorm) and tfqreg's n-bit QAT (BN unwrapped).
# Foothill and L∞ build like soft-min-max (a kernel_regularizer, no extra weight).
DS_CNN_SMOKE_ROWS = ["plain", "soft_min_max", "msqe_learnable_w4", "gradient_l1",
                     "tfmot_qat_w8a8", "qat_w4a4"]


def test_benchmark_robustness_ds_cnn_quick(data_dir):
    # the rows train the BatchNorm model and are evaluated through a plain copy of all weights
    _, t0 = _run("benchmarks/robustness.py", data_dir, 900, "--model", "ds_cnn", "--methods",
                 *DS_CNN_SMOKE_ROWS)
    with open(_fresh_file(os.path.join(RESULTS, "robustness_ds_cnn_quick.json"), t0)) as f:
        res = json.load(f)
    _fresh_file(os.path.join(RESULTS, "robustness_ds_cnn_quick.png"), t0)
    _fresh_file(os.path.join(RESULTS, "robustness_ds_cnn_quick_histograms.png"), t0)
    assert res["model"] == "ds_cnn" and res["parameters"] == 69258
    assert res["settings"] == {"model": "ds_cnn", "parameters": 69258, "epochs": 1,
                               "batch_size": 128, "optimizer": "Adam(1e-3)",
                               "histogram": "pw4 kernel·γ/√(σ²+ε) (BN-folded)"}
    assert res["quick"] is True and res["seeds_done"] == 1 and res["batchnorm_recalibrated"]
    assert list(res["aggregate"]) == DS_CNN_SMOKE_ROWS
    for name, by in res["aggregate"].items():
        for gran in ("per_channel", "per_tensor"):
            assert set(by[gran]) == set(res["columns"])
            for stat in by[gran].values():
                _acc_ok(stat["mean"], trained=False)
        _acc_ok(by["per_channel"]["fp32"]["mean"])
        # 8-bit PTQ of the copied float weights stays near float (the copy is complete)
        assert abs(by["per_channel"]["W8A8"]["mean"] - by["per_channel"]["fp32"]["mean"]) < 0.05
        _acc_ok(res["per_seed"][name][0]["train_accuracy_last_epoch"])  # it trained


def test_benchmark_batchnorm_fold_quick(data_dir):
    out, t0 = _run("benchmarks/batchnorm_fold.py", data_dir, 600)
    with open(_fresh_file(os.path.join(RESULTS, "batchnorm_fold_quick.json"), t0)) as f:
        res = json.load(f)
    assert res["rows"] == ["plain", "linf", "soft_min_max"] and res["seeds"] == 1
    assert res["simulations"] == ["tfqreg.ptq", "independent fold", "old: raw kernels"]
    assert res["columns"] == ["fp32", "pt W4", "pt W3", "pt W4A8", "pt W3A8", "pc W4", "pc W3"]
    assert res["quick"] is True and res["epochs"] == 1 and res["test_examples"] == 1000
    for row in res["rows"]:
        r = res["per_seed"][row][0]
        _acc_ok(r["tfqreg.ptq"]["fp32"])
        for sim in res["simulations"]:
            assert set(res["columns"]) <= set(r[sim])
            for a in r[sim].values():
                _acc_ok(a, trained=False)
    # the acceptance figure: tfqreg's PTQ computes what the independent NumPy fold computes
    assert res["max_abs_diff_ptq_vs_independent_pt"] <= res["target_pt"] == 0.5
    assert res["target_met"] is True
    # the BN-free copy is the trained network; per-channel steps commute with the fold
    assert res["max_abs_diff_bn_free_fp32_pt"] <= 0.1
    assert res["max_abs_diff_independent_vs_old_per_channel_pt"] <= 0.5
    assert "max |tfqreg.ptq - independent fold| =" in out and "target <= 0.5 pt: met" in out


def test_benchmark_defaults_transfer_quick(data_dir):
    out, t0 = _run("benchmarks/defaults_transfer.py", data_dir, 900)
    with open(_fresh_file(os.path.join(RESULTS, "defaults_transfer_quick.json"), t0)) as f:
        res = json.load(f)
    archs = ["small_cnn", "ds_cnn", "resnet_small", "mlp"]
    rows = ["plain", "linf", "margin", "soft_min_max", "foothill", "msqe", "partial_l2"]
    assert list(res["runs"]) == archs and res["quick"] is True and res["epochs"] == 1
    assert res["seeds"] == res["seeds_done"] == 1 and res["test_images"] == 1000
    assert res["wall_seconds"] > 0 and "cpu_count" in res["machine"]
    # every row ran at the library's default (no arguments): the recorded configs say so
    from tfqreg import regularizers
    for arch in archs:
        assert list(res["runs"][arch]) == rows and list(res["acceptance"][arch]) == rows[1:]
        for row in rows:
            (r,) = res["runs"][arch][row]
            _acc_ok(r["fp32"])
            for c in ("W4pt", "W3pt", "W3pc"):
                _acc_ok(r[c], trained=False)
            if row != "plain":
                default = regularizers.ALIASES[row]().get_config()
                assert {k: v for k, v in r["regularizer"].items() if k != "class"} == default
            a = res["summary"][arch][row]["fp32"]
            assert a["n"] == 1 and a["mean"] == pytest.approx(100 * r["fp32"])
        for row, acc in res["acceptance"][arch].items():
            cost = res["summary"][arch]["plain"]["fp32"]["mean"] - \
                res["summary"][arch][row]["fp32"]["mean"]
            assert acc["fp32_cost_pt"] == pytest.approx(cost)
    assert res["table"] in out and "tfqreg from" in out
    # --add-to: a gradient-l1 row (TrainingModel, GradientL1 at its defaults) beside the kept runs
    added = "defaults_transfer_quick_added.json"
    shutil.copy(os.path.join(RESULTS, "defaults_transfer_quick.json"), os.path.join(RESULTS, added))
    out, t0 = _run("benchmarks/defaults_transfer.py", data_dir, 600, "--archs", "mlp",
                   "--rows", "gradient_l1", "--add-to", added)
    with open(_fresh_file(os.path.join(RESULTS, added), t0)) as f:
        merged = json.load(f)
    assert merged["added_rows"] == ["gradient_l1"]
    assert list(merged["runs"]["mlp"]) == rows + ["gradient_l1"]
    assert list(merged["runs"]["ds_cnn"]) == rows  # kept as they were
    assert merged["runs"]["ds_cnn"] == res["runs"]["ds_cnn"]
    (g,) = merged["runs"]["mlp"]["gradient_l1"]
    from tfqreg import training
    drop = ("class", "name")
    assert {k: v for k, v in g["regularizer"].items() if k not in drop} == \
        {k: v for k, v in training.GradientL1().get_config().items() if k not in drop}
    _acc_ok(g["fp32"])
    cost = merged["summary"]["mlp"]["plain"]["fp32"]["mean"] - 100 * g["fp32"]
    assert merged["acceptance"]["mlp"]["gradient_l1"]["fp32_cost_pt"] == pytest.approx(cost)
    # a +frozen_state row: the margin stays at its initial value through training
    # (and plain redone on mlp only: the other architectures keep their plain rows, and the
    # redone one equals the first, the same seed giving the same run)
    out, t0 = _run("benchmarks/defaults_transfer.py", data_dir, 600, "--archs", "mlp",
                   "--rows", "plain", "margin+frozen_state", "--add-to", added)
    with open(_fresh_file(os.path.join(RESULTS, added), t0)) as f:
        frozen = json.load(f)
    (m,) = frozen["runs"]["mlp"]["margin+frozen_state"]
    assert m["frozen_state_drift"] == 0.0 and m["regularizer"]["class"] == "Margin"
    _acc_ok(m["fp32"])
    for arch in archs:
        assert list(frozen["runs"][arch])[:len(rows)] == rows or arch == "mlp"
        assert frozen["runs"][arch]["plain"][0]["fp32"] == res["runs"][arch]["plain"][0]["fp32"]
    assert set(frozen["runs"]["mlp"]) == set(rows) | {"gradient_l1", "margin+frozen_state"}


def test_benchmark_defaults_transfer_render_paired_se(tmp_path):
    """--render recomputes the tables from per-seed runs; the cost's standard error is that of
    the same-seed differences (NumPy), not of the two rows' spreads."""
    rng = __import__("numpy").random.default_rng(0)
    plain = [{"fp32": 0.80 + 0.05 * i, "W4pt": 0.7, "W3pt": 0.6 + 0.01 * i, "W3pc": 0.6,
              "fp32_trained_stats": 0.8} for i in range(4)]
    shifts = rng.normal(-0.01, 0.002, 4)
    margin = [dict(r, fp32=r["fp32"] + d, W3pt=r["W3pt"] + 2 * d) for r, d in zip(plain, shifts)]
    path = tmp_path / "stored.json"
    path.write_text(json.dumps({"runs": {"mlp": {"plain": plain, "margin": margin}},
                                "seeds": 4, "train_images": 100, "epochs": 1}))
    out, _ = _run("benchmarks/defaults_transfer.py", "/nonexistent", 120, "--render", str(path))
    res = json.loads(path.read_text())
    a = res["acceptance"]["mlp"]["margin"]
    import numpy as np
    diffs = -100 * shifts
    assert a["fp32_cost_pt"] == pytest.approx(diffs.mean())
    assert a["fp32_cost_se"] == pytest.approx(diffs.std(ddof=1) / 2.0)
    assert a["w3pt_gain_se"] == pytest.approx(2 * diffs.std(ddof=1) / 2.0)
    # the unpaired spread is 50x larger: the table shows the paired one
    assert np.std([100 * r["fp32"] for r in margin], ddof=1) > 20 * a["fp32_cost_se"]
    assert f"{a['fp32_cost_pt']:+.1f}±{a['fp32_cost_se']:.1f}" in res["table"]
    assert res["table"] in out
    # --compare: margin − plain, the same paired differences, kept in the file for later renders
    out, _ = _run("benchmarks/defaults_transfer.py", "/nonexistent", 120, "--render", str(path),
                  "--compare", "margin", "plain")
    res = json.loads(path.read_text())
    assert res["comparisons"] == [["margin", "plain"]]
    out, _ = _run("benchmarks/defaults_transfer.py", "/nonexistent", 120, "--render", str(path))
    res = json.loads(path.read_text())
    assert res["comparisons"] == [["margin", "plain"]] and "margin − plain" in res["table"]
    # every seed is lower at FP32 (shifts ~ −1 ± 0.2 pt): decided '<'; W3pt twice that
    row = next(l for l in res["table"].splitlines() if l.startswith("mlp") and "<" in l)
    assert f"{-diffs.mean():+.1f}±{a['fp32_cost_se']:.1f} <" in row
    assert f"{-2 * diffs.mean():+.1f}±{2 * a['fp32_cost_se']:.1f} <" in row


def test_benchmark_defaults_transfer_judges_each_row_on_its_own_grid(tmp_path):
    """A range row must gain at per-tensor W3, MSQE at its own bit width, the shrinkages only
    keep FP32: a W4-only gain passes MSQE (4 bits) and fails L∞ and MSQE at 3 bits; a loss at
    both widths still passes partial L2; an FP32 cost over 0.5 pt fails every row."""
    base = {"fp32": 0.85, "W4pt": 0.80, "W3pt": 0.60, "W3pc": 0.7, "fp32_trained_stats": 0.85}
    w4_only = dict(base, W4pt=0.82, W3pt=0.58)
    worse = dict(base, W4pt=0.70, W3pt=0.50)
    costly = dict(base, fp32=0.84, W4pt=0.83, W3pt=0.65)
    rows = {"plain": [base], "linf": [w4_only], "msqe": [w4_only], "msqe:bits=3": [w4_only],
            "partial_l2": [worse], "foothill": [costly], "soft_min_max": [costly]}
    path = tmp_path / "stored.json"
    path.write_text(json.dumps({"runs": {"mlp": rows}, "seeds": 1, "train_images": 100,
                                "epochs": 1}))
    out, _ = _run("benchmarks/defaults_transfer.py", "/nonexistent", 120, "--render", str(path))
    acc = json.loads(path.read_text())["acceptance"]["mlp"]
    assert {row: (a["judged_on"], a["ok"]) for row, a in acc.items()} == {
        "linf": ("W3pt", False), "msqe": ("W4pt", True), "msqe:bits=3": ("W3pt", False),
        "partial_l2": (None, True), "foothill": (None, False), "soft_min_max": ("W3pt", False)}
    assert acc["msqe"]["w4pt_gain_pt"] == pytest.approx(2.0)
    # with the pruned accuracy on both rows, partial L2 is judged on it
    rows = {"plain": [dict(base, P50=0.50)], "partial_l2": [dict(worse, P50=0.70)],
            "partial_l2:l=2": [dict(base, P50=0.40)], "partial_l2:fraction=0.8": [dict(base, P50=0.4)]}
    path.write_text(json.dumps({"runs": {"mlp": rows}, "seeds": 1, "train_images": 100,
                                "epochs": 1}))
    _run("benchmarks/defaults_transfer.py", "/nonexistent", 120, "--render", str(path))
    pruned = json.loads(path.read_text())["acceptance"]["mlp"]
    assert {row: (a["judged_on"], a["ok"]) for row, a in pruned.items()} == {
        "partial_l2": ("P50", True), "partial_l2:l=2": ("P50", False),
        "partial_l2:fraction=0.8": (None, True)}
    assert pruned["partial_l2"]["p50_gain_pt"] == pytest.approx(20.0)
    assert acc["msqe"]["w3pt_gain_pt"] == pytest.approx(-2.0)
    assert acc["foothill"]["fp32_cost_pt"] == pytest.approx(1.0)


def _defaults_transfer():
    """``benchmarks/defaults_transfer.py`` as a module (its ``common`` import needs the path)."""
    import importlib

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        return importlib.import_module("defaults_transfer")
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))


def test_benchmark_defaults_transfer_pruned_accuracy_against_numpy():
    """P50: the 50 % smallest |w| of each kernel zeroed (NumPy computes the same logits from
    the pruned kernels), the model's weights restored after."""
    import numpy as np

    dt = _defaults_transfer()
    keras = dt.keras
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.layers.Dense(6, activation="relu", input_shape=(5,)),
                              keras.layers.Dense(3)])
    w1, b1, w2, b2 = [rng.normal(size=v.shape).astype("float32") for v in model.weights]
    model.set_weights([w1, b1, w2, b2])
    x = rng.normal(size=(400, 5)).astype("float32")

    def prune(w):  # independent: zero every |w| below the median (no ties in normal draws)
        return np.where(np.abs(w) < np.median(np.abs(w)), 0.0, w)

    logits = np.maximum(x @ prune(w1) + b1, 0) @ prune(w2) + b2
    full = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    y = full.argmax(-1)  # labels the unpruned model gets right everywhere
    expected = float(np.mean(logits.argmax(-1) == y))
    assert expected < 1.0  # pruning half the weights changes some predictions
    assert dt.pruned_accuracy(model, (x, y), 0.5) == pytest.approx(expected)
    for v, w in zip(model.weights, [w1, b1, w2, b2]):
        np.testing.assert_array_equal(v.numpy(), w)


def test_benchmark_defaults_transfer_pruned_accuracy_recalibrates_batchnorm():
    """P50 on a BatchNorm model: after pruning, the moving statistics become the batch
    statistics of the pruned pre-activations (NumPy), then both are restored."""
    import numpy as np

    dt = _defaults_transfer()
    keras = dt.keras
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.layers.Dense(6, input_shape=(5,)),
                              keras.layers.BatchNormalization(epsilon=1e-3),
                              keras.layers.ReLU(), keras.layers.Dense(3)])
    weights = [rng.normal(size=v.shape).astype("float32") for v in model.weights]
    weights[2] = np.abs(weights[2]) + 0.5  # gamma
    weights[5] = np.abs(weights[5]) + 0.5  # moving variance before
    model.set_weights(weights)
    w1, b1, gamma, beta, mean0, var0, w2, b2 = weights
    x = rng.normal(size=(300, 5)).astype("float32")
    x_cal = rng.normal(size=(200, 5)).astype("float32") + 0.3

    def prune(w):
        return np.where(np.abs(w) < np.median(np.abs(w)), 0.0, w)

    def predict(inputs, mean, var):
        pre = inputs @ prune(w1) + b1
        h = np.maximum(gamma * (pre - mean) / np.sqrt(var + 1e-3) + beta, 0)
        return (h @ prune(w2) + b2).argmax(-1)

    pre_cal = x_cal @ prune(w1) + b1
    y = np.maximum(np.maximum(x @ w1 + b1 - mean0, 0) @ w2, 0).argmax(-1)  # any labels
    expected = float(np.mean(predict(x, pre_cal.mean(0), pre_cal.var(0)) == y))
    stale = float(np.mean(predict(x, mean0, var0) == y))
    assert expected != stale  # re-estimating the statistics changes the answer here
    assert dt.pruned_accuracy(model, (x, y), 0.5, x_cal) == pytest.approx(expected)
    assert dt.pruned_accuracy(model, (x, y), 0.5) == pytest.approx(stale)
    for v, w in zip(model.weights, weights):
        np.testing.assert_array_equal(v.numpy(), w)


def test_benchmark_bnn_quick(data_dir):
    out, t0 = _run("benchmarks/bnn.py", data_dir, 600)
    with open(_fresh_file(os.path.join(RESULTS, "bnn_quick.json"), t0)) as f:
        res = json.load(f)
    _fresh_file(os.path.join(RESULTS, "bnn_quick.png"), t0)
    quantizers = ["ste_sign", "approx_sign", "swish_sign", "foothill_sign"]
    rows = [r for q in quantizers for r in (q, f"{q}+foothill_reg")]
    assert res["rows"] == rows and set(res["aggregate"]) == set(rows)
    assert res["quick"] is True and res["seeds_done"] == 1 and res["epochs"] == 1
    assert res["regularizer"]["center"] == 1.0 and res["regularizer"]["l"] > 0
    assert res["wall_seconds"] > 0 and res["cpu_seconds"] > 0
    for name in rows:
        _acc_ok(res["aggregate"][name]["test_accuracy"]["mean"])
        assert len(res["per_seed"][name]) == 1
        assert 0 < res["aggregate"][name]["mean_abs_latent"]["mean"] <= 1.0  # weight_clip
    for q in quantizers:
        assert q in out  # the table


def test_benchmark_bnn_convergence_quick(data_dir):
    """Tuning picks the best validation width and strength, the final runs record one test
    accuracy per epoch, and --resume reruns nothing."""
    qs = ["ste_sign", "approx_sign"]
    out, t0 = _run("benchmarks/bnn_convergence.py", data_dir, 600, "--quantizers", *qs)
    path = _fresh_file(os.path.join(RESULTS, "bnn_convergence_quick.json"), t0)
    _fresh_file(os.path.join(RESULTS, "bnn_convergence_quick.png"), t0)
    with open(path) as f:
        res = json.load(f)
    assert res["settings"]["epochs"] == 2 and res["settings"]["seeds"] == 1
    assert [w for w, _ in res["tuning"]["width"]["ste_sign"]] == [0.5, 1.0, 2.0]
    for q in qs:
        widths, strengths = res["tuning"]["width"][q], res["tuning"]["strength"][q]
        assert res["choice"][q]["width"] == max(widths, key=lambda t: t[1])[0]
        assert res["choice"][q]["strength"] == max(strengths, key=lambda t: t[1])[0]
        for reg, strength in ((False, None), (True, res["choice"][q]["strength"])):
            run = res["runs"][f"final|{q}|{res['choice'][q]['width']}|{strength}|0"]
            assert len(run["curve"]) == 2 and run["final"] == run["curve"][-1]
            _acc_ok(run["final"])
            row = res["summary"]["rows"][f"{q}+foothill_reg" if reg else q]
            assert row["final"]["mean"] == pytest.approx(run["final"])
    assert len(res["runs"]) == 3 + 1 + 3 * 2 + 4  # widths, strengths, final rows
    assert res["table"] in out
    again, _ = _run("benchmarks/bnn_convergence.py", data_dir, 600, "--quantizers", *qs,
                    "--resume")
    assert f"resuming: {len(res['runs'])} runs done" in again and "== " not in again


def test_benchmark_deployment_quick(data_dir):
    out, t0 = _run("benchmarks/deployment.py", data_dir, 600)
    with open(_fresh_file(os.path.join(RESULTS, "deployment_quick.json"), t0)) as f:
        res = json.load(f)
    rows = {(r["artifact"], r["runtime"]): r for r in res["rows"]}
    assert set(rows) == {("small_cnn keras fp32", "tf_keras"),
                         ("small_cnn tflite fp32", "LiteRT"),
                         ("small_cnn tflite int8", "LiteRT"),
                         ("small_cnn tflite int8", "TFLite Micro (host)"),
                         ("bnn keras (binarized)", "tf_keras"), ("bnn tflite fp32", "LiteRT"),
                         ("bnn lce", "LCE interpreter"),
                         ("bnn lce (QuantDense)", "LCE interpreter")}
    for r in res["rows"]:
        _acc_ok(r["test_accuracy"])
        for lat in r.get("latency", {}).values():
            assert 0 < lat["p10_ms"] <= lat["median_ms"] <= lat["p90_ms"]
    f32, int8 = rows[("small_cnn tflite fp32", "LiteRT")], rows[("small_cnn tflite int8",
                                                                    "LiteRT")]
    params = rows[("small_cnn keras fp32", "tf_keras")]["params"]
    assert f32["bytes"] > 4 * params > int8["bytes"] > params  # int8 weights + graph
    assert int8["gzip_bytes"] < int8["bytes"]
    assert 0 < int8["arena_measured"] < int8["tensor_arena_size"]
    # the artifacts on disk are the ones measured
    folder = os.path.join(REPO, "tflite_models", "benchmarks", "deployment_quick")
    assert os.path.getsize(_fresh_file(os.path.join(folder, "small_cnn_int8.tflite"), t0)) == \
        int8["bytes"]
    _fresh_file(os.path.join(folder, "small_cnn_int8_model_data.cc"), t0)
    lce, lce_dense = rows[("bnn lce", "LCE interpreter")], rows[("bnn lce (QuantDense)",
                                                                 "LCE interpreter")]
    assert lce["lce_bconv2d"] == 4 and lce_dense["lce_bconv2d"] == 2
    # bit-packed dense head: much smaller than float32 dense kernels, same predictions
    assert lce["bytes"] < lce_dense["bytes"] / 3
    assert abs(lce["test_accuracy"] - lce_dense["test_accuracy"]) <= 0.005
    assert lce["bytes"] < rows[("bnn tflite fp32", "LiteRT")]["bytes"] / 5


def test_benchmark_step_time_quick(data_dir):
    script = os.path.join(REPO, "benchmarks", "step_time.py")
    if not os.path.isfile(script):
        pytest.skip("benchmarks/step_time.py is not in the repository")
    out, _ = _run("benchmarks/step_time.py", data_dir, 600)
    # its --quick mode prints the table (and writes no JSON): one row per configuration with
    # the median step time and the ratios to the harness step (itself exactly 1.00×) and to fit
    rows = {name: (a, b) for name, a, b in re.findall(
        r"^(\w+)\s+[0-9.]+\s+([0-9.]+)×\s+([0-9.]+)×", out, flags=re.M)}
    assert rows.get("harness", ("",))[0] == "1.00", out[-2000:]
    assert rows.get("keras_fit", ("", ""))[1] == "1.00", out[-2000:]
    assert {"exact_wa", "fd_wa", "lazy4_fd_wa", "handwritten_exact_w"} <= set(rows), rows
    assert all(float(a) > 0 and float(b) > 0 for a, b in rows.values()), rows


def test_benchmark_bnn_convergence_render_orders(tmp_path):
    """--render decides orders by a paired t-test over seeds: a difference every seed shows by
    the same amount is decided, one that flips sign between seeds is not."""
    quantizers = ["ste_sign", "approx_sign"]
    choice = {"ste_sign": {"width": 1.0, "strength": 3e-6},
              "approx_sign": {"width": None, "strength": 3e-6}}
    base = [0.80, 0.83, 0.81]
    runs = {}
    for seed in range(3):
        b = base[seed]
        curves = {("ste_sign", None): [b, b + 0.010, b + 0.020],
                  ("approx_sign", None): [b, b + 0.000, b + 0.0100],        # 1 pt below, every seed
                  ("ste_sign", 3e-6): [b, b + 0.010 + (0.02 if seed % 2 else -0.02), b + 0.02],
                  ("approx_sign", 3e-6): [b, b, b + 0.010]}
        for (q, s), c in curves.items():
            runs[f"final|{q}|{choice[q]['width']}|{s}|{seed}"] = {
                "curve": c, "final": c[-1], "mean_abs_latent": 0.05}
    path = tmp_path / "bnn.json"
    path.write_text(json.dumps({"runs": runs, "choice": choice, "settings": {"seeds": 3},
                                "tuning": {"width": {}, "strength": {}}}))
    out, _ = _run("benchmarks/bnn_convergence.py", "/nonexistent", 120, "--render", str(path))
    res = json.loads(path.read_text())["summary"]
    last = res["decided_last_epochs"][-1]
    assert last["epoch"] == 3
    assert last["plain_pairs"] == {"ste_sign vs approx_sign": ">"}
    assert last["regularized_vs_plain"] == {"ste_sign": "≈", "approx_sign": "≈"}  # equal at ep 3
    middle = res["decided_last_epochs"][1]["regularized_vs_plain"]
    assert middle == {"ste_sign": "≈", "approx_sign": "≈"}  # ±2 pt flips: not decided
    assert res["orders_last_3_epochs_mean"]["plain_pairs"] == {"ste_sign vs approx_sign": ">"}
    assert res["max_change_last_3_epochs"] == pytest.approx(0.02)
    assert res["decided_ranking_stable"] is False  # epoch 1: all equal, not decided
    assert "ste_sign > approx_sign" in out
