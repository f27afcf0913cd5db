"""Reference models used by the examples, benchmarks and tests.

``small_cnn`` is the benchmark CNN of the README (2 conv + 2 dense, 225,034 parameters for
28×28×1 inputs). ``ds_cnn`` is the BatchNorm benchmark model: a MobileNet-style
depthwise-separable CNN with BatchNorm and ReLU6 after every convolution, the layout of TinyML
keyword-spotting and visual-wake-word models. ``resnet_small`` (two residual blocks with
BatchNorm, a Dense-BatchNorm head) and ``mlp`` (Dense layers, optionally with BatchNorm) are the
architectures of the defaults-transfer benchmark that the regularizer defaults were not tuned on.

>>> from tfqreg import models
>>> models.small_cnn().count_params()
225034
>>> models.ds_cnn().count_params()
69258
>>> models.resnet_small().count_params()
22618
>>> models.mlp().count_params()
235146
"""

from __future__ import annotations

from typing import Optional

from tfqreg._keras import keras

__all__ = ["small_cnn", "ds_cnn", "resnet_small", "mlp", "tiny_cnn", "bnn"]


def small_cnn(
    kernel_regularizer=None,
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    name: Optional[str] = "small_cnn",
) -> keras.Model:
    """Conv(32,3)-Pool-Conv(64,3)-Pool-Dense(128)-Dense(10) with ReLU, softmax output.

    Args:
        kernel_regularizer: passed to every Conv2D/Dense kernel (an instance, a string alias
            or ``None``). A fresh copy is made per layer, so learnable regularizers get their own
            state per layer.
    """
    def reg():
        if kernel_regularizer is None or isinstance(kernel_regularizer, str):
            return kernel_regularizer
        return kernel_regularizer.__class__.from_config(kernel_regularizer.get_config())

    return keras.Sequential(
        [
            keras.layers.InputLayer(input_shape=input_shape),
            keras.layers.Conv2D(32, 3, activation="relu", kernel_regularizer=reg(), name="conv1"),
            keras.layers.MaxPooling2D(name="pool1"),
            keras.layers.Conv2D(64, 3, activation="relu", kernel_regularizer=reg(), name="conv2"),
            keras.layers.MaxPooling2D(name="pool2"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", kernel_regularizer=reg(), name="fc1"),
            keras.layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg(),
                               name="fc2"),
        ],
        name=name,
    )


def ds_cnn(
    kernel_regularizer=None,
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    filters=(32, 64, 128, 128, 256),
    name: Optional[str] = "ds_cnn",
) -> keras.Model:
    """MobileNet-style: a 3×3 stride-2 stem conv, then depthwise 3×3 + pointwise 1×1 blocks
    (strides 1, 2, 1, 2 for the default four), each convolution without bias and followed by
    BatchNorm and ReLU6; global average pooling; a softmax Dense. 67,338 trainable parameters
    with the default ``filters`` (69,258 with the BatchNorm statistics) for 28×28×1 inputs.

    The TFLite converter folds each BatchNorm into the convolution before it
    (:mod:`tfqreg.fold`), which is what makes per-tensor quantization of this model differ from
    quantizing its raw kernels.

    Args:
        kernel_regularizer: passed to every convolution and the Dense kernel (a fresh copy per
            layer; depthwise kernels get it as ``depthwise_regularizer``).
        filters: the stem's width, then one pointwise width per block.
    """
    def reg():
        if kernel_regularizer is None or isinstance(kernel_regularizer, str):
            return kernel_regularizer
        return kernel_regularizer.__class__.from_config(kernel_regularizer.get_config())

    def bn_relu6(h, tag):
        h = keras.layers.BatchNormalization(name=f"bn_{tag}")(h)
        return keras.layers.ReLU(6.0, name=f"relu_{tag}")(h)

    inputs = keras.Input(input_shape, name="image")
    h = keras.layers.Conv2D(filters[0], 3, strides=2, padding="same", use_bias=False,
                            kernel_regularizer=reg(), name="stem")(inputs)
    h = bn_relu6(h, "stem")
    strides = [1, 2, 1, 2, 2, 1][: len(filters) - 1]
    for i, (width, stride) in enumerate(zip(filters[1:], strides), start=1):
        h = keras.layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False,
                                         depthwise_regularizer=reg(), name=f"dw{i}")(h)
        h = bn_relu6(h, f"dw{i}")
        h = keras.layers.Conv2D(width, 1, use_bias=False, kernel_regularizer=reg(),
                                name=f"pw{i}")(h)
        h = bn_relu6(h, f"pw{i}")
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = keras.layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg(),
                                 name="fc")(h)
    return keras.Model(inputs, outputs, name=name)


def _fresh(kernel_regularizer):
    """A fresh copy of ``kernel_regularizer`` (per layer, so learnable regularizers get their
    own state), or the string alias / ``None`` as given."""
    if kernel_regularizer is None or isinstance(kernel_regularizer, str):
        return kernel_regularizer
    return kernel_regularizer.__class__.from_config(kernel_regularizer.get_config())


def resnet_small(
    kernel_regularizer=None,
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    filters=(16, 32),
    head_units: int = 64,
    name: Optional[str] = "resnet_small",
) -> keras.Model:
    """A small residual network with BatchNorm: a 3×3 stride-2 stem conv; two residual blocks
    (3×3 conv-BN-ReLU, 3×3 conv-BN, add the shortcut, ReLU), the second with stride 2 and a
    1×1 conv-BN projection shortcut; global average pooling; a Dense-BatchNorm-ReLU head and a
    softmax Dense. Every convolution and the head Dense have no bias (a BatchNorm follows and
    folds into them, :mod:`tfqreg.fold`). 22,202 trainable parameters (22,618 with the
    BatchNorm statistics) with the defaults for 28×28×1 inputs.

    Args:
        kernel_regularizer: passed to every Conv2D/Dense kernel (an instance, a string alias
            or ``None``; a fresh copy per layer).
        input_shape: the input's shape without the batch axis.
        num_classes: width of the softmax output.
        filters: the widths of the stem + first block and of the second block.
        head_units: width of the Dense-BatchNorm head.
        name: the model's name.
    """
    def conv(h, width, size, stride, tag):
        return keras.layers.Conv2D(width, size, strides=stride, padding="same", use_bias=False,
                                   kernel_regularizer=_fresh(kernel_regularizer),
                                   name=f"conv_{tag}")(h)

    def bn(h, tag):
        return keras.layers.BatchNormalization(name=f"bn_{tag}")(h)

    def relu(h, tag):
        return keras.layers.ReLU(name=f"relu_{tag}")(h)

    def block(h, width, stride, tag):
        shortcut = h
        y = relu(bn(conv(h, width, 3, stride, f"{tag}a"), f"{tag}a"), f"{tag}a")
        y = bn(conv(y, width, 3, 1, f"{tag}b"), f"{tag}b")
        if stride != 1 or h.shape[-1] != width:
            shortcut = bn(conv(h, width, 1, stride, f"{tag}proj"), f"{tag}proj")
        return relu(keras.layers.Add(name=f"add_{tag}")([y, shortcut]), f"{tag}out")

    inputs = keras.Input(input_shape, name="image")
    h = relu(bn(conv(inputs, filters[0], 3, 2, "stem"), "stem"), "stem")
    h = block(h, filters[0], 1, "block1")
    h = block(h, filters[1], 2, "block2")
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    h = keras.layers.Dense(head_units, use_bias=False,
                           kernel_regularizer=_fresh(kernel_regularizer), name="fc1")(h)
    h = relu(bn(h, "fc1"), "fc1")
    outputs = keras.layers.Dense(num_classes, activation="softmax",
                                 kernel_regularizer=_fresh(kernel_regularizer), name="fc2")(h)
    return keras.Model(inputs, outputs, name=name)


def mlp(
    kernel_regularizer=None,
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    units=(256, 128),
    batchnorm: bool = False,
    name: Optional[str] = "mlp",
) -> keras.Model:
    """A multilayer perceptron: Flatten, one Dense-ReLU per entry of ``units`` (with
    ``batchnorm=True`` each is Dense without bias-BatchNorm-ReLU, the BatchNorm folding into the
    Dense), then a softmax Dense. 235,146 parameters with the defaults for 28×28×1 inputs
    (236,298 with ``batchnorm=True``, of which 768 are BatchNorm statistics).

    Args:
        kernel_regularizer: passed to every Dense kernel (an instance, a string alias or
            ``None``; a fresh copy per layer).
        input_shape: the input's shape without the batch axis.
        num_classes: width of the softmax output.
        units: the hidden layers' widths.
        batchnorm: put a BatchNormalization after each hidden Dense.
        name: the model's name.
    """
    layers = [keras.layers.InputLayer(input_shape=input_shape), keras.layers.Flatten(name="flatten")]
    for i, width in enumerate(units, start=1):
        layers.append(keras.layers.Dense(
            width, activation=None if batchnorm else "relu", use_bias=not batchnorm,
            kernel_regularizer=_fresh(kernel_regularizer), name=f"fc{i}"))
        if batchnorm:
            layers += [keras.layers.BatchNormalization(name=f"bn{i}"),
                       keras.layers.ReLU(name=f"relu{i}")]
    layers.append(keras.layers.Dense(num_classes, activation="softmax",
                                     kernel_regularizer=_fresh(kernel_regularizer),
                                     name=f"fc{len(units) + 1}"))
    return keras.Sequential(layers, name=name)


def tiny_cnn(kernel_regularizer=None, input_shape=(28, 28, 1), num_classes: int = 10,
             name: Optional[str] = "tiny_cnn") -> keras.Model:
    """A few-thousand-parameter CNN for fast tests: Conv(8,3,stride 2)-Conv(16,3,stride 2)-
    GlobalAveragePooling-Dense(10)."""
    def reg():
        if kernel_regularizer is None or isinstance(kernel_regularizer, str):
            return kernel_regularizer
        return kernel_regularizer.__class__.from_config(kernel_regularizer.get_config())

    return keras.Sequential(
        [
            keras.layers.InputLayer(input_shape=input_shape),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_regularizer=reg(),
                                name="conv1"),
            keras.layers.Conv2D(16, 3, strides=2, activation="relu", kernel_regularizer=reg(),
                                name="conv2"),
            keras.layers.GlobalAveragePooling2D(name="gap"),
            keras.layers.Dense(num_classes, activation="softmax", kernel_regularizer=reg(),
                               name="fc"),
        ],
        name=name,
    )


def bnn(input_quantizer="ste_sign", kernel_quantizer="ste_sign", input_shape=(28, 28, 1),
        num_classes: int = 10, filters=(16, 32), name: Optional[str] = "bnn") -> keras.Model:
    """A small larq binary network: QuantConv-BN-Pool ×2, QuantDense, BN, softmax.

    The first layer binarizes only its kernel (its input is the real image, as in larq's
    examples); later layers binarize inputs and kernels. Kernels are clipped to [-1, 1]
    (``kernel_constraint="weight_clip"``) so that the latent weights keep a gradient.

    Args:
        input_quantizer: larq quantizer (name or instance) for the inputs of layers 2..n, e.g.
            ``"ste_sign"`` or ``"foothill_sign"`` (after ``import tfqreg.quantizers``).
        kernel_quantizer: larq quantizer (name or instance) for every kernel.
        filters: the two convolutions' widths.
    """
    from tfqreg._keras import require_larq

    lq = require_larq("tfqreg.models.bnn")

    def fresh(q):
        if q is None or isinstance(q, str):
            return q
        return q.__class__.from_config(q.get_config())

    common = dict(kernel_quantizer=None, kernel_constraint="weight_clip", use_bias=False)

    def quant(**kw):
        return {**common, **kw, "kernel_quantizer": fresh(kernel_quantizer)}

    return keras.Sequential(
        [
            keras.layers.InputLayer(input_shape=input_shape),
            lq.layers.QuantConv2D(filters[0], 3, name="qconv1", **quant()),
            keras.layers.BatchNormalization(scale=False, name="bn1"),
            keras.layers.MaxPooling2D(name="pool1"),
            lq.layers.QuantConv2D(filters[1], 3, name="qconv2",
                                  **quant(input_quantizer=fresh(input_quantizer))),
            keras.layers.BatchNormalization(scale=False, name="bn2"),
            keras.layers.MaxPooling2D(name="pool2"),
            keras.layers.Flatten(name="flatten"),
            lq.layers.QuantDense(num_classes, name="qfc",
                                 **quant(input_quantizer=fresh(input_quantizer))),
            keras.layers.BatchNormalization(scale=False, name="bn3"),
            keras.layers.Activation("softmax", name="softmax"),
        ],
        name=name,
    )
