"""The result of a sweep as plain data: :class:`SweepRow` per configuration and
:class:`SweepResult`, which prints as a table and saves as JSON, CSV or a plot."""

from __future__ import annotations

import csv
import dataclasses
import json
from typing import Dict, List, Optional

__all__ = ["SweepRow", "SweepResult"]


# ----------------------------------------------------------------------------- sweep report
@dataclasses.dataclass
class SweepRow:
    """One evaluated configuration; ``None`` bits mean float32."""

    weight_bits: Optional[int]
    activation_bits: Optional[int]
    accuracy: float
    loss: Optional[float] = None

    @property
    def label(self) -> str:
        if self.weight_bits is None and self.activation_bits is None:
            return "fp32"
        return f"W{self.weight_bits or 32}A{self.activation_bits or 32}"


@dataclasses.dataclass
class SweepResult:
    """Accuracy vs. bit width of one model: plain data that prints as a table.

    Accuracies are fractions in [0, 1]; ``rows[0]`` is the float model. ``folding`` is the
    BatchNorm fold plan (:meth:`tfqreg.fold.FoldPlan.to_dict`): which BatchNorms were folded into
    which layers before quantizing, and which stayed a float multiply-add, and why.
    """

    rows: List[SweepRow]
    model_name: str = ""
    per_channel: bool = True
    num_examples: int = 0
    folding: Optional[dict] = None

    @property
    def float_accuracy(self) -> float:
        return next(r.accuracy for r in self.rows
                    if r.weight_bits is None and r.activation_bits is None)

    def accuracy(self, weight_bits: Optional[int], activation_bits: Optional[int] = None) -> float:
        """The accuracy of one configuration (``KeyError`` if it was not evaluated)."""
        for r in self.rows:
            if r.weight_bits == weight_bits and r.activation_bits == activation_bits:
                return r.accuracy
        raise KeyError((weight_bits, activation_bits))

    def to_dict(self) -> dict:
        return {"model_name": self.model_name, "per_channel": self.per_channel,
                "num_examples": self.num_examples, "folding": self.folding,
                "rows": [dataclasses.asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepResult":
        return cls(rows=[SweepRow(**r) for r in d["rows"]], model_name=d.get("model_name", ""),
                   per_channel=d.get("per_channel", True),
                   num_examples=d.get("num_examples", 0), folding=d.get("folding"))

    def to_json(self, path: str) -> str:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
        return path

    def to_csv(self, path: str) -> str:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["weight_bits", "activation_bits", "accuracy", "loss"])
            for r in self.rows:
                writer.writerow(["" if r.weight_bits is None else r.weight_bits,
                                 "" if r.activation_bits is None else r.activation_bits,
                                 f"{r.accuracy:.6f}", "" if r.loss is None else f"{r.loss:.6f}"])
        return path

    def plot(self, path: str, title: Optional[str] = None) -> str:
        """Accuracy (%) vs. weight bits, one line per activation width; dashed: float32."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        groups: Dict[Optional[int], List[SweepRow]] = {}
        for r in self.rows:
            if r.weight_bits is not None:
                groups.setdefault(r.activation_bits, []).append(r)
        for a_bits, rows in groups.items():
            rows = sorted(rows, key=lambda r: r.weight_bits)
            ax.plot([r.weight_bits for r in rows], [100 * r.accuracy for r in rows], "o-",
                    label="float activations" if a_bits is None else f"{a_bits}-bit activations")
        ax.axhline(100 * self.float_accuracy, ls="--", c="gray", label="float32")
        ax.set_xlabel("weight bits")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title or f"PTQ {self.model_name} "
                              f"({'per-channel' if self.per_channel else 'per-tensor'})")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def __str__(self) -> str:
        has_loss = any(r.loss is not None for r in self.rows)
        head = (f"PTQ sweep: {self.model_name or 'model'}, "
                f"{'per-channel' if self.per_channel else 'per-tensor'} weights, "
                f"{self.num_examples} examples")
        cols = f"{'weights':>8} {'activations':>12} {'accuracy':>9} {'Δ vs fp32':>10}"
        lines = [head, cols + (f" {'loss':>8}" if has_loss else "")]
        base = self.float_accuracy
        for r in self.rows:
            w = "fp32" if r.weight_bits is None else str(r.weight_bits)
            a = "fp32" if r.activation_bits is None else str(r.activation_bits)
            line = (f"{w:>8} {a:>12} {100 * r.accuracy:>8.2f}% "
                    f"{100 * (r.accuracy - base):>+10.2f}")
            if has_loss:
                line += f" {r.loss:>8.4f}" if r.loss is not None else f" {'':>8}"
            lines.append(line)
        folds = (self.folding or {}).get("folds", [])
        unfolded = (self.folding or {}).get("unfolded", [])
        if folds or unfolded:
            lines.append(f"BatchNorm: {len(folds)} folded into the layer before "
                         f"({', '.join(bn for _, bn in folds) or '-'}), {len(unfolded)} not")
            lines += [f"  {bn} stays a float multiply-add (quantized output): {why}"
                      for bn, why in unfolded]
        return "\n".join(lines)
