"""Chunked 2-D convolution and its vector-Jacobian product as Dask graphs.

Task keys are named by operator so the dashboard reads as the network does:
``conv2d-halo`` (window assembly), ``conv2d-fwd`` (forward partials and their sum over
input-channel chunks), ``conv2d-gx`` / ``conv2d-gxwin`` (grad-x windows and their scatter back
into tiles) and ``conv2d-gw`` (grad-w partials and their tree sum).  A transposed
convolution is a convolution's grad-x: ``conv_transpose2d-gxwin`` / ``conv_transpose2d-gx``.
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
from ._halo import InputShape, WindowedSetup
from ._tree_sum import tree_sum
from ._validate import (
    batched,
    check_groups,
    check_kernel_fits,
    check_same_dtype,
    checked_operand,
    gradient_like,
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
        groups = check_groups(groups)
        stride = geo.normalize_pair(stride, "stride")
        dilation = geo.normalize_pair(dilation, "dilation")
        self._init(x, unbatched, w, stride, dilation, groups, padding=padding)

    @classmethod
    def checked(cls, x, unbatched, w, stride, dilation, groups, pads):
        """The setup of operands that are checked already: ``x`` batched, a Dask array or an
        :class:`~dask_pconv.ops._halo.InputShape`; ``w`` a Dask array on ``x``'s device;
        ``stride`` and ``dilation`` pairs; ``pads`` resolved ``(lo, hi)`` pairs, where ``hi``
        may be negative (the last ``-hi`` input rows are then read by no output)."""
        self = cls.__new__(cls)
        self._init(x, unbatched, w, stride, dilation, check_groups(groups), pads=pads)
        return self

    def _init(self, x, unbatched, w, stride, dilation, groups, padding=None, pads=None):
        self.groups = groups
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
        if pads is None:
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
    y = _forward(s)
    if b is not None:
        b = on_device_of(check_same_dtype(checked_operand(b, "b", 1), "b", s.x), y)
        if b.shape != (s.out_shape[1],):
            raise ValueError(f"b must have shape ({s.out_shape[1]},), got {b.shape}")
        y = y + b.rechunk((s.w.chunks[0],)).reshape(1, -1, 1, 1)
    return s.result(y)


def _forward(s):
    """The batched output of the convolution ``s`` describes (a :class:`_ConvSetup`), no bias:
    per window and output-channel chunk, the partials of the input-channel chunks tree-summed."""
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
    return Array(graph, name, s.out_chunks, meta=s.meta)


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


# -- transposed convolution: the input-gradient of a convolution ----------------------------------
class _TransposedSetup(_ConvSetup):
    """The convolution whose input-gradient a transposed convolution is: its input (the
    transposed convolution's output) is an :class:`~dask_pconv.ops._halo.InputShape`, ``w`` is
    read as its weight ``(O=C_in, C_out/groups, kh, kw)`` and the transposed convolution's
    input as its output gradient.  Task keys start ``conv_transpose2d``."""

    op = "conv_transpose2d"


def _transposed(x, w, stride, padding, output_padding, groups, dilation):
    """``(s, g, x_chunks, w_chunks)``: the :class:`_TransposedSetup` of a transposed
    convolution of ``x`` with ``w``, ``x`` as that convolution's output gradient (batched,
    chunked like its output), after the checks of :func:`conv_transpose2d`; and the chunks of
    ``x`` (batched) and of ``w`` on axis 0 as given."""
    x = checked_operand(x, "x", (3, 4), empty_batch=True)
    unbatched = x.ndim == 3
    x = batched(x)
    w = on_device_of(check_same_dtype(checked_operand(w, "w", 4), "w", x), x)
    x_chunks, w_chunks = x.chunks, w.chunks[0]
    groups = check_groups(groups)
    stride = geo.normalize_pair(stride, "stride")
    dilation = geo.normalize_pair(dilation, "dilation")
    padding = geo.normalize_pair(padding, "padding", minimum=0)
    output_padding = geo.normalize_pair(output_padding, "output_padding", minimum=0)
    if any(op >= max(s, d) for op, s, d in zip(output_padding, stride, dilation)):
        raise ValueError(
            f"output_padding {output_padding} must be smaller than the stride {stride} or the "
            f"dilation {dilation} on each axis"
        )
    N, C, H, W = x.shape
    Ci, Cg, kh, kw = w.shape
    if Ci != C:
        raise ValueError(
            f"channel mismatch: x has {C} channels but w has {Ci} input channels "
            f"(w has shape (C_in, C_out/groups, kh, kw) = {w.shape})"
        )
    if C % groups:
        raise ValueError(f"groups={groups} does not divide the {C} input channels of x")
    kernel = (kh, kw)
    out_hw = tuple(
        (n - 1) * s - 2 * p + d * (k - 1) + op + 1
        for n, k, s, p, d, op in zip((H, W), kernel, stride, padding, dilation, output_padding)
    )
    if min(out_hw) < 1:
        raise ValueError(
            f"the output would have size {out_hw}: padding {padding} is too large for input size "
            f"{(H, W)}, kernel_size {kernel}, stride {stride}, dilation {dilation} and "
            f"output_padding {output_padding}"
        )
    # the convolution reads p rows before the image and p - output_padding after it, so that
    # its output has exactly H rows (the output padding's last rows are read by no output)
    pads = tuple((p, p - op) for p, op in zip(padding, output_padding))
    # x's channel chunks are w's axis-0 chunks (partials summed over them); where x's channels
    # are whole, w's chunks split them
    if len(x.chunks[1]) == 1 and len(w.chunks[0]) > 1:
        x = x.rechunk({1: w.chunks[0]})
    if w.chunks[0] != x.chunks[1]:
        w = w.rechunk({0: x.chunks[1]})
    spatial = tuple(
        _transposed_chunks(c, n, k, s, p, d)
        for c, n, k, s, p, d in zip(x.chunks[2:], out_hw, kernel, stride, padding, dilation)
    )
    shape = (N, Cg * groups) + out_hw
    virtual = InputShape(shape, (x.chunks[0], (Cg * groups,)) + spatial, x._meta)
    s = _TransposedSetup.checked(virtual, unbatched, w, stride, dilation, groups, pads)
    g = x if x.chunks == s.out_chunks else x.rechunk(s.out_chunks)
    return s, g, x_chunks, w_chunks


def _transposed_chunks(in_chunks, n_out, kernel, stride, pad, dilation):
    """Output chunks of one axis of a transposed convolution: the input tiles times the stride.

    An input tile boundary ``b`` becomes the output boundary ``b*s - p + floor(d*(k-1)/2)``,
    clipped to the output (``b*s`` where ``p = floor(d*(k-1)/2)``: kernel 3 padding 1, kernel 4
    stride 2 padding 1, kernel 2 stride 2).  The convolution's chunk rule maps these chunks back
    to the input tiles (:func:`dask_pconv.geometry.output_chunks`: the boundary lies in
    ``(centre(b-1), centre(b)]`` of the window centres); empty chunks are dropped.
    """
    shift = dilation * (kernel - 1) // 2 - pad
    bounds, b = [0], 0
    for c in in_chunks[:-1]:
        b += c
        bounds.append(min(max(b * stride + shift, 0), n_out))
    bounds.append(n_out)
    return tuple(hi - lo for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo)


def conv_transpose2d(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """2-D transposed convolution of a chunked batch of images.

    Same semantics (and argument order) as ``torch.nn.functional.conv_transpose2d``: the
    gradient of :func:`conv2d` with respect to its input, for any chunking of ``x`` and ``w``.

    Parameters
    ----------
    x : dask.array.Array, shape (N, C_in, H, W) or (C_in, H, W)
        Images, chunked any way on all four axes (a NumPy or CuPy array is wrapped as one
        chunk), as for :func:`conv2d`.  ``N`` may be 0; an unbatched input gives an unbatched
        result.
    w : array, shape (C_in, C_out/groups, kh, kw)
        Filters (PyTorch's layout for a transposed convolution), of ``x``'s dtype.  Chunks on
        axis 0 split the input channels: where ``x``'s channels are whole they are split the
        same way, otherwise ``w`` is rechunked to ``x``'s channel chunks.
    b : array, shape (C_out,), optional
        Bias, of ``x``'s dtype.
    stride, dilation : int or (int, int)
        Positive.
    padding : int or (int, int)
        Rows/columns cut from both sides of the full transposed convolution (PyTorch's
        ``dilation*(kernel_size-1) - padding`` implicit zeros on both sides of the input); not
        a string, as in PyTorch.
    output_padding : int or (int, int)
        Extra rows/columns at the end of the output; smaller than the stride or the dilation.
    groups : int
        Divides ``C_in``; ``C_out = groups * w.shape[1]``.

    Returns
    -------
    dask.array.Array, shape (N, C_out, oH, oW)
        ``oH = (H - 1)*sy - 2*ph + dy*(kh - 1) + oph + 1`` and likewise ``oW``; ``x``'s
        dtype.  Chunks: the batch chunks of ``x``, one chunk of output channels (the
        input-channel chunks are summed away as a tree), and spatial chunks that are ``x``'s
        tiles times the stride: an input tile boundary ``b`` is the output boundary
        ``b*s - p + floor(d*(k-1)/2)`` (just ``b*s`` for kernel 2 stride 2, kernel 4 stride 2
        padding 1 or kernel 3 padding 1), clipped to the output; empty chunks are dropped.

    Notes
    -----
    It is :func:`conv2d_vjp`'s ``g_x`` for an input of shape ``(N, C_out, oH, oW)``, with ``w``
    read as a convolution's weight ``(O=C_in, C_out/groups, kh, kw)`` and ``x`` as the output
    gradient: each input tile spreads into its window of the output (its tile plus the
    kernel's reach), and the windows' overlaps are added back into their tiles.
    """
    s, g, _, _ = _transposed(x, w, stride, padding, output_padding, groups, dilation)
    y = _grad_x(s, g, tokenize(s.token, g))
    if b is not None:
        b = on_device_of(check_same_dtype(checked_operand(b, "b", 1), "b", g), y)
        if b.shape != (s.x.shape[1],):
            raise ValueError(f"b must have shape ({s.x.shape[1]},), got {b.shape}")
        y = y + b.rechunk(-1).reshape(1, -1, 1, 1)
    return s.result(y)


def conv_transpose2d_vjp(x, w, g_y, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Vector-Jacobian product of :func:`conv_transpose2d`: gradients of
    ``<g_y, conv_transpose2d(x, w, b)>``.

    Parameters
    ----------
    x, w, stride, padding, output_padding, groups, dilation
        As in :func:`conv_transpose2d`.
    g_y : array, shape (N, C_out, oH, oW)
        Gradient with respect to the output (``(C_out, oH, oW)`` for an unbatched ``x``), of
        ``x``'s dtype; rechunked to the output chunks of :func:`conv_transpose2d` if it is
        chunked otherwise.

    Returns
    -------
    g_x : dask.array.Array, shape (N, C_in, H, W)
        ``conv2d(g_y, w, stride=stride, padding=padding, dilation=dilation, groups=groups)``
        (with ``output_padding`` fewer zeros after the image: the output padding is read by
        no input), chunked like ``x``; all three results have ``x``'s dtype.
    g_w : dask.array.Array, shape (C_in, C_out/groups, kh, kw)
        :func:`conv2d_vjp`'s ``g_w`` of the input ``g_y`` and the output gradient ``x``;
        chunked like ``w`` on axis 0, whole on the others.
    g_b : dask.array.Array, shape (C_out,)
        ``g_y.sum((0, 2, 3))``.
    """
    t, g, x_chunks, w_chunks = _transposed(x, w, stride, padding, output_padding, groups, dilation)
    g_y = gradient_like(g_y, "g_y", g, t.unbatched, t.x.shape, t.x.chunks)
    # the convolution of g_y (a real input now): its output is chunked like g, its g_w is the
    # transposed convolution's
    s = _ConvSetup.checked(g_y, t.unbatched, t.w, t.stride, t.dilation, t.groups, t.pads)
    tok = tokenize(t.token, g_y, g)
    g_x = _forward(s)
    if g_x.chunks != x_chunks:
        g_x = g_x.rechunk(x_chunks)
    g_w = _grad_w(s, g, tok)
    if g_w.chunks[0] != w_chunks:
        g_w = g_w.rechunk({0: w_chunks})
    return s.result(g_x), g_w, _grad_b(g_y, tok)


__all__ = ["conv2d", "conv2d_vjp", "conv_transpose2d", "conv_transpose2d_vjp"]
