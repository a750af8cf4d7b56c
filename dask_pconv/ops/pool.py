"""Chunked 2-D max pooling and its vector-Jacobian product.

Spatial tiles need not line up with the pooling windows: each output tile reads a window
assembled from the tiles it reaches (padding is -inf, as in PyTorch), exactly as for conv2d.
``ceil_mode`` is more padding at the bottom and right edges (:func:`dask_pconv.geometry.pool_pads`);
the kernels know where the image starts, so a window's argmax never lies in the padding.
"""

from __future__ import annotations

import operator

import numpy as np
from dask.array.core import Array
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import geometry as geo
from ..backend import on_device_of
from ..kernels import max_pool2d_argmax, max_pool2d_backward, max_pool2d_forward
from ._graph import Windows, scatter_windows, window_reach
from ._validate import as_dask, batched, check_kernel_fits, check_same_dtype


class _PoolSetup:
    """Validated arguments and the geometry shared by forward and backward."""

    def __init__(self, x, kernel_size, stride, padding, dilation, ceil_mode):
        x = as_dask(x, "x", (3, 4), empty_batch=True)
        self.unbatched = x.ndim == 3
        self.x = x = batched(x)
        self.kernel = kernel = geo.normalize_pair(kernel_size, "kernel_size")
        # PyTorch reads an empty stride as the default too
        default = stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
        self.stride = stride = kernel if default else geo.normalize_pair(stride, "stride")
        self.dilation = dilation = geo.normalize_pair(dilation, "dilation")
        pad = geo.normalize_pair(padding, "padding", minimum=0)
        if any(p > k // 2 for p, k in zip(pad, kernel)):
            raise ValueError(f"padding {pad} must be at most half of kernel_size {kernel} (as in PyTorch)")
        if not isinstance(ceil_mode, (bool, np.bool_)):
            raise TypeError(f"ceil_mode must be True or False, got {ceil_mode!r}")
        hw = x.shape[2:]
        pads = tuple(geo.pool_pads(*a, bool(ceil_mode)) for a in zip(hw, kernel, stride, pad, dilation))
        out_hw = tuple(geo.output_length(*a) for a in zip(hw, kernel, stride, pads, dilation))
        check_kernel_fits(hw, kernel, pads, dilation, out_hw)
        self.plan_h = geo.plan_axis(x.chunks[2], kernel[0], stride[0], pads[0], dilation[0])
        self.plan_w = geo.plan_axis(x.chunks[3], kernel[1], stride[1], pads[1], dilation[1])
        self.out_shape = x.shape[:2] + out_hw
        self.out_chunks = (x.chunks[0], x.chunks[1], self.plan_h.out_chunks, self.plan_w.out_chunks)
        self.token = tokenize(x, kernel, stride, pads, dilation)
        self.win = Windows(x, self.plan_h, self.plan_w, float("-inf"), f"max_pool2d-halo-{self.token}")

    def blocks(self):
        """``(n, c, i, j)`` of every output block and the image position of its window."""
        for n in range(len(self.x.chunks[0])):
            for c in range(len(self.x.chunks[1])):
                for i, (y0, _) in enumerate(self.plan_h.windows):
                    for j, (x0, _) in enumerate(self.plan_w.windows):
                        yield (n, c, i, j), (y0, x0)

    def result(self, a):
        return a[0] if self.unbatched else a


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling of a chunked batch of images (``torch.nn.functional.max_pool2d``).

    Parameters
    ----------
    x : dask.array.Array, shape (N, C, H, W) or (C, H, W)
        Any chunking; NumPy/CuPy arrays are wrapped.  ``N`` may be 0.  An unbatched
        ``(C, H, W)`` input gives an unbatched result, as in PyTorch.
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit -inf padding, at most half the kernel size.
    dilation : int or (int, int)
        Distance between the taps of a window.
    ceil_mode : bool
        Round the output size up instead of down; the last window must still start inside the
        input or its left padding.
    return_indices : bool
        Also return where each maximum is.

    A one-element tuple means the same value on both axes, as in PyTorch.

    Returns
    -------
    y : dask.array.Array, shape (N, C, oH, oW)
        ``oH = floor((H + 2*ph - dy*(kh-1) - 1) / sy) + 1`` (``ceil`` with ``ceil_mode``, less
        one if that last window would start past the input and its padding); chunks follow
        the tiles of ``x`` through the stride (the rule of :func:`dask_pconv.conv2d`).  NaN
        propagates.
    indices : dask.array.Array of int64, shape (N, C, oH, oW)
        Only with ``return_indices``: the flat position ``row * W + col`` of each maximum in its
        ``(H, W)`` plane, as PyTorch returns it (the last NaN of a window, else its first
        maximum, never a padding position).  Chunked like ``y``.
    """
    s = _PoolSetup(x, kernel_size, stride, padding, dilation, ceil_mode)
    name = f"max_pool2d-fwd-{s.token}"
    dsk = dict(s.win.dsk)
    if not return_indices:
        for key, _ in s.blocks():
            dsk[(name, *key)] = (max_pool2d_forward, s.win[key], s.kernel, s.stride, s.dilation)
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[s.x])
        return s.result(Array(graph, name, s.out_chunks, meta=s.x._meta))
    both, idx_name = f"max_pool2d-argmax-{s.token}", f"max_pool2d-indices-{s.token}"
    width = s.x.shape[3]
    for key, origin in s.blocks():
        dsk[(both, *key)] = (max_pool2d_argmax, s.win[key], s.kernel, s.stride, s.dilation, origin, width)
        dsk[(name, *key)] = (operator.getitem, (both, *key), 0)
        dsk[(idx_name, *key)] = (operator.getitem, (both, *key), 1)
    y = Array(
        HighLevelGraph.from_collections(name, dsk, dependencies=[s.x]), name, s.out_chunks, meta=s.x._meta
    )
    meta = meta_from_array(s.x._meta, ndim=4, dtype=np.int64)
    graph = HighLevelGraph.from_collections(idx_name, dsk, dependencies=[s.x])
    return s.result(y), s.result(Array(graph, idx_name, s.out_chunks, meta=meta))


def max_pool2d_vjp(x, g_y, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Gradient of ``<g_y, max_pool2d(x, ...)>`` with respect to ``x``.

    Arguments as in :func:`max_pool2d`; ``g_y`` has its output's shape and ``x``'s dtype.
    Each output's gradient goes to its window's argmax (the element
    ``max_pool2d(..., return_indices=True)`` points to, as in PyTorch); overlapping windows add
    up.  Returns a Dask array chunked like ``x``.
    """
    s = _PoolSetup(x, kernel_size, stride, padding, dilation, ceil_mode)
    g_y = as_dask(g_y, "g_y", 3 if s.unbatched else 4, empty_batch=True)
    g_y = on_device_of(check_same_dtype(g_y, "g_y", s.x), s.x)
    out_shape = s.out_shape[1:] if s.unbatched else s.out_shape
    if g_y.shape != out_shape:
        raise ValueError(f"g_y must have the output shape {out_shape}, got {g_y.shape}")
    g_y = batched(g_y)
    if g_y.chunks != s.out_chunks:
        g_y = g_y.rechunk(s.out_chunks)
    tok = tokenize(s.token, g_y)
    gwin, name = f"max_pool2d-gxwin-{tok}", f"max_pool2d-gx-{tok}"
    dsk = dict(s.win.dsk)
    nested = {}  # a window read by one tile only: its gradient is computed inside that tile's task
    for key, origin in s.blocks():
        gy_key = (g_y.name, *key)
        task = (max_pool2d_backward, s.win[key], gy_key, s.kernel, s.stride, s.dilation, origin)
        if window_reach(s.plan_h, s.plan_w, *key[2:]) == 1:
            nested[key] = task
        else:
            dsk[(gwin, *key)] = task
    meta = s.x._meta
    scatter_windows(dsk, name, lambda *idx: nested.get(idx, (gwin, *idx)), s.x, s.plan_h, s.plan_w, meta)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[s.x, g_y])
    return s.result(Array(graph, name, s.x.chunks, meta=meta))


__all__ = ["max_pool2d", "max_pool2d_vjp"]
