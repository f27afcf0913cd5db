"""Benchmark 1: bit-width robustness of one float model, post-training quantized on demand.

Rows: plain training, the tfqreg regularizers (Foothill, L∞, margin, soft-min-max), learnable
MSQE, gradient-ℓ1, TFMOT's 8-bit QAT and a TFMOT-style 4-bit QAT (tfqreg's n-bit configs, W4A4).
Every row trains the chosen model (``--model``: `tfqreg.models.small_cnn`, or `models.ds_cnn`, the
depthwise-separable CNN with BatchNorm + ReLU6 after every convolution) with the same optimizer
(Adam 1e-3), batch size and epochs, for each seed; the trained float weights are then quantized
by `tfqreg.ptq.sweep` (which folds every BatchNorm into its convolution first, as the TFLite
converter does): columns FP32, W8…W2 with activations at 8 bits, and W4A4 — per-channel and
per-tensor weights. Every row is evaluated by copying its float weights (kernels, biases,
BatchNorm γ/β/moving statistics; for QAT rows the latent float weights) by name into a freshly
built plain model, so every row goes through the same PTQ.

    python benchmarks/robustness.py                 # 3 seeds × 9 rows × 3 epochs (53 min, 2 cores)
    python benchmarks/robustness.py --model ds_cnn  # 3 seeds × 9 rows × 5 epochs (~65 min est.)
    python benchmarks/robustness.py --quick         # smoke: 1 seed, 2k images, 1 epoch (~3 min)

Writes benchmarks/results/robustness[_<tag>][_quick].json and .png (accuracy vs bits, weight
histograms) for small_cnn, robustness_ds_cnn[_<tag>][_quick].json/.png for ds_cnn.

``--quick`` runs of ds_cnn reset the evaluated model's BatchNorm moving statistics to those of
1,024 training images under the final weights (`common.recalibrate_batchnorm`): 16 training
steps do not settle them. Full runs evaluate the trained statistics as they are.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import keras, mean_std, recalibrate_batchnorm, seed_all, verbose, write_json

from tfqreg import fold, models, ptq, quantization, regularizers, training

WEIGHT_BITS = (8, 6, 5, 4, 3, 2)
CURVE = ["fp32"] + [f"W{b}A8" for b in WEIGHT_BITS]  # the accuracy-vs-bits plot
#: ``W4A8 file``: the real 4-bit artifact (packed INT4 weights, int8 activations,
#: ``tfqreg.deploy.to_tflite(weight_bits=4)``) run in LiteRT on the same test set, beside the
#: simulated ``W4A8`` column
COLUMNS = CURVE + ["W4A4", "W4A8 file"]

#: per-model settings: the builder, the default epochs of a full run (``--quick``: 1) and the
#: layer whose kernel the histogram plot shows (for ds_cnn the largest pointwise conv, BN-folded:
#: the kernel the device quantizes). ds_cnn's 5 epochs (2,345 steps at batch 128): BatchNorm's
#: moving statistics lag the weights, so the inference-mode accuracy trails the training one
#: early on. Plain ds_cnn, seed 0, test accuracy after epoch 1..8: 51.1, 87.5, 88.2, 88.9, 88.8,
#: 88.9, 89.0, 87.4 % (training accuracy 81.7 → 94.1 %): it settles at epoch 4; 5 gives one
#: epoch of margin and keeps the 3-seed run at ~65 min on 2 quiet cores (estimated from
#: per-step times; gradient-ℓ1, ~70 s an epoch against ~16 s for plain, is over a quarter).
MODELS = {
    "small_cnn": {"build": models.small_cnn, "epochs": 3, "hist_layer": "fc1"},
    "ds_cnn": {"build": models.ds_cnn, "epochs": 5, "hist_layer": "pw4"},
}


def _weight_key(variable):
    """``(layer, weight)`` from a variable name such as ``quant_pw1/pw1/kernel:0`` or
    ``bn_pw1/moving_mean:0``: the last two parts of the name."""
    parts = variable.name.split(":")[0].split("/")
    return tuple(parts[-2:]) if len(parts) >= 2 else None


def _plain_copy(trained: keras.Model, model: str = "small_cnn") -> keras.Model:
    """A freshly built plain ``model`` holding the float weights of ``trained`` (a plain model, a
    ``TrainingModel``, or a TFMOT-wrapped QAT model).

    Every weight of the plain architecture (kernels, depthwise kernels, biases, BatchNorm
    gamma / beta / moving_mean / moving_variance) is copied by its ``<layer>/<weight>`` name.
    TFMOT's ``QuantizeWrapperV2`` keeps those names for the float (latent) weights it owns, and
    in its Conv/Depthwise + BatchNorm + ReLU pattern the BatchNorm is wrapped too (with a no-op
    config), still owning ``bn_*/gamma`` etc.; tfqreg's n-bit ``quantize_model`` leaves it
    unwrapped. Weights the plain model does not have (quantizer ranges and step counters, the
    learnable regularizers' ``kernel_margin`` / ``kernel_hardness`` / ``kernel_step``, training
    terms' coefficients) are not copied.

    Raises:
        KeyError: a weight of the plain model is missing from ``trained`` (or found twice with
            different shapes), naming it.
    """
    plain = MODELS[model]["build"]()
    found = {}
    for w in trained.weights:
        key = _weight_key(w)
        if key is None:
            continue
        if key in found and tuple(found[key].shape) != tuple(w.shape):
            raise KeyError(f"two weights named {'/'.join(key)} with shapes "
                           f"{tuple(found[key].shape)} and {tuple(w.shape)} in {trained.name}")
        found.setdefault(key, w)
    for layer in plain.layers:
        if not layer.weights:
            continue
        values = []
        for w in layer.weights:
            key = _weight_key(w)
            if key not in found:
                raise KeyError(f"{'/'.join(key)} (a weight of the plain {model}) is not in "
                               f"{trained.name}; it has {sorted('/'.join(k) for k in found)}")
            values.append(found[key].numpy())
        layer.set_weights(values)
    return plain


def _fit(model, x, y, epochs, batch):
    """Train; returns the ``History``."""
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    return model.fit(x, y, epochs=epochs, batch_size=batch, verbose=verbose())


def method_builders(model: str = "small_cnn") -> Dict[str, Callable[[], keras.Model]]:
    """name -> function that returns the ``model`` to train (its float weights are evaluated).
    The regularizers go to every kernel (ds_cnn: depthwise kernels too); with a BatchNorm after
    a convolution they penalise the folded kernel (their default ``fold_batchnorm=True``)."""
    build = MODELS[model]["build"]
    return {
        "plain": lambda: build(),
        "foothill": lambda: build(regularizers.Foothill()),
        # the raw strengths the committed tables were measured with (the defaults before
        # normalize="scale"; benchmarks/defaults_transfer.py measures the new defaults)
        "linf": lambda: build(regularizers.LInf(0.05, normalize="none")),
        "margin": lambda: build(regularizers.Margin(0.05, normalize="none")),
        "soft_min_max": lambda: build(regularizers.SoftMinMax(0.05, normalize="none")),
        "msqe_learnable_w4": lambda: training.TrainingModel(
            build(), [training.LearnableMSQE(bits=4, narrow_range=True)]),
        "gradient_l1": lambda: training.TrainingModel(
            build(), [training.GradientL1(lambda_w=1e-4, lambda_a=1e-4, reduction="sum")]),
        "tfmot_qat_w8a8": lambda: __import__(
            "tensorflow_model_optimization").quantization.keras.quantize_model(build()),
        "qat_w4a4": lambda: quantization.quantize_model(build(), weight_bits=4,
                                                        activation_bits=4),
    }


def extra_builders(model: str = "small_cnn") -> Dict[str, Callable[[], keras.Model]]:
    """Rows outside the standard table (``--methods`` only): stronger gradient-ℓ1 settings,
    switched on after the first epoch (from scratch, λ ≥ 1e-2 collapses training); and
    gradient-ℓ1 with ``reduction="step"`` (λ dimensionless) in its three forms: ``_fd``
    (finite difference), ``_exact`` (double backprop), ``_lazy4`` (finite difference every 4th
    step, scaled by 4)."""
    build = MODELS[model]["build"]

    def gl1(lam, start_epoch):
        return lambda: training.TrainingModel(
            build(), [training.GradientL1(lambda_w=lam, lambda_a=lam, start_epoch=start_epoch,
                                          reduction="sum")])
    def step(lam, method="finite_difference", every=1):
        # λ on the dimensionless scale: the first-order bound on the loss increase at 4 bits
        return lambda: training.TrainingModel(build(), [training.GradientL1(
            lambda_w=lam, lambda_a=lam, reduction="step", bits=4, method=method, every=every)])

    rows = {"gradient_l1_1e-3_late": gl1(1e-3, 1), "gradient_l1_1e-2_late": gl1(1e-2, 1),
            "gradient_l1_3e-2_late": gl1(3e-2, 1)}
    for lam in ("1e-3", "3e-3", "1e-2"):
        rows[f"gl1_step_{lam}_fd"] = step(float(lam))
        rows[f"gl1_step_{lam}_exact"] = step(float(lam), "exact")
        rows[f"gl1_step_{lam}_lazy4"] = step(float(lam), every=4)
    return rows


def evaluate(model: keras.Model, xt, yt, calib) -> Dict[str, Dict[str, float]]:
    out = {}
    for gran, per_channel in (("per_channel", True), ("per_tensor", False)):
        s = ptq.sweep(model, (xt, yt), weight_bits=WEIGHT_BITS, activation_bits=8,
                      per_channel=per_channel, calibration_data=calib, extra=[(4, 4)],
                      progress=False)
        row = {"fp32": s.float_accuracy}
        row.update({f"W{b}A8": s.accuracy(b, 8) for b in WEIGHT_BITS})
        row["W4A4"] = s.accuracy(4, 4)
        row["W4A8 file"] = _artifact_accuracy(model, xt, yt, calib, per_channel)
        out[gran] = row
    return out


def _artifact_accuracy(model, xt, yt, calib, per_channel: bool) -> float:
    """Test accuracy of the INT4 ``.tflite`` in LiteRT (XNNPACK, what apps get), calibrated on
    the same images as the simulation."""
    from tfqreg import deploy

    res = deploy.to_tflite(model, mode="int8", representative_data=calib, weight_bits=4,
                           per_channel=per_channel, check=False, calibration_samples=len(calib))
    return float(np.mean(deploy.Runner(res.flatbuffer, "litert").predict(xt).argmax(-1) == yt))


def _table(agg: Dict[str, Dict[str, Dict[str, dict]]], gran: str) -> str:
    lines = [f"{gran.replace('_', '-')} weights: test accuracy %, mean ± std over seeds",
             f"{'method':<20}" + "".join(f"{c:>13}" for c in COLUMNS)]
    for name, by in agg.items():
        cells = []
        for c in COLUMNS:
            m = by[gran][c]
            cells.append(f"{100 * m['mean']:6.2f}±{100 * m['std']:<5.2f}")
        lines.append(f"{name:<20}" + "".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def _histogram_kernel(plain: keras.Model, model: str) -> np.ndarray:
    """The histogram layer's kernel as the device quantizes it: BN-folded when a BatchNorm
    folds into the layer (ds_cnn), the raw kernel otherwise (small_cnn's fc1)."""
    return fold.folded_kernel(plain.get_layer(MODELS[model]["hist_layer"])).numpy().ravel()


def _hist_label(plain: keras.Model, model: str) -> str:
    layer = plain.get_layer(MODELS[model]["hist_layer"])
    if fold.following_batchnorm(layer) is None:
        return f"{layer.name} kernel"
    return f"{layer.name} kernel·γ/√(σ²+ε) (BN-folded)"


def _plot(agg, hists, path, model="small_cnn", hist_label="fc1 kernel"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    xs = ["fp32"] + [str(b) for b in WEIGHT_BITS]
    for ax, gran in zip(axes, ("per_channel", "per_tensor")):
        for name, by in agg.items():
            m = np.array([100 * by[gran][c]["mean"] for c in CURVE])
            s = np.array([100 * by[gran][c]["std"] for c in CURVE])
            line, = ax.plot(xs, m, "o-", label=name, ms=3)
            ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.15)
            # W4A4 as a hollow marker at the 4-bit position (activations quantized too)
            ax.plot([xs.index("4")], [100 * by[gran]["W4A4"]["mean"]], "o", mfc="none",
                    color=line.get_color(), ms=7)
        ax.set_title(f"{model}: PTQ, {gran.replace('_', '-')} weights, 8-bit activations")
        ax.set_xlabel("weight bits (hollow marker at 4: W4A4)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Fashion-MNIST test accuracy (%)")
    axes[1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

    names = list(hists)
    cols = 3
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows))
    base = hists.get("plain")
    for ax, name in zip(np.ravel(axes), names):
        w = hists[name]
        edges = np.linspace(-1, 1, 102) * max(np.abs(w).max(), 0 if base is None else
                                              np.abs(base).max())
        ax.hist(w, bins=edges, color="C0", log=True, label=name)
        if base is not None and name != "plain":  # before (plain training) vs after
            ax.hist(base, bins=edges, histtype="step", color="0.35", log=True, lw=0.8,
                    label="plain")
            ax.legend(fontsize=6, loc="upper right")
        ax.set_title(f"{name}: {hist_label}, max|w| {np.abs(w).max():.3f}", fontsize=8)
    for ax in np.ravel(axes)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    hist_path = path.replace(".png", "_histograms.png")
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)
    return path, hist_path


def _has_batchnorm(model: str) -> bool:
    """Whether ``model`` has BatchNorm layers (their statistics are recalibrated in --quick)."""
    return any(isinstance(l, keras.layers.BatchNormalization)
               for l in MODELS[model]["build"]().layers)


def _file_stem(model: str, tag=None, quick: bool = False) -> str:
    """robustness[_ds_cnn][_<tag>][_quick] (small_cnn keeps the original names)."""
    return ("robustness" + ("" if model == "small_cnn" else f"_{model}")
            + (f"_{tag}" if tag else "") + ("_quick" if quick else ""))


def _report(args, seeds, epochs, x, xt, per_seed, seconds, done, wall, params, hist_label):
    """Aggregate the seeds done so far and write the JSON (after every seed, so a long run
    that is cut off still leaves its results)."""
    names = [n for n in per_seed if len(per_seed[n]) >= done]
    agg = {n: {g: {c: mean_std([r[g][c] for r in per_seed[n][:done]]) for c in COLUMNS}
               for g in ("per_channel", "per_tensor")} for n in names}
    text = "\n\n".join(_table(agg, g) for g in ("per_channel", "per_tensor"))
    path = write_json(_file_stem(args.model, args.tag, args.quick) + ".json", {
        "benchmark": "robustness", "model": args.model, "parameters": params,
        "settings": {"model": args.model, "parameters": params, "epochs": epochs,
                     "batch_size": args.batch_size, "optimizer": "Adam(1e-3)",
                     "histogram": hist_label},
        "data": args.data, "quick": args.quick,
        "batchnorm_recalibrated": bool(args.quick and _has_batchnorm(args.model)),
        "seeds_planned": seeds, "seeds_done": done, "epochs": epochs,
        "batch_size": args.batch_size, "optimizer": "Adam(1e-3)", "train_examples": len(x),
        "test_examples": len(xt), "columns": COLUMNS, "aggregate": agg, "per_seed": per_seed,
        "train_seconds": {n: mean_std(s) for n, s in seconds.items() if s},
        "wall_seconds": round(wall, 1), "table": text})
    return agg, text, path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--model", default="small_cnn", choices=list(MODELS),
                   help="the architecture every row trains (default small_cnn)")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: " + ", ".join(f"{m} {c['epochs']}" for m, c in MODELS.items())
                        + " (--quick: 1)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--methods", nargs="*", default=None,
                   help="rows to train (default: the standard table); also "
                        + ", ".join(extra_builders()))
    p.add_argument("--tag", default=None,
                   help="write robustness[_<model>]_<tag>.json/png instead of "
                        "robustness[_<model>].json")
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (1 if args.quick else MODELS[args.model]["epochs"])
    (x, y), (xt, yt) = common.load(args.data, quick=args.quick)
    calib = x[:512]
    standard = method_builders(args.model)
    builders = {**standard, **extra_builders(args.model)}
    params = int(MODELS[args.model]["build"]().count_params())
    hist_label = _hist_label(MODELS[args.model]["build"](), args.model)
    keras.backend.clear_session()
    names = args.methods or list(standard)
    unknown = set(names) - set(builders)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {list(builders)}")

    start = time.perf_counter()
    per_seed: Dict[str, List[dict]] = {n: [] for n in names}
    hists, seconds = {}, {n: [] for n in names}
    for seed in range(seeds):
        for name in names:
            print(f"== seed {seed} / {name}  ({(time.perf_counter() - start) / 60:.1f} min)",
                  flush=True)
            seed_all(seed)
            model = builders[name]()
            t0 = time.perf_counter()
            history = _fit(model, x, y, epochs, args.batch_size).history
            seconds[name].append(time.perf_counter() - t0)
            plain = _plain_copy(model, args.model)
            if args.quick:  # 16 steps do not settle BatchNorm statistics (common.py)
                recalibrate_batchnorm(plain, x)
            per_seed[name].append(evaluate(plain, xt, yt, calib))
            train_acc = history.get("accuracy", [None])[-1]
            per_seed[name][-1]["train_accuracy_last_epoch"] = (
                None if train_acc is None else float(train_acc))
            if seed == 0:
                hists[name] = _histogram_kernel(plain, args.model)
            r = per_seed[name][-1]
            print(f"   fp32 {100 * r['per_channel']['fp32']:.2f}  "
                  f"W3A8 pc {100 * r['per_channel']['W3A8']:.2f}  "
                  f"W4A8 pt {100 * r['per_tensor']['W4A8']:.2f}  "
                  f"W4A4 pc {100 * r['per_channel']['W4A4']:.2f}", flush=True)

            keras.backend.clear_session()
        agg, text, path = _report(args, seeds, epochs, x, xt, per_seed, seconds, seed + 1,
                                  time.perf_counter() - start, params, hist_label)
        png, hist_png = _plot(agg, hists, path.replace(".json", ".png"), args.model,
                              hist_label)
    print(text)
    print(f"wrote {path}, {png}, {hist_png}")
    return agg


if __name__ == "__main__":
    main()
