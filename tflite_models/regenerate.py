"""Train the reference models on real Fashion-MNIST and write the deployable artifacts.

    python tflite_models/regenerate.py [--data-dir ../shared/data] [--tfds-dir DIR]

Writes, next to this file:

* ``fmnist_cnn_int8.tflite`` + ``fmnist_cnn_int8_model_data.cc/.h``: a 16k-parameter CNN
  (Conv 16 stride 2, Conv 32 stride 2, Dense 10), trained 1 epoch, full-integer int8 for
  TFLite Micro (measured arena in the header) and the Edge TPU (pre-flight report);
* ``fmnist_cnn_int4.tflite`` + ``fmnist_cnn_int4_model_data.cc/.h``: the same trained float
  model as ``fmnist_cnn_int8`` (its 4-bit twin) with packed INT4 weights on tfqreg's 4-bit grid
  for TFLite Micro (``deploy.to_micro(..., weight_bits=4)``: convolutions per channel, Dense per
  tensor, int8 activations; measured arena in the header); it runs in LiteRT too;
* ``fmnist_cnn_int2_fc.tflite``: the same architecture trained 3 epochs with the soft-min-max
  range regularizer, on tfqreg's 2-bit grid for LiteRT (``deploy.to_tflite(..., weight_bits=2,
  runtime="litert")``: INT2 FULLY_CONNECTED, the convolutions' 2-bit grid in INT4);
* ``fmnist_bnn_lce.tflite``: ``tfqreg.models.bnn`` (larq, ``ste_sign``), trained 1 epoch,
  converted with Larq Compute Engine;
* ``<name>_report.txt`` / ``.json``: the export reports;
* ``manifest.json``: per model its source, test-set accuracy measured on the converted file in
  its interpreter (LiteRT, LCE; TFLite Micro too for the INT4 model), size, arena, ops and
  SHA-256; for the low-bit models also the simulated accuracy (``tfqreg.ptq.quantize``), the
  weight bytes by tensor type beside the int8 twin's, the weight tensors' types, and the
  accuracy on the first 2,000 test images that the test re-measures.
  ``tests/test_deploy_runtime.py`` checks the committed files against it (hashes, sizes, tensor
  types, and re-measures arena and accuracy).

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
from tfqreg import datasets, deploy, export, micro, models, ptq, regularizers  # noqa: E402
from tfqreg._keras import keras, tf  # noqa: E402
from tfqreg.edgetpu import check_edgetpu  # noqa: E402

CNN, BNN = "fmnist_cnn_int8", "fmnist_bnn_lce"
CNN4, CNN2 = "fmnist_cnn_int4", "fmnist_cnn_int2_fc"
SUBSET = 2000  # the test re-measures the low-bit models' accuracy on the first SUBSET images


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def accuracy(path: str, backend: str, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of a .tflite file, run in ``backend`` ("litert", "lce" or "micro")."""
    return float(np.mean(export.Runner(path, backend).predict(x).argmax(1) == y))


def keras_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x, verbose=0).argmax(1) == y))


def cnn(kernel_regularizer=None) -> keras.Model:
    def reg():
        return None if kernel_regularizer is None else kernel_regularizer()

    return keras.Sequential([
        keras.layers.InputLayer((28, 28, 1)),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1",
                            kernel_regularizer=reg()),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2",
                            kernel_regularizer=reg()),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(10, activation="softmax", name="fc", kernel_regularizer=reg()),
    ], name="fmnist_cnn")


def train(model, x, y, lr, epochs=1):
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=0, shuffle=True)
    return model


def relative(path: str, out: str) -> None:
    """Rewrite a written report with paths relative to the output folder."""
    with open(path) as f:
        text = f.read().replace(os.path.abspath(out) + os.sep, "")
    with open(path, "w") as f:
        f.write(text)


def weights(path: str) -> dict:
    """Weight bytes by tensor type, and the weight tensors, of a .tflite file."""
    rep = deploy.weight_report(path)
    return {"weight_bytes_by_type": rep.weight_bytes, "weight_bytes": rep.total_weight_bytes,
            "weight_tensors": [{"op": t.op, "dtype": t.dtype, "shape": t.shape,
                                "bytes": t.nbytes, "scales": len(t.scales), "levels": t.levels}
                               for t in rep.tensors]}


def twin(entry: dict, mine: dict) -> dict:
    """The int8 twin's size and weight bytes beside a low-bit model's."""
    return {"model": CNN, "size_bytes": entry["size_bytes"],
            "weight_bytes_by_type": entry["weight_bytes_by_type"],
            "weight_bytes": entry["weight_bytes"],
            "weight_bytes_saved": round(1 - mine["weight_bytes"] / entry["weight_bytes"], 4),
            "size_saved": round(1 - mine["size_bytes"] / entry["size_bytes"], 4)}


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
    res = micro.to_micro(model, x[:500], args.out, name=CNN, sample=xt, overwrite=True)
    tpu = check_edgetpu(res.flatbuffer, run_compiler=True)
    relative(os.path.join(args.out, f"{CNN}_micro.json"), args.out)  # committed: relative
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
        **weights(path),
        "arena_bytes_measured": res.arena_measured,
        "tensor_arena_size": res.arena_size,
        "ops": res.ops,
        "input": res.report.inputs[0],
        "sha256": sha256(path),
        "seconds": round(time.time() - t, 1),
    }

    # The 4-bit twin: the same float model, INT4 weights for TFLite Micro.
    t = time.time()
    res = deploy.to_micro(model, x[:500], args.out, name=CNN4, sample=xt, weight_bits=4,
                            overwrite=True)
    relative(os.path.join(args.out, f"{CNN4}_micro.json"), args.out)
    tpu = check_edgetpu(res.flatbuffer, run_compiler=False)
    path = res.tflite_path
    with open(os.path.join(args.out, f"{CNN4}_report.txt"), "w") as f:
        text = res.to_text().replace(os.path.abspath(args.out) + os.sep, "")
        f.write(text + "\n\n" + deploy.weight_report(path).to_text() + "\n\n" + tpu.to_text()
                + "\n")
    sim = ptq.quantize(model, 4, activation_bits=8, per_channel="conv",
                       calibration_data=x[:500])
    w4 = weights(path)
    largest = max(w4["weight_tensors"], key=lambda t: int(np.prod(t["shape"])))
    entry = {
        "file": os.path.basename(path),
        "c_source": [os.path.basename(res.cc_path), os.path.basename(res.h_path)],
        "source": f"tflite_models/regenerate.py: the float model of {CNN} (same training, same "
                  "weights); tfqreg.deploy.to_micro(model, x[:500], weight_bits=4): kernels "
                  "on tfqreg's 4-bit grid, convolutions per output channel, Dense per "
                  "tensor (TFLite Micro's INT4 FULLY_CONNECTED), written as packed INT4 by "
                  "ai-edge-quantizer, int8 activations and in/out (500 calibration images)",
        "runtime": "TFLite Micro and LiteRT (INT4 weights, int8 activations); Edge TPU "
                   "pre-flight: " + ("OK" if tpu.ok else f"fails at op #{tpu.first_cpu_op} "
                                     "(INT4 tensors; the Edge TPU runs int8 only)"),
        "keras_accuracy": keras_accuracy(model, xt, yt),
        "simulated_accuracy": keras_accuracy(sim, xt, yt),
        "simulated_model": "tfqreg.ptq.quantize(model, 4, activation_bits=8, "
                           "per_channel='conv', calibration_data=x[:500])",
        "accuracy": accuracy(path, "litert", xt, yt),
        "accuracy_micro": accuracy(path, "micro", xt, yt),
        "accuracy_data": "Fashion-MNIST test set, 10,000 images, top-1; accuracy: LiteRT "
                         "interpreter, accuracy_micro: TFLite Micro (Python interpreter, host)",
        "accuracy_subset": {"images": SUBSET,
                            "litert": accuracy(path, "litert", xt[:SUBSET], yt[:SUBSET]),
                            "micro": accuracy(path, "micro", xt[:SUBSET], yt[:SUBSET])},
        "size_bytes": os.path.getsize(path),
        **w4,
        "arena_bytes_measured": res.arena_measured,
        "tensor_arena_size": res.arena_size,
        "arena_note": "TFLite Micro unpacks an INT4 kernel to int8 in a scratch buffer of the "
                      "arena while its op runs: the arena holds the largest unpacked kernel "
                      f"(here {largest['op']}, {int(np.prod(largest['shape'])):,} B) beside "
                      "the activations, so INT4 halves the weights in flash but needs more "
                      "arena than int8",
        "ops": res.ops,
        "input": res.report.inputs[0],
        "sha256": sha256(path),
        "seconds": round(time.time() - t, 1),
    }
    entry["int8_twin"] = twin(entries[CNN], entry)
    entries[CNN4] = entry

    tf.keras.utils.set_random_seed(0)
    t = time.time()
    bnn = train(models.bnn(), x, y, 1e-2)
    path = os.path.join(args.out, f"{BNN}.tflite")
    lce = export.to_lce(bnn, sample=xt[:1000], path=path, overwrite=True)
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

    # 2-bit FULLY_CONNECTED for LiteRT: the same architecture, range-regularized for 2 bits.
    tf.keras.utils.set_random_seed(0)
    t = time.time()
    model2 = train(cnn(lambda: regularizers.SoftMinMax(0.05, normalize="none")), x, y, 3e-3,
                   epochs=3)
    path = os.path.join(args.out, f"{CNN2}.tflite")
    res = deploy.to_tflite(model2, mode="int8", representative_data=x[:500], weight_bits=2,
                           runtime="litert", sample=xt, path=path, overwrite=True)
    relative(os.path.join(args.out, f"{CNN2}.json"), args.out)
    with open(os.path.join(args.out, f"{CNN2}_report.txt"), "w") as f:
        f.write(res.report.to_text() + "\n\n" + deploy.weight_report(path).to_text() + "\n")
    sim = ptq.quantize(model2, 2, activation_bits=8, per_channel=True,
                       calibration_data=x[:500])
    entry = {
        "file": os.path.basename(path),
        "source": "tflite_models/regenerate.py: Conv(16,3,s2)-Conv(32,3,s2)-Dense(10) softmax "
                  "(the architecture of fmnist_cnn_int8), every kernel regularized with "
                  "tfqreg.regularizers.SoftMinMax(0.05, normalize='none') (the raw penalty), "
                  "Adam 3e-3, batch 128, 3 "
                  "epochs on the 60,000 Fashion-MNIST training images, seed 0; "
                  "tfqreg.deploy.to_tflite(model, mode='int8', weight_bits=2, runtime='litert', "
                  "representative_data=x[:500]): kernels on tfqreg's 2-bit grid per output "
                  "channel ({-1, 0, 1} x step), FULLY_CONNECTED as packed INT2, the "
                  "convolutions' 2-bit grid in INT4 (LiteRT has no INT2 convolution), int8 "
                  "activations and in/out",
        "runtime": "LiteRT (ai-edge-litert 2.3.0; INT2 FULLY_CONNECTED, INT4 CONV_2D, int8 "
                   "activations); not TFLite Micro (no INT2 kernels)",
        "keras_accuracy": keras_accuracy(model2, xt, yt),
        "simulated_accuracy": keras_accuracy(sim, xt, yt),
        "simulated_model": "tfqreg.ptq.quantize(model, 2, activation_bits=8, "
                           "per_channel=True, calibration_data=x[:500])",
        "accuracy": accuracy(path, "litert", xt, yt),
        "accuracy_data": "Fashion-MNIST test set, 10,000 images, top-1, LiteRT interpreter",
        "accuracy_subset": {"images": SUBSET,
                            "litert": accuracy(path, "litert", xt[:SUBSET], yt[:SUBSET])},
        "size_bytes": os.path.getsize(path),
        **weights(path),
        "arena_bytes_measured": None,
        "ops": res.report.ops,
        "input": res.report.inputs[0],
        "sha256": sha256(path),
        "seconds": round(time.time() - t, 1),
    }
    entry["int8_twin"] = twin(entries[CNN], entry)
    entries[CNN2] = entry

    manifest = {"generator": "tflite_models/regenerate.py", "tfqreg": tfqreg.__version__,
                "tensorflow": tf.__version__, "models": entries}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, default=str)
        f.write("\n")
    for name, e in entries.items():
        extra = "".join(f", {k} {e[k]:.4f}" for k in ("accuracy_micro", "simulated_accuracy")
                        if k in e)
        print(f"{name}: {e['size_bytes']:,} B, weights {e.get('weight_bytes', '-')} B, "
              f"accuracy {e['accuracy']:.4f}{extra} (Keras {e['keras_accuracy']:.4f}), arena "
              f"{e['arena_bytes_measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
