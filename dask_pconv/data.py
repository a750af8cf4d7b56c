"""Datasets (no cluster code).

Every loader returns a pair of :class:`Dataset` objects whose images are float32
``(N, 3, 32, 32)`` in ``[0, 1]`` (no per-channel normalisation) and whose labels are int64
``(N,)``:

- :func:`load_digits` -- scikit-learn's bundled 8x8 digits, upscaled; works offline and is the
  default.
- :func:`load_cifar10` -- CIFAR-10's *python* batches from a local directory.
- :func:`synthetic` -- a small learnable set made from a seed.

:func:`epoch_batches`, :func:`parse_split`, :func:`format_split`, :func:`check_split` and
:func:`~dask_pconv.batching.chunk_batch` (and ``to_dask``, its first name) live in
:mod:`dask_pconv.batching` and are importable from here too.
"""

from __future__ import annotations

import functools
import numbers
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .batching import _check_int, check_split, chunk_batch, epoch_batches, format_split, parse_split, to_dask

__all__ = [
    "DATASETS",
    "Dataset",
    "check_split",
    "chunk_batch",
    "epoch_batches",
    "format_split",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "parse_split",
    "synthetic",
    "to_dask",
]

DATASETS = ("digits", "cifar10", "synthetic")

_CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_CLASSES = 10
_CIFAR_SHAPE = (3, 32, 32)  # each row of b'data' is 1024 R, then 1024 G, then 1024 B values
_CIFAR_TRAIN_RE = re.compile(r"data_batch_(\d+)")


def _check_fraction(value, name):
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not 0 < value < 1:
        raise ValueError(f"{name} must be strictly between 0 and 1, got {value!r}")
    return float(value)


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Images and labels held in memory as NumPy arrays.

    Parameters
    ----------
    x : float array, shape (N, C, H, W)
        Images, stored as float32.  The loaders of this module give ``(N, 3, 32, 32)`` with
        values in ``[0, 1]``.
    t : array of ints, shape (N,) or (N, H, W)
        Class labels in ``[0, n_classes)``, stored as int64: one per image, or one per pixel
        (the targets of a segmentation network, whose output is ``(N, n_classes, H, W)``).
    n_classes : int
        Number of classes (the width of the model's last layer, or its output channels).
    name : str
        A label for logs, e.g. ``"digits/train"``.

    Raises
    ------
    ValueError
        If the shapes disagree or a label is outside ``[0, n_classes)``.
    TypeError
        If ``x`` is not floating or ``t`` not integer.
    """

    x: np.ndarray
    t: np.ndarray
    n_classes: int
    name: str = ""

    def __post_init__(self):
        n_classes = _check_int(self.n_classes, "n_classes", 1)
        x = np.asarray(self.x)
        t = np.asarray(self.t)
        if x.ndim != 4:
            raise ValueError(f"Dataset x must be 4-D (N, C, H, W), got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            # integer pixels would need a scale (255? 16?) that only the loader knows
            raise TypeError(f"Dataset x must have a floating dtype, got {x.dtype}")
        if t.shape not in (x.shape[:1], x.shape[:1] + x.shape[2:]):
            n, _, h, w = x.shape
            raise ValueError(
                f"Dataset t must have shape ({n},) or ({n}, {h}, {w}) to match x {x.shape}, got {t.shape}"
            )
        if len(t) and not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"Dataset t must hold integer labels, got dtype {t.dtype}")
        if len(t) and (t.min() < 0 or t.max() >= n_classes):
            raise ValueError(f"Dataset labels must lie in [0, {n_classes}), got range [{t.min()}, {t.max()}]")
        object.__setattr__(self, "x", x.astype(np.float32, copy=False))
        object.__setattr__(self, "t", t.astype(np.int64, copy=False))
        object.__setattr__(self, "n_classes", n_classes)

    def __len__(self):
        return len(self.t)

    def __repr__(self):
        return f"Dataset(name={self.name!r}, x={self.x.shape}, n_classes={self.n_classes})"


# --- CIFAR-10 ---------------------------------------------------------------------------


def _cifar_root(data_dir):
    """The folder that holds the batch files: ``data_dir`` or its ``cifar-10-batches-py``."""
    base = Path(data_dir).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {str(base)!r} does not exist or is not a directory")
    for root in (base, base / _CIFAR_SUBDIR):
        if root.is_dir() and any(
            p.name == "test_batch" or _CIFAR_TRAIN_RE.fullmatch(p.name) for p in root.iterdir()
        ):
            return root
    raise FileNotFoundError(
        f"no CIFAR-10 python batches ('data_batch_1'..'data_batch_5', 'test_batch') in "
        f"{str(base)!r} or its {_CIFAR_SUBDIR!r} subfolder; download and extract {_CIFAR_URL}"
    )


def _cifar_entry(batch, key, path):
    # The original files were pickled by Python 2, so encoding="bytes" yields bytes keys;
    # files re-saved by Python 3 may have str keys.
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise ValueError(f"{str(path)!r} has no {key.encode()!r} entry (keys: {sorted(map(repr, batch))})")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and NumPy arrays, and nothing else: a pickle that
    names any other callable (``os.system``, ...) is refused before it can run, so a
    malicious file in the data folder cannot execute code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")


def _read_cifar_batch(path):
    """One CIFAR-10 python batch as (uint8 (N, 3, 32, 32), int64 (N,))."""
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # unpickling junk raises many kinds of errors
        raise ValueError(f"{str(path)!r} is not a CIFAR-10 python batch: unpickling failed ({e!r})") from e
    if not isinstance(batch, dict):
        raise ValueError(
            f"{str(path)!r} must hold a dict with b'data' and b'labels', got {type(batch).__name__}"
        )
    data = np.asarray(_cifar_entry(batch, "data", path))
    labels = np.asarray(_cifar_entry(batch, "labels", path))
    size = int(np.prod(_CIFAR_SHAPE))
    if data.ndim != 2 or data.shape[1] != size or data.shape[0] == 0:
        raise ValueError(f"{str(path)!r}: b'data' must have shape (N, {size}) with N >= 1, got {data.shape}")
    if not np.issubdtype(data.dtype, np.integer):
        raise ValueError(f"{str(path)!r}: b'data' must hold uint8 pixels, got dtype {data.dtype}")
    if data.dtype != np.uint8 and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"{str(path)!r}: b'data' values must lie in [0, 255]")
    if labels.shape != (len(data),):
        raise ValueError(
            f"{str(path)!r}: b'labels' must hold {len(data)} labels (one per image), got shape {labels.shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{str(path)!r}: b'labels' must be integers, got dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= _CIFAR_CLASSES:
        raise ValueError(
            f"{str(path)!r}: labels must lie in [0, {_CIFAR_CLASSES}), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    return data.reshape((len(data),) + _CIFAR_SHAPE).astype(np.uint8), labels.astype(np.int64)


def _cifar_dataset(paths, name):
    parts = [_read_cifar_batch(p) for p in paths]
    x = np.concatenate([p[0] for p in parts]).astype(np.float32)  # (N, 3, 32, 32)
    x /= 255
    t = np.concatenate([p[1] for p in parts])
    return Dataset(x, t, _CIFAR_CLASSES, name)


def load_cifar10(data_dir):
    """Load CIFAR-10 from its python batches.

    Parameters
    ----------
    data_dir : str or path
        A folder holding ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` (as extracted
        from ``cifar-10-python.tar.gz``), or a folder whose ``cifar-10-batches-py`` subfolder
        holds them.  Every ``data_batch_<k>`` present is loaded, in order of ``k``; at least
        one is required.  ``batches.meta`` is not needed.  Each file is a pickled dict with
        ``b'data'``, uint8 of shape (n, 3072), and ``b'labels'``, n ints in [0, 10).

    Returns
    -------
    train, test : Dataset
        Images float32 (N, 3, 32, 32) in [0, 1]; labels int64 (N,); ``n_classes`` 10.
        The full set has N = 50000 and 10000.

    Raises
    ------
    FileNotFoundError
        If the folder or a required file is missing (the message names both).
    ValueError
        If a file is not a CIFAR-10 python batch (wrong keys, sizes or labels, or a pickle
        that asks for anything but arrays).

    Notes
    -----
    The pickles are read by a restricted unpickler, not by :func:`pickle.load`: it builds plain
    data (dicts, lists, bytes, numbers) and NumPy arrays only, and a pickle that names any other
    class or function (``os.system``, ...) is refused with a ``ValueError`` before that is
    called, so a tampered file cannot run code.
    """
    root = _cifar_root(data_dir)
    numbered = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CIFAR_TRAIN_RE.fullmatch(p.name))]
    if not numbered:
        raise FileNotFoundError(f"missing 'data_batch_1' (no 'data_batch_*' file) in {str(root)!r}")
    test_path = root / "test_batch"
    if not test_path.is_file():
        raise FileNotFoundError(f"missing 'test_batch' in {str(root)!r}")
    train_paths = [p for _, p in sorted(numbered)]
    return _cifar_dataset(train_paths, "cifar10/train"), _cifar_dataset([test_path], "cifar10/test")


# --- small offline datasets ---------------------------------------------------------------


def _stratified_split(t, n_classes, val_fraction, seed):
    """Index arrays (train, val): about ``val_fraction`` of each class goes to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(t == c))
        k = int(round(val_fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    train, val = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"val_fraction={val_fraction} leaves an empty {'train' if len(train) == 0 else 'validation'} "
            f"set out of {len(t)} samples"
        )
    return train, val


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from e
    bunch = sk_load_digits()
    img = bunch.images.astype(np.float32) / 16  # (N, 8, 8), values 0..16 -> [0, 1]
    img = img.repeat(4, axis=1).repeat(4, axis=2)  # (N, 32, 32), nearest neighbour
    x = np.repeat(img[:, None], 3, axis=1)  # (N, 3, 32, 32), grey in all channels
    x.setflags(write=False)  # cached: callers get copies through fancy indexing
    return x, bunch.target.astype(np.int64)


def load_digits(val_fraction=0.2, seed=0):
    """scikit-learn's bundled handwritten digits, shaped like CIFAR-10.

    The 1,797 8x8 images (values 0..16) are scaled to [0, 1], upscaled to 32x32 by repeating
    each pixel 4x4 and copied into 3 channels.  Needs no download.

    Parameters
    ----------
    val_fraction : float
        Fraction of each class held out for validation, strictly between 0 and 1.
    seed : int
        Seed of the split; the same seed gives the same split.

    Returns
    -------
    train, val : Dataset
        Images float32 (N, 3, 32, 32) in [0, 1]; labels int64 (N,); ``n_classes`` 10.
        The two together hold all 1,797 images, each once, in their original order.
    """
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    seed = _check_int(seed, "seed", 0)
    x, t = _digits_arrays()
    train, val = _stratified_split(t, 10, val_fraction, seed)
    return Dataset(x[train], t[train], 10, "digits/train"), Dataset(x[val], t[val], 10, "digits/val")


def synthetic(n=512, n_classes=10, seed=0, val_fraction=0.2):
    """A small learnable dataset made from a seed.

    Each class has a fixed random pattern (8x8 per channel, upscaled to 32x32); an image is
    ``0.5 * pattern + 0.5 * uniform noise``.  Classes are balanced (``n`` need not divide).

    Parameters
    ----------
    n : int
        Number of images in train and val together.
    n_classes : int
        Number of classes.
    seed : int
        Seed of patterns, noise, labels and split; the same arguments give the same data.
    val_fraction : float
        Fraction of each class held out for validation, strictly between 0 and 1.

    Returns
    -------
    train, val : Dataset
        Images float32 (N, 3, 32, 32) in [0, 1]; labels int64 (N,).
    """
    n = _check_int(n, "n", 2)
    n_classes = _check_int(n_classes, "n_classes", 1)
    seed = _check_int(seed, "seed", 0)
    val_fraction = _check_fraction(val_fraction, "val_fraction")
    rng = np.random.default_rng(seed)
    coarse = rng.random((n_classes, 3, 8, 8), dtype=np.float32)
    patterns = coarse.repeat(4, axis=2).repeat(4, axis=3)  # (n_classes, 3, 32, 32)
    t = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    x = 0.5 * patterns[t] + 0.5 * rng.random((n, 3, 32, 32), dtype=np.float32)  # (n, 3, 32, 32)
    train, val = _stratified_split(t, n_classes, val_fraction, seed)
    return (
        Dataset(x[train], t[train], n_classes, "synthetic/train"),
        Dataset(x[val], t[val], n_classes, "synthetic/val"),
    )


def load_dataset(name="digits", data_dir=None, seed=0):
    """Load a dataset by name.

    Parameters
    ----------
    name : {'digits', 'cifar10', 'synthetic'}
        Which loader: :func:`load_digits` (the default, offline), :func:`load_cifar10` or
        :func:`synthetic` (with its defaults).
    data_dir : str or path, optional
        The CIFAR-10 folder; required for 'cifar10' and ignored by the others.
    seed : int
        Seed of the train/validation split ('digits') or of the data ('synthetic');
        CIFAR-10's train/test split is fixed and ignores it.

    Returns
    -------
    train, val : Dataset
        Images float32 (N, 3, 32, 32) in [0, 1]; labels int64 (N,).  For CIFAR-10 ``val`` is
        the test set.
    """
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {name!r}")
    key = name.strip().lower()
    if key == "digits":
        return load_digits(seed=seed)
    if key == "synthetic":
        return synthetic(seed=seed)
    if key == "cifar10":
        if data_dir is None:
            raise ValueError(
                f"dataset 'cifar10' needs data_dir: a folder with CIFAR-10's python batches ({_CIFAR_URL})"
            )
        return load_cifar10(data_dir)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(map(repr, DATASETS))}")
