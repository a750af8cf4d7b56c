"""Chunked 2-D max pooling and its vector-Jacobian product.

Spatial tiles need not line up with the pooling windows: each output tile reads a window
assembled from the tiles it reaches (padding is -inf, as in PyTorch), exactly as for conv2d.
"""

from __future__ import annotations

from dask.array.core import Array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import geometry as geo
from ..kernels import max_pool2d_backward, max_pool2d_forward
from ._device import on_device_of
from ._graph import Windows, scatter_windows, window_reach
from ._validate import as_dask, check_kernel_fits


def _setup(x, kernel_size, stride, padding):
    x = as_dask(x, "x", 4)
    kernel = geo.normalize_pair(kernel_size, "kernel_size")
    stride = kernel if stride is None else geo.normalize_pair(stride, "stride")
    pad = geo.normalize_pair(padding, "padding", minimum=0)
    if any(p > k // 2 for p, k in zip(pad, kernel)):
        raise ValueError(f"padding {pad} must be at most half of kernel_size {kernel} (as in PyTorch)")
    pads = ((pad[0], pad[0]), (pad[1], pad[1]))
    out_hw = tuple(geo.output_length(n, k, s, p, 1) for n, k, s, p in zip(x.shape[2:], kernel, stride, pads))
    check_kernel_fits(x.shape[2:], kernel, pads, (1, 1), out_hw)
    plan_h = geo.plan_axis(x.chunks[2], kernel[0], stride[0], pads[0], 1)
    plan_w = geo.plan_axis(x.chunks[3], kernel[1], stride[1], pads[1], 1)
    token = tokenize(x, kernel, stride, pads)
    win = Windows(x, plan_h, plan_w, float("-inf"), f"max_pool2d-halo-{token}")
    return x, kernel, stride, plan_h, plan_w, win, token


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """2-D max pooling of a chunked batch of images (``torch.nn.functional.max_pool2d``).

    Parameters
    ----------
    x : dask.array.Array, shape (N, C, H, W)
        Any chunking; NumPy/CuPy arrays are wrapped.
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to ``kernel_size``.
    padding : int or (int, int)
        Implicit -inf padding, at most half the kernel size.

    Returns
    -------
    dask.array.Array, shape (N, C, oH, oW)
        ``oH = floor((H + 2*ph - kh) / sy) + 1``; chunks follow the tiles of ``x`` through
        the stride (the rule of :func:`dask_pconv.conv2d`).  NaN propagates.
    """
    x, kernel, stride, plan_h, plan_w, win, token = _setup(x, kernel_size, stride, padding)
    name = f"max_pool2d-fwd-{token}"
    dsk = dict(win.dsk)
    dsk.update(
        {
            (name, n, c, i, j): (max_pool2d_forward, win[n, c, i, j], kernel, stride)
            for n in range(len(x.chunks[0]))
            for c in range(len(x.chunks[1]))
            for i in range(len(plan_h.out_chunks))
            for j in range(len(plan_w.out_chunks))
        }
    )
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    chunks = (x.chunks[0], x.chunks[1], plan_h.out_chunks, plan_w.out_chunks)
    return Array(graph, name, chunks, meta=x._meta)


def max_pool2d_vjp(x, g_y, kernel_size, stride=None, padding=0):
    """Gradient of ``<g_y, max_pool2d(x, ...)>`` with respect to ``x``.

    Each output's gradient goes to the first maximal element of its window (row-major
    order, as PyTorch); overlapping windows add up.  Returns a Dask array chunked like ``x``.
    """
    x, kernel, stride, plan_h, plan_w, win, token = _setup(x, kernel_size, stride, padding)
    g_y = on_device_of(as_dask(g_y, "g_y", 4), x)
    out_shape = x.shape[:2] + (sum(plan_h.out_chunks), sum(plan_w.out_chunks))
    if g_y.shape != out_shape:
        raise ValueError(f"g_y must have the output shape {out_shape}, got {g_y.shape}")
    out_chunks = (x.chunks[0], x.chunks[1], plan_h.out_chunks, plan_w.out_chunks)
    if g_y.chunks != out_chunks:
        g_y = g_y.rechunk(out_chunks)
    tok = tokenize(token, g_y)
    gwin, name = f"max_pool2d-gxwin-{tok}", f"max_pool2d-gx-{tok}"
    dsk = dict(win.dsk)
    nested = {}  # a window read by one tile only: its gradient is computed inside that tile's task
    for n in range(len(x.chunks[0])):
        for c in range(len(x.chunks[1])):
            for i in range(len(plan_h.out_chunks)):
                for j in range(len(plan_w.out_chunks)):
                    task = (max_pool2d_backward, win[n, c, i, j], (g_y.name, n, c, i, j), kernel, stride)
                    if window_reach(plan_h, plan_w, i, j) == 1:
                        nested[n, c, i, j] = task
                    else:
                        dsk[(gwin, n, c, i, j)] = task
    meta = x._meta.astype(g_y.dtype)
    scatter_windows(dsk, name, lambda *idx: nested.get(idx, (gwin, *idx)), x, plan_h, plan_w, meta)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x, g_y])
    return Array(graph, name, x.chunks, meta=meta)


__all__ = ["max_pool2d", "max_pool2d_vjp"]
