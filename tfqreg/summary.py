"""``tfqreg.summary(model)``: bits and memory per layer, and the model's size as it ships.

In the spirit of ``larq.models.summary``: one row per layer with its parameters, the bit width
of each weight and the memory they take, then the model's size three ways:

* **Keras float32**: every parameter at 32 bits (``count_params() * 4`` bytes);
* **quantized parameters**: each weight at its detected bit width (below), BatchNormalization
  folded to two vectors per channel (scale and offset) as at inference, as larq counts it;
* **int8 TFLite** and **gzip -9 of that file**: measured by converting the model with
  :func:`tfqreg.deploy.to_tflite` (mode ``"int8"``). This needs ``representative_data``;
  without it the two sizes are ``None`` and the report says why. Conversion failures are
  noted, not raised (a summary should always print).

Bit widths are detected, in this order, from: the variable's ``precision`` (larq's quantized
variables: 1 for ``ste_sign`` / ``foothill_sign`` kernels, ``k`` for ``DoReFa(k_bit=k)``); a
TFMOT ``QuantizeWrapper``'s weight quantizers (``num_bits`` or tfqreg's ``bits``; TFMOT's
default is 8); else 32. TFMOT's range trackers (``*_min``, ``*_max``, ``optimizer_step``) are
weights of the Keras model and are listed at 32 bits.

Two entry points, as in Keras: :func:`summary` prints the table and returns ``None`` (like
``model.summary()``; do not wrap it in ``print``), :func:`summarize` returns the data
(a :class:`ModelSummary`) without printing.

>>> import tfqreg
>>> from tfqreg import models
>>> s = tfqreg.summarize(models.tiny_cnn())
>>> s.total_params, s.float32_bytes
(1418, 5672)
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from tfqreg._keras import check_keras2, keras

__all__ = ["WeightSummary", "LayerSummary", "ModelSummary", "summarize", "summary"]


@dataclass
class WeightSummary:
    name: str
    shape: List[int]
    count: int
    bits: int
    trainable: bool

    @property
    def bytes(self) -> float:
        return self.count * self.bits / 8


@dataclass
class LayerSummary:
    name: str
    type: str
    output_shape: str
    params: int
    weights: List[WeightSummary] = field(default_factory=list)

    @property
    def bits(self) -> List[int]:
        """The distinct weight bit widths of this layer (empty: no weights)."""
        return sorted({w.bits for w in self.weights})

    @property
    def memory_bytes(self) -> float:
        """Bytes of this layer's weights at their bit widths."""
        return sum(w.bytes for w in self.weights)


@dataclass
class ModelSummary:
    """A model's per-layer bits and memory and its sizes; prints as a table, saves as JSON."""

    name: str
    layers: List[LayerSummary]
    total_params: int
    trainable_params: int
    float32_bytes: int
    quantized_bytes: float
    tflite_int8_bytes: Optional[int] = None
    tflite_int8_gzip_bytes: Optional[int] = None
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        for ld, layer in zip(d["layers"], self.layers):
            ld["bits"] = layer.bits
            ld["memory_bytes"] = layer.memory_bytes
        return d

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_text(self) -> str:
        head = ("layer", "type", "output shape", "params", "weight bits", "memory (KiB)")
        rows = []
        for layer in self.layers:
            bits = "/".join(str(b) for b in layer.bits) if layer.bits else "-"
            rows.append((layer.name, layer.type, layer.output_shape, f"{layer.params:,}", bits,
                         f"{layer.memory_bytes / 1024:.2f}"))
        widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]

        def fmt(r):
            return "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))

        rule = "-" * len(fmt(head))
        out = [f"Model: {self.name}", rule, fmt(head), rule] + [fmt(r) for r in rows] + [rule]

        def size(n):
            return "n/a" if n is None else f"{n:,.0f} B ({n / 1024:.2f} KiB)"

        ratio = self.float32_bytes / self.quantized_bytes if self.quantized_bytes else float("nan")
        out += [f"params: {self.total_params:,} ({self.trainable_params:,} trainable)",
                f"size as Keras float32:           {size(self.float32_bytes)}",
                f"size at the weights' bit widths: {size(self.quantized_bytes)} "
                f"({ratio:.2f}x smaller)",
                f"size as int8 TFLite file:        {size(self.tflite_int8_bytes)}",
                f"size as gzip -9 int8 TFLite:     {size(self.tflite_int8_gzip_bytes)}"]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.to_text()


def _quantizer_bits(q) -> Optional[int]:
    for attr in ("precision", "num_bits", "bits"):
        v = getattr(q, attr, None)
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
    return None


def _wrapper_bits(layer) -> Dict[int, int]:
    """``id(weight) -> bits`` for a TFMOT QuantizeWrapper's quantized weights."""
    if getattr(layer, "quantize_config", None) is None or getattr(layer, "layer", None) is None:
        return {}
    # TFMOT keeps (variable, quantizer, quantizer_vars) per quantized weight after build; the
    # config's get_weights_and_quantizers() returns the fake-quantized tensors instead.
    triples = getattr(layer, "_weight_vars", None) or []
    return {id(t[0]): (_quantizer_bits(t[1]) or 8) for t in triples}


def _folded_bn_weights(layer, weights):
    """BatchNormalization at inference is a per-channel scale and offset: drop beta and gamma
    when their moving statistics are present (larq's convention)."""
    if not isinstance(layer, keras.layers.BatchNormalization):
        return weights
    names = [w.name.split("/")[-1].split(":")[0] for w in weights]
    drop = set()
    for a, b in (("beta", "moving_mean"), ("gamma", "moving_variance")):
        if a in names and b in names:
            drop.add(names.index(a))
    return [w for i, w in enumerate(weights) if i not in drop]


def _output_shape(layer) -> str:
    try:
        shape = layer.output_shape
    except (AttributeError, RuntimeError):
        return "?"
    return str(shape).replace("None", "-1") if not isinstance(shape, list) else \
        ", ".join(str(s).replace("None", "-1") for s in shape)


def _layer_summary(layer) -> LayerSummary:
    wrapped = _wrapper_bits(layer)
    weights = list(layer.weights)  # a wrapper's own weights include the wrapped layer's
    if wrapped:
        type_name = f"QuantizeWrapper({type(layer.layer).__name__})"
    else:
        type_name = type(layer).__name__
    trainable_ids = {id(w) for w in layer.trainable_weights}
    weights = _folded_bn_weights(layer, weights)
    ws = []
    for w in weights:
        bits = getattr(w, "precision", None)
        bits = wrapped.get(id(w), bits if isinstance(bits, int) else None) or 32
        shape = [int(d) for d in w.shape]
        ws.append(WeightSummary(w.name, shape, int(np.prod(shape)), int(bits),
                                id(w) in trainable_ids))
    params = int(sum(int(np.prod(w.shape)) for w in layer.weights))
    return LayerSummary(layer.name, type_name, _output_shape(layer), params, ws)


def _leaf_layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model) and not hasattr(layer, "quantize_config"):
            yield from _leaf_layers(layer)
        else:
            yield layer


def summary(model, representative_data=None,
            print_fn: Callable[[str], Any] = print) -> None:
    """Print the per-layer weight bits and memory and the model's sizes; returns ``None``
    (like Keras' ``model.summary()``). :func:`summarize` returns the same as data.

    Args:
        model: a built ``tf_keras`` model (nested models are expanded).
        representative_data: calibration inputs; when given, the model is converted to int8
            TFLite to measure the file and its gzip size.
        print_fn: where the table goes (a callable taking one string).
    """
    if not callable(print_fn):
        raise TypeError(f"`print_fn` must be callable, got {print_fn!r}; use "
                        "tfqreg.summarize(model) for the data without printing.")
    print_fn(summarize(model, representative_data).to_text())


def summarize(model, representative_data=None) -> ModelSummary:
    """The data behind :func:`summary`: a :class:`ModelSummary` (see the module docstring).

    Args:
        model: a built ``tf_keras`` model (nested models are expanded).
        representative_data: calibration inputs; when given, the model is converted to int8
            TFLite to measure the file and its gzip size.

    Returns:
        A :class:`ModelSummary` (prints as the table, saves as JSON).
    """
    check_keras2(model, "model", keras.Model)
    if not model.built:
        raise ValueError("`model` is not built: build it (or call it on data) before summary().")
    layers = [_layer_summary(layer) for layer in _leaf_layers(model)]
    total = int(model.count_params())
    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    s = ModelSummary(model.name, layers, total, trainable, total * 4,
                     float(sum(layer.memory_bytes for layer in layers)))
    if any(isinstance(l, keras.layers.BatchNormalization) for l in _leaf_layers(model)):
        s.notes.append("BatchNormalization counted as folded scale + offset (inference form).")
    if representative_data is None:
        s.notes.append("int8 TFLite sizes not measured: pass representative_data to convert.")
    else:
        from tfqreg.deploy import to_tflite

        try:
            res = to_tflite(model, mode="int8", representative_data=representative_data,
                            check=False)
            s.tflite_int8_bytes = len(res.flatbuffer)
            s.tflite_int8_gzip_bytes = len(gzip.compress(res.flatbuffer, 9, mtime=0))
        except Exception as e:  # a summary should print even if the model does not convert
            s.notes.append(f"int8 TFLite conversion failed: {type(e).__name__}: "
                           f"{str(e).splitlines()[0][:300]}")
    return s
