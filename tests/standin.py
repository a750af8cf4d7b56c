"""A stand-in for CuPy on the CPU: an array type that refuses implicit conversion to NumPy.

Like ``cupy.ndarray`` it has its own namespace (``__array_namespace__``), an explicit
``.get()`` to copy to the host, and ``__array__`` raises, so any code path that silently
turns a block into a NumPy array fails.  Every namespace call and every refused conversion is
recorded in ``LOG`` so a test can show what ran.  Dask's concatenate dispatch is registered
for it the way dask registers CuPy's.
"""

from __future__ import annotations

import types

import numpy as np
from dask.array.dispatch import concatenate_lookup

LOG: list[str] = []


class StandInArray:
    __array_ufunc__ = None  # NumPy ufuncs must not take it either
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
        return _wrap(func(*_unwrap_args(args), **dict(zip(kwargs, _unwrap_args(kwargs.values())))))

    def get(self):
        """Explicit copy to the host, as ``cupy.ndarray.get``."""
        return self._a.copy()

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

    def max(self, axis=None, out=None, keepdims=False):
        return _wrap(self._a.max(axis=axis, keepdims=keepdims))

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)


def _strict(v):
    """Operands must be stand-in arrays or Python scalars, as CuPy refuses NumPy arrays."""
    if isinstance(v, StandInArray):
        return v._a
    if isinstance(v, (int, float, bool, np.generic)):
        return v
    LOG.append(f"mixed:{type(v).__name__}")
    raise TypeError(f"Unsupported type {type(v).__name__} (stand-in for CuPy takes no NumPy arrays)")


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
    "radd",
    "rsub",
    "rmul",
    "rtruediv",
    "rpow",
    "rand",
    "ror",
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
    asarray=_fn("asarray", np.asarray),
    exp=_fn("exp", np.exp),
    log=_fn("log", np.log),
    sqrt=_fn("sqrt", np.sqrt),
    result_type=np.result_type,
    int32=np.int32,
    int64=np.int64,
    float32=np.float32,
    float64=np.float64,
    bool=np.bool_,
)


def _concatenate(arrays, axis=0):
    LOG.append("concatenate")
    return StandInArray(np.concatenate([_strict(a) for a in arrays], axis=axis))


namespace.concatenate = _concatenate
concatenate_lookup.register(StandInArray, _concatenate)


def to_device(a):
    return StandInArray(np.asarray(a))


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
