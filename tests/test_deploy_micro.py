"""tfqreg.deploy.micro: TFLite Micro parity, the measured arena, C++ that compiles and runs."""

import math
import shutil
import subprocess

import numpy as np
import pytest

from tfqreg import deploy, models
from tfqreg._keras import keras
from tfqreg.deploy import micro

GXX = shutil.which("g++")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, fashion_small):
    (x, _), (xt, _) = fashion_small
    out = tmp_path_factory.mktemp("micro")
    model = models.tiny_cnn()
    res = micro.to_micro(model, x[:300], str(out), name="fmnist", sample=xt[:200],
                         min_agreement=0.0)
    return res, out


def test_micro_vs_litert_comparison_is_what_both_runtimes_give(exported, fashion_small):
    res, _ = exported
    (_, _), (xt, _) = fashion_small
    m = res.micro_vs_litert
    assert m["samples"] == 200
    # recomputed here from the two runtimes' raw int8 outputs
    micro_out = deploy.Runner(res.flatbuffer, "micro").predict(xt[:200], raw=True)
    lite_out = deploy.Runner(res.flatbuffer, "litert", kernels="builtin").predict(xt[:200],
                                                                                raw=True)
    diff = np.abs(micro_out.astype(np.int32) - lite_out.astype(np.int32))
    assert m["identical_fraction"] == pytest.approx(np.mean(np.all(diff == 0, axis=-1)))
    assert m["max_abs_diff"] == diff.max()
    # the documented behaviour: identical but for a 1-unit rounding difference of int8
    # FULLY_CONNECTED on ~1 % of inputs (a SOFTMAX after it can widen it to a few units)
    assert m["identical_fraction"] >= 0.97 and m["max_abs_diff"] <= 4


def test_measured_arena_is_the_smallest_that_works(exported):
    res, _ = exported
    flat = res.flatbuffer
    assert micro.measure_arena(flat) == res.arena_measured
    assert micro.micro_runs_with(flat, res.arena_measured)
    assert not micro.micro_runs_with(flat, res.arena_measured - 1)
    assert res.arena_measured < 10 * len(flat)  # far below TFLM's default guess
    expected = res.arena_measured + 1024 + math.ceil(0.10 * res.arena_measured)
    assert res.arena_size == (expected + 15) // 16 * 16


def test_files_and_resolver(exported):
    res, out = exported
    assert (out / "fmnist.tflite").read_bytes() == res.flatbuffer
    assert res.resolver_methods == ["AddConv2D", "AddMean", "AddFullyConnected", "AddSoftmax"]
    h = (out / "fmnist_model_data.h").read_text()
    assert f"constexpr size_t kTensorArenaSize = {res.arena_size};" in h
    assert "tflite::MicroMutableOpResolver<4>" in h
    cc = (out / "fmnist_model_data.cc").read_text()
    assert "alignas(16) const unsigned char g_fmnist_model[]" in cc
    assert f"const unsigned int g_fmnist_model_len = {len(res.flatbuffer)};" in cc
    assert "TFLite Micro vs LiteRT" in res.to_text()


_MAIN = r"""
#include <cstdint>
#include <cstdio>
#include "fmnist_model_data.h"
int main() {
  unsigned long sum = 0;
  for (unsigned int i = 0; i < g_fmnist_model_len; ++i)
    sum = (sum * 31 + g_fmnist_model[i]) % 1000000007UL;
  std::printf("%u %lu %d %c%c%c%c %zu\n", g_fmnist_model_len, sum,
              (int)(reinterpret_cast<std::uintptr_t>(g_fmnist_model) % 16),
              g_fmnist_model[4], g_fmnist_model[5], g_fmnist_model[6], g_fmnist_model[7],
              kTensorArenaSize);
#ifdef WITH_STUB_TFLM
  FmnistOpResolver resolver;
  if (RegisterFmnistOps(resolver) != kTfLiteOk) return 2;
  for (unsigned int i = 0; i < resolver.count; ++i) std::printf("%s\n", resolver.names[i]);
#endif
  return 0;
}
"""

# A stand-in for TFLite Micro's header (tensorflow/lite/micro/micro_mutable_op_resolver.h) with
# just the four methods this model needs: enough to compile and run the generated snippet.
_STUB = r"""
#pragma once
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
namespace tflite {
template <unsigned int tOpCount> class MicroMutableOpResolver {
 public:
  const char* names[tOpCount];
  unsigned int count = 0;
  TfLiteStatus Add(const char* n) {
    if (count >= tOpCount) return kTfLiteError;
    names[count++] = n;
    return kTfLiteOk;
  }
  TfLiteStatus AddConv2D() { return Add("AddConv2D"); }
  TfLiteStatus AddMean() { return Add("AddMean"); }
  TfLiteStatus AddFullyConnected() { return Add("AddFullyConnected"); }
  TfLiteStatus AddSoftmax() { return Add("AddSoftmax"); }
};
}
"""


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(GXX is None, reason="no system C++ compiler")
def test_generated_cc_compiles_links_and_holds_the_model(exported):
    res, out = exported
    _run([GXX, "-std=c++17", "-Wall", "-Werror", "-c", "fmnist_model_data.cc"], out)
    (out / "main.cc").write_text(_MAIN)
    _run([GXX, "-std=c++17", "-Wall", "-o", "check", "main.cc", "fmnist_model_data.cc"], out)
    length, checksum, misalign, ident, arena = _run(["./check"], out).split()
    s = 0
    for b in res.flatbuffer:
        s = (s * 31 + b) % 1000000007
    assert int(length) == len(res.flatbuffer) and int(checksum) == s
    assert int(misalign) == 0 and ident == "TFL3" and int(arena) == res.arena_size


@pytest.mark.skipif(GXX is None, reason="no system C++ compiler")
def test_resolver_snippet_compiles_against_the_resolver_interface(exported):
    res, out = exported
    stub = out / "stub" / "tensorflow" / "lite" / "micro"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "micro_mutable_op_resolver.h").write_text(_STUB)
    (out / "main.cc").write_text(_MAIN)
    _run([GXX, "-std=c++17", "-DWITH_STUB_TFLM", f"-I{out / 'stub'}", "-o", "check_ops",
          "main.cc", "fmnist_model_data.cc"], out)
    lines = _run(["./check_ops"], out).split("\n")[1:]
    assert [ln for ln in lines if ln] == res.resolver_methods


def test_lce_model_is_refused_naming_the_custom_op():
    flat = deploy.to_lce(models.bnn(), check=False).flatbuffer
    with pytest.raises(deploy.ConversionError, match="LceQuantize"):
        micro.resolver_methods(flat)


@pytest.mark.parametrize("kwargs, name", [
    (dict(name="my-model"), "name"),
    (dict(arena_margin=(-1, 0.1)), "arena_margin"),
    (dict(arena_margin=(1e30, 0)), r"arena_margin\[0\].*<= 67108864"),   # was a 1e30-B arena
    (dict(arena_margin=(1024, 1e9)), r"arena_margin\[1\].*at most 10"),
    (dict(arena_margin=(1024, float("nan"))), r"arena_margin\[1\].*finite"),
    (dict(io_dtype="float32"), "io_dtype"),
])
def test_bad_arguments(tmp_path, kwargs, name):
    x = np.zeros((4, 28, 28, 1), "float32")
    with pytest.raises(ValueError, match=name):
        micro.to_micro(models.tiny_cnn(), x, str(tmp_path), **kwargs)


@pytest.mark.parametrize("margin", [(1024.5, 0.1), ("1024", 0.1), (1024, "0.1"), (True, 0.1),
                                    1024, (1, 2, 3)])
def test_arena_margin_of_the_wrong_type_is_named(tmp_path, margin):
    with pytest.raises(TypeError, match="arena_margin"):
        micro.to_micro(models.tiny_cnn(), np.zeros((4, 28, 28, 1), "f4"), str(tmp_path),
                       arena_margin=margin)


def test_existing_files_are_refused_unless_overwrite(exported, tmp_path, fashion_small):
    """to_micro refuses to replace its files before converting; overwrite=True replaces them."""
    (x, _), (xt, _) = fashion_small
    res, out = exported
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError, match=r"^`out_dir`: .*fmnist\.tflite.*overwrite=True"):
        micro.to_micro(models.tiny_cnn(), x[:300], str(out), name="fmnist")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="`out_dir`"):
        micro.to_micro(models.tiny_cnn(), x[:300], str(tmp_path / "file"))
    (tmp_path / "m.tflite").write_bytes(b"old")
    keras.utils.set_random_seed(1)
    again = micro.to_micro(models.tiny_cnn(), x[:300], str(tmp_path), name="m", sample=xt[:20],
                           min_agreement=0.0, overwrite=True)
    assert (tmp_path / "m.tflite").read_bytes() == again.flatbuffer


def test_wrong_representative_data(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, 28, 28, 1\)"):
        micro.to_micro(models.tiny_cnn(), np.zeros((4, 28, 28), "f4"), str(tmp_path))


def test_result_is_accepted_wherever_a_flatbuffer_is(exported):
    res, _ = exported
    assert deploy.read_tflite(res).op_names == res.ops
    assert micro.measure_arena(res) == res.arena_measured
    x = np.zeros((2, 28, 28, 1), "float32")
    np.testing.assert_array_equal(deploy.Runner(res, "micro").predict(x, raw=True),
                                  deploy.Runner(res.flatbuffer, "micro").predict(x, raw=True))


def test_damaged_file_is_a_value_error(exported):
    res, _ = exported
    for fn in (micro.measure_arena, micro.resolver_methods):
        with pytest.raises(ValueError, match="truncated or damaged"):
            fn(res.flatbuffer[:-64])
