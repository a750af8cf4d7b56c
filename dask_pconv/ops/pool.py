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
from ..kernels import max_pool2d_argmax, max_pool2d_backward, max_pool2d_forward
from ._halo import WindowedSetup
from ._validate import batched, check_kernel_fits, checked_operand, output_gradient


class _PoolSetup(WindowedSetup):
    """Validated arguments and the geometry shared by forward and backward (the attributes of
    :class:`~dask_pconv.ops._halo.WindowedSetup`)."""

    op = "max_pool2d"
    fill = float("-inf")  # the padding value: never a window's maximum

    def __init__(self, x, kernel_size, stride, padding, dilation, ceil_mode):
        x = checked_operand(x, "x", (3, 4), empty_batch=True)
        unbatched = x.ndim == 3
        x = batched(x)
        kernel = geo.normalize_pair(kernel_size, "kernel_size")
        # PyTorch reads an empty stride as the default too
        default = stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
        stride = kernel if default else geo.normalize_pair(stride, "stride")
        dilation = geo.normalize_pair(dilation, "dilation")
        pad = geo.normalize_pair(padding, "padding", minimum=0)
        if any(p > k // 2 for p, k in zip(pad, kernel)):
            raise ValueError(f"padding {pad} must be at most half of kernel_size {kernel} (as in PyTorch)")
        if not isinstance(ceil_mode, (bool, np.bool_)):
            raise TypeError(f"ceil_mode must be True or False, got {ceil_mode!r}")
        hw = x.shape[2:]
        pads = tuple(geo.pool_pads(*a, bool(ceil_mode)) for a in zip(hw, kernel, stride, pad, dilation))
        out_hw = tuple(geo.output_length(*a) for a in zip(hw, kernel, stride, pads, dilation))
        check_kernel_fits(hw, kernel, pads, dilation, out_hw)
        token = tokenize(x, kernel, stride, pads, dilation)
        super().__init__(x, unbatched, kernel, stride, pads, dilation, out_hw, x.chunks[1], self.fill, token)

    def blocks(self):
        """``(n, c, i, j)`` of every output block and the image position of its window."""
        for n in range(len(self.x.chunks[0])):
            for c in range(len(self.x.chunks[1])):
                for i, (y0, _) in enumerate(self.plan_h.windows):
                    for j, (x0, _) in enumerate(self.plan_w.windows):
                        yield (n, c, i, j), (y0, x0)


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
        return s.result(Array(graph, name, s.out_chunks, meta=s.meta))
    both, idx_name = f"max_pool2d-argmax-{s.token}", f"max_pool2d-indices-{s.token}"
    width = s.x.shape[3]
    for key, origin in s.blocks():
        dsk[(both, *key)] = (max_pool2d_argmax, s.win[key], s.kernel, s.stride, s.dilation, origin, width)
        dsk[(name, *key)] = (operator.getitem, (both, *key), 0)
        dsk[(idx_name, *key)] = (operator.getitem, (both, *key), 1)
    y = Array(HighLevelGraph.from_collections(name, dsk, dependencies=[s.x]), name, s.out_chunks, meta=s.meta)
    meta = meta_from_array(s.meta, ndim=4, dtype=np.int64)
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
    g_y = output_gradient(g_y, s)
    tok = tokenize(s.token, g_y)
    grads = s.window_gradients(tok)
    for key, origin in s.blocks():
        task = (max_pool2d_backward, s.win[key], (g_y.name, *key), s.kernel, s.stride, s.dilation, origin)
        grads.add(key, {0: task})  # one part, so its label names no task
    return s.result(s.grad_x(grads, tok, [s.x, g_y], reads_windows=True))


__all__ = ["max_pool2d", "max_pool2d_vjp"]
