"""tfqreg.summary: bits and memory per layer, sizes; larq's ModelProfile is the oracle for
binary networks."""

import gzip
import json

import numpy as np
import pytest

import larq as lq

import tfqreg
from tfqreg import export, models
from tfqreg._keras import keras


@pytest.mark.parametrize("quantizer", ["ste_sign", "foothill_sign"])
def test_bnn_memory_matches_larq(quantizer):
    import tfqreg.quantizers  # noqa: F401

    model = models.bnn(input_quantizer=quantizer, kernel_quantizer=quantizer)
    s = tfqreg.summarize(model)
    profile = lq.models.ModelProfile(model)
    assert [l.memory_bytes * 8 for l in s.layers] == [lp.memory for lp in profile.layer_profiles]
    assert s.quantized_bytes * 8 == profile.memory
    by_name = {l.name: l for l in s.layers}
    assert by_name["qconv2"].bits == [1] and by_name["bn1"].bits == [32]
    assert s.float32_bytes == 4 * model.count_params()


def test_float_model_is_32_bits_everywhere():
    model = models.small_cnn()
    s = tfqreg.summarize(model)
    assert s.total_params == 225_034 and s.float32_bytes == 4 * 225_034
    assert s.quantized_bytes == s.float32_bytes
    assert all(l.bits in ([], [32]) for l in s.layers)
    assert s.tflite_int8_bytes is None and any("representative_data" in n for n in s.notes)


def test_tfmot_and_tfqreg_quantize_wrappers():
    import tensorflow_model_optimization as tfmot
    from tfqreg import quantization

    base = models.tiny_cnn()
    s8 = tfqreg.summarize(tfmot.quantization.keras.quantize_model(base))
    s4 = tfqreg.summarize(quantization.quantize_model(models.tiny_cnn(), weight_bits=4))
    for s, bits in ((s8, 8), (s4, 4)):
        conv = [l for l in s.layers if "Conv2D" in l.type][0]
        kernel = [w for w in conv.weights if "kernel" in w.name][0]
        bias = [w for w in conv.weights if "bias" in w.name][0]
        assert kernel.bits == bits and bias.bits == 32
        others = sum(w.count for w in conv.weights if w is not kernel and w is not bias)
        assert conv.memory_bytes == kernel.count * bits / 8 + (bias.count + others) * 4
        assert conv.params == sum(w.count for w in conv.weights)
        assert conv.type == "QuantizeWrapper(Conv2D)"


def test_int8_sizes_with_representative_data(fashion_small):
    model = models.tiny_cnn()
    x = fashion_small[0][0][:100]
    lines = []
    assert tfqreg.summary(model, representative_data=x, print_fn=lines.append) is None
    s = tfqreg.summarize(model, representative_data=x)
    flat = export.to_tflite(model, mode="int8", representative_data=x, check=False).flatbuffer
    assert s.tflite_int8_bytes == len(flat)
    assert s.tflite_int8_gzip_bytes == len(gzip.compress(flat, 9))
    assert "size as int8 TFLite file" in lines[0] and "conv1" in lines[0]
    assert lines == [s.to_text()]  # printed once, the same table
    data = json.loads(s.to_json())
    assert data["layers"][0]["name"] == "conv1" and data["tflite_int8_bytes"] == len(flat)


def test_conversion_failure_is_a_note_not_an_error():
    s = tfqreg.summarize(models.tiny_cnn(), representative_data=np.zeros((4, 28, 28), "f4"))
    assert s.tflite_int8_bytes is None
    assert any("conversion failed" in n and "(N, 28, 28, 1)" in n for n in s.notes)


def test_bad_input():
    with pytest.raises(TypeError, match="model"):
        tfqreg.summary("not a model")
    with pytest.raises(ValueError, match="not built"):
        tfqreg.summarize(keras.Sequential([keras.layers.Dense(3)]))
    with pytest.raises(TypeError, match="print_fn"):
        tfqreg.summary(models.tiny_cnn(), print_fn=None)
