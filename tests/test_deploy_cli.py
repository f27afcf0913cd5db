"""`tfqreg export` (tfqreg.deploy.cli) through tfqreg.cli.main: every target, every input
format, bad input."""

import json
import re

import numpy as np
import pytest

from tfqreg import cli, models


@pytest.fixture(scope="module")
def files(tmp_path_factory, fashion_small):
    d = tmp_path_factory.mktemp("cli")
    model = models.tiny_cnn()
    model.save(str(d / "tiny.keras"))
    model.save(str(d / "tiny.h5"))
    model.save(str(d / "tiny_sm"), save_format="tf")
    models.bnn().save(str(d / "bnn.keras"))
    np.save(d / "x.npy", fashion_small[1][0][:200])
    return d


def _main(args, capsys):
    code = cli.main(["export"] + [str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("model, target, produced", [
    ("tiny.keras", "tflite", ["tiny.tflite", "tiny.json"]),
    ("tiny.h5", "int8", ["tiny.tflite"]),
    ("tiny_sm", "edgetpu", ["tiny_sm.tflite", "tiny_sm_edgetpu.json"]),
    ("tiny.keras", "micro", ["tiny.tflite", "tiny_model_data.cc", "tiny_model_data.h"]),
    ("bnn.keras", "lce", ["bnn.tflite"]),
])
def test_targets(files, tmp_path, capsys, model, target, produced):
    out = tmp_path / target
    code, stdout, stderr = _main([files / model, "--target", target, "--out", out,
                                  "--data", files / "x.npy", "--min-agreement", "0"], capsys)
    assert code == 0, stderr
    for name in produced:
        assert (out / name).is_file(), name
    assert "parity vs Keras" in stdout
    if target == "edgetpu":
        assert "Edge TPU pre-flight" in stdout and "verdict: OK" in stdout
        assert json.loads((out / "tiny_sm_edgetpu.json").read_text())["ok"] is True
    if target == "micro":
        assert "kTensorArenaSize" in stdout or "arena" in stdout
    if target == "lce":
        assert "LceBconv2d" in stdout


def test_real_dataset_as_calibration(files, tmp_path, capsys, data_dir, tfds_dir):
    code, stdout, stderr = _main([files / "tiny.keras", "--target", "int8", "--out", tmp_path,
                                  "--data", "fashion_mnist", "--data-dir", data_dir,
                                  "--tfds-dir", tfds_dir, "--samples", "200",
                                  "--check-samples", "300", "--min-agreement", "0"], capsys)
    assert code == 0, stderr
    assert "(litert, 300 samples)" in stdout


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    code, stdout, stderr = _main([tmp_path / "nope.keras", "--target", "int8", "--out",
                                  tmp_path], capsys)
    assert code == 2
    assert "does not exist" in stderr and "Traceback" not in stderr + stdout
    assert len(stderr.strip().splitlines()) == 1


def test_folder_that_is_not_a_savedmodel(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, stderr = _main([tmp_path / "empty", "--target", "tflite", "--out", tmp_path],
                            capsys)
    assert code == 2 and "saved_model.pb" in stderr


def test_bad_calibration_data_is_named(files, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((10, 32, 32), "f4"))
    code, _, stderr = _main([files / "tiny.keras", "--target", "int8", "--out", tmp_path,
                             "--data", tmp_path / "bad.npy"], capsys)
    assert code == 2 and "(N, 28, 28, 1)" in stderr and "Traceback" not in stderr


def test_bad_threshold_is_named(files, tmp_path, capsys):
    code, stdout, stderr = _main([files / "tiny.keras", "--target", "int8", "--out", tmp_path,
                                  "--data", files / "x.npy", "--min-agreement", "1.01"], capsys)
    assert code == 2 and "min_agreement" in stderr


@pytest.mark.parametrize("args, produced, types", [
    (["--target", "int8", "--weight-bits", "4"], ["tiny.tflite"],
     {"CONV_2D": "int4", "FULLY_CONNECTED": "int4"}),
    (["--target", "int8", "--weight-bits", "2"], ["tiny.tflite"],
     {"CONV_2D": "int4", "FULLY_CONNECTED": "int2"}),
    (["--target", "micro", "--weight-bits", "4"],
     ["tiny.tflite", "tiny_model_data.cc", "tiny_model_data.h"],
     {"CONV_2D": "int4", "FULLY_CONNECTED": "int4"}),
    (["--target", "tflite", "--mode", "dynamic", "--weight-bits", "4"], ["tiny.tflite"],
     {"CONV_2D": "int4", "FULLY_CONNECTED": "int4"}),
])
def test_low_bit_targets_write_packed_weights(files, tmp_path, capsys, args, produced, types):
    from tfqreg.deploy import lowbit

    out = tmp_path / "lowbit"
    code, stdout, stderr = _main([files / "tiny.keras", "--out", out, "--data", files / "x.npy",
                                  "--min-agreement", "0"] + args, capsys)
    assert code == 0, stderr
    for name in produced:
        assert (out / name).is_file(), name
    report = lowbit.weight_report(str(out / "tiny.tflite"))
    assert {t.op: t.dtype for t in report.tensors} == types
    assert "simulated model" in stdout and "weights:" in stdout  # note + weight table
    fc = next(t for t in report.tensors if t.op == "FULLY_CONNECTED")
    if "micro" in args:  # TFLite Micro's INT4 FULLY_CONNECTED: one scale per tensor
        assert len(fc.scales) == 1 and "arena" in stdout
    if "dynamic" in args:  # float activations: the packed weights go through DEQUANTIZE
        assert "DEQUANTIZE" in stdout and report.tensors[0].dtype == "int4"


@pytest.mark.parametrize("args, message", [
    (["--target", "edgetpu", "--weight-bits", "4"], "edgetpu runs int8 only: the Edge TPU"),
    (["--target", "edgetpu", "--weight-bits", "2"], "int8 only"),
    (["--target", "lce", "--weight-bits", "4"], "lce runs int8 and binary"),
    (["--target", "micro", "--weight-bits", "2"], "no INT2 kernels"),
    (["--target", "int8", "--weight-bits", "2", "--runtime", "micro"], "no INT2 kernels"),
    (["--target", "micro", "--weight-bits", "4", "--runtime", "litert"], "contradicts"),
    (["--target", "tflite", "--weight-bits", "4"], "needs --mode dynamic"),
    (["--target", "tflite", "--mode", "dynamic", "--weight-bits", "4", "--runtime", "micro"],
     "DEQUANTIZE has no INT4"),
    (["--target", "int8", "--runtime", "micro"], "is for --weight-bits 4|2"),
    (["--target", "int8", "--weight-bits", "4", "--io-dtype", "uint8"], "--io-dtype uint8"),
    (["--target", "micro", "--weight-bits", "4", "--io-dtype", "float32"], "--io-dtype float32"),
    (["--target", "int8", "--min-agreement", "2"], "min_agreement"),
    (["--target", "int8", "--samples", "0"], "--samples"),
    (["--target", "int8", "--data", "cifar10"], "--data must be"),
])
def test_refusals_come_before_any_work(tmp_path, capsys, args, message):
    """Refused combinations are one line and exit code 2, before the model is loaded (it does
    not exist here) or the output folder is made."""
    out = tmp_path / "never"
    code, stdout, stderr = _main([tmp_path / "nope.keras", "--out", out] + args, capsys)
    assert code == 2, stderr
    assert stderr.startswith("tfqreg export: error: ") and "Traceback" not in stderr + stdout
    assert len(stderr.strip().splitlines()) == 1
    assert re.search(message, stderr), stderr
    assert "does not exist" not in stderr and not out.exists()


def test_weight_bits_outside_8_4_2_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _main([tmp_path / "nope.keras", "--out", tmp_path, "--target", "int8",
               "--weight-bits", "3"], capsys)
    assert e.value.code == 2
