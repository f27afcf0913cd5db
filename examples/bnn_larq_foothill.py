"""A binary network trained with Larq and tfqreg's Foothill quantizer, shipped with LCE.

Every binarized kernel and activation uses ``"foothill_sign"`` (forward: sign; backward: the
Foothill second derivative, i.e. the SignSwish derivative), and the latent (real) weights carry
``tfqreg.regularizers.Foothill(center=1.0)``, which pulls them toward +-1. The first layer keeps
its real input, as is customary. Prints ``larq.models.summary`` (1-bit weights counted as such),
the test accuracy, and converts the model with Larq Compute Engine (``tfqreg.export.to_lce``:
LceBconv2d ops, bit-packed weights, checked in LCE's interpreter). LCE has no binary dense op,
so the classifier head is written as convolutions (a 5x5 conv over the 5x5 map = a dense layer).

    python examples/bnn_larq_foothill.py            # 3 epochs, 60k images
    python examples/bnn_larq_foothill.py --quick    # 2k images, 1 epoch (smoke test)

Data: $TFQREG_DATA_DIR or ../shared/data. Writes tflite_models/examples/bnn_larq_foothill/.
"""
import os

import _setup  # first: parses --quick, loads Fashion-MNIST (imports tfqreg: Keras 2)
import tfqreg.quantizers  # noqa: F401  (registers "foothill_sign")
import larq as lq  # noqa: E402  (after tfqreg)
from tfqreg import export, regularizers
from tfqreg._keras import keras

args, (x, y), (xt, yt), out = _setup.start("bnn_larq_foothill")

keras.utils.set_random_seed(0)
binary = dict(kernel_quantizer="foothill_sign", kernel_constraint="weight_clip", use_bias=False,
              kernel_regularizer=regularizers.Foothill(l=1e-5, center=1.0))
L = keras.layers
model = keras.Sequential([  # dense layers written as convolutions: LCE bit-packs only convs
    L.InputLayer((28, 28, 1)),
    lq.layers.QuantConv2D(32, 3, **binary), L.MaxPooling2D(), L.BatchNormalization(scale=False),
    lq.layers.QuantConv2D(64, 3, input_quantizer="foothill_sign", **binary), L.MaxPooling2D(),
    L.BatchNormalization(scale=False),  # 5x5x64 -> the "dense" layers:
    lq.layers.QuantConv2D(64, 5, input_quantizer="foothill_sign", **binary),
    L.BatchNormalization(scale=False),
    lq.layers.QuantConv2D(10, 1, input_quantizer="foothill_sign", **binary),
    L.BatchNormalization(scale=False), L.Flatten(), L.Activation("softmax")], name="bnn_foothill")
lq.models.summary(model)

model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
model.fit(x, y, epochs=1 if args.quick else 3, batch_size=128, verbose=2)
print(f"Keras test accuracy: {model.evaluate(xt, yt, verbose=0)[1]:.4f}")

model.save(os.path.join(out, "bnn_foothill.keras"))
lce = export.to_lce(model, sample=xt[:500], path=os.path.join(out, "bnn_foothill_lce.tflite"),
                    overwrite=True)
print(lce.report)  # ops (LceBconv2d ...), sizes, parity vs Keras in LCE's interpreter
acc = (lce.predict(xt).argmax(-1) == yt).mean()
print(f"LCE .tflite: {len(lce.flatbuffer):,} bytes, test accuracy in LCE's interpreter {acc:.4f}")
