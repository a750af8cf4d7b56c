"""The fused training step of a program with branches (residual additions, concatenations):
stages between BatchNorm synchronisations, each one task per batch chunk, as for chains
(:mod:`dask_pconv.fused`), on a batch split into chunks of whole images.

*Stages.*  Every node gets a stage number: a BatchNorm's is one more than its input's (it
needs every chunk's statistics of that input), any other node's is the largest of its inputs'
(the program's input is in stage 0).  The task of stage ``s`` on chunk ``c`` runs the nodes of
stage ``s`` in program order and computes the partial statistics of the values a BatchNorm
reads; it reads the values of earlier stages it needs from those stages' tasks of the same
chunk (the whole result, so it runs where they are), and the statistics of every chunk through
one small ``getitem`` task per stage and chunk.  Parallel branches share their
synchronisations: the two BatchNorms of a residual block's main path and its projection
shortcut, say, take one hop.

*Backward* mirrors it, stage by stage from the last (whose task also runs the loss and the
backward of its own nodes): the task of stage ``s`` sums the gradient contributions of the
values stage ``s`` produced (from the later stages' tasks of the chunk, in stage order, and
from the BatchNorms reading them, finished with every chunk's sums), runs its nodes backward
in reverse program order, and starts the backward of its own BatchNorms: their partial sums,
which one ``getitem`` per stage and chunk hands to the other chunks.  A parameter's
gradient parts come from one ``getitem`` per stage and chunk too; the optimizer's tasks are
those of the chain's (:class:`~dask_pconv._fused_common.StageGraph`).

Results equal the fine-grained step's to rounding, and are bitwise the same for the same split
on any number of workers (every sum over chunks runs in chunk order in one task, every sum of
contributions in a fixed order).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from ._fused_common import StageGraph, pick
from .kernels import bn_backward, bn_backward_partial, bn_partial_stats
from .models.layers import BatchNorm
from .models.program import INPUT
from .stages.block import loss_block, named, node_backward, node_forward, sum_parts, trainable
from .stages.plan import stage_numbers

__all__ = ["DagPlan", "DagStepGraph", "dag_unfit"]


@dataclass(frozen=True)
class StageSpec:
    """What one stage's tasks run: its nodes ``(index, node)`` in program order, the values of
    earlier stages they read, and the values whose partial statistics it computes."""

    nodes: tuple
    reads: tuple  #: names of earlier stages' values the stage's nodes read
    stats_of: tuple  #: names of values (of this stage) a BatchNorm reads
    carried: tuple  #: names of values (of this stage) later stages read


class DagPlan:
    """The stages of a program (see the module docstring) and who reads what across them."""

    def __init__(self, nodes):
        self.nodes = nodes
        self.position = {INPUT: -1, **{n.name: i for i, n in enumerate(nodes)}}
        stage, _ = stage_numbers(tuple(enumerate(nodes)), train=True)  # the planner's rule
        self.stage, self.last = stage, stage[nodes[-1].name]
        readers = {name: [n for n in nodes if name in n.inputs] for name in stage}
        self.readers = readers
        self.specs = []
        for s in range(self.last + 1):
            members = tuple((i, n) for i, n in enumerate(nodes) if stage[n.name] == s)
            names = [INPUT] * (s == 0) + [n.name for _, n in members]
            # stage 0 reads the input block; a later stage reads it straight from the batch
            reads = sorted(
                {i for _, n in members for i in n.inputs if stage[i] < s} | ({INPUT} if s == 0 else set()),
                key=self.order,
            )
            self.specs.append(
                StageSpec(
                    members,
                    tuple(reads),
                    tuple(v for v in names if any(isinstance(r.layer, BatchNorm) for r in readers[v])),
                    tuple(v for v in names if v != INPUT and any(stage[r.name] > s for r in readers[v])),
                )
            )

    def order(self, name):
        return self.position[name]

    def unreached(self):
        """Nodes whose output does not reach the program's output (no gradient flows there)."""
        reach, todo = set(), [self.nodes[-1].name]
        while todo:
            name = todo.pop()
            if name not in reach and name != INPUT:
                reach.add(name)
                todo.extend(next(n for n in self.nodes if n.name == name).inputs)
        return [n.name for n in self.nodes if n.name not in reach]

    def finishes(self, s):
        """The BatchNorms whose input stage ``s`` produced: the backward task of stage ``s``
        finishes their backward (every chunk's sums are known by then)."""
        return tuple(
            n
            for n in self.nodes
            if isinstance(n.layer, BatchNorm) and n.inputs[0] != INPUT and self.stage[n.inputs[0]] == s
        )

    def contributors(self, s):
        """``(value, stage)`` pairs: the later stages whose nodes (not BatchNorms) read a value of
        stage ``s``, in stage order; their backward tasks hand back a gradient contribution."""
        out = []
        for later in range(s + 1, self.last + 1):
            for v in self.specs[later].reads:
                readers = [r for r in self.readers[v] if self.stage[r.name] == later]
                if (
                    v != INPUT
                    and self.stage[v] == s
                    and any(not isinstance(r.layer, BatchNorm) for r in readers)
                ):
                    out.append((v, later))
        return out


def dag_unfit(program):
    """Why the program's step cannot run as the stages of this module, or None."""
    for node in program.nodes:
        why = trainable(node)
        if why is not None:
            return why
    if not any(isinstance(n.layer, BatchNorm) for n in program.nodes):
        return "the program has no BatchNorm"
    unreached = DagPlan(program.nodes).unreached()
    if unreached:
        return f"nodes {unreached} do not lead to the program's output"
    return None


# -- the tasks, one chunk at a time ---------------------------------------------------------------
def _run_forward(spec, earlier, stats_parts, params, ctx):
    """The stage's nodes forward: ``(values by name, saved per node)``.  ``stats_parts`` holds
    per node (None but for BatchNorms) every chunk's partial statistics of its input."""
    values, saved = dict(zip(spec.reads, earlier)), {}
    for (i, node), p, parts in zip(spec.nodes, params, stats_parts):
        saved[node.name] = []
        inputs = [values[v] for v in node.inputs]
        values[node.name] = node_forward(i, node, inputs, p, ctx, saved[node.name], parts)
    return values, saved


def dag_forward(spec, earlier, stats_parts, flat_params, ctx):
    """A stage forward on one chunk: ``(values later stages read, their partial statistics
    where a BatchNorm reads them, saved per node)``.  (A task's arguments are lists: Dask
    computes the keys and tasks inside lists, not inside dicts.)"""
    params = named(spec.nodes, flat_params)
    values, saved = _run_forward(spec, earlier, stats_parts, params, ctx)
    stats = {v: bn_partial_stats(values[v]) for v in spec.stats_of}
    return {v: values[v] for v in spec.carried}, stats, saved


def _add(grads, name, g):
    grads[name] = g if name not in grads else grads[name] + g


def _run_backward(spec, g_out, saved, params, ctx):
    """The stage's nodes backward from the gradients ``g_out`` at their outputs (summed in
    place as the nodes hand them on).  Returns ``(contributions to earlier values, pending
    BatchNorm backward per node, their partial sums, parameter gradient parts)``."""
    own = {n.name for _, n in spec.nodes}
    to_earlier, pending, sums, pgrads = {}, {}, {}, {}
    for (i, node), p in reversed(list(zip(spec.nodes, params))):
        g = g_out.pop(node.name)
        layer = node.layer
        if isinstance(layer, BatchNorm):
            h, y, stats = saved[node.name].pop()
            pending[node.name] = (h, y, stats, g)
            sums[node.name] = bn_backward_partial(h, y, g, stats, layer.eps, layer.relu)
            continue
        grads = {}
        g_in = node_backward(i, node, g, p, ctx, saved[node.name], grads)
        pgrads.update({node.full_name(k): v for k, v in grads.items()})
        for v, gv in zip(node.inputs, g_in):
            if v == INPUT:
                continue
            _add(g_out if v in own else to_earlier, v, gv)
    return to_earlier, pending, sums, pgrads


def _finish_bn(node, pending, sums_parts, gamma, ctx):
    h, y, stats, g = pending
    count = ctx.n_total * (h.size // (h.shape[0] * h.shape[1]))
    layer = node.layer
    return bn_backward(h, y, g, stats, sum_parts(sums_parts), gamma, count, layer.eps, layer.relu, True)


def dag_last(spec, earlier, stats_parts, flat_params, t, ctx):
    """The last stage on one chunk: forward, the loss and its own nodes backward.  Returns the
    backward result of :func:`dag_backward` and ``(loss sum, correct count)``."""
    params = named(spec.nodes, flat_params)
    values, saved = _run_forward(spec, earlier, stats_parts, params, ctx)
    last = spec.nodes[-1][1].name
    loss, correct, g = loss_block(values[last], t, ctx)
    return (*_run_backward(spec, {last: g}, saved, params, ctx), (loss, correct))


def dag_backward(spec, fwd, contributions, finishes, flat_params, ctx):
    """A stage backward on one chunk: the gradient at each value the stage produced (the later
    stages' ``contributions`` ``[(value, g), ...]`` in their order, then the BatchNorms reading
    it, ``finishes`` ``[(node, pending, every chunk's sums, gamma), ...]``), then its nodes
    backward.  Returns ``(contributions to earlier values, pending BatchNorm backward, their
    partial sums, parameter gradient parts)``."""
    g_out = {}
    for v, g in contributions:
        _add(g_out, v, g)
    for node, pending, sums_parts, gamma in finishes:
        _add(g_out, node.inputs[0], _finish_bn(node, pending, sums_parts, gamma, ctx))
    saved = {k: list(v) for k, v in fwd[2].items()}  # popped here: the task's input stays whole
    return _run_backward(spec, g_out, saved, named(spec.nodes, flat_params), ctx)


# -- the graph ----------------------------------------------------------------------------------
class DagStepGraph(StageGraph):
    """The tasks of one fused step of a program with branches, on a batch split."""

    def __init__(self, *args):
        super().__init__(*args)
        self.plan = DagPlan(self.model.program.nodes)
        self.fwd, self.stats, self.bwd, self.sums, self.pgrads = {}, {}, {}, {}, {}

    def params(self, spec):
        return [self.key("param", n.full_name(k)) for _, n in spec.nodes for k in n.layer.params()]

    def value(self, v, c):
        """Chunk ``c``'s value ``v`` of an earlier stage, read inside the task that needs it."""
        if v == INPUT:
            return (self.x.name, c, 0, 0, 0)
        return (pick, self.fwd[self.plan.stage[v], c], 0, v)

    def stats_parts(self, spec):
        """Per node of the stage, for BatchNorms: every chunk's partial statistics of its input."""
        out = []
        for _, n in spec.nodes:
            if not isinstance(n.layer, BatchNorm):
                out.append(None)
                continue
            v = n.inputs[0]
            out.append([(pick, self.stats[self.plan.stage[v], c], v) for c in range(self.P)])
        return out

    def forward(self):
        for s, spec in enumerate(self.plan.specs[:-1]):
            parts = self.stats_parts(spec)
            for c in range(self.P):
                earlier = [self.value(v, c) for v in spec.reads]
                value = (dag_forward, spec, earlier, parts, self.params(spec), self.ctxs[c])
                self.fwd[s, c] = self.task("fwd", s, c, value=value)
                nbytes = self.result_bytes(spec.nodes, c)
                self.stats[s, c] = self.shared("stats", (s, c), self.fwd[s, c], (1,), nbytes)

    def backward(self):
        S, spec = self.plan.last, self.plan.specs[-1]
        parts = self.stats_parts(spec)
        for c in range(self.P):
            earlier = [self.value(v, c) for v in spec.reads]
            value = (dag_last, spec, earlier, parts, self.params(spec), self.label_block(c), self.ctxs[c])
            self.bwd[S, c] = self.task("last", c, value=value)
            self.exchange(S, c)
        for s in range(S - 1, -1, -1):
            spec = self.plan.specs[s]
            contributors = self.plan.contributors(s)
            finishing = self.plan.finishes(s)
            for c in range(self.P):
                contributions = [[v, (pick, self.bwd[later, c], 0, v)] for v, later in contributors]
                finishes = [self.finish(n, c) for n in finishing]
                value = (dag_backward, spec, self.fwd[s, c], contributions, finishes, self.params(spec))
                self.bwd[s, c] = self.task("bwd", s, c, value=(*value, self.ctxs[c]))
                self.exchange(s, c)

    def finish(self, node, c):
        b = self.plan.stage[node.name]
        sums = [(pick, self.sums[b, k], node.name) for k in range(self.P)]
        gamma = self.key("param", node.full_name("gamma"))
        return [node, (pick, self.bwd[b, c], 1, node.name), sums, gamma]

    def exchange(self, s, c):
        """The small picks other chunks and the optimizer read from a backward task."""
        bwd = self.bwd[s, c]
        if any(isinstance(n.layer, BatchNorm) for _, n in self.plan.specs[s].nodes):
            nbytes = self.result_bytes(self.plan.specs[s].nodes, c)
            self.sums[s, c] = self.shared("sums", (s, c), bwd, (2,), nbytes)
        if any(n.layer.params() and not isinstance(n.layer, BatchNorm) for _, n in self.plan.specs[s].nodes):
            self.pgrads[s, c] = self.task("grad", s, c, value=(operator.getitem, bwd, 3))

    def outputs(self):
        self.forward()
        self.backward()
        S, stage = self.plan.last, self.plan.stage
        grad_parts, bn_sums, bn_stats = {}, {}, {}
        for node in self.model.program.nodes:
            s = stage[node.name]
            if isinstance(node.layer, BatchNorm):
                bn_sums[node.name] = [(pick, self.sums[s, c], node.name) for c in range(self.P)]
                v = node.inputs[0]
                bn_stats[node.name] = [(pick, self.stats[stage[v], c], v) for c in range(self.P)]
                continue
            for k in node.layer.params():
                name = node.full_name(k)
                grad_parts[name] = [(pick, self.pgrads[s, c], name) for c in range(self.P)]
        losses = [
            self.task("loss-part", c, value=(operator.getitem, self.bwd[S, c], 4)) for c in range(self.P)
        ]
        return self.results(
            grad_parts, bn_sums, bn_stats, [(pick, k, 0) for k in losses], [(pick, k, 1) for k in losses]
        )
