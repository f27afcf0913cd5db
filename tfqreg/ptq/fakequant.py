"""What the device quantizes: the layers whose kernels PTQ puts on the grid, the wrapper that
fake-quantizes an activation on a calibrated range (:class:`ActivationFakeQuant`), and where
TFLite quantizes a tensor (the output of each fused op, never between a layer and its folded
BatchNorm or fused ReLU)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from tfqreg import fold, grid
from tfqreg._keras import check_keras2, keras, register, tf

__all__ = ["ActivationFakeQuant", "quantizable_layers"]


def separable_types():
    names = ("SeparableConv1D", "SeparableConv2D")
    return tuple(getattr(keras.layers, n) for n in names if hasattr(keras.layers, n))


def _kernel_attr(layer) -> str:
    return "depthwise_kernel" if isinstance(layer, keras.layers.DepthwiseConv2D) else "kernel"


def _is_quantizable(layer) -> bool:
    if isinstance(layer, separable_types()) or grid.channel_axes_for(layer) is None:
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
        grid.check_quant_args(None, bits, None, narrow_range)
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
