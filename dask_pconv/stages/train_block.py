"""A training stage on one block (a batch chunk of whole images, or one tile of it): the task
functions of the training step's graph (:mod:`dask_pconv.stages.step`), calling the block
interpreter (:mod:`dask_pconv.stages.block`) node by node.

*Forward.*  A stage task puts together the values it reads (the input's blocks, earlier stages'
values: on a tile, its window of each, from its own and its neighbours' regions), runs its nodes
(a BatchNorm with every block's partial statistics of its input), and returns the values later
stages read on its own region, their partial statistics where a BatchNorm reads them (over the
own region only, so every pixel counts once), what its nodes' backward reads, and the pieces of
its own regions its neighbours' windows need.

*Backward* mirrors it.  The gradient at each value the stage produced, on its own region, sums
the later stages' contributions (each reader's gradient of its window, cut to this region) in a
fixed order, then the BatchNorms reading it, finished here with every block's sums: the full
gradient of a BatchNorm's output is known on the own region only once every reader's
contribution is in.  The stage's nodes then run backward over their windows (the step is
linear in the gradient: masks and pooling routes are fixed by the forward), which makes the
contributions of this block to the values it read, and the partial BatchNorm sums of its own
BatchNorms, which are linear in the gradient too, so their sum over blocks is the full one.
Every sum over blocks runs in a fixed order in one task: the same bits on any number of workers.
"""

from __future__ import annotations

import numpy as np

from ..backend import array_namespace
from ..kernels import bn_backward, bn_backward_partial, bn_forward, bn_partial_stats, canonical, combine_stats
from ..models.layers import BatchNorm
from ..models.program import INPUT
from .block import Ctx, loss_block, named, node_backward, node_forward, sum_parts
from .lower import _window

__all__ = ["UnitCtx", "unit_backward", "unit_forward", "unit_last"]

_ALL = (slice(None), slice(None))


class UnitCtx(Ctx):
    """What one block's stage task knows beyond its arrays: the dropout keys and batch size
    (:class:`~dask_pconv.stages.block.Ctx`), and on a tile where its values lie.

    ``crops``: value -> the own region's slices inside the value the task holds (None: all of
    it); ``shapes``: read value -> the spatial shape of the window it reads; ``where``: node
    index -> ``(origin, full spatial shape)`` of its output (the dropout masks' global place);
    ``exports``: reader -> ``[(value, slices of the own region)]`` (forward pieces);
    ``strips``: producer -> ``[(value, slices of the held value)]`` (backward contributions);
    ``placements``: per part list a task reads (a read value, a gradient's pieces) ``[(source
    slices, destination slices), ...]`` (``(None, None)``: one part that is all of it);
    ``counts``: BatchNorm name -> elements per channel over the whole batch; ``pixels``: the
    output's pixels per image; ``label``: the own region's slices of the labels."""

    def __init__(self, base, offset, **kw):
        super().__init__(base.seed, base.step, base.dropout, base.n_total, offset, base.train)
        self.crops = kw.get("crops", {})
        self.shapes = kw.get("shapes", {})
        self.where = kw.get("where", {})
        self.exports = kw.get("exports", {})
        self.strips = kw.get("strips", {})
        self.counts = kw.get("counts", {})
        self.pixels = kw.get("pixels")
        self.label = kw.get("label")
        self.placements = kw.get("placements", {})

    def location(self, h, i=None):
        if i not in self.where:
            return super().location(h)
        (y0, x0), _ = self.where[i]
        n0 = self.offset
        return ((n0, n0 + h.shape[0]), (0, h.shape[1]), (y0, y0 + h.shape[2]), (x0, x0 + h.shape[3]))

    def full_shape(self, h, i=None):
        if i not in self.where:
            return super().full_shape(h)
        return (self.n_total, h.shape[1], *self.where[i][1])

    def own(self, v, a):
        """Value ``v``'s own region of ``a`` (a held block of it)."""
        crop = self.crops.get(v)
        return a if crop is None else canonical(a[(*_ALL, *crop)])


def _assemble(v, parts, ctx):
    """The window of read value ``v`` from its ``parts``, placed by ``ctx.placements[v]`` (one
    part that is all of it is used as it is)."""
    places = ctx.placements[v]
    if places[0][0] is None:
        return parts[0]
    return _window(parts, places, (*parts[0].shape[:2], *ctx.shapes[v]))


def _forward(spec, reads, stats_parts, params, ctx):
    values = {v: _assemble(v, parts, ctx) for v, parts in zip(spec.reads, reads)}
    saved = {}
    for (i, node), p, parts in zip(spec.nodes, params, stats_parts):
        saved[node.name] = []
        inputs = [values[v] for v in node.inputs]
        values[node.name] = node_forward(i, node, inputs, p, ctx, saved[node.name], parts)
    return values, saved


def _exports(own, ctx):
    return {
        r: {v: canonical(own[v][(*_ALL, *src)]) for v, src in pieces} for r, pieces in ctx.exports.items()
    }


def unit_forward(spec, reads, stats_parts, flat_params, ctx):
    """A stage forward on one block: ``(values later stages read, on the own region; their
    partial statistics where a BatchNorm reads them; saved per node; pieces for the
    neighbours)``.  ``reads`` holds per read value its parts; ``stats_parts`` per node (None but
    for BatchNorms) every block's partial statistics of its input."""
    values, saved = _forward(spec, reads, stats_parts, named(spec.nodes, flat_params), ctx)
    own = {v: ctx.own(v, values[v]) for v in spec.carried}
    stats = {v: bn_partial_stats(own[v] if v in own else ctx.own(v, values[v])) for v in spec.stats_of}
    return own, stats, saved, _exports(own, ctx)


def _add(grads, name, g):
    grads[name] = g if name not in grads else grads[name] + g


def _backward(spec, g_out, saved, params, ctx):
    """The stage's nodes backward from ``g_out`` (name -> gradient at the held value; summed in
    place as the nodes hand on theirs).  Returns ``(contributions to the values read, the
    gradient at each BatchNorm's output, their partial sums, parameter gradient parts)``."""
    own_names = set(spec.names)
    to_earlier, pending, sums, pgrads = {}, {}, {}, {}
    for (i, node), p in reversed(list(zip(spec.nodes, params))):
        g = g_out.pop(node.name)
        layer = node.layer
        if isinstance(layer, BatchNorm):
            h, y, stats = saved[node.name].pop()
            pending[node.name] = g
            sums[node.name] = bn_backward_partial(h, y, g, stats, layer.eps, layer.relu)
            continue
        grads = {}
        g_in = node_backward(i, node, g, p, ctx, saved[node.name], grads)
        pgrads.update({node.full_name(k): v for k, v in grads.items()})
        for v, gv in zip(node.inputs, g_in):
            if v != INPUT:
                _add(g_out if v in own_names else to_earlier, v, gv)
    return to_earlier, pending, sums, pgrads


def _strips(to_earlier, pending, ctx):
    """The pieces of this block's contributions each producer of a read value sums."""
    held = {**to_earlier, **{f"bn:{k}": g for k, g in pending.items()}}
    return {
        r: {v: canonical(held[v][(*_ALL, *src)]) for v, src in pieces if v in held}
        for r, pieces in ctx.strips.items()
    }


def unit_last(spec, reads, stats_parts, flat_params, t, ctx):
    """The last stage on one block: forward, the loss on the own region, its own nodes
    backward.  Returns :func:`unit_backward`'s result and ``(loss sum, correct count)``."""
    params = named(spec.nodes, flat_params)
    values, saved = _forward(spec, reads, stats_parts, params, ctx)
    last = spec.nodes[-1][1].name
    z = values[last]
    crop = ctx.crops.get(last)
    if ctx.label is not None:
        t = t[(slice(None), *ctx.label)]
    loss, correct, g = loss_block(ctx.own(last, z), t, ctx)
    if crop is not None:
        full = array_namespace(z).zeros(z.shape, dtype=z.dtype)
        full[(*_ALL, *crop)] = g
        g = full
    to_earlier, pending, sums, pgrads = _backward(spec, {last: g}, saved, params, ctx)
    return to_earlier, pending, sums, pgrads, _strips(to_earlier, pending, ctx), (loss, correct)


def _sum_pieces(pieces, places, like):
    """``pieces`` placed by ``places`` added into zeros shaped as ``like``, in their order (one
    piece that is all of it: itself)."""
    if places and places[0][0] is None:
        return pieces[0]
    out = array_namespace(like).zeros(like.shape, dtype=like.dtype)
    for block, (src, dst) in zip(pieces, places):
        out[(*_ALL, *dst)] += block[(*_ALL, *src)]
    return out


def unit_backward(spec, fwd, contributions, finishes, flat_params, ctx):
    """A stage backward on one block: the gradient at each value the stage produced, on its own
    region (the later stages' ``contributions`` ``[(value, placements' key, pieces), ...]`` in
    their order, then the BatchNorms reading it: ``finishes`` ``[(node, placements' key, pieces
    of the gradient at its output, every block's statistics of its input, every block's sums,
    gamma, beta), ...]``), then its
    nodes backward over the values it holds.  Returns what :func:`unit_last` returns, less the
    loss."""
    own, saved_fwd = fwd[0], fwd[2]
    g_own = {}
    for v, key, pieces in contributions:
        _add(g_own, v, _sum_pieces(pieces, ctx.placements[key], own[v]))
    for node, key, pieces, stats_parts, sums_parts, gamma, beta in finishes:
        h = own[node.inputs[0]]
        g = _sum_pieces(pieces, ctx.placements[key], h)
        layer = node.layer
        stats = combine_stats(list(stats_parts))
        y = bn_forward(h, stats, gamma, beta, layer.eps, layer.relu)
        count = ctx.counts.get(node.name) or ctx.n_total * int(np.prod(h.shape[2:]))
        _add(
            g_own,
            node.inputs[0],
            bn_backward(h, y, g, stats, sum_parts(sums_parts), gamma, count, layer.eps, layer.relu, True),
        )
    saved = {k: list(v) for k, v in saved_fwd.items()}  # popped here: the task's input stays whole
    g_out = {}
    for v, g in g_own.items():
        crop = ctx.crops.get(v)
        if crop is None:
            g_out[v] = g
            continue
        held = ctx.shapes[v]
        full = array_namespace(g).zeros((*g.shape[:2], *held), dtype=g.dtype)
        full[(*_ALL, *crop)] = g
        g_out[v] = full
    to_earlier, pending, sums, pgrads = _backward(spec, g_out, saved, named(spec.nodes, flat_params), ctx)
    return to_earlier, pending, sums, pgrads, _strips(to_earlier, pending, ctx)
