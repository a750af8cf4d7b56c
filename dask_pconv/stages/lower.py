"""The lowering of a :class:`~dask_pconv.stages.plan.Plan` to Dask tasks, for the forward
modes (``predict``, ``features``, evaluation): one task per block and stage.

- A stage's arrays (its nodes' parameters and running statistics) are one graph key, read by
  every block task of the stage: the parameters travel once per stage, not per block.
- A stage on whole images runs, per batch chunk, on its chunk's block (the first stage) or on
  the previous stage's tiles put together (:func:`_run_gathered`).
- A tiled stage runs, per batch chunk and output tile, on the input window the tile's
  receptive field covers, cut from the input blocks it overlaps inside the task
  (:func:`_run_window`), and crops the tile from the window's output: no task waits for a
  neighbour, and a tile needs its input blocks only.

Every task calls the block interpreter (:func:`~dask_pconv.stages.block.run_forward`).
"""

from __future__ import annotations

import uuid

import dask.array as da
import numpy as np
from dask.array.utils import meta_from_array
from dask.highlevelgraph import HighLevelGraph

from ..backend import array_namespace, asarray_like
from ..models.layers import RunMode
from ..models.program import INPUT
from .block import Ctx, run_forward
from .plan import Layout, nodes_upto, plan

__all__ = ["StageJob", "forward", "node_bytes", "output_shape", "reference_forward"]


class StageJob:
    """What every block task of a stage reads: its nodes and their parameters and running
    statistics (per node, local name -> block), run in evaluation mode."""

    def __init__(self, nodes, params, state, seed):
        self.nodes, self.params, self.state, self.seed = nodes, params, state, seed

    @classmethod
    def of(cls, model, nodes):
        params = [{k: model.params[n.full_name(k)] for k in n.layer.params()} for _, n in nodes]
        state = [{k: model.state[n.full_name(k)] for k in n.layer.state()} for _, n in nodes]
        return cls(tuple(nodes), params, state, model.seed)

    def arrays(self):
        """Every array, flat (the task that builds the job reads them as its arguments)."""
        return [v for group in (self.params, self.state) for d in group for v in d.values()]

    def shell(self):
        """A copy holding no arrays (what a graph carries beside the arrays themselves)."""
        empty = [{k: None for k in d} for d in self.params], [{k: None for k in d} for d in self.state]
        return StageJob(self.nodes, *empty, self.seed)

    def bound(self, values, like):
        """A copy holding ``values`` (:meth:`arrays`' order), in the array library of
        ``like``."""
        it = iter(asarray_like(v, like) for v in values)
        params = [{k: next(it) for k in d} for d in self.params]
        state = [{k: next(it) for k in d} for d in self.state]
        return StageJob(self.nodes, params, state, self.seed)

    def run(self, values):
        """The stage's output on one block: ``values`` holds what its nodes read (name ->
        block)."""
        ctx = Ctx(self.seed, 0, False, 0, 0, train=False)
        return run_forward(self.nodes, dict(values), self.params, self.state, ctx)


def _bind(job, like, *values):
    return job.bound(values, like)


def _shape_job(model, nodes):
    """A job for a shape pass: the model's NumPy arrays as they are, zeros in place of others
    (Dask arrays on the cluster, device arrays)."""
    job = StageJob.of(model, nodes)
    arrays = [v if isinstance(v, np.ndarray) else np.zeros(v.shape, model.dtype) for v in job.arrays()]
    return job.bound(arrays, np.empty(()))


def _empty_pass(model, nodes, image_shape, keep=False):
    """``nodes`` run by the block interpreter on an empty batch of images of ``image_shape``
    (``(C, H, W)``), with the model's NumPy arrays or zeros (:func:`_shape_job`): the values
    the run leaves (every node's output with ``keep``, else the last node's), by name."""
    job = _shape_job(model, nodes)
    values = {INPUT: np.zeros((0, *image_shape), dtype=model.dtype)}
    run_forward(job.nodes, values, job.params, job.state, Ctx(0, 0, False, 0, 0, train=False), keep=keep)
    return values


def node_bytes(model, shape):
    """Bytes of each node's output per image (name -> int) for inputs of ``shape`` (``(N, C,
    H, W)``; ``N`` is ignored): the block interpreter on an empty batch, once per program,
    image shape and dtype."""
    key = (model.program, tuple(shape[1:]), model.dtype)
    if key not in _MEMO:
        values = _empty_pass(model, tuple(enumerate(model.program.nodes)), key[1], keep=True)
        if len(_MEMO) > 64:
            _MEMO.clear()
        _MEMO[key] = {k: int(np.prod(v.shape[1:])) * v.dtype.itemsize for k, v in values.items()}
    return dict(_MEMO[key])


_MEMO = {}


def reference_forward(model, shape, until=None, outputs=None):
    """``(x, y)``: the fine-grained reference in evaluation mode on a placeholder ``x`` of
    ``shape`` (one chunk, nothing computed) and its output ``y`` (node ``until``'s);
    ``outputs`` as in :meth:`~dask_pconv.models.program.Program.run`.  Building it checks every
    layer's shapes with the layer's own messages."""
    x = da.zeros(shape, dtype=model.dtype, chunks=-1)
    mode = RunMode(train=False, dropout=False, seed=model.seed)
    y, _ = model.program.run(x, model.dask_params(), model.state, mode, until=until, outputs=outputs)
    return x, y


def output_shape(model, shape, until=None):
    """The output's shape (node ``until``'s) for an input of ``shape``: the block interpreter
    on an empty batch of that shape, with arrays of zeros for the parameters (nothing but
    the shapes is computed, nothing is read from the cluster).  Where that fails, the
    fine-grained reference is built lazily on the shape (:func:`reference_forward`), so that
    the error is the layer's own (``Linear(80, 6) needs input (N, 80)``, not a kernel's)."""
    nodes = nodes_upto(model.program, until)
    try:
        y = _empty_pass(model, nodes, shape[1:])[nodes[-1][1].name]
    except Exception:
        reference_forward(model, shape, until)
        raise
    return (shape[0], *y.shape[1:])


def _window(blocks, placement, shape):
    """A window put together from ``blocks``, each placed by its ``(source slices, destination
    slices)``."""
    out = array_namespace(blocks[0]).empty(shape, dtype=blocks[0].dtype)
    for block, (src, dst) in zip(blocks, placement):
        out[(slice(None), slice(None), *dst)] = block[(slice(None), slice(None), *src)]
    return out


def _run_window(job, blocks, placement, shape, crop):
    """A tiled stage on one window: its pieces put together, the stage run, the tile cropped."""
    y = job.run({INPUT: _window(blocks, placement, shape)})
    (r0, r1), (c0, c1) = crop
    return y[:, :, r0:r1, c0:c1].copy()


def _run_gathered(job, name, rows):
    """A stage on whole images: the tiles of value ``name`` (rows of blocks) put together."""
    if len(rows) == 1 and len(rows[0]) == 1:
        return job.run({name: rows[0][0]})
    xp = array_namespace(rows[0][0])
    whole = xp.concatenate([xp.concatenate(r, axis=3) for r in rows], axis=2)
    return job.run({name: whole})


def _pieces(window, chunks):
    """Per block overlapping ``window = (a, b)`` on an axis chunked ``chunks``: ``(block index,
    slice in the block, slice in the window)``."""
    out, start = [], 0
    for k, c in enumerate(chunks):
        lo, hi = max(window[0], start), min(window[1], start + c)
        if lo < hi:
            out.append((k, slice(lo - start, hi - start), slice(lo - window[0], hi - window[0])))
        start += c
    return out


class _Graph:
    """The tasks of one forward call, built into ``self.dsk``."""

    def __init__(self, model, x):
        self.model, self.x = model, x
        self.token = uuid.uuid4().hex  # the parameters may be NumPy: not hashed per call
        self.dsk, self.deps = {}, [x]

    def job(self, k, stage):
        """The key of stage ``k``'s job, with the model's arrays on the input's device."""
        job = StageJob.of(self.model, stage.nodes)
        args = []
        for v in job.arrays():
            if isinstance(v, da.Array):
                v = v.rechunk(v.shape) if v.npartitions != 1 else v
                self.deps.append(v)
                v = (v.name,) + (0,) * v.ndim
            args.append(v)
        key = f"stage-job-{k}-{self.token}"
        self.dsk[key] = (_bind, job.shell(), self.x._meta, *args)
        return key

    def first(self, stage, name, index):
        """Stage 0's tasks, named ``(name, *index(c, i, j))`` (tiles) or ``(name,
        *index(c))``: ``{(batch chunk, i, j): key}`` or ``{batch chunk: key}``."""
        job, x = self.job(0, stage), self.x
        if not stage.tiled:  # whole images: the input's tiles (if any) put together
            _, _, gi, gj = x.numblocks
            return {
                c: self._task(
                    (name, *index(c)),
                    (
                        _run_gathered,
                        job,
                        INPUT,
                        [[(x.name, c, 0, i, j) for j in range(gj)] for i in range(gi)],
                    ),
                )
                for c in range(x.numblocks[0])
            }
        t = stage.tiles
        out = {}
        for c, n in enumerate(x.chunks[0]):
            for i, (rw, rc) in enumerate(zip(t.rows.windows, t.rows.crops)):
                for j, (cw, cc) in enumerate(zip(t.cols.windows, t.cols.crops)):
                    blocks, placement = [], []
                    for bi, rs, rd in _pieces(rw, x.chunks[2]):
                        for bj, cs, cd in _pieces(cw, x.chunks[3]):
                            blocks.append((x.name, c, 0, bi, bj))
                            placement.append(((rs, cs), (rd, cd)))
                    shape = (n, x.shape[1], rw[1] - rw[0], cw[1] - cw[0])
                    value = (_run_window, job, blocks, placement, shape, (rc, cc))
                    out[c, i, j] = self._task((name, *index(c, i, j)), value)
        return out

    def gathered(self, stage, tiles, grid, before, name, index):
        """Stage 1's tasks on whole images, ``{batch chunk: key}``."""
        job, out = self.job(1, stage), {}
        for c in range(self.x.numblocks[0]):
            rows = [[tiles[c, i, j] for j in range(grid[1])] for i in range(grid[0])]
            out[c] = self._task((name, *index(c)), (_run_gathered, job, before, rows))
        return out

    def _task(self, key, value):
        self.dsk[key] = value
        return key

    def array(self, name, chunks, shape, dtype):
        meta = meta_from_array(self.x._meta, ndim=len(shape), dtype=dtype)
        graph = HighLevelGraph.from_collections(name, self.dsk, dependencies=self.deps)
        return da.Array(graph, name, chunks, meta=meta)


def forward(model, x, until=None, out_channel=1):
    """The output of ``model`` (node ``until``'s) on ``x`` in evaluation mode, as staged tasks,
    or None when the plan refuses the layout (its ``explain()`` says why).  ``x`` is a Dask
    array of the model's dtype; ``out_channel`` the chunks of the parameters' output
    channels."""
    p = plan(model.program, Layout.of(x, out_channel), "predict", until)
    if p.refused:
        return None
    out_shape = output_shape(model, x.shape, until)
    g = _Graph(model, x)
    name, rest = f"staged-{g.token}", (0,) * (len(out_shape) - 1)
    whole = (x.chunks[0],) + tuple((n,) for n in out_shape[1:])
    first = p.stages[0]
    if not first.tiled:
        g.first(first, name, lambda c: (c, *rest))
        return g.array(name, whole, out_shape, model.dtype)
    t = first.tiles
    if len(p.stages) == 1:
        g.first(first, name, lambda c, i, j: (c, 0, i, j))
        sizes = tuple(tuple(b - a for a, b in axis.outputs) for axis in (t.rows, t.cols))
        return g.array(name, (x.chunks[0], (out_shape[1],)) + sizes, out_shape, model.dtype)
    tiles = g.first(first, f"stage-0-{g.token}", lambda c, i, j: (c, i, j))
    grid = (len(t.rows.outputs), len(t.cols.outputs))
    g.gathered(p.stages[1], tiles, grid, first.output, name, lambda c: (c, *rest))
    return g.array(name, whole, out_shape, model.dtype)
