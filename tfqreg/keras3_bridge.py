"""Keras 3 models into tfqreg's PTQ and TFLite export: the verified Keras 2 mirror.

tfqreg's post-training quantization (:mod:`tfqreg.ptq`), BatchNorm folding (:mod:`tfqreg.fold`)
and TFLite export (:mod:`tfqreg.deploy`) are written once, on ``tf_keras`` (Keras 2) models.
A Keras 3 model (TensorFlow backend) reaches them through this thin adapter, not through a
second copy of that code:

1. :func:`to_keras2` walks the Keras 3 layer graph (Sequential or Functional, nested models
   included) and builds the same graph in ``tf_keras``: each layer is created from its Keras 3
   config, translated where the two differ (the dtype policy becomes its name; initializers,
   regularizers and constraints are dropped: the mirror is an inference model), and its
   weights are copied **by attribute** (``kernel``, ``bias``, ``gamma``, ``beta``,
   ``moving_mean``, ``moving_variance``, ``depthwise_kernel``, ``pointwise_kernel``,
   ``alpha``), never by position, so training-only weights a Keras 3 layer may carry (a
   regularizer's learnable margin, for instance) are not mistaken for inference weights.
2. It then **verifies** the mirror: both models run on sample inputs (yours, or 32 uniform
   inputs in [0, 1]) and the largest output difference must be at most
   ``rtol · max(1, max|y|)`` (default ``rtol = 1e-5``). When it is not, the error names the
   first layer whose output differs.
3. :func:`tfqreg.ptq.quantize`, :func:`tfqreg.ptq.sweep` and :func:`tfqreg.deploy.to_tflite`
   call :func:`to_keras2` when they are handed a Keras 3 model (``tfqreg._keras.is_keras3``)
   and run unchanged on the mirror. ``to_tflite`` checks the ``.tflite`` against the Keras 3
   model's own outputs (float and int8 modes; the 4- / 2-bit files against the simulated
   quantized model, which is built from the verified mirror).

What is refused, with the layer's name: layer types outside :data:`SUPPORTED_LAYERS` (and
subclasses of supported types, whose ``call`` may differ), activations that are not named
built-ins, non-float32 dtype policies, quantized (``quantization_config``) or renormalized
layers, layers called more than once (shared weights), subclassed models (they have no layer
graph to rebuild: build the model with the functional API), and a mirror whose outputs differ.

>>> import numpy as np
>>> import keras                       # Keras 3
>>> from tfqreg import keras3_bridge
>>> inputs = keras.Input((8, 8, 3))
>>> h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
>>> h = keras.layers.BatchNormalization()(h)
>>> outputs = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.ReLU()(h)))
>>> model = keras.Model(inputs, outputs)
>>> mirror = keras3_bridge.to_keras2(model)              # a tf_keras model, verified
>>> x = np.random.rand(4, 8, 8, 3).astype("float32")
>>> bool(np.allclose(mirror(x), model(x), atol=1e-6))
True
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

from tfqreg._keras import is_keras3, keras, keras3_module, tf

__all__ = ["SUPPORTED_LAYERS", "WEIGHT_ATTRIBUTES", "is_keras3_model", "to_keras2",
           "verify_mirror"]

SUPPORTED_LAYERS = (
    "InputLayer", "Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose",
    "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D", "BatchNormalization",
    "Activation", "ReLU", "LeakyReLU", "PReLU", "ELU", "Softmax",
    "MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalMaxPooling1D",
    "GlobalMaxPooling2D", "Flatten", "Reshape", "Permute", "Dropout", "SpatialDropout1D",
    "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "ZeroPadding1D", "ZeroPadding2D",
    "Cropping1D", "Cropping2D", "UpSampling1D", "UpSampling2D", "Add", "Subtract",
    "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Rescaling",
)
"""Keras 3 layer classes (by name, the exact class) that have a ``tf_keras`` twin computing
the same function at inference."""

WEIGHT_ATTRIBUTES = {
    # tf_keras attribute: the Keras 3 attributes that hold the same tensor, in order
    "kernel": ("kernel",),
    "depthwise_kernel": ("depthwise_kernel", "kernel"),  # Keras 3 DepthwiseConv2D: `kernel`
    "pointwise_kernel": ("pointwise_kernel",),
    "bias": ("bias",),
    "gamma": ("gamma",),
    "beta": ("beta",),
    "moving_mean": ("moving_mean",),
    "moving_variance": ("moving_variance",),
    "alpha": ("alpha",),
}
"""How each ``tf_keras`` weight is found on the Keras 3 layer (by attribute, not position)."""

_RENAMED = {"LeakyReLU": {"negative_slope": "alpha"}}
"""Config keys whose names differ: Keras 3 name -> tf_keras name, per layer class."""
_KERAS3_ONLY = {"ZeroPadding1D": {"data_format": "channels_last"},
                "Cropping1D": {"data_format": "channels_last"},
                "UpSampling1D": {"data_format": "channels_last"}}
"""Keras 3 config keys tf_keras lacks: dropped when they hold the value tf_keras implies."""
_VERIFY_SAMPLES = 32
_DROPPED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")


def _k3():
    k3 = keras3_module()
    if k3 is None:  # pragma: no cover - is_keras3 was true, so Keras 3 is installed
        raise ImportError("Keras 3 (`keras`) is not installed.")
    return k3


def is_keras3_model(obj) -> bool:
    """Whether ``obj`` is a Keras 3 model, including an instance of a user's subclass of
    ``keras.Model`` (whose class lives in the user's module)."""
    return is_keras3(obj)  # looks at the whole MRO: user subclasses count


def _is_sequential(model) -> bool:
    return isinstance(model, _k3().Sequential)


def _is_functional(model) -> bool:
    return isinstance(model, _k3().src.models.Functional) and not _is_sequential(model)


def _check_model(model, name: str) -> None:
    if not is_keras3_model(model):
        raise TypeError(f"`{name}` must be a Keras 3 Sequential or Functional model, got "
                        f"{type(model).__module__}.{type(model).__name__}.")
    if not (_is_sequential(model) or _is_functional(model)):
        raise TypeError(
            f"`{name}` is a subclassed Keras 3 model ({type(model).__name__}): its `call` is "
            "Python code, not a layer graph, so tfqreg cannot rebuild it faithfully for PTQ or "
            "TFLite export. Build it with keras.Sequential or the functional API "
            "(keras.Model(inputs, outputs)).")
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        inputs = None
    if not inputs:
        raise ValueError(f"`{name}` has no known input shape: build it on keras.Input(...) "
                         "(a Sequential model: start it with keras.Input(shape)).")


# ----------------------------------------------------------------------------- one layer
def _activation(value, layer_name: str, key: str):
    if value is None or isinstance(value, str):
        name = value or "linear"
    elif isinstance(value, dict) and value.get("module") == "keras.activations" and \
            isinstance(value.get("config"), str):
        name = value["config"]
    else:
        raise TypeError(f"layer '{layer_name}': `{key}` {value!r} is not a built-in activation "
                        "named by a string; tfqreg's Keras 3 bridge cannot translate it.")
    try:
        keras.activations.get(name)
    except ValueError:
        raise TypeError(f"layer '{layer_name}': activation {name!r} has no tf_keras "
                        "counterpart.") from None
    return name


def _translate_config(layer) -> Dict[str, Any]:
    """The ``tf_keras`` config of Keras 3 ``layer`` (raises naming the layer)."""
    name = layer.name
    try:
        config = dict(layer.get_config())
    except Exception as e:
        raise TypeError(f"layer '{name}' ({type(layer).__name__}) cannot report its config "
                        f"({type(e).__name__}: {e}); tfqreg's Keras 3 bridge needs it.") from None
    policy = getattr(getattr(layer, "dtype_policy", None), "name", "float32")
    if policy != "float32":
        raise TypeError(f"layer '{name}' has dtype policy {policy!r}: PTQ and TFLite export of "
                        "Keras 3 models need float32 layers.")
    config["dtype"] = "float32"
    if config.pop("quantization_config", None) is not None or \
            getattr(layer, "quantization_mode", None):
        raise TypeError(f"layer '{name}' is quantized by Keras 3 itself; export its float "
                        "model instead.")
    if config.get("renorm"):
        raise TypeError(f"layer '{name}' uses batch renormalization, which the bridge does "
                        "not translate.")
    for key in ("renorm", "renorm_clipping", "renorm_momentum"):
        config.pop(key, None)
    if config.pop("lora_rank", None):
        raise TypeError(f"layer '{name}' has LoRA enabled; merge it first.")
    config.pop("lora_alpha", None)
    for key in list(config):
        if key.endswith(_DROPPED_SUFFIXES) or key == "seed":
            config.pop(key)
        elif key == "activation":
            config[key] = _activation(config[key], name, key)
    for key, implied in _KERAS3_ONLY.get(type(layer).__name__, {}).items():
        if key in config and config.pop(key) != implied:
            raise TypeError(f"layer '{name}': `{key}` other than {implied!r} has no tf_keras "
                            "counterpart.")
    for old, new in _RENAMED.get(type(layer).__name__, {}).items():
        if old in config:
            config[new] = config.pop(old)
    return config


def _new_layer(layer):
    cls_name = type(layer).__name__
    k3_cls = getattr(_k3().layers, cls_name, None)
    if cls_name not in SUPPORTED_LAYERS or type(layer) is not k3_cls:
        raise TypeError(
            f"layer '{layer.name}' ({type(layer).__module__}.{cls_name}) is not supported by "
            "tfqreg's Keras 3 bridge (PTQ and TFLite export of Keras 3 models). Supported: "
            f"{', '.join(SUPPORTED_LAYERS)} (the exact Keras 3 classes, not subclasses) and "
            "nested Sequential / Functional models.")
    config = _translate_config(layer)
    try:
        return getattr(keras.layers, cls_name).from_config(config)
    except (TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise TypeError(f"layer '{layer.name}' ({cls_name}): its Keras 3 config does not "
                        f"translate to tf_keras ({first}).") from None


def _copy_weights(new, old) -> None:
    """Assign each weight of ``new`` (tf_keras, built) from the same attribute of ``old``."""
    for var in new.weights:
        attr = next((a for a in WEIGHT_ATTRIBUTES if getattr(new, a, None) is var), None)
        if attr is None:
            raise TypeError(f"layer '{old.name}': the tf_keras weight '{var.name}' has no known "
                            "attribute, so it cannot be copied by attribute.")
        source = None
        for k3_attr in WEIGHT_ATTRIBUTES[attr]:
            source = getattr(old, k3_attr, None)
            if source is not None:
                break
        if source is None:
            raise TypeError(f"layer '{old.name}': Keras 3 layer has no `{attr}` to copy.")
        value = np.asarray(source)
        if tuple(value.shape) != tuple(var.shape):
            raise ValueError(f"layer '{old.name}': `{attr}` has shape {value.shape} in Keras 3 "
                             f"but {tuple(var.shape)} in tf_keras.")
        var.assign(value.astype(var.dtype.as_numpy_dtype))


# ----------------------------------------------------------------------------- the graph
def _keras_input(tensor, name: Optional[str] = None):
    shape = tuple(tensor.shape)
    return keras.Input(shape=shape[1:], batch_size=shape[0], dtype=str(tensor.dtype),
                       name=name)


class _Builder:
    """Builds tf_keras layers for Keras 3 layers once each and calls them on mapped tensors."""

    def __init__(self):
        self.pairs: List[tuple] = []  # (keras 3 layer, tf_keras layer)
        self.copied: set = set()  # ids of tf_keras layers whose weights are assigned

    def call(self, layer, args, kwargs):
        if isinstance(layer, _k3().Model):
            _check_model(layer, f"nested model '{layer.name}'")
            new = _mirror(layer, self)
        else:
            new = _new_layer(layer)
            self.pairs.append((layer, new))
        return new(*args, **kwargs)


def _mirror_sequential(model, builder: _Builder):
    first = (getattr(model, "_layers", None) or [None])[0]
    name = first.name if isinstance(first, _k3().layers.InputLayer) else None
    new = keras.Sequential([_keras_input(model.inputs[0], name)], name=model.name)
    for layer in model.layers:
        if isinstance(layer, _k3().Model):
            _check_model(layer, f"nested model '{layer.name}'")
            new.add(_mirror(layer, builder))
            continue
        sub = _new_layer(layer)
        builder.pairs.append((layer, sub))
        new.add(sub)
    return new


def _mirror_functional(model, builder: _Builder):
    k3 = _k3()
    tensors: Dict[int, Any] = {}
    for t in model.inputs:
        tensors[id(t)] = _keras_input(t, t.name)
    seen = set()
    for depth in sorted(model._nodes_by_depth, reverse=True):
        for node in model._nodes_by_depth[depth]:
            layer = node.operation
            if isinstance(layer, k3.layers.InputLayer):
                continue
            if id(layer) in seen:
                raise TypeError(f"layer '{layer.name}' is called more than once (shared "
                                "weights); tfqreg's Keras 3 bridge supports each layer once.")
            seen.add(id(layer))
            missing = [t for t in node.input_tensors if id(t) not in tensors]
            if missing:  # pragma: no cover - Keras orders nodes by depth
                raise ValueError(f"layer '{layer.name}': input not built yet.")

            def lookup(x):
                return tensors[id(x)] if isinstance(x, k3.KerasTensor) else x

            args = tf.nest.map_structure(lookup, tuple(node.arguments.args))
            kwargs = tf.nest.map_structure(lookup, dict(node.arguments.kwargs))
            kwargs = {k: v for k, v in kwargs.items() if k != "training" and v is not None}
            outputs = builder.call(layer, args, kwargs)
            for t, out in zip(node.outputs, tf.nest.flatten(outputs)):
                tensors[id(t)] = out
    inputs = [tensors[id(t)] for t in model.inputs]
    outputs = [tensors[id(t)] for t in model.outputs]
    structure = model._outputs_struct if hasattr(model, "_outputs_struct") else None
    out = outputs[0] if len(outputs) == 1 and not isinstance(structure, (list, tuple)) \
        else outputs
    return keras.Model(inputs if len(inputs) > 1 else inputs[0], out, name=model.name)


def _mirror(model, builder: _Builder):
    new = _mirror_sequential(model, builder) if _is_sequential(model) \
        else _mirror_functional(model, builder)
    for old, sub in builder.pairs:
        if sub.built and id(sub) not in builder.copied:
            _copy_weights(sub, old)
            builder.copied.add(id(sub))
    return new


# ----------------------------------------------------------------------------- verification
def _inputs_for(mirror, sample) -> List[np.ndarray]:
    from tfqreg.deploy.samples import input_specs, sample_inputs, to_samples

    specs = input_specs(mirror)
    if sample is None:
        xs = sample_inputs(specs, None, None)
    else:
        xs = to_samples(sample, specs, "sample", _VERIFY_SAMPLES)
    return [a[:_VERIFY_SAMPLES] for a in xs]


def _outputs(model, xs) -> List[np.ndarray]:
    y = model(xs if len(xs) > 1 else xs[0], training=False)
    return [np.asarray(a, np.float64) for a in tf.nest.flatten(y)]


def _first_differing_layer(model, mirror, xs, rtol: float) -> Optional[str]:
    """Name of the first layer (in graph order) whose output differs, or ``None``."""
    k3 = _k3()
    try:
        names = [l.name for l in model.layers if not isinstance(l, k3.layers.InputLayer)]
        ins = model.inputs if len(model.inputs) > 1 else model.inputs[0]
        k3_probe = k3.Model(ins, [model.get_layer(n).output for n in names])
        k2_probe = keras.Model(mirror.inputs, [mirror.get_layer(n).output for n in names])
        a = _outputs(k3_probe, xs)
        b = _outputs(k2_probe, xs)
    except Exception:  # diagnosis is best effort; the mismatch itself is the error
        return None
    for name, u, v in zip(names, a, b):
        if u.shape != v.shape or np.max(np.abs(u - v)) > rtol * max(1.0, np.max(np.abs(u))):
            return name
    return None


def verify_mirror(model, mirror, sample=None, rtol: float = 1e-5) -> float:
    """Check that ``mirror`` (tf_keras) computes what Keras 3 ``model`` computes.

    Args:
        model: the Keras 3 model.
        mirror: its tf_keras mirror (:func:`to_keras2`).
        sample: inputs (any form :func:`tfqreg.deploy.samples.to_samples` takes: an array, a
            list / dict of arrays, a ``tf.data.Dataset`` or a generator of ``x`` or ``(x, y)``
            batches); the first 32 are used. ``None``: 32 inputs uniform in [0, 1] (seed 0).
        rtol: the largest allowed ``max|y_mirror − y|`` relative to ``max(1, max|y|)``.

    Returns:
        The largest absolute output difference seen.

    Raises:
        ValueError: the outputs differ (the message names the first layer that differs).
    """
    xs = _inputs_for(mirror, sample)
    want, got = _outputs(model, xs), _outputs(mirror, xs)
    worst = 0.0
    for w, g in zip(want, got):
        if w.shape != g.shape:
            raise ValueError(f"the tf_keras mirror of '{model.name}' returns shape {g.shape}, "
                             f"the Keras 3 model {w.shape}.")
        diff = float(np.max(np.abs(w - g))) if w.size else 0.0
        worst = max(worst, diff)
        if diff > rtol * max(1.0, float(np.max(np.abs(w))) if w.size else 1.0):
            layer = _first_differing_layer(model, mirror, xs, rtol)
            where = f" from layer '{layer}' on" if layer else ""
            raise ValueError(
                f"the tf_keras mirror of Keras 3 model '{model.name}' computes different outputs"
                f"{where} (max |difference| {diff:.3g}): that layer's Keras 3 and tf_keras "
                "versions disagree, so tfqreg refuses to quantize or export through it.")
    return worst


def to_keras2(model, sample=None, rtol: float = 1e-5, verify: bool = True):
    """The ``tf_keras`` (Keras 2) model that computes what Keras 3 ``model`` computes.

    Args:
        model: a built Keras 3 ``Sequential`` or Functional model (TensorFlow backend).
        sample: inputs for the verification (see :func:`verify_mirror`); ``None``: uniform
            random inputs in [0, 1].
        rtol: the verification's relative tolerance.
        verify: run the verification (leave on; off only when the caller verifies itself).

    Returns:
        A new ``tf_keras`` Sequential / Functional model with the same layer names, input
        names and inference weights; it is an inference model (no initializers, regularizers
        or constraints).

    Raises:
        TypeError: not a Keras 3 Sequential / Functional model, or a layer the bridge does not
            translate (named in the message).
        ValueError: the model has no input shape, or the mirror's outputs differ (the message
            names the first layer that differs).
    """
    _check_model(model, "model")
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not rtol > 0:
        raise ValueError(f"`rtol` must be a positive number, got {rtol!r}.")
    mirror = _mirror(model, _Builder())
    if verify:
        verify_mirror(model, mirror, sample, rtol)
    return mirror
