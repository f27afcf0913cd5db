"""The training stages of the compression pipeline and :class:`Compressor`, which runs them all.

    float model ─► (1) learnable partial L2 at fraction r ─► (2) prune (fixed mask)
                ─► (3) learnable MSQE at b bits, mask kept ─► snap to the learned grid
                ─► fold BatchNorms into the kernels (when any follow a Conv/Dense)
                ─► (4) Huffman-code the indices ─► (5) .tfqz, decoded and checked bit-identical

Stage (1) uses :class:`tfqreg.training.LearnablePartialL2` (``e^α·P − β·α``: the r smallest
|w| of each kernel are pulled to zero with a strength that grows as they get there). Stage (2)
is :func:`tfqreg.compression.pruning.prune_masks` (per kernel, the ``round(r·N)`` smallest |w|).
Stage (3) uses :class:`tfqreg.training.LearnableMSQE` with a learnable step δ per kernel (or per
channel) while :class:`~tfqreg.compression.pruning.PruningMask` keeps the pruned weights at
exactly zero after every optimizer step; at the end the kernels are snapped to ``δ·index``
(:func:`tfqreg.training.round_to_grid`, then
:func:`~tfqreg.compression.fileformat.quantize_weights` for the decoder's exact float32
arithmetic; 0 is on the grid, so the pruned zeros stay zero). A BatchNorm after a Conv / Dense is
folded into it as the TFLite converter does (:mod:`tfqreg.fold`): MSQE learns the FOLDED
kernel's grid, and the coded model is the folded one (its kernels exactly ``δ·index``, the
BatchNorms gone), so what is coded is what the device quantizes. Stages (4)-(5) are
:func:`~tfqreg.compression.fileformat.encode_model`; the decoded model is compared with the
quantized one weight by weight (bit for bit) before the result is returned.

>>> from tfqreg import compression, models                            # doctest: +SKIP
>>> result = compression.Compressor(fraction=0.8, bits=4).run(        # doctest: +SKIP
...     float_model, (x_train, y_train), validation=(x_test, y_test))
>>> print(result.report)                                              # doctest: +SKIP
>>> result.save("model.tfqz")                                         # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from numbers import Real
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from tfqreg import _checks, fold, grid, training
from tfqreg._keras import check_keras2, keras, register, tf
from tfqreg.compression import pruning
from tfqreg.compression.fileformat import (CompressedModel, coded_kernels,
                                           decode_model, encode_model, quantize_weights)
from tfqreg.compression.report import CompressionReport

__all__ = ["CompressionResult", "Compressor", "compress", "learned_steps"]

Data = Union["tf.data.Dataset", Tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------- checks
_OWNER = "Compressor"
_MAX_BETA = 1e6   # as tfqreg.training's terms: larger β overflows the penalty's gradient
_MAX_ALPHA = 80.0  # e^α overflows float32 above ~88, underflows to 0 below ~-88
_VERBOSE = (0, 1, 2)


def _positive(name, value, optional=False):
    if value is None and optional:
        return None
    return _checks.check_real(name, value, low=0.0, low_open=True, owner=_OWNER)


def _names(name, value, ok=lambda v: isinstance(v, str), what="layer names (str)"):
    """A list from one string or a list / tuple of items passing ``ok``; else refused naming
    ``name``."""
    if isinstance(value, str):  # one name, not its characters (as tfqreg.training)
        return [value]
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{_OWNER}: `{name}` must be a list of {what} or one name, got "
                        f"{value!r} ({type(value).__name__}).")
    bad = [v for v in value if isinstance(v, (bool, np.bool_)) or not ok(v)]
    if bad:
        raise TypeError(f"{_OWNER}: `{name}` must be {what}, got {bad!r}.")
    return list(value)


def _check_alpha(alpha_init, alpha_max):
    """``(alpha_init, alpha_max)``: α₀ in [-80, alpha_max] or ``"auto"``, alpha_max <= 80 and
    at least the α the terms start at (0 with ``"auto"``, which assigns α₀ after building
    them)."""
    alpha_max = _checks.check_real("alpha_max", alpha_max, high=_MAX_ALPHA, owner=_OWNER)
    if isinstance(alpha_init, str):
        if alpha_init != "auto":
            raise ValueError(f"{_OWNER}: `alpha_init` must be a number or 'auto', got "
                             f"{alpha_init!r}.")
        if alpha_max < 0:
            raise ValueError(f"{_OWNER}: `alpha_max` must be >= 0 with alpha_init='auto' (the "
                             f"terms start at alpha = 0), got {alpha_max:g}.")
        return alpha_init, alpha_max
    if isinstance(alpha_init, (bool, np.bool_)) or not isinstance(alpha_init, Real):
        raise TypeError(f"{_OWNER}: `alpha_init` must be a number or 'auto', got "
                        f"{alpha_init!r} ({type(alpha_init).__name__}).")
    alpha_init = _checks.check_real("alpha_init", alpha_init, low=-_MAX_ALPHA, owner=_OWNER)
    if alpha_init > alpha_max:
        raise ValueError(f"{_OWNER}: `alpha_init` ({alpha_init:g}) must be <= `alpha_max` "
                         f"({alpha_max:g}).")
    return alpha_init, alpha_max


def _check_config(fraction, bits, prune_epochs, quant_epochs, learning_rate,
                  quant_learning_rate, batch_size, grid_tol, mode, alpha_init, beta=1.0,
                  alpha_max=30.0, layers=None, metrics=("accuracy",), steps_per_epoch=None,
                  per_layer_terms=True, verbose=1) -> dict:
    """Every argument of :class:`Compressor` checked (one-line ``TypeError`` / ``ValueError``
    naming it) and returned as a plain Python value, keyed by name."""
    from tfqreg.compression.codec import _check_mode

    out = dict(fraction=pruning.check_fraction(fraction),
               bits=grid.check_bits(bits, low=2, high=16))
    for name, v in (("prune_epochs", prune_epochs), ("quant_epochs", quant_epochs)):
        out[name] = _checks.check_int(name, v, low=0, owner=_OWNER)
    out["batch_size"] = _checks.check_int("batch_size", batch_size, low=1, owner=_OWNER)
    out["learning_rate"] = _positive("learning_rate", learning_rate)
    out["quant_learning_rate"] = _positive("quant_learning_rate", quant_learning_rate, True)
    out["grid_tol"] = _positive("grid_tol", grid_tol, True)
    out["beta"] = _checks.check_real("beta", beta, low=0.0, high=_MAX_BETA, low_open=True,
                                     owner=_OWNER)
    out["alpha_init"], out["alpha_max"] = _check_alpha(alpha_init, alpha_max)
    if layers is not None:
        layers = _names("layers", layers)
        if not layers:
            raise ValueError(f"{_OWNER}: `layers` is empty; use None for every Dense/Conv "
                             "layer.")
    out["layers"] = layers
    # as keras.Model.compile takes them: names, keras.metrics.Metric objects or functions
    out["metrics"] = _names("metrics", metrics, ok=lambda v: isinstance(v, str) or callable(v),
                            what="Keras metrics (names, Metric objects or functions)")
    out["mode"] = _check_mode(mode)
    out["steps_per_epoch"] = (None if steps_per_epoch is None else
                              _checks.check_int("steps_per_epoch", steps_per_epoch, low=1,
                                                owner=_OWNER))
    out["per_layer_terms"] = _checks.check_bool("per_layer_terms", per_layer_terms, _OWNER)
    out["verbose"] = _checks.check_int("verbose", verbose, low=min(_VERBOSE),
                                       high=max(_VERBOSE), owner=_OWNER)
    return out


def _check_data(data, name: str):
    if data is None:
        return None
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return tuple(np.asarray(a) for a in data)
    raise TypeError(f"`{name}` must be a batched tf.data.Dataset of (x, y) or a tuple "
                    f"(x, y) of arrays, got {type(data).__name__}.")


# ----------------------------------------------------------------------------- helpers
def _as_list(terms) -> list:
    return list(terms) if isinstance(terms, (list, tuple)) else [terms]


def learned_steps(terms, model) -> Dict[str, np.ndarray]:
    """The learned δ of one or more :class:`~tfqreg.training.LearnableMSQE` terms, keyed like
    :func:`~tfqreg.compression.fileformat.coded_kernels` (``"layer/attr"``), as float32."""
    keys = {id(var): key for key, (_, var, _) in coded_kernels(model).items()}
    out = {}
    for term in _as_list(terms):
        for (_, kernel), step in zip(term.targets, term.steps()):
            if id(kernel) in keys:
                out[keys[id(kernel)]] = np.asarray(step.numpy(), dtype=np.float32)
    return out


class _GridMonitor(keras.callbacks.Callback):
    """Tracks how far the kernels are from their learned grid, in units of δ: after every epoch
    ``grid_rms = sqrt(mean(((w − Q_δ(w)) / δ)²))`` over the kept (unpruned) weights (0 on the
    grid, about 0.29 for weights spread uniformly between grid points). Stops training when it
    falls under ``tol`` ("the weights sit on the grid")."""

    def __init__(self, terms, masks_by_var: Mapping[int, np.ndarray], tol: Optional[float] = None):
        super().__init__()
        self.terms, self.masks_by_var, self.tol = _as_list(terms), masks_by_var, tol
        self.values: List[float] = []

    def _sq(self) -> Dict[str, Tuple[float, int]]:
        out = {}
        for term in self.terms:
            for (layer, kernel), step in zip(term.targets, term.steps()):
                w = kernel.numpy()
                s = step.numpy()
                r = (w - grid.fake_quant(w, s, term.bits, term.narrow_range).numpy()) / s
                keep = self.masks_by_var.get(id(kernel))
                r = r[keep] if keep is not None else r.reshape(-1)
                out[kernel.name] = (float(np.sum(np.square(r, dtype=np.float64))), r.size)
        return out

    def grid_rms(self) -> float:
        """RMS distance to the grid in steps over all kept weights of all kernels."""
        parts = self._sq().values()
        n = sum(c for _, c in parts)
        return float(np.sqrt(sum(v for v, _ in parts) / n)) if n else 0.0

    def grid_rms_by_kernel(self) -> Dict[str, float]:
        """The same per kernel (by variable name)."""
        return {k: float(np.sqrt(v / c)) if c else 0.0 for k, (v, c) in self._sq().items()}

    def on_epoch_end(self, epoch, logs=None):
        value = self.grid_rms()
        self.values.append(value)
        if logs is not None:
            logs["grid_rms"] = value
        if self.tol is not None and value < self.tol:
            self.model.stop_training = True


@dataclass
class CompressionResult:
    """What :meth:`Compressor.run` returns.

    Attributes:
        model: the quantized model (kernels exactly ``δ·index``, pruned weights ``+0.0``); the
            ``.tfqz`` decodes to it bit for bit.
        compressed: the coded model (:meth:`save` writes it).
        masks: ``{"layer/attr": keep mask}``.
        steps: ``{"layer/attr": learned δ}`` (float32).
        history: Keras histories by stage (``"partial_l2"``, ``"msqe"``); ``msqe`` also holds
            ``grid_rms`` per epoch.
    """

    model: keras.Model
    compressed: CompressedModel
    masks: Dict[str, np.ndarray]
    steps: Dict[str, np.ndarray]
    history: Dict[str, dict] = field(default_factory=dict)

    @property
    def report(self) -> CompressionReport:
        return self.compressed.report

    def save(self, path) -> int:
        """Write the ``.tfqz`` file; returns its size in bytes."""
        return self.compressed.save(path)


@register
class Compressor:
    """Prune → quantize → entropy-code a Keras model (Choi et al.'s pipeline, methods.md §3).

    Args:
        fraction: pruning fraction r (per kernel), or ``{layer name: r}``.
        bits: grid bit width b (2..16).
        prune_epochs: epochs of training with the learnable partial L2 (stage 1).
        quant_epochs: maximum epochs of MSQE fine-tuning with the mask fixed (stage 3).
        per_channel: one learned δ per output channel instead of per kernel.
        narrow_range: symmetric grid ``[-(2^(b-1)-1), 2^(b-1)-1]``.
        layers: names of the layers whose kernels are compressed (default: every Dense/Conv).
        learning_rate: Adam learning rate of stage 1; ``quant_learning_rate`` of stage 3
            (default: the same).
        batch_size: batch size when the data are NumPy arrays.
        beta, alpha_init, alpha_max: the learnable-coefficient terms' ``β``, initial α and
            its cap. ``alpha_init="auto"`` starts each stage at the coefficient's equilibrium
            ``e^α·R = β`` for the regularizer value ``R`` of the weights at that moment
            (``α₀ = log(β/R)``, capped): α only moves by about the learning rate per Adam step,
            so from ``α = 0`` it would take thousands of steps before the term matters (MSQE
            values are ~δ²/12, i.e. 1e-5 or less).
        loss, metrics: compiled into every stage (the metric ``"accuracy"`` is what the report
            records).
        mode: ``"auto"`` / ``"sparse"`` / ``"dense"`` coding of the zeros.
        grid_tol: stop stage 3 early once the per-epoch ``grid_rms`` (RMS distance of the kept
            weights to their grid, in steps) is below it.
        steps_per_epoch: limit the batches per epoch (smoke runs).
        per_layer_terms: one learnable term (own α, R normalised by the layer's size) per
            layer instead of one for the whole model. With one shared term the mean over all
            weights is dominated by the big layers and the small ones (first conv, last dense),
            which matter most for accuracy, feel almost no pull to zero / to the grid.
        verbose: Keras progress (0 silent, 1 progress bar, 2 one line per epoch).
    """

    def __init__(self, fraction: Union[float, Mapping[str, float]] = 0.8, bits: int = 4,
                 prune_epochs: int = 3, quant_epochs: int = 3, per_channel: bool = False,
                 narrow_range: bool = False, layers: Optional[Sequence[str]] = None,
                 learning_rate: float = 1e-3, quant_learning_rate: Optional[float] = None,
                 batch_size: int = 128, beta: float = 1.0,
                 alpha_init: Union[float, str] = "auto", alpha_max: float = 30.0,
                 loss="sparse_categorical_crossentropy",
                 metrics: Sequence = ("accuracy",), mode: str = "auto",
                 grid_tol: Optional[float] = None, steps_per_epoch: Optional[int] = None,
                 per_layer_terms: bool = True, verbose: int = 1):
        args = _check_config(fraction, bits, prune_epochs, quant_epochs, learning_rate,
                             quant_learning_rate, batch_size, grid_tol, mode, alpha_init, beta,
                             alpha_max, layers, metrics, steps_per_epoch, per_layer_terms,
                             verbose)
        self.fraction = args["fraction"]
        self.bits = args["bits"]
        self.prune_epochs = args["prune_epochs"]
        self.quant_epochs = args["quant_epochs"]
        self.per_channel = _checks.check_bool("per_channel", per_channel, _OWNER)
        self.narrow_range = _checks.check_bool("narrow_range", narrow_range, _OWNER)
        self.layers = args["layers"]
        self.learning_rate = args["learning_rate"]
        self.quant_learning_rate = (args["quant_learning_rate"] or self.learning_rate)
        self.batch_size = args["batch_size"]
        self.beta, self.alpha_max = args["beta"], args["alpha_max"]
        self.alpha_init = args["alpha_init"]
        self.loss = loss
        self.metrics = args["metrics"]
        self.mode = args["mode"]
        self.grid_tol = args["grid_tol"]
        self.steps_per_epoch = args["steps_per_epoch"]
        self.per_layer_terms = args["per_layer_terms"]
        self.verbose = args["verbose"]

    def get_config(self) -> dict:
        return {k: getattr(self, k) for k in (
            "fraction", "bits", "prune_epochs", "quant_epochs", "per_channel", "narrow_range",
            "layers", "learning_rate", "quant_learning_rate", "batch_size", "beta",
            "alpha_init", "alpha_max", "loss", "metrics", "mode", "grid_tol",
            "steps_per_epoch", "per_layer_terms", "verbose")}

    @classmethod
    def from_config(cls, config: dict) -> "Compressor":
        return cls(**config)

    # -- plumbing -------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if self.verbose:
            print(f"[tfqreg compress] {msg}", flush=True)

    def _fit(self, model, data, epochs, callbacks=(), validation=None) -> dict:
        if epochs == 0:
            return {}
        kw = dict(epochs=epochs, verbose=self.verbose, callbacks=list(callbacks),
                  steps_per_epoch=self.steps_per_epoch)
        if isinstance(data, tuple):
            hist = model.fit(data[0], data[1], batch_size=self.batch_size, shuffle=True, **kw)
        else:
            hist = model.fit(data, **kw)
        return {k: [float(v) for v in vals] for k, vals in hist.history.items()}

    def evaluate(self, model, data) -> Optional[float]:
        """Accuracy (the first compiled metric) of ``model`` on ``data`` (``None`` without
        data)."""
        if data is None:
            return None
        model.compile(loss=self.loss, metrics=self.metrics)
        if isinstance(data, tuple):
            out = model.evaluate(data[0], data[1], batch_size=max(self.batch_size, 256),
                                 verbose=0, return_dict=True)
        else:
            out = model.evaluate(data, verbose=0, return_dict=True)
        names = [k for k in out if k != "loss"]
        return float(out[names[0]]) if names else None

    def _layer_groups(self, model) -> List[Tuple[Optional[List[str]], float]]:
        """``[(layer names or None for all, fraction)]``: the layers each term covers."""
        names = []
        for key in coded_kernels(model, self.layers):
            if key.split("/")[0] not in names:
                names.append(key.split("/")[0])
        frac = (lambda n: pruning.fraction_for(self.fraction, n))
        if self.per_layer_terms:
            return [([n], frac(n)) for n in names]
        if isinstance(self.fraction, dict):
            groups: Dict[float, List[str]] = {}
            for n in names:
                groups.setdefault(frac(n), []).append(n)
            return [(ns, r) for r, ns in sorted(groups.items())]
        return [(self.layers, self.fraction)]

    def _partial_l2_terms(self, model):
        return [training.LearnablePartialL2(fraction=r, beta=self.beta, alpha_init=self._alpha0(),
                                            alpha_max=self.alpha_max, layers=names,
                                            name=f"partial_l2_{i}" if i else None)
                for i, (names, r) in enumerate(self._layer_groups(model)) if r > 0]

    def _msqe_terms(self, model):
        return [training.LearnableMSQE(bits=self.bits, per_channel=self.per_channel,
                                       beta=self.beta, alpha_init=self._alpha0(),
                                       alpha_max=self.alpha_max, narrow_range=self.narrow_range,
                                       layers=names, name=f"msqe_{i}" if i else None)
                for i, (names, _) in enumerate(self._layer_groups(model))]

    def _alpha0(self) -> float:
        return 0.0 if self.alpha_init == "auto" else self.alpha_init

    def _start_alpha(self, terms) -> None:
        """``alpha_init="auto"``: α₀ = log(β / R(current weights)), capped at ``alpha_max``."""
        if self.alpha_init != "auto":
            return
        for term in terms:
            r = float(term.regularizer_value()[0])
            a0 = self.alpha_max if r <= 0 else min(self.alpha_max, float(np.log(self.beta / r)))
            term.alpha.assign(a0)
            self._log(f"{term.name}: R = {r:.3g}, alpha starts at {a0:.2f}")

    def _compile(self, model, lr):
        model.compile(keras.optimizers.Adam(lr), loss=self.loss, metrics=self.metrics)

    # -- stages ---------------------------------------------------------------------------------
    def train_partial_l2(self, model, data) -> dict:
        """Stage 1: train ``model`` (in place) with the learnable partial L2."""
        terms = self._partial_l2_terms(model)
        if not terms or self.prune_epochs == 0:
            return {}
        trainer = training.TrainingModel(model, terms=terms)
        self._start_alpha(terms)
        self._compile(trainer, self.learning_rate)
        return self._fit(trainer, data, self.prune_epochs)

    def prune(self, model) -> Dict[str, np.ndarray]:
        """Stage 2: fixed magnitude masks, applied (pruned weights set to ``+0.0``)."""
        masks = pruning.prune_masks(model, self.fraction, self.layers)
        pruning.apply_masks(model, masks)
        return masks

    def finetune_msqe(self, model, data, masks) -> Tuple[list, dict]:
        """Stage 3a: learnable-MSQE fine-tuning with the mask fixed (weights still float).

        Returns:
            ``(terms, history)``; ``history["grid_rms"]`` per epoch, ``grid_rms_final`` and
            ``grid_rms_by_kernel`` at the end.
        """
        terms = self._msqe_terms(model)
        trainer = training.TrainingModel(model, terms=terms)
        self._start_alpha(terms)
        self._compile(trainer, self.quant_learning_rate)
        kernels = coded_kernels(model, self.layers)
        by_var = {id(kernels[k][1]): m for k, m in masks.items() if k in kernels}
        monitor = _GridMonitor(terms, by_var, self.grid_tol)
        history = self._fit(trainer, data, self.quant_epochs,
                            callbacks=[pruning.PruningMask(masks, model=model), monitor])
        if monitor.values:
            history["grid_rms"] = list(monitor.values)
        history["grid_rms_final"] = monitor.grid_rms()
        history["grid_rms_by_kernel"] = monitor.grid_rms_by_kernel()
        return terms, history

    def snap(self, model, terms, masks) -> Dict[str, np.ndarray]:
        """Stage 3b: snap the kernels to the learned grid; returns the float32 steps.

        A kernel that a BatchNorm folds into is snapped so that its FOLD lies on the grid
        (``w = Q(w·s)/s``, :func:`tfqreg.training.round_to_grid`); :meth:`fold` then gives the
        model whose kernels are exactly ``δ·index``."""
        training.round_to_grid(_as_list(terms))
        steps = learned_steps(terms, model)
        if not fold.find_folds(model).folds:
            # the decoder's exact arithmetic (float32 δ × float32 index); a no-op up to rounding
            quantize_weights(model, self.bits, steps, self.per_channel, self.narrow_range,
                             self.layers)
            pruning.apply_masks(model, masks)  # already zero (0 is on the grid); a guarantee
        return steps

    def fold(self, model, steps, masks):
        """Stage 3c: fold the BatchNorms into the snapped kernels (as the TFLite converter
        does) and put the folded kernels exactly on ``δ·index``; returns ``(model, folds)``.
        Without a foldable BatchNorm, ``model`` itself (already exact) and ``[]``."""
        folds = fold.find_folds(model).folds
        if not folds:
            return model, []
        folded = fold.fold_model(model)
        quantize_weights(folded, self.bits, steps, self.per_channel, self.narrow_range,
                         self.layers)
        pruning.apply_masks(folded, masks)
        return folded, folds

    def train_msqe(self, model, data, masks) -> Tuple[Dict[str, np.ndarray], dict]:
        """Stage 3: :meth:`finetune_msqe` then :meth:`snap`; returns ``(steps, history)``."""
        terms, history = self.finetune_msqe(model, data, masks)
        return self.snap(model, terms, masks), history

    # -- all ------------------------------------------------------------------------------------
    def run(self, model, train: Data, validation: Optional[Data] = None) -> CompressionResult:
        """Run stages 1-5 on a copy of ``model`` (the argument is left untouched).

        Args:
            model: a built Sequential or Functional Keras 2 model (float, ideally trained).
            train: training data, a batched ``tf.data.Dataset`` of ``(x, y)`` or ``(x, y)``
                arrays.
            validation: data for the accuracies in the report (optional).

        Returns:
            A :class:`CompressionResult`; ``result.report.accuracy`` holds the accuracy after
            every stage (``input``, ``partial_l2``, ``pruned``, ``msqe`` (before snapping),
            ``quantized``, ``decoded``).

        Raises:
            RuntimeError: the decoded model is not bit-identical to the quantized one (a bug).
        """
        check_keras2(model, "model", kind=keras.Model)
        train = _check_data(train, "train")
        validation = _check_data(validation, "validation")
        if not model.built:
            raise ValueError("`model` must be built (give it an input shape).")
        work = keras.models.clone_model(model)
        work.set_weights(model.get_weights())
        acc: Dict[str, float] = {}

        def record(stage, m):
            a = self.evaluate(m, validation)
            if a is not None:
                acc[stage] = a
                self._log(f"{stage}: accuracy {100 * a:.2f}%")

        record("input", work)
        self._log(f"stage 1/5: learnable partial L2 (r={self.fraction}), "
                  f"{self.prune_epochs} epoch(s)")
        hist = {"partial_l2": self.train_partial_l2(work, train)}
        record("partial_l2", work)
        masks = self.prune(work)
        self._log(f"stage 2/5: pruned {100 * pruning.mask_fraction(masks):.1f}% of the kernel "
                  f"weights")
        record("pruned", work)
        self._log(f"stage 3/5: learnable MSQE at {self.bits} bits, mask fixed, up to "
                  f"{self.quant_epochs} epoch(s)")
        terms, hist["msqe"] = self.finetune_msqe(work, train, masks)
        record("msqe", work)
        steps = self.snap(work, terms, masks)
        work, folds = self.fold(work, steps, masks)
        if folds:
            self._log(f"folded {len(folds)} BatchNorm(s) into the coded kernels (the kernels "
                      "the device quantizes)")
        record("quantized", work)
        self._log("stage 4/5: Huffman coding")
        compressed = encode_model(work, self.bits, steps, self.per_channel, self.narrow_range,
                                  self.layers, self.mode)
        if not compressed.report.settings["lossless"]:  # pragma: no cover - a bug if it happens
            raise RuntimeError("the quantized kernels are not on the coded grid.")
        self._log("stage 5/5: decoding and checking the round trip")
        decoded = decode_model(compressed.to_bytes())
        for a, b in zip(work.weights, decoded.weights):
            x, y = a.numpy(), b.numpy()
            if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
                raise RuntimeError(f"decoded weight {a.name} differs from the quantized model.")
        record("decoded", decoded)
        report = compressed.report
        report.accuracy = acc
        report.settings.update(self.get_config())
        report.settings["grid_rms_final"] = hist["msqe"].get("grid_rms_final")
        report.settings["grid_rms_by_kernel"] = hist["msqe"].get("grid_rms_by_kernel")
        report.settings["batchnorm_folded"] = [list(p) for p in folds]
        compressed.refresh_report()
        return CompressionResult(work, compressed, masks, steps, hist)


def compress(model, train: Data, validation: Optional[Data] = None,
             **kwargs) -> CompressionResult:
    """Functional form: ``Compressor(**kwargs).run(model, train, validation)``."""
    return Compressor(**kwargs).run(model, train, validation)
