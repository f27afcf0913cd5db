"""Export a Keras model to a microcontroller (TensorFlow Lite Micro): C array + measured arena.

Trains the small CNN (``tfqreg.models.small_cnn``, 225k parameters: ~230 KB of int8 flash)
briefly and calls
``tfqreg.micro.to_micro``: full-integer int8 conversion (batch 1), a check that TFLite Micro's
interpreter gives the same int8 outputs as LiteRT, the tensor arena measured by TFLite Micro's
recording allocator (plus a margin), and ``<name>_model_data.cc/.h`` holding the model as an
aligned byte array, ``kTensorArenaSize`` and the ops to register in a
``tflite::MicroMutableOpResolver``. Prints the result, the resolver list, and the test accuracy
of the int8 model run in TFLite Micro's interpreter.

    python examples/micro_export.py            # 2 epochs, 60k images
    python examples/micro_export.py --quick    # 2k images, 1 epoch (smoke test)

Data: $TFQREG_DATA_DIR or ../shared/data. Writes tflite_models/examples/micro_export/.
"""

import _setup  # first: parses --quick, loads Fashion-MNIST (imports tfqreg: Keras 2)
from tfqreg import export, micro, models
from tfqreg._keras import keras

args, (x, y), (xt, yt), out = _setup.start("micro_export", quick_test=300)

keras.utils.set_random_seed(0)
model = models.small_cnn()
model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", ["accuracy"])
model.fit(x, y, epochs=1 if args.quick else 2, batch_size=128, verbose=2)
print(f"Keras float32 test accuracy: {model.evaluate(xt, yt, verbose=0)[1]:.4f}")

m = micro.to_micro(model, x[:500], out, name="fmnist_cnn", sample=xt[:200], overwrite=True,
                   min_agreement=0.97)  # int8 vs Keras top-1 (a 1-epoch model has near ties)
print(m)  # conversion report, Micro vs LiteRT, arena, resolver, files
print("\nregister these ops:")
print(f"  static tflite::MicroMutableOpResolver<{len(m.resolver_methods)}> resolver;")
for method in m.resolver_methods:
    print(f"  resolver.{method}();")
print(f"  constexpr int kTensorArenaSize = {m.arena_size};  // measured {m.arena_measured} B")

n = len(xt) if len(xt) <= 2000 else 2000  # TFLite Micro's Python interpreter: 1 image a call
pred = export.Runner(m.flatbuffer, "micro", arena_size=m.arena_size).predict(xt[:n])
print(f"int8 model in TFLite Micro, {n} test images: accuracy "
      f"{(pred.argmax(-1) == yt[:n]).mean():.4f}")
