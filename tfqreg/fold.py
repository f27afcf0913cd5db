"""The one BatchNorm fold: the kernel the device quantizes (design.md, "One BatchNorm fold").

At inference a ``BatchNormalization`` is a per-channel scale and shift,

    BN(y) = s · (y − μ) + β,        s = γ / √(σ² + ε)         (moving mean μ, variance σ²)

When it directly follows a ``Dense``, ``Conv1D/2D/3D`` or ``DepthwiseConv2D`` whose own activation
is linear (the usual ``Conv(use_bias=False) → BN → ReLU``), the TFLite converter folds it into the
layer before quantizing anything:

    w' = w · s     (per output channel; a depthwise kernel ``(kh, kw, in, mult)`` has output channel
                    ``i·mult + m``, so ``s`` is reshaped to ``(in, mult)``)
    b' = (b − μ) · s + β

and fuses layer + BN + a following ReLU/ReLU6 into one op whose output (after the activation) is
the quantized tensor. So ``w'``, not ``w``, is the kernel that meets the integer grid. Per-channel
steps commute with the fold (each channel is scaled by one number); a per-tensor step does not:
the channel with the largest ``|w·s|`` sets the step for all.

This module computes the fold once, for every station:

- :func:`following_batchnorm` finds the BatchNorm that folds into a layer (or ``None``);
- :func:`batchnorm_scale` / :func:`fold_kernel` / :func:`folded_kernel` give ``s`` and ``w'`` as
  differentiable tensors (the regularizers and training terms use them, so their pull acts on
  ``w'``: gradients reach ``w`` and ``γ``; the moving variance is a statistic, not a parameter);
- :func:`find_folds` lists what folds and which BatchNorms cannot (they stay a float
  multiply-add in TFLite, quantized at their output), and why;
- :func:`fold_model` returns a new model in which every foldable BatchNorm is folded: the layer
  gets ``w'`` and ``b'`` (and a bias if it had none), the BatchNorm becomes an identity
  (``Activation("linear")`` named ``<bn>_folded``). Post-training quantization, the compression
  pipeline and the sub-8-bit export quantize this model's kernels.

>>> import numpy as np, tfqreg
>>> from tfqreg import fold
>>> from tfqreg._keras import keras
>>> model = keras.Sequential([keras.Input((8, 8, 3)),
...     keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
...     keras.layers.BatchNormalization(name="bn"), keras.layers.ReLU(name="relu")])
>>> fold.following_batchnorm(model.get_layer("conv")).name
'bn'
>>> folded = fold.fold_model(model)
>>> [layer.name for layer in folded.layers]
['conv', 'bn_folded', 'relu']
>>> x = np.random.rand(2, 8, 8, 3).astype("float32")
>>> bool(np.allclose(model(x), folded(x), atol=1e-5))
True
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np

from tfqreg._keras import check_keras2, is_keras3, keras, keras3_module, tf

__all__ = [
    "FoldPlan",
    "channel_axes",
    "consumers",
    "activation_name",
    "is_fused_activation",
    "foldable_layer_types",
    "following_batchnorm",
    "batchnorm_for_kernel",
    "batchnorm_scale",
    "batchnorm_shift",
    "fold_kernel",
    "folded_kernel",
    "find_folds",
    "fold_model",
]


def _keras_of(layer):
    """The Keras package ``layer`` belongs to: ``tf_keras``, or Keras 3 for a Keras 3 layer.
    The lookup below reads the layer graph of either (the regularizers run it on the layers of
    Keras 2 and Keras 3 models alike); model-level folding (:func:`fold_model`) is Keras 2."""
    return keras3_module() if is_keras3(layer) else keras


def foldable_layer_types(layers=None) -> tuple:
    """The layer classes a following BatchNorm folds into (TFLite ``FULLY_CONNECTED``,
    ``CONV_2D`` / ``CONV_3D``, ``DEPTHWISE_CONV_2D``), and the excluded subclasses: transposed
    and separable convolutions. ``layers``: a Keras ``layers`` namespace (default tf_keras')."""
    layers = keras.layers if layers is None else layers
    excluded = tuple(getattr(layers, n) for n in (
        "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose", "SeparableConv1D",
        "SeparableConv2D") if hasattr(layers, n))
    base = (layers.Dense, layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.DepthwiseConv2D)
    return base, excluded


def _is_foldable_type(layer) -> bool:
    base, excluded = foldable_layer_types(_keras_of(layer).layers)
    return isinstance(layer, base) and not isinstance(layer, excluded) and \
        getattr(layer, "kernel_quantizer", None) is None


def _is_depthwise(layer) -> bool:
    return isinstance(layer, _keras_of(layer).layers.DepthwiseConv2D)


def _kernel_of(layer):
    # Keras 2 names the depthwise kernel ``depthwise_kernel``, Keras 3 ``kernel``
    if _is_depthwise(layer) and not is_keras3(layer):
        return layer.depthwise_kernel
    return layer.kernel


def channel_axes(layer):
    """:func:`tfqreg.grid.channel_axes_for` for a layer of either Keras: the per-channel axes of
    its kernel (``(-1,)`` Dense/Conv, ``(2, 3)`` depthwise, ``(-2,)`` transposed), or ``None``."""
    from tfqreg import grid

    if not is_keras3(layer):
        return grid.channel_axes_for(layer)
    layers = _keras_of(layer).layers
    if isinstance(layer, layers.DepthwiseConv2D):
        return (2, 3)
    if isinstance(layer, (layers.Conv1DTranspose, layers.Conv2DTranspose,
                          layers.Conv3DTranspose)):
        return (-2,)
    if isinstance(layer, (layers.Conv1D, layers.Conv2D, layers.Conv3D, layers.Dense)):
        return (-1,)
    return None


def consumers(layer) -> List:
    """Layers that take ``layer``'s output, over all of its call sites (in Keras 3, its live
    call sites: see :func:`_live_nodes`)."""
    if is_keras3(layer):
        return [nxt.operation for node in _live_nodes(layer) for nxt in _next_nodes(node)]
    out = []
    for node in getattr(layer, "_outbound_nodes", None) or []:
        consumer = getattr(node, "outbound_layer", None)
        if consumer is not None:
            out.append(consumer)
    return out


# Keras 3 layer graphs. A Keras 3 Sequential model rebuilds its graph each time a layer is added
# (``Sequential.from_config``, i.e. every loaded model, adds them one by one) and the old graphs'
# nodes stay in each layer's ``_inbound_nodes``: a layer of a loaded 3-layer model has been
# "called" up to three times. Its live call is the last one (each rebuild appends); an earlier
# node counts as a second call (shared weights) only if it feeds the same end of the graph as
# the last one does (a stale graph ends elsewhere). Keras 3 has no public API for a layer's
# consumers: ``_inbound_nodes``/``_outbound_nodes`` and the nodes' public ``operation``,
# ``outputs`` and ``input_tensors`` are used, as tf_keras' ``_outbound_nodes`` is for Keras 2.

def _next_nodes(node) -> List:
    """The Keras 3 nodes that take an output of ``node`` as input."""
    outputs = [id(t) for t in node.outputs]
    return [nxt for nxt in getattr(node.operation, "_outbound_nodes", None) or []
            if any(id(t) in outputs for t in nxt.input_tensors)]


def _graph_ends(node) -> set:
    """``id``s of the nodes without successors reachable from ``node`` (itself if none)."""
    seen, stack, ends = set(), [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        successors = _next_nodes(n)
        if not successors:
            ends.add(id(n))
        stack.extend(successors)
    return ends


def _live_nodes(layer) -> List:
    """A Keras 3 layer's calls in its current graph (see above)."""
    nodes = list(getattr(layer, "_inbound_nodes", None) or [])
    if len(nodes) <= 1:
        return nodes
    ends = _graph_ends(nodes[-1])
    return [n for n in nodes[:-1] if _graph_ends(n) & ends] + [nodes[-1]]


def _calls(layer) -> int:
    """How many times ``layer`` is called in its model graph."""
    if is_keras3(layer):
        return len(_live_nodes(layer))
    return len(getattr(layer, "_inbound_nodes", []) or [])


def activation_name(layer) -> Optional[str]:
    """``"relu"``, ``"relu6"``, ``"linear"`` or another name for an activation layer or a
    layer's own activation; ``None`` for layers that have none (a ``ReLU`` with a slope, a
    threshold or a cap other than 6 is ``"relu_custom"``)."""
    k = _keras_of(layer)
    if isinstance(layer, k.layers.ReLU):
        mv = None if layer.max_value is None else float(layer.max_value)
        if float(layer.negative_slope) == 0 and float(layer.threshold) == 0 and mv in (None, 6.0):
            return "relu" if mv is None else "relu6"
        return "relu_custom"
    act = getattr(layer, "activation", None)
    if act is None:
        return None
    name = k.activations.serialize(act)
    return name if isinstance(name, str) else str(name)


FUSED_ACTIVATIONS = ("relu", "relu6", "linear")
"""The activations TFLite fuses into the op before them (its output is then the quantized
tensor)."""


def is_fused_activation(layer) -> bool:
    """Whether ``layer`` is an activation layer TFLite fuses into the op before it (ReLU,
    ReLU6, identity)."""
    layers = _keras_of(layer).layers
    return isinstance(layer, (layers.Activation, layers.ReLU)) and \
        activation_name(layer) in FUSED_ACTIVATIONS


def _why_not(layer, bn) -> Optional[str]:
    """Why ``bn`` (a consumer of ``layer``) does not fold into it; ``None`` if it folds."""
    if not _is_foldable_type(layer):
        return (f"it follows {type(layer).__name__} '{layer.name}', which is not a Dense, Conv "
                "or DepthwiseConv2D layer")
    k = _keras_of(layer)
    if layer.activation not in (k.activations.linear, None):
        return (f"'{layer.name}' applies its activation "
                f"'{k.activations.serialize(layer.activation)}' before the BatchNorm")
    if _calls(layer) > 1:
        return f"'{layer.name}' is called more than once (shared weights)"
    if len(consumers(layer)) != 1:
        return f"the output of '{layer.name}' also feeds other layers"
    if _calls(bn) > 1:
        return "the BatchNorm is called more than once"
    rank = _output_rank(layer)
    bn_axes = list(bn.axis) if isinstance(bn.axis, (list, tuple)) else [int(bn.axis)]
    axes = [a % rank for a in bn_axes] if rank else bn_axes
    if rank is None or axes != [rank - 1]:
        return f"it normalizes axis {bn_axes}, not the channel axis of '{layer.name}'"
    return None


def _output_rank(layer) -> Optional[int]:
    """The rank of ``layer``'s output in its model graph (``None`` if unknown)."""
    if not is_keras3(layer):
        return len(layer.output_shape) if hasattr(layer, "output_shape") else None
    nodes = _live_nodes(layer)
    return len(nodes[-1].outputs[0].shape) if nodes and nodes[-1].outputs else None


def following_batchnorm(layer) -> Optional[keras.layers.BatchNormalization]:
    """The BatchNormalization that the TFLite converter folds into ``layer``, or ``None``.

    It folds when ``layer`` is a Dense / Conv / DepthwiseConv2D with a linear activation, called
    once, whose only consumer is a BatchNormalization over the channel (last) axis. Works on the
    layers of built Sequential and Functional models (it reads the layer graph); layers of a
    subclassed model have no graph, so nothing folds there.
    """
    after = consumers(layer)
    if len(after) != 1 or not isinstance(after[0], _keras_of(layer).layers.BatchNormalization):
        return None
    bn = after[0]
    return bn if _why_not(layer, bn) is None else None


def batchnorm_for_kernel(layer, kernel) -> Optional[keras.layers.BatchNormalization]:
    """The BatchNorm that folds into ``kernel``: :func:`following_batchnorm` of ``layer`` when
    ``kernel`` is that layer's main kernel (``kernel`` / ``depthwise_kernel``), else ``None``
    (a bias, a wrapper's weight, another layer's kernel)."""
    if layer is None or isinstance(layer, _keras_of(layer).layers.Wrapper) or \
            not _is_foldable_type(layer):
        return None
    if _kernel_of(layer) is not kernel:
        return None
    return following_batchnorm(layer)


def batchnorm_scale(bn) -> tf.Tensor:
    """``s = γ / √(σ² + ε)`` per channel (float32), with the moving variance. Differentiable
    w.r.t. ``γ``; ``γ = 1`` when the BatchNorm has ``scale=False``."""
    var = tf.cast(bn.moving_variance, tf.float32)
    s = tf.math.rsqrt(var + bn.epsilon)
    if bn.gamma is not None:
        s = tf.cast(bn.gamma, tf.float32) * s
    return s


def batchnorm_shift(bn) -> tf.Tensor:
    """``β − μ·s`` per channel (float32): the offset of the folded BatchNorm."""
    shift = -tf.cast(bn.moving_mean, tf.float32) * batchnorm_scale(bn)
    if bn.beta is not None:
        shift = shift + tf.cast(bn.beta, tf.float32)
    return shift


def _per_channel_shape(layer, kernel_rank: int, channels: int) -> List[int]:
    """How a per-output-channel vector broadcasts onto ``layer``'s kernel."""
    if _is_depthwise(layer):
        shape = [1] * kernel_rank
        shape[-1] = int(layer.depth_multiplier)
        shape[-2] = channels // int(layer.depth_multiplier)
        return shape
    return [1] * (kernel_rank - 1) + [channels]


def fold_kernel(layer, kernel, scale) -> tf.Tensor:
    """``kernel · s`` with ``s`` (one value per output channel of ``layer``) broadcast the way
    the converter folds it. Computed in float32."""
    kernel = tf.cast(tf.convert_to_tensor(kernel), tf.float32)
    scale = tf.cast(tf.convert_to_tensor(scale), tf.float32)
    shape = _per_channel_shape(layer, kernel.shape.rank, int(scale.shape[0]))
    return kernel * tf.reshape(scale, shape)


def folded_kernel(layer, kernel=None) -> tf.Tensor:
    """The kernel the device quantizes: ``kernel · s`` when a BatchNorm folds into ``layer``,
    else ``kernel`` itself (cast to float32). ``kernel`` defaults to the layer's kernel."""
    kernel = _kernel_of(layer) if kernel is None else kernel
    bn = following_batchnorm(layer)
    if bn is None:
        return tf.cast(tf.convert_to_tensor(kernel), tf.float32)
    return fold_kernel(layer, kernel, batchnorm_scale(bn))


@dataclasses.dataclass
class FoldPlan:
    """Which BatchNorms fold into which layers, and which stay (with the reason).

    ``folds`` holds ``(layer name, batchnorm name)`` pairs; ``unfolded`` holds
    ``(batchnorm name, reason)`` pairs: those run in TFLite as a separate multiply-add whose
    output is quantized, and post-training quantization simulates them so."""

    folds: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    unfolded: List[Tuple[str, str]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return {"folds": [list(p) for p in self.folds],
                "unfolded": [list(p) for p in self.unfolded]}

    def __str__(self) -> str:
        lines = [f"BatchNorm folding: {len(self.folds)} folded, {len(self.unfolded)} not"]
        lines += [f"  {bn} -> folded into {layer}" for layer, bn in self.folds]
        lines += [f"  {bn} stays a float multiply-add: {why}" for bn, why in self.unfolded]
        return "\n".join(lines)


def _graph_layers(model) -> List:
    return list(model._flatten_layers(include_self=False, recursive=True))


def find_folds(model: keras.Model) -> FoldPlan:
    """The :class:`FoldPlan` of a built Keras 2 model (nested models included)."""
    check_keras2(model, "model", keras.Model)
    plan = FoldPlan()
    for layer in _graph_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        nodes = getattr(layer, "_inbound_nodes", None) or []
        producers = [p for node in nodes for p in tf.nest.flatten(node.inbound_layers)]
        if len(producers) != 1:
            plan.unfolded.append((layer.name, "it has no single producing layer (a subclassed "
                                              "model, or a model input)"))
            continue
        why = _why_not(producers[0], layer)
        if why is None and following_batchnorm(producers[0]) is layer:
            plan.folds.append((producers[0].name, layer.name))
        else:
            plan.unfolded.append((layer.name, why or "its input is not a foldable layer"))
    return plan


def _folded_clone(layer, bn):
    config = layer.get_config()
    config.update(use_bias=True, kernel_regularizer=None, bias_regularizer=None,
                  kernel_constraint=None, bias_constraint=None)
    return type(layer).from_config(config)


def fold_model(model: keras.Model) -> keras.Model:
    """A new model with every foldable BatchNorm folded into the layer before it.

    The input model is not modified. Folded layers carry ``w' = w·s`` and ``b' = (b − μ)·s + β``
    (their regularizers and constraints are dropped: the result is an inference model); each
    folded BatchNorm becomes ``Activation("linear", name="<bn>_folded")``, which TFLite drops.
    Everything else is cloned with its weights. Nested Sequential/Functional models are folded
    inside; a BatchNorm across a model boundary is not folded (see :func:`find_folds`).

    Raises:
        TypeError: not a Keras 2 Sequential or Functional model.
    """
    check_keras2(model, "model", keras.Model)
    if not isinstance(model, keras.Sequential) and not getattr(model, "_is_graph_network", False):
        raise TypeError(f"`model` must be a Sequential or Functional model, got a subclassed "
                        f"{type(model).__name__} (it has no layer graph to fold).")
    pairs = {}
    for layer in model.layers:
        bn = following_batchnorm(layer) if _is_foldable_type(layer) else None
        if bn is not None:
            pairs[id(layer)] = bn
    folded_bns = {id(bn) for bn in pairs.values()}
    originals = {}

    def clone(layer):
        if isinstance(layer, keras.Model) and (
                isinstance(layer, keras.Sequential) or getattr(layer, "_is_graph_network", False)):
            new = fold_model(layer)
        elif id(layer) in folded_bns:
            new = keras.layers.Activation("linear", name=f"{layer.name}_folded")
        elif id(layer) in pairs:
            new = _folded_clone(layer, pairs[id(layer)])
        else:
            new = type(layer).from_config(layer.get_config())
        originals[id(new)] = layer
        return new

    new_model = keras.models.clone_model(model, clone_function=clone)
    for new in new_model.layers:
        old = originals.get(id(new))
        if old is None or isinstance(old, keras.Model) or id(old) in folded_bns:
            continue
        if id(old) in pairs:
            bn = pairs[id(old)]
            scale = batchnorm_scale(bn)
            kernel = fold_kernel(old, _kernel_of(old), scale)
            bias = old.bias if old.use_bias else tf.zeros_like(scale)
            bias = (tf.cast(bias, tf.float32) - tf.cast(bn.moving_mean, tf.float32)) * scale
            if bn.beta is not None:
                bias = bias + tf.cast(bn.beta, tf.float32)
            _kernel_of(new).assign(tf.cast(kernel, _kernel_of(new).dtype))
            new.bias.assign(tf.cast(bias, new.bias.dtype))
        else:
            new.set_weights(old.get_weights())
    return new_model
