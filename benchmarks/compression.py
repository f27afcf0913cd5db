"""Compression benchmark: tfqreg's prune → MSQE → Huffman pipeline vs. what a TFMOT user runs.

On Fashion-MNIST with ``tfqreg.models.small_cnn`` (225,034 parameters):

1. float baseline: 4 epochs of Adam (the reference model, 89.0 % in the README),
2. tfqreg: :class:`tfqreg.compression.Compressor` from the baseline (learnable partial L2 at
   r, prune, learnable MSQE at b bits with the mask fixed, snap, canonical Huffman with sparse
   positions), the ``.tfqz`` file decoded and evaluated,
3. TFMOT: ``prune_low_magnitude`` (constant sparsity r) fine-tuned from the same baseline for
   the same number of epochs, ``strip_pruning``, full-integer int8 TFLite (representative data
   from the training set), ``gzip -9``; accuracy from the TFLite interpreter.

Ratios are 32-bit float bytes of all parameters (900,136 B) over (a) our byte accounting
(coded weights + tables + position streams + float-kept params + steps, see
:data:`tfqreg.compression.ACCOUNTING`) and (b) whole files: the ``.tfqz`` file vs the gzipped
``.tflite`` (both include the architecture). "Matched accuracy" = at most 0.5 pt below float.

    python benchmarks/compression.py            # full run (~9 min on 2 cores)
    python benchmarks/compression.py --quick    # smoke run on 2,000 images, 1 epoch per stage

Writes ``benchmarks/results/compression.json`` (``compression_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo on sys.path, imports tfqreg first)

from tfqreg import models  # noqa: E402
from tfqreg._keras import keras, tf  # noqa: E402
from tfqreg.compression import Compressor, load_compressed  # noqa: E402

TOLERANCE = 0.005  # matched accuracy: at most 0.5 pt below the float model
REFERENCE_TFMOT = {"ratio": 11.4, "accuracy": 0.856, "float_accuracy": 0.890}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (2,000 images, 1 epoch each)")
    p.add_argument("--fraction", type=float, default=0.8, help="pruning fraction r")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--per-channel", action="store_true", help="one learned step per channel")
    p.add_argument("--float-epochs", type=int, default=4)
    p.add_argument("--prune-epochs", type=int, default=3)
    p.add_argument("--quant-epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--beta", type=float, default=1.0, help="β of the learnable terms")
    p.add_argument("--shared-terms", action="store_true",
                   help="one learnable term for all layers instead of one per layer")
    p.add_argument("--float-cache", default=None,
                   help="load the float baseline from this .h5 file if it exists, else train "
                        "it and save it there (for repeated runs)")
    p.add_argument("--skip-tfmot", action="store_true")
    return p.parse_args(argv)


def train_float(data, epochs, lr, batch_size, verbose):
    (x, y), (xt, yt) = data
    model = models.small_cnn()
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=verbose)
    return model, float(model.evaluate(xt, yt, verbose=0, batch_size=512)[1])


def tflite_accuracy(flat: bytes, xt, yt) -> float:
    interp = tf.lite.Interpreter(model_content=flat)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    batch = 500
    interp.resize_tensor_input(inp["index"], [batch] + list(xt.shape[1:]))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    scale, zero = inp["quantization"]
    correct = 0
    for i in range(0, len(xt) - len(xt) % batch, batch):
        xb = xt[i:i + batch]
        if inp["dtype"] != np.float32:
            xb = np.clip(np.round(xb / scale + zero), -128, 127).astype(inp["dtype"])
        interp.set_tensor(inp["index"], xb)
        interp.invoke()
        correct += int(np.sum(np.argmax(interp.get_tensor(out["index"]), -1) == yt[i:i + batch]))
    return correct / (len(xt) - len(xt) % batch)


def run_tfmot(float_model, data, fraction, epochs, lr, batch_size, verbose):
    import tensorflow_model_optimization as tfmot

    (x, y), (xt, yt) = data
    base = keras.models.clone_model(float_model)
    base.set_weights(float_model.get_weights())
    steps = max(epochs, 1) * int(np.ceil(len(x) / batch_size))
    schedule = tfmot.sparsity.keras.ConstantSparsity(fraction, begin_step=0,
                                                     frequency=max(1, min(50, steps // 8)))
    pruned = tfmot.sparsity.keras.prune_low_magnitude(base, pruning_schedule=schedule)
    pruned.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy",
                   metrics=["accuracy"])
    pruned.fit(x, y, epochs=max(epochs, 1), batch_size=batch_size, verbose=verbose,
               callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    stripped.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    keras_acc = float(stripped.evaluate(xt, yt, verbose=0, batch_size=512)[1])
    kernels = [w for l in stripped.layers for w in l.get_weights()[:1] if w.ndim > 1]
    sparsity = float(sum((k == 0).sum() for k in kernels) / sum(k.size for k in kernels))

    def representative():
        for i in range(0, 512, 32):
            yield [x[i:i + 32]]

    conv = tf.lite.TFLiteConverter.from_keras_model(stripped)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = tf.int8
    conv.inference_output_type = tf.int8
    flat = conv.convert()
    gz = gzip.compress(flat, compresslevel=9)
    return {
        "method": f"TFMOT prune {fraction:.0%} + int8 TFLite + gzip",
        "accuracy": tflite_accuracy(flat, xt, yt),
        "keras_accuracy_before_int8": keras_acc,
        "kernel_sparsity": sparsity,
        "tflite_bytes": len(flat),
        "bytes": len(gz),
        "file_bytes": len(gz),
        "epochs": max(epochs, 1),
    }


def run_ours(float_model, data, args, verbose):
    (x, y), (xt, yt) = data
    comp = Compressor(fraction=args.fraction, bits=args.bits, prune_epochs=args.prune_epochs,
                      quant_epochs=args.quant_epochs, per_channel=args.per_channel,
                      learning_rate=args.lr, batch_size=args.batch_size, beta=args.beta,
                      per_layer_terms=not args.shared_terms, verbose=verbose)
    result = comp.run(float_model, (x, y), (xt, yt))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.tfqz")
        file_bytes = result.save(path)
        restored = load_compressed(path)
        restored.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        acc = float(restored.evaluate(xt, yt, verbose=0, batch_size=512)[1])
        identical = all(a.tobytes() == b.tobytes() for a, b in
                        zip(result.model.get_weights(), restored.get_weights()))
    rep = result.report
    return {
        "method": f"tfqreg partial-L2 {args.fraction:.0%} + MSQE {args.bits}-bit + Huffman",
        "accuracy": acc,
        "stage_accuracy": rep.accuracy,
        "bytes": rep.total_bytes,
        "file_bytes": file_bytes,
        "kernel_sparsity": rep.pruned_fraction,
        "coder_overhead": rep.coder_overhead,
        "index_entropy_bytes": rep.index_entropy_bytes,
        "stream_entropy_bytes": rep.stream_entropy_bytes,
        "round_trip_bit_identical": identical,
        "epochs": args.prune_epochs + args.quant_epochs,
        "report": rep.to_dict(),
        "report_text": str(rep),
        "grid_rms_by_kernel": rep.settings.get("grid_rms_by_kernel"),
    }


def table(rows, float_bytes, float_acc) -> str:
    head = ("method", "accuracy", "vs float", "bytes", "ratio", "file B", "file ratio", "matched")
    lines = [head]
    for r in rows:
        lines.append((r["method"], f"{100 * r['accuracy']:.2f}%",
                      f"{100 * (r['accuracy'] - float_acc):+.2f} pt", f"{r['bytes']:,}",
                      f"{float_bytes / r['bytes']:.1f}x", f"{r['file_bytes']:,}",
                      f"{float_bytes / r['file_bytes']:.1f}x",
                      "yes" if r["accuracy"] >= float_acc - TOLERANCE else "no"))
    w = [max(len(l[i]) for l in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(l))
           for l in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse(argv)
    if args.quick:
        args.float_epochs, args.prune_epochs, args.quant_epochs = 1, 1, 1
    common.seed_all(args.seed)
    verbose = common.verbose()
    t0 = time.time()
    data = common.load("fashion_mnist", quick=args.quick)
    if args.float_cache and os.path.exists(args.float_cache):
        float_model = models.small_cnn()
        float_model.load_weights(args.float_cache)
        float_model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        float_acc = float(float_model.evaluate(data[1][0], data[1][1], verbose=0,
                                               batch_size=512)[1])
    else:
        float_model, float_acc = train_float(data, args.float_epochs, args.lr, args.batch_size,
                                             verbose)
        if args.float_cache:
            float_model.save_weights(args.float_cache)
    float_bytes = 4 * float_model.count_params()
    print(f"float32: {100 * float_acc:.2f}% ({float_bytes:,} bytes of parameters)", flush=True)
    timings = {"float": time.time() - t0}
    rows = [{"method": "float32 baseline", "accuracy": float_acc, "bytes": float_bytes,
             "file_bytes": float_bytes}]
    t = time.time()
    ours = run_ours(float_model, data, args, verbose)
    timings["tfqreg"] = time.time() - t
    print(ours["report_text"], flush=True)
    if not args.skip_tfmot:
        t = time.time()
        common.seed_all(args.seed)
        tfmot_row = run_tfmot(float_model, data, args.fraction,
                              args.prune_epochs + args.quant_epochs, args.lr, args.batch_size,
                              verbose)
        timings["tfmot"] = time.time() - t
        rows.append(tfmot_row)
    rows.append(ours)
    text = table(rows, float_bytes, float_acc)
    print("\n" + text)
    summary = {
        "ratio": float_bytes / ours["bytes"],
        "file_ratio": float_bytes / ours["file_bytes"],
        "coder_overhead": ours["coder_overhead"],
        "coder_within_10pct_of_entropy": ours["coder_overhead"] is not None
        and ours["coder_overhead"] <= 0.10,
        "matched_accuracy": ours["accuracy"] >= float_acc - TOLERANCE,
    }
    if not args.skip_tfmot:
        tr = float_bytes / tfmot_row["bytes"]
        summary.update(tfmot_ratio=tr, ratio_vs_tfmot=summary["ratio"] / tr,
                       file_ratio_vs_tfmot=summary["file_ratio"] / tr,
                       tfmot_matched_accuracy=tfmot_row["accuracy"] >= float_acc - TOLERANCE)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    timings["total"] = time.time() - t0
    print(f"time: {timings['total']:.0f} s")
    path = common.write_json("compression_quick.json" if args.quick else "compression.json", {
        "settings": vars(args), "float_accuracy": float_acc, "float32_bytes": float_bytes,
        "rows": rows, "summary": summary, "table": text, "seconds": timings,
        "reference_tfmot": REFERENCE_TFMOT, "tolerance": TOLERANCE,
    })
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
