"""MNIST and Fashion-MNIST as ``tf.data`` pipelines, through tensorflow-datasets, offline.

tensorflow-datasets builds ``mnist`` and ``fashion_mnist`` from the four original IDX files when
they are given as a manual folder, checking each file's size and SHA-256. Where the files are:

1. the ``files_dir`` argument (the folder holding the four ``*-ubyte.gz`` files, or its parent
   holding ``mnist/`` and ``fashion_mnist/``), else
2. the environment variable ``TFQREG_DATA_DIR`` (same two layouts), else
3. nowhere: plain ``tfds.load`` behaviour (downloads; for users with internet).

Missing files raise ``FileNotFoundError`` at once (tensorflow-datasets would otherwise fall back
to a download that retries for minutes on a machine without internet); a corrupted file raises
``ValueError`` naming it.

>>> from tfqreg import datasets
>>> train, test = datasets.load("fashion_mnist", batch_size=128)   # doctest: +SKIP
>>> x, y = next(iter(train))                                        # doctest: +SKIP
>>> x.shape, x.dtype                                                # doctest: +SKIP
(TensorShape([128, 28, 28, 1]), tf.float32)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from tfqreg import _checks
from tfqreg._keras import tf

__all__ = ["DATASETS", "FILES", "ENV_VAR", "find_files_dir", "local_files_dir", "load",
           "load_numpy"]

DATASETS = ("mnist", "fashion_mnist")
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
ENV_VAR = "TFQREG_DATA_DIR"
_DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tfqreg", "tfds")


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"`name` must be one of {DATASETS}, got {name!r}.")
    return name


def _check_dir(name: str, value) -> Optional[str]:
    """``None`` or a folder path (``str`` / ``os.PathLike``), else ``TypeError`` naming
    ``name``."""
    if value is None:
        return None
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"`{name}` must be a folder path (str or os.PathLike) or None, got "
                        f"{value!r} ({type(value).__name__}).")
    return os.fspath(value)


def _check_take(name: str, value) -> Optional[int]:
    """``None`` (every example) or a count >= 1 (``0`` would silently mean "all")."""
    if value is None:
        return None
    return _checks.check_int(name, value, low=1)


def local_files_dir(files_dir: Optional[str] = None) -> Optional[str]:
    """``files_dir`` for the scripts that ship with tfqreg (main job, examples, benchmarks).

    Returns ``files_dir`` or ``$TFQREG_DATA_DIR`` when either is set; else a ``shared/data``
    folder beside the working directory or beside the source checkout (the layout of the
    offline machines tfqreg is developed on), if one exists; else ``None`` (download as usual).
    The library's own loaders never look for that folder by themselves.
    """
    given = _check_dir("files_dir", files_dir) or os.environ.get(ENV_VAR)
    if given:
        return given
    checkout = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), checkout):
        candidate = base.parent / "shared" / "data"
        if candidate.is_dir():
            return str(candidate)
    return None


def find_files_dir(name: str, files_dir: Optional[str] = None) -> Optional[Path]:
    """The folder holding ``name``'s four IDX files, or ``None`` for "download as usual".

    Raises:
        FileNotFoundError: a folder was given (argument or ``TFQREG_DATA_DIR``) but does not hold
            the four files.
    """
    _check_name(name)
    files_dir = _check_dir("files_dir", files_dir)
    root = files_dir if files_dir is not None else os.environ.get(ENV_VAR) or None
    if root is None:
        return None
    root = Path(root).expanduser()
    for candidate in (root / name, root):
        if all((candidate / f).is_file() for f in FILES):
            return candidate.resolve()
    missing = [f for f in FILES if not (root / name / f).is_file() and not (root / f).is_file()]
    source = "files_dir" if files_dir is not None else f"${ENV_VAR}"
    raise FileNotFoundError(
        f"{name}: {source}={str(root)!r} does not hold the IDX files {missing} (looked in "
        f"{str(root / name)!r} and {str(root)!r}). tensorflow-datasets would try to download "
        "them instead; point tfqreg at a folder with all four files."
    )


def _registered_checksums(name: str) -> dict:
    """SHA-256 and size that tensorflow-datasets registers for ``name``'s files."""
    import tensorflow_datasets as tfds

    builder_cls = tfds.builder_cls(name)
    sums = {}
    for url, info in builder_cls.url_infos.items():
        sums[url.rsplit("/", 1)[-1]] = (info.size, info.checksum)
    return sums


def _verify(files: Path, name: str) -> None:
    sums = _registered_checksums(name)
    for fname in FILES:
        if fname not in sums:
            continue
        size, sha = sums[fname]
        path = files / fname
        if path.stat().st_size != size:
            raise ValueError(
                f"{name}: {path} has {path.stat().st_size} bytes, expected {size} "
                "(truncated or not the original file)."
            )
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha:
            raise ValueError(f"{name}: {path} is corrupted (SHA-256 {digest} != {sha}).")


def _tfds_load(name: str, files: Optional[Path], data_dir: Optional[str]):
    import tensorflow_datasets as tfds

    kwargs = {}
    if files is not None:
        _verify(files, name)
        data_dir = data_dir or _DEFAULT_DATA_DIR
        kwargs["download_and_prepare_kwargs"] = dict(
            # One download folder per data set: both use the same file names, and a shared
            # folder makes fashion_mnist silently reuse MNIST's extracted files.
            download_dir=os.path.join(data_dir, "downloads", name),
            download_config=tfds.download.DownloadConfig(
                manual_dir=str(files), try_download_gcs=False
            ),
        )
    return tfds.load(
        name, data_dir=data_dir, split=["train", "test"], as_supervised=True, **kwargs
    )


def _prepare(image, label):
    return tf.cast(image, tf.float32) / 255.0, label


def load(
    name: str = "fashion_mnist",
    batch_size: int = 128,
    files_dir: Optional[str] = None,
    data_dir: Optional[str] = None,
    shuffle: bool = True,
    seed: int = 0,
    train_take: Optional[int] = None,
    test_take: Optional[int] = None,
) -> Tuple[tf.data.Dataset, tf.data.Dataset]:
    """Train and test pipelines of ``(image, label)`` batches: images float32 in [0, 1] with
    shape ``(28, 28, 1)``, labels int64.

    Args:
        name: ``"mnist"`` or ``"fashion_mnist"``.
        batch_size: batch size of both pipelines.
        files_dir: folder with the IDX files (see module docstring); default ``$TFQREG_DATA_DIR``.
        data_dir: where tensorflow-datasets keeps the prepared data (default
            ``~/.cache/tfqreg/tfds`` when building from local files, tfds' default otherwise).
        shuffle: shuffle the training set (seeded).
        seed: shuffle seed, an integer in [0, 2**63 - 1], or ``None`` for an unseeded shuffle
            (a different order in every run, ``tf.data``'s behaviour without a seed).
        train_take, test_take: keep only the first N >= 1 examples (for quick runs); ``None``
            keeps all.

    Raises:
        TypeError, ValueError: a bad argument (named in the message), before any file is read.
    """
    _check_name(name)
    _checks.check_int("batch_size", batch_size, low=1)
    files_dir = _check_dir("files_dir", files_dir)
    data_dir = _check_dir("data_dir", data_dir)
    shuffle = _checks.check_bool("shuffle", shuffle)
    if seed is not None:
        seed = _checks.check_int("seed", seed, low=0, high=2 ** 63 - 1)
    train_take = _check_take("train_take", train_take)
    test_take = _check_take("test_take", test_take)
    files = find_files_dir(name, files_dir)
    train, test = _tfds_load(name, files, data_dir)
    if train_take is not None:
        train = train.take(train_take)
    if test_take is not None:
        test = test.take(test_take)
    train = train.map(_prepare, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle:
        train = train.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    train = train.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    test = test.map(_prepare, num_parallel_calls=tf.data.AUTOTUNE).cache()
    test = test.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    return train, test


def load_numpy(
    name: str = "fashion_mnist",
    files_dir: Optional[str] = None,
    data_dir: Optional[str] = None,
):
    """``(x_train, y_train), (x_test, y_test)`` as NumPy arrays (float32 in [0, 1], shape
    ``(N, 28, 28, 1)``; int64 labels), through the same tensorflow-datasets path as :func:`load`.
    """
    _check_name(name)
    files_dir = _check_dir("files_dir", files_dir)
    data_dir = _check_dir("data_dir", data_dir)
    files = find_files_dir(name, files_dir)
    train, test = _tfds_load(name, files, data_dir)
    out = []
    for split in (train, test):
        batch = next(iter(split.batch(100_000)))
        out.append(((batch[0].numpy().astype(np.float32) / 255.0), batch[1].numpy()))
    return tuple(out)
