"""Activation capture for gradient-ℓ1 (a pass-through hook on ``layer.call``) and the
second-order gradient of TFMOT's fake-quant ops."""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import List

from tfqreg._keras import tf

# ---------------------------------------------------------------------------------------------
# Activation capture: a pass-through hook on layer.call that watches outputs while recording
# ---------------------------------------------------------------------------------------------

_STATE = threading.local()  # MirroredStrategy runs replicas in threads: one recorder per thread


class _Recorder:
    """Collects the outputs of the wanted layers; with ``offsets``, adds ``offsets[i]`` to the
    i-th recorded output (the perturbed pass of the finite-difference gradient-ℓ1)."""

    def __init__(self, tape, wanted, offsets=None):
        self.tape = tape
        self.wanted = wanted
        self.tensors: List[tf.Tensor] = []
        self.offsets = offsets
        self.offset_index = 0

    def take(self, t):
        if self.offsets is not None:
            if (self.offset_index < len(self.offsets)
                    and self.offsets[self.offset_index] is not None):
                t = t + self.offsets[self.offset_index]
            self.offset_index += 1
        return t


@contextlib.contextmanager
def _recording(tape, layers, offsets=None):
    previous = getattr(_STATE, "recorder", None)
    recorder = _Recorder(tape, {id(l) for l in layers}, offsets)
    _STATE.recorder = recorder
    try:
        yield recorder
    finally:
        _STATE.recorder = previous


def _install_hook(layer):
    if getattr(layer, "_tfqreg_capture_hook", False):
        return
    original = layer.call

    @functools.wraps(original)
    def call(*args, **kwargs):
        outputs = original(*args, **kwargs)
        recorder = getattr(_STATE, "recorder", None)
        if recorder is not None and id(layer) in recorder.wanted:
            flat = tf.nest.flatten(outputs)
            for i, t in enumerate(flat):
                if isinstance(t, tf.Tensor) and t.dtype.is_floating:
                    t = recorder.take(t)
                    recorder.tape.watch(t)
                    recorder.tensors.append(t)
                    flat[i] = t
            outputs = tf.nest.pack_sequence_as(outputs, flat)
        return outputs

    object.__setattr__(layer, "call", call)
    object.__setattr__(layer, "_tfqreg_capture_hook", True)


# ---------------------------------------------------------------------------------------------
# TFMOT fake-quant: a first-order gradient built from differentiable ops
# ---------------------------------------------------------------------------------------------
# TensorFlow's gradient of FakeQuantWithMinMaxVars[PerChannel] is the op
# FakeQuantWithMinMaxVars[PerChannel]Gradient, which TF registers as NOT differentiable, so a
# double backprop through a TFMOT model silently returns no gradient. We re-register the
# first-order gradient with the same values (dx = dy·[min ≤ x ≤ max], dmin/dmax = Σ dy below/above
# the nudged range) written as a product with a constant mask, which is differentiable in dy.

_FQ_LOCK = threading.Lock()
_FQ_DONE = False


def _fake_quant_gradient(op, grad, per_channel: bool):
    x, lo, hi = op.inputs
    mask_fn = (tf.quantization.fake_quant_with_min_max_vars_per_channel_gradient if per_channel
               else tf.quantization.fake_quant_with_min_max_vars_gradient)
    inside = tf.stop_gradient(mask_fn(
        tf.ones_like(x), x, lo, hi, num_bits=op.get_attr("num_bits"),
        narrow_range=op.get_attr("narrow_range"))[0])
    outside = 1.0 - inside
    below = outside * tf.cast(x < (lo + hi) / 2.0, x.dtype)
    above = outside - below
    axes = list(range(x.shape.rank - 1)) if per_channel else None
    return (grad * inside, tf.reduce_sum(grad * below, axis=axes),
            tf.reduce_sum(grad * above, axis=axes))


def _fq_grad_tensor(op, grad):
    return _fake_quant_gradient(op, grad, per_channel=False)


def _fq_grad_channel(op, grad):
    return _fake_quant_gradient(op, grad, per_channel=True)


def register_fake_quant_second_order() -> None:
    """Make the gradient of TF's FakeQuantWithMinMaxVars[PerChannel] (TFMOT's quantizers)
    twice differentiable, with unchanged first-order values. Done once per process; called when
    a :class:`GradientL1` attaches to a model that contains TFMOT layers."""
    global _FQ_DONE
    with _FQ_LOCK:
        if _FQ_DONE:
            return
        from tensorflow.python.framework import ops as tf_ops  # the registry is not public API

        registry = tf_ops._gradient_registry  # pylint: disable=protected-access
        for op_name, fn in (("FakeQuantWithMinMaxVars", _fq_grad_tensor),
                            ("FakeQuantWithMinMaxVarsPerChannel", _fq_grad_channel)):
            registry._registry.pop(op_name, None)  # pylint: disable=protected-access
            tf_ops.RegisterGradient(op_name)(fn)
        _FQ_DONE = True

