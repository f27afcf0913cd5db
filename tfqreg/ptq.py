"""Post-training quantization on demand, and accuracy-vs-bits sweeps (methods.md, "post-training
quantization on demand"): the model the device will compute, evaluated at any bit width.

:func:`quantize` takes a trained float model and a bit width and returns a NEW model (the input
model is untouched) that computes what the TFLite converter would make of it:

- BatchNorm folding first (:mod:`tfqreg.fold`): every BatchNormalization that follows a Dense /
  Conv / DepthwiseConv2D with a linear activation is folded into it, ``w' = w·γ/√(σ²+ε)`` per
  output channel, as the converter does; one that cannot fold stays a float BatchNorm whose
  output is quantized (TFLite runs it as a multiply-add), and the result says which and why.
- weights: the (folded) kernel of every ``Dense``, ``Conv1D/2D/3D``, transposed convolution and
  ``DepthwiseConv2D`` is replaced by its fake-quantized value on the tfqreg grid
  (:func:`tfqreg.grid.fake_quant`, symmetric, default step ``max|w'| / (2^(b-1) − 1)``, per output
  channel by default or per tensor). Biases stay in float (TFLite keeps them in int32). larq
  ``Quant*`` layers with a ``kernel_quantizer`` are left alone (larq quantizes them already).
  ``SeparableConv2D`` is refused: TFLite computes it as a depthwise and a 1×1 convolution with a
  quantized tensor between them, so rebuild it from those two layers.
- activations (when ``activation_bits`` is given) are fake-quantized where TFLite quantizes a
  tensor, with asymmetric ranges (TFLite's scheme, :func:`tfqreg.grid.fake_quant_activation`)
  calibrated as the min/max over ``calibration_data``: the model input; the output of each fused
  op (a quantized layer + its folded BatchNorm + a following ReLU/ReLU6 are one op, quantized
  after the activation, never between the layer and its BatchNorm); the logits AND the output of
  a layer whose activation TFLite cannot fuse (softmax, sigmoid, tanh, ...); and the outputs of
  the other computing layers (``Add``, ``Concatenate``, pooling averages, an unfolded
  BatchNorm, a standalone activation). Shape-only layers (max pooling, reshape, flatten,
  dropout, padding) keep their input's grid, as in TFLite. Wrappers: :class:`ActivationFakeQuant`.

Keras 3 (TensorFlow backend): :func:`quantize` and :func:`sweep` take Keras 3 Sequential and
Functional models too. They run on the model's tf_keras mirror (:mod:`tfqreg.keras3_bridge`:
the same layers and weights, checked to compute the same outputs on the first batch of your
data), so the numbers are those of the same model built in tf_keras; :func:`quantize` returns
a tf_keras model.

:func:`sweep` evaluates the float model and each bit width and returns a :class:`SweepResult`:
plain data that prints as a table and saves as JSON / CSV / a plot, with the fold plan. It folds
and clones the model once and only re-assigns kernels and re-calibrates per width.

>>> import numpy as np, tfqreg
>>> from tfqreg import models, ptq
>>> model = models.tiny_cnn()
>>> q4 = ptq.quantize(model, weight_bits=4)                 # weights only
>>> x = np.random.rand(64, 28, 28, 1).astype("float32")
>>> q4a8 = ptq.quantize(model, 4, activation_bits=8, calibration_data=x)
>>> y = np.random.randint(0, 10, 64)
>>> result = ptq.sweep(model, (x, y), weight_bits=(8, 4), progress=False)
>>> [row.weight_bits for row in result.rows]
[None, 8, 4]

Command line: ``tfqreg sweep MODEL --data fashion_mnist --bits 8 6 4 [--per-tensor]
[--activation-bits N] [--json out.json] [--csv out.csv] [--plot out.png]``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from tfqreg import fold, grid
from tfqreg._keras import check_keras2, keras, register, tf

__all__ = [
    "ActivationFakeQuant",
    "quantizable_layers",
    "quantize",
    "SweepRow",
    "SweepResult",
    "sweep",
    "add_arguments",
    "run_cli",
]

_BATCH = 256


# ----------------------------------------------------------------------------- argument checks
def _check_args(model=None, weight_bits=None, activation_bits=None, per_channel=None,
                narrow_range=None):
    """The one argument check of this module; raises naming the argument."""
    if model is not None:
        check_keras2(model, "model", keras.Model)
        if not isinstance(model, keras.Sequential) and not getattr(
                model, "_is_graph_network", False):
            raise TypeError(
                f"`model` must be a Sequential or Functional model: a subclassed model "
                f"({type(model).__name__}) cannot be cloned, so PTQ cannot build a new model "
                "from it. Rebuild it with the functional API.")
        separable = [l.name for l in model._flatten_layers(include_self=False, recursive=True)
                     if isinstance(l, _separable_types())]
        if separable:
            raise ValueError(
                f"`model` has separable convolution(s) {separable}: TFLite computes each as a "
                "DEPTHWISE_CONV_2D and a 1x1 CONV_2D with a quantized tensor between them, "
                "which PTQ does not simulate. Rebuild them as DepthwiseConv2D + Conv2D(1) "
                "(the same function) to quantize them.")
        if not quantizable_layers(model):
            raise ValueError(
                "`model` has no quantizable layer (Dense, Conv1D/2D/3D, a transposed "
                "convolution or DepthwiseConv2D without a larq kernel_quantizer).")
    if per_channel == "conv":
        per_channel = True
    grid.check_quant_args(weight_bits, activation_bits, per_channel, narrow_range)


def _check_flags(**flags) -> None:
    """Bools given explicitly (``None`` is not a bool here: the defaults are True/False)."""
    from tfqreg import _checks

    for name, value in flags.items():
        if name == "per_channel" and value == "conv" and isinstance(value, str):
            continue
        _checks.check_bool(name, value)


def _keras2_mirror(model):
    """``(model PTQ works on, the user's Keras 3 model or None)``: a Keras 3 Sequential /
    Functional model is mirrored in tf_keras (:mod:`tfqreg.keras3_bridge`; verified by
    :func:`_verify_mirror` once the data are checked)."""
    from tfqreg import keras3_bridge

    if not keras3_bridge.is_keras3_model(model):
        return model, None

    return keras3_bridge.to_keras2(model, verify=False), model


def _verify_mirror(original, mirror, first_batch) -> None:
    """The mirror computes what the Keras 3 model computes, on the user's first batch."""
    if original is not None:
        from tfqreg import keras3_bridge

        keras3_bridge.verify_mirror(original, mirror,
                                    None if first_batch is None else np.asarray(first_batch))


def _int_list(name: str, values) -> List[int]:
    """A sequence of bit widths (each checked later), not an int or a string."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, range)):
        raise TypeError(f"`{name}` must be a list of bit widths, e.g. (8, 4), got {values!r}.")
    for v in values:
        if v is None:
            raise TypeError(f"`{name}` holds None; give bit widths in 2..16.")
    return list(values)


def _pairs(name: str, values) -> List[Tuple[int, Optional[int]]]:
    """``[(weight_bits, activation_bits), ...]``."""
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of (weight_bits, activation_bits) pairs, got "
                        f"{values!r}.")
    for pair in values:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise TypeError(f"`{name}` must be a list of (weight_bits, activation_bits) pairs; "
                            f"{pair!r} is not a pair.")
    return [tuple(p) for p in values]


def _separable_types():
    names = ("SeparableConv1D", "SeparableConv2D")
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


def _kernel_attr(layer) -> str:
    return "depthwise_kernel" if isinstance(layer, keras.layers.DepthwiseConv2D) else "kernel"


def _is_quantizable(layer) -> bool:
    if isinstance(layer, _separable_types()) or grid.channel_axes_for(layer) is None:
        return False
    if getattr(layer, "kernel_quantizer", None) is not None:  # larq layer, already quantized
        return False
    return True


def quantizable_layers(model: keras.Model) -> List[keras.layers.Layer]:
    """The layers whose kernels PTQ quantizes (nested models included), in model order."""
    check_keras2(model, "model", keras.Model)
    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if _is_quantizable(layer):
            out.append(layer)
    return out


# ----------------------------------------------------------------------------- data helpers
def _input_shape(model) -> Tuple:
    """The input shape of a single-input model; several inputs are refused naming ``model``
    (weights-only :func:`quantize` takes them: it needs no data)."""
    shape = model.input_shape
    if isinstance(shape, list):
        raise ValueError(
            f"`model` has {len(shape)} inputs {list(model.input_names)}: tfqreg.ptq evaluates "
            "and calibrates single-input models only (weights-only quantize(model, bits) "
            "takes any number of inputs).")
    return tuple(shape)


def _check_x(x, model, name: str):
    expected = _input_shape(model)
    shape = tuple(np.shape(x))
    ok = len(shape) == len(expected) and all(
        e is None or e == s for e, s in zip(expected[1:], shape[1:]))
    if not ok:
        raise ValueError(f"`{name}` has inputs of shape {shape}, but the model expects "
                         f"{expected} (None = any).")


def _check_values(x: np.ndarray, name: str) -> np.ndarray:
    """Float inputs, all finite (as ``to_tflite`` checks its representative data): a NaN in
    the calibration set widens nothing and poisons every range after it."""
    if x.dtype.kind not in "f":
        raise TypeError(
            f"`{name}` has dtype {x.dtype}, but the model takes float inputs: scale integer "
            "images to floats the way the model was trained (e.g. x / 255).")
    x = x.astype(np.float32, copy=False)
    bad = ~np.isfinite(x)
    if bad.any():
        where = np.argwhere(bad.reshape(len(x), -1).any(-1)).ravel()
        raise ValueError(f"`{name}` holds {int(bad.sum())} non-finite value(s) (NaN or inf), in "
                         f"example(s) {where[:5].tolist()}{'...' if len(where) > 5 else ''}.")
    return x


def _labels(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Class indices from sparse or one-hot labels, by Keras' rule: labels with one axis fewer
    than the outputs, or a last axis of 1, are sparse; labels shaped like the outputs are one-hot.
    Out-of-range or non-integer sparse labels are an error, never a wrapped index."""
    classes = out.shape[-1]
    sparse = y.ndim == out.ndim - 1 or (y.ndim == out.ndim and y.shape[-1] == 1 and classes > 1)
    if not sparse:
        if y.shape != out.shape:
            raise ValueError(f"`data` labels have shape {y.shape[1:]} per example; the model "
                             f"outputs {out.shape[1:]}: give class indices (N,) / (N, 1) or "
                             "one-hot labels shaped like the outputs.")
        return y.argmax(-1).reshape(-1).astype(np.int64)
    y = y.reshape(-1)
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ValueError("`data` labels are not whole numbers (class indices expected).")
    y = y.astype(np.int64)
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"`data` labels must be class indices in [0, {classes}); got values "
                         f"from {int(y.min())} to {int(y.max())}.")
    return y


def _batches(data, model, name: str, with_labels: bool, batch_size: int = _BATCH):
    """Yield ``x`` or ``(x, y)`` batches from NumPy ``x`` / ``(x, y)`` or a ``tf.data`` set."""
    if isinstance(data, tf.data.Dataset):
        for i, element in enumerate(data):
            if with_labels:
                if not isinstance(element, (tuple, list)) or len(element) < 2:
                    raise ValueError(f"`{name}` must yield (x, y) batches.")
                x, y = element[0], element[1]
            else:
                x = element[0] if isinstance(element, (tuple, list)) else element
            if i == 0:
                _check_x(x, model, name)
            _check_values(np.asarray(x), name)
            yield (x, y) if with_labels else x
        return
    if isinstance(data, (tuple, list)):
        if with_labels:
            if len(data) != 2:
                raise ValueError(f"`{name}` must be (x, y) or a tf.data.Dataset of (x, y).")
            x, y = np.asarray(data[0]), np.asarray(data[1])
            if len(x) != len(y):
                raise ValueError(f"`{name}`: {len(x)} inputs but {len(y)} labels.")
        else:
            x = np.asarray(data[0])
    elif with_labels:
        raise ValueError(f"`{name}` must be (x, y) NumPy arrays or a tf.data.Dataset.")
    else:
        x = np.asarray(data)
    _check_x(x, model, name)
    if len(x) == 0:
        raise ValueError(f"`{name}` is empty.")
    x = _check_values(x, name)
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        yield (x[sl], y[sl]) if with_labels else x[sl]


# ----------------------------------------------------------------------------- wrapper layer
@register
class ActivationFakeQuant(keras.layers.Wrapper):
    """Wraps a layer and fake-quantizes its output (and optionally its input) to ``bits`` on
    calibrated asymmetric ranges (stored as non-trainable weights, so they are saved).

    With ``activation`` given, the wrapped layer computes its pre-activation (its own activation
    must be linear), the wrapper quantizes it, applies ``activation`` and quantizes the result:
    TFLite's ``FULLY_CONNECTED`` + ``SOFTMAX`` (or ``LOGISTIC``, ``TANH``), each with a quantized
    output.

    ``mode`` (a Python attribute, not saved): ``"quantize"`` (default), ``"calibrate"``
    (pass values through and widen the stored ranges to their min/max) or ``"off"``.

    Args:
        layer: the wrapped layer.
        bits: activation bit width, 2..16.
        quantize_input: also quantize the layer's input (used for the model input).
        quantize_output: quantize the layer's output.
        narrow_range: use ``[1, 2^n − 1]`` instead of ``[0, 2^n − 1]``.
        activation: an activation applied after the wrapped layer (name or config), or ``None``.
    """

    MODES = ("quantize", "calibrate", "off")

    def __init__(self, layer, bits: int = 8, quantize_input: bool = False,
                 quantize_output: bool = True, narrow_range: bool = False, activation=None,
                 **kwargs):
        _check_args(activation_bits=bits, narrow_range=narrow_range)
        kwargs.setdefault("name", f"afq_{layer.name}")
        super().__init__(layer, **kwargs)
        self.bits = int(bits)
        self.quantize_input = bool(quantize_input)
        self.quantize_output = bool(quantize_output)
        self.narrow_range = narrow_range
        self.activation = None if activation is None else keras.activations.get(activation)
        self.mode = "quantize"

    def build(self, input_shape=None):
        if not self.layer.built:
            self.layer.build(input_shape)

        def add(name):
            return self.add_weight(name, shape=(), initializer="zeros", trainable=False)

        self.input_min, self.input_max = add("input_min"), add("input_max")
        self.output_min, self.output_max = add("output_min"), add("output_max")
        if self.activation is not None:
            self.preactivation_min = add("preactivation_min")
            self.preactivation_max = add("preactivation_max")
        super().build(input_shape)

    def fixed_output_range(self, bits: int) -> Optional[Tuple[float, float]]:
        """TFLite's fixed output grid for softmax / sigmoid (scale ``2^-b``, from 0) and tanh
        (scale ``2^-(b-1)``, symmetric), or ``None`` when the output range is calibrated."""
        act = self.activation
        if act is None and isinstance(self.layer, keras.layers.Softmax):
            return 0.0, 1.0 - 2.0 ** -bits
        if act is None and isinstance(self.layer, keras.layers.Activation):
            act = self.layer.activation
        name = None if act is None else keras.activations.serialize(act)
        if name in ("softmax", "sigmoid"):
            return 0.0, 1.0 - 2.0 ** -bits
        if name == "tanh":
            return -1.0, 1.0 - 2.0 ** -(bits - 1)
        return None

    def _ranges(self):
        out = [self.input_min, self.input_max, self.output_min, self.output_max]
        if self.activation is not None:
            out += [self.preactivation_min, self.preactivation_max]
        return out

    def reset_ranges(self):
        for v in self._ranges():
            v.assign(0.0)

    def _apply(self, x, lo, hi):
        if self.mode == "off":
            return x
        if self.mode == "calibrate":
            flat = [tf.cast(t, tf.float32) for t in tf.nest.flatten(x)]
            updates = [lo.assign(tf.minimum(lo, tf.reduce_min([tf.reduce_min(t) for t in flat]))),
                       hi.assign(tf.maximum(hi, tf.reduce_max([tf.reduce_max(t) for t in flat])))]
            with tf.control_dependencies(updates):
                return tf.nest.map_structure(tf.identity, x)
        return tf.nest.map_structure(
            lambda t: grid.fake_quant_activation(t, lo, hi, self.bits, self.narrow_range), x)

    def call(self, inputs):
        if self.mode not in self.MODES:
            raise ValueError(f"`mode` must be one of {self.MODES}, got {self.mode!r}.")
        x = inputs
        if self.quantize_input:
            x = self._apply(x, self.input_min, self.input_max)
        y = self.layer(x)
        if self.activation is not None:
            if self.quantize_output:
                y = self._apply(y, self.preactivation_min, self.preactivation_max)
            y = self.activation(y)
        if self.quantize_output:
            y = self._apply(y, self.output_min, self.output_max)
        return y

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "bits": self.bits,
                "quantize_input": self.quantize_input,
                "quantize_output": self.quantize_output, "narrow_range": self.narrow_range,
                "activation": None if self.activation is None
                else keras.activations.serialize(self.activation)}


# ----------------------------------------------------------------------------- where TFLite quantizes
def _fusing_types():
    """Layers whose TFLite op carries a fused ReLU / ReLU6."""
    return (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
            keras.layers.DepthwiseConv2D, keras.layers.Conv1DTranspose,
            keras.layers.Conv2DTranspose, keras.layers.Add, keras.layers.Subtract,
            keras.layers.Multiply)


def _computing_types():
    """Layers whose output TFLite re-quantizes (besides the quantized-kernel layers)."""
    return _fusing_types() + (
        keras.layers.Average, keras.layers.Maximum, keras.layers.Minimum,
        keras.layers.Concatenate, keras.layers.GlobalAveragePooling1D,
        keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
        keras.layers.AveragePooling1D, keras.layers.AveragePooling2D,
        keras.layers.AveragePooling3D, keras.layers.BatchNormalization,
        keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
        keras.layers.Softmax, keras.layers.PReLU, keras.layers.ELU)


def _is_identity(layer) -> bool:
    return isinstance(layer, keras.layers.Activation) and fold.activation_name(layer) == "linear"


def _model_input_layers(base) -> set:
    if isinstance(base, keras.Sequential):
        return {id(base.layers[0])}
    inputs = {id(l) for l in base._input_layers}
    return {id(layer) for layer in base.layers
            if not isinstance(layer, keras.layers.InputLayer)
            and any(id(inbound) in inputs for node in layer._inbound_nodes
                    for inbound in tf.nest.flatten(node.inbound_layers))}


def _quantization_points(base, quantized: set) -> Dict[int, dict]:
    """``id(layer) -> wrapper kwargs`` for the layers whose output (or input) TFLite quantizes."""
    points: Dict[int, dict] = {}
    covered = set()  # activation layers fused into the op before them
    for layer in base.layers:
        if isinstance(layer, keras.layers.InputLayer) or id(layer) in covered:
            continue
        if not (id(layer) in quantized or isinstance(layer, _computing_types())):
            continue
        if _is_identity(layer):
            continue
        own = fold.activation_name(layer)
        split = (own is not None and own not in fold.FUSED_ACTIVATIONS
                 and id(layer) in quantized)
        end, fused = layer, own not in (None, "linear")
        while True:  # follow the chain that TFLite fuses into this op
            consumers = fold.consumers(end)
            if len(consumers) != 1:
                break
            nxt = consumers[0]
            if _is_identity(nxt):
                end = nxt
                covered.add(id(nxt))
                continue
            if (not fused and isinstance(layer, _fusing_types())
                    and fold.is_fused_activation(nxt)):
                end, fused = nxt, True
                covered.add(id(nxt))
                continue
            break
        entry = points.setdefault(id(end), {})
        entry["quantize_output"] = True
        if split:
            points.setdefault(id(layer), {})["split"] = True
    for lid in _model_input_layers(base):
        points.setdefault(lid, {}).setdefault("quantize_output", False)
        points[lid]["quantize_input"] = True
    return points


# ----------------------------------------------------------------------------- the PTQ model
class _PTQModel:
    """A folded clone of a float model whose kernels and activation wrappers are set per width.

    Folded and cloned once; :meth:`set_weight_bits` re-assigns quantized kernels from the stored
    float (folded) kernels and :meth:`calibrate` re-computes the activation ranges."""

    def __init__(self, model: keras.Model, activations: bool):
        self.plan = fold.find_folds(model)
        base = fold.fold_model(model)
        self.layers = quantizable_layers(base)
        self.float_kernels = [getattr(l, _kernel_attr(l)).numpy() for l in self.layers]
        self.wrappers: List[ActivationFakeQuant] = []
        self.model = self._wrap(base) if activations else base
        self._predict = None

    def _wrap(self, base: keras.Model) -> keras.Model:
        points = _quantization_points(base, {id(l) for l in self.layers})

        def wrap(layer):  # the same (weight-carrying) layer object, wrapped
            spec = points.get(id(layer))
            if not spec:
                return layer
            activation = None
            if spec.get("split"):
                activation = keras.activations.serialize(layer.activation)
                layer.activation = keras.activations.linear  # our private clone
            wrapper = ActivationFakeQuant(
                layer, quantize_input=spec.get("quantize_input", False),
                quantize_output=spec.get("quantize_output", False) or bool(activation),
                activation=activation)
            self.wrappers.append(wrapper)
            return wrapper

        return keras.models.clone_model(base, clone_function=wrap)

    def set_weight_bits(self, bits: Optional[int], per_channel, narrow_range: bool):
        for layer, w in zip(self.layers, self.float_kernels):
            if bits is None:
                q = w
            else:
                channel = per_channel is True or (
                    per_channel == "conv" and not isinstance(layer, keras.layers.Dense))
                axes = grid.channel_axes_for(layer) if channel else None
                step = grid.default_step(w, bits, axes, narrow_range)
                q = grid.fake_quant(w, step, bits, narrow_range).numpy()
            getattr(layer, _kernel_attr(layer)).assign(q)

    def set_activation_mode(self, mode: str, bits: Optional[int] = None):
        for wrapper in self.wrappers:
            wrapper.mode = mode
            if bits is not None:
                wrapper.bits = int(bits)
        self._predict = None  # Python attributes changed: trace again

    def calibrate(self, data, bits: int):
        """Ranges: min/max over ``data`` of the model with its kernels as they are now (on the
        grid), as ai-edge-quantizer calibrates the sub-8-bit files (at 8 bits this equals the
        TF converter's float calibration to within a grid step); then fixed output grids where
        TFLite fixes them (softmax, sigmoid, tanh)."""
        self.set_activation_mode("calibrate")
        for wrapper in self.wrappers:
            wrapper.reset_ranges()
        for x in _batches(data, self.model, "calibration_data", with_labels=False):
            self.predict(x)
        for wrapper in self.wrappers:
            fixed = wrapper.quantize_output and wrapper.fixed_output_range(bits)
            if fixed:
                wrapper.output_min.assign(fixed[0])
                wrapper.output_max.assign(fixed[1])
        self.set_activation_mode("quantize", bits)

    def predict(self, x):
        if self._predict is None:
            self._predict = tf.function(lambda t: self.model(t, training=False),
                                        reduce_retracing=True)
        return self._predict(tf.convert_to_tensor(x))


def quantize(model: keras.Model, weight_bits: int, activation_bits: Optional[int] = None,
             per_channel: Union[bool, str] = True, calibration_data=None,
             narrow_range: bool = False) -> keras.Model:
    """A new model that computes what the device computes: BatchNorms folded, then
    ``weight_bits``-bit kernels and optionally ``activation_bits``-bit activations, fake-quantized
    on the tfqreg grid (the input model is not modified).

    Args:
        model: a trained Sequential or Functional model, Keras 2 (``tf_keras``) or Keras 3
            (TensorFlow backend: it is mirrored in tf_keras by
            :func:`tfqreg.keras3_bridge.to_keras2`, verified on ``calibration_data`` or random
            inputs, and the result is a tf_keras model).
        weight_bits: 2..16.
        activation_bits: 2..16 to quantize the tensors TFLite quantizes (the model input, the
            output of every fused op; see the module docstring), or ``None`` (float
            activations).
        per_channel: one step per output channel (``True``, default), one per kernel
            (``False``), or ``"conv"``: per channel for convolutions and per tensor for
            ``Dense`` (what TFLite Micro's INT4 FULLY_CONNECTED kernel needs).
        calibration_data: inputs for the activation ranges (required with ``activation_bits``):
            a NumPy array ``x``, a tuple ``(x, y)`` or a ``tf.data.Dataset``; a few batches
            (hundreds to a few thousand examples) are enough.
        narrow_range: symmetric weight range ``±(2^(b−1) − 1)`` (no change with the default
            step, which never reaches ``−2^(b−1)``).

    Returns:
        A new Keras model: the folded model (each folded BatchNorm is an identity layer named
        ``<bn>_folded``; the kernels lie on the grid). With activation quantization the layers
        whose outputs are quantized are wrapped in :class:`ActivationFakeQuant` (registered;
        the model saves and loads). BatchNorms that could not fold are logged as a warning
        (:func:`tfqreg.fold.find_folds` says why).

    Raises:
        TypeError: not a Keras model, a subclassed model, a Keras 3 layer the bridge does not
            translate, or a non-bool flag.
        ValueError: a bit width outside 2..16, no quantizable layer, missing or misshaped
            calibration data.
    """
    if weight_bits is None:
        raise TypeError("`weight_bits` must be an integer in 2..16, got None.")
    _check_flags(per_channel=per_channel, narrow_range=narrow_range)
    model, keras3_model = _keras2_mirror(model)
    _check_args(model, weight_bits, activation_bits, per_channel, narrow_range)
    if activation_bits is not None and calibration_data is None:
        raise ValueError("`calibration_data` is required when `activation_bits` is given "
                         "(the activation ranges are calibrated on it).")
    first = None
    if calibration_data is not None:
        _input_shape(model)
        first = next(iter(_batches(calibration_data, model, "calibration_data",
                                   with_labels=False)))
    if keras3_model is not None:
        _verify_mirror(keras3_model, model, first)
    ptq = _PTQModel(model, activations=activation_bits is not None)
    if ptq.plan.unfolded:
        logging.getLogger(__name__).warning(
            "ptq.quantize: %d BatchNorm(s) cannot be folded and stay a float multiply-add "
            "whose output is quantized (as in TFLite): %s", len(ptq.plan.unfolded),
            "; ".join(f"{bn}: {why}" for bn, why in ptq.plan.unfolded))
    ptq.set_weight_bits(weight_bits, per_channel, narrow_range)
    if activation_bits is not None:
        ptq.calibrate(calibration_data, activation_bits)
    return ptq.model


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


def _evaluate(ptq: _PTQModel, data, probabilities: Optional[bool]):
    """(accuracy, mean sparse cross-entropy or None, number of examples, probabilities)."""
    correct, total, loss_sum = 0, 0, 0.0
    for x, y in _batches(data, ptq.model, "data", with_labels=True):
        out = ptq.predict(x).numpy()
        y = _labels(np.asarray(y), out)
        out = out.reshape(len(y), -1)
        if probabilities is None:
            probabilities = bool(out.min() >= 0 and np.allclose(out.sum(-1), 1.0, atol=1e-3))
        correct += int((out.argmax(-1) == y).sum())
        total += len(y)
        if probabilities:
            p = out[np.arange(len(y)), y]
            loss_sum += float(-np.log(np.clip(p, 1e-7, 1.0)).sum())
        else:
            logz = out.max(-1) + np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1))
            loss_sum += float((logz - out[np.arange(len(y)), y]).sum())
    if total == 0:
        raise ValueError("`data` is empty.")
    return correct / total, loss_sum / total, total, probabilities


class _NoRetracingWarning(logging.Filter):
    """The sweep traces one function per configuration on purpose (bit widths are static
    attributes of the fake-quant ops); TensorFlow's "frequent retracing" warning is noise."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_retracing():
    logger, filt = tf.get_logger(), _NoRetracingWarning()
    logger.addFilter(filt)
    try:
        yield
    finally:
        logger.removeFilter(filt)


def sweep(model: keras.Model, data, weight_bits: Sequence[int] = (8, 6, 5, 4, 3, 2),
          activation_bits: Optional[int] = None, per_channel: bool = True,
          calibration_data=None, extra: Iterable[Tuple[int, Optional[int]]] = (),
          narrow_range: bool = False, progress: bool = True) -> SweepResult:
    """Accuracy of ``model`` in float32 and post-training quantized at each width.

    Args:
        model: a trained Sequential or Functional classifier, Keras 2 or Keras 3 (mirrored
            in tf_keras by :func:`tfqreg.keras3_bridge.to_keras2` and verified on the first
            batch of ``data``).
        data: labelled evaluation data: ``(x, y)`` NumPy arrays (integer or one-hot labels) or a
            ``tf.data.Dataset`` of ``(x, y)`` batches.
        weight_bits: the weight widths to evaluate (each 2..16).
        activation_bits: one activation width used with every weight width, or ``None``.
        per_channel: per-channel (default) or per-tensor weight steps.
        calibration_data: inputs for the activation ranges (needed when any configuration
            quantizes activations); see :func:`quantize`.
        extra: additional ``(weight_bits, activation_bits)`` pairs, e.g. ``[(4, 4)]``.
        narrow_range: symmetric narrow weight range.
        progress: show a tqdm progress bar.

    Returns:
        A :class:`SweepResult`; ``rows[0]`` is float32, then ``weight_bits`` in the given order,
        then ``extra``. The loss column is the mean sparse categorical cross-entropy (on
        probabilities if the outputs are probabilities, else on logits).
    """
    if model is None:
        raise TypeError("`model` must be a tf_keras Model, got None.")
    _check_flags(per_channel=per_channel, narrow_range=narrow_range, progress=progress)
    model, keras3_model = _keras2_mirror(model)
    _check_args(model, None, activation_bits, per_channel, narrow_range)
    _input_shape(model)
    if keras3_model is not None:
        _verify_mirror(keras3_model, model,
                       next(iter(_batches(data, model, "data", with_labels=True)))[0])
    weight_bits = _int_list("weight_bits", weight_bits)
    extra = _pairs("extra", extra)
    configs = [(None, None)] + [(b, activation_bits) for b in weight_bits] + [
        (w, a) for w, a in extra]
    for w, a in configs[1:]:
        _check_args(weight_bits=w, activation_bits=a)
    needs_activations = any(a is not None for _, a in configs)
    if needs_activations and calibration_data is None:
        raise ValueError("`calibration_data` is required when activations are quantized.")

    from tqdm.auto import tqdm

    ptq = _PTQModel(model, activations=needs_activations)
    rows, probabilities, n = [], None, 0
    with _quiet_retracing():
        for w, a in tqdm(configs, desc=f"PTQ sweep {model.name}", disable=not progress,
                         leave=False):
            ptq.set_weight_bits(w, per_channel, narrow_range)
            if a is None:
                ptq.set_activation_mode("off")
            else:
                ptq.calibrate(calibration_data, a)
            acc, loss, n, probabilities = _evaluate(ptq, data, probabilities)
            rows.append(SweepRow(w, a, acc, loss if math.isfinite(loss) else None))
    return SweepResult(rows=rows, model_name=model.name, per_channel=per_channel,
                       num_examples=n, folding=ptq.plan.to_dict())


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    """Arguments of ``tfqreg sweep`` (defined TensorFlow-free in
    :func:`tfqreg.cli_args.add_sweep_arguments`)."""
    from tfqreg import cli_args

    cli_args.add_sweep_arguments(parser)


def _load_model(path: str) -> keras.Model:
    """The model in ``path``, every tfqreg object registered; a file that only Keras 3 reads
    is loaded as a Keras 3 model (:func:`tfqreg.deploy.loading.load_model`)."""
    from tfqreg.deploy.loading import load_model

    return load_model(path)


def _check_cli(args) -> None:
    """Everything ``tfqreg sweep`` can check before loading and evaluating: raises ValueError
    with a one-line message naming the option."""
    import os

    if not os.path.exists(args.model):
        raise ValueError(f"MODEL {args.model!r} does not exist (a .keras / .h5 file or a "
                         "SavedModel folder).")
    if args.model.endswith(".tflite"):
        raise ValueError(f"MODEL {args.model!r} is a .tflite file; sweep takes the Keras model "
                         "(.keras, .h5 or SavedModel) it came from.")
    for b in args.bits:
        if not 2 <= b <= 16:
            raise ValueError(f"--bits {b}: each weight width must be in 2..16.")
    if args.activation_bits is not None and not 2 <= args.activation_bits <= 16:
        raise ValueError(f"--activation-bits {args.activation_bits}: must be in 2..16.")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: must be at least 1 (omit it for all images).")
    if args.calibration_samples < 1:
        raise ValueError(f"--calibration-samples {args.calibration_samples}: must be >= 1.")
    for flag, path in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if not path:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} is a folder; give a file name.")
        if not os.path.isdir(parent):
            raise ValueError(f"{flag} {path!r}: the folder {parent!r} does not exist.")
        if not os.access(parent, os.W_OK):
            raise ValueError(f"{flag} {path!r}: the folder {parent!r} is not writable.")
        if os.path.exists(path) and not args.overwrite:
            raise ValueError(f"{flag} {path!r} exists; pass --overwrite to replace it.")


def run_cli(args) -> int:
    """Run ``tfqreg sweep``: print the table and return 0; on bad input print one line to
    stderr and return 2 (checked before any work starts)."""
    import sys

    from tfqreg import datasets

    try:
        _check_cli(args)
        try:
            model = _load_model(args.model)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"could not load a Keras model from {args.model!r}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        (x, _), (xt, yt) = datasets.load_numpy(args.data, args.data_dir, args.tfds_dir)
        if args.limit:
            xt, yt = xt[: args.limit], yt[: args.limit]
        result = sweep(model, (xt, yt), weight_bits=tuple(args.bits),
                       activation_bits=args.activation_bits, per_channel=not args.per_tensor,
                       calibration_data=x[: args.calibration_samples])
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"tfqreg sweep: error: {e}", file=sys.stderr)
        return 2
    print(result)
    for path, write in ((args.json, result.to_json), (args.csv, result.to_csv),
                        (args.plot, result.plot)):
        if path:
            write(path)
            print(f"wrote {path}")
    return 0
