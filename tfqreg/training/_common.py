"""What the training terms share: argument checks, finding the kernels a term acts on (and
the BatchNorm folded into them), and the base class of the terms.

Keras 2 and Keras 3 models (TensorFlow backend) go through the same functions: the layer
types, wrappers and model checks below accept both (:func:`keras_of` says which Keras a model
belongs to), and a term attached to a Keras 3 model keeps its learnable state in Keras 3
variables (:meth:`_Term._add_state`), so the Keras 3 optimizer trains them and ``.keras`` saves
them; the term's math never changes."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from tfqreg import _checks, fold, grid
from tfqreg._keras import check_keras2, is_keras3, keras, keras3_module, tf

REDUCTIONS = ("sum", "mean", "step")
_MAX_STRENGTH = 1e6  # larger strengths overflow the penalty's gradient in float32
METHODS = ("exact", "finite_difference")
_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")

# ---------------------------------------------------------------------------------------------
# Argument checks (one helper; every message names the argument)
# ---------------------------------------------------------------------------------------------


def _check(cls_name: str, **kwargs):
    """Validate constructor arguments of the terms; raise ValueError/TypeError naming them."""
    def number(name, value):
        return _checks.check_real(name, value, owner=cls_name)

    out = {}
    for name, value in kwargs.items():
        if name in ("lambda_w", "lambda_a"):
            value = number(name, value)
            if not 0 <= value <= _MAX_STRENGTH:
                raise ValueError(f"{cls_name}: `{name}` must be in [0, {_MAX_STRENGTH:g}], got "
                                 f"{value}.")
        elif name == "beta":
            value = number(name, value)
            if not 0 < value <= _MAX_STRENGTH:
                raise ValueError(f"{cls_name}: `beta` must be in (0, {_MAX_STRENGTH:g}], got "
                                 f"{value}.")
        elif name in ("alpha_init", "alpha_max"):
            value = number(name, value)
        elif name == "fraction":
            value = number(name, value)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{cls_name}: `fraction` must be in (0, 1), got {value}.")
        elif name == "bits":
            value = grid.check_bits(value, name="bits")
        elif name in ("start_step", "start_epoch"):
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise TypeError(f"{cls_name}: `{name}` must be an integer, got {value!r}.")
                if value < 0:
                    raise ValueError(f"{cls_name}: `{name}` must be >= 0, got {value}.")
                value = int(value)
        elif name in ("layers", "activations"):
            if value is not None:
                if isinstance(value, str):
                    value = [value]
                if not isinstance(value, (list, tuple)):
                    raise TypeError(f"{cls_name}: `{name}` must be a list of layer names, got "
                                    f"{value!r} ({type(value).__name__}).")
                value = list(value)
                bad = [v for v in value if not isinstance(v, str)]
                if bad:
                    raise TypeError(f"{cls_name}: `{name}` must be layer names (str), got {bad!r}.")
                if not value:
                    raise ValueError(f"{cls_name}: `{name}` is empty; use None for the default.")
        elif name == "reduction":
            if value not in REDUCTIONS:
                raise ValueError(f"{cls_name}: `reduction` must be one of {list(REDUCTIONS)}, "
                                 f"got {value!r}.")
        elif name == "method":
            if value not in METHODS:
                raise ValueError(f"{cls_name}: `method` must be one of {list(METHODS)}, got "
                                 f"{value!r}.")
        elif name == "every":
            value = _checks.check_int("every", value, low=1, high=10_000, owner=cls_name)
        elif name == "epsilon":
            value = number(name, value)
            if not 0.0 < value <= 0.5:
                raise ValueError(f"{cls_name}: `epsilon` must be in (0, 0.5], got {value}.")
        out[name] = value
    if "alpha_init" in out and "alpha_max" in out and out["alpha_init"] > out["alpha_max"]:
        raise ValueError(
            f"{cls_name}: `alpha_init` ({out['alpha_init']}) must be <= `alpha_max` "
            f"({out['alpha_max']})."
        )
    if "alpha_init" in out and out["alpha_init"] < -80:
        raise ValueError(f"{cls_name}: `alpha_init` must be >= -80 (e^α underflows to 0), got "
                         f"{out['alpha_init']}.")
    if "alpha_max" in out and out["alpha_max"] > 80:
        raise ValueError(f"{cls_name}: `alpha_max` must be <= 80 (e^α overflows), got "
                         f"{out['alpha_max']}.")
    return out


# ---------------------------------------------------------------------------------------------
# Finding kernels and layers
# ---------------------------------------------------------------------------------------------


_KERNEL_LAYERS = ("Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D",
                  "SeparableConv1D", "SeparableConv2D", "Conv1DTranspose", "Conv2DTranspose",
                  "Conv3DTranspose")


def _is_keras3(obj) -> bool:
    """:func:`tfqreg._keras.is_keras3` (which also sees a user's ``class Net(keras.Model)`` and
    the Keras 3 TrainingModel: it looks at the whole MRO)."""
    return is_keras3(obj)


def keras_of(obj):
    """The Keras package ``obj`` belongs to: Keras 3 (``keras``) for a Keras 3 object, else
    Keras 2 (``tf_keras``)."""
    return keras3_module() if _is_keras3(obj) else keras


def _layer_types(names: Sequence[str]) -> tuple:
    """The classes called ``names`` in Keras 2 and, when installed, Keras 3."""
    modules = [keras] + [m for m in (keras3_module(),) if m is not None]
    return tuple(getattr(m.layers, n) for m in modules for n in names if hasattr(m.layers, n))


def _kernel_layer_types():
    return _layer_types(_KERNEL_LAYERS)


def _wrapper_types() -> tuple:
    return _layer_types(("Wrapper",))


def _unwrap(layer):
    """The layer a (TFMOT / Keras) wrapper wraps, recursively; the layer itself otherwise."""
    wrappers = _wrapper_types()
    while isinstance(layer, wrappers) and hasattr(layer, "layer"):
        layer = layer.layer
    return layer


def check_model(model, name: str = "model", kind: str = "Layer"):
    """``model`` if it is a Keras 2 or a Keras 3 ``kind`` (``"Layer"`` or ``"Model"``), else a
    TypeError naming ``name``."""
    if _is_keras3(model):
        k3 = keras3_module()
        cls = k3.Model if kind == "Model" else k3.layers.Layer
        if not isinstance(model, cls):
            raise TypeError(f"`{name}` must be a keras.{'Model' if kind == 'Model' else 'Layer'}"
                            f", got {type(model).__module__}.{type(model).__name__}.")
        return model
    return check_keras2(model, name, kind=keras.Model if kind == "Model" else None)


def _short_name(variable) -> str:
    return variable.name.split("/")[-1].split(":")[0]


def _walk_layers(model) -> List:
    """All layers of ``model`` (recursively), outermost wrapper only for wrapped layers."""
    seen, out, covered = set(), [], set()
    try:
        layers = list(model._flatten_layers(include_self=False, recursive=True))
    except AttributeError:  # pragma: no cover - every Keras 2 layer has it
        layers = list(getattr(model, "layers", []))
    wrappers = _wrapper_types()
    for layer in layers:
        if isinstance(layer, wrappers):
            inner = layer
            while isinstance(inner, wrappers) and hasattr(inner, "layer"):
                inner = inner.layer
                covered.add(id(inner))
    for layer in layers:
        if id(layer) in seen or id(layer) in covered:
            continue
        seen.add(id(layer))
        out.append(layer)
    return out


def _kernels_of(layer) -> List:
    # the outer layer: TFMOT's wrapper moves the kernel out of the wrapped layer's weights
    return [v for v in layer.trainable_weights if _short_name(v) in _KERNEL_NAMES]


def _fold_scale(layer, kernel):
    """``(layer, BatchNorm)`` when ``kernel`` is the main kernel of a plain layer that a
    BatchNorm folds into (:mod:`tfqreg.fold`), else ``None``."""
    bn = fold.batchnorm_for_kernel(layer, kernel)
    if bn is None and _is_keras3(layer):
        _refuse_unknown_keras3_fold(layer)
    return None if bn is None else (layer, bn)


def _refuse_unknown_keras3_fold(layer) -> None:
    """A Keras 3 layer with a linear activation whose only consumer is a BatchNormalization
    is folded by the converter; when :func:`tfqreg.fold.batchnorm_for_kernel` did not report
    that BatchNorm (it does not read Keras 3 layer graphs yet), the term would measure the
    unfolded kernel: refuse instead of measuring the wrong tensor. (When ``fold`` reads Keras 3
    graphs, ``fold.consumers`` lists the BatchNorm and fold's answer is used as it is.)"""
    if fold.consumers(layer):
        return  # fold reads this layer's graph: its answer (no fold) stands
    k3 = keras3_module()
    consumers = [getattr(n, "operation", None) for n in getattr(layer, "_outbound_nodes", [])]
    activation = getattr(layer, "activation", None)
    linear = activation is None or k3.activations.serialize(activation) in ("linear", None)
    if (len(consumers) == 1 and isinstance(consumers[0], k3.layers.BatchNormalization)
            and linear):
        raise ValueError(
            f"Keras 3 layer '{layer.name}' is followed by BatchNormalization "
            f"'{consumers[0].name}', which the TFLite converter folds into its kernel, but "
            "tfqreg.fold does not find BatchNorm folds in Keras 3 models in this version, so the "
            "term would act on the unfolded kernel. Exclude the layer (`layers=`), or use a "
            "Keras 2 (tf_keras) model.")


def _folded(info, kernel) -> tf.Tensor:
    """The kernel the device quantizes (``kernel`` itself when ``info`` is ``None``)."""
    if info is None:
        return kernel
    layer, bn = info
    return tf.cast(fold.fold_kernel(layer, kernel, fold.batchnorm_scale(bn)), kernel.dtype)


def _unfolded(info, kernel, folded_value) -> tf.Tensor:
    """The raw kernel whose fold is ``folded_value`` (``w = w'/s``; channels with ``s = 0``
    keep their raw value: a BatchNorm with γ = 0 zeroes them anyway)."""
    if info is None:
        return folded_value
    layer, bn = info
    s = fold.batchnorm_scale(bn)
    inv = tf.math.divide_no_nan(tf.ones_like(s), s)
    raw = tf.cast(fold.fold_kernel(layer, folded_value, inv), kernel.dtype)
    dead = tf.cast(fold.fold_kernel(layer, tf.ones_like(kernel), tf.cast(
        tf.equal(s, 0.0), tf.float32)), tf.bool)
    return tf.where(dead, tf.convert_to_tensor(kernel), raw)


def kernel_layers(model, layers: Optional[Sequence[str]] = None, owner: str = "term") -> list:
    """The layers whose kernels a term regularizes, as ``[(layer, [kernel variables])]``.

    Args:
        model: a built Keras 2 or Keras 3 model.
        layers: layer names (the wrapper's or the wrapped layer's name for TFMOT models);
            ``None`` for every Dense / Conv / Depthwise / Separable layer with a trainable kernel.
        owner: used in error messages.

    Raises:
        ValueError: a name is not in the model, or the named layer has no trainable kernel.
    """
    check_model(model, "model")
    types = _kernel_layer_types()
    all_layers = _walk_layers(model)
    if layers is None:
        found = [(l, _kernels_of(l)) for l in all_layers if isinstance(_unwrap(l), types)]
        found = [(l, k) for l, k in found if k]
        if not found:
            raise ValueError(f"{owner}: model '{model.name}' has no Dense/Conv layer with a "
                             "trainable kernel (is it built?).")
        return found
    found = []
    for name, layer in zip(layers, _layers_by_name(model, layers, owner, "layers", all_layers)):
        kernels = _kernels_of(layer)
        if not kernels:
            raise ValueError(f"{owner}: layer '{name}' has no trainable kernel.")
        found.append((layer, kernels))
    return found


def _layers_by_name(model, names: Sequence[str], owner: str, argument: str = "activations",
                    all_layers: Optional[list] = None) -> list:
    """The layers named ``names`` (a wrapper's or the wrapped layer's name); a ValueError
    naming ``argument`` and listing the model's layers for a name not in it."""
    all_layers = _walk_layers(model) if all_layers is None else all_layers
    by_name = {}
    for l in all_layers:
        by_name.setdefault(l.name, l)
        by_name.setdefault(_unwrap(l).name, l)
    out = []
    for name in names:
        if name not in by_name:
            known = ", ".join(sorted(l.name for l in all_layers))
            raise ValueError(f"{owner}: layer '{name}' (in `{argument}`) not found in model "
                             f"'{model.name}'. Layers: {known}.")
        out.append(by_name[name])
    return out


# ---------------------------------------------------------------------------------------------
# Terms
# ---------------------------------------------------------------------------------------------


class _Term(keras.layers.Layer):
    """Base: a Keras layer so its variables are weights of the TrainingModel that tracks it."""

    #: base names of the metrics this term logs (made unique by TrainingModel)
    metric_names: Tuple[str, ...] = ()

    def __init__(self, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self._model = None
        self._state = None  # Keras 3 models: the Keras 3 layer that owns the term's variables

    @property
    def model(self):
        """The model the term is attached to (``None`` before :meth:`attach`)."""
        return self._model

    @property
    def attached(self) -> bool:
        return self._model is not None

    def attach(self, model) -> None:
        """Resolve the layers of ``model`` this term acts on and create its variables."""
        check_model(model, "model")
        if self._model is not None:
            if self._model is model:
                return
            raise ValueError(f"{type(self).__name__} '{self.name}' is already attached to model "
                             f"'{self._model.name}'; create a new term for '{model.name}'.")
        if _is_keras3(model):
            # not tracked by this (Keras 2) layer: the Keras 3 TrainingModel tracks the state
            object.__setattr__(self, "_state", _keras3_state_layer(self.name))
            self._attach(model)
            object.__setattr__(self, "_model", model)
            return
        self._attach(model)
        self._model = model

    @property
    def state_layer(self):
        """The Keras 3 layer holding this term's variables when it is attached to a Keras 3
        model (tracked by the Keras 3 TrainingModel), else ``None``."""
        return self._state

    def _set(self, attr: str, value) -> None:
        """``self.attr = value``; on a Keras 3 model without Keras 2 tracking (the variables and
        layers of a Keras 3 model are not this Keras 2 layer's weights or sub-layers)."""
        if self._state is None:
            setattr(self, attr, value)
        else:
            object.__setattr__(self, attr, value)

    def _add_state(self, name: str, shape, dtype, value, constraint=None):
        """A trainable variable of the term, initialised to ``value``: a weight of this layer
        (Keras 2), or of :attr:`state_layer` (Keras 3, so the Keras 3 optimizer trains it)."""
        if self._state is None:
            return self.add_weight(name=name, shape=shape, dtype=dtype, trainable=True,
                                   initializer=keras.initializers.Constant(value),
                                   constraint=constraint)
        # Keras 3's Constant casts a Python float through floatx: give it the variable's dtype
        value = np.asarray(value, dtype=np.dtype(tf.as_dtype(dtype).as_numpy_dtype))
        return self._state.add_weight(name=name, shape=shape, dtype=dtype, trainable=True,
                                      initializer=keras3_module().initializers.Constant(value),
                                      constraint=constraint)

    def _attach(self, model):  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, inputs=None):  # terms are not layers of the data path
        return inputs



def _keras3_state_layer(name: str):
    """A Keras 3 layer that only owns variables (a term's α and log δ on a Keras 3 model)."""
    layer = keras3_module().layers.Layer(name=name)
    layer.built = True
    return layer
