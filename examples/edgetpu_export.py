"""Convert a Keras model to full-integer int8 TFLite for the Coral Edge TPU, with the pre-flight.

Trains the small CNN briefly, converts it with ``tfqreg.export.to_tflite(mode="int8")`` (int8
weights, activations, inputs and outputs; static batch 1; top-1 parity vs Keras checked in
LiteRT), then runs ``tfqreg.edgetpu.check_edgetpu`` on the file: every op, in execution order,
against the Edge TPU's supported-op list and tensor requirements, and where the compiler would
cut the graph. Prints the report as text and writes it as JSON. (``edgetpu_compiler`` itself
runs only when it is on PATH; the report says whether it did.)

    python examples/edgetpu_export.py            # 2 epochs, 60k images
    python examples/edgetpu_export.py --quick    # 2k images, 1 epoch (smoke test)

Data: $TFQREG_DATA_DIR or ../shared/data. Writes tflite_models/examples/edgetpu_export/.
"""
import json
import os

import _setup  # first: parses --quick, loads Fashion-MNIST (imports tfqreg: Keras 2)
from tfqreg import edgetpu, export, models
from tfqreg._keras import keras

args, (x, y), (xt, yt), out = _setup.start("edgetpu_export")

keras.utils.set_random_seed(0)
model = models.small_cnn()
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
model.fit(x, y, epochs=1 if args.quick else 2, batch_size=128, verbose=2)
print(f"Keras float32 test accuracy: {model.evaluate(xt, yt, verbose=0)[1]:.4f}")

res = export.to_tflite(model, mode="int8", representative_data=x[:500], sample=xt[:500],
                       path=os.path.join(out, "small_cnn_int8.tflite"), overwrite=True,
                       min_agreement=0.97)  # int8 vs Keras top-1 (a 1-epoch model has near ties)
print(res.report)  # ops, tensor types, sizes, parity
print(f"int8 TFLite test accuracy (LiteRT): {(res.predict(xt).argmax(-1) == yt).mean():.4f}")

report = edgetpu.check_edgetpu(res.path)
print(report.to_text())
with open(os.path.join(out, "edgetpu_preflight.json"), "w") as f:
    f.write(report.to_json())
summary = {k: v for k, v in report.to_dict().items() if k not in ("ops", "compiler")}
print("JSON (without the per-op list):", json.dumps(summary))
print(f"wrote {res.path} and {os.path.join(out, 'edgetpu_preflight.json')}")
