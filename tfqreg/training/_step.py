"""The training step of :class:`~tfqreg.training.TrainingModel`, written once for Keras 2 and
Keras 3 models.

:class:`_TrainingSteps` holds everything a TrainingModel does beyond a plain ``keras.Model``:
parsing the terms, the late start (``start_step`` / ``start_epoch``), lazy regularization
(``every=k``: two compiled train functions), and ``train_step``, which composes

    loss = task loss + model.losses + Σ terms

(exact double backprop or the finite-difference form of gradient-ℓ1, both taking their
gradients inside :func:`~tfqreg.training._second_order.fast_second_order`, and the all-reduce of the weight gradients under ``tf.distribute``). The Keras 2
model (``tf_keras.Model``) and the Keras 3 model (``keras.Model``, TensorFlow backend) inherit
it and differ only in the few adapter methods at the end of the class: how the compiled task
loss is read, how the optimizer is applied, where the metrics live, and which callback base
class ``fit`` gets.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional

from tfqreg._keras import tf
from tfqreg.training._common import _Term
from tfqreg.training._second_order import fast_second_order
from tfqreg.training.gradient_l1 import GradientL1
from tfqreg.training.learnable import _Learnable, round_to_grid

__all__: list = []


class _ScheduleMixin:
    """The late-start callback's body (its base class is the model's Keras callback)."""

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


_CALLBACKS: Dict[int, type] = {}


def _schedule_callback(kmod, owner):
    """A late-start callback for ``owner``, subclassing ``kmod.callbacks.Callback``."""
    cls = _CALLBACKS.get(id(kmod))
    if cls is None:
        cls = type("_ScheduleCallback", (_ScheduleMixin, kmod.callbacks.Callback), {})
        _CALLBACKS[id(kmod)] = cls
    return cls(owner)


def parse_terms(terms: Iterable, get) -> list:
    """The terms as instances (``get`` resolves aliases and configs), checked: a list, at most
    one :class:`GradientL1`, unique names."""
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
    return terms


def metric_keys(terms) -> Dict[tuple, str]:
    """``{(term name, metric): logged name}``; a metric two terms log gets the term's prefix."""
    counts: Dict[str, int] = {}
    for t in terms:
        for m in t.metric_names:
            counts[m] = counts.get(m, 0) + 1
    return {(t.name, m): (m if counts[m] == 1 else f"{t.name}_{m}")
            for t in terms for m in t.metric_names}


class _TrainingSteps:
    """The shared part of the Keras 2 and Keras 3 TrainingModel (see the module docstring)."""

    #: the Keras package of the model (``tf_keras`` or ``keras``), set by each adapter
    _kmod = None
    #: marks TrainingModels of either Keras (``isinstance`` cannot span the two bases)
    _tfqreg_training = True

    def _init_terms(self, terms: list) -> None:
        """Set the term attributes (call once, in ``__init__``, after ``Model.__init__``)."""
        self._keep("terms", terms)
        self._keep("_gl1", next((t for t in terms if isinstance(t, GradientL1)), None))
        self._keep("_learnable", [t for t in terms if isinstance(t, _Learnable)])
        self._gl1_on = self._gl1 is not None and self._gl1.is_on(0, 0)
        self._gl1_phase = True  # False on the steps a lazy (every > 1) term skips
        self._keep("_metric_keys", metric_keys(terms))

    def _attach_terms(self):
        for t in self.terms:
            t.attach(self.inner)

    def call(self, inputs, training=None, mask=None):
        return self.inner(inputs, training=training)

    def make_train_function(self, force=False):
        gl1 = self._gl1
        if gl1 is None or gl1.every == 1 or not self._gl1_on:
            self._gl1_phase = True
            return self._base_train_function(force)
        if self.train_function is not None and not force:
            return self.train_function
        # lazy regularization: two compiled steps, the term's on every `every`-th call. The
        # phase is read when a step is traced, so it is set before every call.
        plain = self._base_train_function(True)
        regularized = self._base_train_function(True)
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

    def _base_train_function(self, force):
        """Keras' own train function (a fresh one with ``force``)."""
        super().make_train_function(force=force)  # Keras 3 returns None, Keras 2 the function
        return self.train_function

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
            kwargs["callbacks"] = [_schedule_callback(self._kmod, self)] + callbacks
        return super().fit(*args, **kwargs)

    def train_on_batch(self, *args, **kwargs):
        if self._gl1 is not None and not self._gl1_on:
            self.update_schedule(epoch=None if self._gl1.start_epoch is not None else 0)
        return super().train_on_batch(*args, **kwargs)

    # -- steps ----------------------------------------------------------------------------------
    def _task(self, x, y, sample_weight):
        y_pred = self(x, training=True)
        return self._task_loss(y, y_pred, sample_weight), y_pred

    def _other_costs(self, task):
        """``(local, global, per-term metrics)`` of the kernel regularizers and learnable terms."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        local, total, term_values = None, None, {}
        parts = []
        if self.losses:
            # summed: a Keras 3 `add_loss` may hold a non-scalar tensor (Keras sums it too)
            parts.append(tf.add_n([tf.reduce_sum(tf.cast(l, task.dtype)) for l in self.losses]))
        for term in self._learnable:
            cost, metrics = term.cost()
            parts.append(tf.cast(cost, task.dtype))
            term_values[term.name] = metrics
        if parts:
            total = tf.add_n(parts)
            local = total / replicas
        return local, total, term_values

    def train_step(self, data):
        x, y, sample_weight = self._kmod.utils.unpack_x_y_sample_weight(data)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        gl1 = self._gl1 if (self._gl1_on and self._gl1_phase) else None
        k = float(self._gl1.every) if self._gl1 is not None else 1.0
        variables = self.trainable_variables
        values, term_values = {}, {}
        if gl1 is not None and gl1.method == "finite_difference":
            if self._is_loss_scale_optimizer():
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
                protect=self._task_metric_variables())
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
                total_local = self._scale_loss(total_local)
            with fast_second_order() if gl1 is not None else contextlib.nullcontext():
                self._minimize(tape, total_local, variables)
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
        self._update_metrics(x, y, y_pred, sample_weight, task * replicas)
        return self._logs(train=True)

    # -- export ---------------------------------------------------------------------------------
    def round_to_grid(self):
        """Snap the kernels of every :class:`LearnableMSQE` term to its learned grid."""
        return round_to_grid(self)

    # -- adapter methods (each Keras' TrainingModel defines them) --------------------------------
    def _keep(self, attr: str, value) -> None:  # pragma: no cover - abstract
        """``self.attr = value`` with the tracking this Keras needs for a term attribute."""
        raise NotImplementedError

    def _task_loss(self, y, y_pred, sample_weight):  # pragma: no cover - abstract
        """This replica's share of the compiled loss (no regularizers)."""
        raise NotImplementedError

    def _task_metric_variables(self) -> list:  # pragma: no cover - abstract
        """Variables that computing the task loss updates (restored by the FD second pass)."""
        raise NotImplementedError

    def _is_loss_scale_optimizer(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def _scale_loss(self, loss):  # pragma: no cover - abstract
        raise NotImplementedError

    def _minimize(self, tape, loss, variables) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_metrics(self, x, y, y_pred, sample_weight, task):  # pragma: no cover
        """Update the compiled metrics (and the task-loss mean, ``task`` unscaled)."""
        raise NotImplementedError

    def _logs(self, train: bool) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError
