"""A tfqreg regularizer in ordinary Keras layers, and what it buys after quantization.

Trains one small CNN twice on Fashion-MNIST: plain, and with the L-inf range regularizer
``kernel_regularizer=tfqreg.regularizers.LInf()`` (alias ``"linf"``; any tfqreg regularizer,
e.g. ``"soft_min_max"``, goes in the same place) on every Conv2D/Dense kernel. Then it
post-training quantizes both at 8..2 weight bits (one step per tensor, 8-bit activations) with
``tfqreg.ptq.sweep`` and prints both tables: the regularized model keeps its accuracy at 2-3 bits.

    python examples/regularizer_keras.py            # 2 epochs, 60k images (minutes on 2 cores)
    python examples/regularizer_keras.py --quick    # 2k images, 1 epoch (smoke test)

Data: $TFQREG_DATA_DIR or ../shared/data. Writes tflite_models/examples/regularizer_keras/.
"""
import os

import _setup  # first: parses --quick, loads Fashion-MNIST (imports tfqreg: Keras 2)
from tfqreg import ptq, regularizers
from tfqreg._keras import keras

args, (x, y), (xt, yt), out = _setup.start("regularizer_keras")


def cnn(reg, name):  # plain Keras layers; `reg` is any Keras kernel_regularizer
    L = keras.layers
    return keras.Sequential([
        L.InputLayer((28, 28, 1)),
        L.Conv2D(32, 3, activation="relu", kernel_regularizer=reg), L.MaxPooling2D(),
        L.Conv2D(64, 3, activation="relu", kernel_regularizer=reg), L.MaxPooling2D(),
        L.Flatten(), L.Dense(128, activation="relu", kernel_regularizer=reg),
        L.Dense(10, activation="softmax", kernel_regularizer=reg)], name=name)


for name, reg in [("plain", None), ("linf", regularizers.LInf())]:
    keras.utils.set_random_seed(0)
    model = cnn(reg, name)
    model.compile("adam", "sparse_categorical_crossentropy", ["accuracy"])
    model.fit(x, y, epochs=1 if args.quick else 2, batch_size=128, verbose=2)
    model.save(os.path.join(out, f"{name}.keras"))  # reloads with keras.models.load_model
    result = ptq.sweep(model, (xt, yt), weight_bits=(8, 6, 4, 3, 2), activation_bits=8,
                       per_channel=False, calibration_data=x[:512], progress=False)
    print(f"\n== {name} ==\n{result}\n")
    result.to_json(os.path.join(out, f"{name}_sweep.json"))
    result.plot(os.path.join(out, f"{name}_sweep.png"), title=f"{name}: per-tensor PTQ")
print(f"wrote {out}")
