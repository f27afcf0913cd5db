"""Keras weight regularizers for quantization-ready training (methods.md §1-3).

Use any of them as ``kernel_regularizer=`` of a Keras 2 layer (plain ``Dense``/``Conv2D``, larq's
``QuantDense``/``QuantConv2D``, and layers that TFMOT wraps with ``quantize_apply``) or of a
Keras 3 layer (TensorFlow backend): the same classes, the same aliases, the same learnable state
and BatchNorm folding (see "Keras 3" below). Each is registered under the package ``tfqreg``
with both Kerases and has a short string alias:

- ``"foothill"``: ``Foothill(l=1e-4, alpha=1, beta=2, center=0)``, ``l·Σ f(|w| − c)``,
  ``f(x) = α·x·tanh(βx/2)``
- ``"linf"``: ``LInf(l=0.01)``, ``l·max|u|``
- ``"margin"``: ``Margin(l=3e-4, power=2, margin_weight=1)``,
  ``l·[Σ relu(|u| − |M|)^p + γ·|M|]``, learnable M
- ``"soft_min_max"``: ``SoftMinMax(l=1e-3, eta=1)``, ``l·[smax(u) − smin(u) + η·e^{−a}]``,
  learnable hardness a

where ``u = w / rms(w)`` (``normalize="scale"``, the default of the three range regularizers;
``normalize="none"`` gives ``u = w``, their earlier meaning, which a saved model whose config
has no ``normalize`` keeps) and ``w`` is the kernel as the device quantizes it (BatchNorm
folded, see below)
- ``"msqe"``: ``MSQE(l=1, bits=4)``, ``l·(1/N) Σ (w − Q(w))²`` on the grid of :mod:`tfqreg.grid`
  (optionally a learnable step δ)
- ``"partial_l2"``: ``PartialL2(l=10, fraction=0.5)``, ``l·(1/N) Σ_{|w| ≤ θ_r} w²``

>>> import tfqreg
>>> from tfqreg._keras import keras
>>> layer = keras.layers.Dense(4, kernel_regularizer="margin")
>>> layer.build((None, 3))
>>> [w.name for w in layer.weights]
['kernel:0', 'kernel_margin:0', 'bias:0']
>>> import keras as keras3                      # Keras 3: the same alias, the same class
>>> layer3 = keras3.layers.Dense(4, kernel_regularizer="margin")
>>> layer3.build((None, 3))
>>> type(layer3.kernel_regularizer) is type(layer.kernel_regularizer)
True
>>> [w.name for w in layer3.weights]
['kernel', 'bias', 'kernel_margin']

What ``l`` means. A range regularizer's job is the ratio that per-tensor quantization suffers
from: the grid step is ``max|w|/(2^(b−1) − 1)`` and the signal is the weights' spread, so the
relative quantization error of a kernel is set by ``max|w| / rms(w)``, not by ``max|w|``. With
``normalize="scale"`` each penalty is computed on ``u = w / rms(w)``, ``rms(w)`` held constant
for the gradient (:func:`scale_normalized`): the penalty of a kernel is the same whatever its
scale (the init, the layer's fan-in, a BatchNorm γ that folds into it, the weight decay), and its
gradient is the raw penalty's divided by ``rms(w)``, so it pulls in the same largest weights, by
an amount relative to the kernel's own spread. ``l`` is then the weight of "max|w|/rms(w)"
(resp. the margin and range terms in rms units) per regularized kernel, a dimensionless number. The penalties are summed
over kernels, not averaged. Measured (the issue-16 diagnostic: four architectures after one epoch
of plain training, training-mode task gradients), the ratio of a kernel's penalty gradient to its
task gradient differed between the median kernels of the four models by 6.1× (L∞) and 24×
(soft-min-max) with the raw penalty, by 3.8× and 11× with the normalised one. Dividing further by
the number of regularized kernels (3 to 10) would bring the L∞ figure to 2.1× (deeper models have
smaller per-kernel task gradients); that is not done, as no training run has tested it yet.

Default strengths (``normalize="scale"``): ``LInf(0.01)``, ``Margin(0.01)``,
``SoftMinMax(0.01)``, chosen on short runs of four architectures (a BN-free CNN, a
depthwise-separable CNN with BatchNorm, a residual network with BatchNorm, an MLP) and checked by
benchmarks/defaults_transfer.py (2 seeds, table in the README): on the two BatchNorm models each
costs ≤ 0.3 pt FP32 and raises per-tensor W3 PTQ by 9 to 32 pt; on the two BN-free models
(rerun with 5 seeds) each raises per-tensor W3 (+0.2 to +2.6 pt), ``LInf`` meets the acceptance
(≤ 0.5 pt FP32, W3 above plain) and ``Margin`` / ``SoftMinMax`` cost 0.5–1.1 pt FP32, within one
standard error of the seed noise. The raw defaults they replace (``LInf(0.05, normalize="none")`` etc.) were set on the
BN-free CNN alone. ``Foothill(1e-4, alpha=1, beta=2)`` equals ``keras.regularizers.L2(1e-4)``
near 0 (f ≈ αβ/2·w²) and an L1 penalty of 1e-4 beyond |w| ≈ 1 (= 2/β), i.e. ordinary weight
decay that stops growing for outliers: its pull on each weight is ``l·f'(w)``, the same on any
model (per weight, like weight decay), so it has no ``normalize`` (a scale-free shrinkage would
shrink nothing); the same benchmark checks its default (≤ 0.5 pt FP32 on all four). ``MSQE``
and ``PartialL2`` are per-element means (methods.md §3), so their gradient per weight is
``2l·(w − Q(w))/N`` resp. ``2l·w/N``: ``l=1`` is a neutral start that the learnable-coefficient
training (``E + e^α·R − β·α``) or the user scales; for kernels with N
weights a pull comparable to weight decay 1e-4 needs ``l ≈ 1e-4·N``.

Learnable parameters (``Margin``'s M, ``SoftMinMax``'s hardness a, ``MSQE(trainable_step=True)``'s
step δ) are Keras state. A Keras regularizer only ever receives the weight tensor, so tfqreg
creates the parameters when the layer creates the regularized weight: importing tfqreg wraps
``Layer.add_weight`` (once, for every layer of each Keras; :mod:`tfqreg._attach`) so that, right
after a weight with a tfqreg regularizer is created, the regularizer's ``_attach(layer, weight)``
creates its parameters, named ``<weight>_margin``, ``<weight>_hardness`` or ``<weight>_step``,
initialised from the weight's initial value (M = max|w|, a = 10/max|w|, δ = the default grid
step). In Keras 2 they are weights of the layer itself (``dense/kernel_margin:0``, listed right
after the kernel); in Keras 3, weights of a small state layer the layer tracks (its
``layer.weights`` is ``[kernel, bias, kernel_margin]``), because Keras 3 layers save only the
weights they know by name. Either way they are ordinary trainable weights of the layer: listed in
``layer.weights``/``model.trainable_weights``, trained by ``model.fit`` through the
regularization loss, saved and restored by ``.keras`` (and ``.h5``, SavedModel and
``tf.train.Checkpoint`` in Keras 2, ``.weights.h5`` in Keras 3) like the kernel (the reloaded
layer rebuilds them from the regularizer's config and then loads their values), mirrored under
``tf.distribute`` strategies, and inside TFMOT's ``QuantizeWrapperV2`` they belong to the wrapped
layer. Nothing else changes for layers without tfqreg regularizers. One visible consequence: such
a layer has one more weight (``layer.get_weights()`` is ``[kernel, kernel_margin, bias]`` in
Keras 2, so code that unpacks ``kernel, bias = layer.get_weights()`` must use
``layer.kernel``/``layer.bias``), and parameter counts (``model.summary()``, larq's summary)
include these training-only scalars; they are unused by the forward pass, so TFLite conversion
drops them. The regularizer object keeps a weak reference from each weight it was attached to to
that weight's parameters, so one instance may be shared by several layers (each weight still gets
its own M). Called on a tensor it was never attached to (e.g. a constant in a test), a learnable
regularizer evaluates with its parameters at their initial values and logs a warning once.

BatchNorm. When a BatchNormalization folds into the layer (``Conv/Dense/DepthwiseConv2D`` with a
linear activation → BatchNorm, see :mod:`tfqreg.fold`), the device quantizes the folded kernel
``w·γ/√(σ²+ε)``, not ``w``: scaling a channel of ``w`` before a BatchNorm changes nothing after
it, so a range penalty on ``w`` alone shapes a range the quantizer never sees. ``LInf``,
``Margin``, ``SoftMinMax`` and ``MSQE`` therefore penalise the folded kernel, with no change to
the plain ``kernel_regularizer=LInf()`` usage: the regularizer looks up, through the model's layer
graph, whether a BatchNorm folds into its layer, and uses that BatchNorm's γ and MOVING variance
(what the converter folds; a Keras regularizer sees only the weight, never the batch, and the
moving statistics are the ones the device gets). The gradient reaches ``w`` and ``γ``; σ² is a
statistic and gets none. The lookup needs a Sequential or Functional model, of either Keras (a subclassed model
has no layer graph: there the raw kernel is penalised); ``fold_batchnorm=False`` penalises the
raw kernel everywhere. ``Foothill`` and ``PartialL2`` act on the raw weights (shrinkage and
pruning, not a quantization range).

Numerics: weights of any float dtype are accumulated in float32 (float64 stays float64). Values
and gradients are finite for finite weights of any magnitude: squares are summed as
``(sqrt(Σ(|x|/m)²)·m)²`` with ``m = max|x|``, and a value or gradient whose true size exceeds the
largest float of the compute dtype saturates at that value (sign kept) instead of becoming inf.
Keras 3 (TensorFlow backend). ``keras.layers.Dense(..., kernel_regularizer="linf")`` and every
class above work in Keras 3 layers after ``import tfqreg`` (in any import order): the aliases
resolve through ``keras.regularizers.get``; ``model.save("m.keras")`` and
``keras.models.load_model("m.keras")`` need no ``custom_objects`` (Keras 3's deserializer imports
a saved class's module only for Keras' own packages, so tfqreg registers its classes with Keras 3
too); learnable state and BatchNorm folding behave as above (a Keras 3 Sequential model rebuilds
its graph for every added layer, e.g. when loaded; the fold lookup uses each layer's live call in
the current graph). Not supported: other Keras 3 backends (JAX, PyTorch), where the penalty would
need the stateless variable values Keras passes there. Learnable regularizers in a Keras 3 layer
need the TensorFlow backend's stateful training loop (``fit``, or a ``tf.GradientTape`` loop).

The functional cores (``foothill_penalty``, ``linf_penalty``, ``margin_penalty``,
``soft_min_max_penalty``, ``msqe_penalty``, ``partial_l2_penalty``, and ``scale_normalized``) live
in :mod:`tfqreg.penalties` and are re-exported here; they take tensors and return the unweighted
penalty ``R``; the classes multiply by ``l``.
"""

from __future__ import annotations

import logging
import math
import numbers
from typing import Dict, Optional, Sequence

import numpy as np

from tfqreg import _attach
from tfqreg import fold as _fold
from tfqreg import grid
from tfqreg._keras import keras, register, tf
from tfqreg.penalties import (  # noqa: F401  (re-exported: the functional cores)
    NORMALIZATIONS,
    _as,
    _compute_dtype,
    _saturate,
    _to_compute,
    foothill_penalty,
    linf_penalty,
    margin_penalty,
    msqe_penalty,
    partial_l2_penalty,
    percentile_threshold,
    rms,
    scale_normalized,
    soft_max,
    soft_min_max_penalty,
)

__all__ = [
    "Foothill",
    "LInf",
    "Margin",
    "SoftMinMax",
    "MSQE",
    "PartialL2",
    "ALIASES",
    "foothill_penalty",
    "linf_penalty",
    "margin_penalty",
    "soft_max",
    "soft_min_max_penalty",
    "msqe_penalty",
    "partial_l2_penalty",
    "percentile_threshold",
    "rms",
    "scale_normalized",
    "NORMALIZATIONS",
]

_log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Argument checks (one helper for the module)
# --------------------------------------------------------------------------------------------

def _check_arg(name: str, value, kind: str = "positive", optional: bool = False,
               high: Optional[float] = None, choices: Sequence[str] = ()):
    """Validate one constructor argument and return it as a plain Python value.

    kinds: ``positive`` (finite real > 0), ``nonnegative`` (finite real ≥ 0), ``power`` (finite
    real ≥ 1), ``fraction`` (real in the open interval (0, 1)), ``bool``, ``bits`` (int 1..16),
    ``choice`` (one of the strings ``choices``).
    ``high`` bounds the value from above (strengths and multipliers at :data:`_MAX_ARG`,
    powers at 16): larger ones overflow float32 gradients (``LInf(1e308)`` has gradient
    ``inf``), which would break the promise of finite values and gradients for finite weights.
    Raises ``TypeError``/``ValueError`` naming ``name``.
    """
    if value is None and optional:
        return None
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"`{name}` must be a bool, got {value!r} ({type(value).__name__}).")
        return bool(value)
    if kind == "bits":
        return grid.check_bits(value, name=name)
    if kind == "choice":
        if not isinstance(value, str):
            raise TypeError(f"`{name}` must be a string, one of {list(choices)}, got {value!r} "
                            f"({type(value).__name__}).")
        if value not in choices:
            raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}.")
    if kind == "positive" and not value > 0:
        raise ValueError(f"`{name}` must be > 0, got {value}.")
    if kind == "nonnegative" and not value >= 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    if kind == "power" and not value >= 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    if kind == "fraction" and not 0 < value < 1:
        raise ValueError(f"`{name}` must be in the open interval (0, 1), got {value}.")
    high = 16.0 if kind == "power" else high
    if high is not None and value > high:
        raise ValueError(f"`{name}` must be at most {high:g}, got {value:g} (larger values "
                         "overflow float32 gradients).")
    return value


_MAX_ARG = 1e6


# --------------------------------------------------------------------------------------------
# Attaching learnable state to the layer that owns the regularized weight
# --------------------------------------------------------------------------------------------

def _folded(record: _attach.Attachment, w: tf.Tensor) -> tf.Tensor:
    """``w`` as the device quantizes it: ``w·γ/√(σ²+ε)`` when a BatchNorm folds into the layer
    whose kernel ``record`` is (:mod:`tfqreg.fold`, Keras 2 or 3), else ``w``."""
    layer, variable = record.layer, record.variable
    bn = None if variable is None else _fold.batchnorm_for_kernel(layer, variable)
    if bn is None:
        return w
    return tf.cast(_fold.fold_kernel(layer, w, _fold.batchnorm_scale(bn)), w.dtype)


class _TensorRegularizer(keras.regularizers.Regularizer):
    """Base of the tfqreg regularizers: ``l · R(W)`` in the compute dtype, per-weight state."""

    #: names of learnable parameters (suffixes of the layer weights it creates); () = stateless
    _state_suffixes: tuple = ()
    _needs_layer_info = False

    #: whether the class takes ``normalize=`` (the range regularizers)
    _normalizable = False

    def __init__(self, l, normalize: str = "none"):
        self.l = _check_arg("l", l, high=_MAX_ARG)
        self.normalize = _check_arg("normalize", normalize, "choice", choices=NORMALIZATIONS)
        if self.normalize != "none" and not self._normalizable:  # pragma: no cover - internal
            raise ValueError(f"`normalize` must be 'none' for {type(self).__name__}.")
        self._attachments = []
        self._warned_detached = False

    @classmethod
    def from_config(cls, config):
        # A config written before ``normalize`` existed meant the raw penalty: it loads with
        # ``normalize="none"`` so a saved model keeps training the same. Such a config always
        # holds ``l`` (every get_config wrote it); a string alias arrives as ``{}`` and gets the
        # current defaults.
        config = dict(config)
        if cls._normalizable and "l" in config:
            config.setdefault("normalize", "none")
        return cls(**config)

    def _normalized(self, w: tf.Tensor) -> tf.Tensor:
        """``w`` in the units the penalty is computed in: ``w / rms(w)`` for
        ``normalize="scale"``, else ``w``."""
        return scale_normalized(w) if self.normalize == "scale" else w

    # -- Keras protocol ------------------------------------------------------------------
    def __call__(self, x):
        record = self._find(x)
        w = _to_compute(x)
        if record is None:
            state, axes = self._detached_state(self._normalized(w)), None
            if self._state_suffixes and not self._warned_detached:
                self._warned_detached = True
                _log.warning(
                    "%s was called on a tensor it was not attached to; its learnable "
                    "parameters take their initial values and are not trained. Use it as a "
                    "layer's kernel_regularizer to train them.", type(self).__name__)
        else:
            state, axes = record.state, record.channel_axes
            if getattr(self, "fold_batchnorm", False):
                w = _folded(record, w)
        if w.shape.num_elements() == 0:
            return tf.zeros([], w.dtype)  # nothing to regularize
        value = _saturate(self.l * self._penalty(self._normalized(w), state, axes))
        # A NaN or inf weight gives a NaN penalty (as Keras' L1/L2 do), so that training
        # visibly diverges instead of a max, a sort or a rounding hiding it.
        finite = tf.reduce_all(tf.math.is_finite(w))
        return tf.where(finite, value, tf.constant(float("nan"), value.dtype))

    def get_config(self) -> dict:
        return {"l": self.l}

    def __deepcopy__(self, memo):
        return type(self).from_config(self.get_config())

    def __copy__(self):
        return type(self).from_config(self.get_config())

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    # -- state ---------------------------------------------------------------------------
    def _find(self, x) -> Optional[_attach.Attachment]:
        for record in self._attachments:
            if record.variable is x:
                return record
        return None

    def _attach(self, layer, variable) -> None:
        """Called right after ``layer`` created ``variable`` with this regularizer."""
        self._attachments = [r for r in self._attachments if r.variable is not None]
        needs_layer = self._needs_layer_info or getattr(self, "fold_batchnorm", False)
        if not (self._state_suffixes or needs_layer) or self._find(variable):
            return
        axes = _fold.channel_axes(layer)
        state = {}
        if self._state_suffixes:
            base = _attach.weight_base_name(variable)
            dtype = _compute_dtype(variable.dtype)
            initial = self._initial_state(
                self._normalized(_to_compute(_attach.initial_tensor(variable))), axes)
            for suffix in self._state_suffixes:
                state[suffix] = _attach.add_state_weight(
                    layer, variable, f"{base}_{suffix}", tf.cast(initial[suffix], dtype),
                    constraint=self._constraint(suffix))
        self._attachments.append(_attach.Attachment(variable, state, axes, layer))

    def state(self, variable) -> Dict[str, tf.Variable]:
        """The learnable parameters created for ``variable`` (``{}`` if none / not attached)."""
        record = self._find(variable)
        return dict(record.state) if record else {}

    @property
    def variables(self) -> list:
        """All learnable parameters this regularizer created, for logging."""
        return [v for r in self._attachments if r.variable is not None for v in r.state.values()]

    def _initial_state(self, w: tf.Tensor, channel_axes) -> Dict[str, tf.Tensor]:
        return {}

    def _detached_state(self, w: tf.Tensor) -> Dict[str, tf.Tensor]:
        return {k: tf.stop_gradient(v) for k, v in self._initial_state(w, None).items()}

    def _constraint(self, suffix):
        return None

    def _penalty(self, w: tf.Tensor, state, channel_axes) -> tf.Tensor:  # pragma: no cover
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# The regularizers
# --------------------------------------------------------------------------------------------

#: default strengths of the range regularizers on the ``normalize="scale"`` scale
#: the defaults that passed benchmarks/defaults_transfer.py on all four architectures (≤ 0.5 pt
#: FP32, per-tensor W3 above plain training); margin and soft-min-max at 0.01 cost 0.8-1.1 pt
#: FP32 on the BatchNorm-free models (same-seed differences, 5 seeds)
_DEFAULT_L = {"linf": 0.01, "margin": 3e-4, "soft_min_max": 1e-3}

@register
class Foothill(_TensorRegularizer):
    """``l · Σ f(|w| − c)``, ``f(x) = α·x·tanh(βx/2)`` (Belbahri et al.; methods.md §1).

    ``center=0`` (default) is a smooth shrinkage, L2-like (≈ ``l·αβ/2·w²``) for |w| ≪ 2/β and
    L1-like (≈ ``l·α|w|``) beyond; ``center=c > 0`` puts the valley at |w| = c and pulls weights
    toward ±c (binary-friendly latent weights).

    Args:
        l: strength (> 0). Default 1e-4.
        alpha: slope of the L1 tail (> 0). Default 1.
        beta: sharpness (> 0); the L2→L1 switch sits near |w| = 2/β. Default 2.
        center: valley position c (≥ 0). Default 0.

    >>> float(Foothill(l=0.5, alpha=1.0, beta=2.0)(tf.constant([0.0, 100.0])))
    50.0
    """

    def __init__(self, l=1e-4, alpha=1.0, beta=2.0, center=0.0):
        super().__init__(l)
        self.alpha = _check_arg("alpha", alpha, high=_MAX_ARG)
        self.beta = _check_arg("beta", beta, high=1e30)  # finite up to ~3e38 (float32)
        self.center = _check_arg("center", center, "nonnegative", high=_MAX_ARG)

    def _penalty(self, w, state, channel_axes):
        return foothill_penalty(w, self.alpha, self.beta, self.center)

    def get_config(self):
        return {"l": self.l, "alpha": self.alpha, "beta": self.beta, "center": self.center}


@register
class LInf(_TensorRegularizer):
    """``l · max|u|``, ``u = w / rms(w)`` (R² range regularization, L∞ form; methods.md §2).

    Args:
        l: strength (> 0), the weight of ``max|w| / rms(w)`` per kernel. Default 0.01 (chosen
            on four architectures, see the module docstring). With ``normalize="none"``, the
            weight of ``max|w|`` (the earlier meaning; 0.05 was its default).
        fold_batchnorm: penalise the kernel as the device quantizes it, ``w·γ/√(σ²+ε)``, when a
            BatchNorm folds into the layer (default), else the raw kernel.
        normalize: ``"scale"`` (default): the penalty of ``u = w / rms(w)`` (rms held constant
            for the gradient, :func:`scale_normalized`), scale-free; ``"none"``: of ``w``
            itself.

    >>> round(float(LInf(0.5)(tf.constant([0.5, -2.0]))), 4)   # 0.5 · 2 / rms = 0.5 · 2 / 1.4577
    0.686
    >>> float(LInf(0.5, normalize="none")(tf.constant([0.5, -2.0])))
    1.0
    """

    _normalizable = True

    def __init__(self, l=_DEFAULT_L["linf"], fold_batchnorm=True, normalize="scale"):
        super().__init__(l, normalize)
        self.fold_batchnorm = _check_arg("fold_batchnorm", fold_batchnorm, "bool")

    def _penalty(self, w, state, channel_axes):
        return linf_penalty(w)

    def get_config(self):
        return {"l": self.l, "fold_batchnorm": self.fold_batchnorm, "normalize": self.normalize}


@register
class Margin(_TensorRegularizer):
    """``l · [Σ relu(|u| − |M|)^p + γ·|M|]``, ``u = w / rms(w)``, with a learnable margin M per
    weight tensor (in units of rms(w); with ``normalize="none"``, ``u = w`` and M is in the
    weights' units).

    M is a weight ``<name>_margin`` of the layer (see the module docstring), initialised to
    ``margin`` or, by default, to max|u| at build time.

    Args:
        l: strength (> 0). Default 3e-4, the strength that kept FP32 within 0.5 pt and
            raised per-tensor W3 on four architectures (``benchmarks/defaults_transfer.py``;
            on BatchNorm models the gain is small there, +3 to +13 pt); 0.01 (the default
            before) gains +26 to +29 pt on BatchNorm models but cost 0.8 pt FP32 on a
            BatchNorm-free CNN (``normalize="none"``: 0.05 was the default there).
        power: p ≥ 1. Default 2.
        margin_weight: γ > 0, the weight of the |M| term. Default 1.
        margin: initial M (> 0), or ``None`` for max|u| of the freshly initialised weight.
        fold_batchnorm: as :class:`LInf`.
        normalize: ``"scale"`` (default) or ``"none"``, as :class:`LInf`.
    """

    _state_suffixes = ("margin",)

    _normalizable = True

    def __init__(self, l=_DEFAULT_L["margin"], power=2.0, margin_weight=1.0, margin=None,
                 fold_batchnorm=True, normalize="scale"):
        super().__init__(l, normalize)
        self.fold_batchnorm = _check_arg("fold_batchnorm", fold_batchnorm, "bool")
        self.power = _check_arg("power", power, "power")
        self.margin_weight = _check_arg("margin_weight", margin_weight, high=_MAX_ARG)
        self.margin = _check_arg("margin", margin, optional=True, high=_MAX_ARG)

    def _initial_state(self, w, channel_axes):
        if self.margin is not None:
            return {"margin": tf.constant(self.margin, w.dtype)}
        return {"margin": tf.reduce_max(tf.abs(w))}

    def _penalty(self, w, state, channel_axes):
        return margin_penalty(w, state["margin"], self.power, self.margin_weight)

    def get_config(self):
        return {"l": self.l, "power": self.power, "margin_weight": self.margin_weight,
                "margin": self.margin, "fold_batchnorm": self.fold_batchnorm,
                "normalize": self.normalize}


class _NonNegative(keras.constraints.Constraint):
    def __call__(self, w):
        return tf.maximum(w, tf.zeros_like(w))


@register
class SoftMinMax(_TensorRegularizer):
    """``l · [(smax − smin) + η·e^{−a}]`` of ``u = w / rms(w)``, with a learnable hardness a ≥ 0
    per weight tensor (``normalize="none"``: of ``w``).

    ``smax = Σ u e^{au}/Σ e^{au}``, ``smin = Σ u e^{−au}/Σ e^{−au}``; a is a weight
    ``<name>_hardness`` of the layer (kept ≥ 0 by a constraint), initialised to ``hardness`` or,
    by default, to ``10 / max|u|`` (so that ``e^{a·max|u|} = e^{10}``: smax − smin starts close to
    max − min). The η·e^{−a} term keeps a from collapsing to 0 (where smax − smin → 0).

    Args:
        l: strength (> 0), the weight of the range in rms units per kernel. Default 1e-3, the
            strength that kept FP32 within 0.5 pt and raised per-tensor W3 on four
            architectures (``benchmarks/defaults_transfer.py``); 0.01 (the default before)
            gains more on BatchNorm models (per-tensor W3 +29 to +32 pt against +13 to +25) but
            cost 1.1 pt FP32 on a BatchNorm-free CNN. ``normalize="none"``: the range in the
            weights' units (0.05 was the default there).
        eta: η > 0. Default 1.
        hardness: initial a (> 0), or ``None`` for 10/max|u| at build time.
        fold_batchnorm: as :class:`LInf`.
        normalize: ``"scale"`` (default) or ``"none"``, as :class:`LInf`.
    """

    _state_suffixes = ("hardness",)
    _DEFAULT_SHARPNESS = 10.0

    _normalizable = True

    def __init__(self, l=_DEFAULT_L["soft_min_max"], eta=1.0, hardness=None, fold_batchnorm=True,
                 normalize="scale"):
        super().__init__(l, normalize)
        self.fold_batchnorm = _check_arg("fold_batchnorm", fold_batchnorm, "bool")
        self.eta = _check_arg("eta", eta, high=_MAX_ARG)
        self.hardness = _check_arg("hardness", hardness, optional=True, high=_MAX_ARG)

    def _initial_state(self, w, channel_axes):
        if self.hardness is not None:
            return {"hardness": tf.constant(self.hardness, w.dtype)}
        m = tf.reduce_max(tf.abs(w))
        tiny = _as(1e-30, w.dtype)
        return {"hardness": _saturate(self._DEFAULT_SHARPNESS / tf.maximum(m, tiny))}

    def _constraint(self, suffix):
        return _NonNegative()

    def _penalty(self, w, state, channel_axes):
        return soft_min_max_penalty(w, state["hardness"], self.eta)

    def get_config(self):
        return {"l": self.l, "eta": self.eta, "hardness": self.hardness,
                "fold_batchnorm": self.fold_batchnorm, "normalize": self.normalize}


@register
class MSQE(_TensorRegularizer):
    """``l · (1/N) Σ (w − Q(w))²`` toward the symmetric n-bit grid of :mod:`tfqreg.grid`.

    Args:
        l: strength (> 0). Default 1.
        bits: 1..16. Default 4.
        step: a fixed step δ (> 0), or ``None`` for the default step
            ``max|w|/(2^(n−1)−1)`` recomputed from the weight on every call (a constant for
            autodiff: the weights get ``2(w − Q(w))/N``).
        per_channel: one default step per output channel (axes from
            ``grid.channel_axes_for(layer)``; ``(-1,)`` for a tensor not attached to a layer).
        narrow_range: use ``−(2^(n−1)−1)`` as the lowest level.
        trainable_step: make δ a learnable weight ``<name>_step`` of the layer (per channel if
            ``per_channel``), initialised to ``step`` or the default step at build time; it
            receives ``−(2/N) Σ (w − Q(w))·k``.
        fold_batchnorm: as :class:`LInf` (the grid is then the folded kernel's grid, the one
            the device uses).
    """

    _needs_layer_info = True

    def __init__(self, l=1.0, bits=4, step=None, per_channel=False, narrow_range=False,
                 trainable_step=False, fold_batchnorm=True):
        super().__init__(l)
        self.fold_batchnorm = _check_arg("fold_batchnorm", fold_batchnorm, "bool")
        self.bits = _check_arg("bits", bits, "bits")
        self.step = _check_arg("step", step, optional=True, high=_MAX_ARG)
        self.per_channel = _check_arg("per_channel", per_channel, "bool")
        self.narrow_range = _check_arg("narrow_range", narrow_range, "bool")
        self.trainable_step = _check_arg("trainable_step", trainable_step, "bool")
        self._state_suffixes = ("step",) if self.trainable_step else ()

    def _axes(self, channel_axes):
        if not self.per_channel:
            return None
        return channel_axes if channel_axes is not None else (-1,)

    def _initial_state(self, w, channel_axes):
        if not self.trainable_step:
            return {}
        axes = self._axes(channel_axes)
        default = grid.default_step(w, self.bits, axes, self.narrow_range)
        if self.step is not None:
            default = tf.fill(tf.shape(default), tf.constant(self.step, w.dtype))
        return {"step": default}

    def _constraint(self, suffix):
        return _MinValue(1e-30)

    def _penalty(self, w, state, channel_axes):
        axes = self._axes(channel_axes)
        if "step" in state:
            step = state["step"]
        elif self.step is not None:
            step = tf.constant(self.step, w.dtype)
        else:
            step = None
        return msqe_penalty(w, self.bits, step, axes, self.narrow_range)

    def get_config(self):
        return {"l": self.l, "bits": self.bits, "step": self.step,
                "per_channel": self.per_channel, "narrow_range": self.narrow_range,
                "trainable_step": self.trainable_step, "fold_batchnorm": self.fold_batchnorm}


class _MinValue(keras.constraints.Constraint):
    def __init__(self, low):
        self.low = low

    def __call__(self, w):
        return tf.maximum(w, _as(self.low, w.dtype))


@register
class PartialL2(_TensorRegularizer):
    """``l · (1/N) Σ_{|w| ≤ θ_r} w²``: L2 on the ``fraction`` smallest magnitudes only (the
    weights that will be pruned; methods.md §3). θ_r is recomputed on every call.

    Args:
        l: strength (> 0). Default 10, chosen on four architectures
            (``benchmarks/defaults_transfer.py``: a small CNN, an MLP and two BatchNorm models,
            3-5 seeds, 3 epochs), judged on the float accuracy after one-shot magnitude
            pruning of half of every kernel (BatchNorm statistics re-estimated): it cost
            ≤ 0.2 pt FP32 and raised that accuracy by 1.4 / 3.0 / 7.6 / 3.9 pt (small CNN /
            MLP / depthwise-separable / residual). The default before, 1, gained nothing on
            the BatchNorm models (−0.7 ± 2.5, −0.0 ± 1.1 pt); 100 cost 1.1 pt FP32 on one.
            Saved configs carry their ``l``.
        fraction: r in (0, 1), the share of weights (by magnitude) that is penalised. Default 0.5.
    """

    def __init__(self, l=10.0, fraction=0.5):
        super().__init__(l)
        self.fraction = _check_arg("fraction", fraction, "fraction")

    def _penalty(self, w, state, channel_axes):
        return partial_l2_penalty(w, self.fraction)

    def get_config(self):
        return {"l": self.l, "fraction": self.fraction}


ALIASES = {
    "foothill": Foothill,
    "linf": LInf,
    "margin": Margin,
    "soft_min_max": SoftMinMax,
    "msqe": MSQE,
    "partial_l2": PartialL2,
}
"""String aliases accepted wherever Keras accepts a regularizer name."""


# --------------------------------------------------------------------------------------------
# Hooks into both Kerases (run once at import): add_weight and the string aliases
# --------------------------------------------------------------------------------------------

_attach.install_hooks(_TensorRegularizer, ALIASES)
