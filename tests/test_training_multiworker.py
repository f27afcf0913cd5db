"""MultiWorkerMirroredStrategy: two worker processes on loopback ports train a TrainingModel with
gradient-ℓ1 and learnable MSQE; they must end with the same weights, equal to a single-process
run on the same global batches."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import tfqreg
    from tfqreg import models, training
    from tfqreg._keras import keras, tf

    out, mode = sys.argv[1], sys.argv[2]
    strategy = (tf.distribute.MultiWorkerMirroredStrategy() if mode == "multi"
                else tf.distribute.get_strategy())
    rng = np.random.default_rng(0)
    x = rng.random((32, 12, 12, 1)).astype("float32")
    y = rng.integers(0, 10, 32).astype("int64")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    if mode == "multi":
        # replica i (worker i) takes the i-th half of every global batch of 16
        def per_replica(ctx):
            return (tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
                    .shard(ctx.num_input_pipelines, ctx.input_pipeline_id).repeat())
        ds = strategy.distribute_datasets_from_function(per_replica)
    with strategy.scope():
        tf.random.set_seed(1)
        model = training.TrainingModel(
            models.tiny_cnn(input_shape=(12, 12, 1)),
            terms=[training.GradientL1(1e-2, 1e-2, reduction="mean"),
                   training.LearnableMSQE(bits=4)])
        model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    # the same initial weights in every process (initializers differ under a strategy)
    init = np.random.default_rng(7)
    model.inner.set_weights([init.normal(0, 0.2, w.shape).astype("float32")
                             for w in model.inner.get_weights()])
    model.terms[1].reset_steps()
    hist = model.fit(ds, epochs=2, steps_per_epoch=2, verbose=0).history
    np.savez(out, *model.get_weights())
    with open(out + ".json", "w") as f:
        json.dump({k: [float(v) for v in vs] for k, vs in hist.items()}, f)
    """
)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["CUDA_VISIBLE_DEVICES"] = ""
    env.pop("TF_CONFIG", None)
    env.update(extra or {})
    return env


def _load(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


@pytest.mark.slow
def test_two_workers_agree_and_match_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"w{i}.npz"), "multi"],
            env=_env({"TF_CONFIG": tf_config}), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT))
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "single.npz"),
                             "single"], env=_env(), capture_output=True, timeout=300)
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=300)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-3000:]
    assert single.returncode == 0, single.stderr.decode(errors="replace")[-3000:]
    w0, w1 = _load(tmp_path / "w0.npz"), _load(tmp_path / "w1.npz")
    ws = _load(tmp_path / "single.npz")
    assert len(w0) == len(w1) == len(ws)
    for a, b, c in zip(w0, w1, ws):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
    h0 = json.loads((tmp_path / "w0.npz.json").read_text())
    hs = json.loads((tmp_path / "single.npz.json").read_text())
    for key in ("loss", "task_loss", "gradient_l1", "grad_l1_a", "msqe", "exp_alpha"):
        np.testing.assert_allclose(h0[key], hs[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert hs["gradient_l1"][-1] > 0
