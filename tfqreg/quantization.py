"""n-bit quantization-aware training with TFMOT, on the tfqreg grid.

TFMOT's own ``quantize_model`` is 8-bit only. This module plugs tfqreg's grid
(:mod:`tfqreg.grid`) into TFMOT's extension points, so that "4 bits" in QAT means exactly the
grid that MSQE, PTQ and the compression pipeline use:

- :class:`WeightQuantizer`: symmetric n-bit weights, ``Q(w) = δ·clip(round(w/δ))`` with the
  default step ``δ = max|w| / (2^(n-1) − 1)`` recomputed from the current weights at every call
  (TFMOT's "last value" scheme), per output channel (Conv2D / Dense: last axis,
  DepthwiseConv2D: input channel × multiplier) or per tensor, narrow range optional. Gradient:
  straight-through (every weight is inside the range the step is derived from).
- :class:`ActivationQuantizer`: asymmetric n-bit activations on a calibrated ``[min, max]``
  range (always containing 0, TFLite's scheme, :func:`tfqreg.grid.fake_quant_activation`).
  While training, the range follows an exponential moving average of the batch ranges, like
  TFMOT's ``MovingAverageQuantizer``, except that the first training batch sets the range
  directly (TFMOT starts at ±6 and needs thousands of steps to forget it) and the default decay
  is 0.99 (TFMOT: 0.999).
- :class:`DenseQuantizeConfig`, :class:`Conv2DQuantizeConfig`,
  :class:`DepthwiseConv2DQuantizeConfig` (base :class:`LayerQuantizeConfig`): kernel → weight
  quantizer, post-activation output → activation quantizer.
- :func:`quantize_model`: annotate + ``quantize_apply`` with these configs.

What :func:`quantize_model` does with each layer:

- plain ``Dense``, ``Conv2D``, ``DepthwiseConv2D`` (exact classes; larq's ``Quant*`` subclasses
  are left alone, they quantize themselves): the n-bit configs above;
- weight-free layers whose output TFMOT's default scheme quantizes (``GlobalAveragePooling2D``,
  ``AveragePooling2D``, ``Add``, ``Concatenate``, ``ReLU``, ...): :class:`OutputQuantizeConfig`, the
  output quantized to ``activation_bits`` with the calibrated range above;
- other layers TFMOT's default 8-bit scheme supports (``MaxPooling2D``, ``Flatten``,
  ``BatchNormalization``, ...): TFMOT's default 8-bit handling (pass-through for most,
  8-bit for the rest), when ``activation_bits`` is given;
- everything else: left unannotated (runs in float).

BatchNorm, as TFMOT's default 8-bit scheme places its quantizers for Conv + BatchNorm (+ ReLU):
when a BatchNorm folds into a Dense / Conv2D / DepthwiseConv2D (:mod:`tfqreg.fold`), the layer's
output is NOT quantized (that tensor does not exist on the device), the BatchNorm runs in float
and the tensor after the fused op is quantized: the output of a following ReLU / ReLU6 layer, or
the BatchNorm's own output otherwise. Like TFMOT's default scheme, QAT does not fold the
BatchNorm into the kernel during training: the weight quantizer sees the raw kernel. With
per-channel steps (the default) that is exactly the folded kernel's grid (each channel is
scaled by one number); with ``per_channel=False`` it is not (the converter quantizes
``w·γ/√(σ²+ε)`` with one step), so per-tensor QAT of a BatchNorm model trains for a grid the
device does not use: use per-channel steps there, or evaluate with :func:`tfqreg.ptq.sweep`.

TFMOT adds its own 8-bit input quantizer (``QuantizeLayer``) in front of the first quantized
layer. Regularizers on the original layers (``kernel_regularizer=``) keep acting on the float
(latent) kernels and stay in ``model.losses``.

>>> import tfqreg
>>> from tfqreg import models, quantization
>>> qat = quantization.quantize_model(models.tiny_cnn(), weight_bits=4, activation_bits=8)
>>> qat.compile("adam", "sparse_categorical_crossentropy")   # then fit as usual
>>> with quantization.quantize_scope():                     # to load a saved QAT model
...     pass                                                # keras.models.load_model(path)

Save/load: everything here is registered under ``"tfqreg"``; TFMOT's wrapper layers need
``tfmot.quantization.keras.quantize_scope()`` (or :func:`quantize_scope`) at load time. Save QAT
models as ``.h5`` or SavedModel: TFMOT 0.8.1's ``QuantizeLayer`` / ``QuantizeWrapperV2`` do not
load from the ``.keras`` format (variable count mismatch, TFMOT's own ``quantize_model`` fails
the same way); PTQ models (:mod:`tfqreg.ptq`) and larq models save in all three formats.

TFLite: an 8-bit model from :func:`quantize_model` converts to a full-integer TFLite model
(``converter.optimizations = [tf.lite.Optimize.DEFAULT]``). Below 8 bits see
:data:`TFLITE_LOW_BIT_NOTE`.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Tuple

import tensorflow_model_optimization as tfmot

from tfqreg import fold, grid
from tfqreg._keras import check_keras2, keras, register, tf

__all__ = [
    "WeightQuantizer",
    "ActivationQuantizer",
    "LayerQuantizeConfig",
    "DenseQuantizeConfig",
    "Conv2DQuantizeConfig",
    "DepthwiseConv2DQuantizeConfig",
    "OutputQuantizeConfig",
    "config_for",
    "quantize_model",
    "quantize_scope",
    "custom_objects",
    "TFLITE_LOW_BIT_NOTE",
]

_tfmot_q = tfmot.quantization.keras

TFLITE_LOW_BIT_NOTE = (
    "TFLite's integer kernels compute on int8 tensors (int16 activations in the 16x8 mode). An "
    "n-bit model from quantize_model converts to int8: its kernels, already on the n-bit grid "
    "and constant-folded, are re-quantized per channel with scale max|w|/127, so each channel "
    "holds at most 2^n distinct int8 values but takes 8 bits per weight and runs at int8 speed. "
    "The flatbuffer schema has INT4/INT2 tensor types and the converter an experimental "
    "`_experimental_low_bit_qat` flag (it reads num_bits from FakeQuant ops), but the Keras QAT "
    "path here does not produce int4 tensors; sub-8-bit storage savings come from entropy "
    "coding the indices (tfqreg.compression)."
)
"""What TFLite can represent below 8 bits (see the module docstring)."""


# ----------------------------------------------------------------------------- argument checks
def _check_args(
    weight_bits=None,
    activation_bits=None,
    per_channel=None,
    narrow_range=None,
    ema_decay=None,
    weight_bits_required: bool = True,
):
    """The one argument check of this module; raises naming the argument."""
    if weight_bits is None and weight_bits_required:
        grid.check_bits(weight_bits, low=2, high=16, name="weight_bits")  # raises: required
    grid.check_quant_args(weight_bits, activation_bits, per_channel, narrow_range)
    if ema_decay is not None and not (0.0 <= float(ema_decay) < 1.0):
        raise ValueError(f"`ema_decay` must be in [0, 1), got {ema_decay}.")


# ----------------------------------------------------------------------------- quantizers
class _EqualByConfig:
    """Equal when of the same class with the same ``get_config()`` (TFMOT compares configs and
    quantizers with ``==`` when it clones a model); unhashable, as mutable Keras objects are."""

    def __eq__(self, other):
        return type(other) is type(self) and other.get_config() == self.get_config()

    def __ne__(self, other):
        return not self == other

    __hash__ = None


@register
class WeightQuantizer(_EqualByConfig, _tfmot_q.quantizers.Quantizer):
    """Symmetric n-bit weight quantizer on the tfqreg grid (a TFMOT ``Quantizer``).

    Forward ``Q(w) = δ·clip(round(w/δ), q_min, q_max)`` with ``δ`` = :func:`grid.default_step`
    of the current weights; backward: straight-through (identity). No state.

    Args:
        bits: weight bit width, 2..16.
        per_channel: one step per output channel (``channel_axes``) instead of per tensor.
        narrow_range: use ``q_min = −(2^(n−1) − 1)``. With the default step the indices never
            reach ``−2^(n−1)``, so this changes nothing numerically; it is passed on to the grid.
        channel_axes: the axes that keep their own step when ``per_channel``: ``(-1,)`` for
            Dense/Conv kernels, ``(2, 3)`` for DepthwiseConv2D kernels.
    """

    def __init__(self, bits: int = 4, per_channel: bool = True, narrow_range: bool = False,
                 channel_axes: Sequence[int] = (-1,)):
        _check_args(weight_bits=bits, per_channel=per_channel, narrow_range=narrow_range)
        self.bits = int(bits)
        self.per_channel = per_channel
        self.narrow_range = narrow_range
        self.channel_axes = tuple(int(a) for a in channel_axes)

    def build(self, tensor_shape, name, layer):
        return {}

    def step(self, w) -> tf.Tensor:
        """The step δ used for ``w`` (scalar, or per channel with kept dims)."""
        axes = self.channel_axes if self.per_channel else None
        return grid.default_step(w, self.bits, axes, self.narrow_range)

    def __call__(self, inputs, training, weights, **kwargs):
        step = tf.stop_gradient(self.step(inputs))
        q = grid.fake_quant(inputs, step, self.bits, self.narrow_range)
        # Straight-through. The step is derived from these weights, so every weight lies inside
        # the grid's range and the clipped STE is the identity gradient; written out here because
        # ``grid.fake_quant_ste``'s range test ``w <= δ·q_max`` fails in float32 for the arg-max
        # weight when δ·q_max rounds just below max|w| (it would get a zero gradient).
        return inputs + tf.stop_gradient(q - inputs)

    def get_config(self):
        return {"bits": self.bits, "per_channel": self.per_channel,
                "narrow_range": self.narrow_range, "channel_axes": list(self.channel_axes)}


@register
class ActivationQuantizer(_EqualByConfig, _tfmot_q.quantizers.Quantizer):
    """Asymmetric n-bit activation quantizer with a moving calibrated range (TFMOT ``Quantizer``).

    Creates two non-trainable weights ``{name}_min`` / ``{name}_max`` and a flag
    ``{name}_calibrated`` on the layer. In training, the first batch sets ``[min, max]`` to its
    own range (widened to contain 0); later batches move it by an exponential moving average with
    ``ema_decay`` (TFMOT's ``MovingAverageQuantizer`` scheme). In inference the stored range is
    used. Values are fake-quantized with :func:`grid.fake_quant_activation` (TFLite's nudged
    asymmetric scheme, clipped straight-through gradient).

    Args:
        bits: activation bit width, 2..16.
        narrow_range: use ``[1, 2^n − 1]`` instead of ``[0, 2^n − 1]``.
        ema_decay: decay of the moving range (0.99; TFMOT uses 0.999, which after a first-batch
            start follows the growing activations of early training too slowly).
    """

    def __init__(self, bits: int = 8, narrow_range: bool = False, ema_decay: float = 0.99):
        _check_args(weight_bits=None, activation_bits=bits, narrow_range=narrow_range,
                    ema_decay=ema_decay, weight_bits_required=False)
        self.bits = int(bits)
        self.narrow_range = narrow_range
        self.ema_decay = float(ema_decay)

    def build(self, tensor_shape, name, layer):
        def add(suffix, value):
            return layer.add_weight(
                f"{name}_{suffix}", shape=(), initializer=keras.initializers.Constant(value),
                trainable=False)

        return {"min_var": add("min", -6.0), "max_var": add("max", 6.0),
                "calibrated": add("calibrated", 0.0)}

    def __call__(self, inputs, training, weights, **kwargs):
        x_min, x_max = weights["min_var"], weights["max_var"]
        if training:
            batch_min = tf.minimum(tf.reduce_min(inputs), 0.0)
            batch_max = tf.maximum(tf.reduce_max(inputs), 0.0)
            flag = weights["calibrated"]
            # decay 0 on the first batch: the range *is* the first batch's range.
            decay = tf.where(flag > 0.5, self.ema_decay, 0.0)
            ema = tf.__internal__.train.assign_moving_average
            with tf.control_dependencies([ema(flag, 1.0, 0.0, zero_debias=False)]):
                x_min = ema(x_min, batch_min, decay, zero_debias=False)
                x_max = ema(x_max, batch_max, decay, zero_debias=False)
        return grid.fake_quant_activation(inputs, x_min, x_max, self.bits, self.narrow_range)

    def get_config(self):
        return {"bits": self.bits, "narrow_range": self.narrow_range,
                "ema_decay": self.ema_decay}


# ----------------------------------------------------------------------------- quantize configs
class LayerQuantizeConfig(_EqualByConfig, _tfmot_q.QuantizeConfig):
    """Base of the tfqreg n-bit ``QuantizeConfig``s: kernel → :class:`WeightQuantizer`,
    post-activation output → :class:`ActivationQuantizer` (none if ``activation_bits=None``).

    Subclasses set ``weight_attrs`` (the layer attributes holding the kernels) and
    ``channel_axes`` (the kernels' output-channel axes). A complete example for a layer type
    tfqreg does not cover, e.g. ``Conv1D``, used through TFMOT's annotate/apply API:

    .. code-block:: python

        import tfqreg
        import tensorflow_model_optimization as tfmot
        from tfqreg._keras import keras
        from tfqreg.quantization import LayerQuantizeConfig, quantize_scope

        @keras.utils.register_keras_serializable(package="my_project")
        class Conv1DQuantizeConfig(LayerQuantizeConfig):
            weight_attrs = ("kernel",)
            channel_axes = (-1,)

        annotate = tfmot.quantization.keras.quantize_annotate_layer
        model = keras.Sequential([
            keras.layers.InputLayer((64, 3)),
            annotate(keras.layers.Conv1D(8, 3, activation="relu"),
                     Conv1DQuantizeConfig(weight_bits=4, activation_bits=8)),
            keras.layers.GlobalAveragePooling1D(),
            annotate(keras.layers.Dense(2),
                     tfqreg.quantization.DenseQuantizeConfig(weight_bits=4)),
        ])
        with quantize_scope({"Conv1DQuantizeConfig": Conv1DQuantizeConfig}):
            qat = tfmot.quantization.keras.quantize_apply(model)
        qat.compile("adam", "mse")   # 4-bit weights, 8-bit activations while training

    Args:
        weight_bits: weight bit width, 2..16.
        activation_bits: output bit width, 2..16, or ``None`` to leave outputs in float.
        per_channel: one weight step per output channel (default) instead of per tensor.
        narrow_range: symmetric weight range ``±(2^(n−1) − 1)``.
    """

    weight_attrs: Tuple[str, ...] = ()
    channel_axes: Tuple[int, ...] = (-1,)

    def __init__(self, weight_bits: int = 4, activation_bits: Optional[int] = 8,
                 per_channel: bool = True, narrow_range: bool = False):
        _check_args(weight_bits, activation_bits, per_channel, narrow_range)
        if not self.weight_attrs:
            raise TypeError(f"{type(self).__name__} must define `weight_attrs`.")
        self.weight_bits = int(weight_bits)
        self.activation_bits = None if activation_bits is None else int(activation_bits)
        self.per_channel = per_channel
        self.narrow_range = narrow_range

    def weight_quantizer(self) -> WeightQuantizer:
        return WeightQuantizer(self.weight_bits, self.per_channel, self.narrow_range,
                               self.channel_axes)

    def activation_quantizer(self) -> Optional[ActivationQuantizer]:
        if self.activation_bits is None:
            return None
        return ActivationQuantizer(self.activation_bits)

    def get_weights_and_quantizers(self, layer):
        return [(getattr(layer, attr), self.weight_quantizer()) for attr in self.weight_attrs]

    def get_activations_and_quantizers(self, layer):
        quantizer = self.activation_quantizer()
        return [] if quantizer is None else [(layer.activation, quantizer)]

    def set_quantize_weights(self, layer, quantize_weights):
        if len(quantize_weights) != len(self.weight_attrs):
            raise ValueError(
                f"`quantize_weights`: layer {layer.name} expects {len(self.weight_attrs)} "
                f"tensors ({self.weight_attrs}), got {len(quantize_weights)}.")
        for attr, weight in zip(self.weight_attrs, quantize_weights):
            setattr(layer, attr, weight)

    def set_quantize_activations(self, layer, quantize_activations):
        if self.activation_bits is not None:
            layer.activation = quantize_activations[0]

    def get_output_quantizers(self, layer):
        return []

    def get_config(self):
        return {"weight_bits": self.weight_bits, "activation_bits": self.activation_bits,
                "per_channel": self.per_channel, "narrow_range": self.narrow_range}


@register
class DenseQuantizeConfig(LayerQuantizeConfig):
    """n-bit ``QuantizeConfig`` for ``Dense`` (kernel per output unit when per-channel)."""

    weight_attrs = ("kernel",)
    channel_axes = (-1,)


@register
class Conv2DQuantizeConfig(LayerQuantizeConfig):
    """n-bit ``QuantizeConfig`` for ``Conv2D`` (kernel per output filter when per-channel)."""

    weight_attrs = ("kernel",)
    channel_axes = (-1,)


@register
class DepthwiseConv2DQuantizeConfig(LayerQuantizeConfig):
    """n-bit ``QuantizeConfig`` for ``DepthwiseConv2D`` (per input channel × multiplier, the
    output channels of a depthwise convolution, as TFLite quantizes it)."""

    weight_attrs = ("depthwise_kernel",)
    channel_axes = (2, 3)


@register
class OutputQuantizeConfig(_EqualByConfig, _tfmot_q.QuantizeConfig):
    """Quantizes only a layer's output with an :class:`ActivationQuantizer` (no weights).

    :func:`quantize_model` uses it instead of TFMOT's default 8-bit config for the weight-free
    layers whose output TFMOT quantizes (``GlobalAveragePooling2D``, ``Add``, ``Concatenate``,
    ...), so their outputs get ``activation_bits`` and a range calibrated from the first batch
    (TFMOT's starts at ±6 and moves by 0.1% a step: after a short training an 8-bit average
    pooling output would be quantized with a step of ~0.05).

    Args:
        activation_bits: output bit width, 2..16.
    """

    def __init__(self, activation_bits: int = 8):
        _check_args(activation_bits=activation_bits, weight_bits_required=False)
        self.activation_bits = int(activation_bits)

    def get_weights_and_quantizers(self, layer):
        return []

    def get_activations_and_quantizers(self, layer):
        return []

    def set_quantize_weights(self, layer, quantize_weights):
        pass

    def set_quantize_activations(self, layer, quantize_activations):
        pass

    def get_output_quantizers(self, layer):
        return [ActivationQuantizer(self.activation_bits)]

    def get_config(self):
        return {"activation_bits": self.activation_bits}


def _output_only(registry, layer) -> bool:
    """TFMOT's default config for ``layer`` quantizes only its output."""
    try:
        config = registry.get_quantize_config(layer)
    except (KeyError, ValueError):
        return False
    return (getattr(config, "quantize_output", False) and not getattr(config, "weight_attrs", 1)
            and not getattr(config, "activation_attrs", 1))


_CONFIGS = (
    (keras.layers.DepthwiseConv2D, DepthwiseConv2DQuantizeConfig),
    (keras.layers.Conv2D, Conv2DQuantizeConfig),
    (keras.layers.Dense, DenseQuantizeConfig),
)


def config_for(layer, weight_bits: int = 4, activation_bits: Optional[int] = 8,
               per_channel: bool = True, narrow_range: bool = False):
    """The tfqreg ``QuantizeConfig`` for ``layer``, or ``None`` if tfqreg has none for it.

    Only the exact classes ``Dense``, ``Conv2D`` and ``DepthwiseConv2D`` match (subclasses such
    as larq's ``QuantConv2D`` carry their own quantizers and are left alone).
    """
    for cls, config in _CONFIGS:
        if type(layer) is cls:
            return config(weight_bits, activation_bits, per_channel, narrow_range)
    return None


def custom_objects() -> dict:
    """Every class of this module by its plain name, for ``custom_object_scope``."""
    return {c.__name__: c for c in (WeightQuantizer, ActivationQuantizer, DenseQuantizeConfig,
                                    Conv2DQuantizeConfig, DepthwiseConv2DQuantizeConfig,
                                    OutputQuantizeConfig)}


@contextlib.contextmanager
def quantize_scope(extra: Optional[dict] = None):
    """TFMOT's ``quantize_scope`` with the tfqreg classes (and ``extra``) added: use it to load
    a model from :func:`quantize_model` with ``keras.models.load_model``."""
    with _tfmot_q.quantize_scope({**custom_objects(), **(extra or {})}):
        yield


def quantize_model(model: keras.Model, weight_bits: int = 4, activation_bits: Optional[int] = 8,
                   per_channel: bool = True, narrow_range: bool = False) -> keras.Model:
    """Quantization-aware version of ``model`` with n-bit weights and activations.

    Annotates Dense / Conv2D / DepthwiseConv2D with the tfqreg configs, other layers TFMOT
    supports with TFMOT's default 8-bit configs (only when ``activation_bits`` is given), and
    applies the annotation with ``tfmot.quantization.keras.quantize_apply``. The input model is
    not modified; its weights are copied.

    Args:
        model: a Sequential or Functional Keras 2 model.
        weight_bits: weight bit width, 2..16.
        activation_bits: activation bit width, 2..16, or ``None`` for weight-only QAT.
        per_channel: per-output-channel weight steps (default) or one per tensor.
        narrow_range: symmetric weight range ``±(2^(n−1) − 1)``.

    Returns:
        A new Keras model with TFMOT ``QuantizeWrapperV2`` layers.

    Raises:
        TypeError: ``model`` is not a Keras 2 model, or a subclassed model (not clonable).
        ValueError: a bit width is out of range, or the model has no Dense/Conv2D/
            DepthwiseConv2D layer.
    """
    check_keras2(model, "model", keras.Model)
    _check_args(weight_bits, activation_bits, per_channel, narrow_range)
    if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        raise TypeError("`model` must be a Sequential or Functional model; subclassed models "
                        f"cannot be cloned and annotated ({type(model).__name__}).")
    if not any(config_for(layer) is not None for layer in model.submodules
               if isinstance(layer, keras.layers.Layer)):
        raise ValueError("`model` has no Dense, Conv2D or DepthwiseConv2D layer to quantize.")

    registry = _tfmot_q.default_8bit.Default8BitQuantizeRegistry()
    annotate = _tfmot_q.quantize_annotate_layer

    folded_bns = {}
    for layer in model.submodules:
        bn = fold.following_batchnorm(layer) if isinstance(layer, keras.layers.Layer) else None
        if bn is not None:
            folded_bns[id(bn)] = layer

    def fused_activation_follows(bn) -> bool:
        after = fold.consumers(bn)
        return len(after) == 1 and fold.is_fused_activation(after[0])

    def clone(layer):
        fresh = layer.__class__.from_config(layer.get_config())
        folds = fold.following_batchnorm(layer) is not None
        config = config_for(layer, weight_bits, None if folds else activation_bits,
                            per_channel, narrow_range)
        if config is not None:
            return annotate(fresh, quantize_config=config)
        if id(layer) in folded_bns and activation_bits is not None:
            if fused_activation_follows(layer):
                return fresh  # float; the activation after it is quantized
            return annotate(fresh, quantize_config=OutputQuantizeConfig(activation_bits))
        if activation_bits is not None and registry.supports(layer):
            if _output_only(registry, layer):
                return annotate(fresh, quantize_config=OutputQuantizeConfig(activation_bits))
            return annotate(fresh)
        return fresh

    with quantize_scope():
        annotated = keras.models.clone_model(model, clone_function=clone)
        annotated.set_weights(model.get_weights())
        return _tfmot_q.quantize_apply(annotated)
