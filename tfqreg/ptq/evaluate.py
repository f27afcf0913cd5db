"""Evaluation of the PTQ model on labelled data, and :func:`sweep`: the float model and each
bit width, folded and cloned once."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np

from tfqreg._keras import keras, tf
from tfqreg.ptq._inputs import (_batches, _check_args, _check_flags, _input_shape, _int_list,
                                _keras2_mirror, _labels, _pairs, _verify_mirror)
from tfqreg.ptq.model import _PTQModel
from tfqreg.ptq.report import SweepResult, SweepRow

__all__ = ["sweep"]


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
