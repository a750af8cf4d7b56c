"""Where arrays live: the array library of a block, whether it is on a device, copies between
host and device, and arrays as Dask arrays with blocks of their own library (:func:`to_dask_array`).

Every module of the package that asks one of these questions asks it here.  NumPy blocks are
the host; a device block is an array of another library: CuPy, or any array that gives its
namespace through ``__array_namespace__`` (the array API standard).  Blocks are never converted
between libraries implicitly: a copy is made only by :func:`asarray_like` (to the device),
:func:`on_device_of` (the same, one task per block, in the graph) and :func:`to_host`.
"""

from __future__ import annotations

import numbers

import array_api_compat
import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.utils import typename

__all__ = [
    "array_namespace",
    "asarray_like",
    "is_cupy",
    "is_device",
    "is_numpy",
    "on_device_of",
    "to_dask_array",
    "to_host",
    "wrap",
]


def array_namespace(*arrays):
    """Return the module that implements the arrays' operations.

    NumPy arrays give ``numpy``, CuPy arrays ``cupy`` and any other array its own
    ``__array_namespace__()``: the libraries' own modules, never array-api-compat's wrappers
    (``array_api_compat.array_namespace(..., use_compat=False)``), so a kernel calls exactly
    the functions it names.  Python and NumPy scalars are ignored; with no array at all the
    namespace is ``numpy``.  Arrays of two libraries are a ``TypeError``: blocks are never
    converted between libraries here.
    """
    if all(isinstance(a, (np.ndarray, np.generic, numbers.Number)) for a in arrays):
        return np  # the common case, without array-api-compat's look-up per kernel call
    return array_api_compat.array_namespace(*arrays, use_compat=False)


def is_numpy(a):
    """Whether ``a`` is a plain ``numpy.ndarray`` (no subclass, such as a masked array): what
    the host-only fast paths (PyTorch's CPU kernels, SciPy) take."""
    return type(a) is np.ndarray


def is_cupy(a):
    """Whether ``a`` is a genuine ``cupy.ndarray``, recognised by its class without importing
    CuPy: no look-alike array (one with ``__array_namespace__`` and ``.get()``) qualifies, since
    PyTorch's DLPack path and CuPy's own functions are used on it."""
    cls = type(a)
    return cls.__name__ == "ndarray" and cls.__module__.split(".")[0] == "cupy"


def is_device(a):
    """Whether ``a`` is an array of a library other than NumPy (CuPy, or any array with
    ``__array_namespace__``).

    ``a`` is a block, a Dask ``meta`` or a Dask array (whose ``meta`` is asked); anything that
    is not an array (a scalar, a dtype, a window of the kernels) is not on a device.
    """
    if isinstance(a, da.Array):
        a = a._meta
    # array classes (dtypes such as np.float32) carry __array_namespace__ as a method too
    if isinstance(a, (type, np.ndarray, np.generic)):
        return False
    return is_cupy(a) or hasattr(a, "__array_namespace__")


def to_host(a):
    """``a`` as a NumPy array: a device array is copied with its explicit ``.get()`` (CuPy's
    copy to the host); a NumPy array is returned as it is."""
    if isinstance(a, np.ndarray):
        return a
    if not is_device(a):
        raise TypeError(f"to_host needs a NumPy or device array, got {type(a).__name__}")
    return a.get()


def asarray_like(block, like):
    """``block`` as an array of ``like``'s library, copied with that library's ``asarray``
    (for CuPy: an explicit copy from the host to the device)."""
    return array_namespace(like).asarray(block)


def to_dask_array(a, chunks):
    """``a`` (a NumPy or device array, or a list) as a Dask array of ``chunks`` with blocks of
    its own library; a Dask array is returned as it is (``chunks`` is then not applied).

    Nothing is checked here: the ops check their operands before they wrap them.  Device
    arrays get a random name instead of one hashed from their data: Dask has no deterministic
    tokenizer for CuPy (https://github.com/dask/dask/issues/6718), so hashing would pickle the
    array, which copies it to the host.
    """
    if isinstance(a, da.Array):
        return a
    if not hasattr(a, "shape"):
        a = np.asarray(a)
    return da.from_array(a, chunks=chunks, asarray=False, name=None if isinstance(a, np.ndarray) else False)


#: the first name of :func:`to_dask_array`, kept for the callers that use it
wrap = to_dask_array


def on_device_of(a, like):
    """``a`` (a Dask array) with blocks of the same library as ``like``'s (a Dask array).

    A NumPy-backed ``a`` meeting a device ``like`` gets a ``to-device`` task per block
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
    if not is_numpy(a._meta) or is_numpy(like._meta):
        return a
    meta = meta_from_array(like._meta, ndim=a.ndim, dtype=a.dtype)
    name = f"to-device-{tokenize(a, typename(type(meta)))}"
    return a.map_blocks(asarray_like, meta, dtype=a.dtype, meta=meta, name=name)
