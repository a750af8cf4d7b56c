"""Spatial tiles in the fused training step (:mod:`dask_pconv.fused`): which tile of which
tensor each stage task computes, and the per-tile stage math.

A *tiled* stage runs on one tile of one batch chunk.  It reads its own block of the previous
stage's output (pre-BatchNorm values) and the strips of its neighbours' blocks its window
needs: the window is the tile grown by every halo the stage's convolutions need up to its
output tile (a ``2p+1`` "same" convolution adds ``p`` on each side, a ``k`` pooling multiplies
by ``k``), clipped at the image edge.  BatchNorm, ReLU and dropout are pointwise (the dropout
mask a function of the global element index), so the stage normalises the whole window itself
and the only padding is the convolutions' zeros at the true image edge, added after them.  Its
output is the output tile exactly, so a stage hands its neighbours pre-BatchNorm strips only,
through one small ``getitem`` task per tile, next to the one for its partial statistics: the
critical path stays two tasks per BatchNorm forward.

Backward, a tile's task runs the same window in reverse: from the exact gradient of its output
tile to the gradient of its window, which is its *contribution*; the true gradient of a tile's
input is the sum of the contributions of the tiles whose windows cover it (the step is linear
in the gradient: the ReLU masks, pooling routes and dropout masks are fixed by the forward).
The partial BatchNorm sums ``(sum g', sum g' xhat)`` are linear too, so each task computes them
on its contribution window and their sum over tiles is the full one; the task after the
BatchNorm synchronisation adds its own contribution and its neighbours' strips in a fixed order
(own first, then the neighbours row by row).  So backward is also two tasks per BatchNorm.

The stages from the one holding ``Flatten`` on read whole images: that stage concatenates its
chunk's tiles (:func:`concat_tiles`) and runs as in the batch-only path.
"""

from __future__ import annotations

from .backend import array_namespace
from .kernels import (
    Padded,
    bn_backward,
    bn_backward_partial,
    bn_partial_stats,
    canonical,
    conv2d_forward,
    conv2d_grad_b,
    conv2d_grad_w,
    conv2d_grad_x,
    dropout_keep,
    dropout_scale,
    max_pool2d_forward_taps,
    max_pool2d_scatter,
)
from .models.layers import BatchNorm, Conv2d, Dropout, Flatten, Linear, MaxPool2d
from .ops.nn import dropout_key
from .stages.block import batch_norm_forward, conv_bias, named, relu_backward, relu_forward, sum_parts

__all__ = ["BnCtx", "TilePlan", "concat_tiles", "plan_tiles", "tile_backward", "tile_forward"]


def segments(nodes):
    """``[(index, node), ...]`` per stage: the first holds the layers before the first
    BatchNorm, each later one starts at a BatchNorm."""
    segs = [[]]
    for i, node in enumerate(nodes):
        if isinstance(node.layer, BatchNorm):
            segs.append([])
        segs[-1].append((i, node))
    return [tuple(s) for s in segs]


# -- the geometry (no arrays) ---------------------------------------------------------------
def _intervals(chunks):
    out, start = [], 0
    for c in chunks:
        out.append((start, start + c))
        start += c
    return out


def _overlap(a, b):
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def _index(y, x):
    """A block index over N and C whole, rows ``y`` and columns ``x`` (``(lo, hi)`` pairs)."""
    return (slice(None), slice(None), slice(*y), slice(*x))


def _relative(ov, base):
    """The intervals ``ov`` relative to the starts of the intervals ``base``."""
    return [(o[0] - b[0], o[1] - b[0]) for o, b in zip(ov, base)]


_WHOLE = (slice(None),) * 4


class _Unfit(Exception):
    """Why a step's tiles do not fit the tiled stages (the message)."""


def _axis_plan(seg, own_out, length_in):
    """The lengths of one axis at each layer's input (and the stage's output), and per output
    tile ``[(input interval, output interval) per layer]``: each layer's output interval grown
    back by what it reads (``p`` on each side for a "same" convolution, clipped at the edge;
    ``k`` times for a ``k`` pool, which must have stride ``k``)."""
    lengths = [length_in]
    for _, node in seg:
        layer = node.layer
        if isinstance(layer, MaxPool2d):
            k = layer.kernel_size
            if (layer.stride or k) != k:
                raise _Unfit(f"node {node.name!r} pools with a stride other than its kernel")
            lengths.append(lengths[-1] // k)
        else:
            lengths.append(lengths[-1])
    plans = []
    for out in own_out:
        steps, iv = [], out
        for k_layer in range(len(seg) - 1, -1, -1):
            layer, length = seg[k_layer][1].layer, lengths[k_layer]
            if isinstance(layer, Conv2d):
                p = layer.padding
                new = (max(0, iv[0] - p), min(length, iv[1] + p))
            elif isinstance(layer, MaxPool2d):
                new = (iv[0] * layer.kernel_size, iv[1] * layer.kernel_size)
            else:
                new = iv
            steps.append((new, iv))
            iv = new
        plans.append(steps[::-1])
    return lengths, plans


class TilePlan:
    """The tiles of every tiled stage: per stage and axis, each tile's own interval at the
    stage's input, its window and the intervals of every layer; built by :func:`plan_tiles`."""

    def __init__(self, segs, chunks_hw):
        flat = [i for i, seg in enumerate(segs) if any(isinstance(n.layer, Flatten) for _, n in seg)]
        if not flat:
            raise _Unfit("the program has no Flatten before its Linear layers")
        self.gather = flat[0]
        self.grid = tuple(len(c) for c in chunks_hw)
        own = [_intervals(c) for c in chunks_hw]
        size = [sum(c) for c in chunks_hw]
        self.own, self.sizes, self.layers = [], [], []
        for s in range(self.gather + 1):
            self.own.append(own)
            if s == self.gather:
                self.sizes.append([size])
                break
            self._check(segs[s], own)
            axes = []
            for a in range(2):
                scale = 1
                for _, node in segs[s]:
                    if isinstance(node.layer, MaxPool2d):
                        scale *= node.layer.kernel_size
                out = [(lo // scale, hi // scale) for lo, hi in own[a]]
                axes.append(_axis_plan(segs[s], out, size[a]) + (out,))
            self.sizes.append([[axes[0][0][k], axes[1][0][k]] for k in range(len(segs[s]) + 1)])
            self.layers.append([axes[0][1], axes[1][1]])
            self._check_halo(segs[s], own, [axes[0][1], axes[1][1]])
            own = [axes[0][2], axes[1][2]]
            size = [axes[0][0][-1], axes[1][0][-1]]

    @staticmethod
    def _check(seg, own):
        for _, node in seg:
            layer = node.layer
            if isinstance(layer, Linear):
                raise _Unfit(f"node {node.name!r} is a Linear layer before the Flatten")
            if isinstance(layer, Conv2d) and layer.kernel_size != 2 * layer.padding + 1:
                raise _Unfit(f"node {node.name!r} is not a 'same' convolution (kernel 2p+1, padding p)")
        scale = 1
        for _, node in seg:
            if isinstance(node.layer, MaxPool2d):
                scale *= node.layer.kernel_size
                if any((hi - lo) % scale for axis in own for lo, hi in axis):
                    raise _Unfit(f"the tiles are not aligned with the pooling of node {node.name!r}")

    @staticmethod
    def _check_halo(seg, own, layers):
        for a in range(2):
            for t, steps in enumerate(layers[a]):
                w = steps[0][0]
                if (t > 0 and w[0] < own[a][t - 1][0]) or (t + 1 < len(own[a]) and w[1] > own[a][t + 1][1]):
                    raise _Unfit("a halo is wider than a neighbouring tile")

    def tiles(self):
        """Every tile ``(i, j)`` in row-major order."""
        return [(i, j) for i in range(self.grid[0]) for j in range(self.grid[1])]

    def window(self, s, ij):
        """Tile ``ij``'s window at stage ``s``'s input: ``((y0, y1), (x0, x1))``."""
        return tuple(self.layers[s][a][ij[a]][0][0] for a in range(2))

    def own_block(self, s, ij):
        return tuple(self.own[s][a][ij[a]] for a in range(2))

    def neighbours(self, ij):
        """Tile ``ij`` itself first, then the others around it, row by row."""
        out = [ij]
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                i, j = ij[0] + di, ij[1] + dj
                if (di, dj) != (0, 0) and 0 <= i < self.grid[0] and 0 <= j < self.grid[1]:
                    out.append((i, j))
        return out

    def pieces(self, s, src_iv, dst_iv, ij):
        """``[(u, source index in u's block, destination index)]``: the parts of the blocks
        ``src_iv(u)`` of tile ``ij`` and its neighbours that fall in ``dst_iv(ij)``."""
        out = []
        dst = dst_iv(ij)
        for u in self.neighbours(ij):
            src = src_iv(u)
            ov = [_overlap(src[a], dst[a]) for a in range(2)]
            if None in ov:
                continue
            out.append((u, _index(*_relative(ov, src)), _index(*_relative(ov, dst))))
        return out

    def forward_pieces(self, s, ij):
        """What tile ``ij``'s stage ``s`` window is made of: its neighbours' own blocks."""
        return self.pieces(s, lambda u: self.own_block(s, u), lambda u: self.window(s, u), ij)

    def backward_pieces(self, s, ij):
        """What the gradient of tile ``ij``'s own block at stage ``s``'s input sums: the
        windows' contributions of the tile and its neighbours."""
        return self.pieces(s, lambda u: self.window(s, u), lambda u: self.own_block(s, u), ij)

    def ctx(self, s, n0, ij, base):
        """The :class:`TileCtx` of tile ``ij`` of the chunk at ``n0`` in stage ``s``."""
        # per layer ((input rows, columns), (output rows, columns))
        steps = [self.layers[s][a][ij[a]] for a in range(2)]
        regions = [tuple(zip(*(steps[a][k] for a in range(2)))) for k in range(len(steps[0]))]
        # a neighbour's strip comes cut to size; the tile's own block and the batch's blocks
        # (the first stage's input) whole
        fwd = [(src if s == 0 or u == ij else _WHOLE, dst) for u, src, dst in self.forward_pieces(s, ij)]
        w = self.window(s, ij)
        return TileCtx(
            base,
            n0,
            regions,
            self.sizes[s],
            fwd,
            tuple(b - a for a, b in w),
            self._borders(s + 1, ij, self.forward_pieces) if s + 1 < len(self.layers) else {},
            self._borders(s, ij, self.backward_pieces),
        )

    def _borders(self, s, ij, pieces):
        """``{tile: index}``: the parts of tile ``ij``'s block the other tiles read at stage
        ``s`` (forward: its output, the next stage's input; backward: its window)."""
        flat = lambda u: u[0] * self.grid[1] + u[1]  # noqa: E731
        return {flat(v): src for v in self.neighbours(ij) if v != ij for u, src, _ in pieces(s, v) if u == ij}

    def bn_ctx(self, s, ij, n_total):
        """The :class:`BnCtx` of tile ``ij`` for the BatchNorm that starts stage ``s``: the
        tile's place in its saved state's block (the window of a tiled stage, the whole image
        of the stage that gathers the tiles) and in the gradient contributions."""
        count = n_total * self.sizes[s][0][0] * self.sizes[s][0][1]
        own = self.own_block(s, ij)
        if s == self.gather:
            return BnCtx(_index(*own), [(_index(*own), _WHOLE)], count)
        w = self.window(s, ij)
        pieces = [(src if u == ij else _WHOLE, dst) for u, src, dst in self.backward_pieces(s, ij)]
        return BnCtx(_index(*_relative(own, w)), pieces, count)


def plan_tiles(segs, chunks_hw):
    """A :class:`TilePlan` for the stages ``segs`` on tiles of ``chunks_hw`` (the rows' and
    columns' chunks), or a string: why they do not fit."""
    try:
        return TilePlan(segs, chunks_hw)
    except _Unfit as e:
        return str(e)


class TileCtx:
    """What one tile's stage task needs to know beyond its arrays: the dropout keys, where its
    blocks lie and which parts of them go where."""

    def __init__(self, base, n0, regions, sizes, fwd, window_hw, borders_out, borders_back):
        self.seed, self.step, self.dropout_on, self.n_total = base.seed, base.step, base.dropout, base.n_total
        self.n0, self.regions, self.sizes = n0, regions, sizes
        self.fwd_pieces, self.window_hw = fwd, window_hw
        self.borders_out, self.borders_back = borders_out, borders_back

    def dropout_keep(self, i, layer, h, k):
        """Layer ``i``'s dropout mask of ``h``, the block of region ``k``."""
        region, size = self.regions[k][0], self.sizes[k]
        location = ((self.n0, self.n0 + h.shape[0]), (0, h.shape[1]), *region)
        key = dropout_key(self.seed, self.step, i)
        return dropout_keep(h, layer.ratio, key, (self.n_total, h.shape[1], *size), location)


# -- the per-tile math ------------------------------------------------------------------------
def concat_tiles(rows):
    """The whole image of a chunk from its tiles (a list of rows of blocks)."""
    xp = array_namespace(rows[0][0])
    return xp.concatenate([xp.concatenate(row, axis=3) for row in rows], axis=2)


def _assemble(blocks, placement, hw):
    xp = array_namespace(blocks[0])
    N, C = blocks[0].shape[:2]
    out = xp.empty((N, C, *hw), dtype=blocks[0].dtype)
    for b, (src, dst) in zip(blocks, placement):
        out[dst] = b[src]
    return out


def _tile_forward(i, layer, h, p, ctx, k, saved, stats_parts):
    (iy, ix), (oy, ox) = ctx.regions[k]
    if isinstance(layer, Conv2d):
        q = layer.padding
        pads = (iy[0] - (oy[0] - q), oy[1] + q - iy[1], ix[0] - (ox[0] - q), ox[1] + q - ix[1])
        win = Padded(h, pads, 0)
        saved.append(win)
        return conv_bias(conv2d_forward(win, p["W"], (1, 1), (1, 1), 1), layer, p)
    if isinstance(layer, BatchNorm):
        return batch_norm_forward(layer, h, p, saved, stats_parts)
    if isinstance(layer, MaxPool2d):
        best, taps = max_pool2d_forward_taps(h, (layer.kernel_size,) * 2, (layer.kernel_size,) * 2)
        saved.append(taps)  # the backward routes by these taps, not searching h again
        return best
    if isinstance(layer, Dropout):
        if not ctx.dropout_on:
            return h
        keep = ctx.dropout_keep(i, layer, h, k)
        saved.append(keep)  # the backward applies the same mask, not hashed again
        return dropout_scale(h, keep, layer.ratio)
    return relu_forward(h, saved)  # ReLU


def _tile_backward(i, layer, g, p, ctx, k, saved, grads):
    if isinstance(layer, Conv2d):
        win, W = saved.pop(), p["W"]
        grads["W"] = conv2d_grad_w(win, g, W.shape[2:], (1, 1), (1, 1), 1)
        if layer.bias:
            grads["b"] = conv2d_grad_b(g).reshape(-1)
        t, _, left, _ = win.pads
        H, Wd = win.block.shape[2:]
        return conv2d_grad_x(g, W, (1, 1), (1, 1), 1, crop=((t, t + H), (left, left + Wd)))
    if isinstance(layer, MaxPool2d):
        taps, kk = saved.pop(), layer.kernel_size
        return max_pool2d_scatter(g, taps, (kk, kk), (kk, kk))
    if isinstance(layer, Dropout):
        return dropout_scale(g, saved.pop(), layer.ratio) if ctx.dropout_on else g
    return relu_backward(g, saved)  # ReLU


def tile_forward(seg, blocks, stats_parts, flat_params, ctx):
    """A stage forward on one tile: ``(output block, its partial statistics, saved, strips of
    the output block for the neighbours' next windows)``.  ``blocks`` are the pieces of the
    window in ``ctx.fwd_pieces`` order (the tile's own block first)."""
    h = _assemble(blocks, ctx.fwd_pieces, ctx.window_hw)
    saved = []
    for k, ((i, node), p) in enumerate(zip(seg, named(seg, flat_params))):
        h = _tile_forward(i, node.layer, h, p, ctx, k, saved, stats_parts)
    borders = {t: canonical(h[src]) for t, src in ctx.borders_out.items()}
    return h, bn_partial_stats(h), saved, borders


class BnCtx:
    """Where a tile lies for a BatchNorm's backward: its ``index`` in the block of the saved
    state, the ``pieces`` (source, destination) its gradient sums and the ``count`` of
    elements per channel over the whole batch."""

    def __init__(self, index, pieces, count):
        self.index, self.pieces, self.count = index, pieces, count


def tile_backward(
    seg_bn, bn_state, bn_ctx, g_blocks, sums_parts, gamma, seg_prev, saved_prev, flat_prev, ctx
):
    """Backward through a BatchNorm on one tile and the tiled stage before it.

    ``bn_state`` is ``(h, y, stats)``: the BatchNorm's input and output over a block holding
    the tile (its window, or the whole image), ``bn_ctx`` a :class:`BnCtx`; ``g_blocks`` the
    contributions to the gradient at its output, placed by ``bn_ctx.pieces``.  Returns
    ``(contribution of the window at the previous BatchNorm's output, its partial sums there,
    that BatchNorm's saved state, gradient parts, strips of the contribution for the
    neighbours)``; for the first stage (no BatchNorm) only the gradient parts."""
    bn = seg_bn[0][1].layer
    h, y, stats = bn_state
    h, y = canonical(h[bn_ctx.index]), canonical(y[bn_ctx.index])
    xp = array_namespace(h)
    g = xp.zeros(h.shape, dtype=h.dtype)
    for b, (src, dst) in zip(g_blocks, bn_ctx.pieces):
        g[dst] += b[src]
    g = bn_backward(h, y, g, stats, sum_parts(sums_parts), gamma, bn_ctx.count, bn.eps, bn.relu, True)
    params, saved = named(seg_prev, flat_prev), list(saved_prev)
    grads = [{} for _ in seg_prev]
    first = 1 if isinstance(seg_prev[0][1].layer, BatchNorm) else 0
    for k in range(len(seg_prev) - 1, first - 1, -1):
        i, node = seg_prev[k]
        g = _tile_backward(i, node.layer, g, params[k], ctx, k, saved, grads[k])
    if not first:
        return None, None, None, grads, None
    prev_bn = seg_prev[0][1].layer
    h0, y0, stats0 = saved.pop()
    sums = bn_backward_partial(h0, y0, g, stats0, prev_bn.eps, prev_bn.relu)
    borders = {t: canonical(g[src]) for t, src in ctx.borders_back.items()}
    return g, sums, (h0, y0, stats0), grads, borders
