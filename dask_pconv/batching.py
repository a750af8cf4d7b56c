"""Batching: an epoch cut into index batches, split specs (``"batch:2,spatial:2x2"``) read,
written and checked against a batch, and one NumPy batch turned into Dask arrays chunked for
its split (on the accelerator if asked).

:func:`epoch_batches` cuts an epoch into index batches, :func:`parse_split` reads a split spec
(:func:`format_split` writes one back, :func:`check_split` checks one against a batch's shape)
and :func:`chunk_batch` turns one NumPy batch into Dask arrays chunked for that split
(``to_dask`` is its first name, kept).
"""

from __future__ import annotations

import numbers
import re
import uuid
import warnings

import dask.array as da
import numpy as np

from .ops import split as _split

__all__ = [
    "check_split",
    "chunk_batch",
    "epoch_batches",
    "format_split",
    "parse_split",
    "split_for",
    "to_dask",
]

_SPLIT_AXES = ("batch", "out_channel", "spatial")
#: the old spelling of ``out_channel``: read as it, with a DeprecationWarning (issue 10: it read
#: as input channels, which is what ``dask_pconv.split(x, channel=n)`` splits)
_OLD_CHANNEL = "channel"


def _check_int(value, name, minimum):
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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


def chunk_batch(x, t, split=None, to_device=None):
    """One NumPy batch (images and labels) as Dask arrays chunked for a split.

    Parameters
    ----------
    x : float array, shape (N, C, H, W)
        Images of one batch.
    t : int array, shape (N,) or (N, H, W)
        Their labels: one per image, or one per pixel (a segmentation network's targets).
    split : dict or str, optional
        As returned by :func:`parse_split` (a string is parsed first).  ``batch`` and
        ``spatial`` chunk ``x`` as :func:`dask_pconv.split` does.  ``out_channel`` (or its
        old name ``channel``) is *not* applied to the images: it splits the model's weights
        by output channel, which is the model's job, so ``x`` keeps all its channels in one
        chunk.
    to_device : callable, optional
        Copies a NumPy block to the accelerator (``cupy.asarray``), applied to every block.

    Returns
    -------
    xd : dask.array.Array, shape (N, C, H, W)
        ``x`` chunked ``(batch, 1, nh, nw)`` ways, the larger pieces first.
    td : dask.array.Array, shape (N,) or (N, H, W)
        ``t`` chunked along N exactly like ``xd``'s axis 0 (and per-pixel labels along H, W
        like ``xd``'s tiles).
    """
    split = _normalize_split(split)
    x = np.asarray(x)
    t = np.asarray(t)
    if x.ndim != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {x.shape}")
    if t.shape not in (x.shape[:1], x.shape[:1] + x.shape[2:]):
        n, _, h, w = x.shape
        raise ValueError(f"t must have shape ({n},) or ({n}, {h}, {w}) to match x {x.shape}, got {t.shape}")
    # dask_pconv.split fixes the chunk sizes; building the array with those chunks directly
    # (rather than rechunking one block) gives one graph piece per chunk, so on a cluster each
    # worker receives only its own part of the batch.
    single = da.from_array(x, chunks=x.shape, name=False)
    chunks = _split(single, batch=split.get("batch"), spatial=split.get("spatial")).chunks
    xd = da.from_array(x, chunks=chunks)
    td = da.from_array(t, chunks=(chunks[0],) + (chunks[2:] if t.ndim == 3 else ()))
    if to_device is None:
        return xd, td
    # a new name per call: with a name hashed from the batch, a batch seen again (the same
    # images evaluated after training on them, or full-batch steps) reused the keys of an
    # earlier graph, which Dask's optimisation had fused differently there, and the
    # distributed worker then waited forever for the earlier graph's dependency (the scheduler
    # takes a key to name one task only: https://github.com/dask/dask/issues/9888)
    return tuple(
        a.map_blocks(
            to_device, dtype=a.dtype, meta=to_device(a._meta), name=f"to-device-batch-{uuid.uuid4().hex}"
        )
        for a in (xd, td)
    )


#: the first name of :func:`chunk_batch`, kept for the code that imports it
to_dask = chunk_batch


def split_for(split, n):
    """``split`` for a batch of ``n`` images: a short last batch gets at most ``n`` pieces."""
    split = dict(split)
    if "batch" in split:
        split["batch"] = min(split["batch"], n)
    return split
