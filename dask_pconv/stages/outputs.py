"""The training step's outputs: the optimizer's and the running statistics' tasks that follow
the stages (:mod:`dask_pconv.stages.step`), and how the tasks of a step become its output Dask
arrays.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.base import tokenize
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

from ..backend import array_namespace, to_dask_array
from ..kernels import bn_running, combine_stats
from ..optim import apply_velocity, velocity
from .block import Ctx
from .block import sum_parts as _sum_parts
from .lower import node_bytes
from .plan import read_whole, read_whole_below

__all__ = ["StageGraph", "first_key", "mean_of", "pick", "running", "sgd_velocity"]


def sgd_velocity(v, p, parts, momentum, lr, weight_decay, row=None):
    """Momentum SGD's new velocity (:func:`dask_pconv.optim.velocity`) from the gradient's
    per-chunk parts, summed in chunk order (``row`` of the sum: a BatchNorm's gradient sums
    hold beta's in row 0, gamma's in row 1)."""
    g = _sum_parts(parts)
    return velocity(v, g if row is None else g[row], p, momentum, lr, weight_decay)


def gradient(parts, row, dtype):
    """A gradient from its per-chunk parts, summed in chunk order (``row``: as for
    :func:`sgd_velocity`), in the parameter's ``dtype`` (a BatchNorm's sums are float64)."""
    g = _sum_parts(parts)
    return (g if row is None else g[row]).astype(dtype)


def running(parts, old_mean, old_var, decay, which):
    """A running mean or variance (:func:`~dask_pconv.kernels.bn_running`) from every chunk's
    partial statistics, merged in chunk order."""
    return bn_running(combine_stats(list(parts)), old_mean, old_var, decay, which)


def pick(x, *path):
    """``x[path[0]][path[1]]...``: an element of a stage's result, inside the task reading it."""
    for i in path:
        x = x[i]
    return x


def mean_of(parts, n, dtype):
    xp = array_namespace(parts[0])
    return xp.asarray(_sum_parts(parts)[0] / n, dtype=dtype)


def first_key(a):
    return next(iter(flatten(a.__dask_keys__())))


class StageGraph:
    """The tasks of one staged step, built into ``self.dsk``, and its output arrays.

    Subclasses add the stage tasks; :meth:`updates` adds momentum SGD per parameter and the
    running statistics per BatchNorm from where the stages left each gradient's parts."""

    def __init__(self, model, optimizer, params, state, velocities, x, t, step, dropout):
        self.model, self.opt = model, optimizer
        self.P, self.n = x.numblocks[0], x.shape[0]
        labels = (x.chunks[0],) + tuple((n,) for n in t.shape[1:])  # per pixel: whole images
        self.x, self.t = x, t if t.chunks == labels else t.rechunk(labels)
        self.inputs = {}
        for group, arrays in (("param", params), ("state", state), ("velocity", velocities)):
            for k, v in arrays.items():
                if not isinstance(v, da.Array):
                    v = to_dask_array(v, v.shape)
                self.inputs[group, k] = v if v.npartitions == 1 else v.rechunk(v.shape)
        opt = None if optimizer is None else vars(optimizer)
        self.tok = tokenize(model.program, self.inputs, x, self.t, step, dropout, model.seed, opt)
        self._keys, self._metas, self.below = {}, {}, read_whole_below()
        offsets = np.cumsum((0,) + x.chunks[0][:-1])
        self.ctxs = [Ctx(model.seed, step, dropout, self.n, int(o)) for o in offsets]
        self.dsk, self.outs = {}, {}
        self.node_bytes = node_bytes(model, x.shape)

    def result_bytes(self, nodes, c):
        """About what a stage task of ``nodes`` (``(index, node)`` pairs) returns for chunk
        ``c``: three arrays the size of each node's output (its output, and what its backward
        reads: an input, a mask), for the chunk's images."""
        return 3 * self.x.chunks[0][c] * sum(self.node_bytes[n.name] for _, n in nodes)

    def shared(self, kind, index, key, path, nbytes):
        """What other chunks read of stage result ``key``: element ``path`` of it picked out by
        a task of its own (two hops), or, where the result is small
        (:func:`~dask_pconv.stages.plan.read_whole` of ``nbytes``), picked inside each
        reading task from the whole result (one hop)."""
        value = (pick, key, *path)
        return value if read_whole(nbytes, self.below) else self.task(kind, *index, value=value)

    def key(self, group, name):
        """The key of input array ``name`` of ``group`` (one chunk)."""
        k = self._keys.get((group, name))
        if k is None:
            k = self._keys[group, name] = first_key(self.inputs[group, name])
        return k

    def label_block(self, c):
        """The key of chunk ``c``'s labels."""
        return (self.t.name, c) + (0, 0) * (self.t.ndim == 3)

    def task(self, kind, *index, value):
        k = (f"step-{kind}-{self.tok}", *index)
        self.dsk[k] = value
        return k

    def updates(self, grad_parts, bn_sums, bn_stats):
        """Momentum SGD per parameter (the velocity task sums the parts) and the running
        statistics per BatchNorm.

        ``grad_parts``: parameter (full) name -> per-chunk gradient parts (keys or inline tasks);
        ``bn_sums``: BatchNorm node name -> per-chunk gradient sums (beta's row 0, gamma's row 1);
        ``bn_stats``: BatchNorm node name -> per-chunk partial statistics of its input."""
        o = self.opt
        new_p, new_v, new_s = {}, {}, {}
        nodes = {n.name: n for n in self.model.program.nodes}
        for name, parts, row in self.grad_sources(grad_parts, bn_sums):
            p, v = self.key("param", name), self.key("velocity", name)
            like = self.inputs["param", name]
            value = (sgd_velocity, v, p, parts, o.momentum, o.lr, o.weight_decay, row)
            new_v[name] = self.output("velocity", name, like.shape, like.dtype, value)
            # a task of its own: computing the velocity again here costs more than the hop
            value = (apply_velocity, p, new_v[name])
            new_p[name] = self.output("param", name, like.shape, like.dtype, value, after=[new_v[name]])
        for node_name, parts in bn_stats.items():
            node = nodes[node_name]
            old = tuple(self.key("state", node.full_name(k)) for k in ("avg_mean", "avg_var"))
            for which, local in (("mean", "avg_mean"), ("var", "avg_var")):
                name = node.full_name(local)
                like = self.inputs["state", name]
                value = (running, list(parts), *old, node.layer.decay, which)
                new_s[name] = self.output("running", name, like.shape, like.dtype, value)
        return new_p, new_v, new_s

    def grad_sources(self, grad_parts, bn_sums):
        """``(parameter name, per-chunk parts, row)`` for every parameter in program order: a
        BatchNorm's from its gradient sums (beta's row 0, gamma's row 1), the others' parts."""
        for node in self.model.program.nodes:
            for local in node.layer.params():
                name = node.full_name(local)
                if node.name in bn_sums:
                    yield name, list(bn_sums[node.name]), {"beta": 0, "gamma": 1}[local]
                else:
                    yield name, grad_parts[name], None

    def gradients(self, grad_parts, bn_sums):
        """Per parameter, the task summing its gradient's parts (in chunk order)."""
        grads = {}
        for name, parts, row in self.grad_sources(grad_parts, bn_sums):
            like = self.inputs["param", name]
            value = (gradient, parts, row, like.dtype)
            grads[name] = self.output("grad", name, like.shape, like.dtype, value)
        return grads

    def results(self, grad_parts, bn_sums, bn_stats, loss_parts, correct_parts):
        """``(params, velocities, state, loss, accuracy)``: the update tasks and the arrays; with
        no optimizer, ``(grads, state, loss, accuracy)``."""
        loss = self.output("loss", "", (), self.x.dtype, (mean_of, loss_parts, self.t.size, self.x.dtype))
        acc = self.output("accuracy", "", (), np.float64, (mean_of, correct_parts, self.t.size, np.float64))
        if self.opt is None:
            grads = self.gradients(grad_parts, bn_sums)
            arrays = self.arrays([*grads.values(), loss, acc])
            return dict(zip(grads, arrays)), arrays[-2], arrays[-1]
        new_p, new_v, new_s = self.updates(grad_parts, bn_sums, bn_stats)
        names = [(g, k) for g, d in (("p", new_p), ("v", new_v), ("s", new_s)) for k in d]
        arrays = self.arrays([{"p": new_p, "v": new_v, "s": new_s}[g][k] for g, k in names] + [loss, acc])
        out = {"p": {}, "v": {}, "s": {}}
        for (g, k), a in zip(names, arrays):
            out[g][k] = a
        return out["p"], out["v"], out["s"], arrays[-2], arrays[-1]

    def output(self, kind, name, like_shape, dtype, value, after=()):
        """An output array's one task, in a layer of its own (the array's name; ``after``: the
        keys of other outputs it reads); returns its key."""
        out = f"step-{kind}-{name}-{self.tok}"
        key = (out,) + (0,) * len(like_shape)
        meta = self._metas.get((len(like_shape), dtype))
        if meta is None:
            meta = self._metas[len(like_shape), dtype] = meta_from_array(
                self.x._meta, ndim=len(like_shape), dtype=dtype
            )
        self.outs[out] = ({key: value}, tuple((n,) for n in like_shape), meta, {k[0] for k in after})
        return key

    def arrays(self, keys):
        """The Dask arrays of output keys, over one graph: the stage tasks in one layer, each
        output in its own, every layer depending on the stage layer and the inputs."""
        main = f"step-stages-{self.tok}"
        deps = [self.x, self.t, *self.inputs.values()]
        graph = HighLevelGraph.from_collections(main, self.dsk, dependencies=deps)
        layers, dependencies = dict(graph.layers), dict(graph.dependencies)
        for out, (d, _, _, after) in self.outs.items():
            layers[out] = MaterializedLayer(d)
            dependencies[out] = {main} | set(graph.dependencies[main]) | after
        hlg = HighLevelGraph(layers, dependencies)
        return [da.Array(hlg, k[0], self.outs[k[0]][1], meta=self.outs[k[0]][2]) for k in keys]
