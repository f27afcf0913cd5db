"""The PTQ model: a folded clone of a float model whose kernels are re-assigned per bit width
and whose activation wrappers are re-calibrated, and :func:`quantize`, which returns it."""

from __future__ import annotations

import logging
from typing import List, Optional, Union

from tfqreg import fold, grid
from tfqreg._keras import keras, tf
from tfqreg.ptq._inputs import (_batches, _check_args, _check_flags, _input_shape,
                                _keras2_mirror, _verify_mirror)
from tfqreg.ptq.fakequant import (ActivationFakeQuant, _kernel_attr, _quantization_points,
                                  quantizable_layers)

__all__ = ["quantize"]


def _calibrates_on_float_kernels(weight_bits: Optional[int]) -> bool:
    """Whether the activation ranges for ``weight_bits``-bit weights are calibrated with the
    float kernels (``None`` or 8 and wider: what the TF converter does for an int8 file) or
    with the kernels on the grid (below 8 bits: ai-edge-quantizer calibrates the float file of
    :func:`quantize` ``(model, weight_bits)``, whose kernels are already on the grid). The two
    ranges differ by about one activation step, which is enough to move several percent of a
    layer's outputs by one step."""
    return weight_bits is None or weight_bits >= 8


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
        self.weight_config = (None, True, False)  # (bits, per_channel, narrow_range)
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
        self.weight_config = (bits, per_channel, narrow_range)
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
        """Ranges: min/max over ``data``, computed the way the converter that writes the file
        computes them (:func:`_calibrates_on_float_kernels`): with the float (folded) kernels
        for 8-bit and wider weights (the TF converter calibrates the float model, then
        quantizes it), with the kernels on the grid below 8 bits (ai-edge-quantizer
        calibrates the float file whose kernels tfqreg put on the grid); then fixed output
        grids where TFLite fixes them (softmax, sigmoid, tanh)."""
        weights = self.weight_config
        on_float = _calibrates_on_float_kernels(weights[0])
        if on_float and weights[0] is not None:
            self.set_weight_bits(None, *weights[1:])
        self.set_activation_mode("calibrate")
        for wrapper in self.wrappers:
            wrapper.reset_ranges()
        try:
            for x in _batches(data, self.model, "calibration_data", with_labels=False):
                self.predict(x)
        finally:
            if on_float and weights[0] is not None:
                self.set_weight_bits(*weights)
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
            (hundreds to a few thousand examples) are enough. The ranges are computed as the
            file's converter computes them: with the float kernels for ``weight_bits`` ≥ 8
            (the TF converter's int8 file), with the kernels on the grid below 8 bits
            (ai-edge-quantizer's INT4 / INT2 files).
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
        logging.getLogger("tfqreg.ptq").warning(
            "ptq.quantize: %d BatchNorm(s) cannot be folded and stay a float multiply-add "
            "whose output is quantized (as in TFLite): %s", len(ptq.plan.unfolded),
            "; ".join(f"{bn}: {why}" for bn, why in ptq.plan.unfolded))
    ptq.set_weight_bits(weight_bits, per_channel, narrow_range)
    if activation_bits is not None:
        ptq.calibrate(calibration_data, activation_bits)
    return ptq.model
