"""The whole pipeline on a tiny model: masks held, weights on the learned grid, bit-identical
round trip through .tfqz, consistent report; the CLI end to end."""

import argparse
import json
import os

import numpy as np
import pytest

from tfqreg import compression, grid, models, training
from tfqreg._keras import keras
from tfqreg.compression import pipeline
from tfqreg.compression.fileformat import coded_kernels


def _trained_tiny(data, steps=40):
    (x, y), _ = data
    model = models.tiny_cnn()
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(x[:steps * 64], y[:steps * 64], batch_size=64, epochs=1, verbose=0)
    return model


@pytest.fixture(scope="module")
def result(fashion_small, tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = _trained_tiny(fashion_small)
    before = [w.copy() for w in model.get_weights()]
    (x, y), (xt, yt) = fashion_small
    comp = compression.Compressor(fraction=0.6, bits=4, prune_epochs=1, quant_epochs=2,
                                  batch_size=64, steps_per_epoch=15, verbose=0)
    res = comp.run(model, (x, y), (xt[:500], yt[:500]))
    path = tmp_path_factory.mktemp("pipe") / "m.tfqz"
    res.save(path)
    return model, before, res, path, (xt[:500], yt[:500])


@pytest.mark.slow
def test_input_model_is_left_untouched(result):
    model, before, *_ = result
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), before))


@pytest.mark.slow
def test_pruned_weights_are_exactly_zero_and_masks_have_the_fraction(result):
    _, _, res, _, _ = result
    kernels = coded_kernels(res.model)
    assert set(res.masks) == set(kernels)
    for key, mask in res.masks.items():
        w = kernels[key][1].numpy()
        assert mask.size - mask.sum() == round(0.6 * mask.size)
        assert np.all(w[~mask] == 0) and not np.signbit(w[~mask]).any()


@pytest.mark.slow
def test_kernels_sit_on_the_learned_grid(result):
    _, _, res, _, _ = result
    for key, (_, var, _) in coded_kernels(res.model).items():
        step = res.steps[key]
        assert step.dtype == np.float32 and step.shape == ()
        w = var.numpy()
        k = np.round(w / step)
        assert np.all(np.abs(k) <= 8)
        np.testing.assert_array_equal(w, step * k.astype(np.float32))  # exactly δ·index
    assert res.history["msqe"]["grid_rms_final"] < 0.29  # closer than uniform spread
    assert len(res.history["msqe"]["grid_rms"]) == 2
    # one learnable term per layer: its metrics are logged per term
    for name in ("msqe", "exp_alpha", "delta"):
        assert sum(k.endswith(name) for k in res.history["msqe"]) == 3
    assert sum(k.endswith("partial_l2") for k in res.history["partial_l2"]) == 3
    assert set(res.history["msqe"]["grid_rms_by_kernel"]) == {
        "conv1/kernel:0", "conv2/kernel:0", "fc/kernel:0"}


@pytest.mark.slow
def test_tfqz_round_trip_is_bit_identical(result):
    _, _, res, path, (xt, _) = result
    restored = compression.load_compressed(path)
    for a, b in zip(res.model.get_weights(), restored.get_weights()):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
    p1 = res.model.predict(xt[:64], verbose=0)
    p2 = restored.predict(xt[:64], verbose=0)
    assert p1.tobytes() == p2.tobytes()
    assert os.path.getsize(path) == res.report.file_bytes


@pytest.mark.slow
def test_report_numbers_are_consistent(result):
    _, _, res, path, (xt, yt) = result
    rep = res.report
    assert rep.float32_bytes == 4 * res.model.count_params()
    parts = rep.coded_bytes + rep.table_bytes + rep.index_bytes + rep.float_bytes + rep.step_bytes
    assert rep.total_bytes == parts
    assert rep.ratio == pytest.approx(rep.float32_bytes / parts)
    assert rep.step_bytes == 4 * 3  # one float32 step per kernel
    assert rep.float_bytes == 4 * (8 + 16 + 10)  # the biases
    assert rep.pruned_fraction >= 0.6 - 1e-3
    # accuracies by stage; decoding does not change the quantized model's accuracy
    for stage in ("input", "partial_l2", "pruned", "msqe", "quantized", "decoded"):
        assert 0.0 <= rep.accuracy[stage] <= 1.0
    assert rep.accuracy["decoded"] == rep.accuracy["quantized"]
    preds = np.argmax(res.model.predict(xt, verbose=0), -1)
    assert rep.accuracy["quantized"] == pytest.approx(np.mean(preds == yt), abs=1e-6)
    stored = compression.inspect_compressed(path)
    assert stored.accuracy == rep.accuracy
    assert stored.settings["fraction"] == 0.6 and stored.settings["bits"] == 4
    # the coder sits within the entropy bound: at least the stream entropy, not far above
    assert rep.coded_bytes + rep.index_bytes >= rep.stream_entropy_bytes - len(rep.layers)
    for layer in rep.layers:
        if layer.bits:
            assert layer.coded_bytes + layer.index_bytes <= 1.3 * layer.stream_entropy_bytes + 3


def test_learned_steps_are_the_terms_steps_and_alpha_starts_at_equilibrium(fashion_small):
    model = _trained_tiny(fashion_small, steps=5)
    term = training.LearnableMSQE(bits=3)
    training.TrainingModel(model, terms=[term])
    comp = compression.Compressor(bits=3, beta=2.0, verbose=0)
    comp._start_alpha([term])
    r = float(term.regularizer_value()[0])
    assert float(np.exp(term.alpha.numpy())) * r == pytest.approx(2.0, rel=1e-4)
    steps = pipeline.learned_steps(term, model)
    assert set(steps) == {"conv1/kernel", "conv2/kernel", "fc/kernel"}
    for key, (_, var, _) in coded_kernels(model).items():
        expected = np.abs(var.numpy()).max() / 3  # δ initialised to the default step
        assert steps[key] == pytest.approx(expected, rel=1e-5)


def test_grid_monitor_measures_distance_in_steps():
    model = models.tiny_cnn()
    term = training.LearnableMSQE(bits=4, learn_step=True)
    training.TrainingModel(model, terms=[term])
    rng = np.random.default_rng(0)
    for (_, kernel), step in zip(term.targets, term.steps()):
        s = float(step.numpy())
        k = rng.integers(-6, 7, size=kernel.shape).astype(np.float32)
        kernel.assign(s * k + 0.25 * s)  # a quarter step off the grid everywhere
    monitor = pipeline._GridMonitor(term, {})
    assert monitor.grid_rms() == pytest.approx(0.25, rel=1e-3)


def test_compressor_argument_errors():
    with pytest.raises(ValueError, match="fraction"):
        compression.Compressor(fraction=1.5)
    with pytest.raises(ValueError, match="bits"):
        compression.Compressor(bits=1)
    with pytest.raises(ValueError, match="quant_epochs"):
        compression.Compressor(quant_epochs=-1)
    with pytest.raises(ValueError, match="alpha_init"):
        compression.Compressor(alpha_init="big")
    with pytest.raises(ValueError, match="mode"):
        compression.Compressor(mode="zip")
    with pytest.raises(TypeError, match="train"):
        compression.Compressor().run(models.tiny_cnn(), "data")
    config = compression.Compressor(fraction={"fc": 0.5}, bits=3).get_config()
    assert compression.Compressor.from_config(config).get_config() == config


@pytest.mark.slow
def test_cli_compress_end_to_end(tmp_path, data_dir, tfds_dir, fashion_small):
    model = _trained_tiny(fashion_small, steps=10)
    saved = tmp_path / "tiny.keras"
    model.save(saved)
    parser = argparse.ArgumentParser()
    compression.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args([str(saved), "--prune", "0.5", "--bits", "3", "--data",
                              "fashion_mnist", "--out", str(out), "--epochs", "1",
                              "--train-limit", "640", "--test-limit", "300", "--data-dir",
                              data_dir, "--tfds-dir", tfds_dir, "--quiet"])
    assert compression.run_cli(args) == 0
    report = json.loads((out / "report.json").read_text())
    restored = compression.load_compressed(out / "model.tfqz")
    assert report["settings"]["bits"] == 3 and report["settings"]["fraction"] == 0.5
    assert report["total"]["file_bytes"] == os.path.getsize(out / "model.tfqz")
    fc = restored.get_layer("fc").kernel.numpy()
    assert np.mean(fc == 0) >= 0.5
    step = fc[fc != 0]
    assert np.allclose(step / np.abs(step).min(), np.round(step / np.abs(step).min()),
                       atol=1e-4)  # the non-zeros are integer multiples of one step


def test_cli_compress_errors_are_one_line_before_training(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    compression.add_arguments(parser)
    saved = tmp_path / "tiny.keras"
    models.tiny_cnn().save(saved)
    (tmp_path / "afile").write_text("x")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.tfqz").write_bytes(b"old")
    cases = [
        ([str(tmp_path / "missing.keras"), "--out", str(tmp_path / "o")], "does not exist"),
        ([str(saved), "--out", str(tmp_path / "afile")], "is a file"),
        ([str(saved), "--out", str(taken)], "--overwrite"),
        ([str(saved), "--out", str(tmp_path / "o"), "--bits", "1"], "--bits 1"),
        ([str(saved), "--out", str(tmp_path / "o"), "--prune", "1"], "--prune 1"),
        ([str(saved), "--out", str(tmp_path / "o"), "--test-limit", "0"], "--test-limit 0"),
    ]
    for argv, message in cases:
        assert compression.run_cli(parser.parse_args(argv)) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("tfqreg compress: error:") and message in err, (argv, err)
        assert "\n" not in err
    assert (taken / "model.tfqz").read_bytes() == b"old"
