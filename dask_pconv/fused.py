"""A training step as coarse tasks: between two points where the batch chunks must exchange
something (a BatchNorm's statistics forward, its gradient sums backward), each chunk's work is
one task.

The fine-grained step (the tape over :mod:`dask_pconv.ops`) makes several tasks per layer and
chunk: the convolution, the partial statistics, a tree that combines them, the normalisation,
the ReLU, the dropout, the pooling, and as many again backward.  On distributed each dependent
task costs a scheduler round trip (about 6 ms here), so a VGG16 step's critical path of about
155 tasks costs about 1 s before any arithmetic.  Here a *stage* runs, for one chunk of the
batch, a BatchNorm (reading every chunk's partial statistics itself, no combine task), the
layers after it up to the next BatchNorm, and that BatchNorm's partial statistics of its
input; the last stage also runs the loss and the backward pass back to the last BatchNorm.
Backward stages mirror it.  The weight gradients' per-chunk parts are summed in chunk order by
the optimizer's update task.

A stage's result is a tuple; a small ``getitem`` task picks out what other chunks read (the
statistics, the gradient sums, a weight gradient's part), so a communication point costs two
dependent tasks: the stage and its ``getitem``.  (A Dask task has one result, and a consumer on
another worker receives that result whole.)

Which steps take this path (:func:`fusable`): a :class:`~dask_pconv.models.program.Program`
that is a chain of ``Conv2d`` (stride 1), ``BatchNorm`` (at least one), ``ReLU``,
``MaxPool2d``, ``Dropout``, ``Flatten`` and ``Linear`` layers ending in a ``Linear``; a batch
split into chunks, spatial tiles or both (channels whole in each block, parameters unsplit);
momentum SGD.  On tiles, the convolutions before the ``Flatten`` must be "same" ones (kernel
``2p+1``, padding ``p``), the pools there must not cross a tile and a halo must not be wider
than a neighbouring tile (:mod:`dask_pconv._fused_tiles` describes the tiled stages: the same
two tasks per BatchNorm forward and backward).  On batch chunks, any other program of the
layer kinds :mod:`dask_pconv._fused_dag` runs (residual additions, concatenations, strided,
dilated, grouped and transposed convolutions, average pooling, upsampling; at least one
``BatchNorm``, every node leading to the output, logits ``(N, K)`` or per pixel) takes the
stages of that module.  Every other step runs the fine-grained graph, with the same result to
rounding.  The config key ``pconv.fused`` (default True) turns the path off.

Results: the same mathematics as the fine-grained step, so equal to rounding; bitwise the same
for the same split on any number of workers (every kernel is layout invariant and every sum
over chunks and tiles runs in a fixed order in one task).
"""

from __future__ import annotations

import operator

import dask
import numpy as np

from ._fused_common import CHAIN_LAYERS, StageGraph
from ._fused_common import pick as _pick
from ._fused_dag import DagStepGraph, dag_unfit
from ._fused_tiles import (
    concat_tiles,
    plan_tiles,
    tile_backward,
    tile_forward,
)
from ._fused_tiles import segments as _segments
from .kernels import bn_backward, bn_backward_partial, bn_partial_stats
from .models.layers import BatchNorm, Conv2d, Linear, MaxPool2d
from .optim import MomentumSGD
from .stages.block import layer_backward, layer_forward, loss_block
from .stages.block import named as _named
from .stages.block import sum_parts as _sum_parts

__all__ = ["fusable", "fused_gradients", "fused_training_step"]

_LAYERS = CHAIN_LAYERS


def fusable(model, optimizer, params, x):
    """Why the step of ``model`` on ``x`` cannot run as coarse stages, or None if it can
    (``optimizer`` None: the forward-backward pass alone, :func:`fused_gradients`)."""
    if not dask.config.get("pconv.fused", True):
        return "pconv.fused is off"
    if optimizer is not None and not isinstance(optimizer, MomentumSGD):
        return f"the optimizer is a {type(optimizer).__name__}, not MomentumSGD"
    program = getattr(model, "program", None)
    if not getattr(program, "nodes", None):
        return "the model has no program"
    if x.ndim != 4 or x.numblocks[1] != 1:
        return "the batch is split along its channels (only batch chunks and spatial tiles fuse)"
    if any(p.npartitions != 1 for p in params.values()):
        return "the parameters are split"
    chain = _chain_unfit(program.nodes, x)
    if chain is None:
        return None
    if x.numblocks[2:] != (1, 1):  # tiles fuse in chains only
        return f"on spatial tiles only chains of {', '.join(c.__name__ for c in _LAYERS)} fuse: {chain}"
    dag = dag_unfit(program)
    return None if dag is None else f"{dag} (and as a chain: {chain})"


def _chain_unfit(nodes, x):
    """Why the chain's stages (this module's) cannot run the program, or None."""
    previous = "input"
    for node in nodes:
        if node.inputs != (previous,):
            return f"node {node.name!r} does not read the node before it (not a chain)"
        if not isinstance(node.layer, _LAYERS):
            return f"node {node.name!r} is a {type(node.layer).__name__}"
        if isinstance(node.layer, Conv2d) and node.layer.stride != 1:
            return f"node {node.name!r} has stride {node.layer.stride}"
        if isinstance(node.layer, MaxPool2d) and not node.layer.plain():
            return f"node {node.name!r} pools with padding, dilation or ceil mode"
        if isinstance(node.layer, Conv2d) and not _plain_conv(node.layer):
            return f"node {node.name!r} is dilated, grouped, or has a padding or kernel_size not one int"
        previous = node.name
    if not isinstance(nodes[-1].layer, Linear) or not any(isinstance(n.layer, BatchNorm) for n in nodes):
        return "the program does not end in a Linear layer or has no BatchNorm"
    if x.numblocks[2:] != (1, 1):
        plan = plan_tiles(_segments(nodes), x.chunks[2:])
        if isinstance(plan, str):
            return f"the spatial tiles do not fit the fused stages: {plan}"
    return None


def _plain_conv(layer):
    """The stages' convolutions: one int kernel size and padding, no dilation, no groups."""
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (layer.kernel_size, layer.padding))
    return ints and layer.dilation == 1 and layer.groups == 1


# -- the stages, one chunk at a time ------------------------------------------------------------
def stage_forward(seg, h, stats_parts, flat_params, ctx):
    """A stage forward on one chunk: ``(output, partial statistics of the output, saved)``."""
    saved = []
    for (i, node), p in zip(seg, _named(seg, flat_params)):
        h = layer_forward(i, node.layer, h, p, ctx, saved, stats_parts)
    return h, bn_partial_stats(h), saved


def last_stage(seg, h, stats_parts, flat_params, t, ctx):
    """The last stage on one chunk: forward, the loss, and back to its BatchNorm.

    Returns ``(loss sum, correct count, g at the BatchNorm's output, its partial sums, saved,
    gradient parts of the stage's later layers)``."""
    saved, params = [], _named(seg, flat_params)
    z = h
    for (i, node), p in zip(seg, params):
        z = layer_forward(i, node.layer, z, p, ctx, saved, stats_parts)
    loss, correct, g = loss_block(z, t, ctx)
    grads = [{} for _ in seg]
    for k in range(len(seg) - 1, 0, -1):
        i, node = seg[k]
        g = layer_backward(i, node.layer, g, params[k], ctx, saved, grads[k])
    bn = seg[0][1].layer
    h_bn, y_bn, stats = saved.pop()
    sums = bn_backward_partial(h_bn, y_bn, g, stats, bn.eps, bn.relu)
    return loss, correct, g, sums, (h_bn, y_bn, stats), grads


def stage_backward(seg_bn, bn_state, g, sums_parts, gamma, seg_prev, saved_prev, flat_prev, ctx):
    """Backward through a BatchNorm (``g`` at its output, every chunk's partial sums) and the
    stage before it, on one chunk.

    Returns ``(g at that stage's BatchNorm output, its partial sums, its saved state,
    gradient parts)``; for the first stage (no BatchNorm) the first three are None."""
    bn = seg_bn[0][1].layer
    h, y, stats = bn_state
    sums = _sum_parts(sums_parts)
    count = ctx.n_total * int(np.prod(h.shape[2:]))
    g = bn_backward(h, y, g, stats, sums, gamma, count, bn.eps, bn.relu, True)
    params, saved = _named(seg_prev, flat_prev), list(saved_prev)
    grads = [{} for _ in seg_prev]
    first = 1 if isinstance(seg_prev[0][1].layer, BatchNorm) else 0
    for k in range(len(seg_prev) - 1, first - 1, -1):
        i, node = seg_prev[k]
        g = layer_backward(i, node.layer, g, params[k], ctx, saved, grads[k])
    if not first:
        return None, None, None, grads
    prev_bn = seg_prev[0][1].layer
    h0, y0, stats0 = saved.pop()
    return g, bn_backward_partial(h0, y0, g, stats0, prev_bn.eps, prev_bn.relu), (h0, y0, stats0), grads


# -- the graph ----------------------------------------------------------------------------------
def fused_training_step(model, optimizer, params, state, velocities, x, t, step, dropout=True):
    """``(params, velocities, state, loss, accuracy)`` as :func:`dask_pconv.step.training_step`
    returns them, as coarse stages (see the module docstring); :func:`fusable` must have said
    yes."""
    graph = _graph_for(model, x)
    return graph(model, optimizer, params, state, velocities, x, t, step, dropout).outputs()


def _graph_for(model, x):
    """The stage graph for ``model`` on ``x``: a chain's (on batch chunks or tiles), or the
    branching programs' (batch chunks)."""
    if _chain_unfit(model.program.nodes, x) is not None:
        return DagStepGraph
    return _StepGraph if x.numblocks[2:] == (1, 1) else _TiledStepGraph


def fused_gradients(model, params, x, t, step, dropout=True):
    """``(loss, grads, accuracy)`` of a training-mode forward-backward pass as coarse stages
    (the step's graph without the update); :func:`fusable` with no optimizer must have said
    yes."""
    graph = _graph_for(model, x)
    grads, loss, accuracy = graph(model, None, params, model.state, {}, x, t, step, dropout).outputs()
    return loss, grads, accuracy


class _StepGraph(StageGraph):
    """The tasks of one fused step of a chain, built stage by stage into ``self.dsk``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.segs = _segments(self.model.program.nodes)

    def flat(self, seg):
        return [self.key("param", node.full_name(k)) for _, node in seg for k in node.layer.params()]

    def stage_input(self, fwd, s, c):
        """The input of stage ``s`` on chunk ``c``: the batch's block or the output of the
        stage before."""
        return (self.x.name, c, 0, 0, 0) if s == 0 else (operator.getitem, fwd[s - 1][c], 0)

    def forward(self):
        """Stage tasks up to the last; returns per stage and chunk the stage's key and the keys
        of its output's partial statistics."""
        fwd, stats = [], []
        for s, seg in enumerate(self.segs[:-1]):
            fwd.append([])
            stats.append([])
            self.chunk_forward(s, seg, fwd, stats)
        return fwd, stats

    def chunk_forward(self, s, seg, fwd, stats):
        """Stage ``s``'s tasks, one per chunk, appended to ``fwd[s]`` and ``stats[s]``."""
        parts = list(stats[s - 1]) if s else []
        for c in range(self.P):
            h = self.stage_input(fwd, s, c)
            k = self.task("fwd", s, c, value=(stage_forward, seg, h, parts, self.flat(seg), self.ctxs[c]))
            fwd[s].append(k)
            stats[s].append(self.shared("stats", (s, c), k, (1,), self.result_bytes(seg, c)))

    def tails(self, fwd, stats):
        """The last stage's tasks, one per chunk (forward, loss, back to its BatchNorm)."""
        last, seg = len(self.segs) - 1, self.segs[-1]
        return [
            self.task(
                "last",
                c,
                value=(
                    last_stage,
                    seg,
                    self.stage_input(fwd, last, c),
                    list(stats[last - 1]),
                    self.flat(seg),
                    self.label_block(c),
                    self.ctxs[c],
                ),
            )
            for c in range(self.P)
        ]

    def outputs(self):
        fwd, stats = self.forward()
        tails = self.tails(fwd, stats)
        grad_parts, sums = self.backward(fwd, tails)[:2]
        bn_sums, bn_stats = {}, {}
        for b, seg in enumerate(self.segs):
            if isinstance(seg[0][1].layer, BatchNorm):
                bn_sums[seg[0][1].name], bn_stats[seg[0][1].name] = sums[b], stats[b - 1]
        loss_parts, correct_parts = [(_pick, k, 0) for k in tails], [(_pick, k, 1) for k in tails]
        return self.results(grad_parts, bn_sums, bn_stats, loss_parts, correct_parts)

    def backward(self, fwd, tails, until=0):
        """Backward stage tasks from the last BatchNorm down to BatchNorm ``until + 1``;
        returns the weight gradients' parts, the BatchNorm gradient sums' parts per stage and
        where the gradient and the saved state at BatchNorm ``until + 1``'s output are."""
        last, seg = len(self.segs) - 1, self.segs[-1]
        grad_parts = {}
        self.pick_grads(grad_parts, seg, tails, 5, skip_first=True)
        sums = {
            last: [
                self.shared("sums", (last, c), tails[c], (3,), self.result_bytes(seg, c))
                for c in range(self.P)
            ]
        }
        g_src = [(_pick, k, 2) for k in tails]
        bn_src = [(_pick, k, 4) for k in tails]
        for b in range(last, until, -1):
            seg_bn, seg_prev = self.segs[b], self.segs[b - 1]
            gamma = self.key("param", seg_bn[0][1].full_name("gamma"))
            outs = [
                self.task(
                    "bwd",
                    b,
                    c,
                    value=(
                        stage_backward,
                        seg_bn,
                        bn_src[c],
                        g_src[c],
                        list(sums[b]),
                        gamma,
                        seg_prev,
                        (operator.getitem, fwd[b - 1][c], 2),
                        self.flat(seg_prev),
                        self.ctxs[c],
                    ),
                )
                for c in range(self.P)
            ]
            self.pick_grads(grad_parts, seg_prev, outs, 3, skip_first=b - 1 > 0)
            if b - 1 > 0:
                sums[b - 1] = [
                    self.shared("sums", (b - 1, c), k, (1,), self.result_bytes(seg_prev, c))
                    for c, k in enumerate(outs)
                ]
                g_src = [(_pick, k, 0) for k in outs]
                bn_src = [(_pick, k, 2) for k in outs]
        return grad_parts, sums, g_src, bn_src

    def pick_grads(self, grad_parts, seg, outs, index, skip_first):
        """``getitem`` tasks for the gradient parts of ``seg``'s convolutions and linears."""
        for k_node, (_, node) in enumerate(seg):
            if isinstance(node.layer, BatchNorm) or (skip_first and k_node == 0):
                continue
            for pn in node.layer.params():
                grad_parts[node.full_name(pn)] = [
                    self.task("grad", node.name, pn, c, value=(_pick, k, index, k_node, pn))
                    for c, k in enumerate(outs)
                ]


class _TiledStepGraph(_StepGraph):
    """The tasks of a fused step on spatial tiles (:mod:`dask_pconv._fused_tiles`): one task
    per tile and chunk in the stages before the one holding ``Flatten``, which gathers each
    chunk's tiles; from there on as :class:`_StepGraph`."""

    def __init__(self, *args):
        super().__init__(*args)
        self.plan = plan_tiles(self.segs, self.x.chunks[2:])
        self.tiles = self.plan.tiles()
        self.tctx = {
            (s, c, ij): self.plan.ctx(s, ctx.offset, ij, ctx)
            for s in range(self.plan.gather)
            for c, ctx in enumerate(self.ctxs)
            for ij in self.tiles
        }
        self.borders = {}  # (stage, chunk, tile) -> the key of the strips the neighbours read

    def unit(self, c, ij):
        """A tile's position in the stages' lists: chunk by chunk, tiles row by row."""
        return (c * self.plan.grid[0] + ij[0]) * self.plan.grid[1] + ij[1]

    def stage_input(self, fwd, s, c):
        if s != self.plan.gather:
            return super().stage_input(fwd, s, c)
        gi, gj = self.plan.grid
        rows = [
            [
                (self.x.name, c, 0, i, j)
                if s == 0
                else (operator.getitem, fwd[s - 1][self.unit(c, (i, j))], 0)
                for j in range(gj)
            ]
            for i in range(gi)
        ]
        return (concat_tiles, rows)

    def forward(self):
        fwd, stats = [], []
        for s, seg in enumerate(self.segs[:-1]):
            fwd.append([])
            stats.append([])
            if s >= self.plan.gather:
                self.chunk_forward(s, seg, fwd, stats)
                continue
            parts = list(stats[s - 1]) if s else []
            for c in range(self.P):
                for ij in self.tiles:
                    u = self.unit(c, ij)
                    blocks = [self.piece(fwd, s, c, ij, v) for v, _, _ in self.plan.forward_pieces(s, ij)]
                    ctx = self.tctx[s, c, ij]
                    k = self.task("fwd", s, u, value=(tile_forward, seg, blocks, parts, self.flat(seg), ctx))
                    fwd[s].append(k)
                    stats[s].append(self.task("stats", s, u, value=(operator.getitem, k, 1)))
                    if s + 1 < self.plan.gather:
                        self.borders[s, c, ij] = self.task("borders", s, u, value=(operator.getitem, k, 3))
        return fwd, stats

    def piece(self, fwd, s, c, ij, v):
        """Tile ``v``'s part of tile ``ij``'s window at stage ``s``: a block of the batch, the
        tile's own block of the stage before, or a neighbour's strip."""
        if s == 0:
            return (self.x.name, c, 0, *v)
        if v == ij:
            return (operator.getitem, fwd[s - 1][self.unit(c, v)], 0)
        return (operator.getitem, self.borders[s - 1, c, v], v_flat(ij, self.plan.grid))

    def backward(self, fwd, tails):
        g = self.plan.gather
        grad_parts, sums, g_src, bn_src = super().backward(fwd, tails, until=g)
        outs, strips = None, {}
        for b in range(g, 0, -1):
            seg_bn, seg_prev = self.segs[b], self.segs[b - 1]
            gamma = self.key("param", seg_bn[0][1].full_name("gamma"))
            new = []
            for c in range(self.P):
                for ij in self.tiles:
                    u = self.unit(c, ij)
                    if b == g:
                        bn_state, blocks = bn_src[c], [g_src[c]]
                    else:
                        bn_state = (_pick, outs[u], 2)
                        blocks = [
                            (_pick, outs[u], 0)
                            if v == ij
                            else (operator.getitem, strips[b, c, v], v_flat(ij, self.plan.grid))
                            for v, _, _ in self.plan.backward_pieces(b, ij)
                        ]
                    value = (
                        tile_backward,
                        seg_bn,
                        bn_state,
                        self.plan.bn_ctx(b, ij, self.n),
                        blocks,
                        list(sums[b]),
                        gamma,
                        seg_prev,
                        (operator.getitem, fwd[b - 1][u], 2),
                        self.flat(seg_prev),
                        self.tctx[b - 1, c, ij],
                    )
                    k = self.task("bwd", b, u, value=value)
                    new.append(k)
                    if b - 1 > 0:
                        strips[b - 1, c, ij] = self.task("strips", b - 1, u, value=(_pick, k, 4))
            outs = new
            self.pick_grads(grad_parts, seg_prev, outs, 3, skip_first=b - 1 > 0)
            if b - 1 > 0:
                sums[b - 1] = [self.task("sums", b - 1, u, value=(_pick, k, 1)) for u, k in enumerate(outs)]
        return grad_parts, sums, None, None


def v_flat(ij, grid):
    """A tile's index in its chunk, row by row (the keys of the strips a tile hands out)."""
    return ij[0] * grid[1] + ij[1]
