"""What an export produced and how well it matches Keras: data first, text and JSON on demand.

:class:`ParityReport` (converted model vs Keras on a sample), :class:`ExportReport` (ops,
tensors, sizes, parity, notes) and :class:`ExportResult` (the flatbuffer, where it was written,
its report). Imports :mod:`~tfqreg.deploy.tflite_file` (a report describes a flatbuffer) and
:mod:`~tfqreg.deploy.runtime` (for :meth:`ExportResult.predict`).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tfqreg.deploy.runtime import Runner
from tfqreg.deploy.tflite_file import read_tflite

__all__ = ["ParityReport", "ExportReport", "ExportResult", "check_overwrite"]


@dataclass
class ParityReport:
    """How a converted model's outputs compare with Keras on ``samples`` inputs.

    Attributes:
        reference: what the outputs are compared with (``"Keras"``).
        backend: the interpreter that ran the converted model.
        samples: how many inputs.
        max_abs_diff: max |converted − reference| over all outputs.
        mean_abs_diff: mean |converted − reference|.
        top1_agreement: fraction of samples with the same argmax (``None``: no class axis).
        criterion: the pass criterion, as text.
        passed: whether the criterion holds.
        top1_agreement_ties: as ``top1_agreement``, counting a tie with the reference's class
            as agreement.
    """

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
        """One line: differences, agreement, PASS/FAIL and the criterion."""
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


def _json_default(o: Any) -> Any:
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
class ExportReport:
    """What was converted and how well it matches: data first, prints as text, saves as JSON.

    Attributes:
        target: ``"tflite"``, ``"lce"`` or ``"micro"``.
        mode: ``"float"``, ``"dynamic"``, ``"int8"`` or ``"lce"``.
        io_dtype: the model's input/output type.
        batch_size: static batch size (``None``: dynamic).
        inputs: per model input, :meth:`TensorInfo.summary` (name, dtype, shapes, scale, zp).
        outputs: the same for the outputs.
        ops: operator names in execution order.
        op_counts: how often each operator occurs.
        tflite_bytes: size of the flatbuffer.
        gzip_bytes: its size after ``gzip -9``.
        keras_params: parameters of the Keras model.
        keras_float32_bytes: ``4 * keras_params``.
        parity: the parity check (``None``: not run).
        notes: remarks (ops kept in float, layers not binarized, ...).
        extra: target-specific numbers (LCE's binary layers, TFLite Micro's arena, ...).
    """

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

    @classmethod
    def from_flatbuffer(cls, flatbuffer: bytes, keras_params: int, target: str, mode: str,
                        io_dtype: str, batch_size: Optional[int],
                        notes: Optional[List[str]] = None,
                        extra: Optional[Dict[str, Any]] = None) -> "ExportReport":
        """The report of a converted model, before any parity check.

        Args:
            flatbuffer: the ``.tflite`` bytes (read through the schema for ops and tensors).
            keras_params: the Keras model's parameter count.
            target, mode, io_dtype, batch_size, notes, extra: as the attributes.
        """
        graph = read_tflite(flatbuffer)
        return cls(
            target=target, mode=mode, io_dtype=io_dtype, batch_size=batch_size,
            inputs=[graph.tensor(i).summary() for i in graph.inputs],
            outputs=[graph.tensor(i).summary() for i in graph.outputs],
            ops=graph.op_names, op_counts=graph.op_counts, tflite_bytes=len(flatbuffer),
            gzip_bytes=len(gzip.compress(flatbuffer, 9, mtime=0)),
            keras_params=int(keras_params), keras_float32_bytes=int(keras_params) * 4,
            notes=list(notes or []), extra=dict(extra or {}),
        )

    def to_dict(self) -> Dict[str, Any]:
        """The report as plain dicts and lists."""
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        """The report as JSON (NumPy numbers converted)."""
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    def to_text(self) -> str:
        """The report as lines of text: tensors, ops, sizes, parity, extras, notes."""
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


def check_overwrite(name: str, paths: Sequence[str], overwrite: bool) -> None:
    """Refuse to replace existing files unless ``overwrite`` (checked before any work).

    Args:
        name: the argument the paths come from, for the message.
        paths: the files that would be written.
        overwrite: replace them.

    Raises:
        FileExistsError: a file exists and ``overwrite`` is false (one line, naming ``name``).
        IsADirectoryError: a path is an existing folder.
        TypeError: ``overwrite`` is not a bool.
    """
    if not isinstance(overwrite, (bool, np.bool_)):
        raise TypeError(f"`overwrite` must be True or False, got {overwrite!r}.")
    for p in paths:
        if os.path.isdir(p):
            raise IsADirectoryError(f"`{name}` {p!r} is a folder; give a file name.")
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"`{name}`: {', '.join(repr(p) for p in existing)} already "
                              "exist(s); pass overwrite=True (--overwrite) to replace.")


@dataclass
class ExportResult:
    """A converted model: ``flatbuffer`` bytes, ``path`` if written, and its ``report``.

    ``input_names`` / ``output_names`` are the Keras model's inputs and outputs in Keras' order
    (``None``: the file's order), so :meth:`predict` takes a list of inputs in the order the
    Keras model does even when the converter reordered them.
    """

    flatbuffer: bytes
    report: ExportReport
    path: Optional[str] = None
    input_names: Optional[List[str]] = None
    output_names: Optional[List[str]] = None

    def save(self, path: str) -> str:
        """Write the ``.tflite`` file and ``<path without .tflite>.json`` (the report),
        replacing them (the converters' ``overwrite`` check is :func:`check_overwrite`).

        Returns:
            ``path`` (also stored in ``self.path``).
        """
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(self.flatbuffer)
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            f.write(self.report.to_json())
        self.path = path
        return path

    def predict(self, x: Any, backend: Optional[str] = None) -> Any:
        """Run the flatbuffer on ``x`` (float in, float out) with :class:`Runner`.

        Args:
            x: an array, or for several inputs a list of arrays in the Keras model's input
                order or a dict ``{input name: array}``; batch first.
            backend: default ``"lce"`` for LCE models, else ``"litert"``.
        """
        backend = backend or ("lce" if self.report.target == "lce" else "litert")
        return Runner(self.flatbuffer, backend, input_names=self.input_names,
                      output_names=self.output_names).predict(x)

    def to_text(self) -> str:
        """The report as text."""
        return self.report.to_text()
