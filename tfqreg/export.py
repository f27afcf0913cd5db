"""Ship a Keras model: TFLite (float, dynamic-range, full-integer int8) and Larq Compute Engine,
each with a parity check in the interpreter that will run it.

The last station of tfqreg (build -> train -> quantize -> **ship**). Every converter returns an
:class:`ExportResult`: the flatbuffer bytes, the path it was written to (if any) and an
:class:`ExportReport` (ops, tensors, sizes, parity numbers) that prints as text and saves as JSON.

>>> import numpy as np
>>> from tfqreg import export, models
>>> model = models.tiny_cnn()
>>> result = export.to_tflite(model, mode="float")            # doctest: +SKIP
>>> result.report.parity.max_abs_diff < 1e-5                   # doctest: +SKIP
True
>>> x = np.random.rand(64, 28, 28, 1).astype("float32")
>>> result = export.to_tflite(model, mode="int8", representative_data=x,
...                           check=False)                     # doctest: +SKIP
>>> print(result.report.to_text())                             # doctest: +SKIP

What each mode means:

* ``"float"``: float32 weights and activations. Parity: max |TFLite − Keras| ≤ ``atol``
  (default 1e-5) on the sample.
* ``"dynamic"``: int8 weights, float activations (dynamic-range quantization). Parity: top-1
  agreement ≥ ``min_agreement``.
* ``"int8"``: full-integer: int8 weights and activations, inputs/outputs int8, uint8 or float32
  (``io_dtype``). Needs ``representative_data`` (calibration inputs shaped like the model's
  input). Parity: top-1 agreement ≥ ``min_agreement`` (default 0.99). An op that TFLite cannot
  quantize is an error naming the op (``allow_float_ops=True`` keeps it in float instead, which
  TFLite Micro and the Edge TPU then cannot run).

The batch dimension is fixed to ``batch_size`` (default 1) by re-building the model on a fixed
input, as microcontrollers and the Edge TPU need static shapes; ``batch_size=None`` keeps it
dynamic. Conversion errors become :class:`ConversionError` naming the offending op (the
converter's exception is chained as ``__cause__``); a failed parity check is a
:class:`ParityError` carrying the report.

The flatbuffers are read through TensorFlow's schema (:func:`read_tflite`), never by hand.

Command line: ``tfqreg export MODEL --target tflite|int8|edgetpu|micro|lce --out DIR``
(see :func:`add_arguments`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tfqreg._keras import check_keras2, keras, tf

__all__ = [
    "MODES",
    "IO_DTYPES",
    "TARGETS",
    "ConversionError",
    "ParityError",
    "TensorInfo",
    "OpInfo",
    "TfliteGraph",
    "read_tflite",
    "Runner",
    "ParityReport",
    "ExportReport",
    "ExportResult",
    "to_tflite",
    "to_lce",
    "load_model",
    "add_arguments",
    "run_cli",
]

MODES = ("float", "dynamic", "int8")
IO_DTYPES = ("int8", "uint8", "float32")
TARGETS = ("tflite", "int8", "edgetpu", "micro", "lce")
_CALIBRATION_SAMPLES = 500
_CHECK_SAMPLES = 1000


class ConversionError(RuntimeError):
    """A model could not be converted; the message names the op (and layer) where it could."""


class ParityError(AssertionError):
    """The converted model disagrees with Keras beyond the tolerance; ``.report`` has numbers."""

    def __init__(self, message: str, report: "ExportReport"):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# Reading flatbuffers through TensorFlow's schema.
# --------------------------------------------------------------------------------------------


def _schema():
    from tensorflow.lite.python import schema_py_generated as schema

    return schema


def _enum_names(enum_cls) -> Dict[int, str]:
    return {v: k for k, v in vars(enum_cls).items() if not k.startswith("_") and isinstance(v, int)}


@dataclass
class TensorInfo:
    """One tensor of a ``.tflite`` graph."""

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


@dataclass
class OpInfo:
    """One operator: its position, name (builtin enum name or custom code) and tensors."""

    index: int
    name: str
    custom: bool
    version: int
    inputs: List[int]
    outputs: List[int]
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TfliteGraph:
    """The main subgraph of a ``.tflite`` model, as read through TensorFlow's schema."""

    ops: List[OpInfo]
    tensors: List[TensorInfo]
    inputs: List[int]
    outputs: List[int]
    num_subgraphs: int
    size_bytes: int

    @property
    def op_names(self) -> List[str]:
        return [op.name for op in self.ops]

    @property
    def op_counts(self) -> Dict[str, int]:
        return dict(Counter(self.op_names))

    def tensor(self, index: int) -> TensorInfo:
        return self.tensors[index]


def _as_flatbuffer(model, name: str = "tflite_model") -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes(model)
    if isinstance(model, ExportResult):
        return model.flatbuffer
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`{name}`: no such .tflite file: {path!r}.")
        with open(path, "rb") as f:
            return f.read()
    raise TypeError(
        f"`{name}` must be .tflite bytes, a path to a .tflite file or an ExportResult, "
        f"got {type(model).__name__}."
    )


def read_tflite(model) -> TfliteGraph:
    """Read a ``.tflite`` flatbuffer (bytes, path or :class:`ExportResult`) into a
    :class:`TfliteGraph`, through ``tensorflow.lite.tools.flatbuffer_utils``.

    Raises:
        ValueError: the bytes are not a TFLite flatbuffer.
    """
    from tensorflow.lite.tools import flatbuffer_utils

    data = _as_flatbuffer(model)
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError("not a TFLite flatbuffer (the file identifier 'TFL3' is missing).")
    schema = _schema()
    m = flatbuffer_utils.convert_bytearray_to_object(bytearray(data))
    builtin = _enum_names(schema.BuiltinOperator)
    types = _enum_names(schema.TensorType)
    sg = m.subgraphs[0]

    def decode(s):
        return s.decode("utf-8", "replace") if isinstance(s, bytes) else (s or "")

    tensors = []
    for i, t in enumerate(sg.tensors):
        buf = m.buffers[t.buffer] if m.buffers is not None and t.buffer < len(m.buffers) else None
        constant = buf is not None and (
            (buf.data is not None and len(buf.data) > 0) or getattr(buf, "offset", 0) > 1
        )
        shape = [int(d) for d in (t.shape if t.shape is not None else [])]
        sig = t.shapeSignature
        sig = [int(d) for d in sig] if sig is not None and len(sig) else list(shape)
        q = t.quantization
        scale = [float(s) for s in q.scale] if q is not None and q.scale is not None else []
        zp = [int(z) for z in q.zeroPoint] if q is not None and q.zeroPoint is not None else []
        dtype = types.get(t.type, str(t.type)).lower()
        tensors.append(TensorInfo(i, decode(t.name), shape, sig, dtype, constant, scale, zp))
    ops = []
    for i, op in enumerate(sg.operators or []):
        code = m.operatorCodes[op.opcodeIndex]
        num = max(int(code.builtinCode), int(code.deprecatedBuiltinCode))
        custom = num == schema.BuiltinOperator.CUSTOM
        name = decode(code.customCode) if custom else builtin.get(num, f"BUILTIN_{num}")
        opts = op.builtinOptions
        options = {k: v for k, v in vars(opts).items()
                   if isinstance(v, (bool, int, float))} if opts is not None else {}
        ops.append(OpInfo(i, name, custom, int(code.version),
                          [int(k) for k in (op.inputs if op.inputs is not None else [])],
                          [int(k) for k in (op.outputs if op.outputs is not None else [])],
                          options))
    return TfliteGraph(ops, tensors, [int(k) for k in sg.inputs], [int(k) for k in sg.outputs],
                       len(m.subgraphs), len(data))


# --------------------------------------------------------------------------------------------
# Running flatbuffers: LiteRT, Larq Compute Engine, TFLite Micro; float in, float out.
# --------------------------------------------------------------------------------------------


def _quantize(x: np.ndarray, dtype, scale: float, zero_point: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return x.astype(dtype)
    if not scale:
        raise ValueError(f"an {dtype} input tensor without quantization parameters")
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale + zero_point), info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    if np.dtype(q.dtype).kind == "f" or not scale:
        return q.astype(np.float32)
    return ((q.astype(np.float32) - zero_point) * scale).astype(np.float32)


class Runner:
    """Run a ``.tflite`` flatbuffer on NumPy batches in one of three interpreters.

    Inputs are float arrays (quantized here with the input tensor's scale and zero point when the
    model takes int8/uint8); outputs come back dequantized to float32 (``raw=True`` gives the
    integers). Models with a static batch size ``B`` are run ``B`` samples at a time (the last
    chunk padded); a dynamic batch is resized.

    Args:
        flatbuffer: ``.tflite`` bytes, a path or an :class:`ExportResult`.
        backend: ``"litert"`` (``ai_edge_litert``), ``"lce"`` (Larq Compute Engine's
            interpreter, needed for ``Lce*`` ops) or ``"micro"`` (TFLite Micro's Python
            interpreter; batch 1 models).
        arena_size: TFLite Micro arena in bytes (``None``: its 10x-model-size default).
        kernels: LiteRT kernels: ``"auto"`` (default: builtin kernels + the XNNPACK delegate,
            what apps get), ``"builtin"`` (builtin optimized kernels, no delegate; agrees
            exactly with TFLite Micro on int8 models) or ``"reference"``.
    """

    BACKENDS = ("litert", "lce", "micro")
    KERNELS = ("auto", "builtin", "reference")

    def __init__(self, flatbuffer, backend: str = "litert", arena_size: Optional[int] = None,
                 kernels: str = "auto"):
        if backend not in self.BACKENDS:
            raise ValueError(f"`backend` must be one of {self.BACKENDS}, got {backend!r}.")
        if kernels not in self.KERNELS:
            raise ValueError(f"`kernels` must be one of {self.KERNELS}, got {kernels!r}.")
        self.kernels = kernels
        self.flatbuffer = _as_flatbuffer(flatbuffer, "flatbuffer")
        self.backend = backend
        graph = read_tflite(self.flatbuffer)
        self.inputs = [graph.tensor(i) for i in graph.inputs]
        self.outputs = [graph.tensor(i) for i in graph.outputs]
        if backend == "litert":
            from ai_edge_litert.interpreter import Interpreter, OpResolverType

            resolver = {"auto": OpResolverType.AUTO,
                        "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                        "reference": OpResolverType.BUILTIN_REF}[kernels]
            self._it = Interpreter(model_content=self.flatbuffer, num_threads=1,
                                   experimental_op_resolver_type=resolver)
            self._it.allocate_tensors()
            self._in = self._it.get_input_details()
            self._out = self._it.get_output_details()
        elif backend == "lce":
            from larq_compute_engine.tflite.python.interpreter import Interpreter

            self._it = Interpreter(self.flatbuffer, num_threads=1)
        else:
            from tflite_micro.python.tflite_micro import runtime

            self._it = runtime.Interpreter.from_bytes(self.flatbuffer, arena_size=arena_size)

    @staticmethod
    def _qparams(t: TensorInfo):
        return (t.scale[0] if t.scale else 0.0), (t.zero_point[0] if t.zero_point else 0)

    def _batch(self) -> Optional[int]:
        sig = self.inputs[0].shape_signature
        return None if not sig or sig[0] < 0 else sig[0]

    def predict(self, x, raw: bool = False, chunk: int = 256):
        """Outputs for a batch ``x`` (an array, or a list of arrays for several inputs).

        Returns:
            One array (single output) or a list of arrays, batch first.
        """
        xs = [np.asarray(a) for a in (x if isinstance(x, (list, tuple)) else [x])]
        if len(xs) != len(self.inputs):
            raise ValueError(f"the model has {len(self.inputs)} inputs, got {len(xs)} arrays.")
        n = len(xs[0])
        qx = [_quantize(a, t.dtype, *self._qparams(t)) for a, t in zip(xs, self.inputs)]
        step = self._batch() or min(chunk, max(n, 1))
        if self.backend != "litert":
            step = 1
        outs: List[List[np.ndarray]] = [[] for _ in self.outputs]
        for start in range(0, n, step):
            parts = [a[start:start + step] for a in qx]
            k = len(parts[0])
            if k < step and self._batch():
                parts = [np.concatenate([p, np.repeat(p[-1:], step - k, axis=0)]) for p in parts]
            for j, y in enumerate(self._invoke(parts)):
                outs[j].append(y[:k])
        res = [np.concatenate(o) for o in outs]
        if not raw:
            res = [_dequantize(r, *self._qparams(t)) for r, t in zip(res, self.outputs)]
        return res[0] if len(res) == 1 else res

    def _invoke(self, parts: List[np.ndarray]) -> List[np.ndarray]:
        it = self._it
        if self.backend == "litert":
            for d, p in zip(self._in, parts):
                if tuple(d["shape"]) != p.shape:
                    it.resize_tensor_input(d["index"], list(p.shape))
                    it.allocate_tensors()
                    self._in = it.get_input_details()
                    self._out = it.get_output_details()
            for d, p in zip(self._in, parts):
                it.set_tensor(d["index"], p)
            it.invoke()
            return [it.get_tensor(d["index"]).copy() for d in self._out]
        if self.backend == "lce":
            ys = it.interpreter.predict(parts)
            return [np.asarray(y) for y in ys]
        for i, p in enumerate(parts):
            it.set_input(p, i)
        it.invoke()
        return [np.asarray(it.get_output(i)).copy() for i in range(len(self.outputs))]


# --------------------------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------------------------


@dataclass
class ParityReport:
    """How a converted model's outputs compare with Keras on ``samples`` inputs."""

    reference: str
    backend: str
    samples: int
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: Optional[float]
    criterion: str
    passed: bool
    top1_agreement_ties: Optional[float] = None


    def to_text(self) -> str:
        agree = "n/a" if self.top1_agreement is None else f"{100 * self.top1_agreement:.2f}%"
        if self.top1_agreement_ties is not None and \
                self.top1_agreement_ties != self.top1_agreement:
            agree += f" ({100 * self.top1_agreement_ties:.2f}% counting ties)"
        return (f"parity vs {self.reference} ({self.backend}, {self.samples} samples): "
                f"max|diff| {self.max_abs_diff:.3g}, mean|diff| {self.mean_abs_diff:.3g}, "
                f"top-1 agreement {agree} -> {'PASS' if self.passed else 'FAIL'} "
                f"[{self.criterion}]")


def _fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    return f"{n:,} B ({n / 1024:.1f} KiB)"


@dataclass
class ExportReport:
    """What was converted and how well it matches: data first, prints as text, saves as JSON."""

    target: str
    mode: str
    io_dtype: str
    batch_size: Optional[int]
    inputs: List[Dict[str, Any]]
    outputs: List[Dict[str, Any]]
    ops: List[str]
    op_counts: Dict[str, int]
    tflite_bytes: int
    gzip_bytes: int
    keras_params: int
    keras_float32_bytes: int
    parity: Optional[ParityReport] = None
    notes: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def to_text(self) -> str:
        lines = [f"== {self.target} export (mode {self.mode}, io {self.io_dtype}, batch "
                 f"{self.batch_size if self.batch_size is not None else 'dynamic'}) =="]
        for kind, ts in (("input", self.inputs), ("output", self.outputs)):
            for t in ts:
                q = (f" scale {t['scale']:.6g} zero_point {t['zero_point']}"
                     if t.get("scale") else "")
                lines.append(f"{kind:6s} {t['name']}: {t['dtype']} {t['shape_signature']}{q}")
        counts = ", ".join(f"{k} x{v}" for k, v in self.op_counts.items())
        lines.append(f"ops    {len(self.ops)}: {counts}")
        ratio = self.keras_float32_bytes / self.tflite_bytes if self.tflite_bytes else float("nan")
        lines.append(f"size   Keras float32 params {_fmt_bytes(self.keras_float32_bytes)} "
                     f"({self.keras_params:,} params)")
        lines.append(f"       .tflite {_fmt_bytes(self.tflite_bytes)} "
                     f"(float32/tflite {ratio:.2f}x), "
                     f"gzip -9 {_fmt_bytes(self.gzip_bytes)}")
        if self.parity is not None:
            lines.append(self.parity.to_text())
        for k, v in self.extra.items():
            lines.append(f"{k}: {v}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@dataclass
class ExportResult:
    """A converted model: ``flatbuffer`` bytes, ``path`` if written, and its ``report``."""

    flatbuffer: bytes
    report: ExportReport
    path: Optional[str] = None

    def save(self, path: str) -> str:
        """Write the ``.tflite`` file (and ``<path>.json``, the report); returns ``path``."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.flatbuffer)
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            f.write(self.report.to_json())
        self.path = path
        return path

    def predict(self, x, backend: Optional[str] = None):
        """Run the flatbuffer on ``x`` (float in, float out); LCE models use LCE's interpreter."""
        backend = backend or ("lce" if self.report.target == "lce" else "litert")
        return Runner(self.flatbuffer, backend).predict(x)

    def to_text(self) -> str:
        return self.report.to_text()


# --------------------------------------------------------------------------------------------
# Argument checks, data, static shapes.
# --------------------------------------------------------------------------------------------


def _check_args(mode=None, io_dtype=None, batch_size=1, representative_data=None,
                min_agreement=0.99, atol=1e-5):
    """The one place export arguments are checked; errors name the argument."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    if io_dtype is not None and io_dtype not in IO_DTYPES:
        raise ValueError(f"`io_dtype` must be one of {IO_DTYPES}, got {io_dtype!r}.")
    if mode == "int8" and representative_data is None:
        raise ValueError(
            "`representative_data` is required for mode='int8': pass a few hundred typical "
            "inputs (an array shaped like the model's input with a batch axis, a tf.data.Dataset "
            "or a generator) so the converter can calibrate the activation ranges."
        )
    if mode is not None and mode != "int8" and io_dtype not in (None, "float32"):
        raise ValueError(f"`io_dtype`={io_dtype!r} needs mode='int8' (mode is {mode!r}).")
    if batch_size is not None and (isinstance(batch_size, bool)
                                   or not isinstance(batch_size, (int, np.integer))
                                   or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive integer or None, got {batch_size!r}.")
    if not 0.0 <= float(min_agreement) <= 1.0:
        raise ValueError(f"`min_agreement` must be in [0, 1], got {min_agreement!r}.")
    if not float(atol) >= 0:
        raise ValueError(f"`atol` must be >= 0, got {atol!r}.")


def _input_specs(model) -> List[tf.TensorSpec]:
    if not getattr(model, "inputs", None):
        raise ValueError(
            "`model` has no known input shape: build it on an Input (functional/Sequential "
            "with input_shape) or call it once on data before exporting."
        )
    return [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]


def _expected(spec: tf.TensorSpec) -> str:
    dims = ["N"] + ["?" if d is None else str(d) for d in spec.shape.as_list()[1:]]
    return f"({', '.join(dims)})"


def _samples(data, specs: Sequence[tf.TensorSpec], name: str, limit: Optional[int]):
    """Normalise user data to one float32 array per model input, shaped ``(N, *input_shape)``.

    Accepts an array (single input), a list/tuple of arrays (one per input), a
    ``tf.data.Dataset`` of batches or single samples (``x`` or ``(x, y)``) or a callable
    returning an iterable of such items (the TFLite ``representative_dataset`` protocol).
    """
    if isinstance(data, (np.ndarray, tf.Tensor)) or (
        isinstance(data, (list, tuple)) and data and all(
            isinstance(d, (np.ndarray, tf.Tensor)) for d in data) and len(specs) > 1
    ):
        arrays = [np.asarray(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    else:
        items = data() if callable(data) and not isinstance(data, tf.data.Dataset) else data
        try:
            iterator = iter(items)
        except TypeError:
            raise TypeError(
                f"`{name}` must be an array shaped {_expected(specs[0])}, a list of arrays (one "
                f"per input), a tf.data.Dataset or a generator; got {type(data).__name__}."
            ) from None
        chunks: List[List[np.ndarray]] = [[] for _ in specs]
        count = 0
        for item in iterator:
            if isinstance(item, dict):
                item = list(item.values())
            if isinstance(item, (list, tuple)):
                item = list(item)[: len(specs)] if len(item) > len(specs) else list(item)
            else:
                item = [item]
            for k, (a, spec) in enumerate(zip(item, specs)):
                a = np.asarray(a)
                if a.ndim == spec.shape.rank - 1:  # a single sample without batch axis
                    a = a[None]
                chunks[k].append(a)
            count += len(chunks[0][-1])
            if limit is not None and count >= limit:
                break
        if not chunks[0]:
            raise ValueError(f"`{name}` is empty.")
        try:
            arrays = [np.concatenate(c) for c in chunks]
        except ValueError as e:
            raise ValueError(f"`{name}` yields arrays of different shapes: {e}") from None
    if len(arrays) != len(specs):
        raise ValueError(f"`{name}` has {len(arrays)} arrays, but the model has {len(specs)} "
                         f"inputs {[s.name for s in specs]}.")
    out = []
    for a, spec in zip(arrays, specs):
        want = spec.shape.as_list()[1:]
        got = list(a.shape[1:])
        if a.ndim != len(want) + 1 or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(
                f"`{name}` has shape {tuple(a.shape)}, but the model input '{spec.name}' expects "
                f"{_expected(spec)} (a batch of samples shaped {tuple(want)})."
            )
        if a.dtype.kind not in "f":
            raise TypeError(
                f"`{name}` has dtype {a.dtype}, but the model input '{spec.name}' expects float32 "
                f"values shaped {_expected(spec)} (scale integer images to floats the way the "
                f"model was trained, e.g. x / 255)."
            )
        out.append(a[:limit].astype(np.float32) if limit is not None else a.astype(np.float32))
    if len(out[0]) == 0:
        raise ValueError(f"`{name}` is empty.")
    return out


def _static_model(model, batch_size: Optional[int]):
    """``model`` re-built on inputs with a fixed batch size (``None``: the model itself)."""
    specs = _input_specs(model)
    if batch_size is None:
        return model
    if all(s.shape[0] == batch_size for s in specs):
        return model
    inputs = [keras.Input(shape=s.shape[1:], batch_size=batch_size, dtype=s.dtype, name=s.name)
              for s in specs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return keras.Model(inputs, outputs, name=f"{model.name}_b{batch_size}")


def _tensor_dicts(graph: TfliteGraph, indices: Sequence[int]) -> List[Dict[str, Any]]:
    res = []
    for i in indices:
        t = graph.tensor(i)
        res.append({"name": t.name, "dtype": t.dtype, "shape": t.shape,
                    "shape_signature": t.shape_signature,
                    "scale": t.scale[0] if t.scale else None,
                    "zero_point": t.zero_point[0] if t.zero_point else None})
    return res


# --------------------------------------------------------------------------------------------
# Converter errors: name the op.
# --------------------------------------------------------------------------------------------

_OP_PATTERNS = (
    re.compile(r"'(tf\.\w+|tfl\.\w+)' op is neither a custom op nor a flex op"),
    re.compile(r"failed to legalize operation '(tf\.\w+|tfl\.\w+)'"),
    re.compile(r"Quantization not yet supported for op: '?(\w+)'?"),
    re.compile(r"'(tfl\.\w+|tf\.\w+)' op"),
)
_LOC = re.compile(r'callsite\("([^"@]+)@')
_SELECT = re.compile(r"TF Select ops: ([^\n]+)")


def _locate_tf_op(model, op_type: str) -> List[str]:
    """Names of the TensorFlow nodes of type ``op_type`` in ``model``'s inference graph (their
    name paths carry the Keras layer names, e.g. ``model/my_lambda/Erf``)."""
    try:
        specs = _input_specs(model)
        fn = tf.function(lambda *a: model(a[0] if len(a) == 1 else list(a), training=False))
        graph_def = fn.get_concrete_function(*specs).graph.as_graph_def()
    except Exception:  # locating is best effort; the conversion error is what matters
        return []
    names = [n.name for n in graph_def.node if n.op == op_type]
    for f in graph_def.library.function:
        names += [n.name for n in f.node_def if n.op == op_type]
    return names


def _explain_converter_error(exc: BaseException, what: str, model=None) -> str:
    text = str(exc)
    op = None
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            op = m.group(1)
            break
    where = None
    if op:
        short = op.split(".", 1)[-1]
        locs = [loc for loc in _LOC.findall(text) if loc.rsplit("/", 1)[-1].startswith(short)]
        if not locs and model is not None and op.startswith("tf."):
            locs = _locate_tf_op(model, short)
        where = locs[0] if locs else None
    select = _SELECT.search(text)
    first = next((ln.strip() for ln in text.splitlines() if "error:" in ln), text.splitlines()[0]
                 if text else type(exc).__name__)
    first = first.split("error:", 1)[-1].strip()
    msg = f"{what} failed"
    if op:
        msg += f" at op {op}" + (f" (graph node '{where}')" if where else "")
    msg += f": {first}"
    if select:
        msg += (f". TFLite has no builtin kernel for: {select.group(1).strip()}; replace that "
                "operation in the model (TF Select/Flex ops cannot run on microcontrollers or "
                "the Edge TPU)")
    return msg + f". [{type(exc).__name__}; the converter's full message is in __cause__]"


# --------------------------------------------------------------------------------------------
# Conversion + parity.
# --------------------------------------------------------------------------------------------


def _float_ops(graph: TfliteGraph) -> List[str]:
    """Ops that compute in float inside a model meant to be full-integer (the QUANTIZE and
    DEQUANTIZE that convert float model inputs/outputs at the boundary excepted)."""
    boundary = set(graph.inputs) | set(graph.outputs)
    bad = []
    for op in graph.ops:
        ts = [graph.tensor(i) for i in op.inputs + op.outputs if i >= 0]
        flt = [t for t in ts if t.dtype in ("float32", "float16") and not t.constant]
        if op.name == "QUANTIZE" and all(t.index in boundary for t in flt):
            continue
        if op.name == "DEQUANTIZE" and all(t.index in boundary for t in flt):
            continue
        if op.name in ("QUANTIZE", "DEQUANTIZE"):
            continue  # the float op they feed is reported instead
        if flt or any(t.dtype in ("float32", "float16") for t in ts if t.constant):
            out = graph.tensor(op.outputs[0]).name if op.outputs else "?"
            bad.append(f"{op.name} (op #{op.index}, output '{out}')")
    return bad


def _keras_predict(model, xs: List[np.ndarray]):
    y = model.predict(xs if len(xs) > 1 else xs[0], batch_size=256, verbose=0)
    return [np.asarray(a, np.float32) for a in (y if isinstance(y, (list, tuple)) else [y])]


def _parity(model, runner: Runner, xs: List[np.ndarray], mode: str, atol: float,
            min_agreement: float, reference: str = "Keras") -> ParityReport:
    want = _keras_predict(model, xs)
    got = runner.predict(xs)
    got = got if isinstance(got, list) else [got]
    diffs = [np.abs(g.reshape(w.shape) - w) for g, w in zip(got, want)]
    max_diff = float(max(d.max() for d in diffs))
    mean_diff = float(np.mean(np.concatenate([d.ravel() for d in diffs])))
    w0, g0 = want[0], got[0].reshape(want[0].shape)
    agreement = ties = None
    if w0.ndim >= 2 and w0.shape[-1] > 1:
        wf, gf = w0.reshape(len(w0), -1), g0.reshape(len(g0), -1)
        agreement = float(np.mean(wf.argmax(-1) == gf.argmax(-1)))
        # a quantized output can tie Keras' class with another one (e.g. softmax at 1/256
        # resolution); argmax then takes the first. Counting a tie as agreement:
        ties = float(np.mean(gf[np.arange(len(gf)), wf.argmax(-1)] == gf.max(-1)))
    if mode == "float":
        criterion = f"max|diff| <= {atol:g}"
        passed = max_diff <= atol
    elif agreement is not None:
        criterion = f"top-1 agreement >= {min_agreement:.2%}"
        passed = agreement >= min_agreement
    else:
        criterion = "no class axis: numbers reported, no threshold"
        passed = True
    return ParityReport(reference, runner.backend, int(len(xs[0])), max_diff, mean_diff, agreement,
                        criterion, bool(passed), ties)


def _finish(model, flat: bytes, target: str, mode: str, io_dtype: str, batch_size, check: bool,
            sample_xs, backend: str, atol: float, min_agreement: float, path, notes, extra=None):
    graph = read_tflite(flat)
    report = ExportReport(
        target=target, mode=mode, io_dtype=io_dtype, batch_size=batch_size,
        inputs=_tensor_dicts(graph, graph.inputs), outputs=_tensor_dicts(graph, graph.outputs),
        ops=graph.op_names, op_counts=graph.op_counts, tflite_bytes=len(flat),
        gzip_bytes=len(gzip.compress(flat, 9, mtime=0)), keras_params=int(model.count_params()),
        keras_float32_bytes=int(model.count_params()) * 4, notes=list(notes),
        extra=dict(extra or {}),
    )
    result = ExportResult(flat, report)
    if check:
        report.parity = _parity(model, Runner(flat, backend), sample_xs, mode, atol,
                                min_agreement)
    if path is not None:
        result.save(path)
    if check and not report.parity.passed:
        raise ParityError(
            f"{target} ({mode}) model does not match Keras: {report.parity.to_text()}. The "
            "model and the report are in `.report`; pass check=False to skip the check.", report)
    return result


def _sample_inputs(specs, sample, rep_xs, name="sample"):
    if sample is not None:
        return _samples(sample, specs, name, None)
    if rep_xs is not None:
        return [a[:_CHECK_SAMPLES] for a in rep_xs]
    rng = np.random.default_rng(0)
    return [rng.uniform(0, 1, size=[64] + [d or 1 for d in s.shape.as_list()[1:]])
            .astype(np.float32) for s in specs]


def to_tflite(
    model,
    mode: str = "float",
    representative_data=None,
    io_dtype: Optional[str] = None,
    batch_size: Optional[int] = 1,
    check: bool = True,
    sample=None,
    path: Optional[str] = None,
    atol: float = 1e-5,
    min_agreement: float = 0.99,
    allow_float_ops: bool = False,
    calibration_samples: int = _CALIBRATION_SAMPLES,
) -> ExportResult:
    """Convert a Keras model to TFLite and check it against Keras in the LiteRT interpreter.

    Args:
        model: a built ``tf_keras`` model.
        mode: ``"float"``, ``"dynamic"`` (int8 weights, float activations) or ``"int8"``
            (full integer).
        representative_data: calibration inputs for ``"int8"`` (see module docstring for the
            accepted forms); the first ``calibration_samples`` are used.
        io_dtype: model input/output type for ``"int8"``: ``"int8"`` (default), ``"uint8"`` or
            ``"float32"``; the other modes are float32.
        batch_size: static batch size of the exported model; ``None`` keeps it dynamic.
        check: run the parity check (raises :class:`ParityError` when it fails).
        sample: inputs for the parity check; default: the representative data, or (float and
            dynamic modes without data) 64 uniform random inputs in [0, 1].
        path: write the ``.tflite`` (and its JSON report) here.
        atol: float-mode tolerance on max |TFLite − Keras|.
        min_agreement: dynamic/int8-mode minimum top-1 agreement with Keras.
        allow_float_ops: int8 mode: keep ops TFLite cannot quantize in float (noted in the
            report) instead of raising.
        calibration_samples: how many representative samples calibrate the ranges.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ConversionError: the converter failed (names the op where it can), or an int8 model
            still computes some op in float.
        ParityError: ``check`` is on and the TFLite model does not match Keras.
    """
    check_keras2(model, "model", keras.Model)
    io_dtype = io_dtype or ("int8" if mode == "int8" else "float32")
    _check_args(mode, io_dtype, batch_size, representative_data, min_agreement, atol)
    specs = _input_specs(model)
    rep_xs = None
    if representative_data is not None:
        rep_xs = _samples(representative_data, specs, "representative_data", calibration_samples)
    xs = _sample_inputs(specs, sample, rep_xs) if check else None
    static = _static_model(model, batch_size)
    conv = tf.lite.TFLiteConverter.from_keras_model(static)
    if mode in ("dynamic", "int8"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        b = batch_size or 1
        n = len(rep_xs[0]) // b * b or len(rep_xs[0])

        def representative():
            for start in range(0, n, b):
                yield [a[start:start + b] for a in rep_xs]

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = (
            [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
            if allow_float_ops else [tf.lite.OpsSet.TFLITE_BUILTINS_INT8])
        conv.inference_input_type = getattr(tf, io_dtype)
        conv.inference_output_type = getattr(tf, io_dtype)
    try:
        flat = conv.convert()
    except Exception as e:  # the converter raises ConverterError and friends
        raise ConversionError(_explain_converter_error(e, f"TFLite conversion ({mode})",
                                                       model)) from e
    notes = []
    if mode == "int8":
        bad = _float_ops(read_tflite(flat))
        if bad and not allow_float_ops:
            raise ConversionError(
                f"int8 conversion left {len(bad)} op(s) computing in float: {'; '.join(bad)}. "
                "TFLite has no int8 kernel for them, so the model is not full-integer (it would "
                "not run on TFLite Micro int8 builds or the Edge TPU). Replace those operations, "
                "or pass allow_float_ops=True to keep them in float."
            )
        notes += [f"kept in float: {b}" for b in bad]
    return _finish(model, flat, "tflite", mode, io_dtype, batch_size, check, xs, "litert", atol,
                   min_agreement, path, notes)


# --------------------------------------------------------------------------------------------
# Larq Compute Engine.
# --------------------------------------------------------------------------------------------


def _binary_layers(model) -> List[str]:
    """Names of larq Conv layers whose input AND kernel quantizers are 1-bit: the ones LCE can
    turn into ``LceBconv2d``."""
    try:
        import larq as lq
    except ImportError:  # pragma: no cover
        return []
    names = []

    def walk(layer):
        for sub in getattr(layer, "layers", []) or []:
            walk(sub)
        if isinstance(layer, (lq.layers.QuantConv2D, lq.layers.QuantDepthwiseConv2D)) and not \
                isinstance(layer, lq.layers.QuantDepthwiseConv2D):
            iq, kq = layer.input_quantizer, layer.kernel_quantizer
            if iq is not None and kq is not None and getattr(iq, "precision", None) == 1 and \
                    getattr(kq, "precision", None) == 1:
                names.append(layer.name)

    walk(model)
    return names


def to_lce(
    model,
    io_dtype: str = "float32",
    batch_size: Optional[int] = 1,
    check: bool = True,
    sample=None,
    path: Optional[str] = None,
    min_agreement: float = 0.99,
    atol: float = 1e-5,
) -> ExportResult:
    """Convert a Larq BNN with Larq Compute Engine and check it in LCE's interpreter.

    LCE pattern-matches larq's sign (``larq.math.sign``) in front of a convolution with a
    binary kernel and emits ``LceQuantize`` + ``LceBconv2d`` (bit-packed weights). A sign
    written as ``tf.where(x >= 0, 1, -1)`` (tfqreg's ``foothill_sign``) is matched too, but only
    with a static batch size (measured with LCE 0.16: with ``batch_size=None`` it stays
    ``GREATER_EQUAL`` + ``SELECT`` + float ``CONV_2D``). The report
    lists the ops, how many binary conv layers became ``LceBconv2d``
    (``extra["binary_conv_layers"]`` vs ``op_counts["LceBconv2d"]``) and names the binary
    layers LCE did not binarize (a quantizer whose forward pass LCE does not recognise runs as a
    float convolution: correct, but neither small nor fast).

    Args:
        model: a built ``tf_keras`` model with larq layers.
        io_dtype: ``"float32"`` (default) or ``"int8"`` (int8 inputs/outputs; needs
            fake-quantized boundaries in the model).
        batch_size, check, sample, path: as in :func:`to_tflite`.
        min_agreement: minimum top-1 agreement with Keras.
        atol: only reported (binary networks amplify float rounding near sign thresholds).

    Raises:
        ConversionError: LCE could not convert the model.
        ParityError: ``check`` is on and top-1 agreement is below ``min_agreement``.
    """
    check_keras2(model, "model", keras.Model)
    if io_dtype not in ("float32", "int8"):
        raise ValueError(f"`io_dtype` must be 'float32' or 'int8' for LCE, got {io_dtype!r}.")
    _check_args(None, None, batch_size, None, min_agreement, atol)
    import larq_compute_engine as lce

    specs = _input_specs(model)
    xs = _sample_inputs(specs, sample, None) if check else None
    static = _static_model(model, batch_size)
    try:
        flat = lce.convert_keras_model(static, inference_input_type=getattr(tf, io_dtype),
                                       inference_output_type=getattr(tf, io_dtype))
    except Exception as e:
        raise ConversionError(_explain_converter_error(e, "LCE conversion", model)) from e
    graph = read_tflite(flat)
    binary = _binary_layers(model)
    bconv_outputs = [graph.tensor(op.outputs[0]).name for op in graph.ops
                     if op.name == "LceBconv2d"]
    missing = [n for n in binary if not any(f"/{n}/" in f"/{o}" for o in bconv_outputs)]
    if len(bconv_outputs) >= len(binary):
        missing = []  # fused names can hide the layer; the count is what matters
    notes = []
    if missing:
        notes.append(
            f"binary layer(s) {missing} were NOT converted to LceBconv2d (they run as float "
            "CONV_2D): LCE always recognises larq's sign (larq.math.sign, as in 'ste_sign'); a "
            "sign written as tf.where(x >= 0, 1, -1) is matched only with a static batch size "
            "(keep batch_size=1) or not at all."
        )
    extra = {"binary_conv_layers": binary, "lce_bconv2d": len(bconv_outputs),
             "not_binarized": missing}
    return _finish(model, flat, "lce", "lce", io_dtype, batch_size, check, xs, "lce", atol,
                   min_agreement, path, notes, extra)


# --------------------------------------------------------------------------------------------
# Loading saved models and the command line.
# --------------------------------------------------------------------------------------------


def _register_custom_objects():
    """Import the modules that register tfqreg/larq objects, so saved models load."""
    import importlib

    for name in ("larq", "tfqreg.quantizers", "tfqreg.regularizers", "tfqreg.quantization",
                 "tfqreg.losses", "tfqreg.training"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def load_model(path: str):
    """Load a ``.keras`` / ``.h5`` file or a SavedModel folder saved by ``tf_keras``.

    Raises:
        FileNotFoundError: ``path`` does not exist (or is a folder without ``saved_model.pb``).
        ValueError: the file is not a Keras model.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"MODEL {path!r} does not exist (expected a .keras or .h5 file "
                                "or a SavedModel folder).")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"MODEL {path!r} is a folder without saved_model.pb, so it is "
                                "not a SavedModel.")
    _register_custom_objects()
    try:
        try:
            from tfqreg.quantization import quantize_scope
        except ImportError:  # pragma: no cover
            import contextlib

            quantize_scope = contextlib.nullcontext
        with quantize_scope():
            model = keras.models.load_model(path, compile=False)
    except Exception as e:
        raise ValueError(f"could not load a Keras model from {path!r}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(model, keras.Model):
        raise ValueError(f"{path!r} holds a {type(model).__name__}, not a Keras model (a "
                         "SavedModel written by tf.saved_model.save cannot be exported here; "
                         "save with model.save()).")
    return model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tfqreg export``."""
    parser.add_argument("model", metavar="MODEL", help=".keras / .h5 file or SavedModel folder")
    parser.add_argument("--target", choices=TARGETS, required=True,
                        help="tflite: float (or --mode dynamic); int8: full integer; edgetpu: "
                             "int8 + Edge TPU pre-flight; micro: int8 + TFLite Micro C source; "
                             "lce: Larq Compute Engine")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--name", default=None, help="base name of the files (default: MODEL's)")
    parser.add_argument("--mode", choices=("float", "dynamic"), default="float",
                        help="for --target tflite")
    parser.add_argument("--io-dtype", choices=IO_DTYPES, default=None,
                        help="int8 targets: input/output type (default int8)")
    parser.add_argument("--batch-size", type=int, default=1, help="static batch size (0: dynamic)")
    parser.add_argument("--data", default="fashion_mnist",
                        help="calibration/check data: fashion_mnist, mnist, or a .npy file of "
                             "float inputs")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the IDX files (default $TFQREG_DATA_DIR)")
    parser.add_argument("--tfds-dir", default=None, help="tensorflow-datasets data_dir")
    parser.add_argument("--samples", type=int, default=_CALIBRATION_SAMPLES,
                        help="calibration samples (int8 targets)")
    parser.add_argument("--check-samples", type=int, default=_CHECK_SAMPLES,
                        help="samples for the parity check")
    parser.add_argument("--no-check", action="store_true", help="skip the parity check")
    parser.add_argument("--min-agreement", type=float, default=0.99)
    parser.add_argument("--arena-margin", type=int, default=1024,
                        help="micro: bytes added to the measured arena (plus 10%%)")


def _cli_data(args, need: bool):
    if not need:
        return None, None
    if args.data.endswith(".npy"):
        if not os.path.isfile(args.data):
            raise FileNotFoundError(f"--data {args.data!r} does not exist.")
        x = np.load(args.data)
        return x[: args.samples], x[: args.check_samples]
    from tfqreg import datasets

    (x, _), (xt, _) = datasets.load_numpy(args.data, args.data_dir, args.tfds_dir)
    return x[: args.samples], xt[: args.check_samples]


def _export(args) -> str:
    model = load_model(args.model)
    base = args.name or os.path.splitext(os.path.basename(os.path.normpath(args.model)))[0]
    os.makedirs(args.out, exist_ok=True)
    batch = args.batch_size or None
    check = not args.no_check
    tflite_path = os.path.join(args.out, f"{base}.tflite")
    target = args.target
    need_data = target in ("int8", "edgetpu", "micro") or check
    rep, sample = _cli_data(args, need_data)
    if target == "tflite":
        res = to_tflite(model, mode=args.mode, batch_size=batch, check=check, sample=sample,
                        path=tflite_path, min_agreement=args.min_agreement)
        return res.report.to_text() + f"\nwrote {tflite_path}"
    if target in ("int8", "edgetpu"):
        res = to_tflite(model, mode="int8", representative_data=rep, io_dtype=args.io_dtype,
                        batch_size=batch, check=check, sample=sample, path=tflite_path,
                        min_agreement=args.min_agreement)
        text = res.report.to_text() + f"\nwrote {tflite_path}"
        if target == "edgetpu":
            from tfqreg.edgetpu import check_edgetpu

            tpu = check_edgetpu(res.flatbuffer, out_dir=args.out)
            rpath = os.path.join(args.out, f"{base}_edgetpu.json")
            with open(rpath, "w") as f:
                f.write(tpu.to_json())
            text += "\n\n" + tpu.to_text() + f"\nwrote {rpath}"
        return text
    if target == "micro":
        from tfqreg.micro import to_micro

        res = to_micro(model, rep, args.out, name=base, io_dtype=args.io_dtype or "int8",
                       check=check, sample=sample, arena_margin=(args.arena_margin, 0.10),
                       min_agreement=args.min_agreement)
        return res.to_text()
    res = to_lce(model, batch_size=batch, check=check, sample=sample, path=tflite_path,
                 min_agreement=args.min_agreement)
    return res.report.to_text() + f"\nwrote {tflite_path}"


def run_cli(args: argparse.Namespace) -> int:
    """Run ``tfqreg export``: print the report, return 0; on bad input print one clear error
    line (no traceback) to stderr and return 2 (1 for a failed parity check)."""
    try:
        text = _export(args)
    except ParityError as e:
        print(e.report.to_text(), file=sys.stdout)
        print(f"tfqreg export: parity check failed: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, TypeError, ConversionError) as e:
        print(f"tfqreg export: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
