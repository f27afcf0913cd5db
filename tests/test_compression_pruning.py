"""Magnitude masks and the PruningMask callback: exact fractions, exact zeros after training."""

import numpy as np
import pytest

from tfqreg import models
from tfqreg._keras import keras
from tfqreg.compression import pruning
from tfqreg.compression.fileformat import coded_kernels


def test_masks_prune_the_smallest_magnitudes_at_the_exact_fraction():
    model = models.tiny_cnn()
    masks = pruning.prune_masks(model, 0.8)
    kernels = coded_kernels(model)
    assert set(masks) == set(kernels) == {"conv1/kernel", "conv2/kernel", "fc/kernel"}
    for key, mask in masks.items():
        w = np.abs(kernels[key][1].numpy())
        assert mask.shape == w.shape
        assert mask.size - mask.sum() == round(0.8 * w.size)
        assert w[~mask].max() <= w[mask].min()  # everything pruned is under the threshold
        # the threshold θ_r is the k-th smallest |w| (k = round(r N), the r-th percentile)
        k = int((~mask).sum())
        assert w[~mask].max() == np.partition(w.ravel(), k - 1)[k - 1]
    assert pruning.mask_fraction(masks) == pytest.approx(0.8, abs=1e-3)


def test_per_layer_fractions_and_argument_errors():
    model = models.tiny_cnn()
    masks = pruning.prune_masks(model, {"fc": 0.5})
    assert pruning.mask_fraction({"fc": masks["fc/kernel"]}) == 0.5
    assert masks["conv1/kernel"].all()
    with pytest.raises(ValueError, match="fraction"):
        pruning.prune_masks(model, 1.0)
    with pytest.raises(TypeError, match="fraction"):
        pruning.prune_masks(model, "0.8")
    with pytest.raises(ValueError, match="fraction"):
        pruning.prune_masks(model, {"nope": 0.5})
    with pytest.raises(ValueError, match="masks"):
        pruning.apply_masks(model, {"fc/kernel": np.ones((3, 3), bool)})


class _ZeroChecker(keras.callbacks.Callback):
    """Records, before every batch, whether the pruned weights are exactly zero."""

    def __init__(self, target, masks):
        super().__init__()
        self.target, self.masks, self.ok = target, masks, []

    def on_train_batch_begin(self, batch, logs=None):
        k = coded_kernels(self.target)
        self.ok.append(all(np.all(k[key][1].numpy()[~m] == 0) for key, m in self.masks.items()))


def _train(model, data, callbacks):
    (x, y), _ = data
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    model.fit(x[:512], y[:512], batch_size=64, epochs=2, verbose=0, callbacks=callbacks)


def test_pruned_weights_stay_exactly_zero_through_training(fashion_small):
    model = models.tiny_cnn()
    masks = pruning.prune_masks(model, 0.7)
    pruning.apply_masks(model, masks)
    before = {k: v[1].numpy().copy() for k, v in coded_kernels(model).items()}
    checker = _ZeroChecker(model, masks)
    _train(model, fashion_small, [pruning.PruningMask(masks), checker])
    assert len(checker.ok) == 16 and all(checker.ok)  # every forward pass saw exact zeros
    for key, (_, var, _) in coded_kernels(model).items():
        w = var.numpy()
        assert np.all(w[~masks[key]] == 0) and not np.signbit(w[~masks[key]]).any()
        assert np.mean(w[masks[key]] != before[key][masks[key]]) > 0.5  # kept weights trained


def test_without_the_callback_adam_revives_pruned_weights(fashion_small):
    """The control: masking once is not enough, so the test above can fail."""
    model = models.tiny_cnn()
    masks = pruning.prune_masks(model, 0.7)
    pruning.apply_masks(model, masks)
    _train(model, fashion_small, [])
    w = model.get_layer("fc").kernel.numpy()
    assert np.mean(w[~masks["fc/kernel"]] != 0) > 0.9


def test_callback_masks_the_inner_model_of_a_wrapper(fashion_small):
    inner = models.tiny_cnn()
    masks = pruning.prune_masks(inner, 0.5)

    class Wrapper(keras.Model):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def call(self, x, training=None):
            return self.inner(x, training=training)

    _train(Wrapper(inner), fashion_small, [pruning.PruningMask(masks)])
    assert np.all(inner.get_layer("fc").kernel.numpy()[~masks["fc/kernel"]] == 0)
    cb = pruning.PruningMask.from_config(pruning.PruningMask(masks).get_config())
    assert all(np.array_equal(cb.masks[k], masks[k]) for k in masks)
