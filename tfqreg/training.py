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

The terms
---------
* :class:`GradientL1` (Alizadeh et al., ICLR 2020): ``λ_w Σ_l ‖∇_{W_l} L‖₁ + λ_a Σ_l ‖∇_{a_l} L‖₁``
  with ``L`` the task loss (the compiled loss, without regularizers). Weights: the kernels of
  Dense / Conv / Depthwise / Separable layers (also inside larq ``Quant*`` layers and TFMOT
  wrappers); biases and BatchNorm are excluded. Activations: the outputs of those layers, or the
  layers named in ``activations``. ``reduction="sum"`` (default, the paper's form) sums |g| over
  all elements; ``"mean"`` divides each kernel's ℓ1 norm by its size (and each activation's by
  its per-example size), which makes λ independent of the layer widths.
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
The term is defined on the GLOBAL batch: ``‖∇_W L_global‖₁`` where ``L_global`` is the loss of
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
import functools
import math
import threading
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from tfqreg import _checks, fold, grid
from tfqreg._keras import check_keras2, keras, register, tf

__all__ = [
    "GradientL1",
    "LearnableMSQE",
    "LearnablePartialL2",
    "TrainingModel",
    "round_to_grid",
    "kernel_layers",
    "get",
    "serialize",
]

_KERNEL_NAMES = ("kernel", "depthwise_kernel", "pointwise_kernel")
_SUM_WARN_LAMBDA = 1e-3  # gradient-ℓ1 (sum) at or above this from step 0 tends to kill training


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
            if value < 0:
                raise ValueError(f"{cls_name}: `{name}` must be >= 0, got {value}.")
        elif name == "beta":
            value = number(name, value)
            if value <= 0:
                raise ValueError(f"{cls_name}: `beta` must be > 0, got {value}.")
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
            if value not in ("sum", "mean"):
                raise ValueError(f"{cls_name}: `reduction` must be 'sum' or 'mean', got {value!r}.")
        out[name] = value
    if "alpha_init" in out and "alpha_max" in out and out["alpha_init"] > out["alpha_max"]:
        raise ValueError(
            f"{cls_name}: `alpha_init` ({out['alpha_init']}) must be <= `alpha_max` "
            f"({out['alpha_max']})."
        )
    if "alpha_max" in out and out["alpha_max"] > 80:
        raise ValueError(f"{cls_name}: `alpha_max` must be <= 80 (e^α overflows), got "
                         f"{out['alpha_max']}.")
    return out


# ---------------------------------------------------------------------------------------------
# Finding kernels and layers
# ---------------------------------------------------------------------------------------------


def _kernel_layer_types():
    L = keras.layers
    return tuple(
        getattr(L, n)
        for n in ("Dense", "Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D", "DepthwiseConv2D",
                  "SeparableConv1D", "SeparableConv2D", "Conv1DTranspose", "Conv2DTranspose",
                  "Conv3DTranspose")
        if hasattr(L, n)
    )


def _unwrap(layer):
    """The layer a (TFMOT / Keras) wrapper wraps, recursively; the layer itself otherwise."""
    while isinstance(layer, keras.layers.Wrapper) and hasattr(layer, "layer"):
        layer = layer.layer
    return layer


def _short_name(variable) -> str:
    return variable.name.split("/")[-1].split(":")[0]


def _walk_layers(model) -> List:
    """All layers of ``model`` (recursively), outermost wrapper only for wrapped layers."""
    seen, out, covered = set(), [], set()
    try:
        layers = list(model._flatten_layers(include_self=False, recursive=True))
    except AttributeError:  # pragma: no cover - every Keras 2 layer has it
        layers = list(getattr(model, "layers", []))
    for layer in layers:
        if isinstance(layer, keras.layers.Wrapper):
            inner = layer
            while isinstance(inner, keras.layers.Wrapper) and hasattr(inner, "layer"):
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
    return None if bn is None else (layer, bn)


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
        model: a built Keras 2 model.
        layers: layer names (the wrapper's or the wrapped layer's name for TFMOT models);
            ``None`` for every Dense / Conv / Depthwise / Separable layer with a trainable kernel.
        owner: used in error messages.

    Raises:
        ValueError: a name is not in the model, or the named layer has no trainable kernel.
    """
    check_keras2(model, "model")
    types = _kernel_layer_types()
    all_layers = _walk_layers(model)
    if layers is None:
        found = [(l, _kernels_of(l)) for l in all_layers if isinstance(_unwrap(l), types)]
        found = [(l, k) for l, k in found if k]
        if not found:
            raise ValueError(f"{owner}: model '{model.name}' has no Dense/Conv layer with a "
                             "trainable kernel (is it built?).")
        return found
    by_name = {}
    for l in all_layers:
        by_name.setdefault(l.name, l)
        by_name.setdefault(_unwrap(l).name, l)
    found = []
    for name in layers:
        if name not in by_name:
            known = ", ".join(sorted(l.name for l in all_layers))
            raise ValueError(f"{owner}: layer '{name}' (in `layers`) not found in model "
                             f"'{model.name}'. Layers: {known}.")
        kernels = _kernels_of(by_name[name])
        if not kernels:
            raise ValueError(f"{owner}: layer '{name}' has no trainable kernel.")
        found.append((by_name[name], kernels))
    return found


def _layers_by_name(model, names: Sequence[str], owner: str) -> list:
    all_layers = _walk_layers(model)
    by_name = {}
    for l in all_layers:
        by_name.setdefault(l.name, l)
        by_name.setdefault(_unwrap(l).name, l)
    out = []
    for name in names:
        if name not in by_name:
            known = ", ".join(sorted(l.name for l in all_layers))
            raise ValueError(f"{owner}: layer '{name}' (in `activations`) not found in model "
                             f"'{model.name}'. Layers: {known}.")
        out.append(by_name[name])
    return out


# ---------------------------------------------------------------------------------------------
# Activation capture: a pass-through hook on layer.call that watches outputs while recording
# ---------------------------------------------------------------------------------------------

_STATE = threading.local()  # MirroredStrategy runs replicas in threads: one recorder per thread


class _Recorder:
    def __init__(self, tape, wanted):
        self.tape = tape
        self.wanted = wanted
        self.tensors: List[tf.Tensor] = []


@contextlib.contextmanager
def _recording(tape, layers):
    previous = getattr(_STATE, "recorder", None)
    recorder = _Recorder(tape, {id(l) for l in layers})
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
            for t in tf.nest.flatten(outputs):
                if isinstance(t, tf.Tensor) and t.dtype.is_floating:
                    recorder.tape.watch(t)
                    recorder.tensors.append(t)
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

    @property
    def model(self):
        """The model the term is attached to (``None`` before :meth:`attach`)."""
        return self._model

    @property
    def attached(self) -> bool:
        return self._model is not None

    def attach(self, model) -> None:
        """Resolve the layers of ``model`` this term acts on and create its variables."""
        check_keras2(model, "model")
        if self._model is not None:
            if self._model is model:
                return
            raise ValueError(f"{type(self).__name__} '{self.name}' is already attached to model "
                             f"'{self._model.name}'; create a new term for '{model.name}'.")
        self._attach(model)
        self._model = model

    def _attach(self, model):  # pragma: no cover - abstract
        raise NotImplementedError

    def call(self, inputs=None):  # terms are not layers of the data path
        return inputs


@register
class GradientL1(_Term):
    """Gradient-ℓ1 regularization ``λ_w Σ‖∇_W L‖₁ + λ_a Σ‖∇_a L‖₁`` (double backprop).

    Args:
        lambda_w: strength on the kernels' gradients (``>= 0``). Default 1e-4 with
            ``reduction="sum"``: safe from step 0, but on the benchmark CNN (3 seeds) it barely
            changes robustness. ``1e-3`` with ``start_epoch=1`` gained ~1 pt at per-tensor W4A4
            with FP32 kept; ``1e-2`` late flattens accuracy vs bits at a cost of ~8 pt FP32.
            λ ≥ 1e-2 (sum) from scratch collapses training to chance (a dead network has zero
            gradient), so a warning is raised for λ ≥ 1e-3 without a late start.
        lambda_a: strength on the activations' gradients (``>= 0``; 0 disables the capture).
        layers: names of the layers whose kernels count (default: all Dense/Conv/Depthwise/
            Separable kernels, incl. larq ``Quant*`` and TFMOT-wrapped ones).
        activations: ``None`` for the outputs of the ``layers`` layers, or a list of layer names.
        start_step: optimizer step from which the term is on.
        start_epoch: epoch (0-based) from which the term is on (``fit`` only).
        reduction: ``"sum"`` (paper) or ``"mean"`` (ℓ1 norm / size per tensor).

    BatchNorm: for a kernel that a BatchNorm folds into (:mod:`tfqreg.fold`), the weight term is
    the gradient with respect to the FOLDED kernel ``w' = w·s`` (``s = γ/√(σ²+ε)``, moving
    statistics), ``∇_{w'} L = ∇_w L / s`` per channel: the device quantizes ``w'``, so the
    first-order loss increase of its rounding is ``δ'/2·‖∇_{w'} L‖₁``.
    """

    metric_names = ("gradient_l1", "grad_l1_w", "grad_l1_a")

    def __init__(self, lambda_w: float = 1e-4, lambda_a: float = 0.0,
                 layers: Optional[Sequence[str]] = None,
                 activations: Optional[Sequence[str]] = None, start_step: int = 0,
                 start_epoch: Optional[int] = None, reduction: str = "sum", name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        args = _check("GradientL1", lambda_w=lambda_w, lambda_a=lambda_a, layers=layers,
                      activations=activations, start_step=start_step, start_epoch=start_epoch,
                      reduction=reduction)
        self.lambda_w = args["lambda_w"]
        self.lambda_a = args["lambda_a"]
        self.layer_names = args["layers"]
        self.activation_names = args["activations"]
        self.start_step = args["start_step"] or 0
        self.start_epoch = args["start_epoch"]
        self.reduction = reduction
        if self.lambda_w == 0 and self.lambda_a == 0:
            warnings.warn("GradientL1: lambda_w and lambda_a are both 0; the term does nothing.",
                          stacklevel=2)
        late = self.start_step > 0 or (self.start_epoch or 0) > 0
        if reduction == "sum" and max(self.lambda_w, self.lambda_a) >= _SUM_WARN_LAMBDA and not late:
            warnings.warn(
                f"GradientL1: lambda {max(self.lambda_w, self.lambda_a):g} on the SUM of gradient "
                "magnitudes from step 0 tends to collapse training to chance (λ ≥ 1e-2 did on the "
                "benchmark CNN). Use start_step/start_epoch (train first, then regularize: 1e-3 "
                "from epoch 1 kept FP32 there), a smaller λ (1e-4 is safe from step 0), or "
                "reduction='mean'.", stacklevel=2)
        self._kernels: List = []
        self._kernel_folds: List = []
        self._kernel_sizes: List[int] = []
        self._act_layers: List = []

    # -- config ---------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(lambda_w=self.lambda_w, lambda_a=self.lambda_a, layers=self.layer_names,
                      activations=self.activation_names, start_step=self.start_step,
                      start_epoch=self.start_epoch, reduction=self.reduction)
        return config

    # -- attach ---------------------------------------------------------------------------------
    def _attach(self, model):
        found = kernel_layers(model, self.layer_names, owner="GradientL1")
        self._kernels = [k for _, ks in found for k in ks]
        self._kernel_folds = [_fold_scale(l, k) for l, ks in found for k in ks]
        self._kernel_sizes = [int(np.prod(k.shape)) for k in self._kernels]
        if self.lambda_a > 0:
            if self.activation_names is None:
                self._act_layers = [l for l, _ in found]
            else:
                self._act_layers = _layers_by_name(model, self.activation_names, "GradientL1")
            for layer in self._act_layers:
                _install_hook(layer)
        elif self.activation_names is not None:
            _layers_by_name(model, self.activation_names, "GradientL1")  # validate the names
        if any(type(l).__module__.startswith("tensorflow_model_optimization")
               for l in _walk_layers(model)):
            register_fake_quant_second_order()

    @property
    def kernels(self) -> list:
        """The kernel variables whose gradients count."""
        return list(self._kernels)

    @property
    def activation_layers(self) -> list:
        """The layers whose outputs' gradients count (empty when ``lambda_a == 0``)."""
        return list(self._act_layers)

    def is_on(self, step: int, epoch: Optional[int]) -> bool:
        """Whether the late-start schedule has the term on at ``step`` / ``epoch``."""
        on = step >= self.start_step
        if self.start_epoch is not None:
            on = on and epoch is not None and epoch >= self.start_epoch
        return on

    # -- the functional core --------------------------------------------------------------------
    def _norm_w(self, grads) -> tf.Tensor:
        terms = []
        folds = getattr(self, "_kernel_folds", None) or [None] * len(grads)
        for g, n, info in zip(grads, self._kernel_sizes, folds):
            if info is not None:  # gradient w.r.t. the folded kernel: ∇_w L / s
                scale = fold.batchnorm_scale(info[1])
                inv = tf.math.divide_no_nan(tf.ones_like(scale), scale)
                g = tf.cast(fold.fold_kernel(info[0], g, inv), g.dtype)
            s = tf.reduce_sum(tf.abs(g))
            terms.append(s / n if self.reduction == "mean" else s)
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def _norm_a(self, grads) -> tf.Tensor:
        terms = []
        for g in grads:
            s = tf.reduce_sum(tf.abs(g))
            if self.reduction == "mean":
                per_example = int(np.prod(g.shape[1:])) if g.shape.rank and g.shape[1:].is_fully_defined() else None
                s = s / float(per_example) if per_example else s / tf.cast(
                    tf.reduce_prod(tf.shape(g)[1:]), s.dtype)
            terms.append(s)
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def forward(self, forward_fn, replicas: int = 1):
        """Run ``forward_fn() -> (loss, extra)`` under an inner tape; return the gradient norms.

        ``loss`` is this replica's share of the task loss (Keras scales it by 1/replicas).
        Returns ``(loss, extra, norm_w, norm_a)`` where ``norm_w = Σ‖∇_W L‖₁`` of the all-reduced
        (global-batch) gradient and ``norm_a`` this replica's ``Σ‖∇_a L‖₁``. Call it inside an
        outer ``GradientTape`` to differentiate the norms.
        """
        if self._model is None:
            raise ValueError("GradientL1: attach the term to a model first (TrainingModel does).")
        act_layers = self._act_layers if self.lambda_a > 0 else []
        with tf.GradientTape() as inner, _recording(inner, act_layers) as recorder:
            loss, extra = forward_fn()
        kernels = self._kernels if self.lambda_w > 0 else []
        grads_w, grads_a = inner.gradient(
            loss, (kernels, recorder.tensors),
            unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads_w = [tf.convert_to_tensor(g) for g in grads_w]
        if replicas > 1 and grads_w:
            grads_w = tf.distribute.get_replica_context().all_reduce("sum", grads_w)
        if act_layers and not recorder.tensors:
            raise ValueError(
                "GradientL1: no activation of the layers "
                f"{[l.name for l in act_layers]} was recorded in the forward pass; the layers "
                "must be called (through their __call__/call) by the model.")
        dtype = loss.dtype
        norm_w = tf.cast(self._norm_w(grads_w), dtype) if grads_w else tf.zeros([], dtype)
        norm_a = (tf.cast(self._norm_a(grads_a), dtype) if grads_a else tf.zeros([], dtype))
        return loss, extra, norm_w, norm_a

    def penalty(self, model, x, y, loss, sample_weight=None, training: bool = False) -> dict:
        """The term on one batch, outside a TrainingModel (differentiable inside a tape).

        Args:
            model: the Keras model (the term attaches to it).
            x, y, sample_weight: a batch.
            loss: a Keras loss (callable ``loss(y, y_pred, sample_weight)``), e.g.
                ``keras.losses.SparseCategoricalCrossentropy()``.
            training: forward pass mode.

        Returns:
            dict with ``task_loss``, ``norm_w`` (Σ‖∇_W L‖₁), ``norm_a`` (Σ‖∇_a L‖₁) and ``penalty``
            (``λ_w·norm_w + λ_a·norm_a``).
        """
        self.attach(model)
        loss_fn = keras.losses.get(loss)

        def forward():
            y_pred = model(x, training=training)
            return loss_fn(y, y_pred, sample_weight=sample_weight), y_pred

        task, _, norm_w, norm_a = self.forward(forward)
        return {"task_loss": task, "norm_w": norm_w, "norm_a": norm_a,
                "penalty": self.lambda_w * norm_w + self.lambda_a * norm_a}


class _Learnable(_Term):
    """``e^α · R − β·α`` with a trainable α (shared by all the term's layers)."""

    def __init__(self, beta=1.0, alpha_init=0.0, alpha_max=10.0, layers=None, name=None,
                 _cls="term", **kwargs):
        super().__init__(name=name, **kwargs)
        args = _check(_cls, beta=beta, alpha_init=alpha_init, alpha_max=alpha_max, layers=layers)
        self.beta = args["beta"]
        self.alpha_init = args["alpha_init"]
        self.alpha_max = args["alpha_max"]
        self.layer_names = args["layers"]
        self._targets: List[Tuple] = []  # (layer, kernel, channel_axes)
        self._folds: List = []  # (layer, BatchNorm) or None per target
        self.alpha = None

    def get_config(self):
        config = super().get_config()
        config.update(beta=self.beta, alpha_init=self.alpha_init, alpha_max=self.alpha_max,
                      layers=self.layer_names)
        return config

    def _attach_targets(self, model, owner):
        found = kernel_layers(model, self.layer_names, owner=owner)
        self._targets = [(l, k, grid.channel_axes_for(_unwrap(l)))
                         for l, ks in found for k in ks]
        self._folds = [_fold_scale(l, k) for l, k, _ in self._targets]
        dtype = self._targets[0][1].dtype
        alpha_max = self.alpha_max
        self.alpha = self.add_weight(
            name=f"{self.name}_alpha", shape=(), dtype=dtype,
            initializer=keras.initializers.Constant(self.alpha_init), trainable=True,
            constraint=lambda a: tf.minimum(a, tf.cast(alpha_max, a.dtype)))

    def coefficient(self) -> Tuple[tf.Tensor, tf.Tensor]:
        """``(α_capped, e^α)``."""
        a = tf.minimum(self.alpha, tf.cast(self.alpha_max, self.alpha.dtype))
        return a, tf.exp(a)

    def regularizer_value(self) -> tf.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def cost(self) -> Tuple[tf.Tensor, Dict[str, tf.Tensor]]:
        """``(e^α·R − β·α, metrics)`` for the current weights."""
        r, metrics = self.regularizer_value()
        a, ea = self.coefficient()
        r = tf.cast(r, a.dtype)
        metrics["exp_alpha"] = ea
        return ea * r - self.beta * a, metrics

    @property
    def targets(self) -> list:
        """``[(layer, kernel variable)]`` this term acts on."""
        return [(l, k) for l, k, _ in self._targets]


@register
class LearnableMSQE(_Learnable):
    """Learnable-coefficient MSQE (Choi et al.): ``e^α·R − β·α``, ``R`` the mean squared
    quantization error of each kernel on an n-bit grid with a learnable step δ, summed over the
    kernels.

    Args:
        bits: grid bit width (1..16; 1 is binary ``δ·sign(w)``).
        per_channel: one δ per output channel (``grid.channel_axes_for``) instead of per tensor.
        beta: the ``β`` of ``−β·α`` (``> 0``); at the optimum ``e^α·R = β``.
        alpha_init: initial α (``e^α`` the initial strength).
        alpha_max: cap on α (the variable is clipped after each update and in the cost).
        narrow_range: symmetric narrow grid ``[-(2^(n-1)-1), 2^(n-1)-1]``.
        layers: names of the layers whose kernels are regularized (default: all kernels).
        learn_step: train δ (stored as log δ); ``False`` uses ``grid.default_step`` of the
            current weights every step.

    BatchNorm: a kernel that a BatchNorm folds into is measured as the device quantizes it,
    folded (``w·γ/√(σ²+ε)``, moving statistics; :mod:`tfqreg.fold`): δ is the folded kernel's
    step, and :func:`round_to_grid` sets ``w = Q(w·s)/s`` so that the fold lies on the grid.
    """

    metric_names = ("msqe", "exp_alpha", "delta")

    def __init__(self, bits: int = 4, per_channel: bool = False, beta: float = 1.0,
                 alpha_init: float = 0.0, alpha_max: float = 10.0, narrow_range: bool = False,
                 layers: Optional[Sequence[str]] = None, learn_step: bool = True, name=None,
                 **kwargs):
        super().__init__(beta=beta, alpha_init=alpha_init, alpha_max=alpha_max, layers=layers,
                         name=name, _cls="LearnableMSQE", **kwargs)
        self.bits = _check("LearnableMSQE", bits=bits)["bits"]
        self.per_channel = _checks.check_bool("per_channel", per_channel, "LearnableMSQE")
        self.narrow_range = _checks.check_bool("narrow_range", narrow_range, "LearnableMSQE")
        self.learn_step = _checks.check_bool("learn_step", learn_step, "LearnableMSQE")
        self._log_steps: List = []

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, per_channel=self.per_channel,
                      narrow_range=self.narrow_range, learn_step=self.learn_step)
        return config

    def _axes(self, axes):
        return axes if self.per_channel else None

    def _attach(self, model):
        self._attach_targets(model, "LearnableMSQE")
        self._log_steps = []
        if not self.learn_step:
            return
        used = set()
        for (layer, kernel, axes), info in zip(self._targets, self._folds):
            init = np.log(grid.default_step(_folded(info, kernel), self.bits, self._axes(axes),
                                            self.narrow_range).numpy())
            base = f"{_unwrap(layer).name}_{_short_name(kernel)}".replace("_kernel", "")
            base = base if base not in used else f"{base}_{len(used)}"
            used.add(base)
            self._log_steps.append(self.add_weight(
                name=f"{base}_log_step", shape=init.shape, dtype=kernel.dtype,
                initializer=keras.initializers.Constant(init), trainable=True))

    def steps(self) -> List[tf.Tensor]:
        """The current step δ of each target kernel (learned, or the default step)."""
        if self.learn_step:
            return [tf.exp(s) for s in self._log_steps]
        return [tf.stop_gradient(grid.default_step(_folded(info, k), self.bits,
                                                   self._axes(axes), self.narrow_range))
                for (_, k, axes), info in zip(self._targets, self._folds)]

    def reset_steps(self) -> None:
        """Re-initialise every δ to ``grid.default_step`` of the current kernels (e.g. after
        loading pretrained weights into the inner model)."""
        for s, (_, k, axes), info in zip(self._log_steps, self._targets, self._folds):
            s.assign(tf.math.log(grid.default_step(_folded(info, k), self.bits,
                                                   self._axes(axes), self.narrow_range)))

    def regularizer_value(self):
        r, step_sum, step_n = 0.0, 0.0, 0
        for (_, k, _), step, info in zip(self._targets, self.steps(), self._folds):
            w = _folded(info, k)
            q = grid.fake_quant(w, step, self.bits, self.narrow_range)
            r += tf.reduce_mean(tf.square(w - q))  # per-tensor MSQE, summed over tensors
            step_sum += tf.reduce_sum(step)
            step_n += int(np.prod(step.shape)) if step.shape.rank else 1
        return r, {"msqe": r, "delta": step_sum / float(step_n)}

    def quantized(self) -> List[Tuple]:
        """``[(kernel variable, value)]``: ``Q(kernel)`` on the learned grid, or for a kernel that
        a BatchNorm folds into, ``Q(w·s)/s`` (its fold lies on the grid)."""
        return [(k, _unfolded(info, k, grid.fake_quant(_folded(info, k), step, self.bits,
                                                       self.narrow_range)))
                for (_, k, _), step, info in zip(self._targets, self.steps(), self._folds)]


@register
class LearnablePartialL2(_Learnable):
    """Learnable-coefficient partial L2 for pruning (Choi et al.): ``e^α·P − β·α`` with
    ``P = Σ_l (1/N_l) Σ_{|w|≤θ_l} w²``, θ_l the ``fraction`` quantile of |w| per tensor (recomputed
    every step).

    Args:
        fraction: share of each kernel's weights (smallest |w|) that is penalised, in (0, 1).
        beta, alpha_init, alpha_max, layers: as :class:`LearnableMSQE`.
    """

    metric_names = ("partial_l2", "exp_alpha")

    def __init__(self, fraction: float = 0.8, beta: float = 1.0, alpha_init: float = 0.0,
                 alpha_max: float = 10.0, layers: Optional[Sequence[str]] = None, name=None,
                 **kwargs):
        super().__init__(beta=beta, alpha_init=alpha_init, alpha_max=alpha_max, layers=layers,
                         name=name, _cls="LearnablePartialL2", **kwargs)
        self.fraction = _check("LearnablePartialL2", fraction=fraction)["fraction"]

    def get_config(self):
        config = super().get_config()
        config.update(fraction=self.fraction)
        return config

    def _attach(self, model):
        self._attach_targets(model, "LearnablePartialL2")

    def thresholds(self) -> List[tf.Tensor]:
        """θ of each target kernel: the ``fraction`` quantile of |w| (a constant for autodiff)."""
        out = []
        for _, k, _ in self._targets:
            a = tf.reshape(tf.abs(tf.stop_gradient(k)), [-1])
            n = int(np.prod(k.shape))
            idx = int(math.floor(self.fraction * n))
            if idx == 0:
                out.append(tf.constant(-1.0, k.dtype))  # nothing penalised
            else:
                out.append(tf.sort(a)[idx - 1])
        return out

    def regularizer_value(self):
        p = 0.0
        for (_, k, _), theta in zip(self._targets, self.thresholds()):
            mask = tf.cast(tf.abs(k) <= theta, k.dtype)
            p += tf.reduce_mean(mask * tf.square(k))  # per tensor, summed over tensors
        return p, {"partial_l2": p}

    def pruning_masks(self) -> Dict[str, np.ndarray]:
        """``{kernel variable name: bool mask}`` of the weights to KEEP (|w| > θ)."""
        return {k.name: (np.abs(k.numpy()) > float(t))
                for (_, k, _), t in zip(self._targets, self.thresholds())}


_ALIASES = {
    "gradient_l1": GradientL1,
    "gradient-l1": GradientL1,
    "msqe": LearnableMSQE,
    "learnable_msqe": LearnableMSQE,
    "partial_l2": LearnablePartialL2,
    "learnable_partial_l2": LearnablePartialL2,
}


def get(identifier) -> _Term:
    """A term from an instance, a short alias (``"gradient_l1"``, ``"msqe"``, ``"partial_l2"``),
    a registered class name, or a config dict (:func:`serialize` output)."""
    if isinstance(identifier, _Term):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key in _ALIASES:
            return _ALIASES[key]()
        for cls in (GradientL1, LearnableMSQE, LearnablePartialL2):
            if identifier in (cls.__name__, f"tfqreg>{cls.__name__}"):
                return cls()
    if isinstance(identifier, dict):
        return keras.layers.deserialize(identifier)
    raise ValueError(f"`terms`: cannot interpret {identifier!r} as a tfqreg training term; use "
                     f"a GradientL1/LearnableMSQE/LearnablePartialL2 instance or one of "
                     f"{sorted(_ALIASES)}.")


def serialize(term: _Term) -> dict:
    """Keras serialization of a term (round-trips through :func:`get`)."""
    return keras.layers.serialize(term)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class _ScheduleCallback(keras.callbacks.Callback):
    def __init__(self, owner):
        super().__init__()
        self._owner = owner
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self._owner.update_schedule(epoch=self._epoch)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._owner.update_schedule(epoch=epoch)

    def on_train_batch_begin(self, batch, logs=None):
        if not self._owner._gl1_on:
            self._owner.update_schedule(epoch=self._epoch)


@register
class TrainingModel(keras.Model):
    """A Keras model that trains ``inner`` with tfqreg's training-step terms.

    ``call`` delegates to ``inner``; ``train_step`` minimises
    ``task loss + inner.losses + Σ terms``. ``fit`` logs ``loss`` (the total), ``task_loss``,
    the compiled metrics, and per term ``gradient_l1`` (its cost), ``grad_l1_w`` / ``grad_l1_a``
    (the norms), ``msqe``, ``exp_alpha``, ``delta`` (mean δ), ``partial_l2``; a metric name used
    by two terms is prefixed with the term's name. ``evaluate`` reports the usual Keras
    ``loss`` (task + ``inner.losses``) and compiled metrics.

    Args:
        inner: the Keras 2 model to train (built, or buildable with ``build(input_shape)``).
        terms: term instances or aliases (``"gradient_l1"``, ``"msqe"``, ``"partial_l2"``);
            at most one :class:`GradientL1`.
    """

    def __init__(self, inner, terms: Iterable = (), name: Optional[str] = None, **kwargs):
        check_keras2(inner, "inner", kind=keras.Model)
        super().__init__(name=name or f"training_{inner.name}", **kwargs)
        self.inner = inner
        if isinstance(terms, (str, _Term)):
            terms = [terms]  # one term, not the characters of its alias
        terms = [get(t) for t in (terms or [])]
        if sum(isinstance(t, GradientL1) for t in terms) > 1:
            raise ValueError("`terms`: at most one GradientL1 per TrainingModel (combine the "
                             "layers in one term).")
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"`terms`: term names must be unique, got {names}.")
        self.terms = terms
        self._gl1 = next((t for t in terms if isinstance(t, GradientL1)), None)
        self._learnable = [t for t in terms if isinstance(t, _Learnable)]
        self._gl1_on = self._gl1 is not None and self._gl1.is_on(0, 0)
        # metric names: unique across terms
        counts: Dict[str, int] = {}
        for t in terms:
            for m in t.metric_names:
                counts[m] = counts.get(m, 0) + 1
        self._metric_keys = {
            (t.name, m): (m if counts[m] == 1 else f"{t.name}_{m}")
            for t in terms for m in t.metric_names}
        # not tracked as attributes: metric variables are not model weights (reset via `metrics`)
        # named total_loss: a tracker named "loss" would shadow Keras' own in evaluate()
        object.__setattr__(self, "_loss_tracker", keras.metrics.Mean(name="total_loss"))
        object.__setattr__(self, "_term_trackers", {key: keras.metrics.Mean(name=key)
                                                    for key in self._metric_keys.values()})
        if inner.built:
            self._attach_terms()
            self._build_input_shape = getattr(inner, "_build_input_shape", None)
            self.built = True
        elif terms and not getattr(inner, "_build_input_shape", None) and not isinstance(
                inner, keras.Sequential):
            raise ValueError(f"`inner` ({inner.name}) is not built and has no input shape, so "
                             "its kernels (which the terms act on) do not exist yet: build it "
                             "(`inner.build(input_shape)`, or give its first layer an "
                             "input_shape / an Input) before wrapping it.")

    # -- structure ------------------------------------------------------------------------------
    def _attach_terms(self):
        for t in self.terms:
            t.attach(self.inner)

    def build(self, input_shape):
        if not self.inner.built:
            self.inner.build(input_shape)
        self._attach_terms()
        self._build_input_shape = input_shape
        self.built = True

    def call(self, inputs, training=None, mask=None):
        return self.inner(inputs, training=training)

    def get_config(self):
        return {"name": self.name,
                "inner": keras.layers.serialize(self.inner),
                "terms": [serialize(t) for t in self.terms]}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        # keras.layers.deserialize knows every built-in layer and model class in both the
        # .keras and the legacy (SavedModel / h5) serialization formats
        inner = keras.layers.deserialize(config["inner"], custom_objects=custom_objects)
        terms = [keras.layers.deserialize(t, custom_objects=custom_objects)
                 for t in config.get("terms", [])]
        return cls(inner, terms=terms, name=config.get("name"))

    @property
    def metrics(self):
        base = super().metrics
        mine = [self._loss_tracker] + list(self._term_trackers.values())
        ids = {id(m) for m in mine}
        return [m for m in base if id(m) not in ids] + mine

    def make_train_function(self, force=False):
        # Under MultiWorkerMirroredStrategy, Keras' default ("auto" -> "sum") sums the metric
        # results of the workers, which are already global, so every logged value would be
        # num_workers times too large. "first" reports the (global) value of the first replica.
        strategy = self.distribute_strategy
        if (self._distribute_reduction_method is None
                and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
                and strategy.extended._in_multi_worker_mode()):  # pylint: disable=protected-access
            self.distribute_reduction_method = "first"
        return super().make_train_function(force=force)

    # -- schedule -------------------------------------------------------------------------------
    def update_schedule(self, epoch: Optional[int] = None, step: Optional[int] = None) -> bool:
        """Switch the gradient-ℓ1 term on once its ``start_step``/``start_epoch`` is reached.

        Called by ``fit`` (a callback) and ``train_on_batch``; returns whether the term is on.
        Switching retraces the train function once.
        """
        if self._gl1 is None or self._gl1_on:
            return self._gl1_on
        if step is None:
            step = int(self.optimizer.iterations.numpy()) if self.optimizer is not None else 0
        if self._gl1.is_on(step, epoch):
            self._gl1_on = True
            if self.train_function is not None:
                self.make_train_function(force=True)
        return self._gl1_on

    def fit(self, *args, **kwargs):
        if self._gl1 is not None and not self._gl1_on:
            callbacks = list(kwargs.get("callbacks") or [])
            kwargs["callbacks"] = [_ScheduleCallback(self)] + callbacks
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        if self._gl1 is not None and not self._gl1_on:
            self.update_schedule(epoch=None if self._gl1.start_epoch is not None else 0)
        return super().train_on_batch(*args, **kwargs)

    # -- steps ----------------------------------------------------------------------------------
    def _task(self, x, y, sample_weight):
        y_pred = self(x, training=True)
        return self.compiled_loss(y, y_pred, sample_weight), y_pred

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        gl1 = self._gl1 if self._gl1_on else None
        values = {}
        with tf.GradientTape() as tape:
            if gl1 is not None:
                task, y_pred, norm_w, norm_a = gl1.forward(
                    lambda: self._task(x, y, sample_weight), replicas=replicas)
                # per-replica contribution; norm_w is the same on every replica, norm_a is local
                gl1_local = (gl1.lambda_w / replicas) * norm_w + gl1.lambda_a * norm_a
                gl1_global = gl1.lambda_w * norm_w + (gl1.lambda_a * replicas) * norm_a
                values.update(gradient_l1=gl1_global, grad_l1_w=norm_w,
                              grad_l1_a=norm_a * replicas)
            else:
                task, y_pred = self._task(x, y, sample_weight)
                gl1_local = gl1_global = None
                if self._gl1 is not None:
                    zero = tf.zeros([], task.dtype)
                    values.update(gradient_l1=zero, grad_l1_w=zero, grad_l1_a=zero)
            total_local = task
            total_global = task * replicas
            if self.losses:
                reg = tf.add_n([tf.cast(l, task.dtype) for l in self.losses])
                total_local += reg / replicas
                total_global += reg
            term_values = {}
            for term in self._learnable:
                cost, metrics = term.cost()
                cost = tf.cast(cost, task.dtype)
                total_local += cost / replicas
                total_global += cost
                term_values[term.name] = metrics
            if gl1_local is not None:
                total_local += gl1_local
                total_global += gl1_global
        self.optimizer.minimize(total_local, self.trainable_variables, tape=tape)

        self._loss_tracker.update_state(total_global)
        if self._gl1 is not None:
            for m, v in values.items():
                self._term_trackers[self._metric_keys[(self._gl1.name, m)]].update_state(v)
        for term in self._learnable:
            for m, v in term_values[term.name].items():
                self._term_trackers[self._metric_keys[(term.name, m)]].update_state(v)
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return self._logs(train=True)

    def _logs(self, train: bool):
        logs = {}
        loss_metrics = list(self.compiled_loss.metrics) if self.compiled_loss else []
        if train:
            logs["loss"] = self._loss_tracker.result()
            if loss_metrics:
                logs["task_loss"] = loss_metrics[0].result()
        elif loss_metrics:
            logs["loss"] = loss_metrics[0].result()
        for m in loss_metrics[1:]:
            logs[m.name] = m.result()
        for m in (self.compiled_metrics.metrics if self.compiled_metrics else []):
            result = m.result()
            if isinstance(result, dict):
                logs.update(result)
            else:
                logs[m.name] = result
        if train:
            for key, tracker in self._term_trackers.items():
                logs[key] = tracker.result()
        return logs

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        y_pred = self(x, training=False)
        self.compute_loss(x, y, y_pred, sample_weight)
        self.compiled_metrics.update_state(y, y_pred, sample_weight)
        return self._logs(train=False)

    # -- export ---------------------------------------------------------------------------------
    def round_to_grid(self):
        """Snap the kernels of every :class:`LearnableMSQE` term to its learned grid."""
        return round_to_grid(self)


def round_to_grid(model_or_term, bits: Optional[int] = None, per_channel: bool = False,
                  narrow_range: bool = False):
    """Snap kernels to the grid: ``w ← Q_δ(w)`` with the learned δ; a kernel that a BatchNorm
    folds into gets ``w ← Q_δ(w·s)/s``, so that the folded kernel the device quantizes lies on
    the grid (:mod:`tfqreg.fold`).

    Args:
        model_or_term: a :class:`TrainingModel` (every :class:`LearnableMSQE` term), a
            :class:`LearnableMSQE` term or a list of them, or a plain Keras model together with
            ``bits`` (then δ = ``grid.default_step`` per tensor / per channel, all kernels).
        bits, per_channel, narrow_range: only for a plain Keras model.

    Returns:
        The model (the TrainingModel, the term's model, or the plain model).
    """
    if isinstance(model_or_term, (list, tuple)):
        model = None
        for t in model_or_term:
            model = round_to_grid(t)
        return model
    if isinstance(model_or_term, LearnableMSQE):
        if not model_or_term.attached:
            raise ValueError("round_to_grid: the LearnableMSQE term is not attached to a model.")
        for kernel, q in model_or_term.quantized():
            kernel.assign(q)
        return model_or_term.model
    check_keras2(model_or_term, "model_or_term", kind=keras.Model)
    if isinstance(model_or_term, TrainingModel):
        msqe = [t for t in model_or_term.terms if isinstance(t, LearnableMSQE)]
        if not msqe:
            raise ValueError("round_to_grid: the TrainingModel has no LearnableMSQE term; pass "
                             "the inner model with `bits=` to round to the default grid.")
        if not all(t.attached for t in msqe):
            raise ValueError("round_to_grid: the model is not built yet (no grid to round to).")
        for t in msqe:
            round_to_grid(t)
        return model_or_term
    if bits is None:
        raise ValueError("round_to_grid: `bits` is required for a plain Keras model.")
    bits = grid.check_bits(bits)
    for layer, kernels in kernel_layers(model_or_term, None, owner="round_to_grid"):
        axes = grid.channel_axes_for(_unwrap(layer)) if per_channel else None
        for k in kernels:
            info = _fold_scale(layer, k)
            w = _folded(info, k)
            step = grid.default_step(w, bits, axes, narrow_range)
            k.assign(_unfolded(info, k, grid.fake_quant(w, step, bits, narrow_range)))
    return model_or_term
