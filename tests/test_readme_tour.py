"""The README's Python code blocks run as written, in order, on a slice of the real data, so the
API tour cannot rot (a fresh interpreter, in a scratch folder)."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_the_tour_blocks():
    blocks = readme_blocks()
    assert len(blocks) >= 7
    assert "load_numpy" in blocks[0]  # the set-up block comes first
    joined = "\n".join(blocks)
    for needle in ("regularizers.LInf", "quantize_model", "TrainingModel", "ptq.sweep",
                   "to_tflite", "to_micro", "weight_bits=4", "tfqreg.summary(model)",
                   "import keras ", "TrainingModel(k3model", 'load_model("k3.keras")',
                   "ptq.sweep(k3model"):
        assert needle in joined, needle
    assert "print(tfqreg.summary" not in joined  # summary prints; print() would double it


@pytest.mark.slow
def test_readme_python_blocks_run_in_order(data_dir, tmp_path):
    blocks = readme_blocks()
    setup = blocks[0].replace('"../shared/data"', repr(data_dir))
    # a small slice, as a first try does: 3,000 training and 1,000 test images
    setup += ("\nx, y, x_test, y_test = x[:3000], y[:3000], x_test[:1000], y_test[:1000]\n")
    script = "\n\n".join([setup] + blocks[1:])
    path = tmp_path / "tour.py"
    path.write_text(script)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("size as int8 TFLite file") <= 1  # the summary table once, not twice
    assert "PTQ sweep" in out and "int4" in out
