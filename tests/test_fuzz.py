"""Bad arguments to the public constructors and entry points: wrong types (str, bool, None,
list), NaN / inf, negative / zero / huge values. Each must raise ``TypeError`` or
``ValueError`` with a one-line message that names the argument, never an ``AttributeError``
or an error from deep inside TensorFlow.

Every case fails at the argument check, before any conversion or training, so the module runs
in seconds. The oracle is the argument's name in the message (backquoted, as tfqreg writes it,
or as a word).
"""

import math
import re

import numpy as np
import pytest

from tfqreg import compression, datasets, deploy, losses, ptq, quantizers, regularizers, training
from tfqreg._keras import keras

NAN, INF = float("nan"), float("inf")
BAD_REAL = ["x", True, None, [1.0], NAN, INF]        # not a finite real number
BAD_BOOL = ["False", 1, None, [True]]                # truthy look-alikes of a bool
BAD_INT = ["4", True, 4.5, NAN]                      # not an integer
BAD_CHOICE = [5, "nonsense", True]                   # not one of the allowed strings
BAD_NAMES = [5, True, [5]]                           # not a list of layer names


@pytest.fixture(scope="module")
def model():
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="c1"),
                             keras.layers.Flatten(), keras.layers.Dense(3, name="d1")])


@pytest.fixture(scope="module")
def x():
    return np.random.default_rng(0).uniform(size=(8, 8, 8, 1)).astype("f4")


def _cases():
    """``(id, call(model, x, tmp_path, value), argument, values)``."""
    c = []

    def add(name, call, arg, values):
        c.append((name, call, arg, values))

    def ctor(cls, arg):
        return lambda m, x, d, v: cls(**{arg: v})

    # --- tfqreg.regularizers
    for arg in ("l", "alpha"):
        add("Foothill", ctor(regularizers.Foothill, arg), arg, BAD_REAL + [-1.0, 0.0, 1e308])
    add("Foothill", ctor(regularizers.Foothill, "beta"), "beta", BAD_REAL + [-1.0, 0.0])
    add("Foothill", ctor(regularizers.Foothill, "center"), "center", BAD_REAL + [-1.0])
    for cls in (regularizers.LInf, regularizers.Margin, regularizers.SoftMinMax):
        add(cls.__name__, ctor(cls, "l"), "l", BAD_REAL + [-1.0, 0.0, 1e308])
        add(cls.__name__, ctor(cls, "fold_batchnorm"), "fold_batchnorm", BAD_BOOL)
        add(cls.__name__, ctor(cls, "normalize"), "normalize", BAD_CHOICE + [None])
    for arg in ("power", "margin_weight"):
        add("Margin", ctor(regularizers.Margin, arg), arg, BAD_REAL + [-1.0, 0.0, 1e308])
    add("Margin", ctor(regularizers.Margin, "margin"), "margin",
        ["x", True, [1.0], NAN, INF, -1.0, 0.0])
    add("SoftMinMax", ctor(regularizers.SoftMinMax, "eta"), "eta", BAD_REAL + [-1.0, 0.0, 1e308])
    add("SoftMinMax", ctor(regularizers.SoftMinMax, "hardness"), "hardness",
        ["x", True, [1.0], NAN, INF, -1.0, 0.0, 1e308])
    add("MSQE", ctor(regularizers.MSQE, "l"), "l", BAD_REAL + [-1.0, 0.0, 1e308])
    add("MSQE", ctor(regularizers.MSQE, "bits"), "bits", BAD_INT + [None, -1, 0, 10 ** 9])
    add("MSQE", ctor(regularizers.MSQE, "step"), "step", ["x", True, [1.0], NAN, INF, -1.0, 0.0])
    for arg in ("per_channel", "narrow_range", "trainable_step", "fold_batchnorm"):
        add("MSQE", ctor(regularizers.MSQE, arg), arg, BAD_BOOL)
    for arg in ("l", "fraction"):
        add("PartialL2", ctor(regularizers.PartialL2, arg), arg, BAD_REAL + [-1.0, 0.0, 1e308])

    # --- tfqreg.quantizers, tfqreg.losses
    add("FoothillSign", ctor(quantizers.FoothillSign, "beta"), "beta",
        BAD_REAL + [-1.0, 0.0, 1e308])
    add("FoothillSign", lambda m, x, d, v: quantizers.foothill_sign(x, beta=v), "beta",
        [1e308, NAN, True])
    add("FoothillSign", ctor(quantizers.FoothillSign, "metrics"), "metrics",
        [5, "c1", "flip_ratio", True, [5], [None], ["accuracy"], {"flip_ratio": 1}])
    for arg in ("alpha", "beta"):
        add("losses.Foothill", ctor(losses.Foothill, arg), arg, BAD_REAL + [-1.0, 0.0, 1e308])
    add("losses.Foothill", ctor(losses.Foothill, "reduction"), "reduction",
        BAD_CHOICE + [None, ["sum"]])

    # --- tfqreg.training
    for arg in ("lambda_w", "lambda_a"):
        add("GradientL1", ctor(training.GradientL1, arg), arg, BAD_REAL + [-1.0])
    for arg in ("layers", "activations"):
        add("GradientL1", ctor(training.GradientL1, arg), arg, BAD_NAMES)
    for arg in ("start_step", "start_epoch"):
        add("GradientL1", ctor(training.GradientL1, arg), arg, BAD_INT + [-1])
    add("GradientL1", ctor(training.GradientL1, "reduction"), "reduction", BAD_CHOICE + [None])
    add("LearnableMSQE", ctor(training.LearnableMSQE, "bits"), "bits",
        BAD_INT + [None, -1, 0, 10 ** 9])
    for arg in ("per_channel", "narrow_range", "learn_step"):
        add("LearnableMSQE", ctor(training.LearnableMSQE, arg), arg, BAD_BOOL)
    for cls in (training.LearnableMSQE, training.LearnablePartialL2):
        add(cls.__name__, ctor(cls, "beta"), "beta", BAD_REAL + [-1.0, 0.0])
        add(cls.__name__, ctor(cls, "alpha_init"), "alpha_init", BAD_REAL + [1e308])
        add(cls.__name__, ctor(cls, "alpha_max"), "alpha_max", BAD_REAL + [-1.0, 1e308])
        add(cls.__name__, ctor(cls, "layers"), "layers", BAD_NAMES)
    add("LearnablePartialL2", ctor(training.LearnablePartialL2, "fraction"), "fraction",
        BAD_REAL + [-1.0, 0.0, 1e308])
    add("TrainingModel", lambda m, x, d, v: training.TrainingModel(v), "inner", ["m", None, 5])
    add("TrainingModel", lambda m, x, d, v: training.TrainingModel(m, terms=v), "terms", [[5]])

    # --- tfqreg.ptq
    add("ptq.quantize", lambda m, x, d, v: ptq.quantize(v, 8), "model", ["m", None])
    add("ptq.quantize", lambda m, x, d, v: ptq.quantize(m, v), "weight_bits",
        BAD_INT + [None, -1, 0, 1, 17, 10 ** 9])
    add("ptq.quantize", lambda m, x, d, v: ptq.quantize(m, 8, activation_bits=v, calibration_data=x),
        "activation_bits", BAD_INT + [-1, 0, 10 ** 9])
    for arg in ("per_channel", "narrow_range"):
        add("ptq.quantize", lambda m, x, d, v, arg=arg: ptq.quantize(m, 8, **{arg: v}), arg,
            BAD_BOOL)
    add("ptq.quantize", lambda m, x, d, v: ptq.quantize(m, 8, activation_bits=8,
                                                        calibration_data=v),
        "calibration_data", ["x", 5, np.full((2, 8, 8, 1), np.nan, "f4"),
                             np.full((2, 8, 8, 1), np.inf, "f4"),
                             np.zeros((2, 8, 8, 1), np.uint8), np.zeros((2, 9, 9, 1), "f4")])
    y = np.zeros(8, np.int64)
    add("ptq.sweep", lambda m, x, d, v: ptq.sweep(v, (x, y), progress=False), "model",
        ["m", None])
    add("ptq.sweep", lambda m, x, d, v: ptq.sweep(m, v, progress=False), "data",
        ["x", None, 5])
    add("ptq.sweep", lambda m, x, d, v: ptq.sweep(m, (x, v), progress=False), "data",
        [np.full(8, 3), np.full(8, -1), np.full(8, 0.5), np.zeros(7, np.int64)])
    add("ptq.sweep", lambda m, x, d, v: ptq.sweep(m, (x, y), weight_bits=v, progress=False),
        "weight_bits", [4, "8", [True], [1], [None], [17]])
    add("ptq.sweep", lambda m, x, d, v: ptq.sweep(m, (x, y), extra=v, progress=False), "extra",
        [5, [(8,)], "x"])
    for arg in ("per_channel", "narrow_range", "progress"):
        add("ptq.sweep", lambda m, x, d, v, arg=arg: ptq.sweep(m, (x, y), **{arg: v}), arg,
            BAD_BOOL)

    # --- tfqreg.deploy
    def tfl(arg, **base):
        return lambda m, x, d, v: deploy.to_tflite(m, **dict(base, **{arg: v}))

    add("to_tflite", lambda m, x, d, v: deploy.to_tflite(v), "model", ["m", None])
    add("to_tflite", tfl("mode"), "mode", BAD_CHOICE + [None])
    add("to_tflite", tfl("representative_data", mode="int8"), "representative_data",
        ["x", 5, np.full((4, 8, 8, 1), np.nan, "f4"), np.zeros((4, 8, 8, 1), np.uint8),
         np.zeros((4, 8, 8), "f4"), np.zeros((0, 8, 8, 1), "f4")])
    add("to_tflite", tfl("io_dtype", mode="int8", representative_data=np.zeros((4, 8, 8, 1),
                                                                              "f4")),
        "io_dtype", BAD_CHOICE)
    add("to_tflite", tfl("batch_size"), "batch_size", BAD_INT + [-1, 0, 10 ** 9])
    add("to_tflite", tfl("sample"), "sample", ["x", 5, np.zeros((4, 9, 9, 1), "f4")])
    add("to_tflite", tfl("path"), "path", [5, True])
    add("to_tflite", tfl("atol"), "atol", BAD_REAL + [-1.0])
    add("to_tflite", tfl("min_agreement"), "min_agreement", BAD_REAL + [-1.0, 1.5, 1e308])
    add("to_tflite", tfl("calibration_samples"), "calibration_samples", BAD_INT + [-250, 0])
    add("to_tflite", tfl("weight_bits"), "weight_bits", BAD_INT + [-1, 0, 3, 10 ** 9])
    add("to_tflite", tfl("runtime"), "runtime", BAD_CHOICE + [None])
    for arg in ("check", "allow_float_ops", "per_channel", "overwrite"):
        add("to_tflite", tfl(arg), arg, BAD_BOOL)

    def mic(arg):
        return lambda m, x, d, v: deploy.to_micro(m, x, str(d), **{arg: v})

    add("to_micro", lambda m, x, d, v: deploy.to_micro(v, x, str(d)), "model", ["m", None])
    add("to_micro", lambda m, x, d, v: deploy.to_micro(m, v, str(d)), "representative_data",
        ["x", 5, None])
    add("to_micro", lambda m, x, d, v: deploy.to_micro(m, x, v), "out_dir", [5, None])
    add("to_micro", mic("name"), "name", [5, None, True, "my-model"])
    add("to_micro", mic("arena_margin"), "arena_margin",
        [(1e30, 0), (-1, 0), 5, "x", (0, NAN), (1024.5, 0.1), (1024, 1e9), (True, 0.1)])
    add("to_micro", mic("io_dtype"), "io_dtype", BAD_CHOICE + [None, "float32"])
    add("to_micro", mic("min_agreement"), "min_agreement", BAD_REAL + [-1.0, 1e308])
    add("to_micro", mic("weight_bits"), "weight_bits", BAD_INT + [-1, 0, 2, 10 ** 9])
    for arg in ("check", "overwrite"):
        add("to_micro", mic(arg), arg, BAD_BOOL)

    # --- tfqreg.compression
    for arg, values in (("fraction", BAD_REAL + [-1.0, 1e308]),
                        ("bits", BAD_INT + [None, -1, 0, 10 ** 9]),
                        ("prune_epochs", BAD_INT + [None, -1]),
                        ("quant_epochs", BAD_INT + [None, -1]),
                        ("per_channel", BAD_BOOL), ("narrow_range", BAD_BOOL),
                        ("layers", BAD_NAMES + [[], [None], ("c1", 5)]),
                        ("metrics", BAD_NAMES + [None, [None], {"accuracy": 1}]),
                        ("learning_rate", BAD_REAL + [-1.0, 0.0]),
                        ("quant_learning_rate", ["x", True, [1.0], NAN, INF, -1.0, 0.0]),
                        ("batch_size", BAD_INT + [None, -1, 0]),
                        ("beta", BAD_REAL + [-1.0, 0.0, 1e308]),
                        ("alpha_init", ["x", True, None, [1.0], NAN, INF, -1e3, 50.0, 1e308]),
                        ("alpha_max", BAD_REAL + [-1.0, 1e308]),
                        ("mode", BAD_CHOICE + [None]),
                        ("grid_tol", ["x", True, [1.0], NAN, INF, -1.0, 0.0]),
                        ("per_layer_terms", BAD_BOOL),
                        ("steps_per_epoch", BAD_INT + [-1, 0]),
                        ("verbose", BAD_INT + [None, -1, 3])):
        add("Compressor", ctor(compression.Compressor, arg), arg, values)
    add("Compressor", lambda m, x, d, v: compression.Compressor(alpha_init=1.0, alpha_max=v),
        "alpha_max", [0.5, -100.0])

    # --- tfqreg.datasets
    add("datasets.load", lambda m, x, d, v: datasets.load(name=v), "name", BAD_CHOICE + [None])
    add("datasets.load", lambda m, x, d, v: datasets.load(batch_size=v), "batch_size",
        BAD_INT + [None, -1, 0])
    for arg, values in (("files_dir", [5, True, b"dir", ["dir"]]),
                        ("data_dir", [5, True, b"dir", ["dir"]]),
                        ("shuffle", BAD_BOOL),
                        ("seed", BAD_INT + [-1, 2 ** 63]),
                        ("train_take", BAD_INT + [-1, 0]),
                        ("test_take", BAD_INT + [-1, 0])):
        add("datasets.load", lambda m, x, d, v, arg=arg: datasets.load(**{arg: v}), arg, values)
    for arg in ("files_dir", "data_dir"):
        add("datasets.load_numpy", lambda m, x, d, v, arg=arg: datasets.load_numpy(**{arg: v}),
            arg, [5, True])
    add("datasets.find_files_dir",
        lambda m, x, d, v: datasets.find_files_dir("mnist", files_dir=v), "files_dir", [5, True])
    return c


CASES = [(f"{name}-{arg}-{v!r}"[:80], call, arg, v)
         for name, call, arg, values in _cases() for v in values]


@pytest.mark.parametrize("case_id, call, arg, value", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_named(case_id, call, arg, value, model, x, tmp_path):
    with pytest.raises((TypeError, ValueError)) as e:
        call(model, x, tmp_path, value)
    msg = str(e.value)
    assert type(e.value).__module__.split(".")[0] in ("builtins", "tfqreg"), type(e.value)
    assert f"`{arg}" in msg or re.search(rf"\b{re.escape(arg)}\b", msg), msg
    assert "\n" not in msg.strip(), msg


def test_edge_values_that_stay_valid(model, tmp_path):
    """What the checks above must not refuse: the bounds themselves, larq's metric list, one
    name for ``layers`` / ``metrics`` (as tfqreg.training), a negative α₀ (a small e^α)."""
    assert quantizers.FoothillSign(beta=1e6).beta == 1e6
    assert list(quantizers.FoothillSign(metrics=("flip_ratio",))._custom_metrics) == ["flip_ratio"]
    assert quantizers.FoothillSign(metrics=None)._custom_metrics is None
    loss = losses.Foothill(alpha=1e6, beta=1e6, reduction="sum")
    assert (loss.alpha, loss.beta, loss.reduction) == (1e6, 1e6, "sum")
    assert losses.Foothill.from_config(loss.get_config()).reduction == "sum"
    comp = compression.Compressor(layers="c1", metrics="accuracy", beta=1e6, alpha_init=-80.0,
                                  alpha_max=-1.0, learning_rate=1e-2, steps_per_epoch=5,
                                  per_layer_terms=False, verbose=0, grid_tol=0.1)
    assert (comp.layers, comp.metrics, comp.alpha_init, comp.alpha_max) == \
        (["c1"], ["accuracy"], -80.0, -1.0)
    assert compression.Compressor(metrics=[keras.metrics.SparseCategoricalAccuracy()]).metrics
    assert compression.Compressor.from_config(comp.get_config()).get_config() == comp.get_config()
    assert compression.Compressor(alpha_max=0.0).alpha_max == 0.0


def test_the_cases_cover_every_kind_of_bad_value():
    """The table is not accidentally thin: every kind of bad value occurs, for each family."""
    kinds = {"str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
             "None": lambda v: v is None, "list": lambda v: isinstance(v, list),
             "nan": lambda v: isinstance(v, float) and math.isnan(v),
             "inf": lambda v: isinstance(v, float) and math.isinf(v),
             "negative": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and v < 0,
             "huge": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
             and v >= 1e9}
    for kind, test in kinds.items():
        assert any(test(v) for _, _, _, v in CASES), kind
    families = {cid.split("-")[0] for cid, _, _, _ in CASES}
    assert {"Foothill", "LInf", "MSQE", "PartialL2", "SoftMinMax", "Margin", "FoothillSign",
            "losses.Foothill", "GradientL1", "LearnableMSQE", "LearnablePartialL2",
            "TrainingModel", "ptq.quantize", "ptq.sweep", "to_tflite", "to_micro", "Compressor",
            "datasets.load"} <= families
    assert len(CASES) > 400
