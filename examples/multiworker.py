"""Train with tfqreg's terms on several machines: MultiWorkerMirroredStrategy, backup, export.

A BatchNorm CNN (``tfqreg.models.ds_cnn``; with ``--quick`` a two-conv one) with the L∞ range
regularizer on every kernel, trained in a :class:`tfqreg.training.TrainingModel` with
:class:`~tfqreg.training.GradientL1` and :class:`~tfqreg.training.LearnableMSQE` under
``tf.distribute.MultiWorkerMirroredStrategy`` on real Fashion-MNIST. A
``keras.callbacks.BackupAndRestore`` callback backs the job up every few steps, so a job whose
workers were restarted resumes where the backup left off. The chief (worker 0) then writes the
trained model, prints a post-training quantization sweep and exports int8 and 4-bit TFLite
files. Start it once per worker, with the same ``--workers`` list everywhere::

    python examples/multiworker.py --workers host0:12345,host1:12345 --worker-index 0  # host0
    python examples/multiworker.py --workers host0:12345,host1:12345 --worker-index 1  # host1

or let it start N workers on this machine's loopback ports (each in its own process)::

    python examples/multiworker.py --local 2            # ds_cnn, 60k images, 3 epochs (702
                                                        # steps, ~0.7 s each on 2 CPU cores)
    python examples/multiworker.py --local 2 --quick    # 2k images, 18 steps (smoke test)

Data: $TFQREG_DATA_DIR or ../shared/data. Writes ``tflite_models/examples/multiworker/`` (or
``--out``).

TF_CONFIG
---------
Each worker process learns the cluster and its place in it from the ``TF_CONFIG`` environment
variable, read when the strategy is created::

    {"cluster": {"worker": ["host0:12345", "host1:12345"]}, "task": {"type": "worker", "index": 0}}

``--workers`` / ``--worker-index`` write it for you (a cluster manager that sets ``TF_CONFIG``
itself needs neither); ``--local N`` sets it for each of its N children. Worker 0 is the chief:
it writes the checkpoints and the exported files. Every worker must run the same script with
the same arguments: the workers run the same steps in lock-step (every step all-reduces), so a
worker that stops stalls the others.

What is defined on the global batch
-----------------------------------
The global batch (``--batch-size``) is split into one per-replica batch per worker (more with
several GPUs per worker). Keras scales each replica's loss by ``1/num_replicas`` and sums the
gradients over the replicas, so the task loss, its gradient and the update are those of the
global batch. tfqreg keeps that for its terms: gradient-ℓ1 is ``‖∇_W L_global‖₁`` (the weight
gradients are all-reduced before the norm, inside the step) plus the activation gradients of
every replica's own examples; the kernel regularizers and the learnable terms (``LearnableMSQE``:
``e^α·MSQE − β·α``) depend only on the (mirrored) weights and are added once per step. The
logged ``loss``, ``task_loss``, ``gradient_l1``, ``msqe`` are global values.
``tests/test_training_multiworker.py`` checks that two workers end with the same weights as one
process on the same global batches. BatchNorm is the exception Keras makes: its batch statistics
are per replica unless the layer is ``BatchNormalization(synchronized=True)``; this script
rebuilds the model with synchronized BatchNorm (statistics of the global batch, one more
all-reduce per BatchNorm layer), so that the whole step, and the moving statistics that the
folded-kernel terms and the TFLite converter use, are the same as on one machine. (tf_keras
does not save the ``synchronized`` flag: a reloaded model has ordinary BatchNorm layers, which
is all inference needs.)

What to create inside ``strategy.scope()``
------------------------------------------
Everything that owns variables the step updates: the model (its kernel regularizers create
their learnable parameters, e.g. ``Margin``'s M or ``SoftMinMax``'s a, together with the layer's
weights, so they are mirrored with them), the ``TrainingModel`` and its terms (``LearnableMSQE``
creates α and δ when the TrainingModel attaches it), the optimizer, and ``compile``. ``fit``,
the callbacks and the data may be created outside. Created outside the scope, a variable is a
plain local one: its updates are not synchronized and the workers drift apart.

Fault tolerance
---------------
``BackupAndRestore(backup_dir, save_freq=k)`` writes (from the chief; the other workers write to
a temporary folder they delete, because reading synchronized variables is collective) the
weights, the optimizer state, the learnable terms' α and δ, and the epoch and step counters
every k steps. MultiWorkerMirroredStrategy cannot continue with a worker missing, so when one
dies all workers are restarted (``--local`` does this, ``--max-restarts`` times; in a cluster, the
job scheduler); ``fit`` then restores the backup and continues at the saved epoch and step. All
workers read the chief's backup: on several machines ``--backup-dir`` must be on a file system
they share. Keras restores the counters but not the position of the input pipeline (a new
iterator starts at its first element), so this script's pipeline is a function of the global
step: the batches of step ``s`` are fixed by ``--seed`` (a permutation of the data per pass), and
each worker's pipeline starts at the restored step, read from ``model.optimizer.iterations`` when
``fit`` creates the iterator. That is what makes a resumed run end with the same weights as an
uninterrupted one (``tests/test_example_multiworker.py`` kills a worker mid-epoch to check it).
``--fail-at-step K`` is that test's hook: the last worker SIGKILLs itself after global step K
(on the first attempt of a ``--local`` job).

Saving and export
-----------------
Saving reads the BatchNorm moving statistics, which are synchronized on read (an all-reduce), so
every worker calls ``save``; the non-chief workers save to a temporary folder and delete it (the
usual Keras multi-worker pattern). The chief then loads the saved model outside the strategy and
runs the plain single-machine tools on it: ``tfqreg.ptq.sweep`` and ``tfqreg.export.to_tflite``
(full int8, and INT4 weights with int8 activations), each file checked against Keras in LiteRT.
The kernels are exported as trained, not snapped with ``training.round_to_grid``: the
converters put each output channel on their own grid (its max |w| sets the step), and in a
short run the learned δ of a BatchNorm-folded kernel lags behind the fast-moving BatchNorm
statistics (18 steps of the ``--quick`` set-up on one process: snapping to the learned grid
cost 47 points of test accuracy, to the per-channel max |w| grid 1.5). The other workers wait
for the chief's export before they exit (a worker that exits earlier shows up in the chief's
log as a crashed task). Also written: ``final_weights.npz`` (every weight of the TrainingModel,
α and δ included, as the workers hold them after ``fit``) and ``run.json`` (steps, history,
test accuracies).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tflite_models", "examples", "multiworker")
# --quick: small enough for CI (18 steps), large enough to learn (~65-70 % test accuracy)
QUICK = dict(train_images=2000, test_images=1000, epochs=3, steps_per_epoch=6, batch_size=64,
             backup_every=4)


# ---------------------------------------------------------------------------------- arguments
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", type=int, metavar="N",
                       help="start N worker processes on this machine's loopback ports")
    where.add_argument("--workers", metavar="HOST:PORT,...",
                       help="all workers' addresses, the same list on every worker")
    p.add_argument("--worker-index", type=int, help="this worker's position in --workers")
    p.add_argument("--quick", action="store_true",
                   help="2k images, a small BatchNorm CNN, 3 epochs of 6 steps (smoke test)")
    p.add_argument("--epochs", type=int, help="epochs (default 3)")
    p.add_argument("--steps-per-epoch", type=int,
                   help="steps per epoch (default: one pass over the training images)")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size (default 256; quick 64)")
    p.add_argument("--backup-every", type=int,
                   help="BackupAndRestore save_freq in steps (default 100; quick 4)")
    p.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (chief)")
    p.add_argument("--backup-dir", help="backup folder, shared by all workers "
                   "(default: <out>/backup)")
    p.add_argument("--no-export", action="store_true",
                   help="train and save only (no PTQ sweep, no TFLite)")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="--local: restart all workers this many times when one dies")
    p.add_argument("--fail-at-step", type=int, metavar="K",
                   help="test hook: the last worker SIGKILLs itself after global step K (with "
                        "--local: on the first attempt only)")
    args = p.parse_args(argv)
    if args.local is not None and args.local < 1:
        p.error("--local: N must be >= 1")
    if args.workers is not None and args.worker_index is None:
        p.error("--workers needs --worker-index")
    if args.worker_index is not None and args.workers is None:
        p.error("--worker-index needs --workers")
    if args.workers is not None and not 0 <= args.worker_index < len(args.workers.split(",")):
        p.error(f"--worker-index {args.worker_index} is not a position in --workers "
                f"({len(args.workers.split(','))} addresses)")
    if args.max_restarts < 0:
        p.error(f"--max-restarts must be >= 0, got {args.max_restarts}")
    for name in ("epochs", "steps_per_epoch", "batch_size", "backup_every"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    return args


def tf_config(workers: Sequence[str], index: int) -> str:
    """The ``TF_CONFIG`` JSON of worker ``index`` in a cluster of ``workers`` (``host:port``)."""
    return json.dumps({"cluster": {"worker": list(workers)},
                       "task": {"type": "worker", "index": index}})


def free_ports(n: int) -> List[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------------ --local
def _without(argv: Sequence[str], options: Dict[str, bool]) -> List[str]:
    """``argv`` without the given options (``{option: takes_a_value}``), in both spellings."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in options:
            skip = options[name] and "=" not in a
            continue
        out.append(a)
    return out


def run_local(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Start ``args.local`` workers of this script on loopback ports and supervise them.

    When a worker dies, the others are killed (they would wait forever in the next
    all-reduce) and, up to ``--max-restarts`` times, all are started again: ``fit`` resumes
    from the backup. Returns the exit code: 0 when every worker of the last attempt exited 0.
    """
    base = _without(argv, {"--local": True, "--max-restarts": True, "--fail-at-step": True})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for attempt in range(args.max_restarts + 1):
        workers = [f"127.0.0.1:{p}" for p in free_ports(args.local)]
        extra = []
        if attempt == 0 and args.fail_at_step is not None:
            extra = ["--fail-at-step", str(args.fail_at_step)]
        print(f"[launcher] attempt {attempt + 1}: {args.local} workers on {','.join(workers)}",
              flush=True)
        procs = []
        try:
            for i in range(args.local):
                child_env = dict(env, TF_CONFIG=tf_config(workers, i))
                procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__),
                                               *base, *extra], env=child_env))
            failed = None
            while failed is None and any(p.poll() is None for p in procs):
                failed = next((i for i, p in enumerate(procs)
                               if p.poll() is not None and p.returncode != 0), None)
                time.sleep(0.2)
            if failed is None:
                failed = next((i for i, p in enumerate(procs) if p.returncode != 0), None)
            if failed is None:
                print(f"[launcher] all {args.local} workers finished", flush=True)
                return 0
            print(f"[launcher] worker {failed} exited with {procs[failed].returncode}; "
                  "stopping the others (a MultiWorkerMirroredStrategy job cannot continue "
                  "without it)", flush=True)
        finally:  # also on Ctrl-C: no worker is left waiting for the others
            for p in procs:
                if p.poll() is None:
                    p.kill()  # our own children, by their Popen handle
            for p in procs:
                p.wait()
        if attempt < args.max_restarts:
            print(f"[launcher] restarting all workers ({attempt + 1} of {args.max_restarts} "
                  "restarts); fit resumes from the backup", flush=True)
    return 1


# ----------------------------------------------------------------------------------- a worker
def batch_plan(num_examples: int, global_batch: int, total_steps: int, seed: int):
    """Example indices of every global batch, ``(total_steps, global_batch)`` int64.

    Pass ``e`` over the data is the permutation ``default_rng([seed, e])``; a pass yields
    ``num_examples // global_batch`` full batches (the remainder is dropped). Global step ``s``
    always gets row ``s``, whatever happened before: the order of a resumed job is unchanged.
    """
    import numpy as np

    per_pass = num_examples // global_batch
    if per_pass < 1:
        raise ValueError(f"--batch-size {global_batch} is larger than the {num_examples} "
                         "training images")
    passes = -(-total_steps // per_pass)
    rows = [np.random.default_rng([seed, e]).permutation(num_examples)[:per_pass * global_batch]
            for e in range(passes)]
    return np.concatenate(rows).reshape(-1, global_batch)[:total_steps].astype("int64")


def load_data(tfqreg, train_images: Optional[int], test_images: Optional[int]):
    """Fashion-MNIST as NumPy (float32 in [0, 1], ``(N, 28, 28, 1)``; int64 labels): the first
    ``train_images`` / ``test_images`` (``None``: all), decoding only those."""
    import numpy as np

    def arrays(split):
        batches = list(split)  # to the end: the pipeline's cache is complete
        return tuple(np.concatenate([b[i].numpy() for b in batches]) for i in (0, 1))

    train, test = tfqreg.datasets.load(
        "fashion_mnist", batch_size=10_000, files_dir=tfqreg.datasets.local_files_dir(),
        shuffle=False, train_take=train_images, test_take=test_images)
    return arrays(train), arrays(test)


def build_model(keras, quick: bool, regularizer):
    """The BatchNorm CNN, every BatchNorm ``synchronized`` (statistics of the global batch).

    ``quick``: Conv(16)-BN-ReLU-MaxPool-Conv(32)-BN-ReLU-MaxPool-Dense(10), BatchNorm momentum
    0.8 (moving statistics that settle within a few steps); else ``tfqreg.models.ds_cnn``
    (MobileNet-style, 5 BatchNorm layers), rebuilt from its config with synchronized BatchNorm.
    ``regularizer`` goes on every kernel.
    """
    from tfqreg import models

    if quick:
        L = keras.layers
        inputs = keras.Input((28, 28, 1), name="image")
        h = inputs
        for i, width in enumerate((16, 32), start=1):
            h = L.Conv2D(width, 3, use_bias=False, kernel_regularizer=regularizer.__class__
                         .from_config(regularizer.get_config()), name=f"conv{i}")(h)
            h = L.BatchNormalization(synchronized=True, momentum=0.8, name=f"bn{i}")(h)
            h = L.ReLU(name=f"relu{i}")(h)
            h = L.MaxPooling2D(name=f"pool{i}")(h)
        h = L.Flatten(name="flatten")(h)
        outputs = L.Dense(10, activation="softmax", name="fc", kernel_regularizer=regularizer
                          .__class__.from_config(regularizer.get_config()))(h)
        return keras.Model(inputs, outputs, name="bn_cnn")
    config = models.ds_cnn(kernel_regularizer=regularizer).get_config()
    for layer in config["layers"]:
        if layer["class_name"] == "BatchNormalization":
            layer["config"]["synchronized"] = True
    return keras.Model.from_config(config)


def run_worker(args: argparse.Namespace) -> int:
    """One worker of the job: train, back up, save; on the chief, export. Returns 0."""
    if args.workers is not None:
        os.environ["TF_CONFIG"] = tf_config(args.workers.split(","), args.worker_index)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np

    import tfqreg  # first: makes tf.keras Keras 2
    from tfqreg import regularizers, training
    from tfqreg._keras import keras, tf

    quick = QUICK if args.quick else {}
    epochs = args.epochs or quick.get("epochs", 3)
    global_batch = args.batch_size or quick.get("batch_size", 256)
    backup_every = args.backup_every or quick.get("backup_every", 100)

    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()  # a resumed run repeats the same numbers
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    resolver = strategy.cluster_resolver
    index = resolver.task_id or 0
    num_workers = len(resolver.cluster_spec().as_dict().get("worker", [])) or 1
    is_chief = strategy.extended.should_checkpoint  # worker 0 (or the task of type "chief")
    tag = f"[{resolver.task_type or 'worker'} {index}]"
    replicas = strategy.num_replicas_in_sync
    if global_batch % replicas:
        raise SystemExit(f"--batch-size {global_batch} is not divisible by the {replicas} "
                         "replicas")

    (x, y), (xt, yt) = load_data(tfqreg, quick.get("train_images"), quick.get("test_images"))
    steps_per_epoch = (args.steps_per_epoch or quick.get("steps_per_epoch")
                       or len(x) // global_batch)
    total_steps = epochs * steps_per_epoch
    plan = batch_plan(len(x), global_batch, total_steps, args.seed)

    # --- data: worker i's pipeline yields its replicas' slices of every global batch, from
    # the global step at which fit starts (0, or the step restored from the backup); a local
    # variable of this worker (created outside the scope on purpose: the step does not use it)
    start_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="start_step")
    images, labels = tf.constant(x), tf.constant(y.astype("int64"))

    def dataset_fn(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
        per_replica = ctx.get_per_replica_batch_size(global_batch)
        local = replicas // ctx.num_input_pipelines  # replicas fed by this pipeline
        lo = ctx.input_pipeline_id * local * per_replica
        mine = plan[:, lo:lo + local * per_replica].reshape(-1, per_replica)

        def from_start(_):  # runs when fit creates the iterator, after the restore
            return tf.data.Dataset.from_tensor_slices(mine).skip(start_step * local)

        return (tf.data.Dataset.range(1).flat_map(from_start)
                .map(lambda i: (tf.gather(images, i), tf.gather(labels, i)))
                .prefetch(2))

    data = strategy.distribute_datasets_from_function(dataset_fn)

    # --- everything that owns variables the step updates: inside the scope
    with strategy.scope():
        inner = build_model(keras, args.quick, regularizers.LInf())
        trainer = training.TrainingModel(inner, terms=[
            training.GradientL1(lambda_w=1e-4, lambda_a=1e-4, reduction="sum"),
            training.LearnableMSQE(bits=4, per_channel=True),
        ])
        trainer.compile(keras.optimizers.Adam(3e-3 if args.quick else 1e-3),
                        "sparse_categorical_crossentropy", ["accuracy"])

    class Resume(keras.callbacks.Callback):
        """After BackupAndRestore's restore: start the data at the restored step, report it,
        and (test hook) die after ``--fail-at-step``."""

        def __init__(self):
            super().__init__()
            self.first_step = 0

        def on_train_begin(self, logs=None):
            self.first_step = int(self.model.optimizer.iterations.numpy())
            start_step.assign(self.first_step)
            if self.first_step:
                epoch, step = divmod(self.first_step, steps_per_epoch)
                print(f"{tag} resumed from the backup at global step {self.first_step} "
                      f"(epoch {epoch + 1} of {epochs}, step {step + 1} of {steps_per_epoch})",
                      flush=True)
            else:
                print(f"{tag} no backup: training from step 0", flush=True)

        def on_train_batch_end(self, batch, logs=None):
            done = int(self.model.optimizer.iterations.numpy())
            if args.fail_at_step is not None and done == args.fail_at_step and \
                    resolver.task_type in (None, "worker") and index == num_workers - 1:
                print(f"{tag} --fail-at-step {done}: SIGKILL", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    backup_dir = args.backup_dir or os.path.join(args.out, "backup")
    resume = Resume()
    history = trainer.fit(
        data, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=2 if is_chief else 0,
        callbacks=[keras.callbacks.BackupAndRestore(backup_dir, save_freq=backup_every),
                   resume])
    final_step = int(trainer.optimizer.iterations.numpy())
    print(f"{tag} trained to global step {final_step} ({final_step - resume.first_step} steps "
          "in this attempt)", flush=True)

    # --- collective reads (synchronized-on-read BatchNorm statistics): every worker, in order
    weights = {f"{i:03d}:{v.name}": w for i, (v, w) in
               enumerate(zip(trainer.weights, trainer.get_weights()))}  # inner model, α, δ
    os.makedirs(args.out, exist_ok=True)
    save_dir = args.out if is_chief else tempfile.mkdtemp(prefix=f"tfqreg_worker{index}_")
    trainer.inner.save(os.path.join(save_dir, f"{inner.name}.keras"))
    if not is_chief:
        shutil.rmtree(save_dir, ignore_errors=True)
    run = {"workers": num_workers, "replicas": replicas, "global_batch": global_batch,
           "epochs": epochs, "steps_per_epoch": steps_per_epoch, "first_step": resume.first_step,
           "final_step": final_step,
           "history": {k: [float(v) for v in vs] for k, vs in history.history.items()}}
    try:
        if is_chief:
            np.savez(os.path.join(args.out, "final_weights.npz"), **weights)
            if not args.no_export:
                run["test_accuracy"] = export_on_chief(
                    os.path.join(args.out, f"{inner.name}.keras"), x[:500], (xt, yt), args.out)
            with open(os.path.join(args.out, "run.json"), "w") as f:
                json.dump(run, f, indent=1)
            print(f"{tag} wrote {args.out}", flush=True)
    finally:
        # the other workers wait here for the chief: a worker that exits while the chief still
        # runs is reported to it as a crashed task
        barrier(strategy, tf)
    print(f"{tag} done", flush=True)
    return 0


def barrier(strategy, tf) -> None:
    """Return once every worker got here (a one-element all-reduce)."""
    one = strategy.run(tf.function(lambda: tf.ones([])))
    strategy.reduce("SUM", one, axis=None)


def export_on_chief(model_path: str, calibration, test, out: str) -> Dict[str, float]:
    """Load the saved model outside the strategy (plain variables), print a PTQ sweep, write
    int8 and INT4-weight TFLite files (each checked against Keras in LiteRT); returns the test
    accuracies."""
    import numpy as np

    from tfqreg import export, ptq
    from tfqreg._keras import keras

    xt, yt = test
    model = keras.models.load_model(model_path)
    result = ptq.sweep(model, test, weight_bits=(8, 6, 4, 3), activation_bits=8,
                       calibration_data=calibration, progress=False)
    print(f"\n{result}\n", flush=True)
    result.to_json(os.path.join(out, "sweep.json"))
    accuracy = {"float32": result.float_accuracy}
    for name, bits in (("int8", None), ("int4", 4)):
        res = export.to_tflite(model, mode="int8", representative_data=calibration,
                               weight_bits=bits, sample=xt[:500],
                               path=os.path.join(out, f"{model.name}_{name}.tflite"),
                               overwrite=True)  # a rerun replaces the previous files
        accuracy[name] = float(np.mean(res.predict(xt).argmax(-1) == yt))
        print(f"{name} TFLite: {os.path.getsize(res.path)} bytes, test accuracy in LiteRT "
              f"{accuracy[name]:.4f}", flush=True)
    print(f"test accuracy (float32, Keras): {result.float_accuracy:.4f}", flush=True)
    return accuracy


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the launcher (``--local``) or one worker."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.local is not None:
        return run_local(args, argv)
    return run_worker(args)


if __name__ == "__main__":
    sys.exit(main())
