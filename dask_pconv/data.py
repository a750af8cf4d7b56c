"""Datasets and batching into chunked Dask arrays (no cluster code).

Every loader returns a pair of :class:`Dataset` objects whose images are float32
``(N, 3, 32, 32)`` in ``[0, 1]`` (no per-channel normalisation) and whose labels are int64
``(N,)``:

- :func:`load_digits` -- scikit-learn's bundled 8x8 digits, upscaled; works offline and is the
  default.
- :func:`load_cifar10` -- CIFAR-10's *python* batches from a local directory.
- :func:`synthetic` -- a small learnable set made from a seed.

:func:`epoch_batches` cuts an epoch into index batches, :func:`parse_split` reads a split spec
such as ``"batch:2,spatial:2x2"`` (:func:`format_split` writes one back, :func:`check_split`
checks one against a batch's shape) and :func:`to_dask` turns one NumPy batch into Dask arrays
chunked for that split.
"""

from __future__ import annotations

import functools
import numbers
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np

from .ops import split as _split

__all__ = [
    "DATASETS",
    "Dataset",
    "check_split",
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
_SPLIT_AXES = ("batch", "out_channel", "spatial")
#: the old spelling of ``out_channel``: read as it, with a DeprecationWarning (issue 10: it read
#: as input channels, which is what ``dask_pconv.split(x, channel=n)`` splits)
_OLD_CHANNEL = "channel"

_CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_CLASSES = 10
_CIFAR_SHAPE = (3, 32, 32)  # each row of b'data' is 1024 R, then 1024 G, then 1024 B values
_CIFAR_TRAIN_RE = re.compile(r"data_batch_(\d+)")


def _check_int(value, name, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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
    t : array of ints, shape (N,)
        Class labels in ``[0, n_classes)``, stored as int64.
    n_classes : int
        Number of classes (the width of the model's last layer).
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
        if t.ndim != 1 or len(t) != len(x):
            raise ValueError(f"Dataset t must have shape ({len(x)},) to match x {x.shape}, got {t.shape}")
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
        ``b'data'``, uint8 of shape (n, 3072), and ``b'labels'``, n ints in [0, 10).  The
        pickles are read by a restricted unpickler that builds only dicts, lists, bytes,
        numbers and NumPy arrays, so a tampered file cannot run code.

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
    The files are read with :mod:`pickle`, which can run code: only load files you trust.
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


# --- batching -----------------------------------------------------------------------------


def epoch_batches(n, batch_size, epoch, seed, drop_last=True):
    """Shuffled index batches for one epoch.

    The order is a permutation from ``np.random.default_rng([seed, epoch])``, so it is the
    same on every run and differs from epoch to epoch.

    Parameters
    ----------
    n : int
        Dataset size.
    batch_size : int
        Images per batch, ``1 <= batch_size <= n``.
    epoch, seed : int
        Non-negative; together they fix the permutation.
    drop_last : bool
        Drop the last batch when it has fewer than ``batch_size`` indices.

    Returns
    -------
    list of int64 arrays
        ``n // batch_size`` arrays of shape (batch_size,), plus one shorter array when
        ``drop_last`` is false and ``batch_size`` does not divide ``n``.  No index repeats.
    """
    n = _check_int(n, "n", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    if batch_size > n:
        raise ValueError(f"batch_size={batch_size} is more than the dataset size n={n}")
    epoch = _check_int(epoch, "epoch", 0)
    seed = _check_int(seed, "seed", 0)
    order = np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)
    stop = n - n % batch_size if drop_last else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


def _split_count(text, part, spec):
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise ValueError(f"bad count {text!r} in split part {part!r} of {spec!r}: must be a positive integer")
    return int(text)


def parse_split(spec):
    """Parse a split spec such as ``"batch:2,spatial:2x2"``.

    Parameters
    ----------
    spec : str
        Comma-separated ``axis:count`` parts, each axis at most once: ``batch:<n>`` (data
        parallel), ``out_channel:<n>`` (output channels of the weights, model parallel),
        ``spatial:<h>x<w>`` or ``spatial:<n>`` (meaning ``<n>x<n>`` tiles, as
        ``dask_pconv.split(x, spatial=n)``).  ``"none"``, an empty string or None mean no
        split.  Case and spaces around parts are ignored.  ``channel:<n>`` is the old spelling
        of ``out_channel:<n>``: it is read as that, with a ``DeprecationWarning``.

    Returns
    -------
    dict
        Keys among ``'batch'`` (int), ``'out_channel'`` (int) and ``'spatial'`` ((int, int)),
        e.g. ``{'batch': 2, 'spatial': (2, 2)}``.

    Raises
    ------
    ValueError
        Naming the bad part: an unknown or repeated axis, a count that is not a positive
        integer, or a malformed ``HxW``.
    """
    if spec is None:
        return {}
    if not isinstance(spec, str):
        raise TypeError(f"split spec must be a string, got {spec!r}")
    text = spec.strip().lower()
    if text in ("", "none"):
        return {}
    out, old_part = {}, None
    for part in (p.strip() for p in text.split(",")):
        axis, sep, value = (s.strip() for s in part.partition(":"))
        if not sep:
            raise ValueError(
                f"split part {part!r} of {spec!r} must look like 'axis:count' "
                f"with axis one of {', '.join(_SPLIT_AXES)}"
            )
        old_spelling = axis == _OLD_CHANNEL
        if old_spelling:
            axis = "out_channel"
        if axis not in _SPLIT_AXES:
            raise ValueError(
                f"unknown split axis {axis!r} in part {part!r} of {spec!r}; "
                f"choose from {', '.join(_SPLIT_AXES)}"
            )
        if axis in out:
            raise ValueError(f"split axis {axis!r} is given twice in {spec!r}")
        if axis == "spatial":
            hw = [s.strip() for s in value.split("x")]
            if len(hw) == 1:
                hw = hw * 2
            if len(hw) != 2:
                raise ValueError(f"split part {part!r} of {spec!r} must be 'spatial:HxW' or 'spatial:N'")
            out[axis] = tuple(_split_count(s, part, spec) for s in hw)
        else:
            out[axis] = _split_count(value, part, spec)
        if old_spelling:
            old_part = part
    if old_part is not None:  # once the whole spec is known to be good
        warnings.warn(
            f"split part {old_part!r}: 'channel:N' is the old spelling of 'out_channel:N' (the "
            "weights' output channels, not dask_pconv.split's input channels); read as "
            f"'out_channel:{out['out_channel']}'",
            DeprecationWarning,
            stacklevel=2,
        )
    return out


def _normalize_split(split):
    """A split dict with the old ``channel`` key renamed ``out_channel``; unknown keys refused."""
    if split is None or isinstance(split, str):
        return parse_split(split)
    if not isinstance(split, dict):
        raise TypeError(f"split must be a dict from parse_split or a string, got {split!r}")
    split = dict(split)
    if _OLD_CHANNEL in split:
        if "out_channel" in split:
            raise ValueError(f"split {split!r} gives both 'channel' (the old name) and 'out_channel'")
        split["out_channel"] = split.pop(_OLD_CHANNEL)
    unknown = set(split) - set(_SPLIT_AXES)
    if unknown:
        raise ValueError(f"unknown split axes {sorted(unknown)}; choose from {', '.join(_SPLIT_AXES)}")
    return split


def format_split(split):
    """A split dict written as a spec :func:`parse_split` reads back, e.g. ``"batch:2,spatial:2x2"``.

    Parameters
    ----------
    split : dict
        As returned by :func:`parse_split` (the old key ``channel`` is written as ``out_channel``).

    Returns
    -------
    str
        The parts in the order ``batch``, ``out_channel``, ``spatial`` (always ``HxW``), or
        ``"none"`` for no split.
    """
    split = _normalize_split(split)
    parts = []
    for axis in _SPLIT_AXES:
        if axis in split:
            v = split[axis]
            parts.append(f"{axis}:{v[0]}x{v[1]}" if axis == "spatial" else f"{axis}:{v}")
    return ",".join(parts) or "none"


def check_split(split, shape):
    """Check that a split fits batches of ``shape``, before anything is built or started.

    Parameters
    ----------
    split : dict or str
        As returned by :func:`parse_split` (a string is parsed first).
    shape : tuple of int
        A batch's shape ``(N, C, H, W)``.

    Returns
    -------
    dict
        The split, with the old key ``channel`` renamed ``out_channel``.

    Raises
    ------
    ValueError
        If ``batch`` asks for more pieces than the ``N`` images, or ``spatial`` for more tiles
        than the image has rows or columns (a tile holds at least one pixel).  That is all a
        spatial split needs: the tiles of the smaller feature maps deeper in a network are
        merged by the pooling layers on their own (VGG16's last 1x1 map is one tile).
        ``out_channel`` is not checked here: a model splits each layer into at most as many
        pieces as it has output channels.
    """
    split = _normalize_split(split)
    n, _, h, w = shape
    if split.get("batch", 1) > n:
        raise ValueError(f"batch:{split['batch']} asks for more pieces than the {n} images of a batch")
    nh, nw = split.get("spatial", (1, 1))
    if nh > h or nw > w:
        raise ValueError(
            f"spatial:{nh}x{nw} asks for more tiles than an image has pixels ({h}x{w}): a tile holds "
            "at least one row and one column"
        )
    return split


def to_dask(x, t, split=None):
    """Wrap one NumPy batch as Dask arrays chunked for a split.

    Parameters
    ----------
    x : float array, shape (N, C, H, W)
        Images of one batch.
    t : int array, shape (N,)
        Their labels.
    split : dict or str, optional
        As returned by :func:`parse_split` (a string is parsed first).  ``batch`` and
        ``spatial`` chunk ``x`` as :func:`dask_pconv.split` does.  ``out_channel`` (or its
        old name ``channel``) is *not* applied to the images: it splits the model's weights
        by output channel, which is the model's job, so ``x`` keeps all its channels in one
        chunk.

    Returns
    -------
    xd : dask.array.Array, shape (N, C, H, W)
        ``x`` chunked ``(batch, 1, nh, nw)`` ways, the larger pieces first.
    td : dask.array.Array, shape (N,)
        ``t`` chunked along N exactly like ``xd``'s axis 0.
    """
    split = _normalize_split(split)
    x = np.asarray(x)
    t = np.asarray(t)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {x.shape}")
    if t.shape != x.shape[:1]:
        raise ValueError(f"t must have shape ({len(x)},) to match x {x.shape}, got {t.shape}")
    # dask_pconv.split fixes the chunk sizes; building the array with those chunks directly
    # (rather than rechunking one block) gives one graph piece per chunk, so on a cluster each
    # worker receives only its own part of the batch.
    single = da.from_array(x, chunks=x.shape, name=False)
    chunks = _split(single, batch=split.get("batch"), spatial=split.get("spatial")).chunks
    xd = da.from_array(x, chunks=chunks)
    td = da.from_array(t, chunks=(chunks[0],))
    return xd, td
