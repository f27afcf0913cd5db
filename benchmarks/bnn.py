"""Benchmark 2: binary networks with larq: four sign quantizers, with and without Foothill.

Rows: larq's ``ste_sign``, ``approx_sign``, ``swish_sign`` and tfqreg's ``foothill_sign`` as the
input AND kernel quantizer of a larq BNN, each trained plain and with the Foothill regularizer
on the latent (real-valued) weights of every binarized kernel. Column: Fashion-MNIST test
accuracy, mean ± std over seeds.

The network is larq's customary small BNN (larq's MNIST guide CNN, 93k binary weights):
QuantConv(32)-Pool-BN, QuantConv(64)-Pool-BN, QuantConv(64)-BN, Flatten, QuantDense(64)-BN,
QuantDense(10)-BN, softmax; binary weights (latent weights clipped to [-1, 1] by
``weight_clip``) and binary activations, except the first layer's input (the real image, as is
customary). No biases (BatchNormalization follows every layer, ``scale=False``).

Same for every row: Adam(1e-3) (larq's customary optimizer and rate; Bop is not needed), batch
128, the same epochs, images and seeds (seed s: same initial latent weights and data order for
every row up to the quantizer).

The Foothill regularizer: ``tfqreg.regularizers.Foothill(l=1e-5, alpha=1, beta=2,
center=1.0)``, i.e. ``1e-5 · Σ f(|w| − 1)`` with ``f(x) = x·tanh(x)``, per binarized kernel. With
``center=1`` its valley sits at |w| = 1 (the clip boundary), pulling latent weights toward ±1;
f ≈ x² within |x| ≲ 1 (β = 2), so the pull on a weight at |w| is ≈ 2l·(1 − |w|). Why 1e-5 and
not the class default 1e-4: under Adam the pull is a consistent bias against noisy task
gradients, so even a small l moves the latent weights at nearly the learning rate per step.
Measured on this network (ste_sign, seed 0, 60k images, 1 epoch): l = 1e-4 drove mean |w|
from 0.045 to 0.29 and test accuracy from 78.8% to 66.7% (approx_sign 78.1% -> 70.6%); l = 1e-3
cost foothill_sign 7 points already after 15k images. ``--strength`` changes it.

    python benchmarks/bnn.py            # full: 3 seeds, 60k images, 1 epoch (1,258 CPU-s measured:
                                        #   ~11-15 min on 2 free cores; 34 min on a shared machine)
    python benchmarks/bnn.py --quick    # smoke: 1 seed, 2k images, 1 epoch (~1-2 min)

Writes benchmarks/results/bnn[_quick].json and .png (bar chart, error bars = std over seeds).
The JSON states the epochs, images and the measured wall-clock and CPU time of the run.
"""

from __future__ import annotations

import argparse
import time
from typing import Dict, List, Optional

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import keras, mean_std, seed_all, verbose, write_json

import larq as lq  # noqa: E402

import tfqreg.quantizers  # noqa: E402,F401  (registers "foothill_sign")
from tfqreg import regularizers  # noqa: E402

QUANTIZERS = ("ste_sign", "approx_sign", "swish_sign", "foothill_sign")
FOOTHILL = dict(alpha=1.0, beta=2.0, center=1.0)
DEFAULT_STRENGTH = 1e-5


def row_name(quantizer: str, regularized: bool) -> str:
    return f"{quantizer}+foothill_reg" if regularized else quantizer


def build_bnn(quantizer: str = "ste_sign", strength: Optional[float] = None,
              name: str = "bnn", dense_as_conv: bool = False) -> keras.Model:
    """larq's customary small BNN with ``quantizer`` on inputs (after the first layer) and
    kernels (a larq name, or a zero-argument function returning a new quantizer object, e.g.
    ``lambda: lq.quantizers.SteSign(clip_value=0.5)``); ``strength``: Foothill(center=1) on every binarized kernel, or ``None``.

    ``dense_as_conv=True`` writes the two dense layers as the equivalent convolutions
    (QuantConv2D(64, 3) over the 3×3×64 feature map, then a 1×1 QuantConv2D(10)): the same
    function with the same weights (``kernel.reshape``), but Larq Compute Engine, which has no
    binary fully-connected op (larq/compute-engine#53), then bit-packs them as ``LceBconv2d``.
    """
    def make():  # a fresh quantizer object per use when ``quantizer`` is a factory
        return quantizer() if callable(quantizer) and not hasattr(quantizer, "get_config") \
            else quantizer

    def kw(first=False):
        reg = None if strength is None else regularizers.Foothill(l=strength, **FOOTHILL)
        return dict(kernel_quantizer=make(), kernel_constraint="weight_clip", use_bias=False,
                    input_quantizer=None if first else make(), kernel_regularizer=reg)

    L = keras.layers
    bn = lambda i: L.BatchNormalization(scale=False, name=f"bn{i}")  # noqa: E731
    if dense_as_conv:
        head = [lq.layers.QuantConv2D(64, 3, name="qfc1", **kw()), bn(4),
                lq.layers.QuantConv2D(10, 1, name="qfc2", **kw()), bn(5), L.Flatten()]
    else:
        head = [L.Flatten(), lq.layers.QuantDense(64, name="qfc1", **kw()), bn(4),
                lq.layers.QuantDense(10, name="qfc2", **kw()), bn(5)]
    return keras.Sequential([
        L.InputLayer(input_shape=(28, 28, 1)),
        lq.layers.QuantConv2D(32, 3, name="qconv1", **kw(first=True)), L.MaxPooling2D(), bn(1),
        lq.layers.QuantConv2D(64, 3, name="qconv2", **kw()), L.MaxPooling2D(), bn(2),
        lq.layers.QuantConv2D(64, 3, name="qconv3", **kw()), bn(3),
        *head,
        L.Activation("softmax", name="softmax"),
    ], name=name)


def copy_weights(source: keras.Model, target: keras.Model) -> keras.Model:
    """Copy weights layer by layer (by name) between the two ``build_bnn`` layouts."""
    for layer in target.layers:
        if not layer.weights:
            continue
        values = source.get_layer(layer.name).get_weights()
        layer.set_weights([v.reshape(w.shape) for v, w in zip(values, layer.get_weights())])
    return target


def train(model: keras.Model, x, y, epochs: int, batch_size: int, lr: float) -> keras.Model:
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose())
    return model


def accuracy(model: keras.Model, xt, yt) -> float:
    """Test accuracy of the binarized forward pass (what larq trains and LCE deploys)."""
    p = model.predict(xt, batch_size=1000, verbose=0)
    return float((p.argmax(-1) == yt).mean())


def latent_stats(model: keras.Model) -> Dict[str, float]:
    """Latent weights of the binarized kernels: mean |w| and the fraction with |w| > 0.5."""
    quant = (lq.layers.QuantConv2D, lq.layers.QuantDense)
    w = np.concatenate([l.kernel.numpy().ravel() for l in model.layers if isinstance(l, quant)])
    return {"mean_abs_latent": float(np.abs(w).mean()),
            "frac_abs_latent_gt_0.5": float((np.abs(w) > 0.5).mean())}


def _table(agg: Dict[str, dict], per_seed: Dict[str, List[dict]]) -> str:
    lines = ["Fashion-MNIST test accuracy % (mean ± std over seeds); latent |w| after training",
             f"{'quantizer':<15}{'plain':>16}{'+Foothill(c=1)':>18}{'Δ':>8}"
             f"{'mean|w| plain':>15}{'mean|w| +reg':>14}"]
    for q in QUANTIZERS:
        a, b = agg.get(row_name(q, False)), agg.get(row_name(q, True))
        cell = lambda r: (f"{100 * r['test_accuracy']['mean']:6.2f} ± "  # noqa: E731
                          f"{100 * r['test_accuracy']['std']:<5.2f}") if r else "-"
        delta = (f"{100 * (b['test_accuracy']['mean'] - a['test_accuracy']['mean']):+.2f}"
                 if a and b else "-")
        wa = f"{a['mean_abs_latent']['mean']:.3f}" if a else "-"
        wb = f"{b['mean_abs_latent']['mean']:.3f}" if b else "-"
        lines.append(f"{q:<15}{cell(a):>16}{cell(b):>18}{delta:>8}{wa:>15}{wb:>14}")
    return "\n".join(lines + [f"note: {n}" for n in _notes(per_seed)])


def _notes(per_seed: Dict[str, List[dict]]) -> List[str]:
    """foothill_sign's backward pass is f''(x)/α = the derivative of SignSwish, which is larq's
    swish_sign pseudo-gradient (both β = 5): say so when their runs come out identical."""
    notes = []
    for reg in (False, True):
        a = per_seed.get(row_name("swish_sign", reg), [])
        b = per_seed.get(row_name("foothill_sign", reg), [])
        k = min(len(a), len(b))
        if k:
            d = max(abs(a[i]["test_accuracy"] - b[i]["test_accuracy"]) for i in range(k))
            notes.append(f"{row_name('foothill_sign', reg)} vs {row_name('swish_sign', reg)}: "
                         f"max per-seed accuracy difference {100 * d:.2f} points over {k} "
                         "seed(s) (same pseudo-gradient: f''(x)/alpha = d/dx SignSwish_beta, "
                         "beta = 5 in both)")
    return notes


def _plot(agg: Dict[str, dict], path: str, subtitle: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = np.arange(len(QUANTIZERS))
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, (reg, label) in enumerate(((False, "plain"), (True, "+ Foothill(center=1) reg."))):
        rows = [agg.get(row_name(q, reg)) for q in QUANTIZERS]
        m = [100 * r["test_accuracy"]["mean"] if r else np.nan for r in rows]
        s = [100 * r["test_accuracy"]["std"] if r else 0 for r in rows]
        bars = ax.bar(xs + (k - 0.5) * 0.38, m, 0.38, yerr=s, capsize=4, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(xs, QUANTIZERS)
    finite = [100 * r["test_accuracy"]["mean"] for r in agg.values()]
    ax.set_ylim(max(0, min(finite) - 10), min(100, max(finite) + 8))
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title(f"larq BNN: input/kernel quantizer\n{subtitle}", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--train-size", type=int, default=None,
                   help="first N training images (default: all 60k; --quick: 2k)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH,
                   help="Foothill(center=1) regularizer strength l")
    p.add_argument("--quantizers", nargs="*", default=list(QUANTIZERS), choices=QUANTIZERS)
    p.add_argument("--data", default="fashion_mnist")
    args = p.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    (x, y), (xt, yt) = common.load(args.data, quick=args.quick)
    if args.train_size:
        x, y = x[:args.train_size], y[:args.train_size]
    rows = [(q, r) for q in args.quantizers for r in (False, True)]
    per_seed: Dict[str, List[dict]] = {row_name(q, r): [] for q, r in rows}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    subtitle = (f"{len(x):,} training images, {args.epochs} epoch(s), Adam({args.lr:g}), "
                f"batch {args.batch_size}, Foothill l={args.strength:g}")
    for seed in range(seeds):
        for q, reg in rows:
            name = row_name(q, reg)
            print(f"== seed {seed} / {name}", flush=True)
            seed_all(seed)
            model = build_bnn(q, args.strength if reg else None)
            t0 = time.perf_counter()
            train(model, x, y, args.epochs, args.batch_size, args.lr)
            r = {"seed": seed, "test_accuracy": accuracy(model, xt, yt),
                 "train_seconds": time.perf_counter() - t0, **latent_stats(model)}
            per_seed[name].append(r)
            print(f"   test accuracy {100 * r['test_accuracy']:.2f}%  mean|w| "
                  f"{r['mean_abs_latent']:.4f}  ({r['train_seconds']:.0f} s)", flush=True)
            keras.backend.clear_session()
        agg = {n: {k: mean_std([r[k] for r in rs]) for k in rs[0] if k != "seed"}
               for n, rs in per_seed.items() if rs}
        text = _table(agg, per_seed)
        suffix = "_quick" if args.quick else ""
        path = write_json(f"bnn{suffix}.json", {
            "benchmark": "bnn", "data": args.data, "quick": args.quick,
            "seeds_planned": seeds, "seeds_done": seed + 1, "epochs": args.epochs,
            "batch_size": args.batch_size, "optimizer": f"Adam({args.lr:g})",
            "train_examples": len(x), "test_examples": len(xt),
            "model": "larq BNN QuantConv(32)-Pool-BN-QuantConv(64)-Pool-BN-QuantConv(64)-BN-"
                     "QuantDense(64)-BN-QuantDense(10)-BN-softmax, first input real",
            "regularizer": {"class": "tfqreg.regularizers.Foothill", "l": args.strength,
                            **FOOTHILL},
            "quantizers": list(args.quantizers), "rows": list(per_seed),
            "aggregate": agg, "per_seed": per_seed, "notes": _notes(per_seed),
            "wall_seconds": time.perf_counter() - wall0,
            "cpu_seconds": time.process_time() - cpu0,
            "table": text})
        png = _plot(agg, path.replace(".json", ".png"), subtitle)
    print(text)
    print(f"wall {time.perf_counter() - wall0:.0f} s, CPU {time.process_time() - cpu0:.0f} s")
    print(f"wrote {path}, {png}")
    return agg


if __name__ == "__main__":
    main()
