"""Magnitude pruning with a fixed mask: pruned weights stay exactly zero through training.

:func:`prune_masks` marks, per kernel, the ``round(r·N)`` weights of smallest ``|w|`` (the
weights at or under the r-th percentile θ_r of ``|w|``, ties broken by position) as pruned.
:func:`apply_masks` zeroes them, and the :class:`PruningMask` callback re-applies the mask
before training and after every optimizer step, so every forward pass of further training
sees exact zeros and the trained model ends with them (``+0.0``, written with ``tf.where``,
never ``-0.0``).

>>> import numpy as np
>>> from tfqreg import models
>>> from tfqreg.compression import pruning
>>> model = models.tiny_cnn()
>>> masks = pruning.prune_masks(model, 0.75)
>>> pruning.apply_masks(model, masks)
>>> round(float(np.mean(model.get_layer("fc").kernel.numpy() == 0)), 2)
0.75
"""

from __future__ import annotations

from numbers import Real
from typing import Dict, Mapping, Optional, Sequence, Union

import numpy as np

from tfqreg._keras import check_keras2, keras, register, tf
from tfqreg.compression.fileformat import coded_kernels

__all__ = ["check_fraction", "prune_masks", "apply_masks", "mask_fraction", "PruningMask"]

Fraction = Union[float, Mapping[str, float]]


def check_fraction(fraction, name: str = "fraction") -> Union[float, Dict[str, float]]:
    """A pruning fraction in ``[0, 1)``, or a ``{layer name: fraction}`` mapping of them."""
    if isinstance(fraction, Mapping):
        return {str(k): check_fraction(v, f"{name}[{k!r}]") for k, v in fraction.items()}
    if isinstance(fraction, bool) or not isinstance(fraction, Real):
        raise TypeError(f"`{name}` must be a number in [0, 1) or a dict layer -> number, "
                        f"got {fraction!r}.")
    if not 0.0 <= float(fraction) < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {fraction}.")
    return float(fraction)


def fraction_for(fraction, layer_name: str) -> float:
    if isinstance(fraction, dict):
        return fraction.get(layer_name, 0.0)
    return fraction


def prune_masks(model, fraction: Fraction = 0.8,
                layers: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """Keep-masks (``True`` = kept) of every Dense/Conv kernel: the ``round(r·N)`` smallest
    ``|w|`` of each kernel are pruned.

    Args:
        model: a Keras 2 model.
        fraction: ``r`` for every kernel, or ``{layer name: r}`` (unlisted layers: 0).
        layers: only these layers (default: all Dense/Conv layers).

    Returns:
        ``{"layer/attr": bool array of the kernel's shape}`` (keys as in
        :func:`tfqreg.compression.fileformat.coded_kernels`).
    """
    check_keras2(model, "model")
    fraction = check_fraction(fraction)
    if isinstance(fraction, dict):
        known = {k.split("/")[0] for k in coded_kernels(model)}
        unknown = sorted(set(fraction) - known)
        if unknown:
            raise ValueError(f"`fraction`: {unknown} are not Dense/Conv layers of the model.")
    masks = {}
    for key, (layer, var, _) in coded_kernels(model, layers).items():
        w = np.abs(var.numpy()).reshape(-1)
        n_prune = int(round(fraction_for(fraction, layer.name) * w.size))
        keep = np.ones(w.size, dtype=bool)
        keep[np.argsort(w, kind="stable")[:n_prune]] = False
        masks[key] = keep.reshape(var.shape)
    return masks


def _variables(model, masks: Mapping[str, np.ndarray]):
    kernels = coded_kernels(model)
    missing = sorted(set(masks) - set(kernels))
    if missing:
        raise ValueError(f"`masks`: {missing} are not kernels of the model.")
    out = []
    for key, mask in masks.items():
        var = kernels[key][1]
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != tuple(var.shape):
            raise ValueError(f"`masks[{key!r}]` has shape {mask.shape}, the kernel "
                             f"{tuple(var.shape)}.")
        out.append((var, mask))
    return out


def apply_masks(model, masks: Mapping[str, np.ndarray]) -> None:
    """Set the pruned weights of ``model`` to exactly ``+0.0`` (in place)."""
    check_keras2(model, "model")
    for var, mask in _variables(model, masks):
        var.assign(tf.where(mask, var, tf.zeros_like(var)))


def mask_fraction(masks: Mapping[str, np.ndarray]) -> float:
    """Fraction of pruned weights over all masks."""
    total = sum(np.size(m) for m in masks.values())
    return float(sum(np.size(m) - np.count_nonzero(m) for m in masks.values()) / total) if total else 0.0


@register
class PruningMask(keras.callbacks.Callback):
    """Keras callback that keeps pruned weights at exactly zero: it applies the masks when
    training starts and after every training batch (i.e. after every optimizer step).

    Args:
        masks: ``{"layer/attr": keep mask}`` from :func:`prune_masks`.
        model: the model whose kernels are masked, if it is not the model being fitted (e.g.
            the inner model of a :class:`tfqreg.training.TrainingModel`); default: the fitted
            model, or its ``.inner``.
    """

    def __init__(self, masks: Mapping[str, np.ndarray], model=None):
        super().__init__()
        self.masks = {k: np.asarray(v, dtype=bool) for k, v in masks.items()}
        self._target = model
        self._pairs = None

    def _resolve(self):
        if self._pairs is None:
            target = self._target if self._target is not None else self.model
            target = getattr(target, "inner", target)
            self._pairs = [(var, tf.constant(mask)) for var, mask in _variables(target,
                                                                                  self.masks)]
        return self._pairs

    def apply(self) -> None:
        for var, mask in self._resolve():
            var.assign(tf.where(mask, var, tf.zeros_like(var)))

    def on_train_begin(self, logs=None):
        self.apply()

    def on_train_batch_end(self, batch, logs=None):
        self.apply()

    def on_train_end(self, logs=None):
        self.apply()

    def get_config(self) -> dict:
        return {"masks": {k: v.tolist() for k, v in self.masks.items()}}

    @classmethod
    def from_config(cls, config: dict) -> "PruningMask":
        return cls(config["masks"])
