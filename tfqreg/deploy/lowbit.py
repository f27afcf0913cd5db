"""Real sub-8-bit TFLite weights: packed INT4 / INT2 tensors that carry tfqreg's grid exactly.

**What INT4 / INT2 TFLite means.** The TFLite schema has tensor types ``INT4`` (17) and ``INT2``
(19). A constant of that type is stored packed, two (INT4) or four (INT2) two's-complement
values per byte, the first element in the lowest bits; its quantization is affine with zero
point 0 and one float32 scale per tensor or per output channel, exactly as for int8. Kernels
unpack the values to int8 and compute as usual (int8 activations x weights -> int32
accumulator -> requantize), so the file and the weight memory shrink by 2x / 4x against int8,
while the arithmetic stays 8-bit. Biases stay int32.

**Which runtime runs which op** (``ai-edge-litert`` 2.3.0 and TFLite Micro, checked on this
project's machine; :data:`SUPPORTED_BITS` is this table):

==================  =========================  ============================================
op                  LiteRT (``"litert"``)       TFLite Micro (``"micro"``, int8 activations)
==================  =========================  ============================================
CONV_2D             INT4, INT8                 INT4, INT8
DEPTHWISE_CONV_2D   INT4, INT8                 INT4, INT8
FULLY_CONNECTED     INT2, INT4, INT8           INT4 (per tensor only), INT8
==================  =========================  ============================================

An INT2 CONV_2D fails to prepare in LiteRT with int8 activations and, as dynamic-range
quantization (which ai-edge-quantizer's own policy allows), runs and returns only NaN. TFLite
Micro has no INT2 kernel, and its DEQUANTIZE has no INT4, so low-bit weights with float
activations cannot run there. Those combinations are refused here with a ``ValueError`` naming
the op and the runtime, before anything is written. With float
activations (``activations="float"``, LiteRT only) the file holds the packed weights and a
DEQUANTIZE op in front of each float kernel: smaller file, float arithmetic.

``weight_bits`` names the file's types: ``4`` is INT4 everywhere; ``2`` is INT2
FULLY_CONNECTED and INT4 convolutions (no runtime has INT2 convolution kernels); a mapping such
as ``{"FULLY_CONNECTED": 2, "CONV_2D": 4, "DEPTHWISE_CONV_2D": 8}`` sets each op (ops not named
get INT8), and there ``"CONV_2D": 2`` is refused. A type may hold a coarser grid than its
width: the 2-bit grid of a convolution sits in INT4 as integers ``{-1, 0, 1}`` with its own
step ``δ = max|w|``, the 4-bit grid in INT8 as ``-7..7`` with ``δ = max|w|/7``.

**How the grid is carried into the file.** The input is a float ``.tflite`` whose weights
already lie on tfqreg's grid (``tfqreg.ptq.quantize(model, 4)`` and ``TFLiteConverter``):
``w = δ·k``, ``k = clip(round(w/δ), -2^(b-1), 2^(b-1)-1)``, ``δ = max|w| / (2^(b-1)-1)`` per
output channel or per tensor (:mod:`tfqreg.grid`). For each weight tensor the coarsest such grid
(``b`` from 2 up to the type's width, per channel or per tensor) is found in NumPy, exactly as
tfqreg computes it in float32. ai-edge-quantizer derives a symmetric weight scale as
``max(|min|, |max|) / (2^(B-1)-1)`` for a type of ``B`` bits (divisor 7 for INT4, 1 for INT2,
127 for INT8, whose range is the narrow ``[-127, 127]``), in the dtype of the min/max it is
given, and writes ``rint(w/scale)``. Handing it, through the calibration result, ``min = -m,
max = m`` with ``m = δ·(2^(B-1)-1)`` in float64 per channel (the tensor's ``δ`` repeated per
channel where a kernel wants per-channel scales) makes its scale ``δ`` bit for bit and its
integers ``k`` exactly. Its ``DEQUANTIZED_WEIGHT_RECOVERY`` algorithm cannot: it has no
DEPTHWISE_CONV_2D, and its scale is the smallest float gap between distinct ``|w|`` of a
channel, which differs from ``δ`` in the last bits (bit-equal in 16 of 122 channels of a
Fashion-MNIST CNN) and is ``2δ`` (then it fails) for a channel whose ``|k|`` are e.g.
``{0, 2, 5, 7}``. Before calling the tool, every weight tensor is checked to lie on the
requested grid (within 1e-4 of a step) and refused otherwise; after it, every weight tensor of
the result is read back and compared with ``k`` and ``δ``; any difference is an error, never a
silent approximation. Activations are calibrated to int8 (asymmetric, per tensor) on the min/max
over all of ``representative_data`` of the float file, whose kernels are on the grid, as
:func:`tfqreg.ptq.quantize` calibrates below 8 bits;
model inputs and outputs are int8 by default, like tfqreg's int8 export
(``io_dtype="float32"`` adds QUANTIZE / DEQUANTIZE ops at the edges).

>>> from tfqreg import ptq
>>> from tfqreg.deploy import lowbit
>>> q4 = ptq.quantize(model, 4)                                     # doctest: +SKIP
>>> flat = tf.lite.TFLiteConverter.from_keras_model(q4).convert()   # doctest: +SKIP
>>> int4 = lowbit.quantize_tflite(flat, 4, "litert", [x[:500]])     # doctest: +SKIP
>>> print(lowbit.weight_report(int4))                               # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "RUNTIMES",
    "ACTIVATIONS",
    "IO_DTYPES",
    "WEIGHT_OPS",
    "SUPPORTED_BITS",
    "WeightPlan",
    "WeightTensor",
    "WeightReport",
    "plan",
    "quantize_tflite",
    "weight_report",
    "unpack_integers",
]

RUNTIMES = ("litert", "micro")
ACTIVATIONS = ("int8", "float")
IO_DTYPES = ("int8", "float32")
WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
# (runtime, activations) -> op -> weight bit widths its kernels run.
_CONVS = {"CONV_2D": (4, 8), "DEPTHWISE_CONV_2D": (4, 8)}
SUPPORTED_BITS: Dict[Tuple[str, str], Dict[str, Tuple[int, ...]]] = {
    ("litert", "int8"): {**_CONVS, "FULLY_CONNECTED": (2, 4, 8)},
    ("litert", "float"): {**_CONVS, "FULLY_CONNECTED": (2, 4, 8)},
    ("micro", "int8"): {**_CONVS, "FULLY_CONNECTED": (4, 8)},
    ("micro", "float"): dict.fromkeys(WEIGHT_OPS, ()),
}
_WHY = {  # why a combination is refused, for the error message
    ("litert", 2): "LiteRT runs INT2 weights only in FULLY_CONNECTED (an INT2 CONV_2D fails to "
                   "prepare or returns NaN silently)",
    ("micro", 2): "TFLite Micro has no INT2 kernels",
    ("micro", "float"): "TFLite Micro runs low-bit weights only in integer kernels (its "
                        "DEQUANTIZE has no INT4/INT2); use activations='int8'",
}
_WEIGHT_AXIS = {"CONV_2D": 0, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 0}  # output channel
_GRID_TOLERANCE = 1e-4  # in steps: |w - δ·k| above this means "not on the grid"
_CHECK_SAMPLES = 16


def _read(data: bytes):
    """The flatbuffer as objects (TensorFlow's schema) and its tensor type names."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if isinstance(v, int)}
    return flatbuffer_utils.convert_bytearray_to_object(bytearray(data)), types


def _weights(model, data: bytes):
    """``(subgraph, op index, op name, op, tensor, bytes)`` for the constant weight of every
    weight op, also behind a DEQUANTIZE (as in weights-only files)."""
    from tensorflow.lite.python import schema_py_generated as schema

    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if isinstance(v, int)}
    for s, sg in enumerate(model.subgraphs):
        ops = sg.operators or []
        names = [builtin.get(max(int(model.operatorCodes[op.opcodeIndex].builtinCode),
                                 int(model.operatorCodes[op.opcodeIndex].deprecatedBuiltinCode)))
                 for op in ops]
        behind = {int(op.outputs[0]): int(op.inputs[0])
                  for op, n in zip(ops, names) if n == "DEQUANTIZE"}
        for i, (op, name) in enumerate(zip(ops, names)):
            if name in WEIGHT_OPS and op.inputs is not None and len(op.inputs) > 1:
                t = sg.tensors[behind.get(int(op.inputs[1]), int(op.inputs[1]))]
                raw = _buffer_bytes(model, data, t.buffer)
                if raw is not None:  # else a runtime tensor, not a weight
                    yield s, i, name, op, t, raw


def _as_bytes(model: Any, name: str) -> bytes:
    if isinstance(model, (bytes, bytearray, memoryview)):
        data = bytes(model)
    elif hasattr(model, "flatbuffer"):
        data = bytes(model.flatbuffer)
    elif isinstance(model, (str, os.PathLike)):
        if not os.path.isfile(model):
            raise FileNotFoundError(f"`{name}`: no such .tflite file: {os.fspath(model)!r}.")
        with open(model, "rb") as f:
            data = f.read()
    else:
        raise TypeError(f"`{name}` must be .tflite bytes, a path or an object with "
                        f".flatbuffer, got {type(model).__name__}.")
    if len(data) < 8 or data[4:8] != b"TFL3":
        raise ValueError(f"`{name}` is not a TFLite flatbuffer (no 'TFL3' identifier).")
    return data


def _check_args(weight_bits: Any = 4, runtime: str = "litert", activations: str = "int8",
                io_dtype: Optional[str] = None, representative_data: Any = None,
                need_data: bool = False) -> Tuple[Dict[str, int], str]:
    """Validate the arguments; return the per-op weight bits and the resolved ``io_dtype``."""
    if runtime not in RUNTIMES:
        raise ValueError(f"`runtime` must be one of {RUNTIMES}, got {runtime!r}.")
    if activations not in ACTIVATIONS:
        raise ValueError(f"`activations` must be one of {ACTIVATIONS}, got {activations!r}.")
    if io_dtype is None:
        io_dtype = "int8" if activations == "int8" else "float32"
    if io_dtype not in IO_DTYPES:
        raise ValueError(f"`io_dtype` must be one of {IO_DTYPES}, got {io_dtype!r}.")
    if activations == "float" and io_dtype != "float32":
        raise ValueError("`io_dtype` must be 'float32' with activations='float'.")
    if isinstance(weight_bits, Mapping):
        unknown = sorted(set(weight_bits) - set(WEIGHT_OPS))
        if unknown:
            raise ValueError(f"`weight_bits` names ops {unknown}; it takes {WEIGHT_OPS}.")
        bits = {op: weight_bits.get(op, 8) for op in WEIGHT_OPS}
    else:
        bits = {op: weight_bits for op in WEIGHT_OPS}
        if weight_bits == 2:  # no runtime runs INT2 convolutions: INT4 holds the 2-bit grid
            bits.update(CONV_2D=4, DEPTHWISE_CONV_2D=4)
    for op, b in bits.items():
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or int(b) not in (2, 4, 8):
            raise ValueError(f"`weight_bits` must be 2, 4 or 8 (or a mapping op -> 2|4|8), got "
                             f"{b!r} for {op}.")
    if need_data and activations == "int8":
        if representative_data is None:
            raise ValueError("`representative_data` is required for int8 activations (one "
                             "float32 array of samples per model input).")
    return {op: int(b) for op, b in bits.items()}, io_dtype


@dataclasses.dataclass
class WeightPlan:
    """How one weight tensor goes into the file: its grid, checked before quantizing.

    ``steps`` are the grid steps δ (float32, one per output channel, repeated when the grid is
    per tensor but the file is per channel) and ``integers`` the grid indices ``k``.
    """

    op: str
    op_index: int
    subgraph: int
    name: str
    scope: str
    bits: int  # the file's type: INT2 / INT4 / INT8
    grid_bits: int  # the grid the float weights lie on (at most ``bits``)
    grid: str  # "per_channel" | "per_tensor"
    granularity: str  # "CHANNELWISE" | "TENSORWISE": how the file stores the scales
    axis: int
    bound: np.ndarray  # ±bound handed to ai-edge-quantizer as min/max (keepdims, float64)
    steps: np.ndarray
    integers: np.ndarray


def _find_grid(w: np.ndarray, bits: int, axis: int, per_tensor_first: bool):
    """The coarsest tfqreg default grid of at most ``bits`` bits that ``w`` lies on:
    ``(grid_bits, "per_channel" | "per_tensor", δ (keepdims, float32), k)``; or, when there is
    none, how far (in steps) ``w`` is from the ``bits``-bit grid."""
    axes = ((None, "per_tensor"), (axis, "per_channel"))
    deviation = 0.0
    for b in range(2, bits + 1):
        for ax, label in axes if per_tensor_first else axes[::-1]:
            red = None if ax is None else tuple(a for a in range(w.ndim) if a != ax)
            q_max = 2 ** (b - 1) - 1
            step = np.max(np.abs(w), axis=red, keepdims=True) / np.float32(q_max)  # float32,
            safe = np.where(step > 0, step, np.float32(1))  # == tfqreg.grid.default_step
            k = np.clip(np.round(w / safe), -q_max - 1, q_max)
            deviation = float(np.max(np.abs(w - safe * k) / safe)) if w.size else 0.0
            if deviation <= _GRID_TOLERANCE:
                return b, label, step.astype(np.float32), k.astype(np.int8)
    return deviation


def _refuse(op: str, name: str, runtime: str, bits: int, activations: str) -> ValueError:
    what = f"INT{bits} weights" + (" with float activations" if activations == "float" else "")
    why = _WHY.get((runtime, activations)) or _WHY[(runtime, bits)]
    return ValueError(f"{op} {name!r}: {what} are not supported on runtime {runtime!r}: {why}.")


def plan(float_tflite: Any, weight_bits: Union[int, Mapping[str, int]] = 4,
         runtime: str = "litert", activations: str = "int8") -> List[WeightPlan]:
    """Check a float ``.tflite`` against the runtime and the grid, without quantizing.

    Args:
        float_tflite: float ``.tflite`` bytes (or a path, or an object with ``.flatbuffer``).
        weight_bits: 2, 4 or 8, or a mapping ``{op: bits}`` over :data:`WEIGHT_OPS`.
        runtime: ``"litert"`` or ``"micro"``.
        activations: ``"int8"`` (full integer) or ``"float"`` (weights only; LiteRT).

    Returns:
        One :class:`WeightPlan` per constant weight of a CONV_2D / DEPTHWISE_CONV_2D /
        FULLY_CONNECTED op.

    Raises:
        ValueError: an op / bit width / runtime combination that no kernel runs (naming the op
            and the runtime), weights that do not lie on the grid, or a file that is not float.
    """
    bits_of, _ = _check_args(weight_bits, runtime, activations)
    data = _as_bytes(float_tflite, "float_tflite")
    model, types = _read(data)
    plans: List[WeightPlan] = []
    for s, i, op_name, op, t, raw in _weights(model, data):
        name = t.name.decode("utf-8", "replace")
        if types.get(t.type) != "float32":
            raise ValueError(f"{op_name} {name!r}: weights are {types.get(t.type)}, not "
                             "float32; pass the float .tflite (quantize weights with "
                             "tfqreg.ptq.quantize before converting).")
        b = bits_of[op_name]
        if b not in SUPPORTED_BITS[(runtime, activations)][op_name]:
            raise _refuse(op_name, name, runtime, b, activations)
        w = np.frombuffer(raw, np.float32).reshape([int(d) for d in t.shape])
        axis = _WEIGHT_AXIS[op_name]
        found = _find_grid(w, b, axis, per_tensor_first=op_name == "FULLY_CONNECTED")
        if isinstance(found, float):
            raise ValueError(
                f"{op_name} {name!r}: the float weights do not lie on a grid of {b} bits "
                f"or fewer, per channel or per tensor (off the {b}-bit grid by up to "
                f"{found:.3g} steps); quantize them first, e.g. "
                f"tfqreg.ptq.quantize(model, {b}).")
        grid_bits, grid, step, k = found
        per_channel_file = op_name != "FULLY_CONNECTED" or grid == "per_channel" or (
            b == 2 and runtime == "litert")  # XNNPACK runs INT2 per channel only
        if per_channel_file and op_name == "FULLY_CONNECTED" and runtime == "micro" and b == 4:
            raise ValueError(
                f"FULLY_CONNECTED {name!r}: INT4 weights on runtime 'micro' must be "
                "quantized per tensor (TFLite Micro's INT4 FULLY_CONNECTED has no "
                "per-channel scales); quantize Dense layers per tensor for TFLite Micro "
                "(e.g. tfqreg.ptq.quantize(model, 4, per_channel=False)).")
        if per_channel_file and grid == "per_tensor":
            shape = [1] * w.ndim
            shape[axis] = w.shape[axis]
            step = np.broadcast_to(step, shape)
        # The tool's scale is bound / (2^(b-1) - 1) in the bound's dtype: with a float64
        # bound of δ·(2^(b-1) - 1) (exact: 24 + 7 mantissa bits) it is δ exactly.
        bound = step.astype(np.float64) * float(2 ** (b - 1) - 1)
        plans.append(WeightPlan(op_name, i, s, name, _scope(model.subgraphs[s], op), b,
                                grid_bits, grid,
                                "CHANNELWISE" if per_channel_file else "TENSORWISE", axis,
                                bound, step.astype(np.float32).reshape(-1), k))
    if not plans:
        raise ValueError("`float_tflite` has no CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED "
                         "op with constant weights.")
    return plans


def _scope(sg, op) -> str:
    """ai-edge-quantizer's name for an op: its output tensor names, each followed by ';'."""
    names = [sg.tensors[j].name.decode("utf-8") for j in op.outputs if j != -1]
    return "".join(n + ";" for n in names if n)


def _buffer_bytes(model, data: bytes, index: int) -> Optional[bytes]:
    if model.buffers is None or index >= len(model.buffers):
        return None
    buf = model.buffers[index]
    if buf.data is not None and len(buf.data):
        return np.asarray(buf.data, np.uint8).tobytes()
    offset, size = int(getattr(buf, "offset", 0) or 0), int(getattr(buf, "size", 0) or 0)
    if offset > 1 and size:
        return data[offset:offset + size]
    return None


def _samples(representative_data: Any, data: bytes) -> Tuple[str, List[Dict[str, np.ndarray]]]:
    """The signature key and one ``{input name: (1, ...) array}`` per representative sample."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=data)
    if not it.get_signature_list():
        raise ValueError("`float_tflite` has no signature; ai-edge-quantizer calibrates through "
                         "one (convert with TFLiteConverter.from_keras_model).")
    key = next(iter(it.get_signature_list()))
    details = it.get_signature_runner(key).get_input_details()
    order = [d["index"] for d in it.get_input_details()]
    names = sorted(details, key=lambda n: order.index(details[n]["index"]))
    xs = representative_data
    xs = [np.asarray(a, np.float32) for a in (xs if isinstance(xs, (list, tuple)) else [xs])]
    if len(xs) != len(names):
        raise ValueError(f"`representative_data` must hold one array per model input "
                         f"({len(names)}: {names}), got {len(xs)}.")
    for name, a in zip(names, xs):
        want = [int(d) for d in details[name]["shape"][1:]]
        if a.ndim != len(want) + 1 or list(a.shape[1:]) != want or not len(a):
            raise ValueError(f"`representative_data` for input {name!r} must be shaped "
                             f"(N, {', '.join(map(str, want))}), got {a.shape}.")
        if not np.isfinite(a).all():
            raise ValueError(f"`representative_data` for input {name!r} is not finite.")
    n = min(len(a) for a in xs)
    return key, [{name: a[j:j + 1] for name, a in zip(names, xs)} for j in range(n)]


def _global_min_max(old: Dict[str, np.ndarray], new: Dict[str, np.ndarray]):
    if not old:
        return new
    return {"min": np.minimum(old["min"], new["min"]), "max": np.maximum(old["max"], new["max"])}


def _calibrate(data: bytes, recipe: Any, key: str,
               samples: List[Dict[str, np.ndarray]]) -> Dict[str, Dict[str, np.ndarray]]:
    """Activation ranges: min/max over all samples, as the TF converter and tfqreg.ptq take
    them (``Quantizer.calibrate`` keeps a 0.95 moving average of per-sample ranges, which clips
    the rare large activations: -11 pt on a Fashion-MNIST CNN)."""
    from ai_edge_quantizer import calibrator, recipe_manager

    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(recipe)
    calib = calibrator.Calibrator(data, num_threads=1, qsv_update_func=_global_min_max)
    with contextlib.redirect_stderr(io.StringIO()):  # the tool's tqdm bar, one line per sample
        calib.calibrate({key: samples}, manager)
    return dict(calib.get_model_qsvs())


def _recipe(qt, plans: List[WeightPlan], activations: str, io_dtype: str) -> None:
    from ai_edge_quantizer import qtyping

    op_name = qtyping.TFLOperationName
    if activations == "int8":  # every other op: ai-edge-quantizer's int8 (asymmetric) config
        qt.add_static_config(".*", op_name.ALL_SUPPORTED, 8, 8)
    for p in plans:
        act = None if activations == "float" else qtyping.TensorQuantizationConfig(
            num_bits=8, symmetric=False, granularity=qtyping.QuantGranularity.TENSORWISE)
        config = qtyping.OpQuantizationConfig(
            activation_tensor_config=act,
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=p.bits, symmetric=True,
                granularity=qtyping.QuantGranularity[p.granularity]),
            compute_precision=(qtyping.ComputePrecision.FLOAT if activations == "float"
                               else qtyping.ComputePrecision.INTEGER),
            explicit_dequantize=activations == "float",
            # The tool's policy lacks DEPTHWISE INT4 and static INT2; SUPPORTED_BITS is the
            # policy here, and the result is verified tensor by tensor.
            skip_checks=True)
        qt.update_quantization_recipe("^" + re.escape(p.scope) + "$", op_name(p.op), config)
    if io_dtype == "float32" and activations == "int8":
        for edge in (op_name.INPUT, op_name.OUTPUT):
            qt.update_quantization_recipe(".*", edge, algorithm_key="no_quantize")


def quantize_tflite(
    float_tflite: Any,
    weight_bits: Union[int, Mapping[str, int]] = 4,
    runtime: str = "litert",
    representative_data: Optional[Sequence[np.ndarray]] = None,
    *,
    activations: str = "int8",
    io_dtype: Optional[str] = None,
    check: bool = True,
    path: Optional[str] = None,
) -> bytes:
    """Write the packed INT4 / INT2 (or INT8) ``.tflite`` of a float one whose weights lie on
    tfqreg's grid; the integers and scales in the result are exactly ``k`` and ``δ``.

    Args:
        float_tflite: float ``.tflite`` bytes (or a path / an object with ``.flatbuffer``).
            Weights of CONV_2D and DEPTHWISE_CONV_2D on the grid per output channel or per
            tensor, of FULLY_CONNECTED per tensor or per channel.
        weight_bits: 4 (INT4 everywhere), 2 (INT2 FULLY_CONNECTED, INT4 convolutions;
            LiteRT only), 8, or a mapping ``{op: 2|4|8}`` (ops not named get INT8).
        runtime: ``"litert"`` or ``"micro"`` (TFLite Micro): decides what is refused and, for
            FULLY_CONNECTED, whether the scales are per tensor or per channel.
        representative_data: one float32 array ``(N, ...)`` per model input (a single array
            for a single input), used to calibrate the int8 activations; a few hundred
            samples. Not needed with ``activations="float"``.
        activations: ``"int8"`` (full integer) or ``"float"`` (weights only, DEQUANTIZE ops;
            LiteRT only).
        io_dtype: ``"int8"`` (default with int8 activations) or ``"float32"`` model inputs
            and outputs.
        check: run the result in the target runtime (LiteRT or TFLite Micro) on up to 16
            representative samples and require finite outputs.
        path: write the result there, only once every check has passed.

    Returns:
        The quantized ``.tflite`` bytes.

    Raises:
        ValueError: bad arguments, a combination no runtime kernel runs (naming the op and
            the runtime), or weights not on the grid; nothing is written.
        RuntimeError: the tool wrote other integers or scales than the grid's, or the result
            does not run in the target runtime; nothing is written.
    """
    from ai_edge_quantizer import quantizer

    _, io_dtype = _check_args(weight_bits, runtime, activations, io_dtype)
    data = _as_bytes(float_tflite, "float_tflite")
    plans = plan(data, weight_bits, runtime, activations)  # refusals before anything runs
    _check_args(weight_bits, runtime, activations, io_dtype, representative_data, need_data=True)
    qt = quantizer.Quantizer(bytearray(data))
    _recipe(qt, plans, activations, io_dtype)
    samples: List[Dict[str, np.ndarray]] = []
    calibration: Dict[str, Dict[str, np.ndarray]] = {}
    with warnings.catch_warnings():  # the tool's interpreters set a "debugging only" flag
        warnings.filterwarnings("ignore", "Warning: Enabling `experimental_preserve_all_tensors`")
        if representative_data is not None:
            key, samples = _samples(representative_data, data)
        if activations == "int8":
            calibration = _calibrate(data, qt.get_quantization_recipe(), key, samples)
        for p in plans:  # the tool's scale bound/(2^(b-1)-1) is then the grid's δ
            calibration[p.name] = {"min": -p.bound, "max": p.bound.copy()}
        result = qt.quantize(calibration, enable_progress_report=False)
    out = bytes(result.quantized_model)
    _verify(out, plans)
    if check:
        _check_runs(out, runtime, samples)
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(out)
    return out


def _verify(out: bytes, plans: List[WeightPlan]) -> None:
    report = weight_report(out)
    found = {(t.subgraph, t.name): t for t in report.tensors}
    for p in plans:
        t = found.get((p.subgraph, p.name))
        problem = None
        if t is None:
            problem = "the tensor is missing from the result"
        elif t.dtype != f"int{p.bits}":
            problem = f"it was written as {t.dtype}"
        elif not np.array_equal(t.integers, p.integers):
            problem = f"{int(np.sum(t.integers != p.integers))} integers differ from round(w/δ)"
        else:
            live = p.steps > 0  # all-zero channels: any scale holds k = 0
            scales = np.asarray(t.scales, np.float32)
            if len(scales) != len(p.steps) or not np.array_equal(scales[live], p.steps[live]):
                problem = "its scales differ from the grid steps δ"
            elif len(p.steps) > 1 and t.quantized_dimension != p.axis:
                problem = f"its scales run along axis {t.quantized_dimension}, not {p.axis}"
        if problem:
            raise RuntimeError(f"{p.op} {p.name!r}: ai-edge-quantizer did not reproduce the "
                               f"{p.bits}-bit grid: {problem}; not writing an approximation.")


def _check_runs(out: bytes, runtime: str, samples: List[Dict[str, np.ndarray]]) -> None:
    from tfqreg.deploy.runtime import Runner

    try:
        runner = Runner(out, runtime)
        xs = ([np.concatenate([s[n] for s in samples[:_CHECK_SAMPLES]]) for n in samples[0]]
              if samples else [np.zeros([2] + t.shape[1:], np.float32) for t in runner.inputs])
        ys = runner.predict(xs)
    except Exception as exc:  # the runtime's own message names the failing node
        raise RuntimeError(f"the quantized model does not run in {runtime!r}: {exc}") from exc
    if not all(np.isfinite(y).all() for y in (ys if isinstance(ys, list) else [ys])):
        raise RuntimeError(f"the quantized model returns non-finite values in {runtime!r}.")


def unpack_integers(raw: bytes, bits: int, count: int) -> np.ndarray:
    """Signed integers of a packed TFLite buffer: ``8/bits`` two's-complement values per byte,
    the first in the lowest bits (TFLite's INT4 / INT2 layout); ``bits=8`` is plain int8."""
    if bits not in (2, 4, 8):
        raise ValueError(f"`bits` must be 2, 4 or 8, got {bits!r}.")
    u = np.frombuffer(bytes(raw), np.uint8)
    if bits == 8:
        return u[:count].view(np.int8).copy()
    per, mask = 8 // bits, (1 << bits) - 1
    if len(u) * per < count:
        raise ValueError(f"{len(u)} bytes hold {len(u) * per} {bits}-bit values, not {count}.")
    v = np.stack([(u >> (bits * i)) & mask for i in range(per)], axis=-1).reshape(-1)[:count]
    return np.where(v >= 1 << (bits - 1), v.astype(np.int16) - (1 << bits), v).astype(np.int8)


@dataclasses.dataclass
class WeightTensor:
    """One weight tensor of a CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op in a file."""

    op: str
    subgraph: int
    name: str
    dtype: str  # "int4", "int2", "int8", "float32", ...
    shape: List[int]
    nbytes: int
    scales: List[float]
    quantized_dimension: int
    integers: Optional[np.ndarray]  # unpacked grid indices (int8, shape ``shape``); None: float

    @property
    def levels(self) -> Optional[int]:
        """Most distinct integers used in one channel (per tensor when one scale)."""
        if self.integers is None:
            return None
        k = np.moveaxis(self.integers, self.quantized_dimension, 0)
        return max(int(np.unique(row).size)
                   for row in k.reshape(len(k) if len(self.scales) > 1 else 1, -1))

    def dequantized(self) -> Optional[np.ndarray]:
        """``scale · k`` in float32 (the weights the kernels compute with)."""
        if self.integers is None:
            return None
        shape = [1] * len(self.shape)
        if len(self.scales) > 1:
            shape[self.quantized_dimension] = len(self.scales)
        return (np.asarray(self.scales, np.float32).reshape(shape) * self.integers).astype(
            np.float32)


@dataclasses.dataclass
class WeightReport:
    """Sizes and weight grids of a ``.tflite`` file; plain data that prints as a table."""

    size_bytes: int
    constant_bytes: Dict[str, int]  # bytes of all constant buffers, by tensor type
    tensors: List[WeightTensor]

    @property
    def weight_bytes(self) -> Dict[str, int]:
        """Bytes of the weight tensors of the weight ops, by tensor type."""
        out: Dict[str, int] = {}
        for t in self.tensors:
            out[t.dtype] = out.get(t.dtype, 0) + t.nbytes
        return out

    @property
    def total_weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> Dict[str, Any]:
        return {"size_bytes": self.size_bytes, "constant_bytes": dict(self.constant_bytes),
                "weight_bytes": self.weight_bytes,
                "tensors": [{"op": t.op, "name": t.name, "dtype": t.dtype, "shape": t.shape,
                             "nbytes": t.nbytes, "scales": len(t.scales), "levels": t.levels}
                            for t in self.tensors]}

    def to_text(self) -> str:
        lines = [f"file {self.size_bytes:,} B; constants by type: " + ", ".join(
            f"{k} {v:,} B" for k, v in sorted(self.constant_bytes.items()))]
        lines.append(f"{'op':<18} {'dtype':<8} {'shape':<16} {'bytes':>8} {'scales':>6} "
                     f"{'levels':>6}  tensor")
        for t in self.tensors:
            lines.append(f"{t.op:<18} {t.dtype:<8} {str(t.shape):<16} {t.nbytes:>8,} "
                         f"{len(t.scales):>6} {t.levels if t.levels is not None else '-':>6}"
                         f"  {t.name}")
        lines.append(f"weights: {self.total_weight_bytes:,} B (" + ", ".join(
            f"{k} {v:,} B" for k, v in sorted(self.weight_bytes.items())) + ")")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def weight_report(tflite: Any) -> WeightReport:
    """Read a ``.tflite`` through TensorFlow's schema: constant bytes by tensor type and, for
    every CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED weight, its type, size, scales and
    unpacked integer grid.

    Args:
        tflite: ``.tflite`` bytes, a path, or an object with ``.flatbuffer``.

    Returns:
        A :class:`WeightReport`.
    """
    data = _as_bytes(tflite, "tflite")
    model, types = _read(data)
    constant: Dict[str, int] = {}
    seen = set()
    for sg in model.subgraphs:
        for t in sg.tensors:
            raw = _buffer_bytes(model, data, t.buffer)
            if raw is not None and t.buffer not in seen:
                seen.add(t.buffer)
                dtype = types.get(t.type, str(t.type))
                constant[dtype] = constant.get(dtype, 0) + len(raw)
    tensors: List[WeightTensor] = []
    for s, _, op_name, _, t, raw in _weights(model, data):
        dtype = types.get(t.type, str(t.type))
        shape = [int(d) for d in t.shape]
        q = t.quantization
        scales = [float(v) for v in q.scale] if q is not None and q.scale is not None else []
        bits = {"int2": 2, "int4": 4, "int8": 8}.get(dtype)
        ints = unpack_integers(raw, bits, int(np.prod(shape))).reshape(shape) if bits else None
        tensors.append(WeightTensor(op_name, s, t.name.decode("utf-8", "replace"), dtype, shape,
                                    len(raw), scales,
                                    int(q.quantizedDimension) if q is not None else 0, ints))
    return WeightReport(len(data), constant, tensors)
