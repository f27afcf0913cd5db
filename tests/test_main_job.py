"""The README's main job (`tfqreg run`), end to end on real Fashion-MNIST in its quick mode."""

import json
import os

import numpy as np
import pytest

from tfqreg import cli


@pytest.mark.slow
def test_main_job_quick_end_to_end(data_dir, tfds_dir, tmp_path, capsys):
    results, export_dir = tmp_path / "runs", tmp_path / "export"
    assert cli.main(["run", "--quick", "--data-dir", data_dir, "--tfds-dir", tfds_dir,
                     "--results", str(results), "--export-dir", str(export_dir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((results / "summary.json").read_text())
    acc = summary["accuracy"]
    assert set(acc) == {"plain", "linf"}
    for row in acc.values():
        assert 0.3 < row["fp32"] <= 1.0  # trained on 2,000 images for one epoch: above chance
        assert abs(row["W8pc"] - row["fp32"]) < 0.02  # 8-bit PTQ is nearly lossless
    assert summary["regularizer"]["class_name"].endswith("LInf")
    assert summary["batchnorm_folding"] == {"folds": [], "unfolded": []}  # small_cnn: no BN
    assert "BatchNorms folded into their layers before quantizing" in out
    assert os.path.getsize(results / "accuracy_vs_bits.png") > 10_000
    # the exported artifacts exist, and the C array holds the .tflite's bytes
    tflite = (export_dir / "small_cnn_int8.tflite").read_bytes()
    assert tflite[4:8] == b"TFL3"
    cc = (export_dir / "small_cnn_model_data.cc").read_text()
    assert "alignas(16)" in cc and "kTensorArenaSize" in (
        export_dir / "small_cnn_model_data.h").read_text() + cc
    assert summary["export"]["arena_measured"] > 0
    assert 0.3 < summary["export"]["int8_accuracy"] <= 1.0
    # ... and at 4 bits for TFLite Micro: packed INT4 weights, half the int8 weight bytes, the
    # file's accuracy in LiteRT beside the simulated 4-bit accuracy
    from tfqreg.deploy import lowbit

    ex = summary["export"]
    int4 = lowbit.weight_report(str(export_dir / "small_cnn_int4.tflite"))
    assert {t.dtype for t in int4.tensors} == {"int4"}
    assert (export_dir / "small_cnn_int4_model_data.cc").is_file()
    files = ex["files"]
    assert files["small_cnn_int4.tflite"]["weight_bytes"] == int4.total_weight_bytes
    assert files["small_cnn_int4.tflite"]["weight_bytes"] * 2 == \
        files["small_cnn_int8.tflite"]["weight_bytes"]
    assert files["small_cnn_int4.tflite"]["bytes"] < 0.6 * files["small_cnn_int8.tflite"]["bytes"]
    assert 0.3 < ex["int4_accuracy"] <= 1.0
    assert abs(ex["int4_accuracy"] - ex["int4_simulated_accuracy"]) < 0.02
    assert ex["int4_arena_measured"] > 0
    assert "exported files" in out and "small_cnn_int4.tflite" in out
    assert "accuracy (%) on the test set" in out
    assert np.isfinite(summary["train_seconds"]["plain"])
