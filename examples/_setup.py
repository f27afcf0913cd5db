"""What every example does first: parse ``--quick``, load real Fashion-MNIST, make its folder.

Data comes from ``$TFQREG_DATA_DIR`` or ``../shared/data`` beside the repository (see
``tfqreg.datasets``); artifacts go to ``tflite_models/examples/<name>/``.
"""
import argparse
import os

import tfqreg  # first: makes tf.keras Keras 2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def start(name: str, quick_test: int = 1000):
    """``(args, (x, y), (x_test, y_test), out_dir)``; ``--quick`` keeps 2,000 training and
    ``quick_test`` test images."""
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="2k images, 1 epoch (smoke test)")
    args = p.parse_args()
    files = tfqreg.datasets.local_files_dir()
    (x, y), (xt, yt) = tfqreg.datasets.load_numpy("fashion_mnist", files)
    if args.quick:
        (x, y), (xt, yt) = (x[:2000], y[:2000]), (xt[:quick_test], yt[:quick_test])
    out = os.path.join(REPO, "tflite_models", "examples", name)
    os.makedirs(out, exist_ok=True)
    return args, (x, y), (xt, yt), out
