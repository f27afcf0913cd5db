"""The Keras 3 TrainingModel: the adapter of :class:`tfqreg.training._step._TrainingSteps` to a
Keras 3 ``keras.Model`` (TensorFlow backend).

``training.TrainingModel(keras3_model, terms=[...])`` returns an instance of the class built
here (``TrainingModel.__new__`` dispatches on :func:`tfqreg._keras.is_keras3`). The step, the
schedule, the lazy regularization and every term's math are the shared ones; this class only
says where Keras 3 keeps things:

* the task loss is ``self._compile_loss`` (already divided by the replicas under
  ``tf.distribute``, as Keras 3's own ``train_step`` uses it); ``model.losses`` (the kernel
  regularizers of ``inner``) enter the total as in Keras 2;
* the optimizer is a Keras 3 optimizer (``scale_loss`` / ``apply_gradients``);
* the terms (Keras 2 layers holding only configuration and references) are not tracked by the
  model; their learnable state (α, log δ) lives in one Keras 3 state layer per term
  (:attr:`_Term.state_layer`), which the model tracks: ``model.weights`` lists it, the
  optimizer trains it, ``.keras`` saves and restores it;
* ``fit`` logs ``loss`` (the total), ``task_loss``, the compiled metrics and the terms'
  metrics; ``evaluate`` logs Keras 3's ``loss`` (task + ``model.losses``) and the metrics.

Keras 3 cannot contain Keras 2 layers, so TFMOT- and larq-based models (Keras 2 only) are not
reachable here; a Keras 2 optimizer given to ``compile`` raises a TypeError naming it, and
``save`` to a legacy ``.h5`` file (which cannot restore this model) a ValueError naming
``filepath``: use ``.keras`` or ``save_weights('….weights.h5')``.
"""

from __future__ import annotations

import functools
from typing import Iterable, Optional

from tfqreg._keras import keras, keras3_module, tf
from tfqreg.training._common import _is_keras3
from tfqreg.training._step import _TrainingSteps, parse_terms


@functools.lru_cache(maxsize=None)
def training_model_class() -> type:
    """The Keras 3 TrainingModel class (created once, registered as ``tfqreg>TrainingModel``
    in Keras 3's serialization registry)."""
    k3 = keras3_module()
    if k3 is None:  # pragma: no cover - is_keras3() is False without Keras 3
        raise ImportError("Keras 3 (`keras`) is not installed.")
    from tfqreg.training.model import _NOT_BUILT, get, serialize

    class TrainingModel(_TrainingSteps, k3.Model):
        """Keras 3 twin of :class:`tfqreg.training.TrainingModel` (same arguments, step, logs).

        Args:
            inner: the built Keras 3 model to train.
            terms: term instances or aliases; at most one GradientL1.
        """

        _kmod = k3

        def __init__(self, inner, terms: Iterable = (), name: Optional[str] = None, **kwargs):
            if not isinstance(inner, k3.Model):
                raise TypeError(f"`inner` must be a keras.Model, got "
                                f"{type(inner).__module__}.{type(inner).__name__}.")
            super().__init__(name=name or f"training_{inner.name}", **kwargs)
            self.inner = inner
            terms = parse_terms(terms, get)
            self._init_terms(terms)
            self._task_tracker = k3.metrics.Mean(name="task_loss")
            trackers = {key: k3.metrics.Mean(name=key) for key in self._metric_keys.values()}
            object.__setattr__(self, "_term_trackers", trackers)
            self._tfqreg_trackers = [self._task_tracker] + list(trackers.values())
            if inner.built:
                self._attach_terms()
                self.built = True
            elif terms:
                raise ValueError(_NOT_BUILT.format(name=inner.name))

        def _attach_terms(self):
            super()._attach_terms()
            # tracked: their variables are this model's weights, saved in .keras
            self._term_states = [t.state_layer for t in self.terms
                                 if t.state_layer is not None and t.state_layer.weights]

        def build(self, input_shape):
            if not self.inner.built:
                self.inner.build(input_shape)
            self._attach_terms()
            self.built = True

        def get_config(self):
            return {"name": self.name,
                    "inner": k3.saving.serialize_keras_object(self.inner),
                    "terms": [serialize(t) for t in self.terms]}

        @classmethod
        def from_config(cls, config, custom_objects=None):
            inner = k3.saving.deserialize_keras_object(config["inner"],
                                                       custom_objects=custom_objects)
            terms = [get(t) for t in config.get("terms", [])]
            return cls(inner, terms=terms, name=config.get("name"))

        def compile(self, optimizer="rmsprop", *args, **kwargs):
            optimizer = kwargs.pop("optimizer", optimizer)
            _check_optimizer(optimizer)
            return super().compile(optimizer, *args, **kwargs)

        def compile_from_config(self, config):
            # Keras 3 skips compile() on load for a class that overrides it; this one only
            # checks the optimizer, so compile as Keras 3 would (then build its variables, so
            # that the saved optimizer state can be restored)
            self.compile(**k3.saving.deserialize_keras_object(config))
            if self.built:
                self.optimizer.build(self.trainable_variables)

        def save(self, filepath, *args, **kwargs):
            if str(filepath).lower().endswith((".h5", ".hdf5")):
                raise ValueError(
                    f"`filepath` ({filepath!r}): Keras 3's legacy HDF5 model format cannot "
                    "restore a TrainingModel (it stores the class without its registered name "
                    "and reloads an optimizer that cannot continue). Save as `.keras`, or the "
                    "weights with `save_weights('….weights.h5')`; export `model.inner`.")
            return super().save(filepath, *args, **kwargs)

        def test_step(self, data):
            x, y, sample_weight = k3.utils.unpack_x_y_sample_weight(data)
            y_pred = self(x, training=False)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                      training=False)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            self._loss_tracker.update_state(loss * replicas, sample_weight=_batch_size(x))
            if self._compile_metrics is not None:
                self._compile_metrics.update_state(y, y_pred, sample_weight)
            return self._logs(train=False)

        # -- adapter ----------------------------------------------------------------------------
        def _keep(self, attr, value):
            object.__setattr__(self, attr, value)  # Keras 2 objects: not Keras 3 state

        def _task_loss(self, y, y_pred, sample_weight):
            if self._compile_loss is None:
                raise ValueError("TrainingModel: compile with a `loss` (the task loss the "
                                 "terms act on).")
            return self._compile_loss(y, y_pred, sample_weight)

        def _task_metric_variables(self):
            return [v for m in (self._compile_loss.metrics if self._compile_loss else [])
                    for v in m.variables]

        def _is_loss_scale_optimizer(self):
            return isinstance(self.optimizer, k3.optimizers.LossScaleOptimizer)

        def _scale_loss(self, loss):
            return self.optimizer.scale_loss(loss)

        def _minimize(self, tape, loss, variables):
            grads = tape.gradient(loss, variables)
            self.optimizer.apply_gradients(zip(grads, variables))

        def _update_metrics(self, x, y, y_pred, sample_weight, task):
            self._task_tracker.update_state(task, sample_weight=_batch_size(x))
            if self._compile_metrics is not None:
                self._compile_metrics.update_state(y, y_pred, sample_weight)

        def _logs(self, train: bool) -> dict:
            logs = {"loss": self._loss_tracker.result()}
            if train:
                logs["task_loss"] = self._task_tracker.result()
            for m in (self._compile_loss.metrics if self._compile_loss else []):
                logs[m.name] = m.result()
            if self._compile_metrics is not None:
                result = self._compile_metrics.result()
                logs.update(result if isinstance(result, dict)
                            else {self._compile_metrics.name: result})
            if train:
                for key, tracker in self._term_trackers.items():
                    logs[key] = tracker.result()
            return logs

    TrainingModel.__qualname__ = "TrainingModel"
    return k3.saving.register_keras_serializable(package="tfqreg")(TrainingModel)


def _check_optimizer(optimizer) -> None:
    """A TypeError naming `optimizer` for a Keras 2 optimizer (Keras 3 cannot apply it)."""
    kinds = (keras.optimizers.Optimizer, keras.optimizers.legacy.Optimizer)
    if isinstance(optimizer, kinds) and not _is_keras3(optimizer):
        raise TypeError(f"`optimizer`: this TrainingModel wraps a Keras 3 model and needs a "
                        f"Keras 3 optimizer (`keras.optimizers`), got the Keras 2 "
                        f"{type(optimizer).__module__}.{type(optimizer).__name__}.")


def _batch_size(x):
    return tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
