"""Deployment: ship a Keras model to edge hardware, and know what you shipped.

The last station of tfqreg (build -> train -> quantize -> **ship**) is a package of modules
that import downward only, one concern each. In the order a model passes through them:

1. **read** (:mod:`~tfqreg.deploy.tflite_file`): :func:`read_tflite` decodes a ``.tflite``
   (bytes, a path, or anything carrying ``.flatbuffer``) through TensorFlow's schema into a
   :class:`TfliteGraph` of ops and tensors (dtype, shape signature, quantization). A damaged
   file is a ``ValueError``.
2. **run** (:mod:`~tfqreg.deploy.runtime`): :class:`Runner` runs a flatbuffer on NumPy batches
   in LiteRT, Larq Compute Engine or TFLite Micro, float in and float out.
3. **report** (:mod:`~tfqreg.deploy.report`): :class:`ExportResult` (bytes, path,
   :class:`ExportReport`) and :class:`ParityReport`: data first, ``to_text()`` / ``to_json()``.
4. **shared by every converter** (:mod:`~tfqreg.deploy.samples`): representative data ->
   float32 samples, input specs, the static-batch model, the parity check against Keras.
   Beside it, the **low-bit writer** (:mod:`~tfqreg.deploy.lowbit`), flatbuffer to
   flatbuffer: :func:`quantize_tflite` turns a float ``.tflite`` whose weights lie on tfqreg's
   grid into packed INT4 / INT2 tensors through ``ai-edge-quantizer``, integers and scales
   checked bit for bit, refusing what the target runtime cannot run (:data:`SUPPORTED_BITS`);
   :func:`weight_report` (a :class:`WeightReport`) reads any file's weight bytes by tensor
   type and unpacks its grids.
5. **convert** (:mod:`~tfqreg.deploy.convert`): :func:`to_tflite` (float, dynamic-range,
   full-integer int8; ``weight_bits=4`` / ``2`` for packed INT4 / INT2 weights on exactly the
   grid :func:`tfqreg.ptq.quantize` simulates, checked against that simulated model,
   :func:`simulated_reference`) and :func:`to_lce` (Larq BNNs), each checked in the
   interpreter that will run it; :func:`load_model` for saved models
   (:mod:`~tfqreg.deploy.loading`); :class:`ConversionError` names the op,
   :class:`ParityError` carries the report. The arguments every converter shares are checked
   once, before any work, by :mod:`~tfqreg.deploy.arguments` (existing output files are
   refused unless ``overwrite=True``). Several inputs are matched by name, since the converter
   may order them differently from Keras.
6. **check targets**: :func:`check_edgetpu` (:mod:`~tfqreg.deploy.edgetpu`: which op the Coral
   compiler would cut at, and why; INT4/INT2 tensors fail it) and :func:`to_micro`
   (:mod:`~tfqreg.deploy.micro`: an int8 model, or INT4 weights with ``weight_bits=4``,
   checked in TFLite Micro, its measured arena, C++ source).
7. **command line** (:mod:`~tfqreg.deploy.cli`): ``tfqreg export MODEL --target
   tflite|int8|edgetpu|micro|lce [--weight-bits 8|4|2] [--runtime litert|micro] --out DIR``.

Keras 3 models (TensorFlow backend, Sequential or Functional): :func:`to_tflite` and
:func:`to_micro` convert them through their tf_keras mirror (:mod:`tfqreg.keras3_bridge`,
verified on the check's inputs) and check the file against the Keras 3 model's own outputs
(4- / 2-bit files: against the simulated model); :func:`load_model` reads ``.keras`` files
saved by Keras 3. :func:`to_lce` refuses them (larq is Keras 2 only).

Which runtime runs which low-bit weights (``ai-edge-litert`` 2.3.0, TFLite Micro): LiteRT runs
INT4 in CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED and INT2 in FULLY_CONNECTED only
(``weight_bits=2`` stores a convolution's 2-bit grid in INT4); TFLite Micro runs INT4 in the
same three ops with int8 activations, FULLY_CONNECTED with one scale per tensor, and no INT2;
the Edge TPU runs int8 only.

>>> import numpy as np
>>> from tfqreg import models
>>> from tfqreg import deploy
>>> model = models.tiny_cnn()
>>> x = np.random.rand(64, 28, 28, 1).astype("float32")
>>> res = deploy.to_tflite(model, mode="int8", representative_data=x,
...                        path="m_int8.tflite")                  # doctest: +SKIP
>>> print(res.report)                                              # doctest: +SKIP
>>> deploy.read_tflite(res).op_names                               # doctest: +SKIP
>>> deploy.Runner(res, "micro").predict(x[:4])                     # doctest: +SKIP
>>> print(deploy.check_edgetpu(res))                               # doctest: +SKIP
>>> print(deploy.to_micro(model, x, "out/", name="tiny"))          # doctest: +SKIP
>>> r4 = deploy.to_tflite(model, mode="int8", representative_data=x,
...                       weight_bits=4, runtime="litert")         # doctest: +SKIP
>>> print(deploy.weight_report(r4))                  # int4 bytes  # doctest: +SKIP
>>> deploy.to_micro(model, x, "out/", name="tiny4", weight_bits=4)  # doctest: +SKIP

``tfqreg.export``, ``tfqreg.edgetpu`` and ``tfqreg.micro`` re-export these names under their
earlier module names.
"""

from tfqreg.deploy.tflite_file import (OpInfo, TensorInfo, TfliteGraph, as_flatbuffer,
                                       read_tflite)
from tfqreg.deploy.runtime import Runner
from tfqreg.deploy.report import ExportReport, ExportResult, ParityReport
from tfqreg.deploy.samples import CALIBRATION_SAMPLES, CHECK_SAMPLES
from tfqreg.deploy.lowbit import (SUPPORTED_BITS, WEIGHT_OPS, WeightPlan, WeightReport,
                                  WeightTensor, quantize_tflite, unpack_integers, weight_report)
from tfqreg.deploy.convert import (IO_DTYPES, MODES, ConversionError, ParityError, load_model,
                                   simulated_reference, to_lce, to_tflite)
from tfqreg.deploy.edgetpu import CHECKED_LIMITS, SUPPORTED_OPS, EdgeTpuReport, OpCheck, \
    check_edgetpu
from tfqreg.deploy.micro import (OP_RESOLVER_METHODS, MicroResult, c_source, measure_arena,
                                 micro_runs_with, resolver_methods, to_micro)
from tfqreg.deploy.cli import TARGETS

__all__ = [
    # read
    "TensorInfo", "OpInfo", "TfliteGraph", "as_flatbuffer", "read_tflite",
    # run
    "Runner",
    # report
    "ParityReport", "ExportReport", "ExportResult",
    # shared by every converter
    "CALIBRATION_SAMPLES", "CHECK_SAMPLES",
    # low-bit weights (INT4 / INT2)
    "SUPPORTED_BITS", "WEIGHT_OPS", "WeightPlan", "WeightTensor", "WeightReport",
    "quantize_tflite", "weight_report", "unpack_integers",
    # convert
    "MODES", "IO_DTYPES", "ConversionError", "ParityError", "to_tflite", "to_lce",
    "simulated_reference", "load_model",
    # check targets
    "SUPPORTED_OPS", "CHECKED_LIMITS", "OpCheck", "EdgeTpuReport", "check_edgetpu",
    "OP_RESOLVER_METHODS", "MicroResult", "measure_arena", "micro_runs_with",
    "resolver_methods", "c_source", "to_micro",
    # command line
    "TARGETS",
]
