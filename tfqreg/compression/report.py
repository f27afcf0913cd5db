"""The compression report: where every byte goes, per layer and in total.

Accounting (methods.md §3, Choi et al.)::

    ratio = 32-bit float size of ALL parameters
            / (coded weights + code tables + sparse-index overhead + float-kept params + steps)

* **float32 bytes**: 4 bytes × every parameter of the model (kernels, biases, BatchNorm
  γ/β/moving statistics, everything in ``model.weights``).
* **coded bytes**: the packed Huffman bit streams of the quantized kernel indices (the non-zero
  values in sparse mode, all indices in dense mode), each padded to a whole byte.
* **table bytes**: the canonical Huffman code tables ((symbol, length) pairs), for the values
  and for the position stream.
* **index bytes**: the packed Huffman bit stream of the positions of the non-zeros (gaps
  between them) in sparse mode; 0 in dense mode.
* **float bytes**: parameters kept in float32 (biases, BatchNorm, any layer not coded).
* **step bytes**: the float32 step(s) δ of each coded kernel (one per tensor or per channel).
* Not counted: the architecture (layer types and shapes, as ``model.to_json()``) and per-tensor
  counts / offsets, like the model graph is not counted in the float size either. The *file*
  ratio uses the whole ``.tfqz`` file (header included) instead.
* **entropy**: ``N·H(indices)/8``, the zeroth-order Shannon entropy of each kernel's indices,
  and the entropy of the streams actually coded (values + gaps); ``coder overhead`` =
  coded bits / stream entropy − 1 shows how close the Huffman coder gets.

>>> from tfqreg.compression.report import LayerReport, CompressionReport
>>> r = CompressionReport([LayerReport("fc", (10, 4), params=44, float32_bytes=176, bits=4,
...                                     pruned_fraction=0.5, mode="sparse", kernel_params=40,
...                                     coded_bytes=10,
...                                     table_bytes=8, index_bytes=4, float_bytes=16,
...                                     step_bytes=4)])
>>> r.total_bytes, round(r.ratio, 3)
(42, 4.19)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

__all__ = ["ACCOUNTING", "LayerReport", "CompressionReport"]

ACCOUNTING = (
    "ratio = float32 bytes of ALL parameters / (coded weights + code tables + sparse-index "
    "(position) stream + parameters kept in float32 (biases, BatchNorm, uncoded layers) + "
    "float32 steps). Architecture and stream lengths are not counted (the file ratio counts "
    "the whole .tfqz file, header included). Entropy = zeroth-order Shannon entropy of the "
    "quantized indices (all of them), and of the coded streams (non-zero values + gaps); "
    "coder overhead = (coded + index bits) / stream entropy - 1."
)


@dataclass
class LayerReport:
    """Bytes of one layer. A layer without a coded kernel has ``bits=None``, ``mode="float"``."""

    name: str
    kernel_shape: Optional[Tuple[int, ...]]
    params: int
    float32_bytes: int
    bits: Optional[int] = None
    pruned_fraction: float = 0.0
    mode: str = "float"
    kernel_params: int = 0
    coded_bytes: int = 0
    table_bytes: int = 0
    index_bytes: int = 0
    float_bytes: int = 0
    step_bytes: int = 0
    index_entropy_bytes: float = 0.0
    stream_entropy_bytes: float = 0.0
    other_mode_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return (self.coded_bytes + self.table_bytes + self.index_bytes + self.float_bytes
                + self.step_bytes)

    @property
    def ratio(self) -> float:
        return self.float32_bytes / self.total_bytes if self.total_bytes else float("inf")

    @property
    def coder_overhead(self) -> Optional[float]:
        """(coded + index bytes) / stream entropy − 1 (``None`` when nothing was coded)."""
        if self.stream_entropy_bytes <= 0:
            return None
        return (self.coded_bytes + self.index_bytes) / self.stream_entropy_bytes - 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kernel_shape"] = list(self.kernel_shape) if self.kernel_shape else None
        d.update(total_bytes=self.total_bytes, ratio=self.ratio, coder_overhead=self.coder_overhead)
        return d


@dataclass
class CompressionReport:
    """Per-layer and total bytes, the ratio, entropy bounds and (optionally) accuracies.

    Attributes:
        layers: one :class:`LayerReport` per layer that has parameters.
        file_bytes: size of the ``.tfqz`` file, when written.
        accuracy: accuracies by stage (e.g. ``float``, ``pruned``, ``quantized``, ``decoded``).
        settings: the pipeline's settings (fraction, bits, epochs, ...).
    """

    layers: List[LayerReport]
    file_bytes: Optional[int] = None
    accuracy: Dict[str, float] = field(default_factory=dict)
    settings: Dict[str, object] = field(default_factory=dict)

    def _sum(self, attr: str):
        return sum(getattr(l, attr) for l in self.layers)

    float32_bytes = property(lambda self: self._sum("float32_bytes"))
    params = property(lambda self: self._sum("params"))
    coded_bytes = property(lambda self: self._sum("coded_bytes"))
    table_bytes = property(lambda self: self._sum("table_bytes"))
    index_bytes = property(lambda self: self._sum("index_bytes"))
    float_bytes = property(lambda self: self._sum("float_bytes"))
    step_bytes = property(lambda self: self._sum("step_bytes"))
    index_entropy_bytes = property(lambda self: self._sum("index_entropy_bytes"))
    stream_entropy_bytes = property(lambda self: self._sum("stream_entropy_bytes"))

    @property
    def total_bytes(self) -> int:
        return self._sum("total_bytes")

    @property
    def ratio(self) -> float:
        return self.float32_bytes / self.total_bytes if self.total_bytes else float("inf")

    @property
    def file_ratio(self) -> Optional[float]:
        return self.float32_bytes / self.file_bytes if self.file_bytes else None

    @property
    def coder_overhead(self) -> Optional[float]:
        if self.stream_entropy_bytes <= 0:
            return None
        return (self.coded_bytes + self.index_bytes) / self.stream_entropy_bytes - 1.0

    @property
    def pruned_fraction(self) -> float:
        """Fraction of zeros over all coded kernels."""
        n = sum(l.kernel_params for l in self.layers if l.bits is not None)
        z = sum(l.pruned_fraction * l.kernel_params for l in self.layers if l.bits is not None)
        return z / n if n else 0.0

    def totals(self) -> dict:
        return {
            "params": self.params, "float32_bytes": self.float32_bytes,
            "pruned_fraction": self.pruned_fraction, "coded_bytes": self.coded_bytes,
            "table_bytes": self.table_bytes, "index_bytes": self.index_bytes,
            "float_bytes": self.float_bytes, "step_bytes": self.step_bytes,
            "total_bytes": self.total_bytes, "ratio": self.ratio,
            "index_entropy_bytes": self.index_entropy_bytes,
            "stream_entropy_bytes": self.stream_entropy_bytes,
            "coder_overhead": self.coder_overhead,
            "file_bytes": self.file_bytes, "file_ratio": self.file_ratio,
        }

    def to_dict(self) -> dict:
        return {
            "accounting": ACCOUNTING,
            "settings": dict(self.settings),
            "accuracy": dict(self.accuracy),
            "layers": [l.to_dict() for l in self.layers],
            "total": self.totals(),
        }

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=_json_default)

    @classmethod
    def from_dict(cls, d: dict) -> "CompressionReport":
        names = set(LayerReport.__dataclass_fields__)
        layers = []
        for l in d["layers"]:
            kw = {k: v for k, v in l.items() if k in names}
            kw["kernel_shape"] = tuple(kw["kernel_shape"]) if kw.get("kernel_shape") else None
            layers.append(LayerReport(**kw))
        return cls(layers, file_bytes=d.get("total", {}).get("file_bytes"),
                   accuracy=dict(d.get("accuracy", {})), settings=dict(d.get("settings", {})))

    def __str__(self) -> str:
        head = ("layer", "params", "f32 B", "zeros", "bits", "mode", "coded B", "table B",
                "index B", "float B", "step B", "total B", "ratio", "H(idx) B", "H(strm) B",
                "overhd")
        rows = [head]

        def fmt(l, name, bits, mode, overhead):
            return (name, f"{l.params:,}", f"{l.float32_bytes:,}", f"{100 * l.pruned_fraction:.1f}%",
                    bits, mode, f"{l.coded_bytes:,}", f"{l.table_bytes:,}", f"{l.index_bytes:,}",
                    f"{l.float_bytes:,}", f"{l.step_bytes:,}", f"{l.total_bytes:,}",
                    f"{l.ratio:.2f}x", f"{l.index_entropy_bytes:,.0f}",
                    f"{l.stream_entropy_bytes:,.0f}",
                    "-" if overhead is None else f"{100 * overhead:+.1f}%")

        for l in self.layers:
            rows.append(fmt(l, l.name, "-" if l.bits is None else str(l.bits), l.mode,
                            l.coder_overhead))
        total = LayerReport("TOTAL", None, self.params, self.float32_bytes, None,
                            self.pruned_fraction, "", 0, self.coded_bytes, self.table_bytes,
                            self.index_bytes, self.float_bytes, self.step_bytes,
                            self.index_entropy_bytes, self.stream_entropy_bytes)
        rows.append(fmt(total, "TOTAL", "", "", self.coder_overhead))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                           enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        out = ["Compression report"] + lines
        out.append(f"ratio {self.ratio:.2f}x  ({self.float32_bytes:,} float32 bytes -> "
                   f"{self.total_bytes:,} bytes)")
        if self.file_bytes:
            out.append(f"file  {self.file_bytes:,} bytes (.tfqz, header included): "
                       f"{self.file_ratio:.2f}x")
        if self.accuracy:
            out.append("accuracy: " + ", ".join(f"{k} {100 * v:.2f}%"
                                                for k, v in self.accuracy.items()))
        out.append("accounting: " + ACCOUNTING)
        return "\n".join(out)


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
