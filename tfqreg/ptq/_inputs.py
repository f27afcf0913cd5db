"""The argument and data checks of :mod:`tfqreg.ptq`: bit widths and flags, the Keras 3
mirror, and the evaluation / calibration data (NumPy or ``tf.data``), each error naming the
argument."""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from tfqreg import grid
from tfqreg._keras import check_keras2, keras, tf
from tfqreg.ptq.fakequant import quantizable_layers, separable_types

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
                     if isinstance(l, separable_types())]
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
