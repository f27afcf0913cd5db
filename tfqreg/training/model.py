"""The model that trains with the terms: :class:`TrainingModel` (``train_step`` composes the
task loss, the kernel regularizers and the terms), and term lookup by alias.

``TrainingModel(inner, terms)`` is a ``tf_keras.Model`` for a Keras 2 ``inner`` and a Keras 3
``keras.Model`` (TensorFlow backend) for a Keras 3 ``inner``: ``TrainingModel.__new__`` picks
the class, both inherit the one step of :mod:`tfqreg.training._step`, and each only adapts
where Keras 2 and Keras 3 differ (compiled loss and metrics, optimizer, tracking). On a Keras 3
model the terms' learnable state (α, log δ) are Keras 3 variables of a small state layer per
term: ``model.weights`` lists them, the Keras 3 optimizer trains them, ``.keras`` saves them.
``isinstance(model, TrainingModel)`` holds for the Keras 2 class only (the two have different
bases); :func:`is_training_model` answers for both."""

from __future__ import annotations

from typing import Iterable, Optional

from tfqreg._keras import check_keras2, keras, register, tf
from tfqreg.training._common import _is_keras3, _Term
from tfqreg.training._step import _TrainingSteps, parse_terms
from tfqreg.training.gradient_l1 import GradientL1
from tfqreg.training.learnable import LearnableMSQE, LearnablePartialL2

__all__ = ["TrainingModel", "get", "serialize", "is_training_model"]


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
# The Keras 2 model
# ---------------------------------------------------------------------------------------------


def is_training_model(obj) -> bool:
    """Whether ``obj`` is a :class:`TrainingModel` (Keras 2 or Keras 3)."""
    return bool(getattr(type(obj), "_tfqreg_training", False))


_NOT_BUILT = ("`inner` ({name}) is not built and has no input shape, so its kernels (which the "
              "terms act on) do not exist yet: build it (`inner.build(input_shape)`, or give its "
              "first layer an input_shape / an Input) before wrapping it.")


@register
class TrainingModel(_TrainingSteps, keras.Model):
    """A Keras model that trains ``inner`` with tfqreg's training-step terms.

    ``call`` delegates to ``inner``; ``train_step`` minimises
    ``task loss + inner.losses + Σ terms``. ``fit`` logs ``loss`` (the total), ``task_loss``,
    the compiled metrics, and per term ``gradient_l1`` (its cost), ``grad_l1_w`` / ``grad_l1_a``
    (the norms), ``msqe``, ``exp_alpha``, ``delta`` (mean δ), ``partial_l2``; a metric name used
    by two terms is prefixed with the term's name. ``evaluate`` reports the usual Keras
    ``loss`` (task + ``inner.losses``) and compiled metrics.

    For a Keras 3 ``inner`` (TensorFlow backend) the constructor returns the Keras 3 twin of
    this class (a ``keras.Model``), with the same arguments, step, logs and methods.

    Args:
        inner: the Keras 2 or Keras 3 model to train (built, or buildable with
            ``build(input_shape)``).
        terms: term instances or aliases (``"gradient_l1"``, ``"msqe"``, ``"partial_l2"``);
            at most one :class:`GradientL1`.
    """

    _kmod = keras

    def __new__(cls, *args, **kwargs):
        inner = args[0] if args else kwargs.get("inner")
        if cls is TrainingModel and _is_keras3(inner):
            return _keras3_class()(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)

    def __init__(self, inner, terms: Iterable = (), name: Optional[str] = None, **kwargs):
        check_keras2(inner, "inner", kind=keras.Model)
        super().__init__(name=name or f"training_{inner.name}", **kwargs)
        self.inner = inner
        terms = parse_terms(terms, get)
        self._init_terms(terms)
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
            raise ValueError(_NOT_BUILT.format(name=inner.name))

    # -- structure ------------------------------------------------------------------------------
    def build(self, input_shape):
        if not self.inner.built:
            self.inner.build(input_shape)
        self._attach_terms()
        self._build_input_shape = input_shape
        self.built = True

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

    # -- adapter --------------------------------------------------------------------------------
    def _keep(self, attr, value):
        setattr(self, attr, value)  # tracked: the terms' variables are this model's weights

    def _task_loss(self, y, y_pred, sample_weight):
        return self.compiled_loss(y, y_pred, sample_weight)

    def _task_metric_variables(self):
        return [v for m in (self.compiled_loss.metrics if self.compiled_loss else [])
                for v in m.variables]

    def _is_loss_scale_optimizer(self):
        return isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer)

    def _scale_loss(self, loss):
        return loss  # minimize() scales a LossScaleOptimizer's loss itself

    def _minimize(self, tape, loss, variables):
        self.optimizer.minimize(loss, variables, tape=tape)

    def _update_metrics(self, x, y, y_pred, sample_weight, task):
        self.compiled_metrics.update_state(y, y_pred, sample_weight)  # compiled_loss: the task

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



def _keras3_class():
    """The Keras 3 TrainingModel class (:mod:`tfqreg.training._keras3_model`)."""
    from tfqreg.training._keras3_model import training_model_class

    return training_model_class()
