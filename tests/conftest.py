"""Shared fixtures (after larq's conftest): eager/graph mode and MirroredStrategy on two
virtual CPU devices, so distribution is tested without a GPU."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

import tfqreg  # noqa: E402,F401  (sets TF_USE_LEGACY_KERAS before TF resolves tf.keras)
from tfqreg._keras import keras, tf  # noqa: E402

# Two logical CPUs, configured once before TensorFlow initialises its devices.
_cpus = tf.config.list_physical_devices("CPU")
try:
    tf.config.set_logical_device_configuration(
        _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
    )
except RuntimeError:  # devices already initialised (e.g. another conftest ran first)
    pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.environ.get("TFQREG_DATA_DIR") or os.path.join(
    os.path.dirname(REPO), "shared", "data"
)


@pytest.fixture(autouse=True)
def _seed():
    # Python's `random` too: tf_keras draws its initializers' seeds from it, so without it a
    # test's model would depend on the tests that ran before
    keras.utils.set_random_seed(0)
    yield
    keras.backend.clear_session()


@pytest.fixture(params=["eager", "graph"])
def eager_and_graph_mode(request):
    """Run the test once eagerly and once inside a ``tf.function`` graph context."""
    if request.param == "eager":
        yield request.param
    else:
        with tf.Graph().as_default():
            yield request.param


@pytest.fixture(scope="session")
def distribute_scope():
    """A MirroredStrategy over the two virtual CPU devices, one per test session: two strategy
    objects in one process number their collective ops from the same start and can collide
    ("Shape mismatch in the collective instance 100")."""
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.skip("two logical CPU devices are not available")
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(scope="session")
def data_dir():
    """The folder with the real MNIST / Fashion-MNIST IDX files (``../shared/data``)."""
    if not os.path.isdir(os.path.join(SHARED_DATA, "fashion_mnist")):
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A session-wide tensorflow-datasets data_dir, so each data set is prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def fashion_small(data_dir, tfds_dir):
    """Fashion-MNIST as NumPy: 6,000 training and 2,000 test images (real data, small)."""
    (x, y), (xt, yt) = tfqreg.datasets.load_numpy("fashion_mnist", data_dir, tfds_dir)
    return (x[:6000], y[:6000]), (xt[:2000], yt[:2000])


@pytest.fixture
def subclassed_model():
    """A factory of small subclassed Keras 2 models (no layer graph: cannot be cloned)."""
    from tfqreg._keras import keras

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    return Sub
