"""Simulation vs the file: does ``tfqreg.ptq`` compute what LiteRT computes, image by image?

Two models are trained on Fashion-MNIST (Adam 1e-3, batch 128, ``--epochs`` on 60k images):
``small_cnn`` (no BatchNorm) and ``ds_cnn`` (BatchNorm + ReLU6 after every convolution). Each
is exported twice with 8-bit activations calibrated on the same 512 training images:

- ``W8A8``: the TF converter's full-integer int8 file (``tfqreg.deploy.to_tflite(mode="int8")``);
- ``W4A8``: the packed INT4 file (``to_tflite(..., weight_bits=4)``: weights put on tfqreg's
  4-bit grid, then ai-edge-quantizer writes INT4 and calibrates the activations).

Both files run in LiteRT on the 10,000 test images. Each is compared with a simulation whose
activation ranges are calibrated two ways:

- ``float kernels``: min/max of the float (BatchNorm-folded) model;
- ``grid kernels``: min/max of the model whose kernels are already on the grid.

tfqreg's rule (:func:`tfqreg.ptq.quantize`) follows the converter: float kernels at 8 bits (the TF
converter calibrates the float model, then quantizes it) and grid kernels below 8 bits
(ai-edge-quantizer calibrates a float file whose kernels are on the grid). The ``tfqreg`` column
marks that row, and the script checks that ``ptq.quantize`` computes it exactly.

Columns, per (model, weights, calibration), mean over seeds:

- ``acc sim`` and ``acc file``: test accuracy;
- ``|Δacc|``: their absolute difference, in points;
- ``top-1 agree``: the share of images where both predict the same class;
- ``identical``: the share of images whose output (both on the int8 softmax grid, 1/256) is
  the same in every class;
- ``mean max|Δp|``: the mean over images of the largest output difference.

    python benchmarks/device_match.py                  # 2 seeds, 2 epochs
    python benchmarks/device_match.py --quick          # 1 seed, 1 epoch on 2k images

Writes benchmarks/results/device_match[_quick].json.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import keras, mean_std, recalibrate_batchnorm, seed_all, verbose, write_json

from tfqreg import models, ptq
from tfqreg.deploy import to_tflite
from tfqreg.ptq.model import _PTQModel

MODELS = ("small_cnn", "ds_cnn")
CALIBRATION = 512
RULES = ("float kernels", "grid kernels")
METRICS = ("acc_sim", "acc_file", "abs_dacc_pt", "top1_agree", "identical", "mean_max_dp")


def _simulate(model: keras.Model, bits: int, rule: str, calib: np.ndarray, xt: np.ndarray):
    """The simulated W``bits``A8 outputs, the activation ranges calibrated with ``rule``'s
    kernels (per-channel weights, as both files)."""
    if rule == "grid kernels" and bits == 8:
        # the kernels already on the 8-bit grid while calibrating (re-quantizing them at 8 bits
        # changes nothing): what tfqreg did before it followed the TF converter
        q = ptq.quantize(ptq.quantize(model, 8), 8, activation_bits=8, calibration_data=calib)
        return q.predict(xt, batch_size=500, verbose=0)
    sim = _PTQModel(model, activations=True)
    sim.set_weight_bits(None if rule == "float kernels" else bits, True, False)
    sim.calibrate(calib, 8)
    sim.set_weight_bits(bits, True, False)  # the ranges stay
    return np.concatenate([sim.predict(xt[i:i + 500]).numpy() for i in range(0, len(xt), 500)])


def _compare(sim: np.ndarray, file: np.ndarray, yt: np.ndarray) -> Dict[str, float]:
    diff = np.abs(sim - file).max(-1)
    acc_sim = float(np.mean(sim.argmax(-1) == yt))
    acc_file = float(np.mean(file.argmax(-1) == yt))
    return {"acc_sim": acc_sim, "acc_file": acc_file,
            "abs_dacc_pt": 100 * abs(acc_sim - acc_file),
            "top1_agree": float(np.mean(sim.argmax(-1) == file.argmax(-1))),
            "identical": float(np.mean(diff == 0)), "mean_max_dp": float(diff.mean())}


def evaluate(model: keras.Model, calib: np.ndarray, xt: np.ndarray, yt: np.ndarray) -> dict:
    """``{"W8A8" | "W4A8": {rule: metrics}}`` for one trained model."""
    out = {}
    for bits, label in ((8, "W8A8"), (4, "W4A8")):
        lowbit = {} if bits == 8 else {"weight_bits": 4, "runtime": "litert"}
        res = to_tflite(model, mode="int8", representative_data=calib, check=False, **lowbit)
        file = res.predict(xt)
        tfqreg_out = ptq.quantize(model, bits, activation_bits=8, calibration_data=calib).predict(
            xt, batch_size=500, verbose=0)
        out[label] = {}
        for rule in RULES:
            sim = _simulate(model, bits, rule, calib, xt)
            out[label][rule] = _compare(sim, file, yt)
            out[label][rule]["is_tfqreg"] = bool(np.array_equal(sim, tfqreg_out))
    return out


def _table(agg: dict, seeds: int) -> str:
    lines = [f"Simulated vs LiteRT-run file, Fashion-MNIST test images, mean over {seeds} "
             "seed(s); the ranges calibrated with the float or the on-grid kernels",
             f"{'model':<11}{'file':<6}{'calibration':<15}{'tfqreg':>7}{'acc sim':>9}"
             f"{'acc file':>10}{'|Δacc| pt':>11}{'top-1 agree':>13}{'identical':>11}"
             f"{'mean max|Δp|':>14}"]
    for name, by_file in agg.items():
        for label, by_rule in by_file.items():
            for rule, m in by_rule.items():
                lines.append(
                    f"{name:<11}{label:<6}{rule:<15}{'yes' if m['is_tfqreg'] else '':>7}"
                    f"{100 * m['acc_sim']['mean']:>9.2f}{100 * m['acc_file']['mean']:>10.2f}"
                    f"{m['abs_dacc_pt']['mean']:>11.2f}{100 * m['top1_agree']['mean']:>12.2f}%"
                    f"{100 * m['identical']['mean']:>10.1f}%{m['mean_max_dp']['mean']:>14.4f}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch on 2k images")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 2)")
    p.add_argument("--epochs", type=int, default=None, help="default 2 (--quick: 1)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 2)
    epochs = args.epochs or (1 if args.quick else 2)
    (x, y), (xt, yt) = common.load("fashion_mnist", quick=args.quick)
    calib = x[:CALIBRATION]
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    runs: Dict[str, List[dict]] = {m: [] for m in args.models}
    for seed in range(seeds):
        for name in args.models:
            print(f"== seed {seed} / {name}  ({(time.perf_counter() - start) / 60:.1f} min)",
                  flush=True)
            seed_all(seed)
            model = getattr(models, name)()
            model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
            model.fit(x, y, epochs=epochs, batch_size=128, verbose=verbose())
            if args.quick:  # 16 steps do not settle the moving statistics (common.py)
                recalibrate_batchnorm(model, x)
            r = evaluate(model, calib, xt, yt)
            runs[name].append(r)
            for label, by_rule in r.items():
                print("   " + label + "  " + "  ".join(
                    f"{rule}: agree {100 * m['top1_agree']:.2f}% identical "
                    f"{100 * m['identical']:.1f}%" for rule, m in by_rule.items()), flush=True)
            keras.backend.clear_session()
    agg = {name: {label: {rule: {**{k: mean_std([r[label][rule][k] for r in rs])
                                    for k in METRICS},
                                 "is_tfqreg": all(r[label][rule]["is_tfqreg"] for r in rs)}
                          for rule in RULES} for label in rs[0]}
           for name, rs in runs.items()}
    text = _table(agg, seeds)
    print(text)
    write_json(f"device_match{'_quick' if args.quick else ''}.json", {
        "benchmark": "device_match", "quick": args.quick, "models": list(args.models),
        "seeds": seeds, "epochs": epochs, "batch_size": 128, "optimizer": "Adam(1e-3)",
        "calibration_examples": CALIBRATION, "train_examples": len(x),
        "test_examples": len(xt), "loadavg_1min": load_before, "aggregate": agg,
        "runs": runs, "wall_seconds": round(time.perf_counter() - start, 1), "table": text})


if __name__ == "__main__":
    main()
