"""BatchNorm folding: does tfqreg's PTQ measure what the device runs?

A user's depthwise-separable CNN with BatchNorm (`tfqreg.models.ds_cnn`: every convolution is
followed by BatchNorm and ReLU6) is trained on Fashion-MNIST (Adam 1e-3, batch 128) three ways:
plain, `kernel_regularizer=LInf(0.05, normalize="none")` and `SoftMinMax(0.05, normalize="none")`
(the raw strengths of the committed results, before `normalize="scale"` became the default). Each trained model is then
post-training quantized three ways and evaluated on the test set:

- ``tfqreg.ptq``: `tfqreg.ptq.sweep`, which folds every BatchNorm into its convolution first
  (as the TFLite converter does) and quantizes the folded kernel.
- ``independent fold``: written here with NumPy and nothing from tfqreg: a BN-free copy of the
  network is built layer by layer, each Conv/Depthwise + BatchNorm pair folded from the formulas
  (``s = γ/√(σ²+ε)``; ``w' = w·s`` per output channel, for a depthwise kernel per input channel ×
  multiplier; ``b' = (b − μ)·s + β``), its kernels quantized on the grid
  ``δ = max|w'| / (2^(b−1) − 1)`` (per tensor, or per output channel), round-half-even, clipped
  to ``[−2^(b−1), 2^(b−1) − 1]``. With 8-bit activations, TensorFlow's own
  ``fake_quant_with_min_max_args`` is applied where TFLite quantizes a tensor: the input, the
  output of each fused conv+BN+ReLU6, the pooled features, the logits and the softmax (fixed
  grid 1/256), with min/max ranges calibrated on 512 training images with the kernels on the
  grid (as tfqreg.ptq calibrates below 8 bits, like ai-edge-quantizer's low-bit files; at 8
  bits it calibrates the float model, as the TF converter's int8 path does, and
  ``device_match.py`` shows what that changes).
- ``old: raw kernels``: what tfqreg's PTQ did before the fold (before commit 1e17c2d): the raw
  kernels ``w`` quantized on the same NumPy grid, BatchNorm left in float after them; with
  8-bit activations, the input and each convolution's output (before its BatchNorm) and the
  softmax output quantized on ranges calibrated the same way.

Columns: FP32; per-tensor W4 and W3 with float activations and with 8-bit activations (W4A8,
W3A8); per-channel W4 and W3 (float activations), where folding does not matter (a per-channel
step scales with its channel), so all three should agree. The acceptance figure is the largest
|tfqreg.ptq − independent fold| over every row and quantized column (target ≤ 0.5 pt).

    python benchmarks/batchnorm_fold.py            # full: seed 0, 4 epochs, 60k/10k images
    python benchmarks/batchnorm_fold.py --seeds 3  # seeds 0, 1, 2
    python benchmarks/batchnorm_fold.py --quick    # smoke: 1 epoch on 2k images, 1k test

``--quick`` resets the BatchNorm moving statistics to those of 1,024 training images after its
16 training steps (`common.recalibrate_batchnorm`: they have not settled, and the inference-mode
model would predict one class); full runs use the trained statistics as they are.

Writes benchmarks/results/batchnorm_fold[_quick].json.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import keras, mean_std, recalibrate_batchnorm, seed_all, tf, verbose, write_json

from tfqreg import models, ptq, regularizers

ROWS = ("plain", "linf", "soft_min_max")
SIMULATIONS = ("tfqreg.ptq", "independent fold", "old: raw kernels")
#: (label, weight bits, activation bits, per-channel)
CONFIGS = (("pt W4", 4, None, False), ("pt W3", 3, None, False), ("pt W4A8", 4, 8, False),
           ("pt W3A8", 3, 8, False), ("pc W4", 4, None, True), ("pc W3", 3, None, True))
COLUMNS = ["fp32"] + [c[0] for c in CONFIGS]
TARGET_PT = 0.5  # acceptance: |tfqreg.ptq − independent fold| ≤ 0.5 pt everywhere
CALIBRATION = 512


def build(row: str) -> keras.Model:
    return {"plain": lambda: models.ds_cnn(),
            "linf": lambda: models.ds_cnn(kernel_regularizer=regularizers.LInf(0.05, normalize="none")),
            "soft_min_max": lambda: models.ds_cnn(
                kernel_regularizer=regularizers.SoftMinMax(0.05, normalize="none"))}[row]()


# ----------------------------------------------------------------------------- NumPy grid
def quantize_kernel(w: np.ndarray, bits: int, channel_axes: Optional[Tuple[int, ...]]):
    """``w`` on the symmetric b-bit grid: ``δ = max|w| / (2^(b−1) − 1)`` over the whole tensor
    (``channel_axes=None``) or per channel (the max is taken over every axis not in
    ``channel_axes``), ``round-half-even(w/δ)`` clipped to ``[−2^(b−1), 2^(b−1) − 1]``, times δ."""
    w = np.asarray(w, dtype=np.float64)
    qmax = 2 ** (bits - 1) - 1
    if channel_axes is None:
        reduce = tuple(range(w.ndim))
    else:
        reduce = tuple(a for a in range(w.ndim) if a not in channel_axes)
    delta = np.max(np.abs(w), axis=reduce, keepdims=True) / qmax
    delta = np.where(delta > 0, delta, 1.0)
    return (np.clip(np.round(w / delta), -qmax - 1, qmax) * delta).astype(np.float32)


def _channel_axes(layer) -> Tuple[int, ...]:
    """The axes of one output channel: a depthwise kernel ``(kh, kw, in, mult)`` has one per
    input channel × multiplier, a Conv/Dense kernel one per last axis."""
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return (2, 3)
    return (len(_kernel(layer).shape) - 1,)


def _kernel(layer) -> np.ndarray:
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return layer.depthwise_kernel.numpy()
    return layer.kernel.numpy()


def fold_numpy(layer, bn) -> Tuple[np.ndarray, np.ndarray]:
    """``(w', b')`` of ``layer`` followed by BatchNorm ``bn``, from the formulas, in NumPy."""
    w = _kernel(layer).astype(np.float64)
    channels = int(bn.moving_mean.shape[0])
    gamma = bn.gamma.numpy() if bn.gamma is not None else np.ones(channels)
    beta = bn.beta.numpy() if bn.beta is not None else np.zeros(channels)
    mean = bn.moving_mean.numpy().astype(np.float64)
    var = bn.moving_variance.numpy().astype(np.float64)
    s = gamma.astype(np.float64) / np.sqrt(var + bn.epsilon)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        mult = int(layer.depth_multiplier)
        w_f = w * s.reshape(channels // mult, mult)  # output channel i·mult + m
    else:
        w_f = w * s
    b = layer.bias.numpy().astype(np.float64) if layer.use_bias else np.zeros(channels)
    b_f = (b - mean) * s + beta
    return w_f.astype(np.float32), b_f.astype(np.float32)


# ----------------------------------------------------------------------------- simulation
class Simulation:
    """The trained chain network rebuilt layer by layer: ``folded=True`` is the BN-free copy
    (every Conv/Depthwise + BatchNorm pair folded in NumPy, fake-quant points where TFLite puts
    them), ``folded=False`` the old behaviour (raw kernels, float BatchNorm, quantized conv
    outputs). Only Sequential-like chains of the layer types of ``ds_cnn`` are supported."""

    def __init__(self, model: keras.Model, folded: bool):
        self.model, self.folded = model, folded
        self.chain = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        for a, b in zip(self.chain, self.chain[1:]):
            nodes = b._inbound_nodes
            assert len(nodes) == 1 and nodes[0].inbound_layers is a, \
                f"{b.name} does not take {a.name}'s output: not a chain"
        self.float_kernels: Dict[str, np.ndarray] = {}
        self.biases: Dict[str, np.ndarray] = {}
        self.layers = []  # the kernel layers, with their output-channel axes
        for i, layer in enumerate(self.chain):
            if not isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                                      keras.layers.Dense)):
                continue
            nxt = self.chain[i + 1] if i + 1 < len(self.chain) else None
            if folded and isinstance(nxt, keras.layers.BatchNormalization):
                w, b = fold_numpy(layer, nxt)
            else:
                w = _kernel(layer)
                b = layer.bias.numpy() if layer.use_bias else None
            self.float_kernels[layer.name], self.biases[layer.name] = w, b
            self.layers.append(layer)
        self.ranges: Optional[List[Tuple[float, float]]] = None

    def _fake_quant(self, h, taps, bits, fixed=None):
        """An activation quantization point: recorded (calibration), or TF's fake-quant op on
        the calibrated (or fixed) range."""
        index = len(taps)
        taps.append(h)
        if bits is None:
            return h
        lo, hi = fixed if fixed is not None else self.ranges[index]
        return keras.layers.Lambda(lambda t: tf.quantization.fake_quant_with_min_max_args(
            t, min=lo, max=hi, num_bits=bits))(h)

    def build(self, kernels: Dict[str, np.ndarray], act_bits: Optional[int]):
        """``(model, taps model)``: the network with ``kernels``; with ``act_bits`` its
        activations fake-quantized on ``self.ranges``."""
        taps: list = []
        inp = keras.Input(self.model.input_shape[1:])
        h = self._fake_quant(inp, taps, act_bits)
        skip = False
        for i, layer in enumerate(self.chain):
            if skip:
                skip = False
                continue
            nxt = self.chain[i + 1] if i + 1 < len(self.chain) else None
            cfg = layer.get_config()
            if isinstance(layer, keras.layers.DepthwiseConv2D):
                new = keras.layers.DepthwiseConv2D(
                    cfg["kernel_size"], strides=cfg["strides"], padding=cfg["padding"],
                    depth_multiplier=cfg["depth_multiplier"],
                    use_bias=self.biases[layer.name] is not None)
            elif isinstance(layer, keras.layers.Conv2D):
                new = keras.layers.Conv2D(cfg["filters"], cfg["kernel_size"],
                                          strides=cfg["strides"], padding=cfg["padding"],
                                          use_bias=self.biases[layer.name] is not None)
            elif isinstance(layer, keras.layers.Dense):
                new = keras.layers.Dense(cfg["units"])  # logits; softmax below
            elif isinstance(layer, keras.layers.BatchNormalization):
                new = keras.layers.BatchNormalization(epsilon=layer.epsilon)  # old: float BN
            elif isinstance(layer, keras.layers.ReLU):
                new = keras.layers.ReLU(max_value=layer.max_value)
            elif isinstance(layer, keras.layers.GlobalAveragePooling2D):
                new = keras.layers.GlobalAveragePooling2D()
            else:
                raise TypeError(f"layer type {type(layer).__name__} not simulated")
            h = new(h)
            if isinstance(new, keras.layers.BatchNormalization):
                new.set_weights(layer.get_weights())
            elif layer.name in kernels:
                bias = self.biases[layer.name]
                new.set_weights([kernels[layer.name]] + ([] if bias is None else [bias]))
            if self.folded:
                if layer.name in kernels and isinstance(nxt, keras.layers.BatchNormalization):
                    skip = True  # the BatchNorm is folded into `new`
                if isinstance(new, (keras.layers.ReLU, keras.layers.GlobalAveragePooling2D)):
                    h = self._fake_quant(h, taps, act_bits)  # fused conv+BN+ReLU6 / pool out
                if isinstance(new, keras.layers.Dense):
                    h = self._fake_quant(h, taps, act_bits)  # logits
                    h = keras.layers.Softmax()(h)
                    h = self._fake_quant(h, taps, act_bits,
                                         fixed=(0.0, 1.0 - 2.0 ** -act_bits) if act_bits
                                         else None)
            else:
                if isinstance(new, keras.layers.Dense):
                    h = keras.layers.Softmax()(h)
                if layer.name in kernels:
                    h = self._fake_quant(h, taps, act_bits)  # conv output before its BN
        return keras.Model(inp, h), keras.Model(inp, taps)

    def calibrate(self, x: np.ndarray, kernels: Optional[Dict[str, np.ndarray]] = None):
        """min/max (zero included) of every quantization point over ``x``, computed with
        ``kernels`` (default: the float ones) and float activations."""
        _, taps = self.build(self.float_kernels if kernels is None else kernels, None)
        lo = hi = None
        for start in range(0, len(x), 256):
            outs = taps(x[start:start + 256], training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            mins = np.array([float(tf.reduce_min(o)) for o in outs])
            maxs = np.array([float(tf.reduce_max(o)) for o in outs])
            lo = mins if lo is None else np.minimum(lo, mins)
            hi = maxs if hi is None else np.maximum(hi, maxs)
        self.ranges = [(min(0.0, a), max(0.0, b)) for a, b in zip(lo, hi)]

    def accuracy(self, xt, yt, bits=None, act_bits=None, per_channel=False,
                 calibration=None) -> float:
        """Test accuracy with ``bits``-bit kernels and ``act_bits``-bit activations, whose
        ranges are calibrated on ``calibration`` with the kernels on the grid."""
        kernels = dict(self.float_kernels)
        if bits is not None:
            for layer in self.layers:
                axes = _channel_axes(layer) if per_channel else None
                kernels[layer.name] = quantize_kernel(kernels[layer.name], bits, axes)
        if act_bits is not None:
            self.calibrate(calibration, kernels)
        model, _ = self.build(kernels, act_bits)
        return _accuracy(model, xt, yt)


class _NoRetracingWarning(logging.Filter):
    """One tf.function per simulated model is traced on purpose; TF's retracing warning is
    noise here."""

    def filter(self, record):
        return "triggered tf.function retracing" not in record.getMessage()


tf.get_logger().addFilter(_NoRetracingWarning())


def _accuracy(model, xt, yt) -> float:
    predict = tf.function(lambda t: model(t, training=False))
    correct = 0
    for start in range(0, len(xt), 500):
        out = predict(tf.constant(xt[start:start + 500])).numpy()
        correct += int((out.argmax(-1) == yt[start:start + 500]).sum())
    return correct / len(xt)


# ----------------------------------------------------------------------------- one model
def evaluate(model: keras.Model, xt, yt, calib) -> Dict[str, Dict[str, float]]:
    """``{simulation: {column: accuracy}}`` for one trained model."""
    out: Dict[str, Dict[str, float]] = {s: {} for s in SIMULATIONS}
    fp32 = _accuracy(model, xt, yt)
    for sim in SIMULATIONS:
        out[sim]["fp32"] = fp32
    # tfqreg.ptq: one sweep per (granularity, activation width)
    for per_channel in (False, True):
        for act in (None, 8):
            labels = [c for c in CONFIGS if c[3] == per_channel and c[2] == act]
            if not labels:
                continue
            s = ptq.sweep(model, (xt, yt), weight_bits=tuple(c[1] for c in labels),
                          activation_bits=act, per_channel=per_channel,
                          calibration_data=calib if act else None, progress=False)
            for label, bits, a, _ in labels:
                out["tfqreg.ptq"][label] = s.accuracy(bits, a)
    for sim, folded in (("independent fold", True), ("old: raw kernels", False)):
        simulation = Simulation(model, folded)
        if folded:  # the BN-free copy computes the trained network
            out[sim]["fp32_bn_free"] = simulation.accuracy(xt, yt)
        for label, bits, act, per_channel in CONFIGS:
            out[sim][label] = simulation.accuracy(xt, yt, bits, act, per_channel, calib)
    return out


def _table(agg: Dict[str, Dict[str, Dict[str, dict]]], seeds: int) -> str:
    lines = [f"ds_cnn (BatchNorm after every convolution), Fashion-MNIST test accuracy %"
             + (f", mean ± std over {seeds} seeds" if seeds > 1 else "")
             + "; pt = per-tensor, pc = per-channel weights; A8 = 8-bit activations",
             f"{'row':<14}{'simulation':<20}" + "".join(f"{c:>12}" for c in COLUMNS)]
    for row, by in agg.items():
        for sim in SIMULATIONS:
            cells = []
            for c in COLUMNS:
                m = by[sim][c]
                cells.append(f"{100 * m['mean']:.2f}" + (f"±{100 * m['std']:.2f}"
                                                          if seeds > 1 else ""))
            lines.append(f"{row:<14}{sim:<20}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def _differences(per_seed: Dict[str, List[dict]], a: str, b: str, columns: Sequence[str]):
    """max |a − b| in points over rows, seeds and columns, and where."""
    worst, where = 0.0, None
    for row, results in per_seed.items():
        for seed, r in enumerate(results):
            for c in columns:
                d = abs(100 * (r[a][c] - r[b][c]))
                if where is None or d > worst:
                    worst, where = d, f"{row} seed {seed} {c}"
    return round(worst, 4), where


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 epoch on 2k images, 1k test images")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1: seed 0)")
    p.add_argument("--epochs", type=int, default=None, help="default 4 (--quick: 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    args = p.parse_args(argv)
    epochs = args.epochs or (1 if args.quick else 4)
    (x, y), (xt, yt) = common.load("fashion_mnist", quick=args.quick)
    calib = x[:CALIBRATION]
    params = int(models.ds_cnn().count_params())
    keras.backend.clear_session()

    start = time.perf_counter()
    per_seed: Dict[str, List[dict]] = {r: [] for r in args.rows}
    seconds: Dict[str, List[float]] = {r: [] for r in args.rows}
    for seed in range(args.seeds):
        for row in args.rows:
            print(f"== seed {seed} / {row}  ({(time.perf_counter() - start) / 60:.1f} min)",
                  flush=True)
            seed_all(seed)
            model = build(row)
            model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                          ["accuracy"])
            t0 = time.perf_counter()
            model.fit(x, y, epochs=epochs, batch_size=args.batch_size, verbose=verbose())
            seconds[row].append(time.perf_counter() - t0)
            if args.quick:  # 16 steps do not settle the moving statistics (common.py)
                recalibrate_batchnorm(model, x)
            r = evaluate(model, xt, yt, calib)
            per_seed[row].append(r)
            print("   " + "  ".join(f"{c} {100 * r['tfqreg.ptq'][c]:.2f}/"
                                    f"{100 * r['independent fold'][c]:.2f}/"
                                    f"{100 * r['old: raw kernels'][c]:.2f}"
                                    for c in COLUMNS[1:]) + "  (ptq/independent/old)",
                  flush=True)
            keras.backend.clear_session()

    agg = {row: {sim: {c: mean_std([r[sim][c] for r in results]) for c in COLUMNS}
                 for sim in SIMULATIONS} for row, results in per_seed.items()}
    quantized = COLUMNS[1:]
    agree, agree_where = _differences(per_seed, "tfqreg.ptq", "independent fold", quantized)
    old_gap, old_where = _differences(per_seed, "tfqreg.ptq", "old: raw kernels",
                                      [c for c in quantized if c.startswith("pt")])
    pc_old, pc_old_where = _differences(per_seed, "independent fold", "old: raw kernels",
                                        [c for c in quantized if c.startswith("pc")])
    fold_fp32 = max(abs(100 * (r["independent fold"]["fp32_bn_free"] - r["tfqreg.ptq"]["fp32"]))
                    for results in per_seed.values() for r in results)
    text = "\n".join([
        _table(agg, args.seeds), "",
        f"max |tfqreg.ptq - independent fold| = {agree:.2f} pt over {len(args.rows)} rows x "
        f"{len(quantized)} quantized columns x {args.seeds} seed(s) ({agree_where}); target "
        f"<= {TARGET_PT} pt: {'met' if agree <= TARGET_PT else 'NOT met'}",
        f"max |tfqreg.ptq - old raw-kernel PTQ| per-tensor = {old_gap:.2f} pt ({old_where}): "
        "what folding changes",
        f"max |independent fold - old| per-channel = {pc_old:.2f} pt ({pc_old_where}): "
        "a per-channel step commutes with the fold",
        f"BN-free copy vs the trained model in float: max |Δ accuracy| = {fold_fp32:.2f} pt"])
    wall = time.perf_counter() - start
    path = write_json(f"batchnorm_fold{'_quick' if args.quick else ''}.json", {
        "benchmark": "batchnorm_fold", "quick": args.quick, "model": "ds_cnn",
        "parameters": params, "rows": list(args.rows), "simulations": list(SIMULATIONS),
        "columns": COLUMNS, "seeds": args.seeds, "epochs": epochs,
        "batch_size": args.batch_size, "optimizer": "Adam(1e-3)",
        "batchnorm_recalibrated": bool(args.quick),
        "regularizer_strength": 0.05, "calibration_examples": CALIBRATION,
        "train_examples": len(x), "test_examples": len(xt),
        "max_abs_diff_ptq_vs_independent_pt": agree, "max_abs_diff_where": agree_where,
        "target_pt": TARGET_PT, "target_met": bool(agree <= TARGET_PT),
        "max_abs_diff_ptq_vs_old_per_tensor_pt": old_gap,
        "max_abs_diff_independent_vs_old_per_channel_pt": pc_old,
        "max_abs_diff_bn_free_fp32_pt": round(fold_fp32, 4),
        "aggregate": agg, "per_seed": per_seed,
        "train_seconds": {r: mean_std(s) for r, s in seconds.items() if s},
        "wall_seconds": round(wall, 1), "table": text})
    print(text)
    print(f"wrote {path}")
    return agree


if __name__ == "__main__":
    main()
