"""tfqreg.deploy.samples and tfqreg.deploy.report: what every converter shares.

Oracles: NumPy on the same arrays (the forms of representative data all give the same
samples), closed-form parity numbers from a stand-in runner, and the JSON round trip.
"""

import json

import numpy as np
import pytest

from tfqreg import deploy, models
from tfqreg._keras import keras, tf
from tfqreg.deploy import report, samples


@pytest.fixture(scope="module")
def two_inputs():
    keras.utils.set_random_seed(0)  # the tie test needs weights whose argmax is not always 0
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    out = keras.layers.Dense(4, activation="softmax")(keras.layers.Concatenate()([a, b]))
    return keras.Model([a, b], out)


def test_input_specs_and_static_model(two_inputs):
    specs = samples.input_specs(two_inputs)
    assert [s.name for s in specs] == ["a", "b"]
    assert [s.shape.as_list() for s in specs] == [[None, 3], [None, 2]]
    static = samples.static_model(two_inputs, 4)
    assert [t.shape.as_list() for t in static.inputs] == [[4, 3], [4, 2]]
    assert static.weights[0] is two_inputs.weights[0]  # shared, not copied
    assert samples.static_model(two_inputs, None) is two_inputs
    assert samples.static_model(static, 4) is static
    with pytest.raises(ValueError, match="no known input shape"):
        samples.input_specs(keras.Sequential([keras.layers.Dense(2)]))


def test_every_form_of_data_gives_the_same_samples(two_inputs):
    specs = samples.input_specs(two_inputs)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 3)), rng.normal(size=(10, 2)).astype(np.float32)
    forms = [
        [a, b],
        tf.data.Dataset.from_tensor_slices((a, b)).batch(3),
        lambda: ([a[i], b[i]] for i in range(10)),       # single samples, no batch axis
        lambda: ({"a": a[i:i + 2], "b": b[i:i + 2]} for i in range(0, 10, 2)),
    ]
    for form in forms:
        xs = samples.to_samples(form, specs, "data", None)
        assert [x.dtype for x in xs] == [np.float32, np.float32]
        np.testing.assert_array_equal(xs[0], a.astype(np.float32))
        np.testing.assert_array_equal(xs[1], b)
    assert len(samples.to_samples([a, b], specs, "data", 4)[0]) == 4
    with pytest.raises(ValueError, match="has 1 arrays, but the model has 2 inputs"):
        samples.to_samples(a, specs, "data", None)
    with pytest.raises(TypeError, match="expects float32"):
        samples.to_samples([a.astype(int), b], specs, "data", None)
    with pytest.raises(ValueError, match="is empty"):
        samples.to_samples(lambda: iter([]), specs, "data", None)


def test_sample_inputs_defaults(two_inputs):
    specs = samples.input_specs(two_inputs)
    rep = [np.ones((2000, 3), np.float32), np.ones((2000, 2), np.float32)]
    assert len(samples.sample_inputs(specs, None, rep)[0]) == samples.CHECK_SAMPLES
    rand = samples.sample_inputs(specs, None, None)
    assert [x.shape for x in rand] == [(64, 3), (64, 2)]
    assert 0 <= rand[0].min() and rand[0].max() <= 1
    np.testing.assert_array_equal(rand[0], samples.sample_inputs(specs, None, None)[0])


class _Shifted:
    """A stand-in runner: the Keras output, shifted by a constant, one row's classes swapped."""

    backend = "fake"

    def __init__(self, model, shift, swap_rows=0):
        self.model, self.shift, self.swap_rows = model, shift, swap_rows

    def predict(self, xs):
        y = samples.keras_outputs(self.model, xs)[0] + self.shift
        for i in range(self.swap_rows):
            y[i] = y[i][::-1]
        return y


def test_measure_parity_closed_forms(two_inputs):
    xs = samples.sample_inputs(samples.input_specs(two_inputs), None, None)
    p = samples.measure_parity(two_inputs, _Shifted(two_inputs, 1e-3), xs, "float", 1e-2, 0.99)
    assert p.max_abs_diff == pytest.approx(1e-3, rel=1e-3) and p.passed
    assert p.top1_agreement == 1.0 and p.backend == "fake" and p.samples == 64
    p = samples.measure_parity(two_inputs, _Shifted(two_inputs, 1e-3), xs, "float", 1e-4, 0.99)
    assert not p.passed and "max|diff| <= 0.0001" in p.criterion
    want = samples.keras_outputs(two_inputs, xs)[0]
    swapped = int(np.sum(want[:8].argmax(1) != want[:8, ::-1].argmax(1)))
    p = samples.measure_parity(two_inputs, _Shifted(two_inputs, 0.0, 8), xs, "int8", 0, 0.9)
    assert p.top1_agreement == pytest.approx(1 - swapped / 64)
    assert p.passed == (p.top1_agreement >= 0.9)
    assert "FAIL" in p.to_text() or "PASS" in p.to_text()


def test_report_of_a_flatbuffer_and_its_json(tmp_path):
    model = models.tiny_cnn()
    res = deploy.to_tflite(model, check=False)
    r = report.ExportReport.from_flatbuffer(res.flatbuffer, model.count_params(), "tflite",
                                            "float", "float32", 1, ["n"], {"k": np.int64(3)})
    assert r.ops == deploy.read_tflite(res).op_names and r.tflite_bytes == len(res.flatbuffer)
    assert r.keras_float32_bytes == 4 * model.count_params()
    assert r.inputs[0]["shape_signature"] == [1, 28, 28, 1] and r.inputs[0]["scale"] is None
    data = json.loads(r.to_json())
    assert data["extra"] == {"k": 3} and data["notes"] == ["n"]
    assert "note: n" in r.to_text() and "k: 3" in r.to_text()
    out = report.ExportResult(res.flatbuffer, r).save(str(tmp_path / "m.tflite"))
    assert open(out, "rb").read() == res.flatbuffer
    assert json.loads((tmp_path / "m.json").read_text())["ops"] == r.ops


class _Tied:
    """Keras' class tied with another one in the first ``n`` outputs (a 1/256 softmax)."""

    backend = "fake"

    def __init__(self, model, n):
        self.model, self.n = model, n

    def predict(self, xs):
        y = samples.keras_outputs(self.model, xs)[0].copy()
        for i in range(self.n):
            k = int(y[i].argmax())
            other = 0 if k != 0 else 1
            y[i, other] = y[i, k]  # a tie; argmax takes the lower index
        return y


def test_parity_counts_a_tie_with_keras_class_as_agreement(two_inputs):
    xs = samples.sample_inputs(samples.input_specs(two_inputs), None, None)
    want = samples.keras_outputs(two_inputs, xs)[0]
    p = samples.measure_parity(two_inputs, _Tied(two_inputs, 20), xs, "int8", 0, 0.99)
    flips = int(np.sum(want[:20].argmax(1) != 0))  # ties that argmax resolves to class 0
    assert flips > 0
    assert p.top1_agreement == pytest.approx(1 - flips / 64)  # the strict figure, reported
    assert p.top1_agreement_ties == 1.0 and p.passed          # decided counting ties
    assert "tie" in p.criterion
