"""4-bit quantization-aware training with TFMOT and tfqreg's n-bit configs.

TFMOT's own ``quantize_model`` is 8-bit only. ``tfqreg.quantization.quantize_model(model,
weight_bits=4, activation_bits=8)`` wraps Dense/Conv2D with tfqreg's QuantizeConfigs (4-bit
symmetric per-channel weights, 8-bit asymmetric activations, the same grid as tfqreg's PTQ) and
applies them with TFMOT. The script trains the small CNN in float, prints its accuracy after
post-training quantization to W4A8, fine-tunes it with QAT at W4A8 and prints the QAT accuracy;
then saves the QAT model (.h5) and reloads it under ``quantization.quantize_scope()``.

    python examples/qat_tfmot_nbit.py            # 2 float + 2 QAT epochs, 60k images
    python examples/qat_tfmot_nbit.py --quick    # 2k images, 1 + 1 epochs (smoke test)

Data: $TFQREG_DATA_DIR or ../shared/data. Writes tflite_models/examples/qat_tfmot_nbit/.
"""
import os

import _setup  # first: parses --quick, loads Fashion-MNIST (imports tfqreg: Keras 2)
from tfqreg import models, ptq, quantization
from tfqreg._keras import keras

args, (x, y), (xt, yt), out = _setup.start("qat_tfmot_nbit")
epochs = 1 if args.quick else 2

keras.utils.set_random_seed(0)
model = models.small_cnn()
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
model.fit(x, y, epochs=epochs, batch_size=128, verbose=2)
sweep = ptq.sweep(model, (xt, yt), weight_bits=(4,), activation_bits=8,
                  calibration_data=x[:512], progress=False)
print(f"float32: {sweep.float_accuracy:.4f}   PTQ W4A8: {sweep.accuracy(4, 8):.4f}")

qat = quantization.quantize_model(model, weight_bits=4, activation_bits=8)  # copies weights
qat.compile(keras.optimizers.Adam(1e-4), "sparse_categorical_crossentropy", ["accuracy"])
qat.fit(x, y, epochs=epochs, batch_size=128, verbose=2)
acc = qat.evaluate(xt, yt, verbose=0)[1]
print(f"QAT W4A8 (fake-quantized forward pass): {acc:.4f}")

path = os.path.join(out, "small_cnn_qat_w4a8.h5")  # TFMOT wrappers: .h5 or SavedModel
qat.save(path)
with quantization.quantize_scope():
    again = keras.models.load_model(path)
again.compile(metrics=["accuracy"], loss="sparse_categorical_crossentropy")
print(f"reloaded from {path}: {again.evaluate(xt, yt, verbose=0)[1]:.4f}")
