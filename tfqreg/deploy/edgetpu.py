"""Edge TPU pre-flight: will the Coral compiler map this ``.tflite`` model to the Edge TPU?

:func:`check_edgetpu` reads the flatbuffer through TensorFlow's schema
(:func:`tfqreg.deploy.tflite_file.read_tflite`, the only deploy module this one imports) and
checks every operator, in execution order, against the Edge TPU's documented requirements
(coral.ai, "TensorFlow models on the Edge TPU",
https://coral.ai/docs/edgetpu/models-intro/#supported-operations and "Model requirements"):

* the op is on the supported-operations table (:data:`SUPPORTED_OPS`, with Coral's "known
  limitations" text; a few of those limitations are checked, see :data:`CHECKED_LIMITS`);
* its activation tensors are int8/uint8 (weights int8/uint8, biases/shape operands int32);
  a tensor stored below 8 bits (schema ``TensorType`` INT4, INT2, UINT4, as low-bit exporters
  write them) cannot be compiled at all: the Edge TPU runs 8-bit integers only;
* no dimension is dynamic (``shape_signature`` −1, the batch included): "tensor sizes are
  constant at compile time";
* no activation tensor has more than 3 dimensions larger than 1 ("if a tensor has more than 3
  dimensions, then only the 3 innermost dimensions may have a size greater than 1");
* model-wide: one subgraph only, no sub-8-bit tensor.

The compiler partitions the graph once: everything from the first operator it cannot map
onward runs on the CPU, even supported ops. The report gives that operator (``first_cpu_op``).
When ``edgetpu_compiler`` is on ``PATH`` it is run and its log is included; otherwise the
report says so (the compiler exists only for x86-64 Debian/Ubuntu).

>>> from tfqreg.deploy import check_edgetpu
>>> report = check_edgetpu("model_int8.tflite")               # doctest: +SKIP
>>> print(report.to_text())                                    # doctest: +SKIP
>>> report.ok, report.first_cpu_op                             # doctest: +SKIP
(True, None)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Set

from tfqreg.deploy.tflite_file import (OpInfo, TensorInfo, TfliteGraph, as_flatbuffer,
                                       read_tflite, tensor_type_names)

__all__ = ["SUPPORTED_OPS", "CHECKED_LIMITS", "OpCheck", "EdgeTpuReport", "check_edgetpu"]

# Coral's supported-operations table (Edge TPU compiler 16 / runtime 14+), as TFLite builtin
# operator names -> Coral's "known limitations" column. Source:
# https://coral.ai/docs/edgetpu/models-intro/#supported-operations
SUPPORTED_OPS: Dict[str, str] = {
    "ADD": "",
    "AVERAGE_POOL_2D": "No fused activation function.",
    "CONCATENATION": "No fused activation function. If any input is a compile-time constant "
                     "tensor, there must be only 2 inputs, and this constant tensor must be all "
                     "zeroes (effectively, a zero-padding op).",
    "CONV_2D": "Must use the same dilation in x and y dimensions.",
    "DEPTHWISE_CONV_2D": "Must use the same dilation in x and y dimensions.",
    "EXPAND_DIMS": "",
    "FULLY_CONNECTED": "Only the default format is supported for fully-connected weights. "
                       "Output tensor is one-dimensional.",
    "L2_NORMALIZATION": "",
    "LOGISTIC": "",
    "LSTM": "Unidirectional LSTM only.",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "Unidirectional LSTM only.",
    "MAXIMUM": "",
    "MAX_POOL_2D": "No fused activation function.",
    "MEAN": "No reduction in batch dimension. If a z-reduction, the z-dimension must be "
            "multiple of 4.",
    "MINIMUM": "",
    "MUL": "",
    "PACK": "No packing in batch dimension.",
    "PAD": "No padding in batch dimension.",
    "PRELU": "Alpha must be 1-dimensional (only the innermost dimension can be >1 size).",
    "QUANTIZE": "",
    "REDUCE_MAX": "Cannot operate on the batch dimension.",
    "REDUCE_MIN": "Cannot operate on the batch dimension.",
    "RELU": "",
    "RELU6": "",
    "RELU_N1_TO_1": "",
    "RESHAPE": "Certain reshapes might not be mapped for large tensor sizes.",
    "RESIZE_BILINEAR": "Input/output is a 3-dimensional tensor. Depending on input/output size, "
                       "this operation may not be mapped to the Edge TPU to avoid loss in "
                       "precision.",
    "RESIZE_NEAREST_NEIGHBOR": "Input/output is a 3-dimensional tensor. Depending on "
                               "input/output size, this operation may not be mapped to the Edge "
                               "TPU to avoid loss in precision.",
    "RSQRT": "",
    "SLICE": "",
    "SOFTMAX": "Supports only 1-D input tensor with a max of 16,000 elements.",
    "SPACE_TO_DEPTH": "",
    "SPLIT": "No splitting in batch dimension.",
    "SQUEEZE": "",
    "STRIDED_SLICE": "Supported only when all strides are equal to 1 (that is, effectively a "
                     "Stride op), and with ellipsis-axis-mask == 0, and new-axis-max == 0.",
    "SUB": "",
    "SUM": "Cannot operate on the batch dimension.",
    "SQUARED_DIFFERENCE": "",
    "TANH": "",
    "TRANSPOSE": "",
    "TRANSPOSE_CONV": "",
}

CHECKED_LIMITS = {
    "AVERAGE_POOL_2D": "fused activation",
    "MAX_POOL_2D": "fused activation",
    "CONCATENATION": "fused activation",
    "SOFTMAX": "1-D input with at most 16,000 elements",
    "FULLY_CONNECTED": "one-dimensional output",
    "CONV_2D": "same dilation in x and y",
    "DEPTHWISE_CONV_2D": "same dilation in x and y",
}
"""The limitations :func:`check_edgetpu` verifies (the others are listed as notes)."""

_ACTIVATION_DTYPES = ("int8", "uint8")
_CONSTANT_DTYPES = ("int8", "uint8", "int32", "int64")
_LOW_BIT_TYPES = ("INT4", "INT2", "UINT4")  # schema TensorType names (17, 19, 20)


def _low_bit_dtypes() -> Set[str]:
    """The :class:`TensorInfo` dtype names of the sub-8-bit tensor types, from the schema."""
    names = tensor_type_names()
    return {names[v] for v in names if names[v].upper() in _LOW_BIT_TYPES}


def _low_bit_issue(t: TensorInfo) -> str:
    kind = "constant" if t.constant else "tensor"
    return (f"{kind} '{t.name}' is {t.dtype} ({t.dtype[-1]}-bit): the Edge TPU runs 8-bit "
            "integers only, so the compiler cannot map it (export with 8-bit weights and "
            "activations for the Edge TPU)")


@dataclass
class OpCheck:
    """One operator's verdict: ``issues`` empty means the Edge TPU can run it."""

    index: int
    op: str
    supported: bool
    issues: List[str] = field(default_factory=list)
    limitation: str = ""
    runs_on: str = "edgetpu"


@dataclass
class EdgeTpuReport:
    """Result of :func:`check_edgetpu`: per-op checks, the cut, model-wide issues, compiler."""

    ops: List[OpCheck]
    first_cpu_op: Optional[int]
    model_issues: List[str]
    compiler: Dict[str, Any]
    tflite_bytes: int

    @property
    def ok(self) -> bool:
        """Every op maps to the Edge TPU and there is no model-wide issue."""
        return self.first_cpu_op is None and not self.model_issues

    @property
    def edgetpu_ops(self) -> int:
        """Ops before the cut (mapped to the Edge TPU)."""
        return sum(1 for o in self.ops if o.runs_on == "edgetpu")

    @property
    def cpu_ops(self) -> int:
        """Ops from the cut on (run on the CPU)."""
        return len(self.ops) - self.edgetpu_ops

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain dicts and lists, with ``ok``, ``edgetpu_ops``, ``cpu_ops``."""
        d = dataclasses.asdict(self)
        d.update(ok=self.ok, edgetpu_ops=self.edgetpu_ops, cpu_ops=self.cpu_ops)
        return d

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        """A table of ops (on the list?, runs on, issues), the cut, notes, the verdict."""
        lines = ["== Edge TPU pre-flight ==",
                 f"{'#':>3}  {'op':24s} {'on list':7s} {'runs on':8s} issues"]
        for o in self.ops:
            issues = "; ".join(o.issues) if o.issues else "-"
            lines.append(f"{o.index:>3}  {o.op:24s} {'yes' if o.supported else 'NO':7s} "
                         f"{o.runs_on:8s} {issues}")
        if self.first_cpu_op is None:
            lines.append(f"all {len(self.ops)} ops can be mapped to the Edge TPU")
        else:
            o = self.ops[self.first_cpu_op]
            lines.append(
                f"the compiler would cut the graph at op #{o.index} ({o.op}): {self.edgetpu_ops} "
                f"op(s) on the Edge TPU, {self.cpu_ops} op(s) on the CPU from there on")
        lines.extend(f"model issue: {m}" for m in self.model_issues)
        notes = sorted({(o.op, o.limitation) for o in self.ops if o.limitation and o.supported})
        lines.extend(f"note: {op}: {text}" for op, text in notes)
        c = self.compiler
        if c.get("available"):
            lines.append(f"edgetpu_compiler ({' '.join(c['command'])}) exit code "
                         f"{c['returncode']}:")
            lines.extend("  " + ln for ln in c.get("log", "").splitlines())
        else:
            lines.append(f"edgetpu_compiler: {c.get('message')}")
        lines.append("verdict: " + ("OK, fully mappable" if self.ok else "NOT fully mappable"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()


def _tensor_issues(graph: TfliteGraph, op: OpInfo, low_bit: Set[str]) -> List[str]:
    issues = []
    for i in op.inputs + op.outputs:
        if i < 0:
            continue
        t = graph.tensor(i)
        if t.dtype in low_bit:
            issues.append(_low_bit_issue(t))
            continue
        if t.constant:
            if t.dtype not in _CONSTANT_DTYPES:
                issues.append(f"constant '{t.name}' is {t.dtype} (weights must be int8/uint8)")
            continue
        if t.dtype not in _ACTIVATION_DTYPES:
            issues.append(f"tensor '{t.name}' is {t.dtype}, not int8/uint8")
        if t.dynamic_dims:
            issues.append(f"tensor '{t.name}' has dynamic dimension(s) {t.dynamic_dims} "
                          f"(shape {t.shape_signature}); sizes must be fixed at compile time")
        if t.non_unit_dims > 3:
            issues.append(f"tensor '{t.name}' has {t.non_unit_dims} dimensions > 1 (shape "
                          f"{t.shape_signature}); at most 3 (the innermost) may exceed 1")
    return list(dict.fromkeys(issues))


def _limit_issues(graph: TfliteGraph, op: OpInfo) -> List[str]:
    o = op.options
    issues = []
    if op.name in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION") and \
            o.get("fusedActivationFunction", 0) != 0:
        issues.append("fused activation function is not supported")
    if op.name == "SOFTMAX" and op.inputs:
        t = graph.tensor(op.inputs[0])
        n = 1
        for d in t.shape:
            n *= max(int(d), 1)
        if t.non_unit_dims > 1 or n > 16000:
            issues.append(f"input {t.shape_signature} is not a 1-D tensor of <= 16,000 elements")
    if op.name == "FULLY_CONNECTED" and op.outputs:
        t = graph.tensor(op.outputs[0])
        if t.non_unit_dims > 1:
            issues.append(f"output {t.shape_signature} is not one-dimensional")
    if op.name in ("CONV_2D", "DEPTHWISE_CONV_2D") and \
            o.get("dilationHFactor", 1) != o.get("dilationWFactor", 1):
        issues.append("different dilation in x and y")
    return issues


def _run_compiler(flat: bytes, out_dir: Optional[str], timeout: float) -> Dict[str, Any]:
    exe = shutil.which("edgetpu_compiler")
    if exe is None:
        return {"available": False,
                "message": "not found on PATH, so this is the static pre-flight check only "
                           "(the compiler is available for x86-64 Debian/Ubuntu from "
                           "https://coral.ai/software/)."}
    work = out_dir or tempfile.mkdtemp(prefix="tfqreg_edgetpu_")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, "model_for_edgetpu.tflite")
    with open(src, "wb") as f:
        f.write(flat)
    cmd = [exe, "-s", "-o", work, src]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"available": True, "command": cmd, "returncode": None,
                "log": f"timed out after {timeout} s\n{e.stdout or ''}"}
    compiled = os.path.join(work, "model_for_edgetpu_edgetpu.tflite")
    return {"available": True, "command": cmd, "returncode": proc.returncode,
            "log": (proc.stdout or "") + (proc.stderr or ""),
            "output": compiled if os.path.isfile(compiled) else None}


def check_edgetpu(tflite_model: Any, run_compiler: bool = True, out_dir: Optional[str] = None,
                  timeout: float = 180.0) -> EdgeTpuReport:
    """Check a ``.tflite`` model against the Edge TPU's requirements.

    Args:
        tflite_model: ``.tflite`` bytes, a path, or an object carrying the bytes as
            ``.flatbuffer`` (an ``ExportResult``).
        run_compiler: run ``edgetpu_compiler`` when it is on ``PATH``.
        out_dir: where the compiler writes (default: a temporary folder).
        timeout: compiler timeout in seconds.

    Returns:
        An :class:`EdgeTpuReport` (``.ok``, ``.first_cpu_op``, ``.to_text()``, ``.to_json()``).

    Raises:
        FileNotFoundError: a path that does not exist.
        ValueError: the data is not a TFLite flatbuffer, or a damaged one.
    """
    flat = as_flatbuffer(tflite_model, "tflite_model")
    graph = read_tflite(flat)
    low_bit = _low_bit_dtypes()
    checks, cut = [], None
    for op in graph.ops:
        supported = op.name in SUPPORTED_OPS
        issues = []
        if not supported:
            kind = "custom op" if op.custom else "op"
            issues.append(f"{kind} {op.name} is not on the Edge TPU supported-operations list")
        issues += _limit_issues(graph, op) + _tensor_issues(graph, op, low_bit)
        if issues and cut is None:
            cut = op.index
        checks.append(OpCheck(op.index, op.name, supported, issues,
                              SUPPORTED_OPS.get(op.name, ""),
                              "cpu" if cut is not None else "edgetpu"))
    model_issues = []
    if graph.num_subgraphs > 1:
        model_issues.append(f"{graph.num_subgraphs} subgraphs: the compiler supports one")
    if not graph.ops:
        model_issues.append("the model has no operators")
    small = Counter(t.dtype for t in graph.tensors if t.dtype in low_bit)
    if small:
        model_issues.append(
            f"{sum(small.values())} tensor(s) stored below 8 bits "
            f"({', '.join(f'{k} x{v}' for k, v in sorted(small.items()))}): the Edge TPU "
            "compiler accepts int8/uint8 models only")
    compiler = (_run_compiler(flat, out_dir, timeout) if run_compiler
                else {"available": False, "message": "not run (run_compiler=False)"})
    return EdgeTpuReport(checks, cut, model_issues, compiler, len(flat))
