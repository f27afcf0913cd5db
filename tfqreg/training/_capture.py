"""Activation capture for gradient-ℓ1: a pass-through hook on ``layer.call`` that watches (and,
in the finite-difference pass, offsets) the outputs of the chosen layers while recording."""

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
