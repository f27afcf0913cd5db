"""Post-training quantization on demand, and accuracy-vs-bits sweeps (methods.md, "post-training
quantization on demand"): the model the device will compute, evaluated at any bit width.

:func:`quantize` takes a trained float model and a bit width and returns a NEW model (the input
model is untouched) that computes what the TFLite converter would make of it:

- BatchNorm folding first (:mod:`tfqreg.fold`): every BatchNormalization that follows a Dense /
  Conv / DepthwiseConv2D with a linear activation is folded into it, ``w' = w·γ/√(σ²+ε)`` per
  output channel, as the converter does; one that cannot fold stays a float BatchNorm whose
  output is quantized (TFLite runs it as a multiply-add), and the result says which and why.
- weights: the (folded) kernel of every ``Dense``, ``Conv1D/2D/3D``, transposed convolution and
  ``DepthwiseConv2D`` is replaced by its fake-quantized value on the tfqreg grid
  (:func:`tfqreg.grid.fake_quant`, symmetric, default step ``max|w'| / (2^(b-1) − 1)``, per output
  channel by default or per tensor). Biases stay in float (TFLite keeps them in int32). larq
  ``Quant*`` layers with a ``kernel_quantizer`` are left alone (larq quantizes them already).
  ``SeparableConv2D`` is refused: TFLite computes it as a depthwise and a 1×1 convolution with a
  quantized tensor between them, so rebuild it from those two layers.
- activations (when ``activation_bits`` is given) are fake-quantized where TFLite quantizes a
  tensor, with asymmetric ranges (TFLite's scheme, :func:`tfqreg.grid.fake_quant_activation`)
  calibrated as the min/max over ``calibration_data``, computed as the file's converter computes
  them: with the float kernels at 8-bit weights (the TF converter calibrates the float model,
  then quantizes), with the kernels on the grid below 8 bits (ai-edge-quantizer calibrates the
  float file whose kernels tfqreg put on the grid). The quantized points: the model input; the
  output of each fused op (a quantized layer + its folded BatchNorm + a following ReLU/ReLU6 are
  one op, quantized after the activation, never between the layer and its BatchNorm); the
  logits AND the output of a layer whose activation TFLite cannot fuse (softmax, sigmoid, tanh,
  ...); and the outputs of the other computing layers (``Add``, ``Concatenate``, pooling
  averages, an unfolded BatchNorm, a standalone activation). Shape-only layers (max pooling, reshape, flatten,
  dropout, padding) keep their input's grid, as in TFLite. Wrappers: :class:`ActivationFakeQuant`.

Keras 3 (TensorFlow backend): :func:`quantize` and :func:`sweep` take Keras 3 Sequential and
Functional models too. They run on the model's tf_keras mirror (:mod:`tfqreg.keras3_bridge`:
the same layers and weights, checked to compute the same outputs on the first batch of your
data), so the numbers are those of the same model built in tf_keras; :func:`quantize` returns
a tf_keras model.

:func:`sweep` evaluates the float model and each bit width and returns a :class:`SweepResult`:
plain data that prints as a table and saves as JSON / CSV / a plot, with the fold plan. It folds
and clones the model once and only re-assigns kernels and re-calibrates per width.

>>> import numpy as np, tfqreg
>>> from tfqreg import models, ptq
>>> model = models.tiny_cnn()
>>> q4 = ptq.quantize(model, weight_bits=4)                 # weights only
>>> x = np.random.rand(64, 28, 28, 1).astype("float32")
>>> q4a8 = ptq.quantize(model, 4, activation_bits=8, calibration_data=x)
>>> y = np.random.randint(0, 10, 64)
>>> result = ptq.sweep(model, (x, y), weight_bits=(8, 4), progress=False)
>>> [row.weight_bits for row in result.rows]
[None, 8, 4]

The stations, one module each: :mod:`~tfqreg.ptq.fakequant` (what the device quantizes: the
quantizable layers, :class:`ActivationFakeQuant`, where TFLite quantizes a tensor),
:mod:`~tfqreg.ptq.model` (the folded, fake-quantized clone and :func:`quantize`),
:mod:`~tfqreg.ptq.evaluate` (:func:`sweep`), :mod:`~tfqreg.ptq.report` (:class:`SweepResult`) and
:mod:`~tfqreg.ptq.cli`; argument and data checks live in ``_inputs``.

Command line: ``tfqreg sweep MODEL --data fashion_mnist --bits 8 6 4 [--per-tensor]
[--activation-bits N] [--json out.json] [--csv out.csv] [--plot out.png]``.
"""

from __future__ import annotations

from tfqreg.ptq.cli import add_arguments, run_cli
from tfqreg.ptq.evaluate import sweep
from tfqreg.ptq.fakequant import ActivationFakeQuant, quantizable_layers
from tfqreg.ptq.model import quantize
from tfqreg.ptq.report import SweepResult, SweepRow

__all__ = [
    "ActivationFakeQuant",
    "quantizable_layers",
    "quantize",
    "SweepRow",
    "SweepResult",
    "sweep",
    "add_arguments",
    "run_cli",
]
