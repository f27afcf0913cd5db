"""tfqreg.models: the reference architectures (shapes, parameter counts against the layer
arithmetic, the regularizer attached to every kernel, BatchNorm folds where documented)."""

import numpy as np
import pytest

import tfqreg  # noqa: F401
from tfqreg import fold, models
from tfqreg import regularizers as R
from tfqreg._keras import keras


def _kernels(model):
    """(layer, kernel, regularizer) of every Conv/Dense/Depthwise kernel."""
    out = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            out.append((layer, layer.depthwise_kernel, layer.depthwise_regularizer))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            out.append((layer, layer.kernel, layer.kernel_regularizer))
    return out


def test_resnet_small_parameter_count_from_the_layer_arithmetic():
    model = models.resnet_small()
    conv = lambda k, cin, cout: k * k * cin * cout  # noqa: E731  (no bias: a BN follows)
    bn = lambda c: 4 * c  # noqa: E731  (γ, β, moving mean, moving variance)
    expected = (conv(3, 1, 16) + bn(16)                                   # stem
                + 2 * (conv(3, 16, 16) + bn(16))                          # block 1
                + conv(3, 16, 32) + conv(3, 32, 32) + 2 * bn(32)          # block 2
                + conv(1, 16, 32) + bn(32)                                # projection
                + 32 * 64 + bn(64)                                        # Dense-BN head
                + 64 * 10 + 10)                                           # softmax Dense
    assert model.count_params() == expected == 22618
    assert model.output_shape == (None, 10)
    assert sum(isinstance(l, keras.layers.Add) for l in model.layers) == 2
    # every BatchNorm folds into the convolution / Dense before it (what the device runs)
    plan = fold.find_folds(model)
    assert len(plan.folds) == 7 and not plan.unfolded


@pytest.mark.parametrize("batchnorm,expected", [(False, 784 * 256 + 256 + 256 * 128 + 128
                                                     + 128 * 10 + 10),
                                                    (True, 784 * 256 + 4 * 256 + 256 * 128
                                                     + 4 * 128 + 128 * 10 + 10)])
def test_mlp_parameter_count(batchnorm, expected):
    model = models.mlp(batchnorm=batchnorm)
    assert model.count_params() == expected
    assert model.output_shape == (None, 10)
    n_bn = sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)
    assert n_bn == (2 if batchnorm else 0)
    assert len(fold.find_folds(model).folds) == n_bn


def test_mlp_widths_and_input_shape():
    model = models.mlp(input_shape=(8, 8, 3), units=(32, 16, 8), num_classes=4)
    assert [l.units for l in model.layers if isinstance(l, keras.layers.Dense)] == [32, 16, 8, 4]
    assert model.input_shape == (None, 8, 8, 3) and model.output_shape == (None, 4)


@pytest.mark.parametrize("build,n_kernels", [(models.resnet_small, 8), (models.mlp, 3),
                                             (lambda **k: models.mlp(batchnorm=True, **k), 3),
                                             (models.small_cnn, 4), (models.ds_cnn, 10)])
def test_regularizer_attached_to_every_kernel_as_a_fresh_copy(build, n_kernels):
    model = build(kernel_regularizer=R.Margin(0.01))
    kernels = _kernels(model)
    assert len(kernels) == n_kernels
    regs = [reg for _, _, reg in kernels]
    assert all(isinstance(r, R.Margin) and r.l == 0.01 for r in regs)
    assert len({id(r) for r in regs}) == n_kernels  # one instance (and one margin) per kernel
    assert len(model.losses) == n_kernels
    assert sum(v.name.endswith("_margin:0") for v in model.trainable_weights) == n_kernels
    # string aliases are passed through
    aliased = build(kernel_regularizer="linf")
    assert all(isinstance(reg, R.LInf) for _, _, reg in _kernels(aliased))
    # and without a regularizer there is none
    assert not build().losses


def test_new_models_train_and_predict_probabilities():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(32, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    for model in (models.resnet_small(kernel_regularizer="soft_min_max"),
                  models.mlp(batchnorm=True, kernel_regularizer="linf")):
        model.compile("adam", "sparse_categorical_crossentropy")
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        p = model.predict(x, verbose=0)
        assert p.shape == (32, 10)
        np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
