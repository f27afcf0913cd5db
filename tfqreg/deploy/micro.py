"""Microcontrollers: an int8 model, checked in TFLite Micro, with its measured arena, as C++.

:func:`to_micro` does four things:

1. converts the Keras model to a full-integer int8 ``.tflite`` with a static batch of 1
   (:func:`tfqreg.deploy.convert.to_tflite`, parity vs Keras in LiteRT);
2. runs it in TFLite Micro's Python interpreter (``tflite_micro``), checks top-1 agreement
   with Keras (``min_agreement``) and compares its raw int8 outputs with LiteRT's (builtin
   kernels, and with the XNNPACK delegate). They are usually identical; measured exceptions:
   TFLite Micro's int8 FULLY_CONNECTED rounds differently from LiteRT's by 1 unit on ~1 % of
   inputs for some models (a following SOFTMAX can widen that to a few units), and XNNPACK
   differs by 1 unit more often. The numbers are in ``micro_vs_litert``;
3. measures the tensor arena the model really needs with TFLite Micro's
   ``RecordingMicroAllocator`` (the Python interpreter records allocations;
   :func:`measure_arena` reads ``Arena allocation total``), instead of the 10x-model-size guess;
4. writes ``<name>.tflite``, ``<name>_model_data.cc`` / ``.h``: the model as an ``alignas(16)``
   byte array ``g_<name>_model``, its length ``g_<name>_model_len``, ``kTensorArenaSize`` and
   the ops for ``tflite::MicroMutableOpResolver`` (a comment, and ``Register<Name>Ops()``
   compiled in when TFLite Micro's headers are on the include path).

The arena margin: ``kTensorArenaSize = measured + fixed + ceil(fraction * measured)``, rounded
up to 16 bytes; default ``arena_margin=(1024, 0.10)`` (+1 KiB + 10 %). The measurement is made
on the 64-bit host, where TFLite Micro's bookkeeping structs are larger than on 32-bit MCUs,
so it errs on the safe side; the margin covers kernels with target-specific scratch buffers
(e.g. CMSIS-NN) that the reference kernels do not request.

>>> from tfqreg.deploy import to_micro
>>> result = to_micro(model, x_calibration, "out/", name="fmnist")   # doctest: +SKIP
>>> result.arena_measured, result.arena_size                               # doctest: +SKIP
(4240, 5728)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfqreg import _checks
from tfqreg._keras import check_keras2, keras
from tfqreg.deploy.convert import (ConversionError, ParityError, check_arguments,
                                   check_lowbit_arguments, keras_names, simulated_reference,
                                   to_tflite)
from tfqreg.deploy.report import ExportReport, check_overwrite
from tfqreg.deploy.runtime import Runner
from tfqreg.deploy.samples import (CALIBRATION_SAMPLES, CHECK_SAMPLES, input_specs,
                                  measure_parity, sample_inputs, to_samples)
from tfqreg.deploy.tflite_file import TfliteGraph, as_flatbuffer, read_tflite

__all__ = ["OP_RESOLVER_METHODS", "MAX_ARENA_MARGIN", "MAX_ARENA_FRACTION", "MicroResult",
           "measure_arena", "micro_runs_with",
           "resolver_methods", "c_source", "to_micro"]

# TFLite builtin operator -> tflite::MicroMutableOpResolver method, transcribed from
# tensorflow/lite/micro/micro_mutable_op_resolver.h (tflite-micro).
OP_RESOLVER_METHODS: Dict[str, str] = {
    "ABS": "AddAbs", "ADD": "AddAdd", "ADD_N": "AddAddN", "ARG_MAX": "AddArgMax",
    "ARG_MIN": "AddArgMin", "ASSIGN_VARIABLE": "AddAssignVariable",
    "AVERAGE_POOL_2D": "AddAveragePool2D", "BATCH_TO_SPACE_ND": "AddBatchToSpaceNd",
    "BROADCAST_ARGS": "AddBroadcastArgs", "BROADCAST_TO": "AddBroadcastTo",
    "CALL_ONCE": "AddCallOnce", "CAST": "AddCast", "CEIL": "AddCeil",
    "CONCATENATION": "AddConcatenation", "CONV_2D": "AddConv2D", "COS": "AddCos",
    "CUMSUM": "AddCumSum", "DEPTH_TO_SPACE": "AddDepthToSpace",
    "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize", "DIV": "AddDiv",
    "ELU": "AddElu", "EQUAL": "AddEqual", "EXP": "AddExp", "EXPAND_DIMS": "AddExpandDims",
    "FILL": "AddFill", "FLOOR": "AddFloor", "FLOOR_DIV": "AddFloorDiv",
    "FLOOR_MOD": "AddFloorMod", "FULLY_CONNECTED": "AddFullyConnected", "GATHER": "AddGather",
    "GATHER_ND": "AddGatherNd", "GREATER": "AddGreater", "GREATER_EQUAL": "AddGreaterEqual",
    "HARD_SWISH": "AddHardSwish", "IF": "AddIf", "L2_NORMALIZATION": "AddL2Normalization",
    "L2_POOL_2D": "AddL2Pool2D", "LEAKY_RELU": "AddLeakyRelu", "LESS": "AddLess",
    "LESS_EQUAL": "AddLessEqual", "LOG": "AddLog", "LOGICAL_AND": "AddLogicalAnd",
    "LOGICAL_NOT": "AddLogicalNot", "LOGICAL_OR": "AddLogicalOr", "LOGISTIC": "AddLogistic",
    "LOG_SOFTMAX": "AddLogSoftmax", "MAXIMUM": "AddMaximum", "MAX_POOL_2D": "AddMaxPool2D",
    "MIRROR_PAD": "AddMirrorPad", "MEAN": "AddMean", "MINIMUM": "AddMinimum", "MUL": "AddMul",
    "NEG": "AddNeg", "NOT_EQUAL": "AddNotEqual", "PACK": "AddPack", "PAD": "AddPad",
    "PADV2": "AddPadV2", "PRELU": "AddPrelu", "QUANTIZE": "AddQuantize",
    "READ_VARIABLE": "AddReadVariable", "REDUCE_MAX": "AddReduceMax", "RELU": "AddRelu",
    "RELU6": "AddRelu6", "RESHAPE": "AddReshape", "RESIZE_BILINEAR": "AddResizeBilinear",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "ROUND": "AddRound",
    "RSQRT": "AddRsqrt", "SELECT_V2": "AddSelectV2", "SHAPE": "AddShape", "SIN": "AddSin",
    "SLICE": "AddSlice", "SOFTMAX": "AddSoftmax", "SPACE_TO_BATCH_ND": "AddSpaceToBatchNd",
    "SPACE_TO_DEPTH": "AddSpaceToDepth", "SPLIT": "AddSplit", "SPLIT_V": "AddSplitV",
    "SQUEEZE": "AddSqueeze", "SQRT": "AddSqrt", "SQUARE": "AddSquare",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "SVDF": "AddSvdf", "TANH": "AddTanh",
    "TRANSPOSE_CONV": "AddTransposeConv", "TRANSPOSE": "AddTranspose", "UNPACK": "AddUnpack",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "AddUnidirectionalSequenceLSTM",
    "VAR_HANDLE": "AddVarHandle", "WHILE": "AddWhile", "ZEROS_LIKE": "AddZerosLike",
}

_ARENA_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")


MAX_ARENA_MARGIN = 1 << 26
"""Largest fixed arena margin, 64 MiB (microcontrollers have kilobytes to a few MiB of RAM)."""
MAX_ARENA_FRACTION = 10.0
"""Largest fractional arena margin (+1000 % of the measured arena)."""


def _check_args(name: str, arena_margin: Any, io_dtype: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"`name` must be a C identifier (letters, digits, _), got {name!r}.")
    if not isinstance(arena_margin, (tuple, list)) or len(arena_margin) != 2:
        raise TypeError("`arena_margin` must be a pair (fixed_bytes, fraction), got "
                        f"{arena_margin!r}.")
    fixed, fraction = arena_margin
    if isinstance(fixed, (float, np.floating)) and float(fixed).is_integer():
        fixed = int(fixed)  # (1024.0, 0.1) is a whole number of bytes
    _checks.check_int("arena_margin[0] (fixed bytes)", fixed, low=0, high=MAX_ARENA_MARGIN)
    _checks.check_real("arena_margin[1] (fraction)", fraction, low=0.0, high=MAX_ARENA_FRACTION)
    if io_dtype not in ("int8", "uint8"):
        raise ValueError(f"`io_dtype` must be 'int8' or 'uint8' for microcontrollers, got "
                         f"{io_dtype!r}.")


class _CaptureFd2:
    """Capture what C++ code writes to file descriptor 2 (TFLite Micro logs there)."""

    def __enter__(self):
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._file = tempfile.TemporaryFile()
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self._saved, 2)
        os.close(self._saved)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False


def _micro_interpreter(flat: bytes, arena_size: Optional[int]) -> Any:
    from tflite_micro.python.tflite_micro import runtime

    return runtime.Interpreter.from_bytes(flat, arena_size=arena_size)


def _invoke_on_zeros(flat: bytes, graph: TfliteGraph, arena_size: int) -> Any:
    """A TFLite Micro interpreter with ``arena_size`` bytes, run once on all-zero inputs."""
    it = _micro_interpreter(flat, arena_size)
    for k, i in enumerate(graph.inputs):
        t = graph.tensor(i)
        it.set_input(np.zeros(t.shape, dtype=np.dtype(t.dtype)), k)
    it.invoke()
    return it


def measure_arena(tflite_model: Any, arena_size: Optional[int] = None) -> int:
    """Bytes of tensor arena TFLite Micro uses for ``tflite_model`` (after one inference).

    Runs one inference (zeros in) in TFLite Micro's recording interpreter and reads
    ``RecordingMicroAllocator``'s "Arena allocation total". That number is the smallest arena
    the interpreter accepts (tested by bisection in ``tests/test_deploy_micro.py``).

    Args:
        tflite_model: ``.tflite`` bytes, a path, or an object carrying ``.flatbuffer``.
        arena_size: the arena to measure in (default: 10x the model size, at least 64 KiB).

    Returns:
        The arena bytes in use after the inference.

    Raises:
        ValueError: not a (valid) TFLite flatbuffer.
        RuntimeError: TFLite Micro cannot run the model (its log is in the message).
    """
    flat = as_flatbuffer(tflite_model, "tflite_model")
    graph = read_tflite(flat)
    arena_size = arena_size or max(len(flat) * 10, 64 * 1024)
    with _CaptureFd2() as log:
        try:
            it = _invoke_on_zeros(flat, graph, arena_size)
            it.print_allocations()
            err = None
        except Exception as e:  # TFLite Micro raises RuntimeError with little detail
            err = e
    if err is not None:
        raise RuntimeError(f"TFLite Micro could not run the model: {err}. Its log: "
                           f"{log.text.strip()[-2000:]}") from err
    m = _ARENA_TOTAL.search(log.text)
    if not m:
        raise RuntimeError(f"no arena total in TFLite Micro's allocation log: {log.text[-2000:]}")
    return int(m.group(1))


def micro_runs_with(tflite_model: Any, arena_size: int) -> bool:
    """Whether TFLite Micro can allocate and run ``tflite_model`` in ``arena_size`` bytes
    (one inference on zeros)."""
    flat = as_flatbuffer(tflite_model, "tflite_model")
    graph = read_tflite(flat)
    with _CaptureFd2():
        try:
            _invoke_on_zeros(flat, graph, arena_size)
            return True
        except Exception:
            return False


def resolver_methods(tflite_model: Any) -> List[str]:
    """``MicroMutableOpResolver`` methods the model needs, in first-use order.

    Args:
        tflite_model: ``.tflite`` bytes, a path, or an object carrying ``.flatbuffer``.

    Returns:
        Method names such as ``"AddConv2D"``.

    Raises:
        ConversionError: an op TFLite Micro has no kernel for (custom ops included), named.
    """
    graph = read_tflite(tflite_model)
    names = list(dict.fromkeys(graph.op_names))
    missing = [n for n in names if n not in OP_RESOLVER_METHODS]
    if missing:
        raise ConversionError(
            f"TFLite Micro has no MicroMutableOpResolver registration for op(s) {missing}; "
            "replace them in the model (custom ops such as Larq's Lce* need their own kernels)."
        )
    return [OP_RESOLVER_METHODS[n] for n in names]


class _MicroRunner(Runner):
    """A TFLite Micro runner that keeps TFLM's allocation log off the terminal."""

    def __init__(self, flat: bytes):
        with _CaptureFd2():
            super().__init__(flat, "micro")

    def predict(self, x: Any, raw: bool = False, chunk: int = 256) -> Any:
        with _CaptureFd2():
            return super().predict(x, raw=raw, chunk=chunk)


def _as_list(y: Any) -> List[np.ndarray]:
    return y if isinstance(y, list) else [y]


def _compare(a_list: List[np.ndarray], b_list: List[np.ndarray]) -> Tuple[float, int]:
    """Fraction of samples with identical integer outputs, and the max |difference|."""
    same = np.all([np.all(a.reshape(len(a), -1) == b.reshape(len(b), -1), axis=1)
                   for a, b in zip(a_list, b_list)], axis=0)
    diff = max(int(np.max(np.abs(a.astype(np.int32) - b.astype(np.int32))))
               for a, b in zip(a_list, b_list))
    return float(np.mean(same)), diff


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("_") if p)


def c_source(flatbuffer: bytes, name: str, arena_size: int, arena_measured: int,
             margin_text: str, methods: Sequence[str], header_name: str) -> Tuple[str, str]:
    """The ``.cc`` and ``.h`` text for a model (see the module docstring).

    Args:
        flatbuffer: the ``.tflite`` bytes, written as ``g_<name>_model``.
        name: C identifier of the model.
        arena_size: ``kTensorArenaSize``.
        arena_measured: the measured arena, for the comment and ``k<Name>ArenaMeasured``.
        margin_text: how the margin was added, for the comment.
        methods: ``MicroMutableOpResolver`` methods (:func:`resolver_methods`).
        header_name: the header's file name, included by the ``.cc``.

    Returns:
        ``(source, header)``.
    """
    ops = ", ".join(m[3:] for m in methods)
    guard = f"TFQREG_{name.upper()}_MODEL_DATA_H_"
    camel = _camel(name)
    reg = "\n".join(f"  if (resolver.{m}() != kTfLiteOk) return kTfLiteError;" for m in methods)
    header = f"""// Generated by tfqreg.micro.to_micro: the {name} model for TensorFlow Lite Micro.
#ifndef {guard}
#define {guard}

#include <cstddef>

// The .tflite flatbuffer ({len(flatbuffer)} bytes), 16-byte aligned.
extern const unsigned char g_{name}_model[];
extern const unsigned int g_{name}_model_len;

// Tensor arena: {arena_measured} bytes measured with TFLite Micro's RecordingMicroAllocator
// (64-bit host, reference kernels) + margin ({margin_text}).
constexpr size_t kTensorArenaSize = {arena_size};
constexpr size_t k{camel}ArenaMeasured = {arena_measured};

// Ops for tflite::MicroMutableOpResolver<{len(methods)}>: {ops}
constexpr unsigned int k{camel}OpCount = {len(methods)};

#if defined(__has_include)
#if __has_include("tensorflow/lite/micro/micro_mutable_op_resolver.h")
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
using {camel}OpResolver = tflite::MicroMutableOpResolver<{len(methods)}>;
inline TfLiteStatus Register{camel}Ops({camel}OpResolver& resolver) {{
{reg}
  return kTfLiteOk;
}}
#endif
#endif

#endif  // {guard}
"""
    rows = []
    for start in range(0, len(flatbuffer), 12):
        rows.append("  " + ", ".join(f"0x{b:02x}" for b in flatbuffer[start:start + 12]) + ",")
    source = f"""// Generated by tfqreg.micro.to_micro: the {name} model for TensorFlow Lite Micro.
#include "{header_name}"

alignas(16) const unsigned char g_{name}_model[] = {{
{chr(10).join(rows)}
}};
const unsigned int g_{name}_model_len = {len(flatbuffer)};
"""
    return source, header


@dataclass
class MicroResult:
    """What :func:`to_micro` produced and measured.

    Attributes:
        name: the C identifier.
        flatbuffer: the int8 ``.tflite`` bytes.
        tflite_path, cc_path, h_path: the files written.
        arena_measured: arena bytes TFLite Micro used (:func:`measure_arena`).
        arena_size: ``kTensorArenaSize`` (measured + margin, 16-byte rounded).
        arena_margin: ``(fixed_bytes, fraction)``.
        ops: operator names in execution order.
        resolver_methods: ``MicroMutableOpResolver`` methods, in first-use order.
        micro_vs_litert: raw-output comparison of TFLite Micro with LiteRT (builtin kernels
            and XNNPACK).
        report: the export report (target ``"micro"``).
    """

    name: str
    flatbuffer: bytes = field(repr=False)
    tflite_path: str
    cc_path: str
    h_path: str
    arena_measured: int
    arena_size: int
    arena_margin: Tuple[int, float]
    ops: List[str]
    resolver_methods: List[str]
    micro_vs_litert: Dict[str, Any]
    report: ExportReport

    def to_dict(self) -> Dict[str, Any]:
        """Everything but the flatbuffer, as plain dicts and lists."""
        d = dataclasses.asdict(self)
        d.pop("flatbuffer")
        return d

    def to_json(self, indent: int = 2) -> str:
        """:meth:`to_dict` as JSON."""
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def to_text(self) -> str:
        """The export report, the TFLite Micro comparison, the arena, the ops, the files."""
        m = self.micro_vs_litert
        lines = [self.report.to_text(),
                 f"TFLite Micro vs LiteRT builtin kernels ({m['samples']} samples): identical "
                 f"int8 outputs {100 * m['identical_fraction']:.2f}%, max |diff| "
                 f"{m['max_abs_diff']} (quantized units); vs LiteRT+XNNPACK "
                 f"{100 * m['xnnpack_identical_fraction']:.2f}%, max |diff| "
                 f"{m['xnnpack_max_abs_diff']}",
                 f"arena  measured {self.arena_measured:,} B -> kTensorArenaSize "
                 f"{self.arena_size:,} B (+{self.arena_margin[0]} B + "
                 f"{100 * self.arena_margin[1]:g}%, 16-byte rounded)",
                 f"ops    MicroMutableOpResolver<{len(self.resolver_methods)}>: "
                 + ", ".join(f"{m}()" for m in self.resolver_methods),
                 f"wrote  {self.tflite_path}", f"       {self.cc_path}", f"       {self.h_path}"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def to_micro(
    model: Any,
    representative_data: Any,
    out_dir: str,
    name: str = "model",
    arena_margin: Tuple[int, float] = (1024, 0.10),
    io_dtype: str = "int8",
    check: bool = True,
    sample: Any = None,
    min_agreement: float = 0.99,
    weight_bits: Optional[int] = None,
    overwrite: bool = False,
) -> MicroResult:
    """Export ``model`` for TensorFlow Lite Micro (see the module docstring).

    Args:
        model: a built ``tf_keras`` model, or a Keras 3 Sequential / Functional model
            (exported through its verified tf_keras mirror, as in
            :func:`tfqreg.deploy.convert.to_tflite`; int8 checks compare with the Keras 3
            model's outputs).
        representative_data: calibration inputs (as :func:`tfqreg.deploy.convert.to_tflite`).
        out_dir: folder for ``<name>.tflite``, ``<name>_model_data.cc/.h`` and
            ``<name>_micro.json``.
        name: C identifier used in file and symbol names.
        arena_margin: ``(fixed_bytes, fraction)`` added to the measured arena: whole bytes in
            ``[0, 64 MiB]`` (:data:`MAX_ARENA_MARGIN`) and a fraction in ``[0, 10]``.
        io_dtype: ``"int8"`` or ``"uint8"`` inputs/outputs.
        check: top-1 agreement with Keras in LiteRT and in TFLite Micro; below
            ``min_agreement`` raises :class:`tfqreg.deploy.convert.ParityError`.
        sample: inputs for the checks (default: the representative data).
        min_agreement: minimum top-1 agreement of the int8 model with Keras.
        weight_bits: ``None`` / ``8`` for int8 weights; ``4`` for packed INT4 weights on
            tfqreg's grid (convolutions per channel, ``Dense`` per tensor, int8 activations;
            :func:`tfqreg.deploy.convert.to_tflite`): the checks then compare with the
            simulated model ``tfqreg.ptq.quantize(model, 4, activation_bits=8,
            per_channel="conv")``. TFLite Micro has no INT2 kernels: ``2`` is refused.
        overwrite: replace existing ``<name>.*`` files in ``out_dir``; otherwise they are
            refused before the conversion starts.

    Returns:
        A :class:`MicroResult` (also written as ``<name>_micro.json``).

    Raises:
        ConversionError: an op TFLite Micro cannot run, or any int8 conversion error.
        ParityError: a check failed.
        FileExistsError: an output file exists and ``overwrite`` is false.
        ValueError / TypeError: an argument out of range or of the wrong type (named).
    """
    from tfqreg import keras3_bridge

    keras3_model = None
    if keras3_bridge.is_keras3_model(model):  # to_tflite verifies the mirror on the samples
        keras3_model, model = model, keras3_bridge.to_keras2(model, verify=False)
    check_keras2(model, "model", keras.Model)
    _check_args(name, arena_margin, io_dtype)
    if representative_data is None:
        raise ValueError("`representative_data` is required: TFLite Micro models are int8 (a "
                         "few hundred typical inputs calibrate the activation ranges).")
    check_arguments("int8", io_dtype, 1, representative_data, min_agreement, 1e-5, check,
                    sample=sample)
    check_lowbit_arguments(weight_bits, "micro", True)
    if weight_bits == 2:
        raise ValueError("`weight_bits`=2 cannot run on TFLite Micro (runtime 'micro'): it "
                         "has no INT2 kernels (use weight_bits=4, or to_tflite(..., "
                         "weight_bits=2) for LiteRT).")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"`out_dir` must be a folder name, got {type(out_dir).__name__} "
                        f"{out_dir!r}.")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"`out_dir` {out_dir!r} is a file, not a folder.")
    check_overwrite("out_dir", [os.path.join(out_dir, f"{name}{suffix}") for suffix in (
        ".tflite", "_model_data.cc", "_model_data.h", "_micro.json")], overwrite)
    dynamic = [s.name for s in input_specs(model) if None in s.shape.as_list()[1:]]
    if dynamic:
        raise ValueError(f"`model` input(s) {dynamic} have axes of unknown size: TFLite Micro "
                         "needs static shapes; build the model on keras.Input(shape=(H, W, C)).")
    low_bit = weight_bits not in (None, 8)
    label = "the simulated model" if low_bit else (  # what the checks compare with
        "Keras" if keras3_model is None else "Keras 3")
    # A low-bit to_tflite(runtime="micro") checks in TFLite Micro; the LiteRT check is made here
    # (below), so that both runtimes are checked once, as for int8.
    res = to_tflite(model if keras3_model is None else keras3_model, mode="int8",
                    representative_data=representative_data,
                    io_dtype=io_dtype, batch_size=1, check=check and not low_bit, sample=sample,
                    min_agreement=min_agreement, weight_bits=weight_bits, runtime="micro")
    flat = res.flatbuffer
    reference = model if keras3_model is None else keras3_model  # what the user built
    if low_bit:
        specs = input_specs(model)
        calibration = to_samples(representative_data, specs, "representative_data",
                                 CALIBRATION_SAMPLES)
        reference = simulated_reference(model, weight_bits, "micro", True, calibration[0])
        if check:  # vs the simulated model in LiteRT, on the inputs to_tflite would check
            res.report.parity = measure_parity(
                reference, Runner(flat, "litert"), sample_inputs(specs, sample, calibration),
                "int8", 0.0, min_agreement, reference=label)
            if not res.report.parity.passed:
                raise ParityError(f"micro (int8, {weight_bits}-bit weights) model does not "
                                  f"match {label} in LiteRT: "
                                  f"{res.report.parity.to_text()}", res.report)
    methods = resolver_methods(flat)
    specs = input_specs(model)
    if sample is not None:
        xs = to_samples(sample, specs, "sample", CHECK_SAMPLES)
    else:
        xs = to_samples(representative_data, specs, "representative_data", CHECK_SAMPLES)
    names = keras_names(model, flat)[0]  # xs are in Keras' input order; the file's may differ
    with _CaptureFd2():
        mic = _as_list(Runner(flat, "micro", input_names=names).predict(xs, raw=True))
    lite = _as_list(Runner(flat, "litert", kernels="builtin", input_names=names)
                    .predict(xs, raw=True))
    xnn = _as_list(Runner(flat, "litert", kernels="auto", input_names=names)
                   .predict(xs, raw=True))
    same, diff = _compare(lite, mic)
    same_xnn, diff_xnn = _compare(xnn, mic)
    comparison = {"samples": int(len(xs[0])), "litert_kernels": "builtin (no delegate)",
                  "identical_fraction": same, "max_abs_diff": diff,
                  "xnnpack_identical_fraction": same_xnn, "xnnpack_max_abs_diff": diff_xnn}
    # TFLite Micro vs Keras, the same criterion as the LiteRT check
    micro_parity = measure_parity(reference, _MicroRunner(flat), xs, "int8", 0.0, min_agreement,
                                  reference=label)
    res.report.extra["micro_parity"] = micro_parity.to_text()
    if check and not micro_parity.passed:
        raise ParityError(f"TFLite Micro output does not match {label}: "
                          f"{micro_parity.to_text()}", res.report)
    measured = measure_arena(flat)
    fixed, fraction = int(arena_margin[0]), float(arena_margin[1])
    arena = measured + fixed + math.ceil(fraction * measured)
    arena = (arena + 15) // 16 * 16
    margin_text = f"+{fixed} B + {100 * fraction:g}% of measured, rounded up to 16 B"
    os.makedirs(out_dir, exist_ok=True)
    tflite_path = os.path.join(out_dir, f"{name}.tflite")
    h_name = f"{name}_model_data.h"
    cc_path = os.path.join(out_dir, f"{name}_model_data.cc")
    h_path = os.path.join(out_dir, h_name)
    source, header = c_source(flat, name, arena, measured, margin_text, methods, h_name)
    with open(tflite_path, "wb") as f:
        f.write(flat)
    with open(cc_path, "w") as f:
        f.write(source)
    with open(h_path, "w") as f:
        f.write(header)
    res.report.target = "micro"
    res.report.extra.update(arena_measured=measured, tensor_arena_size=arena)
    result = MicroResult(name, flat, tflite_path, cc_path, h_path, measured, arena,
                         (fixed, fraction), read_tflite(flat).op_names, methods, comparison,
                         res.report)
    with open(os.path.join(out_dir, f"{name}_micro.json"), "w") as f:
        f.write(result.to_json())
    return result
