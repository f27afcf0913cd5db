"""Defaults that transfer (issue 16): every regularizer at its DEFAULT strength, on architectures
that differ in depth, width and BatchNorm, none of which the defaults were tuned on but the first.

Architectures (`tfqreg.models`): ``small_cnn`` (BN-free CNN, 4 kernels), ``ds_cnn``
(MobileNet-style depthwise-separable, BatchNorm + ReLU6 after each of its 9 convolutions),
``resnet_small`` (two residual blocks with BatchNorm, a Dense-BatchNorm head, 8 kernels) and
``mlp`` (three Dense layers, no BatchNorm, 235k weights). Rows: plain training and
``kernel_regularizer=`` ``LInf()``, ``Margin()``, ``SoftMinMax()``, ``Foothill()``, ``MSQE()``,
``PartialL2()``, each constructed with no argument (the library's defaults). Every run trains with Adam 1e-3, batch
128, on the same 20,000 training images for 3 epochs (469 steps), for each seed; the float
model is then post-training quantized by `tfqreg.ptq.sweep` (device-faithful: every BatchNorm folded into its layer first,
symmetric grid ``δ = max|w'|/(2^(b−1) − 1)``), WEIGHTS ONLY (activations stay float), and
evaluated on the 10,000 test images. Columns: FP32, per-tensor W4 and W3, per-channel W3.

Acceptance (issue 16), per architecture, on the means over seeds: every row costs ≤ 0.5 pt of
FP32 accuracy against plain; a range regularizer (LInf, Margin, SoftMinMax) and gradient-ℓ1 also
beat plain at per-tensor W3, MSQE at its own grid (per-tensor W4 at its default 4 bits),
partial L2 (a shrinkage toward zero for pruning) at ``P50``: the FP32 accuracy after one-shot
magnitude pruning of half of every quantizable kernel, no fine-tuning, BatchNorm statistics
re-estimated after pruning as after training (files written before 2026-12-03 kept them from
before pruning; ``defaults_transfer_bn_3seeds.json`` stores those as ``P50_stale_stats``).
Foothill (a shrinkage toward ±centre for binary networks) is judged on the FP32 cost alone.

    python benchmarks/defaults_transfer.py           # full: 4 archs × 7 rows × 2 seeds
    python benchmarks/defaults_transfer.py --quick   # smoke: 1 seed, 2k images, 1 epoch
    python benchmarks/defaults_transfer.py --archs ds_cnn --rows plain "linf:l=0.01" --seeds 1

A row is a regularizer name, optionally with constructor arguments (``"linf:l=0.01"``,
``"soft_min_max:l=0.05,normalize=none"``), for exploring other strengths, or ``gradient_l1``
(``training.GradientL1()`` at its defaults through ``training.TrainingModel``; judged like a
range row). A ``+frozen_state`` suffix (``"margin+frozen_state"``) keeps the regularizer's
learnable state (margin M, hardness a) at its initial value for the whole run (restored after
every step), a diagnostic: it tells a cost of the state's motion from one of the penalty's pull
on the weights. ``--add-to FILE`` runs the given rows and adds them beside the runs kept in FILE
(same seeds, epochs and images, checked), e.g.

    python benchmarks/defaults_transfer.py --rows gradient_l1 --add-to defaults_transfer.json

BatchNorm statistics: after training, every model's BatchNorm moving mean/variance are set to
the batch statistics of 2,048 training images under the final weights
(`common.recalibrate_batchnorm`, no weight changes; a no-op for the BN-free models), the same
for every row. The runs here are short (469 steps), and with Keras' momentum 0.99 the moving
statistics still lag the weights that early: plain ds_cnn evaluated with them scores 51 % after
469 steps and 87.5 % after 938 (benchmarks/robustness.py), which would measure the lag, not the
regularizers.

Writes benchmarks/results/defaults_transfer[_quick].json (or ``--out``), after every run, so
an interrupted run keeps what it measured.

    python benchmarks/defaults_transfer.py --gradients   # the diagnostic behind normalize="scale"

``--gradients`` trains each architecture plainly for one epoch (12,800 images) and prints, per
model, the median over kernels of |penalty gradient| / |task gradient| for the raw and the
normalised L∞ and soft-min-max penalties (BatchNorm folded), and how far apart the models'
medians are (also if each penalty were divided by the model's number of kernels); writes
benchmarks/results/defaults_transfer_gradients.json.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Dict, List, Optional

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import (batchnorm_layers, keras, mean_std, recalibrate_batchnorm, seed_all,
                    write_json)

import tfqreg
from tfqreg import models, ptq, regularizers, training

ARCHS = {"small_cnn": models.small_cnn, "ds_cnn": models.ds_cnn,
         "resnet_small": models.resnet_small, "mlp": models.mlp}
ROWS = ("plain", "linf", "margin", "soft_min_max", "foothill", "msqe", "partial_l2")
RANGE_ROWS = ("linf", "margin", "soft_min_max")
COLUMNS = ("fp32", "W4pt", "W3pt", "W3pc")
#: one-shot magnitude pruning: the float model with the PRUNE_FRACTION smallest-magnitude weights
#: of every quantizable kernel set to zero (no fine-tuning), the pruning PartialL2 prepares for
PRUNED, PRUNE_FRACTION = "P50", 0.5
#: reported beside COLUMNS: FP32 with the moving statistics as trained (before recalibration)
EXTRA = ("fp32_trained_stats",)
MAX_FP32_COST = 0.5  # pt
ACCEPTANCE_RULE = (f"every row: FP32 cost <= {MAX_FP32_COST} pt vs plain (means over seeds); "
                   "range rows and gradient_l1 also W3pt gain > 0, msqe a gain > 0 at its own "
                   "bit width (W4pt at the default 4 bits), partial_l2 a P50 gain > 0 (where "
                   "both rows have P50); foothill the cost only")
#: training images whose statistics become the BatchNorm moving statistics after training
RECALIBRATION = 2048


def _kwargs(args: str) -> dict:
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key] = float(value)
        except ValueError:
            kwargs[key] = {"true": True, "false": False}.get(value.lower(), value)
    return kwargs


FROZEN = "+frozen_state"


def parse_row(spec: str):
    """``"linf"`` or ``"linf:l=0.01,normalize=none"`` -> (name, regularizer or None);
    ``"gradient_l1[:...]"`` (a training term, see :func:`parse_term`) -> (name, None); a
    ``+frozen_state`` suffix is allowed on a regularizer with learnable state."""
    frozen = spec.endswith(FROZEN)
    spec = spec[:-len(FROZEN)] if frozen else spec
    name, _, args = spec.partition(":")
    if frozen and not getattr(regularizers.ALIASES.get(name), "_state_suffixes", ()):
        raise ValueError(f"row {spec + FROZEN!r}: {FROZEN} needs a regularizer with learnable "
                         "state (margin, soft_min_max)")
    if name in ("plain", "gradient_l1"):
        parse_term(spec)
        return spec, None
    cls = regularizers.ALIASES[name]
    return spec, cls(**_kwargs(args))


def parse_term(spec: str):
    """``"gradient_l1"`` -> ``training.GradientL1()`` at its defaults (``"gradient_l1:every=4"``
    passes arguments), trained through ``training.TrainingModel``; other rows -> ``None``."""
    name, _, args = spec.partition(":")
    if name != "gradient_l1":
        return None
    kwargs = {k: (int(v) if k == "every" else v) for k, v in _kwargs(args).items()}
    return training.GradientL1(**kwargs)


def evaluate(model, test, recalibration_x=None) -> Dict[str, float]:
    """FP32 and weight-only PTQ accuracies (activations float), BatchNorm folded, and the float
    accuracy after one-shot magnitude pruning (:func:`pruned_accuracy`, BatchNorm statistics
    re-estimated on ``recalibration_x`` after pruning)."""
    pt = ptq.sweep(model, test, weight_bits=(4, 3), per_channel=False, progress=False)
    pc = ptq.sweep(model, test, weight_bits=(3,), per_channel=True, progress=False)
    return {"fp32": pt.float_accuracy, "W4pt": pt.accuracy(4), "W3pt": pt.accuracy(3),
            "W3pc": pc.accuracy(3),
            PRUNED: pruned_accuracy(model, test, PRUNE_FRACTION, recalibration_x)}


def _batchnorm_statistics(model) -> list:
    """The moving mean and variance variables of every BatchNorm in ``model``."""
    return [v for layer in batchnorm_layers(model)
            for v in (layer.moving_mean, layer.moving_variance)]


def pruned_accuracy(model, test, fraction: float, recalibration_x=None) -> float:
    """Test accuracy of ``model`` with the ``floor(fraction·N)`` smallest-magnitude weights of
    each of its N-element quantizable kernels (:func:`tfqreg.ptq.quantizable_layers`, the
    kernels the regularizers act on) set to zero, as ``prune_low_magnitude`` at that constant
    sparsity would leave them before any fine-tuning. With ``recalibration_x``, the BatchNorm
    statistics are then re-estimated on its first ``RECALIBRATION`` images (as after training),
    so the column measures the pruned weights, not statistics of the unpruned ones; ``None``
    keeps the statistics as they were. Weights and statistics are restored afterwards."""
    kernels = [getattr(layer, "depthwise_kernel", None) if isinstance(
        layer, keras.layers.DepthwiseConv2D) else layer.kernel
        for layer in ptq.quantizable_layers(model)]
    saved = [k.numpy() for k in kernels]
    statistics = _batchnorm_statistics(model)
    saved_statistics = [v.numpy() for v in statistics]
    try:
        for k, w in zip(kernels, saved):
            flat = w.reshape(-1).copy()
            flat[np.argsort(np.abs(flat), kind="stable")[:int(fraction * flat.size)]] = 0.0
            k.assign(flat.reshape(w.shape))
        if recalibration_x is not None:
            recalibrate_batchnorm(model, recalibration_x, batch=RECALIBRATION)
        x, y = test
        pred = model.predict(x, batch_size=1024, verbose=0).argmax(-1)
        return float(np.mean(pred == np.asarray(y).reshape(-1)))
    finally:
        for k, w in zip(kernels, saved):
            k.assign(w)
        for v, value in zip(statistics, saved_statistics):
            v.assign(value)


class _FreezeState(keras.callbacks.Callback):
    """Restores the regularizer's learnable state variables to their initial values after every
    training step (the ``+frozen_state`` rows)."""

    def __init__(self, model, reg):
        super().__init__()
        ends = tuple(f"_{s}" for s in reg._state_suffixes)
        self.state = [v for v in model.weights if v.name.split(":")[0].endswith(ends)]
        if not self.state:
            raise ValueError(f"{FROZEN}: the model has no {ends} variables")
        self.initial = [v.numpy() for v in self.state]

    def on_train_batch_end(self, batch, logs=None):
        for v, value in zip(self.state, self.initial):
            v.assign(value)

    def drift(self) -> float:
        """max |state − initial| now (0 after a frozen run)."""
        return max(float(np.max(np.abs(v.numpy() - i))) for v, i in zip(self.state, self.initial))


def run_one(arch: str, spec: str, seed: int, train, test, epochs: int, quick: bool) -> dict:
    seed_all(seed)
    _, reg = parse_row(spec)
    term = parse_term(spec)
    model = inner = ARCHS[arch](kernel_regularizer=reg)
    if term is not None:
        model = training.TrainingModel(inner, terms=[term])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
    callbacks = [_FreezeState(inner, reg)] if spec.endswith(FROZEN) else []
    t0 = time.time()
    load0 = os.getloadavg()[0]
    model.fit(*train, batch_size=128, epochs=epochs, verbose=0, callbacks=callbacks)
    train_s = time.time() - t0
    if term is not None:  # evaluate the plain inner model, as the other rows are
        inner.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    moving = inner.evaluate(*test, batch_size=1024, verbose=0)[1]
    recalibrated = recalibrate_batchnorm(inner, train[0], batch=RECALIBRATION)
    acc = evaluate(inner, test, train[0])
    described = reg if term is None else term
    extra = {"frozen_state_drift": callbacks[0].drift()} if callbacks else {}
    return {**acc, **extra, "fp32_trained_stats": moving, "batchnorms_recalibrated": recalibrated,
            "train_seconds": train_s, "loadavg_1min": (load0 + os.getloadavg()[0]) / 2,
            "regularizer": None if described is None else {"class": type(described).__name__,
                                                            **described.get_config()}}


def summarize(runs: Dict[str, Dict[str, List[dict]]]) -> Dict[str, Dict[str, dict]]:
    out = {}
    for arch, rows in runs.items():
        out[arch] = {}
        for spec, seeds in rows.items():
            if seeds:
                out[arch][spec] = {c: mean_std([100 * r[c] for r in seeds])
                                   for c in COLUMNS + EXTRA}
                if all(PRUNED in r for r in seeds):  # runs from before the column have none
                    out[arch][spec][PRUNED] = mean_std([100 * r[PRUNED] for r in seeds])
    return out


def _paired_se(runs_arch, spec, column, sign):
    """Standard error (pt) of the per-seed differences ``sign·(row − plain)`` in ``column``, over
    the seeds both rows ran (same seed: same initialisation and data order), or ``None``."""
    if runs_arch is None or "plain" not in runs_arch or spec not in runs_arch:
        return None
    p = common.paired_difference([sign * 100 * r[column] for r in runs_arch[spec]],
                                 [sign * 100 * r[column] for r in runs_arch["plain"]])
    return None if p is None else p["se"]


def judged_on(spec: str) -> Optional[str]:
    """The column whose gain over plain a row must show, besides its FP32 cost: per-tensor W3
    for the range rows and gradient-ℓ1, the grid's own bit width for MSQE (``W4pt`` at its
    default 4 bits, ``W3pt`` at 3, ``None`` at widths the table does not evaluate), ``None``
    for Foothill (judged on its FP32 cost only); for partial L2 at the pruned share the table
    evaluates, that pruning (``P50``), where both rows were evaluated pruned."""
    name, _, args = spec.replace(FROZEN, "").partition(":")
    if name in RANGE_ROWS + ("gradient_l1",):
        return "W3pt"
    if name == "msqe":
        bits = int(_kwargs(args).get("bits", 4))
        return f"W{bits}pt" if f"W{bits}pt" in COLUMNS else None
    if name == "partial_l2" and abs(float(_kwargs(args).get("fraction", 0.5)) - PRUNE_FRACTION) < 1e-9:
        return PRUNED
    return None


def acceptance(summary, runs=None) -> Dict[str, Dict[str, dict]]:
    """Per architecture and regularizer row: FP32 cost against plain (pt) and the per-tensor
    W4 and W3 gains; ``ok`` needs cost ≤ 0.5 and, where :func:`judged_on` names a column, a
    gain > 0 there (range rows and gradient-ℓ1: W3pt; MSQE: its bit width).

    With the per-seed ``runs``, each also gets its paired standard error (``*_se``): the spread
    of the same-seed differences, which is what tells a cost from seed noise. Rows trained from
    the same seed share the initialisation and the data order, so their differences vary far
    less than either row's accuracy does over seeds.
    """
    out = {}
    for arch, rows in summary.items():
        if "plain" not in rows:
            continue
        base = rows["plain"]
        by_seed = (runs or {}).get(arch)
        out[arch] = {}
        for spec, r in rows.items():
            if spec == "plain":
                continue
            cost = base["fp32"]["mean"] - r["fp32"]["mean"]
            gains = {c: r[c]["mean"] - base[c]["mean"] for c in ("W4pt", "W3pt", PRUNED)
                     if c in r and c in base}
            column = judged_on(spec)
            if column not in gains:  # not evaluated on both rows: judged on the cost
                column = None
            ok = cost <= MAX_FP32_COST and (column is None or gains[column] > 0)
            out[arch][spec] = {"fp32_cost_pt": cost, "judged_on": column, "ok": bool(ok),
                               "fp32_cost_se": _paired_se(by_seed, spec, "fp32", -1.0)}
            for c, gain in gains.items():
                out[arch][spec][f"{c.lower()}_gain_pt"] = gain
                out[arch][spec][f"{c.lower()}_gain_se"] = _paired_se(by_seed, spec, c, 1.0)
    return out


def _with_se(value: float, se) -> str:
    """``"+0.8±0.2"`` (paired standard error), or the value alone, right-aligned in 13."""
    cell = f"{value:+.1f}" + ("" if se is None else f"±{se:.1f}")
    return f"{cell:>13}"


def _row_order(spec: str):
    """plain, the default rows, gradient_l1, then the others by regularizer and strength."""
    if spec in ROWS:
        return (0, ROWS.index(spec), "", 0.0)
    if spec == "gradient_l1":
        return (1, 0, "", 0.0)
    name, _, args = spec.partition(":")
    strength = _kwargs(args.replace(FROZEN, "")).get("l", -1.0) if args else -1.0
    return (2, 0, name.replace(FROZEN, ""), strength if isinstance(strength, float) else -1.0)


def table(summary, accept, header: str = "") -> str:
    lines = [header] if header else []
    width = max([14] + [len(spec) + 1 for rows in summary.values() for spec in rows])
    lines += [f"{'architecture':<13}{'row':<{width}}" + "".join(f"{c:>12}" for c in COLUMNS)
             + f"{PRUNED:>12}{'FP32 cost':>13}{'W4pt gain':>13}{'W3pt gain':>13}"
             + f"{PRUNED + ' gain':>13}  ok{'FP32 mov.':>12}"]
    for arch, rows in summary.items():
        for spec, r in sorted(rows.items(), key=lambda kv: _row_order(kv[0])):
            cells = "".join(f"{r[c]['mean']:>7.1f} ±{r[c]['std']:>4.1f}" if c in r else f"{'-':>12}"
                            for c in COLUMNS + (PRUNED,))
            moving = r["fp32_trained_stats"]
            moving = f"{moving['mean']:>7.1f} ±{moving['std']:>4.1f}"
            a = accept.get(arch, {}).get(spec)
            tail = " " * 57 if a is None else (
                _with_se(a["fp32_cost_pt"], a.get("fp32_cost_se"))
                + "".join(_with_se(a[f"{c}_gain_pt"], a.get(f"{c}_gain_se"))
                          if f"{c}_gain_pt" in a else f"{'-':>13}" for c in ("w4pt", "w3pt", "p50"))
                + f"  {'yes' if a['ok'] else 'NO ':<3}")
            lines.append(f"{arch:<13}{spec:<{width}}{cells}{tail}{moving}")
    return "\n".join(lines)


def compare(runs, a: str, b: str) -> Dict[str, dict]:
    """Row ``a`` against row ``b`` on each architecture that has both: per column, the mean and
    standard error of the same-seed differences (pt) and the paired t-test's order (``">"``,
    ``"<"``, ``"≈"``). E.g. a fast gradient-ℓ1 form against the exact one."""
    out = {}
    for arch, rows in runs.items():
        if a in rows and b in rows and rows[a] and rows[b]:
            out[arch] = {}
            for c in COLUMNS:
                xa = [100 * r[c] for r in rows[a]]
                xb = [100 * r[c] for r in rows[b]]
                p = common.paired_difference(xa, xb)
                n = min(len(xa), len(xb))
                out[arch][c] = {"mean": p["mean"] if p else float(np.mean(xa[:n]) - np.mean(xb[:n])),
                                "se": p["se"] if p else None, "n": n,
                                "order": common.paired_order(xa, xb)}
    return out


def comparison_table(runs, pairs) -> str:
    """One block per ``[a, b]`` pair of :func:`compare`: ``a − b`` per column, ± the paired
    standard error, with the t-test's verdict."""
    lines = []
    for a, b in pairs:
        result = compare(runs, a, b)
        if not result:
            continue
        lines += ["", f"{a} − {b}: same-seed differences, pt (mean ± standard error; "
                      "'>'/'<' decided by a paired t-test at 95 %, '≈' not decided)",
                  f"{'architecture':<13}{'seeds':>6}" + "".join(f"{c:>16}" for c in COLUMNS)]
        for arch, cols in result.items():
            cells = "".join(
                f"{_with_se(v['mean'], v['se']).strip() + ' ' + v['order']:>16}"
                for v in cols.values())
            lines.append(f"{arch:<13}{cols['fp32']['n']:>6}{cells}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- diagnostic
def _kernels(model):
    out = []
    for layer in model.layers:
        k = getattr(layer, "depthwise_kernel", None)
        k = getattr(layer, "kernel", None) if k is None else k
        if k is not None:
            out.append((layer, k))
    return out


def gradient_ratios(train, archs, steps_images: int = 12800, batch: int = 512) -> dict:
    """Per regularized kernel: |penalty gradient| / |task gradient| (L2 norms over the kernel),
    after one epoch of plain training on ``steps_images`` images, task gradient of the mean
    cross-entropy on ``batch`` training images in training mode; penalties on the kernel as the
    device quantizes it (BatchNorm folded), raw (``normalize="none"``) and normalised
    (``"scale"``), at l = 1. The spread of these ratios across kernels and models is what a
    strength normalisation should make small."""
    from tfqreg import fold
    from common import tf

    x, y = train[0][:steps_images], train[1][:steps_images]
    out = {}
    for arch in archs:
        seed_all(0)
        model = ARCHS[arch]()
        model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=128, epochs=1, verbose=0)
        xb, yb = tf.constant(x[:batch]), tf.constant(y[:batch])
        kernels = _kernels(model)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                yb, model(xb, training=True)))
        task = tape.gradient(loss, [k for _, k in kernels])
        rows = []
        for (layer, k), g in zip(kernels, task):
            bn = fold.batchnorm_for_kernel(layer, k)
            row = {"layer": layer.name, "size": int(np.prod(k.shape)), "batchnorm": bn is not None}
            for name, reg in (("linf", regularizers.linf_penalty),
                              ("soft_min_max", lambda w: regularizers.soft_min_max_penalty(
                                  w, 10.0 / tf.stop_gradient(tf.reduce_max(tf.abs(w)))))):
                for norm in ("none", "scale"):
                    with tf.GradientTape() as tape:
                        w = k if bn is None else fold.fold_kernel(layer, k, fold.batchnorm_scale(bn))
                        if norm == "scale":
                            w = regularizers.scale_normalized(w)
                        penalty = reg(w)
                    row[f"{name}_{norm}"] = float(tf.norm(tape.gradient(penalty, k)) / tf.norm(g))
            rows.append(row)
        out[arch] = rows
    summary = {}
    for key in ("linf_none", "linf_scale", "soft_min_max_none", "soft_min_max_scale"):
        medians = {a: float(np.median([r[key] for r in rows])) for a, rows in out.items()}
        per_count = {a: medians[a] / len(out[a]) for a in out}
        summary[key] = {"median_per_model": medians,
                        "spread_of_medians": max(medians.values()) / min(medians.values()),
                        "spread_if_divided_by_kernel_count":
                            max(per_count.values()) / min(per_count.values())}
    return {"per_kernel": out, "summary": summary}


def gradient_table(result) -> str:
    lines = [f"{'ratio |grad penalty| / |grad task|':<36}" + "".join(
        f"{a:>13}" for a in result["per_kernel"]) + f"{'spread':>9}{'÷ count':>9}"]
    for key, s in result["summary"].items():
        lines.append(f"{key + ' (median kernel)':<36}" + "".join(
            f"{v:>13.3g}" for v in s["median_per_model"].values())
            + f"{s['spread_of_medians']:>8.1f}×{s['spread_if_divided_by_kernel_count']:>8.1f}×")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--rows", nargs="+", default=list(ROWS))
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=20000,
                   help="the first N training images (default 20,000 of 60,000)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--add-to", default=None,
                   help="a results JSON (a name under benchmarks/results) whose runs are kept: "
                        "the --rows are run and added beside them (same seeds and settings), "
                        "the table recomputed, and the file rewritten (or --out)")
    p.add_argument("--render", default=None, metavar="JSON",
                   help="only recompute the tables of a stored results file (a name under "
                        "benchmarks/results) from its per-seed runs, and rewrite it")
    p.add_argument("--compare", nargs=2, action="append", metavar=("ROW_A", "ROW_B"),
                   help="with --render: also show ROW_A − ROW_B, same-seed differences on every "
                        "architecture that has both (kept in the file; repeatable)")
    p.add_argument("--gradients", action="store_true",
                   help="only the diagnostic: penalty vs task gradient per kernel "
                        "(writes defaults_transfer_gradients.json)")
    args = p.parse_args(argv)
    if args.render:
        path = (args.render if os.path.isabs(args.render)
                else os.path.join(common.RESULTS, args.render))
        print(render(path, args.compare)["table"])
        return
    if args.compare:
        p.error("--compare goes with --render (compare rows of a stored file)")
    if args.gradients:
        (x, y), _ = common.load(quick=args.quick)
        start = time.time()
        result = gradient_ratios((x, y), args.archs, steps_images=2000 if args.quick else 12800)
        result["table"] = gradient_table(result)
        result["wall_seconds"] = time.time() - start
        print(result["table"])
        name = args.out or f"defaults_transfer_gradients{'_quick' if args.quick else ''}.json"
        print("wrote", write_json(name, result) if not os.path.isabs(name) else _write(name, result))
        return
    for spec in args.rows:
        parse_row(spec)  # fail before training on a bad row
    (x, y), (xt, yt) = common.load(quick=args.quick)
    seeds, epochs, n_train = args.seeds, args.epochs, args.train_size
    if args.quick:
        seeds, epochs, n_train = 1, 1, len(x)
    train, test = (x[:n_train], y[:n_train]), (xt, yt)
    print(f"tfqreg from {tfqreg.__file__}; {len(train[0])} training, {len(xt)} test images, "
          f"{epochs} epochs, seeds {list(range(seeds))}", flush=True)
    runs: Dict[str, Dict[str, List[dict]]] = {a: {s: [] for s in args.rows} for a in args.archs}
    pairs: list = []  # the row pairs a kept file compares (--add-to keeps them)
    start, loads = time.time(), []
    name = args.out or args.add_to or f"defaults_transfer{'_quick' if args.quick else ''}.json"
    if args.add_to:
        import json

        with open(args.add_to if os.path.isabs(args.add_to)
                  else os.path.join(common.RESULTS, args.add_to)) as f:
            kept = json.load(f)
        pairs = kept.get("comparisons", [])
        if (kept["epochs"], kept["train_images"], kept["seeds"]) != (epochs, n_train, seeds):
            raise SystemExit(f"--add-to {args.add_to}: it has epochs {kept['epochs']}, "
                             f"{kept['train_images']} images, {kept['seeds']} seeds; this run "
                             f"{epochs}, {n_train}, {seeds}: the rows would not be comparable")
        # the kept runs, less the rows this run redoes on its own architectures
        runs = {a: {**{s: rs for s, rs in rows.items()
                       if not (a in args.archs and s in args.rows)},
                    **runs.get(a, {})}
                for a, rows in kept["runs"].items()}
        runs.update({a: rows for a, rows in
                     {a: {s: [] for s in args.rows} for a in args.archs}.items()
                     if a not in runs})
        loads = [r["loadavg_1min"] for rows in runs.values() for rs in rows.values()
                 for r in rs]
    for seed in range(seeds):
        for arch in args.archs:
            for spec in args.rows:
                r = run_one(arch, spec, seed, train, test, epochs, args.quick)
                runs[arch][spec].append(r)
                loads.append(r["loadavg_1min"])
                print(f"seed {seed} {arch:<13}{spec:<16} " + " ".join(
                    f"{c} {100 * r[c]:5.1f}" for c in COLUMNS)
                    + f"  ({r['train_seconds']:.0f} s, load {r['loadavg_1min']:.1f})", flush=True)
                summary = summarize(runs)
                accept = acceptance(summary, runs)
                payload = {
                    "benchmark": "defaults_transfer", "quick": args.quick,
                    "epochs": epochs, "train_images": len(train[0]), "test_images": len(xt),
                    "seeds": seeds,
                    "seeds_done": min(len(v) for rows in runs.values() for v in rows.values()),
                    "added_rows": (list(dict.fromkeys(kept.get("added_rows", []) + args.rows))
                                   if args.add_to else []),
                    "optimizer": "Adam 1e-3, batch 128",
                    "quantization": "tfqreg.ptq.sweep, BatchNorm folded, weights only "
                                    "(activations float); pt = per-tensor, pc = per-channel",
                    "acceptance_rule": ACCEPTANCE_RULE,
                    "defaults": {row: repr(parse_row(row)[1]) for row in ROWS if row != "plain"},
                    "summary": summary, "acceptance": accept, "runs": runs,
                    "comparisons": pairs,
                    "table": table(summary, accept,
                                   header=_header(seeds, len(train[0]), epochs))
                    + comparison_table(runs, pairs),
                    "wall_seconds": time.time() - start + (kept["wall_seconds"] if args.add_to
                                                            else 0.0),
                    "loadavg_1min": float(np.mean(loads)),
                }
                path = write_json(name, payload) if not os.path.isabs(name) else _write(name,
                                                                                        payload)
    print(payload["table"])
    print(f"wall time {payload['wall_seconds'] / 60:.1f} min, mean load "
          f"{payload['loadavg_1min']:.2f}; wrote {path}")


def _header(seeds: int, n_train: int, epochs: int) -> str:
    return (f"test accuracy %, mean ± std over {seeds} seed(s); {n_train:,} training images × "
            f"{epochs} epochs, Adam 1e-3, batch 128; weights-only PTQ (activations float), "
            "BatchNorm folded, pt = per-tensor, pc = per-channel;\nFP32 cost, W4pt and W3pt gain "
            "against plain: mean ± standard error of the same-seed differences; BatchNorm "
            "statistics re-estimated on 2,048 training images after training ('FP32 mov.': "
            "FP32 before, with the moving statistics as trained); P50: FP32 with the 50 % "
            "smallest |w| of each kernel zeroed, no fine-tuning, BatchNorm statistics "
            "re-estimated as after training")


def render(path: str, comparisons=None) -> dict:
    """Recompute the summary, acceptance and table of a stored results file from its per-seed
    runs (no training) and rewrite it; returns the payload. ``comparisons``: more ``[a, b]``
    row pairs to show (:func:`comparison_table`) beside the ones the file keeps."""
    def update(payload):
        payload["summary"] = summarize(payload["runs"])
        payload["acceptance"] = acceptance(payload["summary"], payload["runs"])
        payload["acceptance_rule"] = ACCEPTANCE_RULE
        pairs = payload.get("comparisons", [])
        for pair in comparisons or []:
            if list(pair) not in pairs:
                pairs.append(list(pair))
        payload["comparisons"] = pairs
        payload["table"] = table(payload["summary"], payload["acceptance"], header=_header(
            payload["seeds"], payload["train_images"], payload["epochs"])) + comparison_table(
                payload["runs"], pairs)
        return payload

    return common.rewrite_json(path, update)


def _write(path: str, payload: dict) -> str:
    import json

    payload = dict(payload)
    payload.setdefault("machine", common.machine())
    payload.setdefault("written", time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    return path


if __name__ == "__main__":
    main()
