"""Benchmark 2b: binary networks trained to convergence, with the same tuning budget for each
quantizer (issue 13).

``benchmarks/bnn.py`` trains 1 epoch, where larq-style BNNs on Fashion-MNIST are far from
converged. This script trains the same network (``bnn.build_bnn``: larq's MNIST-guide BNN,
binary weights and activations, first input real) with a decaying learning rate until the test
curves flatten, and gives each quantizer the same small tuning budget first:

1. **Width** (the pseudo-gradient's width, one seed, ``--tune-epochs`` epochs, scored on a
   validation split held out of the training images): ``ste_sign`` ``clip_value`` ∈ {0.5, 1, 2},
   ``swish_sign`` and ``foothill_sign`` ``beta`` ∈ {2.5, 5, 10}. larq's ``approx_sign`` has no
   width parameter: it gets its one configuration (stated in the table).
2. **Regularizer strength**: each quantizer at its chosen width, with
   ``Foothill(l, alpha=1, beta=2, center=1)`` on the latent weights of every binarized kernel,
   ``l`` ∈ {3e-6, 1e-5, 3e-5} (the 1-epoch benchmark measured that 1e-4 already drives the
   latent weights away), scored the same way.
3. **Final runs**: each quantizer at its width, plain and with its chosen ``l``, ``--seeds``
   seeds, ``--epochs`` epochs; the test accuracy after every epoch (the curves), the final
   test accuracy (mean ± std), and the ranking of the eight rows at each of the last three
   epochs (converged = the ranking of the four quantizers, and each quantizer's
   plain-vs-regularized order, no longer change there).

Same for every run: Adam with cosine decay from ``--lr`` to 0 over the run's epochs (larq's
guides decay the rate), batch 128, the same images, the same seed per row up to the quantizer.
The validation split is the LAST ``--val-size`` training images; training uses the first
``--train-size`` of the others. Test images are used only in step 3.

    python benchmarks/bnn_convergence.py             # 20k images, tune 3 ep, final 12 ep, 2 seeds
    python benchmarks/bnn_convergence.py --quick     # smoke: 1k images, 1 epoch each stage
    python benchmarks/bnn_convergence.py --resume    # continue a cut run from its JSON

Writes ``benchmarks/results/bnn_convergence[_quick].json`` after every run (so a cut run keeps
what it finished) and ``.png`` (test accuracy per epoch, mean over seeds, one line per row).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import RESULTS, keras, mean_std, seed_all, verbose, write_json

import larq as lq  # noqa: E402

import bnn  # noqa: E402  (build_bnn, accuracy, latent_stats)
from tfqreg.quantizers import FoothillSign  # noqa: E402

WIDTHS: Dict[str, List[Optional[float]]] = {
    "ste_sign": [0.5, 1.0, 2.0],      # clip_value
    "approx_sign": [None],            # no parameter in larq
    "swish_sign": [2.5, 5.0, 10.0],   # beta
    "foothill_sign": [2.5, 5.0, 10.0],  # beta
}
WIDTH_NAME = {"ste_sign": "clip_value", "approx_sign": "-", "swish_sign": "beta",
              "foothill_sign": "beta"}
STRENGTHS = [3e-6, 1e-5, 3e-5]


def quantizer_factory(name: str, width: Optional[float]) -> Callable:
    """A zero-argument function returning a new quantizer object (one per layer use)."""
    if name == "ste_sign":
        return lambda: lq.quantizers.SteSign(clip_value=width)
    if name == "approx_sign":
        return lambda: lq.quantizers.ApproxSign()
    if name == "swish_sign":
        return lambda: lq.quantizers.SwishSign(beta=width)
    if name == "foothill_sign":
        return lambda: FoothillSign(beta=width)
    raise ValueError(f"unknown quantizer {name!r}")


class _Curve(keras.callbacks.Callback):
    """Accuracy of the binarized forward pass on ``(x, y)`` after every epoch."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.values = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        self.values.append(bnn.accuracy(self.model, self.x, self.y))


def run(quantizer: str, width, strength, seed: int, x, y, xe, ye, epochs: int,
        batch_size: int, lr: float) -> dict:
    """Train one BNN; the accuracy on ``(xe, ye)`` after every epoch and its latent stats."""
    seed_all(seed)
    model = bnn.build_bnn(quantizer_factory(quantizer, width), strength)
    steps = epochs * int(np.ceil(len(x) / batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=steps, alpha=0.0)
    model.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy",
                  ["accuracy"])
    curve = _Curve(xe, ye)
    t0 = time.perf_counter()
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose() if
              os.environ.get("TFQREG_BENCH_VERBOSE") else 0, callbacks=[curve])
    out = {"quantizer": quantizer, "width": width, "strength": strength, "seed": seed,
           "epochs": epochs, "curve": curve.values, "final": curve.values[-1],
           "train_seconds": time.perf_counter() - t0, **bnn.latent_stats(model)}
    keras.backend.clear_session()
    return out


def _key(stage: str, quantizer: str, width, strength, seed: int) -> str:
    return f"{stage}|{quantizer}|{width}|{strength}|{seed}"


def row_name(quantizer: str, regularized: bool) -> str:
    return bnn.row_name(quantizer, regularized)


def ranking(means: Dict[str, float]) -> List[str]:
    return [k for k, _ in sorted(means.items(), key=lambda kv: -kv[1])]


def _score(run: dict, epoch) -> float:
    """Test accuracy after ``epoch`` (0-based), or with ``epoch="tail"`` the mean over the last
    three epochs (less evaluation noise than one epoch's)."""
    if epoch == "tail":
        return float(np.mean(run["curve"][-3:]))
    return run["curve"][epoch]


def order(a: List[dict], b: List[dict], epoch) -> str:
    """``">"``, ``"<"`` or ``"≈"``: row ``a`` against row ``b`` at ``epoch`` (0-based, or
    ``"tail"``: see :func:`_score`), decided by a paired t-test at 95 % (two-sided) on the
    same-seed differences; one seed decides nothing. The rows share seeds: the same seed gives
    the same initialisation and data order up to the quantizer."""
    return common.paired_order([_score(r, epoch) for r in a], [_score(r, epoch) for r in b])


def summarize(runs: Dict[str, dict], choice: dict, quantizers, seeds: int) -> dict:
    """Aggregate the final runs: per-row mean curves, final mean ± std, rankings at the last
    three epochs, and whether they are stable."""
    rows: Dict[str, List[dict]] = {}
    for q in quantizers:
        if "strength" not in choice.get(q, {}):
            continue
        for reg in (False, True):
            strength = choice[q]["strength"] if reg else None
            rs = [runs[k] for s in range(seeds)
                  if (k := _key("final", q, choice[q]["width"], strength, s)) in runs]
            if rs:
                rows[row_name(q, reg)] = rs
    agg = {}
    for name, rs in rows.items():
        curves = np.array([r["curve"] for r in rs])
        agg[name] = {"final": mean_std([r["final"] for r in rs]),
                     "curve_mean": curves.mean(0).tolist(),
                     "mean_abs_latent": mean_std([r["mean_abs_latent"] for r in rs]),
                     "seeds": len(rs)}
    rankings, stable, decided, decided_stable, tail = [], None, [], None, None
    tail_orders = None
    if agg:
        n_ep = min(len(a["curve_mean"]) for a in agg.values())
        plain_rows = [q for q in quantizers if row_name(q, False) in agg]
        both = [q for q in plain_rows if row_name(q, True) in agg]
        for e in range(max(0, n_ep - 3), n_ep):
            plain = {q: agg[row_name(q, False)]["curve_mean"][e] for q in plain_rows}
            pairs = {q: agg[row_name(q, True)]["curve_mean"][e] >
                     agg[row_name(q, False)]["curve_mean"][e] for q in both}
            rankings.append({"epoch": e + 1, "quantizers_plain": ranking(plain),
                             "all_rows": ranking({n: a["curve_mean"][e]
                                                  for n, a in agg.items()}),
                             "regularized_beats_plain": pairs})
            decided.append({
                "epoch": e + 1,
                "plain_pairs": {f"{a} vs {b}": order(rows[row_name(a, False)],
                                                     rows[row_name(b, False)], e)
                                for i, a in enumerate(plain_rows) for b in plain_rows[i + 1:]},
                "regularized_vs_plain": {q: order(rows[row_name(q, True)],
                                                  rows[row_name(q, False)], e) for q in both}})
        stable = all(r["quantizers_plain"] == rankings[-1]["quantizers_plain"] and
                     r["regularized_beats_plain"] == rankings[-1]["regularized_beats_plain"]
                     for r in rankings)
        tail_orders = {
            "plain_pairs": {f"{a} vs {b}": order(rows[row_name(a, False)],
                                                 rows[row_name(b, False)], "tail")
                            for i, a in enumerate(plain_rows) for b in plain_rows[i + 1:]},
            "regularized_vs_plain": {q: order(rows[row_name(q, True)], rows[row_name(q, False)],
                                              "tail") for q in both}}
        tail = max(max(a["curve_mean"][n_ep - 3:n_ep]) - min(a["curve_mean"][n_ep - 3:n_ep])
                   for a in agg.values()) if n_ep >= 3 else None
        decided_stable = all({k: v for k, v in d.items() if k != "epoch"} ==
                             {k: v for k, v in decided[-1].items() if k != "epoch"}
                             for d in decided)
    return {"rows": agg, "rankings_last_epochs": rankings, "ranking_stable": stable,
            "decided_last_epochs": decided, "decided_ranking_stable": decided_stable,
            "max_change_last_3_epochs": tail, "orders_last_3_epochs_mean": tail_orders}


def table(tuning: dict, choice: dict, summary: dict, quantizers) -> str:
    lines = ["Tuning (validation accuracy %, one seed):"]
    for q in quantizers:
        widths = "  ".join(f"{WIDTH_NAME[q]}={w}: {100 * a:.2f}" if w is not None else
                           f"(no width): {100 * a:.2f}"
                           for w, a in tuning["width"].get(q, []))
        regs = "  ".join(f"l={s:g}: {100 * a:.2f}" for s, a in tuning["strength"].get(q, []))
        lines.append(f"  {q:<14} {widths}")
        if regs:
            lines.append(f"  {'':<14} +Foothill reg: {regs}")
    lines.append("")
    lines.append("Final (test accuracy %, mean ± std over seeds; chosen width and l):")
    lines.append(f"{'quantizer':<15}{'width':>10}{'plain':>16}{'l':>8}{'+Foothill reg':>16}"
                 f"{'Δ':>8}")
    rows = summary["rows"]
    for q in quantizers:
        a, b = rows.get(row_name(q, False)), rows.get(row_name(q, True))
        cell = (lambda r: f"{100 * r['final']['mean']:6.2f} ± {100 * r['final']['std']:<5.2f}"
                if r else "-")
        d = (f"{100 * (b['final']['mean'] - a['final']['mean']):+.2f}" if a and b else "-")
        w = choice.get(q, {}).get("width")
        lines.append(f"{q:<15}{('-' if w is None else f'{w:g}'):>10}{cell(a):>16}"
                     f"{choice.get(q, {}).get('strength') or 0:>8g}{cell(b):>16}{d:>8}")
    for r in summary["rankings_last_epochs"]:
        lines.append(f"epoch {r['epoch']}: plain ranking {' > '.join(r['quantizers_plain'])}; "
                     "reg > plain: " + ", ".join(f"{q} {'yes' if v else 'no'}"
                                                 for q, v in r["regularized_beats_plain"].items()))
    lines.append(f"ranking stable over the last epochs: {summary['ranking_stable']}")
    if summary.get("max_change_last_3_epochs") is not None:
        lines.append("largest change of a row's mean test accuracy over the last 3 epochs: "
                     f"{100 * summary['max_change_last_3_epochs']:.2f} pt")
    for d in summary.get("decided_last_epochs", []):
        lines.append(f"epoch {d['epoch']}, orders a paired t-test over the seeds decides "
                     "(95 %; ≈: not decided): "
                     + ", ".join(f"{k.replace(' vs ', f' {v} ')}"
                                 for k, v in d["plain_pairs"].items())
                     + "; +Foothill reg vs plain: "
                     + ", ".join(f"{q} {v}" for q, v in d["regularized_vs_plain"].items()))
    t = summary.get("orders_last_3_epochs_mean")
    if t:
        lines.append("orders of the mean over the last 3 epochs (paired t-test, 95 %): "
                     + ", ".join(k.replace(" vs ", f" {v} ") for k, v in t["plain_pairs"].items())
                     + "; +Foothill reg vs plain: "
                     + ", ".join(f"{q} {v}" for q, v in t["regularized_vs_plain"].items()))
    if summary.get("decided_ranking_stable") is not None:
        lines.append("decided orders stable over the last epochs (ties allowed): "
                     f"{summary['decided_ranking_stable']}")
    return "\n".join(lines)


def plot(summary: dict, path: str, subtitle: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = dict(zip(WIDTHS, ["C0", "C1", "C2", "C3"]))
    for name, a in summary["rows"].items():
        q = name.split("+")[0]
        ys = 100 * np.array(a["curve_mean"])
        ax.plot(np.arange(1, len(ys) + 1), ys, color=colors.get(q, "k"),
                linestyle="--" if "+" in name else "-", marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Fashion-MNIST test accuracy (%), mean over seeds")
    ax.set_title(f"larq BNN trained to convergence\n{subtitle}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    finals = [100 * a["curve_mean"][-1] for a in summary["rows"].values()]
    if finals:
        ax.set_ylim(min(finals) - 6, max(finals) + 2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--resume", action="store_true", help="skip runs already in the JSON")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--tune-epochs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--quantizers", nargs="*", default=list(WIDTHS), choices=list(WIDTHS))
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only recompute the summary and table of a stored results file (a "
                        "name under benchmarks/results) from its runs, and rewrite it")
    args = p.parse_args(argv)
    if args.render:
        path = args.render if os.path.isabs(args.render) else os.path.join(RESULTS, args.render)

        def update(payload):
            quantizers = [q for q in WIDTHS if q in payload["choice"]]
            payload["summary"] = summarize(payload["runs"], payload["choice"], quantizers,
                                           payload["settings"]["seeds"])
            payload["table"] = table(payload["tuning"], payload["choice"], payload["summary"],
                                     quantizers)
            return payload

        payload = common.rewrite_json(path, update)
        print(payload["table"])
        return payload["summary"]
    if args.quick:
        args.train_size, args.val_size, args.tune_epochs, args.epochs, args.seeds = \
            1000, 500, 1, 2, 1
    (x_all, y_all), (xt, yt) = common.load("fashion_mnist")
    xv, yv = x_all[-args.val_size:], y_all[-args.val_size:]
    x, y = x_all[:-args.val_size][:args.train_size], y_all[:-args.val_size][:args.train_size]
    if args.quick:
        xt, yt = xt[:1000], yt[:1000]
    name = "bnn_convergence_quick.json" if args.quick else "bnn_convergence.json"
    path = os.path.join(RESULTS, name)
    runs: Dict[str, dict] = {}
    if args.resume and os.path.exists(path):
        with open(path) as f:
            runs = json.load(f).get("runs", {})
        print(f"resuming: {len(runs)} runs done", flush=True)
    wall0 = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("train_size", "val_size", "tune_epochs", "epochs",
                                              "seeds", "batch_size", "lr", "quick")}
    tuning: Dict[str, Dict[str, List[Tuple]]] = {"width": {}, "strength": {}}
    choice: Dict[str, dict] = {}

    def save(stage: str):
        summary = summarize(runs, choice, args.quantizers, args.seeds)
        payload = {"benchmark": "bnn_convergence", "settings": settings, "stage": stage,
                   "widths": WIDTHS, "strengths": STRENGTHS, "tuning": tuning,
                   "choice": choice, "summary": summary, "runs": runs,
                   "wall_seconds_this_invocation": time.perf_counter() - wall0,
                   "load_average_at_write": os.getloadavg(),
                   "table": table(tuning, choice, summary, args.quantizers)}
        return write_json(name, payload)

    def do(stage, q, w, s, seed, xe, ye, epochs):
        k = _key(stage, q, w, s, seed)
        if k not in runs:
            print(f"== {k}", flush=True)
            runs[k] = run(q, w, s, seed, x, y, xe, ye, epochs, args.batch_size, args.lr)
            print(f"   {100 * runs[k]['final']:.2f}%  ({runs[k]['train_seconds']:.0f} s, load "
                  f"{os.getloadavg()[0]:.1f})", flush=True)
        return runs[k]

    for q in args.quantizers:  # 1. width
        tuning["width"][q] = [(w, do("tune_width", q, w, None, 0, xv, yv, args.tune_epochs)
                               ["final"]) for w in WIDTHS[q]]
        choice[q] = {"width": max(tuning["width"][q], key=lambda t: t[1])[0]}
        save("width")
    for q in args.quantizers:  # 2. strength
        w = choice[q]["width"]
        tuning["strength"][q] = [(s, do("tune_strength", q, w, s, 0, xv, yv, args.tune_epochs)
                                  ["final"]) for s in STRENGTHS]
        choice[q]["strength"] = max(tuning["strength"][q], key=lambda t: t[1])[0]
        save("strength")
    for seed in range(args.seeds):  # 3. final
        for q in args.quantizers:
            for reg in (False, True):
                do("final", q, choice[q]["width"], choice[q]["strength"] if reg else None,
                   seed, xt, yt, args.epochs)
                path = save("final")
    summary = summarize(runs, choice, args.quantizers, args.seeds)
    subtitle = (f"{len(x):,} training images, {args.epochs} epochs, Adam({args.lr:g}) cosine "
                f"decay, batch {args.batch_size}, {args.seeds} seed(s)")
    png = plot(summary, path.replace(".json", ".png"), subtitle)
    print(table(tuning, choice, summary, args.quantizers))
    print(f"wall {time.perf_counter() - wall0:.0f} s; wrote {path}, {png}")
    return summary


if __name__ == "__main__":
    main()
