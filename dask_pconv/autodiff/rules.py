"""The differentiable primitives and their VJP rules, registered one next to the other.

A primitive is a Dask-level op from :mod:`dask_pconv.ops`; its rule gets the forward's answer
and arguments and returns a function of the output gradient ``g``.  Identical sub-expressions
(BatchNorm statistics, dropout masks, halo windows) get identical Dask keys in the forward and
backward graphs, so they are computed once.
"""

from __future__ import annotations

import dask.array as da
import numpy as np

from .. import ops
from ..ops import nn
from .tape import Tensor, defvjp, defvjp_all, primitive

__all__ = [
    "accuracy",
    "add",
    "batch_norm",
    "conv2d",
    "conv_transpose2d",
    "dropout",
    "flatten",
    "linear",
    "max_pool2d",
    "mean",
    "mul",
    "rechunk",
    "relu",
    "reshape",
    "softmax_cross_entropy",
    "sum",
]


def _unbroadcast(g, shape):
    """Sum ``g`` down to ``shape`` (the inverse of NumPy broadcasting)."""
    if not hasattr(g, "ndim"):
        return g
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    return g.sum(axis=axes, keepdims=True) if axes else g


def _shape(a):
    return getattr(a, "shape", ())


# -- convolution and pooling ---------------------------------------------------------------
@primitive
def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    return ops.conv2d(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)


def _conv2d_vjp(ans, x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    def vjp(g):
        g_x, g_w, g_b = ops.conv2d_vjp(x, w, g, stride, padding, dilation, groups)
        return g_x, g_w, (g_b if b is not None else None)

    return vjp


defvjp_all(conv2d, _conv2d_vjp)


@primitive
def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    return ops.conv_transpose2d(
        x,
        w,
        b,
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
    )


def _conv_transpose2d_vjp(ans, x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    def vjp(g):
        g_x, g_w, g_b = ops.conv_transpose2d_vjp(x, w, g, stride, padding, output_padding, groups, dilation)
        return g_x, g_w, (g_b if b is not None else None)

    return vjp


defvjp_all(conv_transpose2d, _conv_transpose2d_vjp)


@primitive
def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return ops.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


def _max_pool2d_vjp(ans, x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    return lambda g: ops.max_pool2d_vjp(x, g, kernel_size, stride, padding, dilation, ceil_mode)


defvjp(max_pool2d, _max_pool2d_vjp)


# -- elementwise and normalisation ---------------------------------------------------------
@primitive
def relu(x):
    return nn.relu(x)


defvjp(relu, lambda ans, x: lambda g: nn.relu_vjp(x, g))


@primitive
def batch_norm(x, gamma, beta, mean=None, var=None, eps=2e-5, relu=False, stats=None):
    return nn.batch_norm(x, gamma, beta, mean, var, eps, relu, stats=stats)


def _batch_norm_vjp(ans, x, gamma, beta, mean=None, var=None, eps=2e-5, relu=False, stats=None):
    def vjp(g):
        return nn.batch_norm_vjp(x, gamma, g, mean, var, eps, relu, y=ans, stats=stats) + (None, None)

    return vjp


defvjp_all(batch_norm, _batch_norm_vjp)


@primitive
def dropout(x, ratio, seed, step, layer):
    return nn.dropout(x, ratio, seed, step, layer)


# the mask depends only on (seed, step, layer) and the element index: apply it to g
defvjp(dropout, lambda ans, x, ratio, seed, step, layer: lambda g: nn.dropout(g, ratio, seed, step, layer))


@primitive
def add(a, b):
    return a + b


defvjp(
    add,
    lambda ans, a, b: lambda g: _unbroadcast(g, _shape(a)),
    lambda ans, a, b: lambda g: _unbroadcast(g, _shape(b)),
)


@primitive
def mul(a, b):
    return a * b


defvjp(
    mul,
    lambda ans, a, b: lambda g: _unbroadcast(g * b, _shape(a)),
    lambda ans, a, b: lambda g: _unbroadcast(g * a, _shape(b)),
)

# the tensor operators are these primitives: bound here, so that the tape knows none of them
Tensor.__add__ = Tensor.__radd__ = add
Tensor.__mul__ = Tensor.__rmul__ = mul


# -- shapes and reductions -----------------------------------------------------------------
@primitive
def reshape(x, shape):
    return x.reshape(shape)


defvjp(reshape, lambda ans, x, shape: lambda g: g.reshape(x.shape).rechunk(x.chunks))


@primitive
def rechunk(x, chunks):
    return x.rechunk(chunks)


defvjp(rechunk, lambda ans, x, chunks: lambda g: g.rechunk(x.chunks))


def flatten(x):
    """(N, ...) -> (N, prod(...)), as a :func:`reshape`."""
    return reshape(x, (x.shape[0], int(np.prod(x.shape[1:]))))


@primitive
def sum(x, axis=None):  # noqa: A001 - mirrors numpy's name on purpose
    return x.sum(axis=axis)


def _expand(g, x, axis):
    if axis is None:
        return da.broadcast_to(g, x.shape, chunks=x.chunks)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    g = da.expand_dims(g, tuple(a % x.ndim for a in axes))
    return da.broadcast_to(g, x.shape, chunks=x.chunks)


defvjp(sum, lambda ans, x, axis=None: lambda g: _expand(g, x, axis))


@primitive
def mean(x, axis=None):
    return x.mean(axis=axis)


def _count(x, axis):
    if axis is None:
        return x.size
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return int(np.prod([x.shape[a] for a in axes]))


defvjp(mean, lambda ans, x, axis=None: lambda g: _expand(g / _count(x, axis), x, axis))


# -- the head ------------------------------------------------------------------------------
@primitive
def linear(x, W):
    return nn.linear(x, W)


defvjp_all(linear, lambda ans, x, W: lambda g: nn.linear_vjp(x, W, g))


@primitive
def softmax_cross_entropy(z, t):
    return nn.softmax_cross_entropy(z, t)


defvjp(softmax_cross_entropy, lambda ans, z, t: lambda g: nn.softmax_cross_entropy_vjp(z, t, g), None)


def accuracy(z, t):
    """A metric, not differentiable: accepts tensors or arrays and returns a lazy scalar."""
    z = getattr(z, "value", z)
    return nn.accuracy(z, t)


# -- more pooling, resampling, activations and concatenation ---------------------------------
@primitive
def avg_pool2d(
    x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    return ops.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)


def _avg_pool2d_vjp(ans, x, *args, **kwargs):
    return lambda g: ops.avg_pool2d_vjp(x, g, *args, **kwargs)


defvjp(avg_pool2d, _avg_pool2d_vjp)


@primitive
def adaptive_avg_pool2d(x, output_size):
    return ops.adaptive_avg_pool2d(x, output_size)


defvjp(
    adaptive_avg_pool2d, lambda ans, x, output_size: lambda g: ops.adaptive_avg_pool2d_vjp(x, g, output_size)
)


@primitive
def upsample_nearest(x, scale_factor):
    return ops.upsample_nearest(x, scale_factor)


defvjp(upsample_nearest, lambda ans, x, scale_factor: lambda g: ops.upsample_nearest_vjp(x, g, scale_factor))


@primitive
def leaky_relu(x, negative_slope=0.01):
    return nn.leaky_relu(x, negative_slope)


defvjp(leaky_relu, lambda ans, x, negative_slope=0.01: lambda g: nn.leaky_relu_vjp(x, g, negative_slope))


def _concatenate(*arrays, axis=1):
    return da.concatenate(arrays, axis=axis)


_concatenate.__name__ = _concatenate.__qualname__ = "concatenate"  # the primitive's name in errors
_concatenate = primitive(_concatenate)


def _concatenate_vjp(ans, *arrays, axis=1):
    def vjp(g):
        ax = axis % ans.ndim
        out, start = [], 0
        for a in arrays:
            index = (slice(None),) * ax + (slice(start, start + a.shape[ax]),)
            piece = g[index]
            out.append(piece if piece.chunks == a.chunks else piece.rechunk(a.chunks))
            start += a.shape[ax]
        return tuple(out)

    return vjp


defvjp_all(_concatenate, _concatenate_vjp)


def concatenate(tensors, axis=1):
    """``dask.array.concatenate`` of ``tensors`` (tensors or Dask arrays) along ``axis``.

    They must have one dtype (nothing is promoted) and one shape on every other axis; chunks
    on the other axes that differ are unified by Dask.  The gradient of each input is its
    slice of the output gradient, rechunked like the input where it is chunked otherwise."""
    tensors = tuple(tensors)
    if len(tensors) < 1:
        raise ValueError("concatenate needs at least one array")
    dtypes = {np.dtype(t.dtype) for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(f"concatenate needs arrays of one dtype, got {sorted(map(str, dtypes))}")
    return _concatenate(*tensors, axis=axis)


__all__ += ["adaptive_avg_pool2d", "avg_pool2d", "concatenate", "leaky_relu", "upsample_nearest"]
