"""A stand-in for CuPy on the CPU: an array type that refuses implicit conversion to NumPy.

Like ``cupy.ndarray`` it has its own namespace (``__array_namespace__``), an explicit
``.get()`` to copy to the host, and ``__array__`` raises, so any code path that silently
turns a block into a NumPy array fails.  NumPy functions and ufuncs dispatch to it
(``__array_function__``, ``__array_ufunc__``) when every array operand is a stand-in, and refuse
NumPy arrays among the operands, as CuPy does; NumPy and Python scalars are accepted.

``LOG`` records every namespace call, every refused conversion (``"__array__"``,
``"mixed:..."``), every explicit copy from the host (``"upload"``: the namespace's ``asarray``
of a NumPy array, as ``cupy.asarray``) and every copy back to the host (``"download"``:
``get``; ``"scalar:..."``: ``float()``, ``int()``, ``bool()``, ``item()``), so a test can show what
ran and what crossed between host and device.  Dask's concatenate dispatch is registered for it
the way dask registers CuPy's.
"""

from __future__ import annotations

import types

import numpy as np
from dask.array.dispatch import concatenate_lookup

LOG: list[str] = []


class StandInArray:
    __array_priority__ = 1000

    def __init__(self, a):
        if isinstance(a, StandInArray):
            a = a._a
        if not isinstance(a, (np.ndarray, np.generic)):
            raise TypeError(f"StandInArray needs a NumPy array to copy, got {type(a).__name__}")
        self._a = np.asarray(a)

    # -- what CuPy forbids --------------------------------------------------------
    def __array__(self, *args, **kwargs):
        LOG.append("__array__")
        raise TypeError("Implicit conversion to a NumPy array is not allowed (stand-in for CuPy)")

    def __array_function__(self, func, types, args, kwargs):
        """NumPy functions dispatch to the stand-in's own (as CuPy's ``__array_function__``
        does), on stand-in arrays only: a NumPy array among the arguments is refused."""
        LOG.append(f"__array_function__:{func.__name__}")
        if func.__name__ not in _DISPATCHED:
            return NotImplemented
        if func.__name__.endswith("_like") and np.dtype(kwargs.get("dtype") or "f8").names:
            return NotImplemented  # no structured dtypes, as in CuPy (dask then uses a dict)
        if func.__name__ in ("asarray", "array"):  # np.asarray(a, like=stand-in): as cupy.asarray
            return _asarray(args[0], dtype=kwargs.get("dtype"))
        return _wrap(func(*_unwrap_args(args), **dict(zip(kwargs, _unwrap_args(kwargs.values())))))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        """NumPy ufuncs on stand-in arrays and scalars only (as CuPy's): a NumPy array among
        the operands (or as ``out``) is refused."""
        LOG.append(f"__array_ufunc__:{ufunc.__name__}")
        if method not in ("__call__", "reduce"):
            return NotImplemented
        args = [_strict(a) for a in inputs]
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_strict_array(o) for o in out)
        res = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return tuple(_wrap(r) for r in res) if isinstance(res, tuple) else _wrap(res)

    def __reduce__(self):
        """Pickling copies to the host, as CuPy's does (Dask hashes unknown objects by pickling
        them, so an unnamed ``from_array`` of a device array is a download)."""
        # an empty or 0-d array (a Dask ``meta``, hashed as a task argument) carries no data
        data = self._a.ndim and self._a.size
        LOG.append(f"download:pickle:{self._a.shape}" if data else "pickle:meta")
        return (StandInArray, (self._a,))

    def get(self):
        """Explicit copy to the host, as ``cupy.ndarray.get``."""
        LOG.append("download")
        return self._a.copy()

    def item(self):
        LOG.append("scalar:item")
        return self._a.item()

    def __array_namespace__(self, api_version=None):
        return namespace

    # -- array protocol -----------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    T = property(lambda self: StandInArray(self._a.T))

    def __len__(self):
        return len(self._a)

    def __repr__(self):
        return f"StandInArray(shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key):
        return _wrap(self._a[_unwrap(key)])

    def __setitem__(self, key, value):
        self._a[_unwrap(key)] = _strict(value)

    def reshape(self, *shape, **kw):
        return StandInArray(self._a.reshape(*shape, **kw))

    def transpose(self, *axes):
        return StandInArray(self._a.transpose(*axes))

    def copy(self):
        return StandInArray(self._a.copy())

    def astype(self, dtype, copy=True):
        return StandInArray(self._a.astype(dtype, copy=copy))

    def sum(self, axis=None, dtype=None, out=None, keepdims=False):
        return _wrap(self._a.sum(axis=axis, dtype=dtype, keepdims=keepdims))

    def mean(self, axis=None, dtype=None, out=None, keepdims=False):
        return _wrap(self._a.mean(axis=axis, dtype=dtype, keepdims=keepdims))

    def max(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.max(axis=axis, keepdims=keepdims))

    def min(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.min(axis=axis, keepdims=keepdims))

    def argmax(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.argmax(axis=axis, keepdims=keepdims))

    def argmin(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.argmin(axis=axis, keepdims=keepdims))

    def ravel(self):
        return StandInArray(self._a.ravel())

    def squeeze(self, axis=None):
        return StandInArray(self._a.squeeze(axis=axis))

    # a scalar to the host: allowed (CuPy synchronises and copies), and recorded
    def __bool__(self):
        LOG.append("scalar:bool")
        return bool(self._a)

    def __float__(self):
        LOG.append("scalar:float")
        return float(self._a)

    def __int__(self):
        LOG.append("scalar:int")
        return int(self._a)


def _strict(v):
    """Operands must be stand-in arrays or Python scalars, as CuPy refuses NumPy arrays."""
    if isinstance(v, StandInArray):
        return v._a
    if isinstance(v, (int, float, bool, np.generic)):
        return v
    LOG.append(f"mixed:{type(v).__name__}")
    raise TypeError(f"Unsupported type {type(v).__name__} (stand-in for CuPy takes no NumPy arrays)")


def _strict_array(v):
    """A stand-in array's storage (for ``out=``); anything else is refused."""
    if isinstance(v, StandInArray):
        return v._a
    LOG.append(f"mixed:{type(v).__name__}")
    raise TypeError(f"Unsupported type {type(v).__name__} for out (stand-in for CuPy)")


_DISPATCHED = {
    "sum",
    "max",
    "min",
    "mean",
    "concatenate",
    "stack",
    "broadcast_to",
    "expand_dims",
    "squeeze",
    "moveaxis",
    "transpose",
    "reshape",
    "where",
    "isnan",
    "copy",
    "argmax",
    "argmin",
    "asarray",
    "array",
    "ones_like",
    "zeros_like",
    "full_like",
    "empty_like",
}


def _unwrap_args(args):
    out = []
    for a in args:
        if isinstance(a, (list, tuple)):
            out.append(type(a)(_unwrap_args(a)))
        elif isinstance(a, np.ndarray):
            out.append(_strict(a))
        else:
            out.append(a._a if isinstance(a, StandInArray) else a)
    return out


def _unwrap(key):
    if isinstance(key, tuple):
        return tuple(_unwrap(k) for k in key)
    return key._a if isinstance(key, StandInArray) else key


def _wrap(a):
    return StandInArray(np.asarray(a)) if isinstance(a, (np.ndarray, np.generic)) else a


def _binary(op):
    def f(self, other):
        return StandInArray(np.asarray(getattr(self._a, op)(_strict(other))))

    return f


for _op in [
    "add",
    "sub",
    "mul",
    "truediv",
    "pow",
    "gt",
    "ge",
    "lt",
    "le",
    "eq",
    "ne",
    "and",
    "or",
    "xor",
    "rshift",
    "lshift",
    "mod",
    "floordiv",
    "radd",
    "rsub",
    "rmul",
    "rtruediv",
    "rpow",
    "rand",
    "ror",
    "rxor",
    "rmod",
    "rfloordiv",
    "matmul",
    "rmatmul",
]:
    setattr(StandInArray, f"__{_op}__", _binary(f"__{_op}__"))


def _inplace(op):
    def f(self, other):
        getattr(self._a, op)(_strict(other))
        return self

    return f


for _op in ["iadd", "isub", "imul", "itruediv"]:
    setattr(StandInArray, f"__{_op}__", _inplace(f"__{_op}__"))
StandInArray.__neg__ = lambda self: StandInArray(-self._a)
StandInArray.__abs__ = lambda self: StandInArray(abs(self._a))
StandInArray.__invert__ = lambda self: StandInArray(~self._a)


def _fn(name, impl):
    def f(*args, **kwargs):
        LOG.append(name)
        args = [
            _strict(a) if not isinstance(a, (tuple, list, type, np.dtype, str)) and a is not None else a
            for a in args
        ]
        return _wrap(impl(*args, **kwargs))

    f.__name__ = name
    return f


namespace = types.SimpleNamespace(
    __name__="standin",
    zeros=_fn("zeros", np.zeros),
    empty=_fn("empty", np.empty),
    full=_fn("full", np.full),
    matmul=_fn("matmul", np.matmul),
    where=_fn("where", np.where),
    isnan=_fn("isnan", np.isnan),
    maximum=_fn("maximum", np.maximum),
    minimum=_fn("minimum", np.minimum),
    arange=_fn("arange", np.arange),
    ones=_fn("ones", np.ones),
    exp=_fn("exp", np.exp),
    log=_fn("log", np.log),
    sqrt=_fn("sqrt", np.sqrt),
    ascontiguousarray=_fn("ascontiguousarray", np.ascontiguousarray),
    result_type=np.result_type,
    int8=np.int8,
    int32=np.int32,
    int64=np.int64,
    uint64=np.uint64,
    float32=np.float32,
    float64=np.float64,
    bool=np.bool_,
)


def _asarray(a, dtype=None):
    """As ``cupy.asarray``: a stand-in array as it is, or an explicit copy from the host of a
    NumPy array (recorded as ``"upload"``).  Nothing else is taken."""
    LOG.append("asarray")
    if isinstance(a, StandInArray):
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)
    if isinstance(a, np.ndarray):
        LOG.append(f"upload:{a.shape}")
        return StandInArray(np.array(a, dtype=dtype))
    if isinstance(a, (np.generic, int, float, bool, list, tuple)):
        LOG.append("constant")  # a literal, e.g. dask's dtype probe np.asarray([1], like=...)
        return StandInArray(np.array(a, dtype=dtype))
    raise TypeError(f"asarray of {type(a).__name__} (stand-in for CuPy)")


namespace.asarray = _asarray


def _concatenate(arrays, axis=0):
    LOG.append("concatenate")
    return StandInArray(np.concatenate([_strict(a) for a in arrays], axis=axis))


namespace.concatenate = _concatenate
concatenate_lookup.register(StandInArray, _concatenate)


def to_device(a):
    """An explicit copy from the host (recorded as ``"upload"``)."""
    a = np.asarray(a)
    LOG.append(f"upload:{a.shape}")
    return StandInArray(a)


def meta(ndim, dtype):
    return StandInArray(np.empty((0,) * ndim, dtype=dtype))


def blocks_to_host(x):
    """Compute a Dask array of stand-in blocks block by block and copy each to the host."""
    import dask

    delayed = x.to_delayed()
    blocks = dask.compute(*delayed.ravel())
    for b in blocks:
        assert isinstance(b, StandInArray), f"a block came back as {type(b).__name__}"
    host = np.empty(delayed.shape, dtype=object)
    for idx, b in zip(np.ndindex(delayed.shape), blocks):
        host[idx] = b.get()
    return np.block(host.tolist())
