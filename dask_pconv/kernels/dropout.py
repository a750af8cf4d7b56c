"""Dropout masks that are a pure function of a key and each element's global index."""

from __future__ import annotations

import numpy as np

from ..backend import array_namespace
from ._namespace import layout_invariant

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _splitmix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@layout_invariant
def dropout_block(x, ratio, key, shape, location):
    """``x`` times the scaled keep-mask of its elements.

    ``location`` is the block's ``((lo, hi), ...)`` in the whole array of ``shape``; each
    element's uniform number is a hash of ``key`` and its flat index there, so the mask does not
    depend on the chunking and a recomputed task gives the same mask.
    """
    xp = array_namespace(x)
    flat = None
    for ax, (lo, hi) in enumerate(location):
        stride = int(np.prod(shape[ax + 1 :]))
        idx = xp.arange(lo, hi, dtype=xp.uint64) * np.uint64(stride)
        idx = idx.reshape((-1,) + (1,) * (len(shape) - ax - 1))
        flat = idx if flat is None else flat + idx
    with np.errstate(over="ignore"):
        h = _splitmix64(flat + np.uint64(key))
    u = (h >> np.uint64(11)).astype(xp.float64) * (1.0 / 2**53)  # uniform in [0, 1)
    scale = x.dtype.type(1.0 / (1.0 - ratio))
    return xp.where(u >= ratio, x * scale, x.dtype.type(0))
