"""examples/multiworker.py end to end: two workers on loopback ports (``--local 2 --quick``), and
a worker killed mid-epoch whose restarted job resumes from the backup.

Each job is a fresh interpreter that starts two worker processes (MultiWorkerMirroredStrategy,
TF_CONFIG set per child) on real Fashion-MNIST (``TFQREG_DATA_DIR``). The uninterrupted job runs
once per module and serves both tests: the smoke test checks what it wrote, and the fault test
compares the resumed job's final weights with it.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tfqreg.export import Runner, read_tflite

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "examples", "multiworker.py")
TRAINED_FLOOR = 0.40  # chance is 0.10; the quick job reaches 0.65-0.70
# Measured: the resumed job's weights are bit-identical to the uninterrupted job's (max |Δ| = 0):
# every op is deterministic (enable_op_determinism), the two-worker all-reduce is a sum of two
# numbers, and the pipeline gives global step s the same batch in both jobs. The tolerance only
# leaves room for float reassociation. A resume whose pipeline restarts at its first batch (what
# Keras does by itself) ends with weights up to 0.2 away (measured), so this test catches it.
RESUME_ATOL = 1e-6
# --quick: 3 epochs of 6 steps, a backup every 4 steps; worker 1 dies after global step 11
# (epoch 2), so the job resumes from the backup of step 8 (epoch 2, step 3 of 6)
FAIL_AT, BACKUP_STEP, TOTAL = 11, 8, 18


def _run(data_dir, out, tmpdir, *args, timeout=420):
    """Run ``--local 2 --quick`` with ``args``; returns ``(stdout, start time, seconds)``."""
    os.makedirs(tmpdir, exist_ok=True)
    env = dict(os.environ, TFQREG_DATA_DIR=data_dir, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1", MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="",
               TMPDIR=str(tmpdir))  # the workers' temporary folders land here
    env.pop("TF_CONFIG", None)
    start = time.time()
    # a session of its own: on a timeout the launcher and its workers are killed together
    proc = subprocess.Popen([sys.executable, SCRIPT, "--local", "2", "--quick", "--out",
                             str(out), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s\n--- stdout\n{stdout[-5000:]}")
    assert proc.returncode == 0, (f"exit {proc.returncode}\n--- stdout\n{stdout[-5000:]}"
                                  f"\n--- stderr\n{stderr[-5000:]}")
    return stdout, start, time.time() - start


def _weights(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted ``--local 2 --quick`` job, with the chief's export."""
    root = tmp_path_factory.mktemp("multiworker_reference")
    stdout, start, seconds = _run(data_dir, root / "out", root / "tmp")
    print(f"uninterrupted job: {seconds:.0f} s")
    return {"stdout": stdout, "start": start, "out": root / "out", "tmp": root / "tmp"}


def _test_images(data_dir, n):
    """The first ``n`` Fashion-MNIST test images and labels (what the --quick job tests on)."""
    import tfqreg

    _, test = tfqreg.datasets.load("fashion_mnist", batch_size=n, files_dir=data_dir,
                                   shuffle=False, train_take=1, test_take=n)
    x, y = next(iter(test))
    return x.numpy(), y.numpy()


def _fresh(path, since):
    assert path.is_file() and path.stat().st_size > 0, f"{path} missing or empty"
    assert path.stat().st_mtime >= since - 1, f"{path} is stale"
    return path


def _number(pattern, text):
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in output:\n{text[-3000:]}"
    return float(m.group(1))


def test_local_two_workers_train_and_the_chief_exports(reference, data_dir):
    out, text, t0 = reference["out"], reference["stdout"], reference["start"]
    assert "[launcher] all 2 workers finished" in text
    for i in (0, 1):
        assert f"[worker {i}] no backup: training from step 0" in text
        assert f"[worker {i}] trained to global step {TOTAL} ({TOTAL} steps in this attempt)" \
            in text
        assert f"[worker {i}] done" in text
    run = json.loads(_fresh(out / "run.json", t0).read_text())
    assert (run["workers"], run["replicas"], run["global_batch"]) == (2, 2, 64)
    assert (run["first_step"], run["final_step"]) == (0, TOTAL)
    hist = run["history"]
    assert len(hist["loss"]) == 3
    for key in ("loss", "task_loss", "gradient_l1", "grad_l1_w", "grad_l1_a", "msqe"):
        assert all(np.isfinite(hist[key])) and hist[key][-1] > 0, (key, hist[key])
    assert hist["task_loss"][-1] < hist["task_loss"][0]  # it learned

    # the backups are gone after a finished fit; worker 1 removed its temporary save folder
    assert not (out / "backup" / "chief").exists()
    assert not list(out.glob("backup/workertemp*"))
    assert not list(reference["tmp"].glob("tfqreg_worker*"))

    # the saved model is the trained one (the chief's weights file holds the same values)
    from tfqreg._keras import keras

    model = keras.models.load_model(_fresh(out / "bn_cnn.keras", t0))
    weights = _weights(_fresh(out / "final_weights.npz", t0))
    saved = {v.name: w for v, w in zip(model.weights, model.get_weights())}
    matched = 0
    for key, value in weights.items():
        name = key.split(":", 1)[1]
        if name in saved:
            np.testing.assert_array_equal(saved[name], value, err_msg=name)
            matched += 1
    assert matched == len(model.weights)
    assert sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers) == 2

    # accuracies printed by the chief, and the .tflite files run here with the same result
    float_acc = _number(r"test accuracy \(float32, Keras\): ([0-9.]+)", text)
    assert TRAINED_FLOOR < float_acc <= 1.0
    sweep = json.loads(_fresh(out / "sweep.json", t0).read_text())
    assert sweep["num_examples"] == 1000
    xt, yt = _test_images(data_dir, 1000)
    for name in ("int8", "int4"):
        printed = _number(rf"{name} TFLite: \d+ bytes, test accuracy in LiteRT ([0-9.]+)", text)
        assert run["test_accuracy"][name] == pytest.approx(printed, abs=1e-4)
        assert abs(printed - float_acc) < 0.05, (name, printed, float_acc)
        path = _fresh(out / f"bn_cnn_{name}.tflite", t0)
        acc = float(np.mean(Runner(str(path), "litert").predict(xt).argmax(-1) == yt))
        assert acc == pytest.approx(printed, abs=1e-4), name
        kinds = {t.dtype for t in read_tflite(path.read_bytes()).tensors}
        assert ("int4" in kinds) == (name == "int4"), (name, kinds)


def test_killed_worker_job_resumes_from_the_backup_with_the_same_weights(reference, data_dir,
                                                                        tmp_path):
    out = tmp_path / "out"
    text, t0, seconds = _run(data_dir, out, tmp_path / "tmp", "--no-export", "--fail-at-step",
                             str(FAIL_AT), "--max-restarts", "1")
    print(f"killed and restarted job: {seconds:.0f} s")
    assert f"[worker 1] --fail-at-step {FAIL_AT}: SIGKILL" in text
    assert "[launcher] worker 1 exited with -9" in text
    assert "[launcher] attempt 2:" in text and "[launcher] all 2 workers finished" in text
    for i in (0, 1):
        assert (f"[worker {i}] resumed from the backup at global step {BACKUP_STEP} "
                f"(epoch 2 of 3, step 3 of 6)") in text
        assert (f"[worker {i}] trained to global step {TOTAL} "
                f"({TOTAL - BACKUP_STEP} steps in this attempt)") in text
    run = json.loads(_fresh(out / "run.json", t0).read_text())
    assert (run["first_step"], run["final_step"]) == (BACKUP_STEP, TOTAL)
    # the resumed fit ran epochs 2 and 3; epoch 3 is whole in both jobs and logs the same values
    ref = json.loads((reference["out"] / "run.json").read_text())
    assert len(run["history"]["loss"]) == 2
    for key, values in ref["history"].items():
        assert run["history"][key][-1] == pytest.approx(values[-1], rel=1e-6, abs=1e-7), key

    resumed = _weights(out / "final_weights.npz")
    uninterrupted = _weights(reference["out"] / "final_weights.npz")
    assert list(resumed) == list(uninterrupted)
    worst = max(float(np.max(np.abs(resumed[k] - uninterrupted[k]))) for k in resumed)
    print(f"max |resumed - uninterrupted| over {len(resumed)} weights: {worst:.3g}")
    for key in resumed:  # kernels, BatchNorm γ/β and moving statistics, α, log δ
        np.testing.assert_allclose(resumed[key], uninterrupted[key], rtol=0, atol=RESUME_ATOL,
                                   err_msg=key)
