"""The model that trains with the terms: :class:`TrainingModel` (``train_step`` composes the
task loss, the kernel regularizers and the terms), and term lookup by alias."""

from __future__ import annotations

from typing import Dict, Iterable, Optional

from tfqreg._keras import check_keras2, keras, register, tf
from tfqreg.training._common import _Term
from tfqreg.training.gradient_l1 import GradientL1
from tfqreg.training.learnable import LearnableMSQE, LearnablePartialL2, _Learnable, round_to_grid

__all__ = ["TrainingModel", "get", "serialize"]


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
        if terms is None:
            terms = []
        if not isinstance(terms, (list, tuple)):
            raise TypeError(f"`terms` must be a list of training terms (or one term / alias), "
                            f"got {terms!r} ({type(terms).__name__}).")
        terms = [get(t) for t in terms]
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
        self._gl1_phase = True  # False on the steps a lazy (every > 1) term skips
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
        gl1 = self._gl1
        if gl1 is None or gl1.every == 1 or not self._gl1_on:
            self._gl1_phase = True
            return super().make_train_function(force=force)
        if self.train_function is not None and not force:
            return self.train_function
        # lazy regularization: two compiled steps, the term's on every `every`-th call. The
        # phase is read when a step is traced, so it is set before every call.
        plain = super().make_train_function(force=True)
        regularized = super().make_train_function(force=True)
        if plain is regularized:  # pragma: no cover - Keras returned a cached function
            raise RuntimeError("TrainingModel: could not build the lazy train functions.")
        every, calls = gl1.every, [0]

        def train_function(iterator):
            on = calls[0] % every == 0
            calls[0] += 1
            self._gl1_phase = on
            return (regularized if on else plain)(iterator)

        self.train_function = train_function
        return train_function

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

    def _other_costs(self, task):
        """``(local, global, per-term metrics)`` of the kernel regularizers and learnable terms."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        local, total, term_values = None, None, {}
        parts = []
        if self.losses:
            parts.append(tf.add_n([tf.cast(l, task.dtype) for l in self.losses]))
        for term in self._learnable:
            cost, metrics = term.cost()
            parts.append(tf.cast(cost, task.dtype))
            term_values[term.name] = metrics
        if parts:
            total = tf.add_n(parts)
            local = total / replicas
        return local, total, term_values

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        gl1 = self._gl1 if (self._gl1_on and self._gl1_phase) else None
        k = float(self._gl1.every) if self._gl1 is not None else 1.0
        variables = self.trainable_variables
        values, term_values = {}, {}
        if gl1 is not None and gl1.method == "finite_difference":
            if isinstance(self.optimizer, keras.mixed_precision.LossScaleOptimizer):
                raise ValueError("GradientL1(method='finite_difference') does not support a "
                                 "LossScaleOptimizer; use method='exact'.")
            other = {}

            def extra():
                local, total, tv = self._other_costs(task_holder[0])
                other.update(total=total, values=tv)
                return local

            task_holder = []

            def forward():
                out = self._task(x, y, sample_weight)
                task_holder[:] = [out[0]]
                return out

            grads, task, y_pred, _, norm_w, norm_a = gl1.finite_difference(
                self.inner, forward, extra, variables, replicas=replicas, scale=k,
                protect=[v for m in (self.compiled_loss.metrics if self.compiled_loss else [])
                         for v in m.variables])
            term_values = other["values"]
            total_global = task * replicas
            if other["total"] is not None:
                total_global += other["total"]
            total_global += k * (gl1.lambda_w * norm_w + (gl1.lambda_a * replicas) * norm_a)
            self.optimizer.apply_gradients(zip(grads, variables))
        else:
            with tf.GradientTape() as tape:
                if gl1 is not None:
                    task, y_pred, norm_w, norm_a = gl1.forward(
                        lambda: self._task(x, y, sample_weight), replicas=replicas)
                else:
                    task, y_pred = self._task(x, y, sample_weight)
                local, total, term_values = self._other_costs(task)
                total_local = task if local is None else task + local
                total_global = task * replicas if total is None else task * replicas + total
                if gl1 is not None:
                    # per replica; norm_w is the same on every replica, norm_a is local
                    total_local += k * ((gl1.lambda_w / replicas) * norm_w
                                        + gl1.lambda_a * norm_a)
                    total_global += k * (gl1.lambda_w * norm_w
                                         + (gl1.lambda_a * replicas) * norm_a)
            self.optimizer.minimize(total_local, variables, tape=tape)
        if gl1 is not None:
            values.update(gradient_l1=gl1.lambda_w * norm_w + (gl1.lambda_a * replicas) * norm_a,
                          grad_l1_w=norm_w, grad_l1_a=norm_a * replicas)
        elif self._gl1 is not None and not self._gl1_on:  # late start: log zeros until on
            zero = tf.zeros([], task.dtype)
            values.update(gradient_l1=zero, grad_l1_w=zero, grad_l1_a=zero)

        self._loss_tracker.update_state(total_global)
        for m, v in values.items():  # a lazy step without the term leaves its means alone
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

