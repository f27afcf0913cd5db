"""tfqreg.datasets: MNIST and Fashion-MNIST built offline by tensorflow-datasets from the shipped
IDX files; shapes, dtypes, label ranges, the two data sets really differ (the shared-download-folder
trap), and fast, clear errors for a missing or corrupted file."""

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from tfqreg import datasets
from tfqreg._keras import tf

# Published per-pixel means of the training images (scaled to [0, 1]).
TRAIN_MEAN = {"mnist": 0.1307, "fashion_mnist": 0.2860}


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist"])
def test_load_pipelines(name, data_dir, tfds_dir):
    train, test = datasets.load(name, batch_size=100, files_dir=data_dir, data_dir=tfds_dir,
                                train_take=2000, test_take=300)
    n, means = 0, []
    for x, y in train:
        assert x.dtype == tf.float32 and x.shape[1:] == (28, 28, 1) and y.dtype == tf.int64
        assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0
        assert int(tf.reduce_min(y)) >= 0 and int(tf.reduce_max(y)) <= 9
        n += int(x.shape[0])
        means.append(float(tf.reduce_mean(x)))
    assert n == 2000
    assert abs(np.mean(means) - TRAIN_MEAN[name]) < 0.01
    sizes = [int(x.shape[0]) for x, _ in test]
    assert sizes == [100, 100, 100]
    labels = np.concatenate([y.numpy() for _, y in train])
    assert set(labels) == set(range(10))  # all classes present


def test_full_splits_and_the_two_sets_differ(data_dir, tfds_dir, fashion_small):
    (xm, ym), (xmt, ymt) = datasets.load_numpy("mnist", data_dir, tfds_dir)
    assert xm.shape == (60000, 28, 28, 1) and xmt.shape == (10000, 28, 28, 1)
    assert xm.dtype == np.float32 and ym.dtype == np.int64
    assert xm.max() == 1.0 and xm.min() == 0.0
    assert np.bincount(ym).min() > 5000  # every digit is well represented
    (xf, yf), (xft, yft) = fashion_small
    assert xf.shape == (6000, 28, 28, 1) and xft.shape == (2000, 28, 28, 1)
    # a shared download folder would hand fashion_mnist MNIST's images: they must differ
    assert abs(float(xm.mean()) - TRAIN_MEAN["mnist"]) < 0.002
    assert abs(float(xf.mean()) - TRAIN_MEAN["fashion_mnist"]) < 0.01
    assert not np.array_equal(xmt[:2000], xft)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in datasets.FILES:
        shutil.copyfile(src / f, dst / f)
        os.chmod(dst / f, 0o644)
    return dst


def test_missing_file_fails_fast(data_dir, tmp_path):
    files = _copy(Path(data_dir) / "mnist", tmp_path / "mnist")
    (files / "t10k-labels-idx1-ubyte.gz").unlink()
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte.gz"):
        datasets.load("mnist", files_dir=str(tmp_path), data_dir=str(tmp_path / "tfds"))
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError):
        datasets.load_numpy("mnist", files_dir=str(tmp_path / "nowhere"))


def test_corrupted_file_is_a_value_error(data_dir, tmp_path):
    files = _copy(Path(data_dir) / "mnist", tmp_path / "mnist")
    target = files / "train-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))
    start = time.monotonic()
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
        datasets.load("mnist", files_dir=str(files), data_dir=str(tmp_path / "tfds"))
    shutil.copyfile(Path(data_dir) / "mnist" / target.name, target)  # repair it
    truncated = files / "t10k-labels-idx1-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:-10])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.* bytes"):
        datasets.load("mnist", files_dir=str(files), data_dir=str(tmp_path / "tfds"))
    assert time.monotonic() - start < 20


def test_files_dir_from_environment(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    assert datasets.find_files_dir("mnist") is None  # plain tfds.load behaviour
    monkeypatch.setenv(datasets.ENV_VAR, data_dir)
    assert datasets.find_files_dir("fashion_mnist") == (Path(data_dir) / "fashion_mnist").resolve()
    # the folder itself may hold the four files
    assert datasets.find_files_dir("mnist", str(Path(data_dir) / "mnist")) == \
        (Path(data_dir) / "mnist").resolve()
    monkeypatch.setenv(datasets.ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=datasets.ENV_VAR):
        datasets.find_files_dir("mnist")


def test_local_files_dir_order(tmp_path, monkeypatch):
    monkeypatch.delenv(datasets.ENV_VAR, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    # no argument, no variable, no shared/data beside cwd: only the checkout's sibling counts
    checkout_shared = Path(datasets.__file__).resolve().parent.parent.parent / "shared" / "data"
    expected = str(checkout_shared) if checkout_shared.is_dir() else None
    assert datasets.local_files_dir() == expected
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert datasets.local_files_dir() == str(tmp_path / "shared" / "data")  # beside cwd first
    monkeypatch.setenv(datasets.ENV_VAR, "/from/env")
    assert datasets.local_files_dir() == "/from/env"
    assert datasets.local_files_dir("/from/arg") == "/from/arg"


def test_bad_arguments(data_dir):
    with pytest.raises(ValueError, match="`name`"):
        datasets.load("cifar10", files_dir=data_dir)
    with pytest.raises(ValueError, match="`batch_size`"):
        datasets.load("mnist", batch_size=0, files_dir=data_dir)
