"""tfqreg.deploy.tflite_file: reading .tflite through TensorFlow's schema.

Oracles: LiteRT's own tensor/op tables for the same flatbuffer, the schema's TensorType enum,
and damaged copies of a committed model (truncated, bits flipped) that must be refused with a
ValueError, never a struct.error from inside the flatbuffers package.
"""

import os
import pathlib
from dataclasses import dataclass

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter, OpResolverType
from tensorflow.lite.python import schema_py_generated as schema

from tfqreg import deploy, models
from tfqreg.deploy import tflite_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNN = os.path.join(REPO, "tflite_models", "fmnist_cnn_int8.tflite")
BNN = os.path.join(REPO, "tflite_models", "fmnist_bnn_lce.tflite")


def _litert_tables_agree(flat):
    graph = deploy.read_tflite(flat)
    it = Interpreter(model_content=flat,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    assert graph.op_names == [d["op_name"] for d in it._get_ops_details()]
    by_index = {d["index"]: d for d in it.get_tensor_details()}
    for t in graph.tensors:
        d = by_index[t.index]
        assert t.name == d["name"]
        assert t.shape == list(d["shape"])
        assert np.dtype(t.dtype) == np.dtype(d["dtype"])
        qp = d["quantization_parameters"]
        np.testing.assert_allclose(t.scale, qp["scales"], rtol=1e-7)
        np.testing.assert_array_equal(t.zero_point, qp["zero_points"])
    return graph


def test_read_tflite_matches_litert_tables(fashion_small):
    x = fashion_small[0][0][:100]
    res = deploy.to_tflite(models.tiny_cnn(), mode="int8", representative_data=x, check=False)
    _litert_tables_agree(res.flatbuffer)


def test_committed_model_is_read_as_litert_reads_it():
    graph = _litert_tables_agree(open(CNN, "rb").read())
    assert graph.op_names == ["CONV_2D", "CONV_2D", "RESHAPE", "FULLY_CONNECTED", "SOFTMAX"]
    assert graph.op_counts == {"CONV_2D": 2, "RESHAPE": 1, "FULLY_CONNECTED": 1, "SOFTMAX": 1}
    assert graph.num_subgraphs == 1 and graph.size_bytes == os.path.getsize(CNN)
    x = graph.tensor(graph.inputs[0])
    assert x.summary() == {"name": x.name, "dtype": "int8", "shape": [1, 28, 28, 1],
                           "shape_signature": [1, 28, 28, 1], "scale": x.scale[0],
                           "zero_point": x.zero_point[0]}
    conv = graph.ops[0]
    assert graph.tensor(conv.inputs[1]).constant and not graph.tensor(conv.outputs[0]).constant
    assert conv.options["strideW"] == conv.options["strideH"] == 2


def test_custom_ops_are_named_by_their_code():
    graph = deploy.read_tflite(BNN)
    assert "LceBconv2d" in graph.op_names
    assert all(op.custom == op.name.startswith("Lce") for op in graph.ops)


def test_dtype_names_come_from_the_schema():
    names = tflite_file.tensor_type_names()
    assert names[schema.TensorType.INT8] == "int8"
    assert names[schema.TensorType.INT4] == "int4" and schema.TensorType.INT4 == 17
    assert names[schema.TensorType.INT2] == "int2" and schema.TensorType.INT2 == 19


@dataclass
class _Carrier:
    flatbuffer: bytes


def test_anything_carrying_flatbuffer_is_accepted(tmp_path):
    data = open(CNN, "rb").read()
    for form in (data, bytearray(data), memoryview(data), CNN, pathlib.Path(CNN),
                 _Carrier(data)):
        assert deploy.as_flatbuffer(form) == data
        assert deploy.read_tflite(form).op_names[0] == "CONV_2D"
    with pytest.raises(TypeError, match="`.flatbuffer`"):
        deploy.read_tflite(_Carrier(None))
    with pytest.raises(TypeError, match="got int"):
        deploy.read_tflite(3)
    with pytest.raises(FileNotFoundError, match="no such .tflite file"):
        deploy.read_tflite(str(tmp_path / "missing.tflite"))


def test_not_a_flatbuffer():
    with pytest.raises(ValueError, match="'TFL3' is missing"):
        deploy.read_tflite(b"\x00" * 64)
    with pytest.raises(ValueError, match="'TFL3' is missing"):
        deploy.read_tflite(b"TFL3")


@pytest.mark.parametrize("path", [CNN, BNN])
def test_truncated_files_raise_value_error(path):
    data = open(path, "rb").read()
    for n in list(range(8, len(data), len(data) // 97)) + [len(data) - k for k in (1, 2, 16)]:
        with pytest.raises(ValueError, match="truncated or damaged") as info:
            deploy.read_tflite(data[:n])
        assert info.value.__cause__ is not None  # the decoder's error, chained


def test_bit_flips_raise_value_error_or_read():
    """Flipping one bit anywhere: either a graph (the bit was in data) or a ValueError."""
    data = open(CNN, "rb").read()
    rng = np.random.default_rng(0)
    refused = 0
    for pos in list(range(8, 1200)) + list(rng.integers(1200, len(data), 300)):
        damaged = bytearray(data)
        damaged[int(pos)] ^= 1 << int(rng.integers(8))
        try:
            deploy.read_tflite(bytes(damaged))
        except ValueError:
            refused += 1
    assert refused > 20
    root = bytearray(data)
    root[3] ^= 0x80  # the root table offset now points 2 GiB past the end
    with pytest.raises(ValueError, match="truncated or damaged"):
        deploy.read_tflite(bytes(root))
