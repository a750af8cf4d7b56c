"""Dropout masks that are a pure function of a key and each element's global index.

Element ``i`` (its flat index in the whole array, C order) is kept when ``u(i) >= T`` with
``T = round(ratio * 2**32)``: the keep probability is ``1 - T / 2**32``, within ``2**-33`` of
``1 - ratio``.  ``u`` is 32-bit arithmetic throughout (NumPy vectorises 32-bit multiplies; a
64-bit one costs several instructions), two rounds of Wellons' ``lowbias32`` integer hash
(github.com/skeeto/hash-prospector), each a bijection of the 32-bit integers::

    u(i) = mix(mix(lo(i) ^ k0) ^ k1)     lo(i) = i mod 2**32,  hi(i) = i >> 32
    k0 = lo(key) ^ mix(hi(i) + hi(key))  k1 = hi(key)           (32-bit wrap-around sums)

    mix(h):  h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15; h *= 0x846CA68B; h ^= h >> 16

so for a fixed key and ``hi(i)``, ``u`` is a permutation of the ``2**32`` values of ``lo(i)``
(each run of ``2**32`` elements keeps exactly ``2**32 - T``), and the second key word makes the
masks of two keys other than shifts of one another.  Arrays of fewer than ``2**32`` elements
(every ``hi(i)`` is 0) compute ``k0`` once, as a Python integer, and ``lo(i)`` in uint32.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_namespace
from ._namespace import layout_invariant
from ._select import where_zero

_MASK32 = 0xFFFFFFFF
_A, _B = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)


def _mix(h):
    """lowbias32 of a uint32 array, in place (and returned)."""
    h ^= h >> np.uint32(16)
    h *= _A
    h ^= h >> np.uint32(15)
    h *= _B
    h ^= h >> np.uint32(16)
    return h


def _mix_int(v):
    """lowbias32 of one Python integer in ``[0, 2**32)``."""
    v ^= v >> 16
    v = (v * 0x7FEB352D) & _MASK32
    v ^= v >> 15
    v = (v * 0x846CA68B) & _MASK32
    return v ^ (v >> 16)


def _flat_index(xp, shape, location, dtype):
    """Flat C-order index in ``shape`` of each element of the block at ``location``, built from
    the outer axes inwards so that only the last sum is the block's size."""
    flat = None
    for ax, (lo, hi) in enumerate(location):
        stride = int(np.prod(shape[ax + 1 :]))
        idx = xp.arange(lo, hi, dtype=dtype) * dtype(stride)
        idx = idx.reshape((-1,) + (1,) * (len(shape) - ax - 1))
        flat = idx if flat is None else flat + idx
    return flat


def _uniform32(xp, key, shape, location, wide=None):
    """``u(i)`` (see the module docstring) of the block's elements: uint32, the block's shape.

    ``wide`` (default: whether ``shape`` has ``2**32`` elements or more) computes the flat
    index in uint64 and ``k0`` per element; the narrow path is its special case ``hi(i) = 0``.
    """
    key_lo, key_hi = key & _MASK32, (key >> 32) & _MASK32
    if wide is None:
        wide = int(np.prod(shape)) >= 2**32
    if wide:
        flat = _flat_index(xp, shape, location, np.uint64)
        h = flat.astype(np.uint32)  # lo(i): C casts wrap around, in NumPy and CuPy alike
        k0 = (flat >> np.uint64(32)).astype(np.uint32)
        k0 += np.uint32(key_hi)
        k0 = _mix(k0)
        k0 ^= np.uint32(key_lo)
        h ^= k0
    else:
        h = _flat_index(xp, shape, location, np.uint32)
        h ^= np.uint32(key_lo ^ _mix_int(key_hi))
    h = _mix(h)
    h ^= np.uint32(key_hi)
    return _mix(h)


@layout_invariant
def dropout_keep(x, ratio, key, shape, location):
    """The keep-mask :func:`dropout_block` applies to ``x``'s block: a boolean array of its
    shape (``x`` gives the array library; its values are not read)."""
    xp = array_namespace(x)
    u = _uniform32(xp, int(key), shape, location)
    return u >= np.uint32(min(round(ratio * 2**32), _MASK32))


@layout_invariant
def dropout_scale(x, keep, ratio):
    """``x / (1 - ratio)`` where ``keep``, else 0: dropout with its mask given (a backward pass
    applies the forward's mask to the gradient)."""
    scale = x.dtype.type(1.0 / (1.0 - ratio))
    # where_zero: exactly where(keep, x * scale, 0), without NumPy's where's branches
    return where_zero(keep, x * scale)


@layout_invariant
def dropout_block(x, ratio, key, shape, location):
    """``x`` times the scaled keep-mask of its elements: ``x / (1 - ratio)`` where kept, else 0.

    ``location`` is the block's ``((lo, hi), ...)`` in the whole array of ``shape``; each
    element's 32-bit number is a hash of ``key`` (an integer in ``[0, 2**64)``) and its flat
    index there (the module's docstring defines it), so the mask does not depend on the
    chunking and a recomputed task gives the same mask.
    """
    return dropout_scale(x, dropout_keep(x, ratio, key, shape, location), ratio)
