"""Benchmark 1: bit-width robustness of one float model, post-training quantized on demand.

Rows: plain training, the tfqreg regularizers (Foothill, L∞, margin, soft-min-max), learnable
MSQE, gradient-ℓ1, TFMOT's 8-bit QAT and a TFMOT-style 4-bit QAT (tfqreg's n-bit configs, W4A4).
Every row trains `tfqreg.models.small_cnn` with the same optimizer (Adam 1e-3), batch size and
epochs, for each seed; the trained float weights are then quantized by `tfqreg.ptq.sweep`:
columns FP32, W8…W2 with activations at 8 bits, and W4A4 — per-channel and per-tensor weights.
QAT rows are evaluated by copying their float (latent) weights into the plain architecture, so
every row goes through the same PTQ.

    python benchmarks/robustness.py            # full: 3 seeds × 9 rows × 3 epochs (53 min, 2 cores)
    python benchmarks/robustness.py --quick    # smoke: 1 seed, 2k images, 1 epoch (~3 min)

Writes benchmarks/results/robustness[_quick].json and .png (accuracy vs bits, weight histograms).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import keras, mean_std, seed_all, verbose, write_json

from tfqreg import models, ptq, quantization, regularizers, training

WEIGHT_BITS = (8, 6, 5, 4, 3, 2)
COLUMNS = ["fp32"] + [f"W{b}A8" for b in WEIGHT_BITS] + ["W4A4"]


def _plain_copy(trained: keras.Model) -> keras.Model:
    """A plain small_cnn holding the float weights of ``trained`` (plain, wrapped or QAT).

    Weights are matched by their ``<layer>/kernel`` and ``<layer>/bias`` names, which TFMOT's
    QuantizeWrapperV2 keeps for the float (latent) weights it owns."""
    plain = models.small_cnn()
    found = {}
    for w in trained.weights:
        parts = w.name.split(":")[0].split("/")
        if len(parts) >= 2 and parts[-1] in ("kernel", "bias"):
            found.setdefault((parts[-2], parts[-1]), w.numpy())
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights([found[(layer.name, "kernel")], found[(layer.name, "bias")]])
    return plain


def _fit(model, x, y, epochs, batch):
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=batch, verbose=verbose())
    return model


def method_builders(epochs: int) -> Dict[str, Callable[[], keras.Model]]:
    """name -> function that returns the model to train (its float weights are evaluated)."""
    return {
        "plain": lambda: models.small_cnn(),
        "foothill": lambda: models.small_cnn(regularizers.Foothill()),
        "linf": lambda: models.small_cnn(regularizers.LInf()),
        "margin": lambda: models.small_cnn(regularizers.Margin()),
        "soft_min_max": lambda: models.small_cnn(regularizers.SoftMinMax()),
        "msqe_learnable_w4": lambda: training.TrainingModel(
            models.small_cnn(), [training.LearnableMSQE(bits=4, narrow_range=True)]),
        "gradient_l1": lambda: training.TrainingModel(
            models.small_cnn(), [training.GradientL1(lambda_w=1e-4, lambda_a=1e-4)]),
        "tfmot_qat_w8a8": lambda: __import__(
            "tensorflow_model_optimization").quantization.keras.quantize_model(models.small_cnn()),
        "qat_w4a4": lambda: quantization.quantize_model(models.small_cnn(), weight_bits=4,
                                                        activation_bits=4),
    }


def extra_builders() -> Dict[str, Callable[[], keras.Model]]:
    """Rows outside the standard table (``--methods`` only): stronger gradient-ℓ1 settings,
    switched on after the first epoch (from scratch, λ ≥ 1e-2 collapses training)."""
    def gl1(lam, start_epoch):
        return lambda: training.TrainingModel(
            models.small_cnn(), [training.GradientL1(lambda_w=lam, lambda_a=lam,
                                                     start_epoch=start_epoch)])
    return {"gradient_l1_1e-3_late": gl1(1e-3, 1), "gradient_l1_1e-2_late": gl1(1e-2, 1),
            "gradient_l1_3e-2_late": gl1(3e-2, 1)}


def evaluate(model: keras.Model, xt, yt, calib) -> Dict[str, Dict[str, float]]:
    out = {}
    for gran, per_channel in (("per_channel", True), ("per_tensor", False)):
        s = ptq.sweep(model, (xt, yt), weight_bits=WEIGHT_BITS, activation_bits=8,
                      per_channel=per_channel, calibration_data=calib, extra=[(4, 4)],
                      progress=False)
        row = {"fp32": s.float_accuracy}
        row.update({f"W{b}A8": s.accuracy(b, 8) for b in WEIGHT_BITS})
        row["W4A4"] = s.accuracy(4, 4)
        out[gran] = row
    return out


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


def _plot(agg, hists, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    xs = ["fp32"] + [str(b) for b in WEIGHT_BITS]
    for ax, gran in zip(axes, ("per_channel", "per_tensor")):
        for name, by in agg.items():
            m = np.array([100 * by[gran][c]["mean"] for c in COLUMNS[:-1]])
            s = np.array([100 * by[gran][c]["std"] for c in COLUMNS[:-1]])
            line, = ax.plot(xs, m, "o-", label=name, ms=3)
            ax.fill_between(xs, m - s, m + s, color=line.get_color(), alpha=0.15)
            # W4A4 as a hollow marker at the 4-bit position (activations quantized too)
            ax.plot([xs.index("4")], [100 * by[gran]["W4A4"]["mean"]], "o", mfc="none",
                    color=line.get_color(), ms=7)
        ax.set_title(f"PTQ, {gran.replace('_', '-')} weights, 8-bit activations")
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
        ax.set_title(f"{name}: fc1 kernel, max|w| {np.abs(w).max():.3f}", fontsize=8)
    for ax in np.ravel(axes)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    hist_path = path.replace(".png", "_histograms.png")
    fig.savefig(hist_path, dpi=110)
    plt.close(fig)
    return path, hist_path


def _report(args, seeds, epochs, x, xt, per_seed, seconds, done, wall):
    """Aggregate the seeds done so far and write the JSON (after every seed, so a long run
    that is cut off still leaves its results)."""
    names = [n for n in per_seed if len(per_seed[n]) >= done]
    agg = {n: {g: {c: mean_std([r[g][c] for r in per_seed[n][:done]]) for c in COLUMNS}
               for g in ("per_channel", "per_tensor")} for n in names}
    text = "\n\n".join(_table(agg, g) for g in ("per_channel", "per_tensor"))
    suffix = (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    path = write_json(f"robustness{suffix}.json", {
        "benchmark": "robustness", "data": args.data, "quick": args.quick,
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
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--methods", nargs="*", default=None,
                   help="rows to train (default: the standard table); also "
                        + ", ".join(extra_builders()))
    p.add_argument("--tag", default=None,
                   help="write robustness_<tag>.json/png instead of robustness.json")
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    epochs = args.epochs or (1 if args.quick else 3)
    (x, y), (xt, yt) = common.load(args.data, quick=args.quick)
    calib = x[:512]
    standard = method_builders(epochs)
    builders = {**standard, **extra_builders()}
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
            _fit(model, x, y, epochs, args.batch_size)
            seconds[name].append(time.perf_counter() - t0)
            plain = _plain_copy(model)
            per_seed[name].append(evaluate(plain, xt, yt, calib))
            if seed == 0:
                hists[name] = plain.get_layer("fc1").kernel.numpy().ravel()
            r = per_seed[name][-1]
            print(f"   fp32 {100 * r['per_channel']['fp32']:.2f}  "
                  f"W3A8 pc {100 * r['per_channel']['W3A8']:.2f}  "
                  f"W4A8 pt {100 * r['per_tensor']['W4A8']:.2f}  "
                  f"W4A4 pc {100 * r['per_channel']['W4A4']:.2f}", flush=True)

            keras.backend.clear_session()
        agg, text, path = _report(args, seeds, epochs, x, xt, per_seed, seconds, seed + 1,
                                  time.perf_counter() - start)
        png, hist_png = _plot(agg, hists, path.replace(".json", ".png"))
    print(text)
    print(f"wrote {path}, {png}, {hist_png}")
    return agg


if __name__ == "__main__":
    main()
