"""Reading ``.tflite`` files through the schema TensorFlow ships.

The bottom of :mod:`tfqreg.deploy`: nothing here imports another deploy module. A
``.tflite`` model can be given as bytes, a path, or any object that carries the bytes as
``.flatbuffer`` (an :class:`~tfqreg.deploy.report.ExportResult`, a
:class:`~tfqreg.deploy.micro.MicroResult`); :func:`as_flatbuffer` turns each into bytes and
:func:`read_tflite` decodes them with ``tensorflow.lite.tools.flatbuffer_utils`` (never by
hand) into a :class:`TfliteGraph` of :class:`OpInfo` and :class:`TensorInfo`.

>>> from tfqreg.deploy import read_tflite
>>> graph = read_tflite("tflite_models/fmnist_cnn_int8.tflite")          # doctest: +SKIP
>>> graph.op_names[:2], graph.tensor(graph.inputs[0]).dtype              # doctest: +SKIP
(['CONV_2D', 'MAX_POOL_2D'], 'int8')
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List

__all__ = ["TensorInfo", "OpInfo", "TfliteGraph", "as_flatbuffer", "read_tflite",
           "tensor_type_names"]

# What decoding a damaged flatbuffer raises inside the generated schema code and numpy
# (measured by flipping bits in and truncating a converted model).
_DECODE_ERRORS = (struct.error, IndexError, TypeError, ValueError, AttributeError,
                  OverflowError, UnicodeDecodeError, MemoryError)


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _enum_names(enum_cls) -> Dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


def tensor_type_names() -> Dict[int, str]:
    """The schema's ``TensorType`` values mapped to the lower-case names :class:`TensorInfo`
    uses as ``dtype`` (``9 -> "int8"``, ``17 -> "int4"``, ``19 -> "int2"``, ...)."""
    return {k: v.lower() for k, v in _enum_names(_schema().TensorType).items()}


@dataclass
class TensorInfo:
    """One tensor of a ``.tflite`` graph.

    Attributes:
        index: position in the subgraph's tensor table.
        name: the tensor's name.
        shape: static shape (dynamic axes are 1 here).
        shape_signature: shape with ``-1`` for axes known only at run time.
        dtype: the schema's ``TensorType`` name, lower case (``"int8"``, ``"float32"``,
            ``"int4"``, ...).
        constant: whether the tensor has data in the file (weights, biases, shape operands).
        scale: quantization scales (one per channel, or one), empty if not quantized.
        zero_point: quantization zero points, as ``scale``.
    """

    index: int
    name: str
    shape: List[int]
    shape_signature: List[int]
    dtype: str
    constant: bool
    scale: List[float] = field(default_factory=list)
    zero_point: List[int] = field(default_factory=list)

    @property
    def dynamic_dims(self) -> List[int]:
        """Axes whose size is only known at run time (``-1`` in the shape signature)."""
        return [i for i, d in enumerate(self.shape_signature) if d < 0]

    @property
    def non_unit_dims(self) -> int:
        """How many dimensions are larger than 1 (dynamic ones count as larger)."""
        return sum(1 for d in self.shape_signature if d != 1)

    def summary(self) -> Dict[str, Any]:
        """Name, dtype, shapes and the first scale / zero point (``None`` if not quantized):
        what an export report lists for a model input or output."""
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape,
                "shape_signature": self.shape_signature,
                "scale": self.scale[0] if self.scale else None,
                "zero_point": self.zero_point[0] if self.zero_point else None}


@dataclass
class OpInfo:
    """One operator: its position, name (builtin enum name or custom code) and tensors.

    Attributes:
        index: position in execution order.
        name: ``BuiltinOperator`` name (``"CONV_2D"``) or the custom code (``"LceBconv2d"``).
        custom: whether it is a custom op.
        version: the operator code's version.
        inputs: tensor indices (``-1``: an omitted optional input).
        outputs: tensor indices.
        options: the scalar fields of the op's builtin options (``strideW``,
            ``fusedActivationFunction``, ...).
    """

    index: int
    name: str
    custom: bool
    version: int
    inputs: List[int]
    outputs: List[int]
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TfliteGraph:
    """The main subgraph of a ``.tflite`` model, as read through TensorFlow's schema.

    Attributes:
        ops: operators in execution order.
        tensors: the tensor table.
        inputs: indices of the model inputs.
        outputs: indices of the model outputs.
        num_subgraphs: how many subgraphs the file has (only the first is read).
        size_bytes: size of the flatbuffer.
        signature_inputs: the first signature's input names -> tensor indices (empty when the
            file has no signature). The converter may order ``inputs`` differently from Keras
            (``meta`` before ``img``); these names are the Keras input names.
        signature_outputs: the same for the outputs.
    """

    ops: List[OpInfo]
    tensors: List[TensorInfo]
    inputs: List[int]
    outputs: List[int]
    num_subgraphs: int
    size_bytes: int
    signature_inputs: Dict[str, int] = field(default_factory=dict)
    signature_outputs: Dict[str, int] = field(default_factory=dict)

    def input_name(self, position: int) -> str:
        """The name of model input ``position`` (in file order): its signature name, else its
        tensor name without the converter's ``serving_default_`` prefix and ``:0`` suffix."""
        index = self.inputs[position]
        for name, i in self.signature_inputs.items():
            if i == index:
                return name
        name = self.tensors[index].name
        name = name[len("serving_default_"):] if name.startswith("serving_default_") else name
        return name.rsplit(":", 1)[0]

    @property
    def op_names(self) -> List[str]:
        """Operator names in execution order."""
        return [op.name for op in self.ops]

    @property
    def op_counts(self) -> Dict[str, int]:
        """How often each operator occurs, in first-use order."""
        return dict(Counter(self.op_names))

    def tensor(self, index: int) -> TensorInfo:
        """The tensor at ``index`` of the tensor table."""
        return self.tensors[index]


def as_flatbuffer(model: Any, name: str = "tflite_model") -> bytes:
    """The ``.tflite`` bytes of ``model``.

    Args:
        model: bytes-like, a path to a ``.tflite`` file, or an object with a ``.flatbuffer``
            attribute holding the bytes (an ``ExportResult``, a ``MicroResult``).
        name: the argument's name, for error messages.

    Returns:
        The flatbuffer as ``bytes`` (not checked; :func:`read_tflite` checks).

    Raises:
        FileNotFoundError: a path that is not a file.
        TypeError: anything else.
    """
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`{name}`: no such .tflite file: {path!r}.")
        with open(path, "rb") as f:
            return f.read()
    flat = getattr(model, "flatbuffer", None)
    if isinstance(flat, (bytes, bytearray, memoryview)):
        return bytes(flat)
    raise TypeError(
        f"`{name}` must be .tflite bytes, a path to a .tflite file or an object with the bytes "
        f"as `.flatbuffer` (an ExportResult), got {type(model).__name__}."
    )


def _decode(s) -> str:
    return s.decode("utf-8", "replace") if isinstance(s, bytes) else (s or "")


def _ints(values) -> List[int]:
    return [int(v) for v in (values if values is not None else [])]


def _graph(data: bytes) -> TfliteGraph:
    from tensorflow.lite.tools import flatbuffer_utils

    schema = _schema()
    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    if not m.subgraphs:
        raise ValueError("the model has no subgraph")
    builtin = _enum_names(schema.BuiltinOperator)
    types = tensor_type_names()
    buffers = m.buffers if m.buffers is not None else []
    sg = m.subgraphs[0]
    tensors = []
    for i, t in enumerate(sg.tensors if sg.tensors is not None else []):
        buf = buffers[t.buffer] if t.buffer < len(buffers) else None
        offset = int(getattr(buf, "offset", 0) or 0) if buf is not None else 0
        if offset > 1 and offset + int(getattr(buf, "size", 0) or 0) > len(data):
            raise ValueError(f"tensor {i}'s data (offset {offset}) lies past the end of the "
                             f"file ({len(data)} bytes)")
        constant = buf is not None and ((buf.data is not None and len(buf.data) > 0)
                                        or offset > 1)
        shape = _ints(t.shape)
        sig = t.shapeSignature
        sig = _ints(sig) if sig is not None and len(sig) else list(shape)
        q = t.quantization
        scale = [float(s) for s in q.scale] if q is not None and q.scale is not None else []
        zp = _ints(q.zeroPoint) if q is not None else []
        dtype = types.get(t.type, str(t.type))
        tensors.append(TensorInfo(i, _decode(t.name), shape, sig, dtype, constant, scale, zp))
    codes = m.operatorCodes if m.operatorCodes is not None else []
    ops = []
    for i, op in enumerate(sg.operators or []):
        if not 0 <= op.opcodeIndex < len(codes):
            raise ValueError(f"op {i} has operator code {op.opcodeIndex}, the file has "
                             f"{len(codes)}")
        code = codes[op.opcodeIndex]
        num = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        custom = num == schema.BuiltinOperator.CUSTOM
        name = _decode(code.customCode) if custom else builtin.get(num, f"BUILTIN_{num}")
        opts = op.builtinOptions
        options = {k: v for k, v in vars(opts).items()
                   if isinstance(v, (bool, int, float))} if opts is not None else {}
        ops.append(OpInfo(i, name, custom, int(code.version), _ints(op.inputs),
                          _ints(op.outputs), options))
    sig_in: Dict[str, int] = {}
    sig_out: Dict[str, int] = {}
    for sd in (m.signatureDefs or [])[:1]:
        if int(getattr(sd, "subgraphIndex", 0) or 0) == 0:
            sig_in = {_decode(t.name): int(t.tensorIndex) for t in (sd.inputs or [])}
            sig_out = {_decode(t.name): int(t.tensorIndex) for t in (sd.outputs or [])}
    graph = TfliteGraph(ops, tensors, _ints(sg.inputs), _ints(sg.outputs), len(m.subgraphs),
                        len(data), sig_in, sig_out)
    n = len(tensors)
    for where, indices, optional in [("model inputs", graph.inputs, False),
                                     ("model outputs", graph.outputs, False),
                                     ("the signature", list(sig_in.values())
                                      + list(sig_out.values()), False)] + \
            [(f"op {op.index} ({op.name})", op.inputs + op.outputs, True) for op in ops]:
        bad = [k for k in indices if not (-1 if optional else 0) <= k < n]
        if bad:
            raise ValueError(f"{where} refer to tensor(s) {bad}, the file has {n}")
    return graph


def read_tflite(model: Any) -> TfliteGraph:
    """Read a ``.tflite`` flatbuffer into a :class:`TfliteGraph` through
    ``tensorflow.lite.tools.flatbuffer_utils``.

    Args:
        model: bytes, a path, or an object carrying the bytes as ``.flatbuffer`` (see
            :func:`as_flatbuffer`).

    Returns:
        The first subgraph's ops and tensors.

    Raises:
        ValueError: the bytes are not a TFLite flatbuffer, or a damaged one (truncated, bits
            flipped: the decoder's own error is chained as ``__cause__``).
        FileNotFoundError: a path that does not exist.
        TypeError: ``model`` is none of the accepted forms.
    """
    data = as_flatbuffer(model)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (the file identifier 'TFL3' is missing).")
    try:
        return _graph(data)
    except _DECODE_ERRORS as e:
        raise ValueError(
            f"not a valid TFLite flatbuffer ({len(data)} bytes, truncated or damaged): "
            f"{type(e).__name__}: {e}") from e
