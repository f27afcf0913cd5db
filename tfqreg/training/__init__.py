"""Training-step terms: gradient-ℓ1 and learnable-coefficient MSQE / partial L2 (methods.md §3-4).

These terms cannot be a stateless ``kernel_regularizer``: gradient-ℓ1 needs the gradient of the
task loss (double backprop), and the learnable-coefficient terms own trainable state (α, δ).
They live in :class:`TrainingModel`, a ``keras.Model`` that wraps any Keras 2 model (Sequential,
Functional, subclassed, a larq BNN, a TFMOT ``quantize_apply`` model) and whose ``train_step``
composes

    loss = task loss + model.losses (kernel regularizers) + Σ terms

so users keep calling ``compile`` / ``fit`` / ``evaluate`` / ``save``::

    >>> import tfqreg
    >>> from tfqreg import models, training
    >>> inner = models.tiny_cnn()
    >>> model = training.TrainingModel(inner, terms=[training.GradientL1(lambda_w=1e-4),
    ...                                              training.LearnableMSQE(bits=4)])
    >>> model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    >>> sorted(v.name.split("/")[-1] for v in model.weights if "msqe" in v.name)[:2]
    ['alpha:0', 'conv1_log_step:0']

After ``fit``, :func:`round_to_grid` snaps the kernels to the learned grid, and ``model.inner`` is
the plain model to export.

Keras 3
-------
A Keras 3 model (``import keras``, TensorFlow backend) is wrapped the same way:
``TrainingModel(keras3_model, terms=[...])`` returns a Keras 3 ``keras.Model`` (the class is
picked from ``inner``; :func:`is_training_model` recognises both) with the same step, logs,
late start, ``every=k``, ``tf.distribute`` behaviour and :func:`round_to_grid`. The terms are
the same objects and the same math (one implementation); on a Keras 3 model their α and log δ
are Keras 3 variables (``model.weights`` lists them, the Keras 3 optimizer trains them,
``.keras`` saves them), and ``compile`` needs a Keras 3 optimizer. Differences: Keras 3 casts
the compiled loss to floatx, so in a float64 model the terms are added in float32; a Keras 3
``inner`` must be built (an ``Input``) before it is wrapped; TFMOT and larq models are Keras 2
only.

The terms
---------
* :class:`GradientL1` (Alizadeh et al., ICLR 2020): ``λ_w Σ_l ‖∇_{W_l} L‖₁ + λ_a Σ_l ‖∇_{a_l} L‖₁``
  with ``L`` the task loss (the compiled loss, without regularizers). Weights: the kernels of
  Dense / Conv / Depthwise / Separable layers (also inside larq ``Quant*`` layers and TFMOT
  wrappers); biases and BatchNorm are excluded. Activations: the outputs of those layers, or the
  layers named in ``activations``. ``reduction`` sets what λ means (``"sum"``, the paper's;
  ``"mean"`` per element; ``"step"``, the first-order bound on the loss increase at ``bits``
  bits, dimensionless). ``method="exact"`` is double backprop; ``"finite_difference"`` gets the
  same gradient from one extra forward/backward pass (a Hessian-vector product by finite
  differences); ``every=k`` applies the term every k-th step, scaled by k. See
  :mod:`tfqreg.training.gradient_l1`.
* :class:`LearnableMSQE` (Choi et al.): ``e^α · R − β·α`` with
  ``R = Σ_l (1/N_l) Σ_i (w_i − Q_{δ_l}(w_i))²`` (the per-tensor MSQE of methods.md §3, summed
  over the regularized tensors, so a small first conv is pulled as hard as a wide Dense), α a
  trainable scalar capped at ``alpha_max`` and δ a trainable step per tensor (or per output
  channel) initialised by :func:`tfqreg.grid.default_step`. δ is stored as ``log δ`` (the variable
  ``<layer>_log_step``): it stays positive and Adam moves it by a relative amount.
* :class:`LearnablePartialL2`: ``e^α · P − β·α``, ``P = Σ_l (1/N_l) Σ_{|w|≤θ_l} w²`` with θ_l the
  ``fraction`` quantile of |w| in each tensor, recomputed every step.

Gradient-ℓ1 under ``tf.distribute``
-----------------------------------
The term is defined on the GLOBAL batch (both methods): ``‖∇_W L_global‖₁`` where ``L_global`` is the loss of
the whole (all-replica) batch. Inside the step each replica computes the gradient of its share of
the loss (``L_r / num_replicas``, as Keras scales it), the weight gradients are all-reduced
(``ReplicaContext.all_reduce``, which is differentiable) before the norm, so every replica sees
the same ``‖∇_W L_global‖₁`` and adds ``1/num_replicas`` of it. Activations belong to one replica,
so ``Σ_r ‖∇_{a_r} L_global‖₁`` is exact without communication. The result equals the single-device
step on the same global batch (tested on two virtual CPUs to 1e-5).

Limits
------
* Activation gradients are captured by wrapping the ``call`` of the chosen layers (a thin hook
  that watches the output while a :class:`TrainingModel` step records; otherwise it passes
  through). Layers must be reachable by name through the model's layer tree (``model.layers``,
  recursively, including TFMOT wrappers); tensors computed outside any layer (a raw ``tf`` op in
  a subclassed ``call``) cannot be selected.
* TFMOT's fake-quant gradient ops are registered as not differentiable in TensorFlow, which makes
  the double backprop silently vanish. When a :class:`GradientL1` is attached to a model, tfqreg
  registers their (almost-everywhere) second-order gradient: linear in the upstream gradient with
  the straight-through mask, zero w.r.t. the inputs and ranges.
* A gradient-ℓ1 step takes its gradients inside :func:`fast_second_order`: a ReLU read only by
  a max pool applies its mask at the pool's output, and the backward of a max-pool gradient
  with non-overlapping windows, and of a ReLU gradient, use cheaper rules, all with the same
  values as TensorFlow's (:mod:`tfqreg.training._second_order`); outside a gradient-ℓ1 step
  every gradient is TensorFlow's own.
* The late start (``start_step`` / ``start_epoch``) switches the step function when the
  condition becomes true (a one-time retrace) during ``fit`` / ``train_on_batch``; before that
  no double backprop is paid for. In a hand-written loop call :meth:`TrainingModel.update_schedule`.
* ``jit_compile=True`` (XLA) compiles the double-backprop step on CPU for plain Keras layers. If
  XLA rejects an op (e.g. a custom op in a larq model), the first step raises the XLA error with
  a hint to compile with ``jit_compile=False``.
* A TrainingModel is a subclassed model: save it as ``.keras`` or SavedModel (or weights as
  ``.h5``); export ``model.inner`` (``.keras`` / ``.h5`` / SavedModel / TFLite) for deployment.
"""

from __future__ import annotations

import contextlib

from tfqreg.training._common import kernel_layers
from tfqreg.training._second_order import fast_second_order, register_fake_quant_second_order
from tfqreg.training.gradient_l1 import GradientL1
from tfqreg.training.learnable import LearnableMSQE, LearnablePartialL2, round_to_grid
from tfqreg.training.model import TrainingModel, get, is_training_model, serialize

__all__ = [
    "GradientL1",
    "LearnableMSQE",
    "LearnablePartialL2",
    "TrainingModel",
    "is_training_model",
    "round_to_grid",
    "kernel_layers",
    "get",
    "serialize",
    "register_fake_quant_second_order",
    "fast_second_order",
]
