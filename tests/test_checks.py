"""The package's one argument checker (tfqreg._checks) and the places that use it: truthy
strings, bools posing as numbers, and wrong types are refused with the argument's name."""

import numpy as np
import pytest

import tfqreg
from tfqreg import _checks, compression, datasets, quantizers, training


@pytest.mark.parametrize("value", ["False", "no", 0, 1, None, np.float32(1)])
def test_check_bool_refuses_non_bools(value):
    with pytest.raises(TypeError, match="`flag` must be a bool"):
        _checks.check_bool("flag", value)
    assert _checks.check_bool("flag", np.bool_(False)) is False


def test_check_int_and_real():
    assert _checks.check_int("n", np.int64(3), low=1) == 3
    for bad, err in ((True, TypeError), (2.0, TypeError), ("3", TypeError), (0, ValueError)):
        with pytest.raises(err, match="`n`"):
            _checks.check_int("n", bad, low=1)
    assert _checks.check_real("x", 2, low=0.0, low_open=True) == 2.0
    for bad, err in ((True, TypeError), ("1", TypeError), (float("nan"), ValueError),
                     (0.0, ValueError), (float("inf"), ValueError)):
        with pytest.raises(err, match="`x`"):
            _checks.check_real("x", bad, low=0.0, low_open=True)


@pytest.mark.parametrize("make,arg", [
    (lambda: training.LearnableMSQE(per_channel="False"), "per_channel"),
    (lambda: training.LearnableMSQE(learn_step="yes"), "learn_step"),
    (lambda: training.LearnableMSQE(narrow_range=1), "narrow_range"),
    (lambda: compression.Compressor(per_channel="False"), "per_channel"),
    (lambda: compression.Compressor(narrow_range="no"), "narrow_range"),
    (lambda: quantizers.FoothillSign(beta=True), "beta"),
    (lambda: datasets.load("fashion_mnist", batch_size=True), "batch_size"),
    (lambda: compression.Compressor(layers=[1, 2]), "layers"),
])
def test_truthy_values_are_refused_everywhere(make, arg):
    with pytest.raises(TypeError, match=f"`{arg}`"):
        make()


def test_single_strings_are_one_name_not_characters():
    assert compression.Compressor(layers="c1").layers == ["c1"]
    assert compression.Compressor(metrics="accuracy").metrics == ["accuracy"]
