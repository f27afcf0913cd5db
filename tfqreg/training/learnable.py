"""Learnable-coefficient terms (Choi et al.): ``e^α·R − β·α`` with R the MSQE toward a grid with
learnable steps (:class:`LearnableMSQE`) or the partial L2 of the smallest weights
(:class:`LearnablePartialL2`); and :func:`round_to_grid`, which snaps kernels to the grid."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from tfqreg import _checks, fold, grid
from tfqreg._keras import register, tf
from tfqreg.training._common import (_check, _fold_scale, _folded, _is_keras3, _short_name, _Term,
                                     _unfolded, _unwrap, check_model, kernel_layers)

__all__ = ["LearnableMSQE", "LearnablePartialL2", "round_to_grid"]


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
        self._set("_targets", [(l, k, fold.channel_axes(_unwrap(l)))
                               for l, ks in found for k in ks])
        self._set("_folds", [_fold_scale(l, k) for l, k, _ in self._targets])
        dtype = self._targets[0][1].dtype
        alpha_max = self.alpha_max
        alpha = self._add_state(f"{self.name}_alpha", (), dtype, self.alpha_init,
                                constraint=lambda a: tf.minimum(a, tf.cast(alpha_max, a.dtype)))
        self._set("alpha", alpha)

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
        per_channel: one δ per output channel (``fold.channel_axes``) instead of per tensor.
        beta: the ``β`` of ``−β·α`` (``> 0``); at the optimum ``e^α·R = β``.
        alpha_init: initial α (``e^α`` the initial strength).
        alpha_max: cap on α (the variable is clipped after each update and in the cost).
        narrow_range: symmetric narrow grid ``[-(2^(n-1)-1), 2^(n-1)-1]``.
        layers: names of the layers whose kernels are regularized (default: all kernels).
        learn_step: train δ (stored as log δ); ``False`` uses ``grid.default_step`` of the
            current weights every step.
        folded_step: for a kernel a BatchNorm folds into, ``"relative"`` (default) learns
            ``δ = e^ρ·default_step(w')``, the step relative to the folded kernel's max-based
            step (held constant for the gradient), so δ follows the BatchNorm statistics as
            they move during training; ``"absolute"`` learns ``log δ`` itself, as for other
            kernels (configs saved without this argument load as ``"absolute"``). With
            ``"absolute"`` δ lagged the moving statistics: after 18 steps of a BatchNorm CNN,
            :func:`round_to_grid` cost 47 pt where the default grid cost 1.5.

    BatchNorm: a kernel that a BatchNorm folds into is measured as the device quantizes it,
    folded (``w·γ/√(σ²+ε)``, moving statistics; :mod:`tfqreg.fold`): δ is the folded kernel's
    step, and :func:`round_to_grid` sets ``w = Q(w·s)/s`` so that the fold lies on the grid.
    """

    metric_names = ("msqe", "exp_alpha", "delta")

    def __init__(self, bits: int = 4, per_channel: bool = False, beta: float = 1.0,
                 alpha_init: float = 0.0, alpha_max: float = 10.0, narrow_range: bool = False,
                 layers: Optional[Sequence[str]] = None, learn_step: bool = True,
                 folded_step: str = "relative", name=None, **kwargs):
        super().__init__(beta=beta, alpha_init=alpha_init, alpha_max=alpha_max, layers=layers,
                         name=name, _cls="LearnableMSQE", **kwargs)
        self.bits = _check("LearnableMSQE", bits=bits)["bits"]
        self.per_channel = _checks.check_bool("per_channel", per_channel, "LearnableMSQE")
        self.narrow_range = _checks.check_bool("narrow_range", narrow_range, "LearnableMSQE")
        self.learn_step = _checks.check_bool("learn_step", learn_step, "LearnableMSQE")
        if folded_step not in ("relative", "absolute"):
            raise ValueError("LearnableMSQE: `folded_step` must be 'relative' or 'absolute', "
                             f"got {folded_step!r}.")
        self.folded_step = folded_step
        self._log_steps: List = []

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, per_channel=self.per_channel,
                      narrow_range=self.narrow_range, learn_step=self.learn_step,
                      folded_step=self.folded_step)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.setdefault("folded_step", "absolute")  # saved before the argument existed
        return cls(**config)

    def _relative(self, info) -> bool:
        return info is not None and self.folded_step == "relative"

    def _default_step(self, info, kernel, axes) -> tf.Tensor:
        return grid.default_step(_folded(info, kernel), self.bits, self._axes(axes),
                                 self.narrow_range)

    def _axes(self, axes):
        return axes if self.per_channel else None

    def _attach(self, model):
        self._attach_targets(model, "LearnableMSQE")
        if self.per_channel:
            flat = [l.name for l, _, axes in self._targets if axes is None]
            if flat:
                raise ValueError(
                    f"LearnableMSQE(per_channel=True): no output-channel axis is known for the "
                    f"kernels of layers {flat} (tfqreg.fold.channel_axes), so a per-channel "
                    "step cannot be learned faithfully; use per_channel=False or exclude them "
                    "(`layers=`).")
        log_steps = []
        self._set("_log_steps", log_steps)
        if not self.learn_step:
            return
        used = set()
        for (layer, kernel, axes), info in zip(self._targets, self._folds):
            init = np.log(self._default_step(info, kernel, axes).numpy())
            if self._relative(info):
                init = np.zeros_like(init)  # ρ = 0: the default step
            base = f"{_unwrap(layer).name}_{_short_name(kernel)}".replace("_kernel", "")
            base = base if base not in used else f"{base}_{len(used)}"
            used.add(base)
            log_steps.append(self._add_state(f"{base}_log_step", init.shape, kernel.dtype, init))
        self._set("_log_steps", log_steps)

    def steps(self) -> List[tf.Tensor]:
        """The current step δ of each target kernel (learned, or the default step)."""
        if self.learn_step:
            return [tf.exp(s) * tf.stop_gradient(self._default_step(info, k, axes))
                    if self._relative(info) else tf.exp(s)
                    for s, (_, k, axes), info in zip(self._log_steps, self._targets,
                                                     self._folds)]
        return [tf.stop_gradient(self._default_step(info, k, axes))
                for (_, k, axes), info in zip(self._targets, self._folds)]

    def reset_steps(self) -> None:
        """Re-initialise every δ to ``grid.default_step`` of the current kernels (e.g. after
        loading pretrained weights into the inner model)."""
        for s, (_, k, axes), info in zip(self._log_steps, self._targets, self._folds):
            if self._relative(info):
                s.assign(tf.zeros_like(s))
            else:
                s.assign(tf.math.log(self._default_step(info, k, axes)))

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
        """``{kernel variable name: bool mask}`` of the weights to KEEP (|w| > θ); on a
        Keras 3 model the key is the variable's path (``"conv1/kernel"``)."""
        return {(k.path if _is_keras3(k) else k.name): (np.abs(np.asarray(k)) > float(t))
                for (_, k, _), t in zip(self._targets, self.thresholds())}


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
    from tfqreg.training.model import TrainingModel  # the model module imports this one

    check_model(model_or_term, "model_or_term", kind="Model")
    if isinstance(model_or_term, TrainingModel) or getattr(model_or_term, "_tfqreg_training",
                                                           False):
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
        axes = fold.channel_axes(_unwrap(layer)) if per_channel else None
        for k in kernels:
            info = _fold_scale(layer, k)
            w = _folded(info, k)
            step = grid.default_step(w, bits, axes, narrow_range)
            k.assign(_unfolded(info, k, grid.fake_quant(w, step, bits, narrow_range)))
    return model_or_term

