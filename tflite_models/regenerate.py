"""Train the reference models on real Fashion-MNIST and write the deployable artifacts.

    python tflite_models/regenerate.py [--data-dir ../shared/data] [--tfds-dir DIR]

Writes, next to this file:

* ``fmnist_cnn_int8.tflite`` + ``fmnist_cnn_int8_model_data.cc/.h``: a 16k-parameter CNN
  (Conv 16 stride 2, Conv 32 stride 2, Dense 10), trained 1 epoch, full-integer int8 for
  TFLite Micro (measured arena in the header) and the Edge TPU (pre-flight report);
* ``fmnist_bnn_lce.tflite``: ``tfqreg.models.bnn`` (larq, ``ste_sign``), trained 1 epoch,
  converted with Larq Compute Engine;
* ``<name>_report.txt`` / ``.json``: the export reports;
* ``manifest.json``: per model its source, test-set accuracy measured on the converted file in
  its interpreter, size, arena, ops and SHA-256. ``tests/test_deploy_runtime.py`` checks the
  committed files against it (hashes, sizes, and re-measures arena and accuracy).

Deterministic on one machine (seeds fixed); retraining elsewhere may change the bytes, so the
manifest is rewritten with the new numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import tfqreg  # noqa: E402
from tfqreg import datasets, export, micro, models  # noqa: E402
from tfqreg._keras import keras, tf  # noqa: E402
from tfqreg.edgetpu import check_edgetpu  # noqa: E402

CNN, BNN = "fmnist_cnn_int8", "fmnist_bnn_lce"


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def accuracy(path: str, backend: str, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a .tflite file, run in ``backend`` ("litert" or "lce")."""
    return float(np.mean(export.Runner(path, backend).predict(x).argmax(1) == y))


def cnn() -> keras.Model:
    return keras.Sequential([
        keras.layers.InputLayer((28, 28, 1)),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(10, activation="softmax", name="fc"),
    ], name="fmnist_cnn")


def train(model, x, y, lr):
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=1, verbose=0, shuffle=True)
    return model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--tfds-dir", default=None)
    p.add_argument("--out", default=HERE)
    args = p.parse_args(argv)
    (x, y), (xt, yt) = datasets.load_numpy("fashion_mnist", args.data_dir, args.tfds_dir)
    entries = {}

    tf.keras.utils.set_random_seed(0)
    t = time.time()
    model = train(cnn(), x, y, 3e-3)
    res = micro.to_micro(model, x[:500], args.out, name=CNN, sample=xt)
    tpu = check_edgetpu(res.flatbuffer, run_compiler=True)
    micro_json = os.path.join(args.out, f"{CNN}_micro.json")
    with open(micro_json) as f:  # paths relative to this folder in the committed report
        text = f.read().replace(os.path.abspath(args.out) + os.sep, "")
    with open(micro_json, "w") as f:
        f.write(text)
    path = res.tflite_path
    with open(os.path.join(args.out, f"{CNN}_report.txt"), "w") as f:
        text = res.to_text().replace(os.path.abspath(args.out) + os.sep, "")
        f.write(text + "\n\n" + tpu.to_text() + "\n")
    with open(os.path.join(args.out, f"{CNN}_edgetpu.json"), "w") as f:
        f.write(tpu.to_json())
    entries[CNN] = {
        "file": os.path.basename(path),
        "c_source": [os.path.basename(res.cc_path), os.path.basename(res.h_path)],
        "source": "tflite_models/regenerate.py: Conv(16,3,s2)-Conv(32,3,s2)-Dense(10) softmax, "
                  "Adam 3e-3, batch 128, 1 epoch on the 60,000 Fashion-MNIST training images, "
                  "seed 0; tfqreg.micro.to_micro (int8 in/out, 500 calibration images)",
        "runtime": "LiteRT / TFLite Micro (int8); Edge TPU pre-flight: "
                   + ("OK" if tpu.ok else f"cut at op {tpu.first_cpu_op}"),
        "keras_accuracy": float(np.mean(model.predict(xt, verbose=0).argmax(1) == yt)),
        "accuracy": accuracy(path, "litert", xt, yt),
        "accuracy_data": "Fashion-MNIST test set, 10,000 images, top-1, LiteRT interpreter",
        "size_bytes": os.path.getsize(path),
        "arena_bytes_measured": res.arena_measured,
        "tensor_arena_size": res.arena_size,
        "ops": res.ops,
        "input": res.report.inputs[0],
        "sha256": sha256(path),
        "seconds": round(time.time() - t, 1),
    }

    tf.keras.utils.set_random_seed(0)
    t = time.time()
    bnn = train(models.bnn(), x, y, 1e-2)
    path = os.path.join(args.out, f"{BNN}.tflite")
    lce = export.to_lce(bnn, sample=xt[:1000], path=path)
    with open(os.path.join(args.out, f"{BNN}_report.txt"), "w") as f:
        f.write(lce.report.to_text() + "\n")
    entries[BNN] = {
        "file": os.path.basename(path),
        "source": "tflite_models/regenerate.py: tfqreg.models.bnn() (larq QuantConv2D/QuantDense, "
                  "ste_sign, weight_clip), Adam 1e-2, batch 128, 1 epoch on the 60,000 "
                  "Fashion-MNIST training images, seed 0; tfqreg.export.to_lce",
        "runtime": "Larq Compute Engine interpreter (larq_compute_engine.testing.Interpreter)",
        "keras_accuracy": float(np.mean(bnn.predict(xt, verbose=0).argmax(1) == yt)),
        "accuracy": accuracy(path, "lce", xt, yt),
        "accuracy_data": "Fashion-MNIST test set, 10,000 images, top-1, LCE interpreter",
        "size_bytes": os.path.getsize(path),
        "arena_bytes_measured": None,
        "ops": lce.report.ops,
        "input": lce.report.inputs[0],
        "sha256": sha256(path),
        "seconds": round(time.time() - t, 1),
    }
    manifest = {"generator": "tflite_models/regenerate.py", "tfqreg": tfqreg.__version__,
                "tensorflow": tf.__version__, "models": entries}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.write("\n")
    for name, e in entries.items():
        print(f"{name}: {e['size_bytes']:,} B, accuracy {e['accuracy']:.4f} "
              f"(Keras {e['keras_accuracy']:.4f}), arena {e['arena_bytes_measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
