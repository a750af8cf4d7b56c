"""Chunked 2-D average pooling (windowed and global) and their vector-Jacobian products.

:func:`avg_pool2d` reads the same halo windows as :func:`~dask_pconv.max_pool2d` (its
geometry, ``ceil_mode`` included, is max pooling's without dilation), padded with zeros; the
kernels know where each window lies in the image, so the divisor at the border is the true
image border's, never a tile's.  :func:`adaptive_avg_pool2d` to one output per plane is a
global mean: a partial sum per block, then one sum per ``(n, c)`` block over the tiles.
"""

from __future__ import annotations

import numbers

import numpy as np
from dask.array.core import Array
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from ..kernels import avg_pool2d_backward, avg_pool2d_forward, plane_mean, plane_mean_backward, plane_sums
from ._tree_sum import tree_sum
from ._validate import batched, checked_operand, output_gradient
from .pool import _PoolSetup

__all__ = ["adaptive_avg_pool2d", "adaptive_avg_pool2d_vjp", "avg_pool2d", "avg_pool2d_vjp"]


class _AvgPoolSetup(_PoolSetup):
    """Max pooling's validated geometry without dilation, zero padding, plus the divisor
    arguments."""

    op = "avg_pool2d"
    fill = 0.0

    def __init__(self, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        if not isinstance(count_include_pad, (bool, np.bool_)):
            raise TypeError(f"count_include_pad must be True or False, got {count_include_pad!r}")
        if divisor_override is not None:
            if not isinstance(divisor_override, numbers.Integral) or isinstance(divisor_override, bool):
                raise TypeError(f"divisor_override must be an int or None, got {divisor_override!r}")
            if divisor_override == 0:
                raise ValueError("divisor_override must not be zero")
            divisor_override = int(divisor_override)
        super().__init__(x, kernel_size, stride, padding, 1, ceil_mode)
        self.count_include_pad, self.divisor_override = bool(count_include_pad), divisor_override
        self.image_hw = tuple(self.x.shape[2:])
        self.padding = tuple(p[0] for p in self.pads)  # the user's; ceil_mode adds only at the end

    def task(self, kernel, block, origin):
        """The task of ``kernel`` (forward or backward) on ``block`` at image position ``origin``."""
        return (
            kernel,
            block,
            self.kernel,
            self.stride,
            origin,
            self.image_hw,
            self.padding,
            self.count_include_pad,
            self.divisor_override,
        )


def avg_pool2d(
    x, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """2-D average pooling of a chunked batch of images (``torch.nn.functional.avg_pool2d``).

    Parameters
    ----------
    x : dask.array.Array, shape (N, C, H, W) or (C, H, W)
        Any chunking; NumPy/CuPy arrays are wrapped.  ``N`` may be 0.  An unbatched
        ``(C, H, W)`` input gives an unbatched result, as in PyTorch.
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit zero padding, at most half the kernel size.
    ceil_mode : bool
        Round the output size up instead of down; the last window must still start inside the
        input or its left padding.
    count_include_pad : bool
        Divide by the window's size within the padded image (True) or within the image.
    divisor_override : int, optional
        Divide every window's sum by this instead.

    Returns
    -------
    y : dask.array.Array, shape (N, C, oH, oW)
        ``oH = floor((H + 2*ph - kh) / sy) + 1`` (``ceil`` with ``ceil_mode``, less one if that
        last window would start past the input and its padding); chunks follow the tiles of
        ``x`` through the stride (the rule of :func:`dask_pconv.conv2d`).  The divisor of a
        window counts elements from the true image border (``H + ph`` at the bottom with
        ``count_include_pad``: the extra rows of ``ceil_mode`` never count), whatever the
        tiles.  Each window is summed in row-major order in ``x``'s dtype, so a result depends
        on its window's values only: the same bits in every chunking.
    """
    s = _AvgPoolSetup(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    name = f"avg_pool2d-fwd-{tokenize(s.token, s.count_include_pad, s.divisor_override)}"
    dsk = dict(s.win.dsk)
    for key, origin in s.blocks():
        dsk[(name, *key)] = s.task(avg_pool2d_forward, s.win[key], origin)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[s.x])
    return s.result(Array(graph, name, s.out_chunks, meta=s.meta))


def avg_pool2d_vjp(
    x,
    g_y,
    kernel_size,
    stride=None,
    padding=0,
    ceil_mode=False,
    count_include_pad=True,
    divisor_override=None,
):
    """Gradient of ``<g_y, avg_pool2d(x, ...)>`` with respect to ``x``.

    Arguments as in :func:`avg_pool2d`; ``g_y`` has its output's shape and ``x``'s dtype.
    Each output's ``g_y / divisor`` goes to every element of its window inside the image;
    overlapping windows add up.  Only ``x``'s shape and chunks are read, not its values.
    Returns a Dask array chunked like ``x``.
    """
    s = _AvgPoolSetup(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    g_y = output_gradient(g_y, s)
    tok = tokenize(s.token, g_y, s.count_include_pad, s.divisor_override)
    grads = s.window_gradients(tok)
    for key, origin in s.blocks():
        grads.add(key, {0: s.task(avg_pool2d_backward, (g_y.name, *key), origin)})
    return s.result(s.grad_x(grads, tok, [g_y]))


# -- global: adaptive_avg_pool2d to (1, 1) ---------------------------------------------------
def _global_output_size(output_size, hw):
    """``(1, 1)`` from ``output_size`` (an int or a pair; None keeps the input's length), or a
    ValueError: only a global mean is supported."""
    pair = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size,) * 2
    if len(pair) != 2:  # PyTorch refuses a one-element tuple here too
        raise ValueError(f"output_size must be an int or a pair, got {output_size!r}")
    resolved = []
    for v, n in zip(pair, hw):
        if v is None:
            v = n
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise TypeError(f"output_size must hold ints (or None), got {output_size!r}")
        resolved.append(int(v))
    if tuple(resolved) != (1, 1):
        raise ValueError(
            f"adaptive_avg_pool2d supports output_size 1 (a global mean over H and W) only, got "
            f"{output_size!r} for an input of spatial size {tuple(hw)}"
        )
    return (1, 1)


class _GlobalSetup:
    """The checked input of a global mean and its output's shape and chunks (the attributes
    :func:`~dask_pconv.ops._validate.output_gradient` reads)."""

    def __init__(self, x, output_size):
        x = checked_operand(x, "x", (3, 4), empty_batch=True)
        self.unbatched = x.ndim == 3
        self.x = x = batched(x)
        _global_output_size(output_size, x.shape[2:])
        self.count = x.shape[2] * x.shape[3]
        self.out_shape = x.shape[:2] + (1, 1)
        self.out_chunks = x.chunks[:2] + ((1,), (1,))
        self.token = tokenize(x)

    def result(self, a):
        """``a`` (a batched result) without its batch axis where the input had none."""
        return a[0] if self.unbatched else a


def adaptive_avg_pool2d(x, output_size):
    """Adaptive average pooling to ``output_size`` 1: the mean of each ``(H, W)`` plane
    (``torch.nn.functional.adaptive_avg_pool2d(x, 1)``).

    Parameters
    ----------
    x : dask.array.Array, shape (N, C, H, W) or (C, H, W)
        Any chunking; NumPy/CuPy arrays are wrapped.  ``N`` may be 0.
    output_size : int or (int, int)
        1 or ``(1, 1)`` (None on an axis of length 1); any other size is a ValueError.

    Returns
    -------
    y : dask.array.Array, shape (N, C, 1, 1)
        Chunked like ``x`` on N and C.  Each block sums its planes (each plane on its own, in
        ``x``'s dtype), and the partial sums of a plane's tiles are added in float64 as a tree
        in a fixed order, then divided by ``H * W``: the same chunking gives the same bits on
        every computation, on any worker; batch and channel splits do not change a plane's
        sums, while spatial tiles group them differently, so results across spatial splits
        agree to rounding, not bit for bit.
    """
    s = _GlobalSetup(x, output_size)
    x = s.x
    sums, name = f"adaptive_avg_pool2d-sum-{s.token}", f"adaptive_avg_pool2d-{s.token}"
    dsk = {}
    n_h, n_w = x.numblocks[2:]
    for n in range(x.numblocks[0]):
        for c in range(x.numblocks[1]):
            parts = [
                ((sums + "-part", n, c, i, j), (plane_sums, (x.name, n, c, i, j)))
                for i in range(n_h)
                for j in range(n_w)
            ]
            tree_sum(dsk, (sums, n, c), parts)
            dsk[(name, n, c, 0, 0)] = (plane_mean, (sums, n, c), s.count, x.dtype)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    meta = meta_from_array(x._meta, ndim=4, dtype=x.dtype)
    return s.result(Array(graph, name, s.out_chunks, meta=meta))


def adaptive_avg_pool2d_vjp(x, g_y, output_size):
    """Gradient of ``<g_y, adaptive_avg_pool2d(x, output_size)>`` with respect to ``x``:
    ``g_y / (H * W)`` over each plane, chunked like ``x`` (only ``x``'s shape and chunks are
    read).  ``g_y`` has the output's shape and ``x``'s dtype."""
    s = _GlobalSetup(x, output_size)
    x = s.x
    g_y = output_gradient(g_y, s)
    name = f"adaptive_avg_pool2d-gx-{tokenize(s.token, g_y)}"
    dsk = {}
    for n in range(x.numblocks[0]):
        for c in range(x.numblocks[1]):
            for i, h in enumerate(x.chunks[2]):
                for j, w in enumerate(x.chunks[3]):
                    dsk[(name, n, c, i, j)] = (plane_mean_backward, (g_y.name, n, c, 0, 0), (h, w), s.count)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[g_y])
    return s.result(Array(graph, name, x.chunks, meta=x._meta))
