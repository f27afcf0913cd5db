"""tfqreg.deploy.runtime: the three interpreters behind one Runner, and the committed models.

Oracles: NumPy closed forms for the affine (de)quantization, LiteRT driven directly, and the
numbers tflite_models/manifest.json records for the committed files.
"""

import hashlib
import json
import os
import re

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from tfqreg import datasets, deploy
from tfqreg.deploy import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, "tflite_models")
CNN = os.path.join(ROOT, "fmnist_cnn_int8.tflite")
# The low-bit reference models: name -> (runtimes that run it, the weight type of each op).
LOW_BIT = {
    "fmnist_cnn_int4": (("litert", "micro"),
                        {"CONV_2D": "int4", "FULLY_CONNECTED": "int4"}),
    "fmnist_cnn_int2_fc": (("litert",), {"CONV_2D": "int4", "FULLY_CONNECTED": "int2"}),
}


def test_quantize_and_dequantize_closed_forms():
    x = np.array([-2.0, -0.26, 0.0, 0.24, 0.26, 5.0], np.float32)
    q = runtime.quantize(x, "int8", 0.5, 3)
    np.testing.assert_array_equal(q, np.clip(np.round(x / 0.5 + 3), -128, 127).astype(np.int8))
    assert q.dtype == np.int8
    assert runtime.quantize(np.array([1e6]), "uint8", 0.1, 0)[0] == 255  # clipped
    np.testing.assert_array_equal(runtime.dequantize(q, 0.5, 3),
                                  ((q.astype(np.float32) - 3) * 0.5))
    assert runtime.quantize(x, "float32", 0.0, 0).dtype == np.float32
    np.testing.assert_array_equal(runtime.dequantize(x, 0.5, 3), x)  # float: a cast
    # an integer tensor without a scale (token ids: TFLite does not quantize them) takes
    # integers as they are, and refuses floats, naming the argument
    ids = np.array([[0, 3, 9]], np.int64)
    q_ids = runtime.quantize(ids, "int32", 0.0, 0)
    assert q_ids.dtype == np.int32 and q_ids.tolist() == [[0, 3, 9]]
    with pytest.raises(TypeError, match="`x` has dtype float32.*integer array"):
        runtime.quantize(x, "int8", 0.0, 0)


def test_runner_matches_litert_driven_directly():
    flat = open(CNN, "rb").read()
    x = np.random.default_rng(0).uniform(size=(5, 28, 28, 1)).astype(np.float32)
    # the same kernels as the runner (XNNPACK may differ by one unit on some inputs)
    it = Interpreter(model_content=flat,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    d, o = it.get_input_details()[0], it.get_output_details()[0]
    (s, z), (so, zo) = d["quantization"], o["quantization"]
    want = []
    for xi in x:
        it.set_tensor(d["index"], np.clip(np.round(xi[None] / s + z), -128, 127).astype(np.int8))
        it.invoke()
        want.append(it.get_tensor(o["index"]).copy())
    want = np.concatenate(want)
    r = deploy.Runner(flat, kernels="builtin")
    np.testing.assert_array_equal(r.predict(x, raw=True), want)
    np.testing.assert_allclose(r.predict(x), (want.astype(np.float32) - zo) * so)


def test_runner_arguments():
    with pytest.raises(ValueError, match="backend"):
        deploy.Runner(CNN, "gpu")
    with pytest.raises(ValueError, match="kernels"):
        deploy.Runner(CNN, kernels="fast")
    with pytest.raises(ValueError, match=r"1 inputs \['input_1'\], got 2 arrays"):
        deploy.Runner(CNN).predict([np.zeros((1, 28, 28, 1))] * 2)


@pytest.mark.parametrize("backend", deploy.Runner.BACKENDS)
def test_damaged_file_is_a_value_error_in_every_runner(backend):
    data = open(CNN, "rb").read()
    with pytest.raises(ValueError, match="truncated or damaged"):
        deploy.Runner(data[: len(data) // 2], backend)


@pytest.mark.slow
def test_reference_models_match_their_manifest(data_dir, tfds_dir):
    """The committed files are the ones the manifest describes, and its numbers hold: the
    arena is re-measured in TFLite Micro and the accuracy on the real test set re-measured in
    each model's interpreter."""
    manifest = json.load(open(os.path.join(ROOT, "manifest.json")))
    _, (xt, yt) = datasets.load_numpy("fashion_mnist", data_dir, tfds_dir)
    assert set(manifest["models"]) == {"fmnist_cnn_int8", "fmnist_bnn_lce", *LOW_BIT}
    for name, entry in manifest["models"].items():
        if name in LOW_BIT:
            continue  # test_low_bit_models_match_their_manifest
        data = open(os.path.join(ROOT, entry["file"]), "rb").read()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["size_bytes"]
        backend = "lce" if name.endswith("lce") else "litert"
        acc = float(np.mean(deploy.Runner(data, backend).predict(xt).argmax(1) == yt))
        assert acc == pytest.approx(entry["accuracy"], abs=1e-9)
        assert acc > 0.75
        assert deploy.read_tflite(data).op_names == entry["ops"]
        if entry["arena_bytes_measured"] is not None:
            assert deploy.measure_arena(data) == entry["arena_bytes_measured"]
            cc = open(os.path.join(ROOT, entry["c_source"][0])).read()
            body = cc[cc.index("{") + 1:cc.index("};")]
            assert bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body)) == data
            h = open(os.path.join(ROOT, entry["c_source"][1])).read()
            assert f"kTensorArenaSize = {entry['tensor_arena_size']};" in h


def _c_array(path):
    cc = open(path).read()
    body = cc[cc.index("{") + 1:cc.index("};")]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-f]{2})", body))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(LOW_BIT))
def test_low_bit_models_match_their_manifest(name, data_dir, tfds_dir):
    """The committed INT4 / INT2 files: the bytes the manifest hashes, packed INT4 / INT2
    weight tensors on a symmetric 4- / 2-bit grid, weight bytes well below the int8 twin's,
    accuracy re-measured on the manifest's subset in every runtime that runs them, and (for
    TFLite Micro) the arena re-measured and the C array equal to the file."""
    from tfqreg.deploy import lowbit

    manifest = json.load(open(os.path.join(ROOT, "manifest.json")))["models"]
    _, (xt, yt) = datasets.load_numpy("fashion_mnist", data_dir, tfds_dir)
    entry, twin = manifest[name], manifest[manifest[name]["int8_twin"]["model"]]
    runtimes, types = LOW_BIT[name]
    data = open(os.path.join(ROOT, entry["file"]), "rb").read()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert len(data) == entry["size_bytes"]
    assert deploy.read_tflite(data).op_names == entry["ops"]
    # the weights: packed types, on the grid, and their bytes
    report = lowbit.weight_report(data)
    assert {t.op: t.dtype for t in report.tensors} == types
    assert [t.dtype for t in report.tensors] == [t["dtype"] for t in entry["weight_tensors"]]
    assert report.weight_bytes == entry["weight_bytes_by_type"]
    for t in report.tensors:
        assert t.nbytes == -(-int(np.prod(t.shape)) * int(t.dtype[3:]) // 8)  # packed
        q = 2 ** ((2 if name.endswith("int2_fc") else 4) - 1) - 1  # int2_fc: 2-bit grid

        assert t.integers.min() >= -q and t.integers.max() <= q  # symmetric: never -2^(b-1)
        assert t.levels <= 2 * q + 1
    if "micro" in runtimes:  # TFLite Micro's INT4 FULLY_CONNECTED: one scale per tensor
        assert all(len(t.scales) == 1 for t in report.tensors if t.op == "FULLY_CONNECTED")
    # beside the int8 twin: the same layers, >= 40% fewer weight bytes
    twin_report = lowbit.weight_report(os.path.join(ROOT, twin["file"]))
    assert [t.shape for t in twin_report.tensors] == [t.shape for t in report.tensors]
    assert twin_report.total_weight_bytes == entry["int8_twin"]["weight_bytes"]
    assert report.total_weight_bytes <= 0.6 * twin_report.total_weight_bytes
    # accuracy on the subset, in each runtime that runs the file
    n = entry["accuracy_subset"]["images"]
    for runtime in runtimes:
        acc = float(np.mean(deploy.Runner(data, runtime).predict(xt[:n]).argmax(1) == yt[:n]))
        assert acc == pytest.approx(entry["accuracy_subset"][runtime], abs=1e-9), runtime
        assert acc > 0.75
    assert abs(entry["accuracy"] - entry["simulated_accuracy"]) < 0.01  # file == simulation
    if "micro" in runtimes:
        assert deploy.measure_arena(data) == entry["arena_bytes_measured"]
        assert _c_array(os.path.join(ROOT, entry["c_source"][0])) == data
        h = open(os.path.join(ROOT, entry["c_source"][1])).read()
        assert f"kTensorArenaSize = {entry['tensor_arena_size']};" in h
