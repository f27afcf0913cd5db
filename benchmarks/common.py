"""Shared pieces of the benchmark scripts: data, machine description, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Callable, Dict, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, REPO)

import tfqreg  # noqa: E402,F401  (Keras 2 before anything touches tf.keras)
from tfqreg import datasets  # noqa: E402
from tfqreg._keras import keras, tf  # noqa: E402


def load(name: str = "fashion_mnist", quick: bool = False):
    """``(x, y), (xt, yt)``; ``quick`` keeps 2,000 training and 1,000 test images."""
    (x, y), (xt, yt) = datasets.load_numpy(name, datasets.local_files_dir())
    if quick:
        return (x[:2000], y[:2000]), (xt[:1000], yt[:1000])
    return (x, y), (xt, yt)


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere, which
    is empty on Linux): timing ratios depend on it, so results record it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> Dict[str, object]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "processor": cpu_model(),
    }


def seed_all(seed: int) -> None:
    keras.utils.set_random_seed(seed)


def mean_std(values) -> Dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "n": int(a.size)}


#: two-sided 95 % Student t quantiles for 1..9 degrees of freedom (then ≈ 2.0)
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def paired_difference(a, b) -> Optional[Dict[str, float]]:
    """Mean, standard error and count of the same-seed differences ``a[i] − b[i]``, over the
    seeds both ran (the shorter list), or ``None`` below two pairs.

    Runs from one seed share the initialisation and the data order, so their differences vary
    far less than either run does over seeds: this is the spread that tells an effect from seed
    noise, not the two rows' own standard deviations.
    """
    d = np.asarray(a[:len(b)], dtype=float) - np.asarray(b[:len(a)], dtype=float)
    if d.size < 2:
        return None
    return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(d.size)),
            "n": int(d.size)}


def paired_order(a, b) -> str:
    """``">"``, ``"<"`` or ``"≈"``: ``a`` against ``b`` by a paired two-sided t-test at 95 % on
    the same-seed differences (:func:`paired_difference`); one pair decides nothing."""
    p = paired_difference(a, b)
    if p is None or p["mean"] == 0 or abs(p["mean"]) <= T95.get(p["n"] - 1, 2.0) * p["se"]:
        return "≈"
    return ">" if p["mean"] > 0 else "<"


def rewrite_json(path: str, update: Callable[[dict], dict]) -> dict:
    """Load a stored results file, ``payload = update(payload)`` (recomputing what derives from
    its runs), write it back in place; returns the payload (the ``--render`` mode)."""
    with open(path) as f:
        payload = json.load(f)
    payload = update(payload)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    return payload


def write_json(name: str, payload: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    payload = dict(payload)
    payload.setdefault("machine", machine())
    payload.setdefault("written", time.strftime("%Y-%m-%d %H:%M:%S"))
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=float)
    return path


def verbose() -> int:
    return 1 if sys.stdout.isatty() else 2



def batchnorm_layers(model) -> list:
    """Every BatchNormalization layer inside ``model``, nested ones included."""
    return [l for l in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(l, keras.layers.BatchNormalization)]


def recalibrate_batchnorm(model, x, batch: int = 1024) -> int:
    """Set every BatchNorm's moving mean/variance to the statistics of ``x[:batch]`` under the
    current weights (one forward pass in training mode with momentum 0; no weight changes).
    Returns how many BatchNorms were set (0 for a BatchNorm-free model, which is unchanged).

    Keras' momentum 0.99 averages the moving statistics over ~100 steps, and early in training
    the weights move faster than that: after the 16 steps of a ``--quick`` run the
    inference-mode model predicts one class (~9% on Fashion-MNIST) while its training-mode
    accuracy is ~60%. ``robustness.py`` and ``batchnorm_fold.py`` call this on quick runs
    only; ``defaults_transfer.py`` on every run (469 steps do not settle the statistics
    either) and again after its one-shot pruning."""
    bns = batchnorm_layers(model)
    if not bns:
        return 0
    saved = [l.momentum for l in bns]
    for l in bns:
        l.momentum = 0.0
    try:
        model(tf.constant(x[:batch]), training=True)
    finally:
        for l, m in zip(bns, saved):
            l.momentum = m
    return len(bns)
