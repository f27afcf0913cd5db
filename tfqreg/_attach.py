"""Where the tfqreg regularizers' learnable state lives, in Keras 2 and in Keras 3 layers.

A Keras regularizer only ever receives the weight tensor, so a regularizer with learnable
parameters (``Margin``'s M, ``SoftMinMax``'s hardness, ``MSQE(trainable_step=True)``'s step)
needs another way to own Keras state. Importing :mod:`tfqreg.regularizers` wraps
``Layer.add_weight`` once, for every layer of each Keras (the thin adapter of each Keras; the
math is in :mod:`tfqreg.penalties` and the regularizer classes): right after a layer creates a
weight whose ``regularizer`` is a tfqreg regularizer, the hook calls
``regularizer._attach(layer, weight)``, which creates the parameters with
:func:`add_state_weight`:

- **Keras 2** (``tf_keras``): ``layer.add_weight(name="<weight>_<suffix>")``, an ordinary
  weight of the layer itself, listed right after the kernel (``[kernel, kernel_margin, bias]``).
- **Keras 3**: a weight of the same name of a small state layer tracked by the layer as the
  attribute ``_tfqreg_<weight>_state`` (``layer.weights`` is ``[kernel, bias, kernel_margin]``).
  Keras 3 layers save only the weights they know by name (``Dense.save_own_variables`` writes
  ``kernel`` and ``bias``), while a tracked sub-layer is saved and restored by ``.keras`` and
  ``.weights.h5`` through Keras' own walk over the layer's attributes; its weights are the
  layer's weights everywhere else too (``layer.trainable_weights``, the optimizer, mirroring
  under ``tf.distribute``).

String and dict regularizers given to ``add_weight`` are resolved first (with that Keras'
``regularizers.get``), so that the layer and the hook see one instance.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Callable, Dict, Optional

from tfqreg._keras import is_keras3, keras, keras3_module, tf

__all__ = ["Attachment", "add_state_weight", "initial_tensor", "weight_base_name",
           "install_hooks"]


class Attachment:
    """What a regularizer knows about one weight it regularizes: the weight and its layer
    (weakly), the learnable state created for it, and the kernel's per-channel axes."""

    __slots__ = ("_variable", "_layer", "state", "channel_axes")

    def __init__(self, variable, state: Dict[str, tf.Variable], channel_axes, layer=None):
        self._variable = _weak(variable)
        self._layer = _weak(layer) if layer is not None else (lambda: None)
        self.state = state
        self.channel_axes = channel_axes

    @property
    def variable(self):
        return self._variable()

    @property
    def layer(self):
        return self._layer()


def _weak(obj):
    try:
        return weakref.ref(obj)
    except TypeError:  # pragma: no cover - every TF / Keras variable and layer supports weakrefs
        return lambda o=obj: o


def weight_base_name(variable) -> str:
    """``"kernel"`` for ``dense/kernel:0`` (Keras 2) or a Keras 3 variable named ``kernel``."""
    name = getattr(variable, "name", None) or "weight"
    name = name.split(":")[0].rsplit("/", 1)[-1]
    return name or "weight"


def initial_tensor(variable) -> tf.Tensor:
    """The freshly created weight's value: read eagerly, or, in a TF1-style graph, its
    initializer tensor (Keras runs all initializers in one ``session.run``, so the random
    initial kernel and the parameter derived from it are drawn from the same sample)."""
    with tf.init_scope():
        if tf.executing_eagerly():
            return tf.convert_to_tensor(variable)
        initial_value = getattr(variable, "initial_value", None)
        return initial_value if initial_value is not None else tf.convert_to_tensor(variable)


_STATE_LAYER_CLASS = None


def _state_layer_class():
    """The Keras 3 layer that holds a weight's tfqreg state (defined on first use)."""
    global _STATE_LAYER_CLASS
    if _STATE_LAYER_CLASS is None:
        k3 = keras3_module()

        class TfqregState(k3.layers.Layer):
            """Holds the learnable parameters tfqreg regularizers create for one weight of
            the layer that tracks it; never called (the parameters only enter the layer's
            regularization loss)."""

            def call(self, inputs):  # pragma: no cover - never called
                raise TypeError("a tfqreg state layer holds parameters; it is not called")

        _STATE_LAYER_CLASS = TfqregState
    return _STATE_LAYER_CLASS


def add_state_weight(layer, weight, name: str, value: tf.Tensor, constraint=None):
    """Create one learnable parameter named ``name`` for ``layer``'s ``weight``, initialised to
    ``value`` (its shape and dtype), trainable, with ``constraint``; in Keras 2 on the layer,
    in Keras 3 on the weight's state layer (see the module docstring).

    Returns:
        The new variable.
    """
    def init(shape, dtype=None, _value=value, **_):
        return tf.cast(tf.reshape(_value, shape), dtype or _value.dtype)

    if not is_keras3(layer):
        return layer.add_weight(name=name, shape=value.shape, dtype=value.dtype,
                                initializer=init, trainable=True, constraint=constraint,
                                autocast=False)
    attr = f"_tfqreg_{weight_base_name(weight)}_state"
    holder = getattr(layer, attr, None)
    if holder is None:
        holder = _state_layer_class()(name=f"{layer.name}_{weight_base_name(weight)}_state",
                                      dtype=layer.dtype_policy)
        setattr(layer, attr, holder)  # tracked: its weights are the layer's, saved with it
    variable = holder.add_weight(name=name, shape=tuple(value.shape), dtype=value.dtype.name,
                                 initializer=init, trainable=True, constraint=constraint,
                                 autocast=False)
    holder.built = True
    return variable


def _install_add_weight_hook(layer_cls, resolve: Callable, kind: type) -> None:
    """Wrap ``layer_cls.add_weight``: after a weight with a ``kind`` regularizer is created,
    call ``regularizer._attach(layer, weight)``. String/dict regularizers are resolved first
    with ``resolve`` (that Keras' ``regularizers.get``)."""
    original = vars(layer_cls)["add_weight"]
    if getattr(original, "_tfqreg_hook", False):
        return
    signature = inspect.signature(original)

    def add_weight(self, *args, **kwargs):
        regularizer = kwargs.get("regularizer")
        if regularizer is None and "regularizer" not in kwargs and len(args) > 4:
            try:
                regularizer = signature.bind(self, *args, **kwargs).arguments.get("regularizer")
            except TypeError:
                regularizer = None
        if regularizer is None:
            return original(self, *args, **kwargs)
        if isinstance(regularizer, (str, dict)):
            resolved = resolve(regularizer)
            if isinstance(resolved, kind):
                bound = signature.bind(self, *args, **kwargs)
                bound.arguments["regularizer"] = resolved
                args, kwargs = bound.args[1:], bound.kwargs
                regularizer = resolved
        variable = original(self, *args, **kwargs)
        if isinstance(regularizer, kind):
            regularizer._attach(self, variable)
        return variable

    add_weight.__doc__ = original.__doc__
    add_weight.__name__ = original.__name__
    add_weight.__qualname__ = original.__qualname__
    add_weight.__wrapped__ = original
    add_weight._tfqreg_hook = True
    layer_cls.add_weight = add_weight


def _keras2_layer_classes() -> list:
    """``keras.layers.Layer`` and the TF1-graph-mode base class that tf_keras swaps in for layers
    built inside ``tf.Graph().as_default()`` (``base_layer_v1.Layer``, which overrides
    ``add_weight``)."""
    classes = [keras.layers.Layer]
    try:  # tf_keras picks the class in LayerVersionSelector.__new__ (module loaded lazily)
        for base in keras.layers.Layer.__mro__:
            if base.__name__ == "LayerVersionSelector":
                v1 = base.__new__.__globals__["base_layer_v1"].Layer
                if v1 is not keras.layers.Layer and "add_weight" in vars(v1):
                    classes.append(v1)
    except Exception:  # pragma: no cover - other tf_keras layouts: TF2 layers still hooked
        pass
    return classes


def install_hooks(kind: type, aliases: Dict[str, type]) -> Optional[object]:
    """Hook ``add_weight`` of both Kerases' layers for regularizers of class ``kind`` and put
    ``aliases`` (and each class's bare name) where each Keras' ``regularizers.get`` looks names
    up (the module namespace of Keras 2's, Keras 3's ``ALL_OBJECTS_DICT``; Keras 3's
    ``get_custom_objects()`` is not consulted by ``regularizers.get("name")``, and one global
    namespace could not keep the regularizer ``"foothill"`` apart from the loss
    ``"foothill"``). Returns the Keras 3 package when it is installed."""
    # Keras 2: the current and the legacy deserializer instantiate a class found in the
    # namespace of Keras' regularizers module; the legacy one (``.h5``, SavedModel revival) looks
    # a serialized regularizer up by its bare ``class_name`` ("Margin").
    namespace = keras.regularizers.get.__globals__
    for alias, cls in aliases.items():
        namespace.setdefault(alias, cls)
        namespace.setdefault(cls.__name__, cls)
    for layer_cls in _keras2_layer_classes():
        _install_add_weight_hook(layer_cls, keras.regularizers.get, kind)
    k3 = keras3_module()
    if k3 is None:  # pragma: no cover - Keras 3 not installed
        return None
    names = k3.regularizers.get.__globals__["ALL_OBJECTS_DICT"]
    for alias, cls in aliases.items():
        names.setdefault(alias, cls)
    _install_add_weight_hook(k3.layers.Layer, k3.regularizers.get, kind)
    return k3
