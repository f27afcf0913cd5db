"""Train-step time of tfqreg's training-step terms, as a ratio to the plain Keras step.

Model: ``tfqreg.models.small_cnn`` (225k parameters), batch 128 of Fashion-MNIST-shaped random
data, Adam. Configurations: plain (``keras.Model.fit`` step), learnable MSQE (4 bits, per
channel), gradient-ℓ1 on the kernels, gradient-ℓ1 on kernels + activations, and TFMOT QAT
(``tfmot.quantization.keras.quantize_model``). Each configuration is compiled once, warmed up
(tracing excluded), then timed over ``--repeats`` runs of ``--steps`` steps in this one process;
the table reports the median time per step and its ratio to the plain step's median.
Targets (issue 3): learnable MSQE ≤ 1.10×, gradient-ℓ1 ≤ 2.5×.

    python benchmarks/step_time.py            # full run, writes benchmarks/results/step_time.json
    python benchmarks/step_time.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tfqreg  # noqa: E402  (sets TF_USE_LEGACY_KERAS)
from tfqreg import models, training  # noqa: E402
from tfqreg._keras import keras, tf  # noqa: E402

TARGETS = {"learnable_msqe": 1.10, "gradient_l1_w": 2.5, "gradient_l1_wa": 2.5}


def _configs():
    def plain():
        m = models.small_cnn()
        return m

    def msqe():
        return training.TrainingModel(models.small_cnn(), terms=[
            training.LearnableMSQE(bits=4, per_channel=True)])

    def gl1_w():
        return training.TrainingModel(models.small_cnn(), terms=[
            training.GradientL1(lambda_w=1e-4)])

    def gl1_wa():
        return training.TrainingModel(models.small_cnn(), terms=[
            training.GradientL1(lambda_w=1e-4, lambda_a=1e-4)])

    def qat():
        import tensorflow_model_optimization as tfmot

        return tfmot.quantization.keras.quantize_model(models.small_cnn())

    return {"plain": plain, "learnable_msqe": msqe, "gradient_l1_w": gl1_w,
            "gradient_l1_wa": gl1_wa, "tfmot_qat": qat}


def prepare(build, x, y, steps: int, jit: bool = False):
    """Compile, trace and warm up one configuration; return ``(train_function, iterator)``."""
    model = build()
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy",
                  jit_compile=jit)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(128, drop_remainder=True) \
        .take(steps).cache().repeat()
    model.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)  # trace + warm-up
    fn = model.make_train_function()
    it = iter(ds)
    for _ in range(3):
        fn(it)
    return model, fn, it


def time_run(fn, it, steps: int) -> float:
    """Seconds per step over ``steps`` steps."""
    t0 = time.perf_counter()
    for _ in range(steps):
        logs = fn(it)
    float(logs["loss"])  # wait for the last step
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (few steps)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--jit", action="store_true", help="compile the steps with XLA")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "step_time.json"))
    args = parser.parse_args(argv)
    steps, repeats = (3, 2) if args.quick else (args.steps, args.repeats)
    rng = np.random.default_rng(0)
    x = rng.random((128 * steps, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, 128 * steps)
    tf.random.set_seed(0)
    rows = {}
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda it, **kw: it  # noqa: E731
    # interleave the configurations so that a change in machine load hits them alike
    configs = _configs()
    times = {name: [] for name in configs}
    prepared = {name: prepare(build, x, y, steps, jit=args.jit)
                for name, build in tqdm(configs.items(), desc="trace + warm-up")}
    for _ in tqdm(range(repeats), desc="timed rounds"):
        for name, (_, fn, it) in prepared.items():
            times[name].append(time_run(fn, it, steps))
    base = statistics.median(times["plain"])
    for name, ts in times.items():
        med = statistics.median(ts)
        rows[name] = {"median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts),
                      "ratio": med / base, "target": TARGETS.get(name),
                      "meets_target": None if name not in TARGETS else med / base <= TARGETS[name]}
    result = {
        "benchmark": "train-step time, small_cnn, batch 128, Adam",
        "steps_per_run": steps, "repeats": repeats, "jit_compile": args.jit, "quick": args.quick,
        "tensorflow": tf.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "loadavg_1min": os.getloadavg()[0],
        "rows": rows,
    }
    print(f"\n{'configuration':<16} {'median ms':>10} {'ratio':>7} {'target':>7}  ok")
    for name, r in rows.items():
        target = f"{r['target']:.2f}" if r["target"] else "-"
        ok = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")
        print(f"{name:<16} {r['median_ms']:>10.1f} {r['ratio']:>6.2f}x {target:>7}  {ok}")
    print(f"(load average at the end: {result['loadavg_1min']:.2f} on {os.cpu_count()} CPUs)")
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
