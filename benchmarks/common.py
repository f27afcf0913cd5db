"""Shared pieces of the benchmark scripts: data, machine description, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Dict

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


def machine() -> Dict[str, object]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "processor": platform.processor() or platform.machine(),
    }


def seed_all(seed: int) -> None:
    keras.utils.set_random_seed(seed)


def mean_std(values) -> Dict[str, float]:
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "n": int(a.size)}


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
