"""What every converter shares: user data -> samples, input specs, a static-batch model, the
inputs of the parity check, and the parity check against Keras.

Below the converters (:mod:`tfqreg.deploy.convert`, :mod:`tfqreg.deploy.micro`, and any other
converter) and above :mod:`~tfqreg.deploy.runtime` and :mod:`~tfqreg.deploy.report`: a
converter turns ``representative_data`` into arrays with :func:`to_samples`, converts
:func:`static_model`, runs the result in a :class:`~tfqreg.deploy.runtime.Runner` and measures
it with :func:`measure_parity`.

>>> from tfqreg.deploy import samples
>>> specs = samples.input_specs(model)                                   # doctest: +SKIP
>>> xs = samples.to_samples(dataset, specs, "representative_data", 500)  # doctest: +SKIP
>>> [a.shape for a in xs]                                                # doctest: +SKIP
[(500, 28, 28, 1)]
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from tfqreg._keras import keras, tf
from tfqreg.deploy import arguments as _arguments
from tfqreg.deploy.report import ParityReport
from tfqreg.deploy.runtime import Runner

__all__ = ["CALIBRATION_SAMPLES", "CHECK_SAMPLES", "input_specs", "to_samples", "static_model",
           "sample_inputs", "keras_outputs", "named_inputs", "keras_order", "measure_parity"]

CALIBRATION_SAMPLES = _arguments.CALIBRATION_SAMPLES
"""Representative samples used for calibration by default."""
CHECK_SAMPLES = 1000
"""Samples of the representative data the parity check uses when no ``sample`` is given."""


def input_specs(model: Any) -> List[tf.TensorSpec]:
    """One ``tf.TensorSpec`` per model input (shape with the batch axis, dtype, name).

    Raises:
        ValueError: the model has no known input shape.
    """
    if not getattr(model, "inputs", None):
        raise ValueError(
            "`model` has no known input shape: build it on an Input (functional/Sequential "
            "with input_shape) or call it once on data before exporting."
        )
    return [tf.TensorSpec(t.shape, t.dtype, name=t.name.split(":")[0]) for t in model.inputs]


def _expected(spec: tf.TensorSpec) -> str:
    dims = ["N"] + ["?" if d is None else str(d) for d in spec.shape.as_list()[1:]]
    return f"({', '.join(dims)})"


def to_samples(data: Any, specs: Sequence[tf.TensorSpec], name: str,
               limit: Optional[int]) -> List[np.ndarray]:
    """Normalise user data to one float32 array per model input, shaped ``(N, *input_shape)``.

    Args:
        data: an array (single input), a list/tuple of arrays (one per input, in Keras'
            order) or a dict of them by input name, a
            ``tf.data.Dataset`` of batches or single samples (``x`` or ``(x, y)``) or a callable
            returning an iterable of such items (the TFLite ``representative_dataset``
            protocol).
        specs: the model's :func:`input_specs`.
        name: the argument's name, for error messages.
        limit: keep at most this many samples (``None``: all).

    Returns:
        One float32 array per model input.

    Raises:
        ValueError: empty data, shapes that do not fit the model (the message gives the
            expected shape), or NaN / inf values.
        TypeError: an unsupported form of data, or integer values.
    """
    if isinstance(data, dict) and data and all(
            isinstance(d, (np.ndarray, tf.Tensor)) for d in data.values()):
        names = [s.name for s in specs]
        if set(data) != set(names):
            raise ValueError(f"`{name}` has the inputs {sorted(data)}, but the model's inputs "
                             f"are {names}.")
        data = [data[n] for n in names]
    if isinstance(data, (np.ndarray, tf.Tensor)) or (
        isinstance(data, (list, tuple)) and data and all(
            isinstance(d, (np.ndarray, tf.Tensor)) for d in data) and len(specs) > 1
    ):
        arrays = [np.asarray(d) for d in (data if isinstance(data, (list, tuple)) else [data])]
    else:
        items = data() if callable(data) and not isinstance(data, tf.data.Dataset) else data
        try:
            iterator = iter(items)
        except TypeError:
            raise TypeError(
                f"`{name}` must be an array shaped {_expected(specs[0])}, a list of arrays (one "
                f"per input), a tf.data.Dataset or a generator; got {type(data).__name__}."
            ) from None
        chunks: List[List[np.ndarray]] = [[] for _ in specs]
        count = 0
        for item in iterator:
            if isinstance(item, dict):
                item = list(item.values())
            if isinstance(item, (list, tuple)):
                item = list(item)[: len(specs)] if len(item) > len(specs) else list(item)
            else:
                item = [item]
            for k, (a, spec) in enumerate(zip(item, specs)):
                a = np.asarray(a)
                if a.ndim == spec.shape.rank - 1:  # a single sample without batch axis
                    a = a[None]
                chunks[k].append(a)
            count += len(chunks[0][-1])
            if limit is not None and count >= limit:
                break
        if not chunks[0]:
            raise ValueError(f"`{name}` is empty.")
        try:
            arrays = [np.concatenate(c) for c in chunks]
        except ValueError as e:
            raise ValueError(f"`{name}` yields arrays of different shapes: {e}") from None
    if len(arrays) != len(specs):
        raise ValueError(f"`{name}` has {len(arrays)} arrays, but the model has {len(specs)} "
                         f"inputs {[s.name for s in specs]}.")
    out = []
    for a, spec in zip(arrays, specs):
        want = spec.shape.as_list()[1:]
        got = list(a.shape[1:])
        if a.ndim != len(want) + 1 or any(w is not None and w != g for w, g in zip(want, got)):
            raise ValueError(
                f"`{name}` has shape {tuple(a.shape)}, but the model input '{spec.name}' expects "
                f"{_expected(spec)} (a batch of samples shaped {tuple(want)})."
            )
        target = np.float32
        if spec.dtype.is_integer:  # token ids and the like: TFLite does not quantize them
            if a.dtype.kind not in "iub":
                raise TypeError(
                    f"`{name}` has dtype {a.dtype}, but the model input '{spec.name}' takes "
                    f"{spec.dtype.name} values (e.g. token ids) shaped {_expected(spec)}.")
            target = spec.dtype.as_numpy_dtype
        elif a.dtype.kind not in "f":
            raise TypeError(
                f"`{name}` has dtype {a.dtype}, but the model input '{spec.name}' expects float32 "
                f"values shaped {_expected(spec)} (scale integer images to floats the way the "
                f"model was trained, e.g. x / 255)."
            )
        a = a[:limit].astype(target) if limit is not None else a.astype(target)
        if target is np.float32 and not np.all(np.isfinite(a)):
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(-1)
            where = np.flatnonzero(bad)
            raise ValueError(
                f"`{name}` holds non-finite values (NaN or inf) for the model input "
                f"'{spec.name}', in sample(s) {where[:5].tolist()}"
                f"{'...' if len(where) > 5 else ''}: they would poison the calibrated ranges.")
        out.append(a)
    if len(out[0]) == 0:
        raise ValueError(f"`{name}` is empty.")
    return out


def static_model(model: Any, batch_size: Optional[int]) -> Any:
    """``model`` re-built on inputs with a fixed batch size (``None``, or already that batch
    size: the model itself). The weights are shared, not copied."""
    specs = input_specs(model)
    if batch_size is None:
        return model
    if all(s.shape[0] == batch_size for s in specs):
        return model
    inputs = [keras.Input(shape=s.shape[1:], batch_size=batch_size, dtype=s.dtype, name=s.name)
              for s in specs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0], training=False)
    return keras.Model(inputs, outputs, name=f"{model.name}_b{batch_size}")


def sample_inputs(specs: Sequence[tf.TensorSpec], sample: Any,
                  representative: Optional[List[np.ndarray]],
                  name: str = "sample") -> List[np.ndarray]:
    """The inputs of a parity check: ``sample`` (any form :func:`to_samples` takes), else the
    first :data:`CHECK_SAMPLES` representative samples, else 64 inputs uniform in [0, 1]
    (seed 0)."""
    if sample is not None:
        return to_samples(sample, specs, name, None)
    if representative is not None:
        return [a[:CHECK_SAMPLES] for a in representative]
    for s in specs:
        if s.dtype.is_integer or None in s.shape.as_list()[1:]:
            what = (f"takes {s.dtype.name} values" if s.dtype.is_integer else
                    f"has axes of unknown size {_expected(s)}")
            raise ValueError(
                f"`{name}` is needed for the parity check: the model input '{s.name}' {what}, "
                "so tfqreg cannot make up inputs for it. Pass typical inputs as `sample` (or "
                "`representative_data`), or check=False.")
    rng = np.random.default_rng(0)
    return [rng.uniform(0, 1, size=[64] + [d or 1 for d in s.shape.as_list()[1:]])
            .astype(np.float32) for s in specs]


def keras_outputs(model: Any, xs: List[np.ndarray]) -> List[np.ndarray]:
    """``model.predict`` on ``xs`` (one array per input), as a list of float32 arrays."""
    y = model.predict(xs if len(xs) > 1 else xs[0], batch_size=256, verbose=0)
    return [np.asarray(a, np.float32) for a in (y if isinstance(y, (list, tuple)) else [y])]


def named_inputs(model: Any, runner: Any, xs: List[np.ndarray]) -> Any:
    """``xs`` (in Keras' input order) as ``runner.predict`` takes them: a dict by input name
    when the model has several inputs, since the converter may order them differently
    (``meta`` before ``img``).

    Raises:
        ValueError: the runner's input names are not the model's (inputs cannot be matched).
    """
    names = [s.name for s in input_specs(model)]
    have = getattr(runner, "input_names", None)
    if len(xs) < 2 or have is None:
        return xs
    if sorted(have) != sorted(names):
        raise ValueError(f"the converted model's inputs {have} are not the Keras model's "
                         f"inputs {names}, so they cannot be matched by name.")
    return dict(zip(names, xs))


def keras_order(model: Any, runner: Any, got: List[np.ndarray]) -> List[np.ndarray]:
    """``runner``'s outputs (file order) in Keras' ``model.output_names`` order, matched by
    name (unchanged when the names do not all match, or for one output)."""
    have = getattr(runner, "output_names", None)
    want = list(getattr(model, "output_names", None) or [])
    if len(got) < 2 or not have or sorted(have) != sorted(want) or \
            getattr(runner, "_out_order", None) is not None:
        return got
    by_name = dict(zip(have, got))
    return [by_name[n] for n in want]


def measure_parity(model: Any, runner: Runner, xs: List[np.ndarray], mode: str, atol: float,
                   min_agreement: float, reference: str = "Keras") -> ParityReport:
    """Compare ``runner``'s outputs with ``model``'s on ``xs``.

    Args:
        model: the Keras model.
        runner: a :class:`~tfqreg.deploy.runtime.Runner` (or anything with ``.predict`` and
            ``.backend``) holding the converted model.
        xs: the inputs, one array per model input.
        mode: ``"float"`` passes on max |diff| <= ``atol``; any other mode on top-1 agreement
            >= ``min_agreement``, where an output that ties Keras' class with another class
            counts as agreeing (a quantized softmax has 1/256 resolution; the strict agreement
            is reported too); outputs without a class axis always pass, numbers reported.
        atol: see ``mode``.
        min_agreement: see ``mode``.
        reference: what the report calls the Keras side.

    Returns:
        A :class:`~tfqreg.deploy.report.ParityReport`.
    """
    want = keras_outputs(model, xs)
    got = runner.predict(named_inputs(model, runner, xs))
    got = got if isinstance(got, list) else [got]
    got = keras_order(model, runner, got)
    diffs = [np.abs(g.reshape(w.shape) - w) for g, w in zip(got, want)]
    max_diff = float(max(d.max() for d in diffs))
    mean_diff = float(np.mean(np.concatenate([d.ravel() for d in diffs])))
    w0, g0 = want[0], got[0].reshape(want[0].shape)
    agreement = ties = None
    if w0.ndim >= 2 and w0.shape[-1] > 1:
        wf, gf = w0.reshape(len(w0), -1), g0.reshape(len(g0), -1)
        agreement = float(np.mean(wf.argmax(-1) == gf.argmax(-1)))
        # a quantized output can tie Keras' class with another one (e.g. softmax at 1/256
        # resolution); argmax then takes the first. Counting a tie as agreement:
        ties = float(np.mean(gf[np.arange(len(gf)), wf.argmax(-1)] == gf.max(-1)))
    if mode == "float":
        criterion = f"max|diff| <= {atol:g}"
        passed = max_diff <= atol
    elif agreement is not None:
        # Decided counting ties: a quantized softmax that ties Keras' class with another one
        # computed the same answer at its resolution; the strict figure stays in the report.
        criterion = f"top-1 agreement (a tie with Keras' class counts) >= {min_agreement:.2%}"
        passed = ties >= min_agreement
    else:
        criterion = "no class axis: numbers reported, no threshold"
        passed = True
    return ParityReport(reference, runner.backend, int(len(xs[0])), max_diff, mean_diff, agreement,
                        criterion, bool(passed), ties)
