"""The lowering of a training step (and of ``forward_backward``) to coarse tasks: per stage of
the step's plan (:mod:`dask_pconv.stages.train_plan`), one task per block (a batch chunk of
whole images, or one tile of it) forward and one backward, running the stage's nodes through
the block interpreter (:mod:`dask_pconv.stages.train_block`).

Between two stages the blocks exchange what the next stage needs: every block's partial
statistics (a BatchNorm), a tile's pieces of its own regions for its neighbours' windows,
backward the BatchNorm sums and each reader's gradient contributions.  What other blocks read
of a stage task's result is picked out by a small task of its own (two hops), or, where the
whole result is small (:func:`~dask_pconv.stages.plan.read_whole`), inside the reading task
(one hop); a block reads its own earlier results whole.  The weight gradients' per-block parts
are summed in block order by the optimizer's task (:class:`~dask_pconv.stages.outputs
.StageGraph`).

Which steps run here (:func:`unstaged` says why one does not): a program whose nodes lead to
its output, with at least one BatchNorm, on a batch split into chunks, spatial tiles or both
(the channels whole in each block, the parameters unsplit), with momentum SGD (or no optimizer:
``forward_backward``).  The config key ``pconv.staged`` (default True) turns the path off; then
the fine-grained graph of the tape runs, with the same result to rounding.

Results: the same mathematics as the fine-grained step, so equal to rounding; bitwise the same
for the same split on any number of workers (every sum over blocks runs in block order in one
task, every sum of contributions in a fixed order).
"""

from __future__ import annotations

import operator

import dask
import numpy as np

from ..models.layers import BatchNorm, Dropout
from ..models.program import INPUT
from ..optim import MomentumSGD
from .block import trainable
from .lower import _pieces
from .outputs import StageGraph, pick
from .train_block import UnitCtx, unit_backward, unit_forward, unit_last
from .train_plan import step_plan

__all__ = ["staged_gradients", "staged_step", "unstaged"]


def unstaged(model, optimizer, params, x):
    """Why the step of ``model`` on ``x`` cannot run as coarse stages, or None if it can
    (``optimizer`` None: the forward-backward pass alone, :func:`staged_gradients`)."""
    if not dask.config.get("pconv.staged", True):
        return "pconv.staged is off"
    if optimizer is not None and not isinstance(optimizer, MomentumSGD):
        return f"the optimizer is a {type(optimizer).__name__}, not MomentumSGD"
    program = getattr(model, "program", None)
    if not getattr(program, "nodes", None):
        return "the model has no program"
    if x.ndim != 4 or x.numblocks[1] != 1:
        return "the batch is split along its channels (only batch chunks and spatial tiles are staged)"
    if any(p.npartitions != 1 for p in params.values()):
        return "the parameters are split"
    for node in program.nodes:
        why = trainable(node)
        if why is not None:
            return why
    if not any(isinstance(n.layer, BatchNorm) for n in program.nodes):
        return "the program has no BatchNorm"
    try:
        plan = _plan_for(model, x)
    except ValueError as e:
        return f"the spatial tiles do not fit the network: {e}"
    unreached = plan.unreached()
    if unreached:
        return f"nodes {unreached} do not lead to the program's output"
    return None


def _plan_for(model, x):
    tiles = x.chunks[2:] if x.numblocks[2:] != (1, 1) else None
    return _memo_plan(model.program, tiles)


_PLANS = {}


def _memo_plan(program, tiles):
    key = (program, tiles)
    if key not in _PLANS:
        if len(_PLANS) > 32:
            _PLANS.clear()
        _PLANS[key] = step_plan(program.nodes, tiles)
    return _PLANS[key]


def staged_step(model, optimizer, params, state, velocities, x, t, step, dropout=True):
    """``(params, velocities, state, loss, accuracy)`` as :func:`dask_pconv.step.training_step`
    returns them, as coarse stages; :func:`unstaged` must have said None."""
    return StepGraph(model, optimizer, params, state, velocities, x, t, step, dropout).outputs()


def staged_gradients(model, params, x, t, step, dropout=True):
    """``(loss, grads, accuracy)`` of a training-mode forward-backward pass as coarse stages
    (the step's graph without the update); :func:`unstaged` with no optimizer must have said
    None."""
    graph = StepGraph(model, None, params, model.state, {}, x, t, step, dropout)
    grads, loss, accuracy = graph.outputs()
    return loss, grads, accuracy


def _slices(region, base):
    return tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(region, base))


def _geometry(g, s, t, n_total):
    """Where block ``t`` (a tile, or None: whole images) of stage ``s`` of step graph ``g``
    works on tiles: :class:`UnitCtx`'s arguments, but for the pieces the graph adds."""
    spec, r = g.plan.specs[s], g.regions
    kw = {}
    held = {v: g.held(s, t, v) for v in (*spec.reads, *spec.names) if v == INPUT or v in r.full[0]}
    kw["shapes"] = {v: tuple(hi - lo for lo, hi in reg) for v, reg in held.items()}
    if t is not None:
        kw["crops"] = {
            v: _slices(g.own(v, t), held[v]) for v in (*spec.carried, *spec.stats_of, *spec.names[-1:])
        }
        kw["where"] = {
            i: (tuple(lo for lo, _ in held[n.name]), r.full_hw(n.name))
            for i, n in spec.nodes
            if isinstance(n.layer, Dropout)
        }
    kw["counts"] = {
        n.name: n_total * int(np.prod(r.full_hw(n.inputs[0])))
        for n in g.plan.finishes(s)
        if n.inputs[0] in r.full[0]
    }
    last = g.plan.nodes[-1].name
    if s == g.plan.last and g.t.ndim == 3 and last in r.full[0]:
        kw["pixels"] = int(np.prod(r.full_hw(last)))
        if t is not None:
            kw["label"] = tuple(slice(lo, hi) for lo, hi in g.own(last, t))
    return kw


def _input_parts(x, ctx, c, held):
    """The keys of batch chunk ``c``'s blocks of ``x`` that the region ``held`` of the input
    overlaps (None: the chunk's one block); their placements go into ``ctx``."""
    if held is None or (x.numblocks[2:] == (1, 1) and held == tuple((0, sum(ch)) for ch in x.chunks[2:])):
        ctx.placements[INPUT] = [(None, None)]
        return [(x.name, c, 0, 0, 0)]
    parts, places = [], []
    for bi, rs, rd in _pieces(held[0], x.chunks[2]):
        for bj, cs, cd in _pieces(held[1], x.chunks[3]):
            parts.append((x.name, c, 0, bi, bj))
            places.append(((rs, cs), (rd, cd)))
    ctx.placements[INPUT] = places
    return parts


class StepGraph(StageGraph):
    """The tasks of one staged step, built stage by stage into ``self.dsk``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.plan = _plan_for(self.model, self.x)
        self.regions = self.plan.regions
        self.fwd, self.stats, self.borders, self.bwd, self.sums, self.strips, self.pgrads = (
            {} for _ in range(7)
        )
        self.uctx, self._params = {}, {}

    # -- where the blocks are ------------------------------------------------------------------
    def tiles(self, s):
        """The blocks of stage ``s`` within a batch chunk: its tiles, or None (whole images)."""
        return self.regions.tiles() if self.plan.specs[s].tiled else [None]

    def units(self, s):
        return [(c, t) for c in range(self.P) for t in self.tiles(s)]

    def held(self, s, t, v):
        """The region of value ``v`` a block of stage ``s`` holds (None: all of it)."""
        if self.regions is None:
            return None
        if t is None:
            return self.regions.own_region(v, None) if v != INPUT else self._image()
        return self.regions.read_region(s, t, v)

    def own(self, v, t):
        if self.regions is None:
            return None
        return self.regions.own_region(v, t)

    def _image(self):
        return tuple((0, sum(c)) for c in self.x.chunks[2:])

    def ukey(self, s, c, t):
        return (s, c) if t is None else (s, c, *t)

    def params(self, spec):
        keys = self._params.get(id(spec))
        if keys is None:
            keys = self._params[id(spec)] = [
                self.key("param", n.full_name(k)) for _, n in spec.nodes for k in n.layer.params()
            ]
        return keys

    def ctx(self, s, c, t):
        """The :class:`UnitCtx` of block ``(c, t)`` of stage ``s``."""
        ctx = self.uctx.get((s, c, t))
        if ctx is None:
            base = self.ctxs[c]
            kw = {} if self.regions is None else self.geometry(s, t, base.n_total)
            ctx = self.uctx[s, c, t] = UnitCtx(base, base.offset, **kw)
        return ctx

    def geometry(self, s, t, n_total):
        """:func:`_geometry`, once per layout (the plan's regions keep it)."""
        key = ("geometry", s, t, n_total, self.t.ndim)
        memo = self.regions._memo
        if key not in memo:
            memo[key] = _geometry(self, s, t, n_total)
        return memo[key]

    def border(self, s, c, u):
        """What the other blocks read of block ``(c, u)``'s stage ``s`` forward task: its
        pieces for them (element 3)."""
        if (s, c, u) not in self.borders:
            nbytes = self.result_bytes_of(self.plan.specs[s], c, u)
            self.borders[s, c, u] = self.shared(
                "borders", self.ukey(s, c, u), self.fwd[s, c, u], (3,), nbytes
            )
        return self.borders[s, c, u]

    def strip(self, s, c, u):
        """What the other blocks read of block ``(c, u)``'s stage ``s`` backward task: its
        pieces of the gradient contributions for them (element 4)."""
        if (s, c, u) not in self.strips:
            nbytes = self.result_bytes_of(self.plan.specs[s], c, u)
            self.strips[s, c, u] = self.shared("strips", self.ukey(s, c, u), self.bwd[s, c, u], (4,), nbytes)
        return self.strips[s, c, u]

    # -- forward -------------------------------------------------------------------------------
    def reads(self, s, c, t):
        """Per value stage ``s``'s block ``(c, t)`` reads: the keys (or inline picks) of its
        parts; their placements go into the block's context."""
        spec, ctx, out = self.plan.specs[s], self.ctx(s, c, t), []
        for v in spec.reads:
            if v == INPUT:
                out.append(_input_parts(self.x, ctx, c, self.held(s, t, v)))
                continue
            sv = self.plan.stage[v]
            if not self.plan.specs[sv].tiled:  # whole images: the block's own value
                ctx.placements[v] = [(None, None)]
                out.append([(pick, self.fwd[sv, c, None], 0, v)])
                continue
            held, parts, places = self.held(s, t, v), [], []
            for u in self.tiles(sv):
                piece = self.regions.overlap(self.own(v, u), held)
                if piece is None:
                    continue
                src, dst = piece
                if u == t:
                    parts.append((pick, self.fwd[sv, c, u], 0, v))
                    places.append((src, dst))
                else:
                    parts.append((pick, self.border(sv, c, u), f"{s}/{t}", v))
                    places.append(((slice(None), slice(None)), dst))
                    self.ctx(sv, c, u).exports.setdefault(f"{s}/{t}", []).append((v, src))
            ctx.placements[v] = places
            out.append(parts)
        return out

    def stats_parts(self, spec):
        """Per node of the stage, for BatchNorms: every block's partial statistics of its input."""
        out = []
        for _, n in spec.nodes:
            if not isinstance(n.layer, BatchNorm):
                out.append(None)
                continue
            v = n.inputs[0]
            sv = self.plan.stage[v]
            out.append([(pick, self.stats[sv, c, u], v) for c, u in self.units(sv)])
        return out

    def result_bytes_of(self, spec, c, t):
        nbytes = self.result_bytes(spec.nodes, c)
        return nbytes if t is None else nbytes // len(self.regions.tiles())

    def forward(self):
        """Every stage's forward tasks but the last's; the exports (pieces for the neighbours)
        are filled in as later stages' reads ask for them, so the picks come after."""
        for s, spec in enumerate(self.plan.specs[:-1]):
            parts = self.stats_parts(spec)
            for c, t in self.units(s):
                reads = self.reads(s, c, t)
                value = (unit_forward, spec, reads, parts, self.params(spec), self.ctx(s, c, t))
                k = self.fwd[s, c, t] = self.task("fwd", *self.ukey(s, c, t), value=value)
                nbytes = self.result_bytes_of(spec, c, t)
                self.stats[s, c, t] = self.shared("stats", self.ukey(s, c, t), k, (1,), nbytes)

    # -- backward ------------------------------------------------------------------------------
    def backward(self):
        S, spec = self.plan.last, self.plan.specs[-1]
        parts = self.stats_parts(spec)
        for c, t in self.units(S):
            reads = self.reads(S, c, t)
            label = self.label_block(c)
            value = (unit_last, spec, reads, parts, self.params(spec), label, self.ctx(S, c, t))
            self.bwd[S, c, t] = self.task("last", *self.ukey(S, c, t), value=value)
            self.exchange(S, c, t)
        for s in range(S - 1, -1, -1):
            spec = self.plan.specs[s]
            contributors = self.plan.contributors(s)
            finishing = self.plan.finishes(s)
            for c, t in self.units(s):
                ctx = self.ctx(s, c, t)
                contributions = [
                    [v, f"{later}/{v}", self.back_parts(ctx, s, c, t, v, later, v)]
                    for v, later in contributors
                ]
                finishes = [self.finish(ctx, s, c, t, n) for n in finishing]
                value = (
                    unit_backward,
                    spec,
                    self.fwd[s, c, t],
                    contributions,
                    finishes,
                    self.params(spec),
                    ctx,
                )
                self.bwd[s, c, t] = self.task("bwd", *self.ukey(s, c, t), value=value)
                self.exchange(s, c, t)

    def back_parts(self, ctx, s, c, t, v, later, entry):
        """The keys of the pieces of the gradient at value ``v`` (for a BatchNorm ``entry``
        ``"bn:<name>"``: at its output) that the blocks of stage ``later`` hand back to block
        ``(c, t)`` of stage ``s``, in block order; their placements go into ``ctx``."""
        element = 0 if entry == v else 1
        name = v if entry == v else entry[3:]
        parts, places = [], []
        for u in self.tiles(later):
            if self.regions is None or (u is None and t is None):
                parts, places = [(pick, self.bwd[later, c, u], element, name)], [(None, None)]
                break
            piece = self.regions.overlap(self.held(later, u, v if u is None else name), self.own(v, t))
            if piece is None:
                continue
            src, dst = piece
            if u == t:
                parts.append((pick, self.bwd[later, c, u], element, name))
                places.append((src, dst))
            else:
                parts.append((pick, self.strip(later, c, u), f"{t}", entry))
                places.append(((slice(None), slice(None)), dst))
                self.ctx(later, c, u).strips.setdefault(f"{t}", []).append((entry, src))
        ctx.placements[f"{later}/{entry}"] = places
        return parts

    def finish(self, ctx, s, c, t, node):
        b = self.plan.stage[node.name]
        v = node.inputs[0]
        pieces = self.back_parts(ctx, s, c, t, v, b, f"bn:{node.name}")
        stats = [(pick, self.stats[s, c2, u], v) for c2, u in self.units(s)]
        sums = [(pick, self.sums[b, c2, u], node.name) for c2, u in self.units(b)]
        gamma = self.key("param", node.full_name("gamma"))
        beta = self.key("param", node.full_name("beta"))
        return [node, f"{b}/bn:{node.name}", pieces, stats, sums, gamma, beta]

    def exchange(self, s, c, t):
        """The picks other blocks and the optimizer read from a backward task."""
        spec, bwd = self.plan.specs[s], self.bwd[s, c, t]
        index, nbytes = self.ukey(s, c, t), self.result_bytes_of(spec, c, t)
        if any(isinstance(n.layer, BatchNorm) for _, n in spec.nodes):
            self.sums[s, c, t] = self.shared("sums", index, bwd, (2,), nbytes)
        if any(n.layer.params() and not isinstance(n.layer, BatchNorm) for _, n in spec.nodes):
            self.pgrads[s, c, t] = self.task("grad", *index, value=(operator.getitem, bwd, 3))

    def outputs(self):
        self.forward()
        self.backward()
        S, stage = self.plan.last, self.plan.stage
        grad_parts, bn_sums, bn_stats = {}, {}, {}
        for node in self.model.program.nodes:
            s = stage[node.name]
            if isinstance(node.layer, BatchNorm):
                bn_sums[node.name] = [(pick, self.sums[s, c, t], node.name) for c, t in self.units(s)]
                v = node.inputs[0]
                bn_stats[node.name] = [(pick, self.stats[stage[v], c, t], v) for c, t in self.units(stage[v])]
                continue
            for k in node.layer.params():
                name = node.full_name(k)
                grad_parts[name] = [(pick, self.pgrads[s, c, t], name) for c, t in self.units(s)]
        losses = [
            self.task("loss-part", *self.ukey(S, c, t), value=(operator.getitem, self.bwd[S, c, t], 5))
            for c, t in self.units(S)
        ]
        return self.results(
            grad_parts, bn_sums, bn_stats, [(pick, k, 0) for k in losses], [(pick, k, 1) for k in losses]
        )
