"""Activation capture for gradient-ℓ1: a pass-through hook on ``layer.call`` that watches (and,
in the finite-difference pass, offsets) the outputs of the chosen layers while recording.

A max pool with non-overlapping windows routes each window's gradient to one element, so when
such a pool is the only reader of a recorded activation ``a``, the gradient ``∇_a L`` is
``∇_p L`` (``p`` the pool's output) scattered to one element per window: the same ℓ1 norm, the
same signs at the chosen elements and zeros elsewhere. :func:`pooled_view` finds that ``p`` in a
traced graph, and the term computes its element-wise passes on ``∇_p L``, a quarter of the size
for 2×2 windows.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Dict, List

from tfqreg._keras import tf

# ---------------------------------------------------------------------------------------------
# Activation capture: a pass-through hook on layer.call that watches outputs while recording
# ---------------------------------------------------------------------------------------------

_STATE = threading.local()  # MirroredStrategy runs replicas in threads: one recorder per thread


class _Recorder:
    """Collects the outputs of the wanted layers; with ``offsets``, adds ``offsets[i]`` to the
    i-th recorded output (the perturbed pass of the finite-difference gradient-ℓ1).

    A max-pool layer with a pool hook (:func:`_install_pool_hook`) that reads the i-th recorded
    output notes its own output in ``pooled[i]``, and with ``pooled_offsets`` adds
    ``pooled_offsets[i]`` to it.
    """

    def __init__(self, tape, wanted, offsets=None, pooled_offsets=None):
        self.tape = tape
        self.wanted = wanted
        self.tensors: List[tf.Tensor] = []
        self.offsets = offsets
        self.offset_index = 0
        self.pooled: Dict[int, tf.Tensor] = {}
        self.pooled_offsets = pooled_offsets or {}
        self.pooled_applied = 0

    def take_pooled(self, inputs, outputs):
        for i, t in enumerate(self.tensors):
            if t is inputs:
                if i in self.pooled_offsets:
                    outputs = outputs + self.pooled_offsets[i]
                    self.pooled_applied += 1
                self.pooled[i] = outputs
                break
        return outputs

    def take(self, t):
        if self.offsets is not None:
            if (self.offset_index < len(self.offsets)
                    and self.offsets[self.offset_index] is not None):
                t = t + self.offsets[self.offset_index]
            self.offset_index += 1
        return t


@contextlib.contextmanager
def _recording(tape, layers, offsets=None, pooled_offsets=None):
    previous = getattr(_STATE, "recorder", None)
    recorder = _Recorder(tape, {id(l) for l in layers}, offsets, pooled_offsets)
    _STATE.recorder = recorder
    try:
        yield recorder
    finally:
        _STATE.recorder = previous


_MAX_POOLS = ("MaxPool", "MaxPool3D")


def pooled_view(t):
    """The output of the max pool that is ``t``'s only reader, when the pool's windows do not
    overlap (every stride at least the window size); ``None`` otherwise, and always in eager
    execution (no graph to read).

    Call it right after the forward pass, before anything else reads ``t``.
    """
    if tf.executing_eagerly() or not isinstance(t, tf.Tensor):
        return None
    try:
        readers = t.consumers()
    except (AttributeError, ValueError):  # pragma: no cover - not a graph tensor
        return None
    if len(readers) != 1 or readers[0].type not in _MAX_POOLS:
        return None
    op = readers[0]
    ksize, strides = op.get_attr("ksize"), op.get_attr("strides")
    if len(ksize) != len(strides) or any(k > s for k, s in zip(ksize, strides)):
        return None
    return op.outputs[0]


def _wrap_call(layer, flag: str, after) -> None:
    """Replace ``layer.call`` (once per ``flag``) by one that passes its outputs through
    ``after(recorder, inputs, outputs)`` while a recorder is active in this thread."""
    if getattr(layer, flag, False):
        return
    original = layer.call

    @functools.wraps(original)
    def call(*args, **kwargs):
        outputs = original(*args, **kwargs)
        recorder = getattr(_STATE, "recorder", None)
        if recorder is not None:
            outputs = after(recorder, args[0] if args else kwargs.get("inputs"), outputs)
        return outputs

    object.__setattr__(layer, "call", call)
    object.__setattr__(layer, flag, True)


def _install_hook(layer):
    """Let the recorder watch (and offset) ``layer``'s floating-point outputs."""
    def after(recorder, inputs, outputs):
        if id(layer) not in recorder.wanted:
            return outputs
        flat = tf.nest.flatten(outputs)
        for i, t in enumerate(flat):
            if isinstance(t, tf.Tensor) and t.dtype.is_floating:
                t = recorder.take(t)
                recorder.tape.watch(t)
                recorder.tensors.append(t)
                flat[i] = t
        return tf.nest.pack_sequence_as(outputs, flat)

    _wrap_call(layer, "_tfqreg_capture_hook", after)


def _install_pool_hook(layer):
    """Let ``layer`` (a max pool) note, or offset, its output when it reads a recorded one."""
    def after(recorder, inputs, outputs):
        if recorder.tensors and isinstance(outputs, tf.Tensor):
            return recorder.take_pooled(inputs, outputs)
        return outputs

    _wrap_call(layer, "_tfqreg_pool_hook", after)
