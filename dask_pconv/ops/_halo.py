"""Halo windows: the input window of every output tile of a sliding-window op (conv2d,
max_pool2d), and the scatter of the windows' gradients back into the tiles they came from.

A *window array* is a virtual Dask array whose block ``(n, c, i, j)`` is the input window of
output tile ``(i, j)``: the tile plus its halo, with padding at the true image edge.  Its
chunks along H and W are the window lengths, so the windows overlap in the image but are
disjoint blocks in the graph.  Each block depends only on the input blocks its window reaches.
"""

from __future__ import annotations

from functools import cached_property

from dask.array.core import Array
from dask.highlevelgraph import HighLevelGraph

from .. import geometry as geo
from ..backend import array_namespace
from ..kernels import Padded
from ._tree_sum import tree_sum


def _assemble(pieces, offsets_h, offsets_w, shape, fill, meta):
    """Place ``pieces[a][b]`` at rows ``offsets_h[a]``, columns ``offsets_w[b]`` of a block
    of ``shape`` filled with ``fill`` (the padding value)."""
    xp = array_namespace(meta)
    out = xp.full(shape, fill, dtype=meta.dtype)
    for row, (y0, y1) in zip(pieces, offsets_h):
        for piece, (x0, x1) in zip(row, offsets_w):
            out[:, :, y0:y1, x0:x1] = piece
    return out


def _offsets(pad_before, pieces):
    out, off = [], pad_before
    for _, lo, hi in pieces:
        out.append((off, off + hi - lo))
        off += hi - lo
    return tuple(out)


def _strip(block, index):
    """A copy of ``block[index]``: a view would keep the whole neighbour block alive (and
    out of the worker's memory accounting, which counts a view's own bytes only:
    https://github.com/dask/distributed/issues/4186) for as long as the strip waits for its
    window."""
    return block[index].copy()


def _pad(block, ph0, ph1, pw0, pw1, fill):
    """``block`` with ``fill`` rows/columns at the image edge, kept lazy (see
    :class:`~dask_pconv.kernels.Padded`): the consumer task materialises it if it must."""
    return Padded(block, (ph0, ph1, pw0, pw1), fill)


class Windows:
    """The input window of every output tile ``(n, c, i, j)``: its tile plus its halo, with
    padding at the true image edge.

    ``win[n, c, i, j]`` is the window as an argument of the task that reads it (as
    :meth:`WindowGradients.argument` is for gradients).  A window inside one input block is the
    key of that block, or a task padding it that runs inside the reader's task (so no extra
    task); a window that reaches neighbours is the key of a task of its own (in ``dsk``) that
    assembles it from strips sliced off the neighbours, so only the strips travel between
    workers.  Either way it depends only on the input blocks the window reaches.
    """

    def __init__(self, x, plan_h, plan_w, fill, name):
        self.x, self.plan_h, self.plan_w, self.name = x, plan_h, plan_w, name
        self.dsk = {}
        self.tasks = {}
        slice_name = name + "-slice"
        chunks_h, chunks_w = x.chunks[2], x.chunks[3]
        for n, Nn in enumerate(x.chunks[0]):
            for c, Cc in enumerate(x.chunks[1]):
                for i, (ph0, ph1, pcs_h) in enumerate(plan_h.sources):
                    for j, (pw0, pw1, pcs_w) in enumerate(plan_w.sources):
                        single = (
                            len(pcs_h) == len(pcs_w) == 1
                            and pcs_h[0][1:] == (0, chunks_h[pcs_h[0][0]])
                            and pcs_w[0][1:] == (0, chunks_w[pcs_w[0][0]])
                        )
                        if single:
                            src = (x.name, n, c, pcs_h[0][0], pcs_w[0][0])
                            pads = (ph0, ph1, pw0, pw1)
                            self.tasks[n, c, i, j] = (_pad, src, *pads, fill) if any(pads) else src
                            continue
                        rows = []
                        for jh, h0, h1 in pcs_h:
                            row = []
                            for jw, w0, w1 in pcs_w:
                                src = (x.name, n, c, jh, jw)
                                if (h0, h1) != (0, chunks_h[jh]) or (w0, w1) != (0, chunks_w[jw]):
                                    sk = (slice_name, n, c, jh, jw, h0, h1, w0, w1)
                                    sl = (slice(None), slice(None), slice(h0, h1), slice(w0, w1))
                                    self.dsk[sk] = (_strip, src, sl)
                                    src = sk
                                row.append(src)
                            rows.append(row)
                        shape = (Nn, Cc, plan_h.window_lengths[i], plan_w.window_lengths[j])
                        key = (name, n, c, i, j)
                        self.dsk[key] = (
                            _assemble,
                            rows,
                            _offsets(ph0, pcs_h),
                            _offsets(pw0, pcs_w),
                            shape,
                            fill,
                            x._meta,
                        )
                        self.tasks[n, c, i, j] = key

    def __getitem__(self, idx):
        return self.tasks[idx]


def _window_reach(plan_h, plan_w, i, j):
    """How many input tiles window ``(i, j)`` reads."""
    return len(plan_h.sources[i][2]) * len(plan_w.sources[j][2])


class WindowGradients:
    """The gradient of every input window ``(n, c, i, j)`` of a VJP, as the tasks
    :func:`scatter_windows` reads to add them back into the input tiles.

    Each window's gradient is one of two things, decided by :meth:`add`:

    - ``embedded[n, c, i, j]``: the task that makes it, for a window that reaches one input
      tile only and is made by one task.  Only that tile's task reads it, so the task is placed
      inside that tile's task and costs no task (and no transfer) of its own;
    - otherwise a task of its own in ``dsk``, under the key ``(name, n, c, i, j)`` (the sum of
      its parts as a tree, see :func:`tree_sum`).

    With ``croppable``, an embedded task also takes a last argument ``((y0, y1), (x0, x1))``
    (rows and columns of the window to compute), so a tile that reads nothing but one
    embedded window is made by that task alone, cropped to the tile.
    """

    def __init__(self, name, plan_h, plan_w, croppable=False):
        self.name, self.plan_h, self.plan_w, self.croppable = name, plan_h, plan_w, croppable
        self.dsk = {}
        self.embedded = {}

    def add(self, idx, parts):
        """Window ``idx``'s gradient: the sum of ``parts``, a dict from a part's label to its
        task (each part of several a task ``(name + "-part", label, *idx)``)."""
        if len(parts) == 1 and _window_reach(self.plan_h, self.plan_w, *idx[2:]) == 1:
            (self.embedded[idx],) = parts.values()
        else:
            tree_sum(
                self.dsk, (self.name, *idx), [((self.name + "-part", o, *idx), t) for o, t in parts.items()]
            )

    def argument(self, idx):
        """Window ``idx``'s gradient as an argument of the task that reads it, a *computation*
        in Dask's terms (https://docs.dask.org/en/stable/spec.html): its embedded task, or the
        key of its own task in ``dsk`` (which Dask replaces by that task's result)."""
        return self.embedded[idx] if idx in self.embedded else (self.name, *idx)

    def cropped(self, idx, rows, cols):
        """A task that makes only ``rows, cols`` of window ``idx``'s gradient, or None where
        the window is not embedded or its tasks cannot crop."""
        if not self.croppable or idx not in self.embedded:
            return None
        return self.embedded[idx] + ((rows, cols),)


def _scatter(shape, meta, parts):
    """A block of ``shape``: the sum of window strips ``win[..., wy, wx]`` placed at ``ly, lx``."""
    xp = array_namespace(meta)
    out = xp.zeros(shape, dtype=meta.dtype)
    for win, (wy0, wy1), (wx0, wx1), (ly0, ly1), (lx0, lx1) in parts:
        out[:, :, ly0:ly1, lx0:lx1] += win[:, :, wy0:wy1, wx0:wx1]
    return out


def _contributions(plan, n_chunks):
    """For each input chunk: ``(tile, (w0, w1), (lo, hi))`` of every window that reads it."""
    out = [[] for _ in range(n_chunks)]
    for t, (pad_before, _, pieces) in enumerate(plan.sources):
        for (j, lo, hi), span in zip(pieces, _offsets(pad_before, pieces)):
            out[j].append((t, span, (lo, hi)))
    return out


def scatter_windows(dsk, name, grads, like, meta):
    """Add tasks ``(name, n, c, i, j)`` adding the window gradients ``grads`` (a
    :class:`WindowGradients`) back into the tiles of ``like``.

    The strips of the windows that overlap a tile are summed into it (halo strips go back to
    the neighbours they came from, padding is dropped); inputs no window reads get zeros.  A
    tile that is the whole of what one window gives back, where that window is embedded and
    croppable, is made by that window's task cropped to the tile (see
    :meth:`WindowGradients.cropped`).
    """
    contrib_h = _contributions(grads.plan_h, len(like.chunks[2]))
    contrib_w = _contributions(grads.plan_w, len(like.chunks[3]))
    for n, Nn in enumerate(like.chunks[0]):
        for c, Cc in enumerate(like.chunks[1]):
            for i, Hh in enumerate(like.chunks[2]):
                for j, Ww in enumerate(like.chunks[3]):
                    if len(contrib_h[i]) == len(contrib_w[j]) == 1:
                        (th, wy, ly), (tw, wx, lx) = contrib_h[i][0], contrib_w[j][0]
                        whole = (ly, lx) == ((0, Hh), (0, Ww))
                        task = grads.cropped((n, c, th, tw), wy, wx) if whole else None
                        if task is not None:
                            dsk[(name, n, c, i, j)] = task
                            continue
                    parts = [
                        [grads.argument((n, c, th, tw)), wy, wx, ly, lx]
                        for th, wy, ly in contrib_h[i]
                        for tw, wx, lx in contrib_w[j]
                    ]
                    dsk[(name, n, c, i, j)] = (_scatter, (Nn, Cc, Hh, Ww), meta, parts)


class InputShape:
    """The shape, chunks and meta of an input that a graph never reads, standing in for ``x``
    in a :class:`WindowedSetup`: a transposed convolution is the input-gradient of a
    convolution whose input does not exist.  It has no blocks, hence no windows."""

    def __init__(self, shape, chunks, meta):
        self.shape, self.chunks, self._meta = tuple(shape), tuple(chunks), meta
        self.dtype, self.ndim = meta.dtype, len(self.shape)

    def __dask_tokenize__(self):
        return ("InputShape", self.shape, self.chunks, type(self._meta).__name__, str(self.dtype))


class WindowedSetup:
    """What the forward and backward graphs of a sliding-window op share, with the same
    attribute names for every such op (``conv2d``, ``max_pool2d``).

    A subclass sets ``op`` (the first part of its task keys), validates its arguments and then
    calls this ``__init__``, which sets:

    ``x`` (the input, batched), ``unbatched`` (whether the caller's input had no batch axis),
    ``kernel``, ``stride``, ``pads`` and ``dilation`` (one entry per spatial axis; ``pads``
    are ``(before, after)`` pairs), ``plan_h`` and ``plan_w`` (the windows of each axis,
    :func:`dask_pconv.geometry.plan_axis`), ``out_shape`` and ``out_chunks`` (of the batched
    output; ``out_channel_chunks`` on axis 1), ``meta`` (``x``'s), ``token`` (of the op's
    arguments) and ``win``, the input windows (:class:`Windows`, padded with ``fill``; made
    when first read).  ``x`` may be an :class:`InputShape` for a graph that only scatters
    window gradients back into its tiles (:meth:`grad_x`), which never reads ``win``.
    """

    op = None

    def __init__(self, x, unbatched, kernel, stride, pads, dilation, out_hw, out_channel_chunks, fill, token):
        self.x, self.unbatched = x, unbatched
        self.kernel, self.stride, self.pads, self.dilation = kernel, stride, pads, dilation
        self.plan_h = geo.plan_axis(x.chunks[2], kernel[0], stride[0], pads[0], dilation[0])
        self.plan_w = geo.plan_axis(x.chunks[3], kernel[1], stride[1], pads[1], dilation[1])
        self.out_shape = (x.shape[0], sum(out_channel_chunks)) + tuple(out_hw)
        self.out_chunks = (x.chunks[0], out_channel_chunks, self.plan_h.out_chunks, self.plan_w.out_chunks)
        self.meta = x._meta
        self.token = token
        self.fill = fill

    @cached_property
    def win(self):
        """The input windows, a :class:`Windows` (an :class:`InputShape` has none)."""
        if isinstance(self.x, InputShape):
            raise TypeError(f"{self.op}: an input known by its shape only has no windows")
        return Windows(self.x, self.plan_h, self.plan_w, self.fill, f"{self.op}-halo-{self.token}")

    def result(self, a):
        """``a`` (a batched result) without its batch axis where the input had none."""
        return a[0] if self.unbatched else a

    def window_gradients(self, token, croppable=False):
        """An empty :class:`WindowGradients` for the VJP named by ``token``, keyed
        ``{op}-gxwin-{token}``."""
        return WindowGradients(f"{self.op}-gxwin-{token}", self.plan_h, self.plan_w, croppable)

    def grad_x(self, grads, token, dependencies, reads_windows=False):
        """The gradient with respect to ``x`` (batched, chunked like ``x``): the window gradients
        ``grads`` added back into the tiles, as tasks ``{op}-gx-{token}`` on top of the
        collections ``dependencies``.  With ``reads_windows`` the gradients' tasks read the
        input windows ``win`` (pooling finds each window's maximum again), which join the
        graph."""
        name = f"{self.op}-gx-{token}"
        dsk = dict(self.win.dsk) if reads_windows else {}
        dsk.update(grads.dsk)
        scatter_windows(dsk, name, grads, self.x, self.meta)
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=dependencies)
        return Array(graph, name, self.x.chunks, meta=self.meta)
