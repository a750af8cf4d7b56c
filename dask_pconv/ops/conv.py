"""Chunked 2-D convolution and its vector-Jacobian product as Dask graphs.

Task keys are named by operator so the dashboard reads as the network does:
``conv2d-halo`` (window assembly), ``conv2d-fwd`` (forward partials and their sum over
input-channel chunks), ``conv2d-gx`` / ``conv2d-gxwin`` (grad-x windows and their scatter back
into tiles) and ``conv2d-gw`` (grad-w partials and their tree sum).
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.array.core import Array
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from .. import geometry as geo
from ..backend import array_namespace, on_device_of
from ..kernels import conv2d_forward, conv2d_grad_b, conv2d_grad_w, conv2d_grad_x, cropped
from ._halo import WindowedSetup
from ._tree_sum import tree_sum
from ._validate import (
    batched,
    check_groups,
    check_kernel_fits,
    check_same_dtype,
    checked_operand,
    output_gradient,
)


class _ConvSetup(WindowedSetup):
    """Validated arguments and the geometry shared by forward and backward (the attributes of
    :class:`~dask_pconv.ops._halo.WindowedSetup`, and ``w``, ``groups``, ``dtype`` and
    ``pairs``)."""

    op = "conv2d"

    def __init__(self, x, w, stride, padding, dilation, groups):
        x = checked_operand(x, "x", (3, 4), empty_batch=True)
        unbatched = x.ndim == 3
        x = batched(x)
        w = on_device_of(check_same_dtype(checked_operand(w, "w", 4), "w", x), x)
        self.groups = groups = check_groups(groups)
        stride = geo.normalize_pair(stride, "stride")
        dilation = geo.normalize_pair(dilation, "dilation")
        N, C, H, W = x.shape
        O, Cg, kh, kw = w.shape
        kernel = (kh, kw)
        if C % groups:
            raise ValueError(f"groups={groups} does not divide the {C} input channels of x")
        if O % groups:
            raise ValueError(f"groups={groups} does not divide the {O} output channels of w")
        if Cg * groups != C:
            raise ValueError(
                f"channel mismatch: x has {C} channels but w expects {Cg} x groups={groups} "
                f"= {Cg * groups} (w has shape {w.shape})"
            )
        pads = geo.resolve_padding(padding, kernel, stride, dilation)
        out_hw = tuple(
            geo.output_length(n, k, s, p, d) for n, k, s, p, d in zip((H, W), kernel, stride, pads, dilation)
        )
        check_kernel_fits((H, W), kernel, pads, dilation, out_hw)
        # an output-channel split is w's chunking on axis 0; the other axes are needed whole
        if any(len(c) > 1 for c in w.chunks[1:]):
            w = w.rechunk({1: -1, 2: -1, 3: -1})
        self.w = w
        self.dtype = x.dtype  # w has it too: nothing is promoted
        # which (output-channel chunk, input-channel chunk) pairs meet, through which groups
        o_ranges = _ranges(w.chunks[0])
        c_ranges = _ranges(x.chunks[1])
        self.pairs = [
            [
                (ci, _calls(geo.channel_segments(orng, crng, O, C, groups), O // groups, Cg))
                for ci, crng in enumerate(c_ranges)
            ]
            for orng in o_ranges
        ]
        self.pairs = [[(ci, calls) for ci, calls in row if calls] for row in self.pairs]
        token = tokenize(x, w, stride, pads, dilation, groups)
        super().__init__(x, unbatched, kernel, stride, pads, dilation, out_hw, w.chunks[0], 0, token)


def _ranges(chunks):
    bounds = np.cumsum((0,) + tuple(chunks))
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _calls(segments, og, cg):
    """Kernel calls for one channel pair: ``(o, c, wc, groups)`` ranges.

    Whole groups side by side become one grouped call; anything else is one call per segment.
    """
    if len(segments) > 1 and all(s.o[1] - s.o[0] == og and s.wc == (0, cg) for s in segments):
        s0, s1 = segments[0], segments[-1]
        return (((s0.o[0], s1.o[1]), (s0.c[0], s1.c[1]), (0, cg), len(segments)),)
    return tuple((s.o, s.c, s.wc, 1) for s in segments)


def _conv_pair(xw, W, calls, n_out, stride, dilation):
    """Partial forward of one window and one output-channel chunk of ``W``: ``(N, O_chunk, oH, oW)``."""
    out = None
    for (o0, o1), (c0, c1), (w0, w1), groups in calls:
        y = conv2d_forward(xw[:, c0:c1], W[o0:o1, w0:w1], stride, dilation, groups)
        if o1 - o0 == n_out and len(calls) == 1:
            return y
        if out is None:
            xp = array_namespace(y)
            out = xp.zeros((y.shape[0], n_out) + y.shape[2:], dtype=y.dtype)
        out[:, o0:o1] += y
    return out


def _gx_pair(gy, W, calls, n_in, stride, dilation, crop=None):
    """Grad of one window's ``n_in`` input channels from one output-channel chunk; with
    ``crop = ((y0, y1), (x0, x1))`` only that part of the window."""
    if len(calls) == 1 and calls[0][1][1] - calls[0][1][0] == n_in:
        (o0, o1), _, (w0, w1), groups = calls[0]
        return conv2d_grad_x(gy[:, o0:o1], W[o0:o1, w0:w1], stride, dilation, groups, crop)
    out = None
    for (o0, o1), (c0, c1), (w0, w1), groups in calls:
        g = conv2d_grad_x(gy[:, o0:o1], W[o0:o1, w0:w1], stride, dilation, groups)
        if out is None:
            xp = array_namespace(g)
            out = xp.zeros((g.shape[0], n_in) + g.shape[2:], dtype=g.dtype)
        out[:, c0:c1] += g
    return cropped(out, crop)  # a task's result is a canonical block


def _gw_pair(xw, gy, calls, w_shape, stride, dilation):
    """Grad-w of one window and one output-channel chunk: ``(O_chunk, C/groups, kh, kw)``."""
    out = None
    for (o0, o1), (c0, c1), (w0, w1), groups in calls:
        g = conv2d_grad_w(xw[:, c0:c1], gy[:, o0:o1], w_shape[2:], stride, dilation, groups)
        if len(calls) == 1 and g.shape == tuple(w_shape):
            return g
        if out is None:
            xp = array_namespace(g)
            out = xp.zeros(tuple(w_shape), dtype=g.dtype)
        out[o0:o1, w0:w1] += g
    return out


def conv2d(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    """2-D convolution (cross-correlation) of a chunked batch of images.

    Same semantics as ``torch.nn.functional.conv2d``; the result equals the unsplit
    convolution for any chunking of ``x`` and ``w``.

    Parameters
    ----------
    x : dask.array.Array, shape (N, C, H, W) or (C, H, W)
        Images, chunked any way on all four axes (a NumPy or CuPy array is wrapped as one
        chunk).  Floating dtype.  ``N`` may be 0 (an empty result); an unbatched ``(C, H, W)``
        input gives an unbatched ``(O, oH, oW)`` result, as in PyTorch.
    w : array, shape (O, C/groups, kh, kw)
        Filters: a NumPy/CuPy array or a Dask array, of ``x``'s dtype (nothing is promoted:
        mixed dtypes are a ``TypeError``, as in PyTorch).  Chunks of ``w`` on axis 0 split the
        output channels (model parallelism); chunks on the other axes are merged.
    b : array, shape (O,), optional
        Bias, of ``x``'s dtype.
    stride, dilation : int or (int, int)
        Positive; a one-element tuple means the same on both axes, as in PyTorch.
    padding : int, (int, int), 'same' or 'valid'
        Zero padding on both sides of each spatial axis.  'same' keeps the size (stride 1
        only); an odd total goes to the end, as in PyTorch.
    groups : int
        Grouped convolution; ``groups == C`` is depthwise.

    Masked arrays (NumPy's or ``dask.array.ma``'s) and ``torch.Tensor`` operands are a
    ``TypeError``: the kernels would ignore a mask, and a tensor is passed as ``t.numpy()``.

    Returns
    -------
    dask.array.Array, shape (N, O, oH, oW)
        ``oH = floor((H + 2*ph - dy*(kh-1) - 1) / sy) + 1`` and likewise ``oW``; the dtype of
        ``x``.  Chunks: the
        batch chunks of ``x``, the output-channel chunks of ``w``, and spatial chunks from the
        tiles of ``x`` through the stride (output ``o`` belongs to the tile holding the centre
        of its window; empty chunks are dropped).  Input-channel chunks of ``x`` are summed
        away as a tree.

    Notes
    -----
    Each output tile is computed from its input tile plus a halo taken from as many
    neighbouring tiles as the kernel reaches; zeros are read only outside the image.
    """
    s = _ConvSetup(x, w, stride, padding, dilation, groups)
    name = f"conv2d-fwd-{s.token}"
    dsk = dict(s.win.dsk)
    for n in range(len(s.x.chunks[0])):
        for oi, row in enumerate(s.pairs):
            n_out = s.w.chunks[0][oi]
            for i in range(len(s.plan_h.out_chunks)):
                for j in range(len(s.plan_w.out_chunks)):
                    w_key = (s.w.name, oi, 0, 0, 0)
                    parts = [
                        (
                            (name + "-part", ci, n, oi, i, j),
                            (_conv_pair, s.win[n, ci, i, j], w_key, calls, n_out, s.stride, s.dilation),
                        )
                        for ci, calls in row
                    ]
                    tree_sum(dsk, (name, n, oi, i, j), parts)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[s.x, s.w])
    y = Array(graph, name, s.out_chunks, meta=s.meta)
    if b is not None:
        b = on_device_of(check_same_dtype(checked_operand(b, "b", 1), "b", s.x), y)
        if b.shape != (s.out_shape[1],):
            raise ValueError(f"b must have shape ({s.out_shape[1]},), got {b.shape}")
        y = y + b.rechunk((s.w.chunks[0],)).reshape(1, -1, 1, 1)
    return s.result(y)


def conv2d_vjp(x, w, g_y, stride=1, padding=0, dilation=1, groups=1):
    """Vector-Jacobian product of :func:`conv2d`: gradients of ``<g_y, conv2d(x, w, b)>``.

    Parameters
    ----------
    x, w, stride, padding, dilation, groups
        As in :func:`conv2d`.
    g_y : array, shape (N, O, oH, oW)
        Gradient with respect to the output (``(O, oH, oW)`` for an unbatched ``x``), of
        ``x``'s dtype; rechunked to the output chunks of :func:`conv2d` if it is chunked
        otherwise.

    Returns
    -------
    g_x : dask.array.Array, shape (N, C, H, W)
        Chunked like ``x`` (and unbatched like it); all three results have ``x``'s dtype.  A
        transposed convolution of ``g_y`` with ``w``, computed per output tile on its window
        and added back into the tiles the window came from; summed over output-channel chunks.
    g_w : dask.array.Array, shape (O, C/groups, kh, kw)
        Chunked like ``w`` on axis 0, whole on the others; summed over batch chunks, tiles and
        input-channel chunks as a tree.
    g_b : dask.array.Array, shape (O,)
        ``g_y.sum((0, 2, 3))``.
    """
    s = _ConvSetup(x, w, stride, padding, dilation, groups)
    g_y = output_gradient(g_y, s)
    tok = tokenize(s.token, g_y)
    return s.result(_grad_x(s, g_y, tok)), _grad_w(s, g_y, tok), _grad_b(g_y, tok)


def _grad_x(s, g_y, tok):
    """g_x of :func:`conv2d_vjp`, batched: per input window and input-channel chunk, the sum over
    output-channel chunks of the transposed convolutions, scattered back into the tiles."""
    by_c = {}  # input-channel chunk -> the output-channel chunks it meets, and their calls
    for oi, row in enumerate(s.pairs):
        for ci, calls in row:
            by_c.setdefault(ci, []).append((oi, calls))
    # a tile that is the interior of one window made by one task computes just the tile
    grads = s.window_gradients(tok, croppable=True)
    for n in range(len(s.x.chunks[0])):
        for ci, n_in in enumerate(s.x.chunks[1]):
            for i in range(len(s.plan_h.out_chunks)):
                for j in range(len(s.plan_w.out_chunks)):
                    parts = {
                        oi: (
                            _gx_pair,
                            (g_y.name, n, oi, i, j),
                            (s.w.name, oi, 0, 0, 0),
                            calls,
                            n_in,
                            s.stride,
                            s.dilation,
                        )
                        for oi, calls in by_c[ci]
                    }
                    grads.add((n, ci, i, j), parts)
    return s.grad_x(grads, tok, [g_y, s.w])


def _grad_w(s, g_y, tok):
    """g_w of :func:`conv2d_vjp`: one partial per (window, output-channel chunk), tree-summed
    over batch chunks, tiles and input-channel chunks."""
    gw_name = f"conv2d-gw-{tok}"
    nN, nI, nJ = len(s.x.chunks[0]), len(s.plan_h.out_chunks), len(s.plan_w.out_chunks)
    dsk = dict(s.win.dsk)
    for oi, row in enumerate(s.pairs):
        w_shape = (s.w.chunks[0][oi],) + s.w.shape[1:]
        parts = [
            (
                (gw_name + "-part", n, i, j, ci, oi),
                (_gw_pair, s.win[n, ci, i, j], (g_y.name, n, oi, i, j), calls, w_shape, s.stride, s.dilation),
            )
            for n in range(nN)
            for i in range(nI)
            for j in range(nJ)
            for ci, calls in row
        ]
        tree_sum(dsk, (gw_name, oi, 0, 0, 0), parts)
    graph = HighLevelGraph.from_collections(gw_name, dsk, dependencies=[s.x, g_y])
    return Array(graph, gw_name, s.w.chunks, meta=s.meta)


def _grad_b(g_y, tok):
    """g_b of :func:`conv2d_vjp`: one ``(1, O, 1, 1)`` partial sum per block (by the kernel, on
    a canonical block), then Dask's sum of the partials.  Dask's own sum of the blocks would
    round by each block's memory layout, which depends on where the block was computed
    (NumPy's sum follows the memory order: https://github.com/numpy/numpy/issues/13240)."""
    parts = da.blockwise(
        conv2d_grad_b,
        "nohw",
        g_y,
        "nohw",
        adjust_chunks={"n": 1, "h": 1, "w": 1},
        dtype=g_y.dtype,
        meta=g_y._meta,
        name=f"conv2d-gb-{tok}",
    )
    return parts.sum(axis=(0, 2, 3))


__all__ = ["conv2d", "conv2d_vjp"]
