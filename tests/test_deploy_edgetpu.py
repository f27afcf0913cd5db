"""tfqreg.deploy.edgetpu: the Edge TPU pre-flight report on real converted models.

Each model below is built so that exactly one documented Edge TPU requirement is broken at a
known operator; the report must name that operator as the cut and nothing earlier. Low-bit
files are made from the committed int8 model by retyping one weight tensor through the schema
(``flatbuffer_utils``), as a low-bit exporter would store it.
"""

import json
import os
import stat

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tensorflow.lite.python import schema_py_generated as schema
from tensorflow.lite.tools import flatbuffer_utils

from tfqreg import deploy, models
from tfqreg._keras import keras, tf
from tfqreg.deploy.edgetpu import SUPPORTED_OPS, check_edgetpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN = os.path.join(REPO, "tflite_models", "fmnist_cnn_int8.tflite")

_X = np.random.default_rng(0).uniform(size=(32, 28, 28, 1)).astype("float32")


def _int8(model, **kw):
    return deploy.to_tflite(model, mode="int8", representative_data=_X, check=False, **kw)


@pytest.fixture(scope="module")
def good():
    return _int8(models.tiny_cnn())


def test_good_int8_model_has_no_issues(good):
    report = check_edgetpu(good.flatbuffer, run_compiler=False)
    assert report.ok and report.first_cpu_op is None
    it = Interpreter(model_content=good.flatbuffer,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    assert [o.op for o in report.ops] == [d["op_name"] for d in it._get_ops_details()]
    assert all(o.supported and not o.issues and o.runs_on == "edgetpu" for o in report.ops)
    assert report.edgetpu_ops == len(report.ops) and report.cpu_ops == 0


def test_float_model_is_cut_at_op_zero():
    flat = deploy.to_tflite(models.tiny_cnn(), mode="float", check=False).flatbuffer
    report = check_edgetpu(flat, run_compiler=False)
    assert report.first_cpu_op == 0 and not report.ok
    assert all(o.runs_on == "cpu" for o in report.ops)
    assert any("float32, not int8/uint8" in i for i in report.ops[0].issues)
    assert any("constant" in i and "float32" in i for i in report.ops[0].issues)


def test_float_io_int8_model_is_cut_at_the_input_quantize(good):
    res = _int8(models.tiny_cnn(), io_dtype="float32")
    report = check_edgetpu(res.flatbuffer, run_compiler=False)
    assert report.ops[0].op == "QUANTIZE" and report.first_cpu_op == 0


def test_unsupported_builtin_op_is_the_cut():
    """LEAKY_RELU has an int8 TFLite kernel but is not on Coral's list."""
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(8, 3, strides=2)(inp)
    h = keras.layers.LeakyReLU(0.1)(h)
    h = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(h)
    out = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(h))
    report = check_edgetpu(_int8(keras.Model(inp, out)).flatbuffer, run_compiler=False)
    names = [o.op for o in report.ops]
    k = names.index("LEAKY_RELU")
    assert "LEAKY_RELU" not in SUPPORTED_OPS
    assert report.first_cpu_op == k and k > 0
    assert report.ops[k].issues == [
        "op LEAKY_RELU is not on the Edge TPU supported-operations list"]
    assert all(o.runs_on == "edgetpu" for o in report.ops[:k])
    # supported ops after the cut still run on the CPU: the compiler cuts once
    assert report.ops[k + 1].supported and report.ops[k + 1].runs_on == "cpu"
    assert f"cut the graph at op #{k} (LEAKY_RELU)" in report.to_text()


def test_float_fallback_op_cumsum():
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(4, 3)(inp)
    h = keras.layers.Lambda(lambda t: tf.math.cumsum(t, axis=1))(h)
    out = keras.layers.Dense(10)(keras.layers.Flatten()(h))
    res = _int8(keras.Model(inp, out), allow_float_ops=True)
    report = check_edgetpu(res, run_compiler=False)
    names = [o.op for o in report.ops]
    cut = report.ops[report.first_cpu_op]
    assert cut.op == "DEQUANTIZE" and report.first_cpu_op == names.index("DEQUANTIZE")
    cumsum = report.ops[names.index("CUMSUM")]
    assert not cumsum.supported and cumsum.runs_on == "cpu"


def test_custom_ops_are_named():
    res = deploy.to_lce(models.bnn(), check=False)
    report = check_edgetpu(res.flatbuffer, run_compiler=False)
    lce = [o for o in report.ops if o.op.startswith("Lce")]
    assert lce and all(f"custom op {o.op} is not on" in o.issues[0] for o in lce)


def test_dynamic_batch_is_reported():
    res = _int8(models.tiny_cnn(), batch_size=None)
    report = check_edgetpu(res.flatbuffer, run_compiler=False)
    assert report.first_cpu_op == 0
    assert any("dynamic dimension(s) [0]" in i for i in report.ops[0].issues)


def test_tensor_with_four_non_unit_dims():
    inp = keras.Input((28, 28, 1))
    h = keras.layers.Reshape((2, 14, 2, 14))(inp)  # a 5-D tensor (1, 2, 14, 2, 14)
    h = keras.layers.Lambda(lambda t: tf.reduce_max(t, axis=2))(h)  # -> (1, 2, 2, 14)
    out = keras.layers.Dense(10)(keras.layers.Flatten()(h))
    report = check_edgetpu(_int8(keras.Model(inp, out)).flatbuffer, run_compiler=False)
    assert [o.op for o in report.ops[:2]] == ["RESHAPE", "REDUCE_MAX"]
    assert report.first_cpu_op == 0  # the RESHAPE that produces the 5-D tensor
    for op in report.ops[:2]:
        assert any("has 4 dimensions > 1 (shape [1, 2, 14, 2, 14])" in i for i in op.issues)


def test_text_and_json(good):
    report = check_edgetpu(good, run_compiler=False)
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["first_cpu_op"] is None
    assert len(data["ops"]) == len(report.ops)
    assert "verdict: OK" in report.to_text()


def test_compiler_absent_is_said(good, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    report = check_edgetpu(good.flatbuffer)
    assert report.compiler["available"] is False
    assert "edgetpu_compiler: not found on PATH" in report.to_text()


def test_compiler_present_is_run_and_logged(good, monkeypatch, tmp_path):
    """A stand-in edgetpu_compiler records its arguments and prints a log."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "edgetpu_compiler"
    exe.write_text('#!/bin/sh\necho "Edge TPU Compiler version 16.0 args: $*"\n'
                   'echo "Model compiled successfully"\nexit 0\n')
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bindir) + os.pathsep + os.environ["PATH"])
    out = tmp_path / "out"
    report = check_edgetpu(good.flatbuffer, out_dir=str(out))
    c = report.compiler
    assert c["available"] and c["returncode"] == 0
    assert "Model compiled successfully" in c["log"]
    src = str(out / "model_for_edgetpu.tflite")
    assert c["command"][-1] == src and open(src, "rb").read() == good.flatbuffer
    assert f"args: -s -o {out} {src}" in report.to_text()


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such .tflite file"):
        check_edgetpu(str(tmp_path / "missing.tflite"))
    with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
        check_edgetpu(b"\x00" * 64)
    with pytest.raises(TypeError, match="tflite_model"):
        check_edgetpu(123)


def test_damaged_file_is_a_value_error(tmp_path):
    data = open(CNN, "rb").read()
    with pytest.raises(ValueError, match="truncated or damaged"):
        check_edgetpu(data[:-100], run_compiler=False)
    path = tmp_path / "cut.tflite"
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="truncated or damaged"):
        check_edgetpu(str(path), run_compiler=False)


def _retyped(op_index, tensor_type):
    """The committed int8 CNN with op ``op_index``'s weight tensor retyped to ``tensor_type``,
    written back through the schema; returns (bytes, weight tensor name)."""
    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(open(CNN, "rb").read()))
    sg = model.subgraphs[0]
    weight = sg.tensors[sg.operators[op_index].inputs[1]]
    assert weight.type == schema.TensorType.INT8
    weight.type = tensor_type
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), weight.name.decode()


def test_committed_int8_model_is_fully_mappable():
    report = check_edgetpu(CNN, run_compiler=False)
    assert report.ok and [o.op for o in report.ops][:2] == ["CONV_2D", "CONV_2D"]


@pytest.mark.parametrize("tensor_type, name, bits", [
    (schema.TensorType.INT4, "int4", 4),
    (schema.TensorType.INT2, "int2", 2),
])
def test_low_bit_weights_cannot_be_compiled(tensor_type, name, bits):
    flat, weight = _retyped(1, tensor_type)  # the second CONV_2D
    graph = deploy.read_tflite(flat)  # the schema's type name, as the reader gives it
    assert graph.tensor(graph.ops[1].inputs[1]).dtype == name
    report = check_edgetpu(flat, run_compiler=False)
    assert not report.ok
    assert report.first_cpu_op == 1
    assert report.ops[0].issues == [] and report.ops[0].runs_on == "edgetpu"
    conv = report.ops[1]
    assert conv.op == "CONV_2D" and conv.supported and conv.runs_on == "cpu"
    assert conv.issues == [
        f"constant '{weight}' is {name} ({bits}-bit): the Edge TPU runs 8-bit integers only, so "
        "the compiler cannot map it (export with 8-bit weights and activations for the Edge "
        "TPU)"]
    assert report.model_issues == [
        f"1 tensor(s) stored below 8 bits ({name} x1): the Edge TPU compiler accepts int8/uint8 "
        "models only"]
    text = report.to_text()
    assert f"is {name} ({bits}-bit)" in text and "verdict: NOT fully mappable" in text
    assert json.loads(report.to_json())["ok"] is False


def test_low_bit_weight_in_the_first_op_cuts_at_zero():
    flat, _ = _retyped(0, schema.TensorType.INT4)
    report = check_edgetpu(flat, run_compiler=False)
    assert report.first_cpu_op == 0 and report.edgetpu_ops == 0
    assert any("int4 (4-bit)" in i for i in report.ops[0].issues)
    assert not any("int4" in i for o in report.ops[1:] for i in o.issues)
