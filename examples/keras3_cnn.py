"""Keras 3 end to end: a tfqreg regularizer in a Keras 3 CNN, then PTQ and TFLite export.

The model is plain Keras 3 (``import keras``, TensorFlow backend): a small Conv-BatchNorm-ReLU
CNN whose kernels carry ``kernel_regularizer="linf"`` (tfqreg's L-inf range regularizer,
registered with Keras 3 by ``import tfqreg``; it pulls on the BatchNorm-folded kernel, the one
the device quantizes). It trains on real Fashion-MNIST, is saved as ``.keras`` and reloaded,
and then the reloaded Keras 3 model goes straight into tfqreg:

- ``tfqreg.ptq.sweep``: accuracy at 8..3 weight bits with 8-bit activations, BatchNorm folded
  (Keras 3 models reach PTQ through a verified tf_keras mirror, ``tfqreg.keras3_bridge``);
- ``tfqreg.deploy.to_tflite``: a full-integer int8 file and a 4-bit-weight file (packed INT4
  on tfqreg's grid), each checked in LiteRT (int8 against the Keras 3 model itself, INT4
  against the simulated W4A8 model) and evaluated on the test set in LiteRT.

    python examples/keras3_cnn.py            # 3 epochs, 60k images (minutes on 2 cores)
    python examples/keras3_cnn.py --quick    # 2k images, 1 epoch (smoke test)

Data: $TFQREG_DATA_DIR or ../shared/data. Writes tflite_models/examples/keras3_cnn/:
``keras3_cnn.keras``, ``sweep.json``, ``keras3_cnn_int8.tflite``, ``keras3_cnn_int4.tflite``
(each with its JSON report) and ``summary.json`` (the numbers printed below).
"""
import json
import os

import _setup  # first: parses --quick, loads Fashion-MNIST (imports tfqreg)
import keras  # Keras 3
import numpy as np

from tfqreg import deploy, ptq

args, (x, y), (xt, yt), out = _setup.start("keras3_cnn")
CALIBRATION = x[:deploy.CALIBRATION_SAMPLES]  # the same images calibrate PTQ and the files


def cnn() -> keras.Model:
    L = keras.layers

    def block(h, filters, name):
        h = L.Conv2D(filters, 3, use_bias=False, kernel_regularizer="linf", name=name)(h)
        h = L.BatchNormalization(momentum=0.9, name=f"{name}_bn")(h)
        return L.MaxPooling2D(name=f"{name}_pool")(L.ReLU(name=f"{name}_relu")(h))

    inputs = keras.Input((28, 28, 1), name="image")
    h = block(block(inputs, 16, "conv1"), 32, "conv2")
    h = L.Dropout(0.2, name="dropout")(L.Flatten(name="flatten")(h))
    logits = L.Dense(10, kernel_regularizer="linf", name="logits")(h)
    return keras.Model(inputs, logits, name="keras3_cnn")


keras.utils.set_random_seed(0)
model = cnn()
model.compile(keras.optimizers.Adam(1e-3),
              keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
model.fit(x, y, epochs=1 if args.quick else 3, batch_size=32 if args.quick else 64, verbose=2)

path = os.path.join(out, "keras3_cnn.keras")
model.save(path)
model = keras.models.load_model(path)  # the reloaded Keras 3 model is what tfqreg gets
float_acc = float(np.mean(model.predict(xt, verbose=0).argmax(-1) == yt))
print(f"Keras 3 float32 test accuracy (reloaded from {path}): {float_acc:.4f}")

result = ptq.sweep(model, (xt, yt), weight_bits=(8, 6, 4, 3), activation_bits=8,
                   calibration_data=CALIBRATION, progress=False)
print(f"\n{result}\n")
result.to_json(os.path.join(out, "sweep.json"))

files = {}
for name, bits in (("int8", None), ("int4", 4)):
    res = deploy.to_tflite(model, mode="int8", representative_data=CALIBRATION, sample=xt,
                           weight_bits=bits, path=os.path.join(out, f"keras3_cnn_{name}.tflite"),
                           overwrite=True)
    acc = float(np.mean(deploy.Runner(res, "litert").predict(xt).argmax(-1) == yt))
    files[name] = {"path": res.path, "bytes": len(res.flatbuffer), "test_accuracy": acc,
                   "parity": res.report.parity.to_text(),
                   "weight_bytes": deploy.weight_report(res.flatbuffer).weight_bytes}
    print(f"{name} TFLite test accuracy (LiteRT): {acc:.4f}  [{res.report.parity.to_text()}]")

summary = {"float_accuracy": float_acc, "test_examples": int(len(xt)),
           "sweep": result.to_dict(), "files": files}
with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
print(f"wrote {out}")
