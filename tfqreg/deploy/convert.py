"""Converting Keras models: TFLite (float, dynamic-range, full-integer int8) and Larq Compute
Engine, each checked against Keras in the interpreter that will run it; loading saved models.

Every converter returns an :class:`~tfqreg.deploy.report.ExportResult`: the flatbuffer bytes,
the path it was written to (if any) and an :class:`~tfqreg.deploy.report.ExportReport` (ops,
tensors, sizes, parity numbers) that prints as text and saves as JSON.

>>> import numpy as np
>>> from tfqreg import models
>>> from tfqreg.deploy import to_tflite
>>> model = models.tiny_cnn()
>>> result = to_tflite(model, mode="float")                    # doctest: +SKIP
>>> result.report.parity.max_abs_diff < 1e-5                   # doctest: +SKIP
True
>>> x = np.random.rand(64, 28, 28, 1).astype("float32")
>>> result = to_tflite(model, mode="int8", representative_data=x,
...                    check=False)                            # doctest: +SKIP
>>> print(result.report.to_text())                             # doctest: +SKIP

What each mode means:

* ``"float"``: float32 weights and activations. Parity: max |TFLite − Keras| ≤ ``atol``
  (default 1e-5) on the sample.
* ``"dynamic"``: int8 weights, float activations (dynamic-range quantization). Parity: top-1
  agreement ≥ ``min_agreement``.
* ``"int8"``: full-integer: int8 weights and activations, inputs/outputs int8, uint8 or float32
  (``io_dtype``). Needs ``representative_data`` (calibration inputs shaped like the model's
  input). Parity: top-1 agreement ≥ ``min_agreement`` (default 0.99). An op that TFLite cannot
  quantize is an error naming the op (``allow_float_ops=True`` keeps it in float instead, which
  TFLite Micro and the Edge TPU then cannot run).

The batch dimension is fixed to ``batch_size`` (default 1) by re-building the model on a fixed
input, as microcontrollers and the Edge TPU need static shapes; ``batch_size=None`` keeps it
dynamic. Conversion errors become :class:`ConversionError` naming the offending op (the
converter's exception is chained as ``__cause__``); a failed parity check is a
:class:`ParityError` carrying the report.

Sub-8-bit weights (``weight_bits=4`` or ``2``): the file holds packed INT4 / INT2 kernels
(:mod:`tfqreg.deploy.lowbit`) on exactly the grid :func:`tfqreg.ptq.quantize` simulates:

1. ``ptq.quantize(model, weight_bits)`` folds the BatchNorms and puts every kernel on the tfqreg
   grid (per output channel; on TFLite Micro, ``Dense`` per tensor, as its INT4
   FULLY_CONNECTED requires);
2. that model is converted to a float ``.tflite`` (its weights already on the grid, nothing left
   to fold);
3. :func:`tfqreg.deploy.lowbit.quantize_tflite` writes the integers ``k = w/δ`` and scales ``δ``
   bit for bit into INT4 (INT2 for FULLY_CONNECTED with ``weight_bits=2`` on LiteRT; a
   convolution's 2-bit grid is stored in INT4), int8 activations calibrated on
   ``representative_data``; combinations the target runtime cannot run are refused.

The parity check then compares the file with the SIMULATED model
(``ptq.quantize(model, weight_bits, activation_bits=8, ...)``), not with the float model: the
claim checked is "the device computes what tfqreg simulated". The report's ``extra`` has the
weight bytes by tensor type and the grid.

The shared steps (data -> samples, static batch, parity) are :mod:`tfqreg.deploy.samples`; a
new converter uses them and :func:`finish_export` the same way.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tfqreg._keras import check_keras2, keras, require_larq, tf
from tfqreg.deploy.arguments import (IO_DTYPES, MAX_BATCH_SIZE, MODES, check_arguments,
                                     check_lowbit_arguments, check_path)
from tfqreg.deploy.loading import load_model
from tfqreg.deploy.report import ExportReport, ExportResult
from tfqreg.deploy.runtime import Runner
from tfqreg.deploy.samples import (CALIBRATION_SAMPLES, input_specs, measure_parity,
                                   sample_inputs, static_model, to_samples)
from tfqreg.deploy.tflite_file import TfliteGraph, read_tflite

__all__ = ["MODES", "IO_DTYPES", "MAX_BATCH_SIZE", "ConversionError", "ParityError",
           "check_arguments", "check_lowbit_arguments", "check_path", "explain_converter_error", "finish_export", "keras_names", "to_tflite",
           "to_lce", "load_model"]


class ConversionError(RuntimeError):
    """A model could not be converted; the message names the op (and layer) where it could."""


class ParityError(AssertionError):
    """The converted model disagrees with Keras beyond the tolerance; ``.report`` has numbers.

    Args:
        message: what failed.
        report: the :class:`~tfqreg.deploy.report.ExportReport` with the parity numbers.
    """

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report


# --------------------------------------------------------------------------------------------
# Converter errors: name the op.
# --------------------------------------------------------------------------------------------

_OP_PATTERNS = (
    re.compile(r"'(tf\.\w+|tfl\.\w+)' op is neither a custom op nor a flex op"),
    re.compile(r"failed to legalize operation '(tf\.\w+|tfl\.\w+)'"),
    re.compile(r"Quantization not yet supported for op: '?(\w+)'?"),
    re.compile(r"'(tfl\.\w+|tf\.\w+)' op"),
)
_LOC = re.compile(r'callsite\("([^"@]+)@')
_SELECT = re.compile(r"TF Select ops: ([^\n]+)")


def _locate_tf_op(model: Any, op_type: str) -> List[str]:
    """Names of the TensorFlow nodes of type ``op_type`` in ``model``'s inference graph (their
    name paths carry the Keras layer names, e.g. ``model/my_lambda/Erf``)."""
    try:
        specs = input_specs(model)
        fn = tf.function(lambda *a: model(a[0] if len(a) == 1 else list(a), training=False))
        graph_def = fn.get_concrete_function(*specs).graph.as_graph_def()
    except Exception:  # locating is best effort; the conversion error is what matters
        return []
    names = [n.name for n in graph_def.node if n.op == op_type]
    for f in graph_def.library.function:
        names += [n.name for n in f.node_def if n.op == op_type]
    return names


def explain_converter_error(exc: BaseException, what: str, model: Any = None) -> str:
    """A one-paragraph message for a converter exception: the op it failed at, the graph node
    (and so the Keras layer) where it can be found, the first error line.

    Args:
        exc: what the converter raised.
        what: the conversion, e.g. ``"TFLite conversion (int8)"``.
        model: the Keras model, to locate a TensorFlow op by type when the message has no
            location.
    """
    text = str(exc)
    op = None
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            op = m.group(1)
            break
    where = None
    if op:
        short = op.split(".", 1)[-1]
        locs = [loc for loc in _LOC.findall(text) if loc.rsplit("/", 1)[-1].startswith(short)]
        if not locs and model is not None and op.startswith("tf."):
            locs = _locate_tf_op(model, short)
        where = locs[0] if locs else None
    select = _SELECT.search(text)
    first = next((ln.strip() for ln in text.splitlines() if "error:" in ln), text.splitlines()[0]
                 if text else type(exc).__name__)
    first = first.split("error:", 1)[-1].strip()
    msg = f"{what} failed"
    if op:
        msg += f" at op {op}" + (f" (graph node '{where}')" if where else "")
    msg += f": {first}"
    if select:
        msg += (f". TFLite has no builtin kernel for: {select.group(1).strip()}; replace that "
                "operation in the model (TF Select/Flex ops cannot run on microcontrollers or "
                "the Edge TPU)")
    return msg + f". [{type(exc).__name__}; the converter's full message is in __cause__]"


# --------------------------------------------------------------------------------------------
# Report + parity.
# --------------------------------------------------------------------------------------------


def finish_export(model: Any, flatbuffer: bytes, target: str, mode: str, io_dtype: str,
                  batch_size: Optional[int], check: bool,
                  sample_xs: Optional[List[np.ndarray]], backend: str, atol: float,
                  min_agreement: float, path: Optional[str] = None,
                  notes: Sequence[str] = (),
                  extra: Optional[Dict[str, Any]] = None, reference: str = "Keras",
                  keras_params: Optional[int] = None,
                  parity_model: Any = None) -> ExportResult:
    """What every converter does last: report, parity check, write, raise on a failed check.

    Args:
        model: the Keras model that was converted.
        flatbuffer: the converter's output.
        target, mode, io_dtype, batch_size: for the report (see ``ExportReport``).
        check: run the parity check on ``sample_xs`` in ``backend``.
        sample_xs: the check's inputs (:func:`~tfqreg.deploy.samples.sample_inputs`).
        backend: a :class:`~tfqreg.deploy.runtime.Runner` backend.
        atol, min_agreement: the check's thresholds (see
            :func:`~tfqreg.deploy.samples.measure_parity`).
        path: write the ``.tflite`` and its JSON report here (also when the check fails).
        notes, extra: added to the report.
        reference: what the parity report calls ``model`` (e.g. the simulated model).
        keras_params: the parameter count reported (default ``model.count_params()``).
        parity_model: the model whose outputs the check compares with (default ``model``;
            the user's Keras 3 model when ``model`` is its tf_keras mirror).

    Returns:
        An :class:`~tfqreg.deploy.report.ExportResult`.

    Raises:
        ParityError: the check failed (the report is in ``.report``).
    """
    params = model.count_params() if keras_params is None else keras_params
    report = ExportReport.from_flatbuffer(flatbuffer, params, target, mode,
                                          io_dtype, batch_size, list(notes), extra)
    result = ExportResult(flatbuffer, report, None, *keras_names(model, flatbuffer))
    if check:
        report.parity = measure_parity(model if parity_model is None else parity_model,
                                       Runner(flatbuffer, backend), sample_xs, mode,
                                       atol, min_agreement, reference=reference)
    if path is not None:
        result.save(path)
    if check and not report.parity.passed:
        raise ParityError(
            f"{target} ({mode}) model does not match {reference}: {report.parity.to_text()}. The "
            "model and the report are in `.report`; pass check=False to skip the check.", report)
    return result


def keras_names(model: Any, flatbuffer: bytes):
    """``(input_names, output_names)``: the Keras model's inputs and outputs in Keras' order,
    for :class:`~tfqreg.deploy.report.ExportResult` to match a list of arrays by name (the
    converter may reorder inputs). ``None`` for a side with one tensor or names the file does
    not carry.

    Raises:
        ConversionError: a multi-input model whose input names the file does not carry (its
            inputs could not be matched).
    """
    graph = read_tflite(flatbuffer)
    have_in = [graph.input_name(k) for k in range(len(graph.inputs))]
    want_in = [s.name for s in input_specs(model)]
    inputs = None
    if len(want_in) > 1:
        if sorted(have_in) != sorted(want_in):
            raise ConversionError(f"the converted model's inputs {have_in} are not the Keras "
                                  f"model's {want_in}: inputs cannot be matched by name.")
        inputs = want_in
    want_out = list(getattr(model, "output_names", None) or [])
    outputs = None
    if len(want_out) > 1 and sorted(graph.signature_outputs) == sorted(want_out):
        outputs = want_out
    return inputs, outputs


# --------------------------------------------------------------------------------------------
# TFLite.
# --------------------------------------------------------------------------------------------


def _float_ops(graph: TfliteGraph) -> List[str]:
    """Ops that compute in float inside a model meant to be full-integer (the QUANTIZE and
    DEQUANTIZE that convert float model inputs/outputs at the boundary excepted)."""
    boundary = set(graph.inputs) | set(graph.outputs)
    bad = []
    for op in graph.ops:
        ts = [graph.tensor(i) for i in op.inputs + op.outputs if i >= 0]
        flt = [t for t in ts if t.dtype in ("float32", "float16") and not t.constant]
        if op.name == "QUANTIZE" and all(t.index in boundary for t in flt):
            continue
        if op.name == "DEQUANTIZE" and all(t.index in boundary for t in flt):
            continue
        if op.name in ("QUANTIZE", "DEQUANTIZE"):
            continue  # the float op they feed is reported instead
        if flt or any(t.dtype in ("float32", "float16") for t in ts if t.constant):
            out = graph.tensor(op.outputs[0]).name if op.outputs else "?"
            bad.append(f"{op.name} (op #{op.index}, output '{out}')")
    return bad


def to_tflite(
    model: Any,
    mode: str = "float",
    representative_data: Any = None,
    io_dtype: Optional[str] = None,
    batch_size: Optional[int] = 1,
    check: bool = True,
    sample: Any = None,
    path: Optional[str] = None,
    atol: float = 1e-5,
    min_agreement: float = 0.99,
    allow_float_ops: bool = False,
    calibration_samples: int = CALIBRATION_SAMPLES,
    weight_bits: Optional[int] = None,
    runtime: str = "litert",
    per_channel: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Convert a Keras model to TFLite and check it against Keras in the LiteRT interpreter.

    Args:
        model: a built ``tf_keras`` model, or a Keras 3 Sequential / Functional model
            (TensorFlow backend): it is converted through its tf_keras mirror
            (:func:`tfqreg.keras3_bridge.to_keras2`, verified on the check's inputs), and the
            float / dynamic / int8 parity check compares the file with the Keras 3 model's
            own outputs (4- / 2-bit files: with the simulated model, as for Keras 2).
        mode: ``"float"``, ``"dynamic"`` (int8 weights, float activations) or ``"int8"``
            (full integer).
        representative_data: calibration inputs for ``"int8"`` (see module docstring for the
            accepted forms); the first ``calibration_samples`` are used.
        io_dtype: model input/output type for ``"int8"``: ``"int8"`` (default), ``"uint8"`` or
            ``"float32"``; the other modes are float32.
        batch_size: static batch size of the exported model; ``None`` keeps it dynamic.
        check: run the parity check (raises :class:`ParityError` when it fails).
        sample: inputs for the parity check; default: the representative data, or (float and
            dynamic modes without data) 64 uniform random inputs in [0, 1].
        path: write the ``.tflite`` (and its JSON report) here.
        atol: float-mode tolerance on max |TFLite − Keras|.
        min_agreement: dynamic/int8-mode minimum top-1 agreement with Keras.
        allow_float_ops: int8 mode: keep ops TFLite cannot quantize in float (noted in the
            report) instead of raising.
        calibration_samples: how many representative samples calibrate the ranges.
        weight_bits: ``None`` / ``8``: the TF converter's int8 weights; ``4`` or ``2``: packed
            INT4 / INT2 weights on tfqreg's grid (see the module docstring), with
            ``mode="int8"`` (int8 activations) or ``mode="dynamic"`` (float activations,
            LiteRT only).
        runtime: for ``weight_bits`` 4 / 2: ``"litert"`` or ``"micro"`` (TFLite Micro); decides
            what is refused, the Dense granularity, and where the parity check runs.
        per_channel: for ``weight_bits`` 4 / 2: per-output-channel steps (default; ``Dense``
            stays per tensor on TFLite Micro) or one step per kernel.
        overwrite: replace an existing ``path`` (and its JSON report); otherwise an existing
            file is refused before the conversion starts.

    Returns:
        An :class:`~tfqreg.deploy.report.ExportResult`.

    Raises:
        ConversionError: the converter failed (names the op where it can), or an int8 model
            still computes some op in float.
        ParityError: ``check`` is on and the TFLite model does not match Keras.
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    from tfqreg import keras3_bridge

    keras3_model = None
    if keras3_bridge.is_keras3_model(model):  # its tf_keras mirror, verified below
        keras3_model, model = model, keras3_bridge.to_keras2(model, verify=False)
    check_keras2(model, "model", keras.Model)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
    io_dtype = io_dtype or ("int8" if mode == "int8" else "float32")
    check_arguments(mode, io_dtype, batch_size, representative_data, min_agreement, atol, check,
                    allow_float_ops, calibration_samples, sample)
    check_lowbit_arguments(weight_bits, runtime, per_channel)
    check_path(path, overwrite)
    if weight_bits not in (None, 8):
        return _to_lowbit(model, mode, representative_data, io_dtype, batch_size, check,
                          sample, path, min_agreement, calibration_samples, weight_bits,
                          runtime, per_channel, keras3_model)
    specs = input_specs(model)
    rep_xs = None
    if representative_data is not None:
        rep_xs = to_samples(representative_data, specs, "representative_data",
                            calibration_samples)
    xs = sample_inputs(specs, sample, rep_xs) if check else None
    _verify_keras3(keras3_model, model, xs or rep_xs)
    static = static_model(model, batch_size)
    conv = tf.lite.TFLiteConverter.from_keras_model(static)
    if mode in ("dynamic", "int8"):
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        b = batch_size or 1
        n = len(rep_xs[0]) // b * b or len(rep_xs[0])

        names = [s.name for s in specs]

        def representative():  # by input name: the converter may reorder the inputs
            for start in range(0, n, b):
                batch = [a[start:start + b] for a in rep_xs]
                yield dict(zip(names, batch)) if len(batch) > 1 else batch

        conv.representative_dataset = representative
        conv.target_spec.supported_ops = (
            [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
            if allow_float_ops else [tf.lite.OpsSet.TFLITE_BUILTINS_INT8])
        conv.inference_input_type = getattr(tf, io_dtype)
        conv.inference_output_type = getattr(tf, io_dtype)
    try:
        flat = conv.convert()
    except Exception as e:  # the converter raises ConverterError and friends
        raise ConversionError(explain_converter_error(e, f"TFLite conversion ({mode})",
                                                      model)) from e
    notes = []
    if mode == "int8":
        bad = _float_ops(read_tflite(flat))
        if bad and not allow_float_ops:
            raise ConversionError(
                f"int8 conversion left {len(bad)} op(s) computing in float: {'; '.join(bad)}. "
                "TFLite has no int8 kernel for them, so the model is not full-integer (it would "
                "not run on TFLite Micro int8 builds or the Edge TPU). Replace those operations, "
                "or pass allow_float_ops=True to keep them in float."
            )
        notes += [f"kept in float: {b}" for b in bad]
    return finish_export(model, flat, "tflite", mode, io_dtype, batch_size, check, xs, "litert",
                         atol, min_agreement, path, notes,
                         reference="Keras" if keras3_model is None else "Keras 3",
                         parity_model=keras3_model)


def _verify_keras3(keras3_model: Any, mirror: Any, xs: Optional[List[np.ndarray]]) -> None:
    """A Keras 3 model is exported through its tf_keras mirror: check, on the inputs of the
    parity check (or the representative data, or random inputs), that the mirror computes what
    the Keras 3 model computes (:func:`tfqreg.keras3_bridge.verify_mirror`)."""
    if keras3_model is None:
        return
    from tfqreg import keras3_bridge

    keras3_bridge.verify_mirror(keras3_model, mirror, xs)


def lowbit_granularity(runtime: str, per_channel: bool = True):
    """The ``per_channel`` argument of :func:`tfqreg.ptq.quantize` for a sub-8-bit file:
    TFLite Micro's INT4 FULLY_CONNECTED takes one scale per tensor, so ``Dense`` is per tensor
    there (``"conv"``)."""
    if runtime == "micro":
        return "conv" if per_channel else False
    return per_channel


def simulated_reference(model: Any, weight_bits: int, runtime: str = "litert",
                        per_channel: bool = True, calibration: Optional[np.ndarray] = None):
    """The Keras model a sub-8-bit file must agree with: ``tfqreg.ptq.quantize`` at
    ``weight_bits`` with the file's granularity, and 8-bit activations calibrated on
    ``calibration`` (``None``: float activations)."""
    from tfqreg import ptq

    granularity = lowbit_granularity(runtime, per_channel)
    if calibration is None:
        return ptq.quantize(model, weight_bits, per_channel=granularity)
    return ptq.quantize(model, weight_bits, activation_bits=8, per_channel=granularity,
                        calibration_data=calibration)


def _to_lowbit(model, mode, representative_data, io_dtype, batch_size, check, sample, path,
               min_agreement, calibration_samples, weight_bits, runtime, per_channel,
               keras3_model=None):
    """``to_tflite`` with packed INT4 / INT2 weights (see the module docstring)."""
    from tfqreg import ptq
    from tfqreg.deploy import lowbit

    if mode == "float":
        raise ValueError("`weight_bits` 4 / 2 needs mode='int8' (int8 activations) or "
                         "mode='dynamic' (float activations, LiteRT only), not mode='float'.")
    if representative_data is None:
        raise ValueError("`representative_data` is required with `weight_bits` 4 / 2 (it "
                         "calibrates the activations and the simulated reference).")
    specs = input_specs(model)
    if len(specs) != 1:
        raise ValueError("`weight_bits` 4 / 2 supports single-input models (tfqreg.ptq "
                         f"simulates the reference); this model has {len(specs)} inputs.")
    rep_xs = to_samples(representative_data, specs, "representative_data", calibration_samples)
    xs = sample_inputs(specs, sample, rep_xs) if check else None
    _verify_keras3(keras3_model, model, xs or rep_xs)
    granularity = lowbit_granularity(runtime, per_channel)
    on_grid = ptq.quantize(model, weight_bits, per_channel=granularity)
    activations = "int8" if mode == "int8" else "float"
    reference = simulated_reference(model, weight_bits, runtime, per_channel,
                                    rep_xs[0] if activations == "int8" else None) \
        if check else model  # only the parity check needs the simulated model
    converter = tf.lite.TFLiteConverter.from_keras_model(static_model(on_grid, batch_size))
    try:
        flat = converter.convert()
    except Exception as e:
        raise ConversionError(explain_converter_error(e, "TFLite conversion (float, for "
                                                      f"{weight_bits}-bit weights)", model)) from e
    out = lowbit.quantize_tflite(flat, weight_bits, runtime, rep_xs, activations=activations,
                                 io_dtype=io_dtype, check=False)
    weights = lowbit.weight_report(out)
    steps = {True: "per channel", False: "per tensor", "conv": "per channel, Dense per tensor"}
    notes = [f"weights on tfqreg's {weight_bits}-bit grid ({steps[granularity]}, BatchNorm "
             f"folded); parity is measured against the simulated model tfqreg.ptq.quantize("
             f"model, {weight_bits}{', activation_bits=8' if activations == 'int8' else ''}), "
             "not the float model"]
    extra = {"weight_bits": weight_bits, "runtime": runtime, "activations": activations,
             "weight_bytes_by_type": weights.weight_bytes,
             "weight_bytes": weights.total_weight_bytes}
    backend = "micro" if runtime == "micro" else "litert"
    return finish_export(reference, out, "tflite", mode, io_dtype, batch_size, check, xs, backend,
                         1e-5, min_agreement, path, notes, extra,
                         reference=f"simulated W{weight_bits}"
                                   f"{'A8' if activations == 'int8' else ''} (tfqreg.ptq)",
                         keras_params=model.count_params())


# --------------------------------------------------------------------------------------------
# Larq Compute Engine.
# --------------------------------------------------------------------------------------------


def _binary_layers(model: Any) -> List[str]:
    """Names of larq Conv layers whose input AND kernel quantizers are 1-bit: the ones LCE can
    turn into ``LceBconv2d``."""
    try:
        import larq as lq
    except (ImportError, AttributeError):  # larq unusable (tf.keras is Keras 3): no larq layers
        return []
    names = []

    def walk(layer):
        for sub in getattr(layer, "layers", []) or []:
            walk(sub)
        if isinstance(layer, (lq.layers.QuantConv2D, lq.layers.QuantDepthwiseConv2D)) and not \
                isinstance(layer, lq.layers.QuantDepthwiseConv2D):
            iq, kq = layer.input_quantizer, layer.kernel_quantizer
            if iq is not None and kq is not None and getattr(iq, "precision", None) == 1 and \
                    getattr(kq, "precision", None) == 1:
                names.append(layer.name)

    walk(model)
    return names


def to_lce(
    model: Any,
    io_dtype: str = "float32",
    batch_size: Optional[int] = 1,
    check: bool = True,
    sample: Any = None,
    path: Optional[str] = None,
    min_agreement: float = 0.99,
    atol: float = 1e-5,
    overwrite: bool = False,
) -> ExportResult:
    """Convert a Larq BNN with Larq Compute Engine and check it in LCE's interpreter.

    LCE pattern-matches larq's sign (``larq.math.sign``) in front of a convolution with a
    binary kernel and emits ``LceQuantize`` + ``LceBconv2d`` (bit-packed weights). A sign
    written as ``tf.where(x >= 0, 1, -1)`` is matched too, but only with a static batch size
    (measured with LCE 0.16: with ``batch_size=None`` it stays ``GREATER_EQUAL`` + ``SELECT`` +
    float ``CONV_2D``); tfqreg's ``foothill_sign`` is written as larq's sign is, so it is
    matched at any batch size. The report lists the ops, how many binary conv layers became
    ``LceBconv2d`` (``extra["binary_conv_layers"]`` vs ``op_counts["LceBconv2d"]``) and names the
    binary layers LCE did not binarize (a quantizer whose forward pass LCE does not recognise
    runs as a float convolution: correct, but neither small nor fast).

    Args:
        model: a built ``tf_keras`` model with larq layers.
        io_dtype: ``"float32"`` (default) or ``"int8"`` (int8 inputs/outputs; needs
            fake-quantized boundaries in the model).
        batch_size, check, sample, path, overwrite: as in :func:`to_tflite`.
        min_agreement: minimum top-1 agreement with Keras.
        atol: only reported (binary networks amplify float rounding near sign thresholds).

    Returns:
        An :class:`~tfqreg.deploy.report.ExportResult` (target ``"lce"``).

    Raises:
        ConversionError: LCE could not convert the model.
        ParityError: ``check`` is on and top-1 agreement is below ``min_agreement``.
    """
    from tfqreg import keras3_bridge

    if keras3_bridge.is_keras3_model(model):
        raise TypeError("`model` is a Keras 3 model: Larq Compute Engine export takes larq "
                        "models, and larq is built on Keras 2 (tf_keras); build the BNN with "
                        "larq layers in tf_keras. Keras 3 models export with to_tflite.")
    check_keras2(model, "model", keras.Model)
    require_larq("tfqreg.deploy.to_lce")
    if io_dtype not in ("float32", "int8"):
        raise ValueError(f"`io_dtype` must be 'float32' or 'int8' for LCE, got {io_dtype!r}.")
    check_arguments(None, None, batch_size, None, min_agreement, atol)
    check_path(path, overwrite)
    import larq_compute_engine as lce

    specs = input_specs(model)
    xs = sample_inputs(specs, sample, None) if check else None
    static = static_model(model, batch_size)
    try:
        flat = lce.convert_keras_model(static, inference_input_type=getattr(tf, io_dtype),
                                       inference_output_type=getattr(tf, io_dtype))
    except Exception as e:
        raise ConversionError(explain_converter_error(e, "LCE conversion", model)) from e
    graph = read_tflite(flat)
    binary = _binary_layers(model)
    bconv_outputs = [graph.tensor(op.outputs[0]).name for op in graph.ops
                     if op.name == "LceBconv2d"]
    missing = [n for n in binary if not any(f"/{n}/" in f"/{o}" for o in bconv_outputs)]
    if len(bconv_outputs) >= len(binary):
        missing = []  # fused names can hide the layer; the count is what matters
    notes = []
    if missing:
        notes.append(
            f"binary layer(s) {missing} were NOT converted to LceBconv2d (they run as float "
            "CONV_2D): LCE always recognises larq's sign (larq.math.sign, as in 'ste_sign'); a "
            "sign written as tf.where(x >= 0, 1, -1) is matched only with a static batch size "
            "(keep batch_size=1) or not at all."
        )
    extra = {"binary_conv_layers": binary, "lce_bconv2d": len(bconv_outputs),
             "not_binarized": missing}
    return finish_export(model, flat, "lce", "lce", io_dtype, batch_size, check, xs, "lce", atol,
                         min_agreement, path, notes, extra)

