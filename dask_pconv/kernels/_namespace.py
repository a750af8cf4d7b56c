"""The array namespace of a block: one code path for NumPy and CuPy (and look-alikes)."""

from __future__ import annotations

import numpy as np


def get_namespace(*arrays):
    """Return the module that implements the arrays' operations.

    NumPy arrays give ``numpy``; an array with ``__array_namespace__`` (the array API
    standard) gives its namespace; a CuPy array gives ``cupy``.  Blocks are never converted
    between libraries here: mixing a CuPy block with a NumPy one is the caller's error.
    """
    for a in arrays:
        if isinstance(a, np.ndarray) or np.isscalar(a):
            continue
        ns = getattr(a, "__array_namespace__", None)
        if ns is not None:
            return ns()
        module = type(a).__module__.split(".")[0]
        if module == "cupy":
            import cupy

            return cupy
    return np


def asarray_like(block, like):
    """``block`` as an array of ``like``'s library, copied with that library's ``asarray``
    (for CuPy: an explicit copy from the host to the device)."""
    return get_namespace(like).asarray(block)
