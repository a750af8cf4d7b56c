"""Host operands meeting device blocks: weights, statistics and labels given as NumPy arrays
to an op whose input has CuPy (or other non-NumPy) blocks are copied to the device there, in
the graph, one task per block, so a kernel never sees a NumPy block beside a CuPy one."""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.utils import typename

from ..kernels._namespace import asarray_like


def wrap(a, chunks):
    """``a`` (a NumPy or device array, or a list) as a Dask array with blocks of its own
    library; a Dask array is returned as it is.

    Device arrays get a random name instead of one hashed from their data: Dask has no
    tokenizer for CuPy, so hashing would pickle the array, which copies it to the host.
    """
    if isinstance(a, da.Array):
        return a
    if not hasattr(a, "shape"):
        a = np.asarray(a)
    return da.from_array(a, chunks=chunks, asarray=False, name=None if isinstance(a, np.ndarray) else False)


def on_device_of(a, like):
    """``a`` (a Dask array) with blocks of the same library as ``like``'s (a Dask array).

    A NumPy-backed ``a`` meeting a non-NumPy ``like`` gets a ``to-device`` task per block
    (the library's ``asarray`` of the block: for CuPy, a copy from the host); anything else is
    returned unchanged.  Once an operand lives on the device (a persisted result, say), no
    copy is made again.  A device operand meeting a NumPy input is a ``TypeError`` (the
    kernel would fail inside a task, with a less clear message).
    """
    if not isinstance(a, da.Array):
        raise TypeError(f"on_device_of needs a Dask array, got {type(a).__name__}")
    if isinstance(like._meta, np.ndarray) and not isinstance(a._meta, np.ndarray):
        raise TypeError(
            f"an operand has {typename(type(a._meta))} blocks but the input has NumPy blocks; move "
            "the input to the device too (e.g. x.map_blocks(cupy.asarray))"
        )
    if type(a._meta) is not np.ndarray or type(like._meta) is np.ndarray:
        return a
    meta = meta_from_array(like._meta, ndim=a.ndim, dtype=a.dtype)
    name = f"to-device-{tokenize(a, typename(type(meta)))}"
    return a.map_blocks(asarray_like, meta, dtype=a.dtype, meta=meta, name=name)
