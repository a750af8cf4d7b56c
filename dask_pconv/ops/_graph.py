"""Graph builders shared by the ops: halo windows, tree sums and the scatter back to tiles.

A *window array* is a virtual Dask array whose block ``(n, c, i, j)`` is the input window of
output tile ``(i, j)``: the tile plus its halo, with padding at the true image edge.  Its
chunks along H and W are the window lengths, so the windows overlap in the image but are
disjoint blocks in the graph.  Each block depends only on the input blocks its window reaches.
"""

from __future__ import annotations

from ..backend import array_namespace
from ..kernels import Padded

SPLIT_EVERY = 4


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
    out of the worker's memory accounting) for as long as the strip waits for its window."""
    return block[index].copy()


def _pad(block, ph0, ph1, pw0, pw1, fill):
    """``block`` with ``fill`` rows/columns at the image edge, kept lazy (see
    :class:`~dask_pconv.kernels.Padded`): the consumer task materialises it if it must."""
    return Padded(block, (ph0, ph1, pw0, pw1), fill)


class Windows:
    """The input window of every output tile ``(n, c, i, j)``: its tile plus its halo, with
    padding at the true image edge, as a task (or key) consumers embed.

    A window inside one input block is that block (padded inside the consumer's task, so no
    extra task); a window that reaches neighbours is assembled by a task of its own
    (``dsk``) from strips sliced off the neighbours, so only the strips travel between
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


def _sum(arrays):
    out = arrays[0] + arrays[1]
    for a in arrays[2:]:
        out += a
    return out


def tree_sum(dsk, out_key, parts, split_every=SPLIT_EVERY, combine=None):
    """Add tasks to ``dsk`` that sum ``parts`` into ``out_key`` as a tree.

    ``parts`` is a list of ``(key, task)``: each part's task is added under its key, except a
    lone part, whose task becomes ``out_key`` itself (no alias task).  ``combine`` (a function
    of a list of blocks) replaces the sum.
    """
    combine = combine or _sum
    parts = list(parts)
    if not parts:
        raise ValueError("tree_sum needs at least one part")
    if len(parts) == 1:
        dsk[out_key] = parts[0][1]
        return
    dsk.update(parts)
    keys = [k for k, _ in parts]
    level = 0
    while len(keys) > split_every:
        nxt = []
        for i in range(0, len(keys), split_every):
            group = keys[i : i + split_every]
            if len(group) == 1:
                nxt.append(group[0])
                continue
            k = (out_key[0] + "-partial", level, i) + tuple(out_key[1:])
            dsk[k] = (combine, group)
            nxt.append(k)
        keys = nxt
        level += 1
    dsk[out_key] = (combine, keys) if len(keys) > 1 else keys[0]


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


def window_reach(plan_h, plan_w, i, j):
    """How many input tiles window ``(i, j)`` reads."""
    return len(plan_h.sources[i][2]) * len(plan_w.sources[j][2])


def scatter_windows(dsk, name, window, like, plan_h, plan_w, meta, direct=None):
    """Add tasks ``(name, n, c, i, j)`` adding window gradients back into the tiles of ``like``.

    ``window(n, c, th, tw)`` gives the key (or, for a window that reaches one tile only, the
    task) of the gradient of window ``(th, tw)``; the strips that overlap a tile are summed
    into it (halo strips go back to the neighbours they came from, padding is dropped).
    Inputs no window reads get zeros.  ``direct(n, c, th, tw, (wy0, wy1), (wx0, wx1))``, if
    given, may return a task that makes a tile read by exactly one window directly (that
    window's gradient cropped to the tile), or None.
    """
    contrib_h = _contributions(plan_h, len(like.chunks[2]))
    contrib_w = _contributions(plan_w, len(like.chunks[3]))
    for n, Nn in enumerate(like.chunks[0]):
        for c, Cc in enumerate(like.chunks[1]):
            for i, Hh in enumerate(like.chunks[2]):
                for j, Ww in enumerate(like.chunks[3]):
                    if direct and len(contrib_h[i]) == len(contrib_w[j]) == 1:
                        (th, wy, ly), (tw, wx, lx) = contrib_h[i][0], contrib_w[j][0]
                        task = direct(n, c, th, tw, wy, wx) if (ly, lx) == ((0, Hh), (0, Ww)) else None
                        if task is not None:
                            dsk[(name, n, c, i, j)] = task
                            continue
                    parts = [
                        [window(n, c, th, tw), wy, wx, ly, lx]
                        for th, wy, ly in contrib_h[i]
                        for tw, wx, lx in contrib_w[j]
                    ]
                    dsk[(name, n, c, i, j)] = (_scatter, (Nn, Cc, Hh, Ww), meta, parts)
