"""The ``tfqreg`` command: ``--help``, ``<command> --help`` and argument errors answer without
importing TensorFlow (checked in fresh interpreters through the console script and
``python -m tfqreg``: ``tensorflow`` is not in ``sys.modules``); the TensorFlow-free argument
definitions (:mod:`tfqreg.cli_args`) agree with the modules they stand for; ``tfqreg export``
refuses existing files without ``--overwrite`` and a folder it cannot make, in one line.
"""

import argparse
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "tfqreg")
COMMANDS = ("run", "export", "compress", "sweep")

# Runs the command's main() the way the console script does (sys.argv[0] ends in "tfqreg"),
# then reports whether TensorFlow was imported.
_PROBE = """
import json, sys
sys.argv = [{script!r}] + {argv!r}
from tfqreg.cli import main
try:
    code = main()
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "tensorflow": "tensorflow" in sys.modules,
                  "tfqreg_loaded": sys.modules["tfqreg"]._loaded}}), file=sys.stderr)
"""


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _probe(argv):
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(script=SCRIPT, argv=argv)],
                          capture_output=True, text=True, env=_env(), timeout=120)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    return report, proc.stdout, proc.stderr


@pytest.mark.parametrize("argv", [["--help"]] + [[c, "--help"] for c in COMMANDS])
def test_help_does_not_import_tensorflow(argv):
    report, out, _ = _probe(argv)
    assert report == {"code": 0, "tensorflow": False, "tfqreg_loaded": False}
    if argv == ["--help"]:
        for command in COMMANDS:
            assert command in out
    else:
        assert f"usage: tfqreg {argv[0]}" in out


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["sweep"], "the following arguments are required: model"),
    (["export", "m.keras", "--out", "d"], "the following arguments are required: --target"),
    (["export", "m.keras", "--target", "int8", "--out", "d", "--weight-bits", "3"],
     "invalid choice: 3"),
    (["run", "--epochs", "two"], "invalid int value: 'two'"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_argument_errors_do_not_import_tensorflow(argv, message):
    report, _, err = _probe(argv)
    assert report["code"] == 2 and report["tensorflow"] is False
    assert message in err


@pytest.mark.skipif(not os.path.exists(SCRIPT), reason="console script not installed")
@pytest.mark.parametrize("launcher", ["script", "python -m"])
def test_console_script_and_python_m_list_the_subcommands(launcher):
    """The real launchers, with ``-X importtime`` (Python lists every module it imports)."""
    cmd = [SCRIPT] if launcher == "script" else ["-m", "tfqreg"]
    proc = subprocess.run([sys.executable, "-X", "importtime"] + cmd + ["--help"],
                          capture_output=True, text=True, env=_env(), timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-500:]
    assert all(c in proc.stdout for c in COMMANDS)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:")]
    assert "tfqreg.cli_args" in imported
    assert not [m for m in imported if m.split(".")[0] in ("tensorflow", "tf_keras", "numpy")]


@pytest.mark.parametrize("launcher", ["script", "module"])
def test_command_loads_tfqreg_after_parsing(launcher):
    """After its arguments parse, the command loads tfqreg (TensorFlow and all) and gets to the
    command's own checks: a missing MODEL is one line and exit 2, not a RecursionError in
    ``tfqreg.load``."""
    cmd = [SCRIPT] if launcher == "script" else ["-m", "tfqreg"]
    proc = subprocess.run([sys.executable] + cmd + ["sweep", "/nonexistent/model.keras"],
                          capture_output=True, text=True, env=_env(), timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-1500:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("tfqreg sweep: error: MODEL") and "does not exist" in last, last
    assert "RecursionError" not in proc.stderr


def test_import_tfqreg_still_loads_everything_at_once():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, tfqreg; from tfqreg._keras import keras; "
         "print('tensorflow' in sys.modules, tfqreg._loaded, "
         "type(keras.regularizers.get('linf')).__name__, callable(tfqreg.summary))"],
        capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.stdout.split() == ["True", "True", "LInf", "True"], proc.stderr[-500:]


def _options(add):
    p = argparse.ArgumentParser()
    add(p)
    return {a.dest: (a.option_strings, a.default, a.choices, a.type, a.nargs, a.required)
            for a in p._actions if a.dest != "help"}


def test_tf_free_arguments_equal_their_sources():
    from tfqreg import cli_args, datasets, main_job
    from tfqreg.compression import codec
    from tfqreg.compression.pipeline import Compressor
    from tfqreg.deploy import convert, samples

    assert cli_args.DATASETS == datasets.DATASETS
    assert cli_args.DATA_ENV_VAR == datasets.ENV_VAR
    assert cli_args.EXPORT_IO_DTYPES == convert.IO_DTYPES
    assert cli_args.CALIBRATION_SAMPLES == samples.CALIBRATION_SAMPLES
    assert cli_args.CHECK_SAMPLES == samples.CHECK_SAMPLES
    assert cli_args.CODING_MODES == codec.MODES
    from tfqreg.deploy import arguments, cli as deploy_cli, lowbit
    assert cli_args.EXPORT_RUNTIMES == arguments.RUNTIMES == lowbit.RUNTIMES
    assert cli_args.EXPORT_TARGETS == deploy_cli.TARGETS
    params = inspect.signature(Compressor).parameters
    assert cli_args.PRUNE_EPOCHS == params["prune_epochs"].default
    assert cli_args.QUANT_EPOCHS == params["quant_epochs"].default
    from tfqreg import ptq
    assert cli_args.SWEEP_BITS == list(inspect.signature(ptq.sweep).parameters[
        "weight_bits"].default)
    # `tfqreg run`: main_job.add_arguments delegates to cli_args; the two define the same options
    assert _options(cli_args.add_run_arguments) == _options(main_job.add_arguments)


# ------------------------------------------------------------------ tfqreg export: output files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    from tfqreg import models

    d = tmp_path_factory.mktemp("cli_out")
    models.tiny_cnn().save(str(d / "tiny.keras"))
    np.save(d / "x.npy", np.random.default_rng(0).uniform(size=(64, 28, 28, 1)).astype("f4"))
    return d


def _export(saved, out, *extra):
    from tfqreg import cli

    return cli.main(["export", str(saved / "tiny.keras"), "--target", "tflite", "--out",
                     str(out), "--data", str(saved / "x.npy"), *extra])


def test_export_refuses_existing_files_unless_overwrite(saved, tmp_path, capsys):
    out = tmp_path / "o"
    assert _export(saved, out) == 0
    first = os.path.getmtime(out / "tiny.tflite")
    capsys.readouterr()
    assert _export(saved, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny.tflite" in err[0] and "--overwrite" in err[0]
    assert os.path.getmtime(out / "tiny.tflite") == first  # untouched
    assert _export(saved, out, "--overwrite") == 0


def test_export_out_that_cannot_be_written_is_one_line(saved, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert _export(saved, tmp_path / "file") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    if os.geteuid() == 0:  # root may write anywhere os.access can tell; /sys refuses mkdir
        target = "/sys/tfqreg_cannot_write_here"
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        target = str(locked / "out")
    assert _export(saved, target) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tfqreg export: error: --out") and \
        ("cannot create" in err[0] or "not writable" in err[0])
