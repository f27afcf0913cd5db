"""Gradient-ℓ1 (Alizadeh et al., ICLR 2020): ``λ_w Σ_l ‖∇_{W_l} L‖₁ + λ_a Σ_l ‖∇_{a_l} L‖₁``.

Quantizing a tensor with step δ moves each element by at most δ/2, so to first order the loss
rises by at most ``δ/2 · ‖∇L‖₁``: a model with small gradient ℓ1 norms survives any bit width.

Two ways to compute the gradient of the term (``method=``)
------------------------------------------------------------
* ``"exact"``: double backprop. An inner ``GradientTape`` gives ``∇L``, an outer one
  differentiates ``L + λ‖∇L‖₁`` through it: one forward pass, a backward pass and the backward
  pass of the backward pass (2.45 plain steps on the benchmark CNN, weights and activations).
  Both methods take their gradients with the max-pool and ReLU rules of
  :func:`tfqreg.training.fast_second_order` (same values, smaller kernels).
* ``"finite_difference"``: the gradient of ``‖g‖₁`` (``g = ∇_W L``) is ``H·v`` with
  ``v = sign(g)`` (weighted as the norm is) and ``H`` the Hessian, one Hessian-vector product,
  which ``(∇L(W + ε·v) − ∇L(W)) / ε`` approximates with ONE more forward and backward pass
  (~2 plain steps). The activation term is the same directional derivative: perturbing every
  recorded activation ``a_l`` by ``ε_a·sign(∇_{a_l} L)`` in the same second pass adds
  ``ε_a·∇_θ Σ_l ‖∇_{a_l} L‖₁`` to its gradient. Both perturbations share one pass, with
  ``ε_w = t·λ_w`` and ``ε_a = t·λ_a``, so ``(g' − g)/t`` is the whole term's gradient.
  ``t`` is scale-free: the weight perturbation's RMS is ``epsilon`` times the kernels' RMS (or,
  for activations only, the activations'). This is the "gradient norm penalty" estimator of
  Zhao et al. (ICML 2022), for the ℓ1 norm. It needs a deterministic forward pass (no Dropout
  or random augmentation layers in the model: refused with a clear error), and the second pass
  leaves BatchNorm moving statistics (every non-trainable variable that the forward pass
  updates) as the first pass left them. It treats ``v``'s dependence on the BatchNorm scale of
  a folded kernel as constant (the exact form differentiates it).

Activations read by a max pool
------------------------------
When a recorded activation's only reader is a max pool with non-overlapping windows (stride ≥
window, as in conv → ReLU → 2×2 pool), its gradient is the pool output's gradient routed to one
element per window: the same ℓ1 norm, and the same outer gradient. Both methods then take the
gradient at the pool's output (a quarter of the size for 2×2 windows), and the finite
difference perturbs the pool's output by ``ε_a·sign(∇_p L)`` instead (the same directional
derivative; for this the pool must be a Keras ``MaxPooling2D``/``MaxPooling3D`` layer). This
needs a traced graph (``tf.function``, as ``fit`` runs), where the pool can be seen to be the
only reader; eager execution computes at full size, with the same values.

Lazy regularization (``every=k``): the term is computed on every k-th step only, scaled by k
(StyleGAN2's lazy R1), so its average cost is ``1/k`` of the extra cost.

What ``λ`` means (``reduction=``)
---------------------------------
* ``"sum"``: the paper's form, ``Σ |g|`` over all elements; its size grows with the model.
* ``"mean"``: each tensor's ℓ1 norm divided by its size (per example for activations).
* ``"step"``: each tensor's ℓ1 norm times half its ``bits``-bit quantization step
  (``δ = max|W'|/(2^(b−1)−1)`` per tensor for kernels, ``δ = (max(a,0) − min(a,0))/(2^b − 1)``
  per batch for activations, both held constant): the term is the first-order bound on the loss
  increase from rounding to that grid, in units of the loss, so ``λ`` is dimensionless and does
  not change when a layer's weights are rescaled (ReLU networks are invariant to moving scale
  between layers; the bound is, the raw ``Σ|g|`` is not).
"""

from __future__ import annotations

import warnings
from typing import List, Optional, Sequence

import numpy as np

from tfqreg import fold
from tfqreg._keras import register, tf
from tfqreg.training._capture import (_install_hook, _install_pool_hook, _recording,
                                      pooled_view)
from tfqreg.training._second_order import fast_second_order, register_fake_quant_second_order
from tfqreg.training._common import (_KERNEL_NAMES, _check, _fold_scale, _is_keras3, _layer_types,
                                     _layers_by_name, _short_name, _Term, _unwrap, _walk_layers,
                                     keras_of, kernel_layers)

__all__ = ["GradientL1"]

_SUM_WARN_LAMBDA = 1e-3  # gradient-ℓ1 (sum) at or above this from step 0 tends to kill training
_FROZEN_NAMES = set(_KERNEL_NAMES) | {"bias", "embeddings", "gamma", "beta"}


@tf.custom_gradient
def _abs_sum(g):
    """``Σ|g|``, whose gradient ``dy·sign(g)`` multiplies by the scalar ``dy`` directly.

    Same values as ``reduce_sum(abs(g))``, whose registered gradient first broadcasts ``dy`` to
    ``g``'s shape (a Tile the size of ``g``); on a conv net's activation gradients, millions of
    elements per tensor, that pass is a measurable part of the step.
    """
    def grad(dy):
        return dy * tf.sign(g)

    return tf.reduce_sum(tf.abs(g)), grad


def _after(grads_a: list, grads: Sequence) -> list:
    """The activation gradients ``grads_a``, made to wait (in a graph) for the weight gradients
    ``grads`` of the same backward pass.

    The element-wise passes over activation gradients (millions of values: signs, norms,
    offsets) then run after the whole backward pass: run beside it, they slowed its
    convolutions by more than they overlapped (``exact_wa`` / ``fd_wa`` in
    ``benchmarks/step_time.py``). Eager execution runs in order anyway.
    """
    done = [g for g in grads if isinstance(g, tf.Tensor)]
    if not grads_a or not done:
        return list(grads_a)
    with tf.control_dependencies(done):
        return [tf.identity(g) for g in grads_a]


def _pool_output(activation, noted):
    """The max-pool layer output ``noted`` for ``activation`` when the graph shows that pool as
    the activation's only reader, with non-overlapping windows (:func:`pooled_view`)."""
    view = pooled_view(activation)
    if view is None or noted is None or getattr(noted, "name", None) != view.name:
        return None
    return noted


def _random_layer_types() -> tuple:
    """Keras 2 and Keras 3 layers whose training-mode forward pass draws random numbers."""
    return _layer_types((
        "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
        "GaussianDropout", "AlphaDropout", "RandomFlip", "RandomRotation", "RandomZoom",
        "RandomTranslation", "RandomContrast", "RandomCrop", "RandomHeight", "RandomWidth",
        "RandomBrightness"))


def _assign(variables: Sequence, values: Sequence) -> None:
    """``v.assign(x)`` for each pair, from a replica context of any ``tf.distribute`` strategy
    (a mirrored variable is updated on every device with that replica's value)."""
    if not variables:
        return
    # a Keras 3 variable wraps a tf.Variable (a distributed one under a strategy): update that
    variables = [v.value if _is_keras3(v) else v for v in variables]
    if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
        for v, x in zip(variables, values):
            v.assign(x)
        return
    on_read = [i for i, v in enumerate(variables)
               if getattr(v, "synchronization", None) == tf.VariableSynchronization.ON_READ]
    for i in on_read:  # sync-on-read (e.g. BatchNorm statistics): each replica owns its copy
        variables[i].assign(values[i])
    rest = [i for i in range(len(variables)) if i not in set(on_read)]
    if not rest:
        return
    mirrored = [variables[i] for i in rest]

    def merge(strategy, *vals):
        for v, x in zip(mirrored, vals):
            strategy.extended.update(v, lambda var, t: var.assign(t), args=(x,), group=False)

    tf.distribute.get_replica_context().merge_call(merge, args=tuple(values[i] for i in rest))


@register
class GradientL1(_Term):
    """Gradient-ℓ1 regularization ``λ_w Σ‖∇_W L‖₁ + λ_a Σ‖∇_a L‖₁`` (see the module docstring).

    Args:
        lambda_w: strength on the kernels' gradients (``>= 0``). Its meaning depends on
            ``reduction``. Default 1e-3 on the ``"step"`` scale, chosen on four architectures
            (``benchmarks/defaults_transfer.py``: a small CNN, an MLP and two BatchNorm models,
            2-5 seeds, 3 epochs): it cost ≤ 0.3 pt FP32 on each and raised per-tensor W3 by
            28-34 pt on the BatchNorm models, within noise on the BatchNorm-free ones
            (+0.1 / +0.2 pt). The default before, 3e-3, cost 0.6 pt FP32 on the residual
            BatchNorm model and lowered the small CNN's W3 (−0.4 pt, 5 seeds); saved configs
            carry their λ. With ``reduction="sum"`` (the paper's form, the default before that:
            1e-4, which changed nothing) λ ≥ 1e-2 from scratch collapsed the CNN to chance, so a
            warning is raised for λ ≥ 1e-3 without a late start.
        lambda_a: strength on the activations' gradients (``>= 0``; 0 disables the capture).
            Default 1e-3 (``"step"`` scale), measured together with ``lambda_w``.
        layers: names of the layers whose kernels count (default: all Dense/Conv/Depthwise/
            Separable kernels, incl. larq ``Quant*`` and TFMOT-wrapped ones).
        activations: ``None`` for the outputs of the ``layers`` layers, or a list of layer names.
        start_step: optimizer step from which the term is on.
        start_epoch: epoch (0-based) from which the term is on (``fit`` only).
        reduction: ``"step"`` (default), ``"sum"`` or ``"mean"`` (module docstring). Saved
            configs carry theirs, so a model saved with the old default keeps ``"sum"``.
        bits: the grid of ``reduction="step"`` (2..16).
        method: ``"exact"`` (double backprop, the default) or ``"finite_difference"`` (one
            extra forward and backward pass instead of a second-order one: 1.94 plain steps
            against 2.45 on the benchmark CNN, weights and activations, 1.27 with ``every=4``,
            in ``benchmarks/step_time.py``). At the default λ both fast forms matched the exact
            one within noise on four architectures (``benchmarks/defaults_transfer.py``, same
            seeds), coarsely on the BatchNorm ones; the finite difference refuses models with
            random layers, so it is not the default.
        every: compute the term every ``every``-th step, scaled by ``every`` (1: every step).
        epsilon: relative size of the finite-difference perturbation (``(0, 0.5]``).

    BatchNorm: for a kernel that a BatchNorm folds into (:mod:`tfqreg.fold`), the weight term is
    the gradient with respect to the FOLDED kernel ``w' = w·s`` (``s = γ/√(σ²+ε)``, moving
    statistics), ``∇_{w'} L = ∇_w L / s`` per channel: the device quantizes ``w'``, so the
    first-order loss increase of its rounding is ``δ'/2·‖∇_{w'} L‖₁``.
    """

    metric_names = ("gradient_l1", "grad_l1_w", "grad_l1_a")

    def __init__(self, lambda_w: float = 1e-3, lambda_a: float = 1e-3,
                 layers: Optional[Sequence[str]] = None,
                 activations: Optional[Sequence[str]] = None, start_step: int = 0,
                 start_epoch: Optional[int] = None, reduction: str = "step", bits: int = 4,
                 method: str = "exact", every: int = 1, epsilon: float = 1e-3, name=None,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        args = _check("GradientL1", lambda_w=lambda_w, lambda_a=lambda_a, layers=layers,
                      activations=activations, start_step=start_step, start_epoch=start_epoch,
                      reduction=reduction, bits=bits, method=method, every=every,
                      epsilon=epsilon)
        if args["bits"] < 2:
            raise ValueError(f"GradientL1: `bits` must be >= 2, got {args['bits']}.")
        self.lambda_w = args["lambda_w"]
        self.lambda_a = args["lambda_a"]
        self.layer_names = args["layers"]
        self.activation_names = args["activations"]
        self.start_step = args["start_step"] or 0
        self.start_epoch = args["start_epoch"]
        self.reduction = reduction
        self.bits = args["bits"]
        self.method = method
        self.every = args["every"]
        self.epsilon = args["epsilon"]
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
                "reduction='step'.", stacklevel=2)
        self._kernels: List = []
        self._kernel_folds: List = []
        self._kernel_sizes: List[int] = []
        self._act_layers: List = []

    # -- config ---------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(lambda_w=self.lambda_w, lambda_a=self.lambda_a, layers=self.layer_names,
                      activations=self.activation_names, start_step=self.start_step,
                      start_epoch=self.start_epoch, reduction=self.reduction, bits=self.bits,
                      method=self.method, every=self.every, epsilon=self.epsilon)
        return config

    # -- attach ---------------------------------------------------------------------------------
    def _attach(self, model):
        found = kernel_layers(model, self.layer_names, owner="GradientL1")
        self._set("_kernels", [k for _, ks in found for k in ks])
        self._set("_kernel_folds", [_fold_scale(l, k) for l, ks in found for k in ks])
        self._kernel_sizes = [int(np.prod(k.shape)) for k in self._kernels]
        if self.lambda_a > 0:
            if self.activation_names is None:
                self._set("_act_layers", [l for l, _ in found])
            else:
                self._set("_act_layers",
                          _layers_by_name(model, self.activation_names, "GradientL1"))
            for layer in self._act_layers:
                _install_hook(layer)
        elif self.activation_names is not None:
            _layers_by_name(model, self.activation_names, "GradientL1")  # validate the names
        layers = _walk_layers(model)
        if self.lambda_a > 0 and self.method == "finite_difference":
            pools = _layer_types(("MaxPooling2D", "MaxPooling3D"))
            for layer in layers:  # the second pass offsets a pooled activation after its pool
                if isinstance(_unwrap(layer), pools):
                    _install_pool_hook(_unwrap(layer))
        if any(type(l).__module__.startswith("tensorflow_model_optimization") for l in layers):
            register_fake_quant_second_order()
        random_types = _random_layer_types()
        random_layers = [l.name for l in layers if isinstance(_unwrap(l), random_types)]
        if self.method == "finite_difference" and random_layers:
            raise ValueError(
                f"GradientL1(method='finite_difference'): model '{model.name}' has random "
                f"layers {random_layers}; the finite difference compares two forward "
                "passes, which must draw the same numbers. Use method='exact', or move the "
                "random augmentation into the tf.data pipeline.")

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
        """``Σ_l c_l ‖∇_{W'_l} L‖₁`` for the kernels' gradients ``grads`` (same order)."""
        terms = []
        folds = getattr(self, "_kernel_folds", None) or [None] * len(grads)
        levels = float(2 ** (self.bits - 1) - 1)
        for g, n, info, k in zip(grads, self._kernel_sizes, folds, self._kernels):
            w = k
            if info is not None:  # gradient w.r.t. the folded kernel: ∇_w L / s
                scale = fold.batchnorm_scale(info[1])
                inv = tf.math.divide_no_nan(tf.ones_like(scale), scale)
                g = tf.cast(fold.fold_kernel(info[0], g, inv), g.dtype)
                w = fold.fold_kernel(info[0], k, scale)
            s = _abs_sum(g)
            if self.reduction == "mean":
                s = s / n
            elif self.reduction == "step":
                step = tf.stop_gradient(tf.cast(tf.reduce_max(tf.abs(w)), s.dtype)) / levels
                s = 0.5 * step * s
            terms.append(s)
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def _coefs_a(self, grads, activations) -> List[tf.Tensor]:
        """The per-tensor factors ``c_l`` of the activation term (``reduction``): 1 (sum), one
        over the elements per example (mean), half the ``bits``-bit step of the activation's
        range (step; no gradient flows through the range)."""
        coefs = []
        levels = float(2 ** self.bits - 1)
        for g, a in zip(grads, activations):
            dtype = g.dtype
            if self.reduction == "mean":  # per element of the activation (not of its view)
                per_example = (int(np.prod(a.shape[1:]))
                               if a.shape.rank and a.shape[1:].is_fully_defined() else None)
                c = (tf.constant(1.0 / per_example, dtype) if per_example else
                     1.0 / tf.cast(tf.reduce_prod(tf.shape(a)[1:]), dtype))
            elif self.reduction == "step":
                a = tf.stop_gradient(tf.cast(a, dtype))
                span = tf.maximum(tf.reduce_max(a), 0.0) - tf.minimum(tf.reduce_min(a), 0.0)
                c = 0.5 * (span / levels)
            else:
                c = tf.constant(1.0, dtype)
            coefs.append(c)
        return coefs

    def _norm_a(self, grads, activations, coefs=None) -> tf.Tensor:
        """``Σ_l c_l ‖∇_{a_l} L‖₁`` for the recorded activations and their gradients."""
        coefs = self._coefs_a(grads, activations) if coefs is None else coefs
        terms = [c * _abs_sum(g) for g, c in zip(grads, coefs)]
        return tf.add_n(terms) if terms else tf.constant(0.0)

    def _check_attached(self):
        if self._model is None:
            raise ValueError("GradientL1: attach the term to a model first (TrainingModel does).")

    def forward(self, forward_fn, replicas: int = 1):
        """Exact form: run ``forward_fn() -> (loss, extra)`` under an inner tape; return the
        gradient norms, differentiable by an enclosing ``GradientTape``.

        ``loss`` is this replica's share of the task loss (Keras scales it by 1/replicas).
        Returns ``(loss, extra, norm_w, norm_a)`` where ``norm_w`` is the weight norm of the
        all-reduced (global-batch) gradient and ``norm_a`` this replica's activation norm.
        """
        self._check_attached()
        act_layers = self._act_layers if self.lambda_a > 0 else []
        with tf.GradientTape() as inner, _recording(inner, act_layers) as recorder:
            loss, extra = forward_fn()
        kernels = self._kernels if self.lambda_w > 0 else []
        # the gradient of an activation read only by a non-overlapping max pool, taken at the
        # pool's output: same norm, and the same outer gradient (module `_capture`)
        views = [pooled_view(a) for a in recorder.tensors]
        views = [a if v is None else v for a, v in zip(recorder.tensors, views)]
        with fast_second_order():
            grads_w, grads_a = inner.gradient(
                loss, (kernels, views), unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads_w = [tf.convert_to_tensor(g) for g in grads_w]
        grads_a = _after(grads_a, grads_w)
        if replicas > 1 and grads_w:
            grads_w = tf.distribute.get_replica_context().all_reduce("sum", grads_w)
        self._check_recorded(act_layers, recorder)
        dtype = loss.dtype
        norm_w = tf.cast(self._norm_w(grads_w), dtype) if grads_w else tf.zeros([], dtype)
        norm_a = (tf.cast(self._norm_a(grads_a, recorder.tensors), dtype) if grads_a
                  else tf.zeros([], dtype))
        return loss, extra, norm_w, norm_a

    @staticmethod
    def _check_recorded(act_layers, recorder):
        if act_layers and not recorder.tensors:
            raise ValueError(
                "GradientL1: no activation of the layers "
                f"{[l.name for l in act_layers]} was recorded in the forward pass; the layers "
                "must be called (through their __call__/call) by the model.")

    def finite_difference(self, model, forward_fn, extra_cost_fn, variables, replicas: int = 1,
                          scale: float = 1.0, protect: Sequence = ()):
        """Finite-difference form: the gradients of ``task + extra + scale·term``.

        Args:
            model: the model whose non-trainable state the second pass must not change.
            forward_fn: ``() -> (task_loss, y_pred)``, this replica's share of the task loss.
            extra_cost_fn: ``() -> tensor or None``, the other costs (regularizer losses,
                learnable terms), differentiated once.
            variables: the variables to differentiate (``model.trainable_variables``).
            replicas: replicas in sync (the weight term uses the global-batch gradient).
            scale: multiplies the term (``every`` for lazy regularization).
            protect: more variables the second pass must leave unchanged (e.g. the loss
                metric that ``forward_fn`` updates).

        Returns:
            ``(grads, task_loss, y_pred, extra_cost, norm_w, norm_a)``.
        """
        self._check_attached()
        act_layers = self._act_layers if self.lambda_a > 0 else []
        use_w = self.lambda_w > 0
        with tf.GradientTape(persistent=True) as tape, _recording(tape, act_layers) as rec:
            task, y_pred = forward_fn()
            extra = extra_cost_fn()
        self._check_recorded(act_layers, rec)
        acts = list(rec.tensors)
        # an activation read only by a non-overlapping max-pool layer: its gradient, sign and
        # offset are taken at the pool's output (module `_capture`)
        pooled = [_pool_output(a, rec.pooled.get(i)) for i, a in enumerate(acts)]
        zero = tf.UnconnectedGradients.ZERO
        with fast_second_order():
            grads = tape.gradient(task, list(variables) + [a if p is None else p
                                                          for a, p in zip(acts, pooled)])
        g_vars = [tf.zeros_like(v) if g is None else g
                  for v, g in zip(variables, grads[:len(variables)])]
        # an activation the loss does not reach through (e.g. a softmax output whose logits
        # Keras' cross-entropy reads directly) gets no perturbation: adding one would change how
        # the loss is computed
        connected = [g is not None for g in grads[len(variables):]]
        g_acts = [g for g in grads[len(variables):] if g is not None]
        acts = [a for a, c in zip(acts, connected) if c]
        g_extra = (tape.gradient(extra, list(variables), unconnected_gradients=zero)
                   if extra is not None else None)
        del tape
        position = {id(v): i for i, v in enumerate(variables)}
        kernels = [k for k in self._kernels if id(k) in position] if use_w else []
        g_w = [tf.convert_to_tensor(g_vars[position[id(k)]]) for k in kernels]
        if replicas > 1 and g_w:
            g_w = tf.distribute.get_replica_context().all_reduce("sum", g_w)
        g_acts = [tf.convert_to_tensor(g) for g in g_acts]
        g_acts = _after(g_acts, g_vars)
        dtype = task.dtype
        # the perturbation directions are the derivatives of the norms w.r.t. the gradients
        with tf.GradientTape() as dt:
            dt.watch(g_w)
            norm_w = tf.cast(self._norm_w(g_w), dtype) if g_w else tf.zeros([], dtype)
        dir_w = dt.gradient(norm_w, g_w, unconnected_gradients=zero) if g_w else []
        del dt
        # the activations' directions in closed form, c_l·sign(g_l) (the derivative of
        # c_l·Σ|g_l|): one sign per element, scaled below together with the step size
        coefs_a = self._coefs_a(g_acts, acts)
        norm_a = (tf.cast(self._norm_a(g_acts, acts, coefs_a), dtype) if g_acts
                  else tf.zeros([], dtype))
        signs_a = [tf.sign(g) for g in g_acts]
        t = self._fd_scale(kernels, dir_w, acts, signs_a, coefs_a, dtype)
        # second pass at W + t·λ_w·v_w, activations + t·λ_a·v_a; then restore the state
        state = [v for v in model.non_trainable_variables
                 if _short_name(v) not in _FROZEN_NAMES] + list(protect)
        saved_state = [tf.identity(v) for v in state]
        saved_w = [tf.identity(k) for k in kernels]
        eps_w = tf.cast(t * self.lambda_w, dtype)
        eps_a = tf.cast(t * self.lambda_a, dtype)
        _assign(kernels, [w + tf.cast(eps_w, w.dtype) * tf.cast(d, w.dtype)
                          for w, d in zip(saved_w, dir_w)])
        offsets = iter([tf.stop_gradient((tf.cast(eps_a, a.dtype) * tf.cast(c, a.dtype))
                                         * tf.cast(sg, a.dtype))
                        for a, sg, c in zip(acts, signs_a, coefs_a)])
        offsets = [next(offsets) if c else None for c in connected]
        pooled_offsets = {}
        for i, p in enumerate(pooled):
            if p is not None and offsets[i] is not None:
                pooled_offsets[i], offsets[i] = offsets[i], None
        with tf.GradientTape() as tape2, _recording(tape2, act_layers, offsets=offsets,
                                                    pooled_offsets=pooled_offsets) as rec2:
            task2, _ = forward_fn()
        if act_layers and (rec2.offset_index != len(offsets)
                           or rec2.pooled_applied != len(pooled_offsets)):
            raise ValueError("GradientL1: the second forward pass recorded "
                             f"{rec2.offset_index} activations ({rec2.pooled_applied} read by a "
                             f"max pool), the first {len(offsets)} ({len(pooled_offsets)}); the "
                             "model's forward pass must be the same on every call.")
        with fast_second_order():
            g2 = tape2.gradient(task2, list(variables), unconnected_gradients=zero)
        _assign(kernels, saved_w)
        _assign(state, saved_state)
        factor = tf.cast(scale, dtype) / tf.cast(t, dtype)
        out = []
        for i, (g1, gp) in enumerate(zip(g_vars, g2)):
            g1, gp = tf.convert_to_tensor(g1), tf.convert_to_tensor(gp)
            g = g1 + tf.cast(factor, g1.dtype) * (gp - g1)
            if g_extra is not None:
                g = g + tf.convert_to_tensor(g_extra[i])
            out.append(g)
        return out, task, y_pred, extra, norm_w, norm_a

    def _fd_scale(self, kernels, dir_w, acts, signs_a, coefs_a, dtype) -> tf.Tensor:
        """``t`` with ``RMS(t·λ_w·v_w) = epsilon·RMS(W)`` (or the activations' analogue, with
        ``v_a = c_l·sign(g_l)``)."""
        def ratio(xs, ds):
            num = tf.add_n([tf.reduce_sum(tf.square(tf.cast(x, dtype))) for x in xs])
            den = tf.add_n([tf.reduce_sum(tf.square(tf.cast(d, dtype))) for d in ds])
            return tf.sqrt(tf.math.divide_no_nan(num, den))
        if kernels:
            r = ratio(kernels, dir_w) / self.lambda_w
        else:
            r = ratio(acts, [tf.cast(c, dtype) * tf.cast(sg, dtype)
                             for sg, c in zip(signs_a, coefs_a)]) / self.lambda_a
        r = tf.where(r > 0, r, tf.ones_like(r))  # all-zero directions: any t gives 0
        return tf.stop_gradient(self.epsilon * r)

    def penalty(self, model, x, y, loss, sample_weight=None, training: bool = False) -> dict:
        """The term on one batch, outside a TrainingModel (differentiable inside a tape).

        Args:
            model: the Keras model (the term attaches to it).
            x, y, sample_weight: a batch.
            loss: a Keras loss (callable ``loss(y, y_pred, sample_weight)``), e.g.
                ``keras.losses.SparseCategoricalCrossentropy()``.
            training: forward pass mode.

        Returns:
            dict with ``task_loss``, ``norm_w`` (weight norm), ``norm_a`` (activation norm) and
            ``penalty`` (``λ_w·norm_w + λ_a·norm_a``), computed exactly whatever ``method``.
        """
        self.attach(model)
        loss_fn = keras_of(model).losses.get(loss)

        def forward():
            y_pred = model(x, training=training)
            return loss_fn(y, y_pred, sample_weight=sample_weight), y_pred

        task, _, norm_w, norm_a = self.forward(forward)
        return {"task_loss": task, "norm_w": norm_w, "norm_a": norm_a,
                "penalty": self.lambda_w * norm_w + self.lambda_a * norm_a}
