"""Benchmark 4: deployment: what the shipped artifacts weigh, how fast they run, how accurate.

Two models, trained here on Fashion-MNIST (or loaded with ``--model`` / ``--bnn-model``):

* ``small_cnn`` (:func:`tfqreg.models.small_cnn`, 225k parameters), exported as float32 TFLite
  and as full-integer int8 TFLite (:func:`tfqreg.micro.to_micro`: the int8 ``.tflite``, checked
  in TensorFlow Lite Micro, with the tensor arena measured by TFLM's recording allocator);
* a larq BNN (``benchmarks/bnn.py``'s network, ``foothill_sign`` on inputs and kernels + the
  Foothill(center=1) regularizer by default, its dense layers written as the equivalent
  convolutions: ``build_bnn(dense_as_conv=True)``), exported as float32 TFLite (binarization
  emulated in float) and with Larq Compute Engine (:func:`tfqreg.export.to_lce`: ``LceBconv2d``
  with bit-packed weights). LCE has no binary fully-connected op (larq/compute-engine#53): the
  row "bnn lce (QuantDense)" converts the same weights in the ``QuantDense`` layout, whose dense
  kernels LCE stores as float32.

For each artifact: file size and gzip -9 size; test accuracy of the artifact itself in its
runtime (LiteRT, LCE's interpreter, TFLite Micro); latency: the median (and 10th/90th
percentile) of ``--runs`` single-image calls (set input, invoke, read output; batch 1, one
thread), after ``--warmup`` calls that are not counted, in LiteRT with the XNNPACK delegate
(``OpResolverType.AUTO``, what apps get) and without it (``BUILTIN_WITHOUT_DEFAULT_DELEGATES``),
in LCE's interpreter with and without its XNNPACK option, and in TFLite Micro's Python
interpreter (reference kernels, host CPU: not an MCU timing).

Caveats written into the JSON: this machine is x86-64, and LCE's optimized binary kernels
are for ARM (on x86 LCE runs its portable kernels), so the LCE latencies here say nothing about a
phone or a Raspberry Pi; the CPU may be shared with other jobs (latency = median of many calls).

    python benchmarks/deployment.py            # full: 2 + 1 epochs on 60k images, 10k test images
    python benchmarks/deployment.py --quick    # smoke: 2k images, 1 epoch, 1k test images

Writes benchmarks/results/deployment[_quick].json; the artifacts go to
tflite_models/benchmarks/deployment[_quick]/.
"""

from __future__ import annotations

import argparse
import gzip
import os
import time
from typing import Dict, List, Optional

import numpy as np

import common  # noqa: F401  (sets up sys.path and Keras 2)
from common import REPO, keras, seed_all, verbose, write_json

import bnn as bnn_benchmark  # noqa: E402  (benchmarks/bnn.py: the BNN and its training)

from tfqreg import export, micro, models  # noqa: E402


def _gzip_bytes(flat: bytes) -> int:
    return len(gzip.compress(flat, 9, mtime=0))


def _percentiles(times: List[float]) -> Dict[str, float]:
    ms = 1e3 * np.asarray(times)
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)), "runs": int(ms.size)}


def _quantize_input(x: np.ndarray, detail: dict) -> np.ndarray:
    scale, zero = detail["quantization"]
    if np.dtype(detail["dtype"]).kind == "f" or not scale:
        return x.astype(detail["dtype"])
    info = np.iinfo(detail["dtype"])
    return np.clip(np.round(x / scale) + zero, info.min, info.max).astype(detail["dtype"])


def litert_latency(flat: bytes, x: np.ndarray, xnnpack: bool, runs: int, warmup: int):
    """Single-image latency in LiteRT (one thread), with or without the XNNPACK delegate."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kind = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    it = Interpreter(model_content=flat, num_threads=1, experimental_op_resolver_type=kind)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    xs = _quantize_input(x, inp)
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        it.set_tensor(inp["index"], xs[i % len(xs)][None])
        it.invoke()
        it.get_tensor(out["index"])
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _percentiles(times)


def lce_latency(flat: bytes, x: np.ndarray, xnnpack: bool, runs: int, warmup: int):
    """Single-image latency in Larq Compute Engine's interpreter (one thread)."""
    from larq_compute_engine.tflite.python.interpreter import Interpreter

    it = Interpreter(flat, num_threads=1, use_xnnpack=xnnpack).interpreter
    times = []
    for i in range(warmup + runs):
        xi = [x[i % len(x)][None].astype(np.float32)]
        t0 = time.perf_counter()
        it.predict(xi)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _percentiles(times)


def micro_latency(flat: bytes, x: np.ndarray, arena: int, runs: int, warmup: int):
    """Single-image latency in TFLite Micro's Python interpreter (host, reference kernels)."""
    from tflite_micro.python.tflite_micro import runtime

    it = runtime.Interpreter.from_bytes(flat, arena_size=arena)
    d = it.get_input_details(0)
    q = d["quantization_parameters"]
    qparams = (float(q["scales"][0]), int(q["zero_points"][0])) if len(q["scales"]) else (0, 0)
    xs = _quantize_input(x, {"dtype": d["dtype"], "quantization": qparams})
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        it.set_input(xs[i % len(xs)][None], 0)
        it.invoke()
        it.get_output(0)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return _percentiles(times)


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(pred).argmax(-1) == y[:len(pred)]).mean())


def _row(name: str, runtime: str, flat: Optional[bytes], acc: float, n_acc: int, **extra):
    return {"artifact": name, "runtime": runtime,
            "bytes": None if flat is None else len(flat),
            "gzip_bytes": None if flat is None else _gzip_bytes(flat),
            "test_accuracy": acc, "accuracy_examples": n_acc, **extra}


def _parity(result) -> Optional[dict]:
    report = getattr(result, "report", None)
    parity = getattr(report, "parity", None)
    return None if parity is None else {
        "samples": parity.samples, "top1_agreement": parity.top1_agreement,
        "max_abs_diff": parity.max_abs_diff, "criterion": parity.criterion}


def _fmt_ms(lat: Optional[dict]) -> str:
    return "-" if not lat else f"{lat['median_ms']:.3f}"


def _table(rows: List[dict]) -> str:
    head = (f"{'artifact':<24}{'runtime':<20}{'size KB':>9}{'gzip KB':>9}{'acc %':>8}"
            f"{'ms XNNPACK':>11}{'ms no-XNN':>10}{'arena B':>9}")
    lines = ["Deployment: size, accuracy of the artifact in its runtime, single-image latency "
             "(median, 1 thread)", head]
    for r in rows:
        kb = lambda b: "-" if b is None else f"{b / 1024:.1f}"  # noqa: E731
        lat = r.get("latency", {})
        arena = r.get("arena_measured")
        lines.append(
            f"{r['artifact']:<24}{r['runtime']:<20}{kb(r['bytes']):>9}{kb(r['gzip_bytes']):>9}"
            f"{100 * r['test_accuracy']:>8.2f}{_fmt_ms(lat.get('xnnpack')):>11}"
            f"{_fmt_ms(lat.get('no_xnnpack') or lat.get('reference')):>10}"
            f"{'-' if arena is None else f'{arena:,}':>9}")
    return "\n".join(lines)


def _train_or_load(path, build, x, y, epochs, batch, lr, label):
    if path:
        print(f"== loading {label} from {path}", flush=True)
        return export.load_model(path), 0.0
    print(f"== training {label} ({epochs} epoch(s), {len(x):,} images)", flush=True)
    model = build()
    t0 = time.perf_counter()
    model.compile(keras.optimizers.Adam(lr), "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=batch, verbose=verbose())
    return model, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default=None, help="a trained small_cnn-like Keras model to use")
    p.add_argument("--bnn-model", default=None, help="a trained larq BNN to use")
    p.add_argument("--epochs", type=int, default=None, help="small_cnn epochs (default 2)")
    p.add_argument("--bnn-epochs", type=int, default=1)
    p.add_argument("--bnn-quantizer", default="foothill_sign", choices=bnn_benchmark.QUANTIZERS)
    p.add_argument("--bnn-strength", type=float, default=bnn_benchmark.DEFAULT_STRENGTH,
                   help="Foothill(center=1) strength on the BNN's latent weights (0: none)")
    p.add_argument("--runs", type=int, default=None, help="timed calls (default 300, quick 30)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls (default 30, quick 5)")
    p.add_argument("--micro-examples", type=int, default=None,
                   help="test images run through TFLite Micro (default 2000, quick 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="fashion_mnist")
    args = p.parse_args(argv)
    quick = args.quick
    epochs = args.epochs or (1 if quick else 2)
    runs, warmup = args.runs or (30 if quick else 300), args.warmup or (5 if quick else 30)
    n_micro = args.micro_examples or (200 if quick else 2000)
    (x, y), (xt, yt) = common.load(args.data, quick=quick)
    out_dir = os.path.join(REPO, "tflite_models", "benchmarks",
                           "deployment_quick" if quick else "deployment")
    os.makedirs(out_dir, exist_ok=True)
    calib, check = x[:500], xt[:300]
    # top-1 agreement of int8 vs Keras required by the converters' parity checks; a model
    # trained on 2k images for one epoch has near-ties that int8 rounding flips
    min_agreement = 0.95 if quick else 0.99
    wall0 = time.perf_counter()
    rows: List[dict] = []

    # --- small_cnn: float32 TFLite, int8 TFLite (+ TFLite Micro) -----------------------------
    seed_all(args.seed)
    cnn, cnn_seconds = _train_or_load(args.model, models.small_cnn, x, y, epochs, 128, 1e-3,
                                      "small_cnn")
    keras_acc = _accuracy(cnn.predict(xt, batch_size=1000, verbose=0), yt)
    params = int(cnn.count_params())
    rows.append(_row("small_cnn keras fp32", "tf_keras", None, keras_acc, len(xt),
                     params=params, float32_param_bytes=4 * params))
    print("== small_cnn: float32 TFLite", flush=True)
    f32 = export.to_tflite(cnn, mode="float", sample=check,
                           path=os.path.join(out_dir, "small_cnn_float32.tflite"), overwrite=True)
    rows.append(_row("small_cnn tflite fp32", "LiteRT", f32.flatbuffer,
                     _accuracy(f32.predict(xt), yt), len(xt), parity=_parity(f32), latency={
                         "xnnpack": litert_latency(f32.flatbuffer, xt, True, runs, warmup),
                         "no_xnnpack": litert_latency(f32.flatbuffer, xt, False, runs, warmup)}))
    print("== small_cnn: int8 TFLite + TFLite Micro", flush=True)
    mic = micro.to_micro(cnn, calib, out_dir, name="small_cnn_int8", sample=check,
                         min_agreement=min_agreement, overwrite=True)
    int8 = mic.flatbuffer
    rows.append(_row("small_cnn tflite int8", "LiteRT", int8,
                     _accuracy(export.Runner(int8, "litert").predict(xt), yt), len(xt),
                     arena_measured=mic.arena_measured, tensor_arena_size=mic.arena_size,
                     parity=_parity(mic), latency={"xnnpack": litert_latency(int8, xt, True, runs, warmup),
                              "no_xnnpack": litert_latency(int8, xt, False, runs, warmup)}))
    k = min(n_micro, len(xt))
    print(f"== small_cnn: int8 in TFLite Micro ({k} test images)", flush=True)
    pred = export.Runner(int8, "micro", arena_size=mic.arena_size).predict(xt[:k])
    rows.append(_row("small_cnn tflite int8", "TFLite Micro (host)", int8, _accuracy(pred, yt),
                     k, arena_measured=mic.arena_measured, tensor_arena_size=mic.arena_size,
                     resolver_methods=mic.resolver_methods, latency={
                         "reference": micro_latency(int8, xt, mic.arena_size,
                                                    max(10, runs // 3), min(warmup, 10))}))

    # --- larq BNN: float32 TFLite and LCE ------------------------------------------------------
    seed_all(args.seed)
    strength = args.bnn_strength or None
    bnn, bnn_seconds = _train_or_load(
        args.bnn_model, lambda: bnn_benchmark.build_bnn(args.bnn_quantizer, strength,
                                                        dense_as_conv=True), x, y,
        args.bnn_epochs, 128, 1e-3, f"larq BNN ({args.bnn_quantizer})")
    bnn_keras = _accuracy(bnn.predict(xt, batch_size=1000, verbose=0), yt)
    bparams = int(bnn.count_params())
    rows.append(_row("bnn keras (binarized)", "tf_keras", None, bnn_keras, len(xt),
                     params=bparams, float32_param_bytes=4 * bparams))
    print("== BNN: float32 TFLite", flush=True)
    bf32 = export.to_tflite(bnn, mode="float", sample=check, atol=1e-3,
                            path=os.path.join(out_dir, "bnn_float32.tflite"), overwrite=True)
    rows.append(_row("bnn tflite fp32", "LiteRT", bf32.flatbuffer,
                     _accuracy(bf32.predict(xt), yt), len(xt), parity=_parity(bf32), latency={
                         "xnnpack": litert_latency(bf32.flatbuffer, xt, True, runs, warmup),
                         "no_xnnpack": litert_latency(bf32.flatbuffer, xt, False, runs, warmup)}))
    variants = [("bnn lce", bnn)]
    if not args.bnn_model:  # the same weights in the QuantDense layout: what LCE does with it
        dense = bnn_benchmark.build_bnn(args.bnn_quantizer, strength, name="bnn_dense")
        variants.append(("bnn lce (QuantDense)", bnn_benchmark.copy_weights(bnn, dense)))
    for label, model in variants:
        print(f"== BNN: Larq Compute Engine, {label}", flush=True)
        fname = label.replace(" ", "_").replace("(", "").replace(")", "").lower()
        lce = export.to_lce(model, sample=check, path=os.path.join(out_dir, f"{fname}.tflite"),
                            overwrite=True)
        rows.append(_row(label, "LCE interpreter", lce.flatbuffer,
                         _accuracy(lce.predict(xt), yt), len(xt), parity=_parity(lce),
                         op_counts=lce.report.op_counts,
                         lce_bconv2d=lce.report.extra["lce_bconv2d"],
                         binary_conv_layers=lce.report.extra["binary_conv_layers"], latency={
                             "xnnpack": lce_latency(lce.flatbuffer, xt, True, runs, warmup),
                             "no_xnnpack": lce_latency(lce.flatbuffer, xt, False, runs, warmup)}))

    text = _table(rows)
    suffix = "_quick" if quick else ""
    path = write_json(f"deployment{suffix}.json", {
        "benchmark": "deployment", "data": args.data, "quick": quick,
        "train_examples": len(x), "test_examples": len(xt),
        "small_cnn": {"source": args.model or "trained here", "epochs": epochs,
                      "optimizer": "Adam(1e-3)", "train_seconds": cnn_seconds},
        "bnn": {"source": args.bnn_model or "trained here", "epochs": args.bnn_epochs,
                "quantizer": args.bnn_quantizer, "foothill_strength": strength,
                "optimizer": "Adam(1e-3)", "train_seconds": bnn_seconds},
        "latency_protocol": {"runs": runs, "warmup": warmup, "threads": 1, "batch": 1,
                             "call": "set input + invoke + read output",
                             "xnnpack": "LiteRT OpResolverType.AUTO (default delegates) vs "
                                        "BUILTIN_WITHOUT_DEFAULT_DELEGATES; LCE use_xnnpack",
                             "micro": "TFLite Micro Python interpreter on the host, reference "
                                      "kernels, fewer runs"},
        "notes": ["x86-64 host: LCE's optimized binary kernels target ARM (aarch64/armv7); on "
                  "x86 it runs portable kernels, so LCE latencies here do not predict a phone "
                  "or Raspberry Pi.",
                  "TFLite Micro latency is its Python interpreter on the host, not an MCU.",
                  "The CPU may have been shared with other jobs while this ran."],
        "rows": rows, "wall_seconds": time.perf_counter() - wall0, "table": text})
    print(text)
    print(f"wrote {path} and artifacts in {out_dir}")
    return rows


if __name__ == "__main__":
    main()
