"""Tiled inference from store to store with independent tiles: one task per output tile reads
the input window the tile's receptive field covers (:func:`dask_pconv.models.tiling.plan_tiles`),
runs the network on it, and writes the tile into its own chunk of the output store.

No task waits for a neighbour, and no tile's data outlives its task, so a worker holds at most
one window's working set per thread, whatever the size of the image (the fine-grained graph
held about a row of tiles times the number of layers).  The price is the arithmetic of the
overlaps: each window reads its tile plus the network's reach on each side.

The model (its program, parameters and state) travels once in the graph, as one key that
every tile task reads: a worker that is lost takes nothing with it that the scheduler cannot
recompute (scattered data could not be), and a tile recomputed writes the same bytes.
"""

from __future__ import annotations

import os

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed
from dask.highlevelgraph import HighLevelGraph
from dask.utils import parse_bytes

from .kernels.conv import COL_BYTES
from .models.model import Model
from .models.program import INPUT
from .models.tiling import plan_tiles
from .stages.lower import StageJob, reference_forward
from .stages.plan import nodes_upto

__all__ = ["TileJob", "tile_working_set"]


class TileJob:
    """What every tile task reads: the model, the node whose output is written (``until``,
    None for the last) and the source's lead axes (a 2-D or 3-D source is read as 4-D).

    A window runs through the block interpreter (:class:`~dask_pconv.stages.lower.StageJob`),
    in evaluation mode: no graph is built per tile (building one cost as much as the
    arithmetic of a 512 x 512 tile, and its deep stacks made distributed's profiler keep about
    70 KiB per tile)."""

    def __init__(self, model, until, lead):
        self.model, self.until, self.lead = model, until, lead
        self._job = StageJob.of(model, nodes_upto(model.program, until))

    def __getstate__(self):
        return {"model": self.model, "until": self.until, "lead": self.lead}

    def __setstate__(self, state):
        self.__init__(state["model"], state["until"], state["lead"])

    def run(self, x):
        """The output of the model on one window (a NumPy block), in evaluation mode."""
        x = np.asarray(x).astype(self.model.dtype, copy=False)
        return self._job.run({INPUT: x})


def _read(src, lead, n, rows, cols):
    """Window ``rows x cols`` of images ``n`` of ``src``, as (N, C, h, w)."""
    index = (slice(*n), slice(None), slice(*rows), slice(*cols))[lead:]
    block = np.asarray(src[index])
    return block.reshape((1,) * lead + block.shape)


def _tile(job, src, dst, n, rows, cols, crop):
    """Read one window, run the network, write the tile into ``dst``; returns 1."""
    y = job.run(_read(src, job.lead, n, rows[1], cols[1]))
    (ch0, ch1), (cw0, cw1) = crop
    dst[slice(*n), :, slice(*rows[0]), slice(*cols[0])] = y[:, :, ch0:ch1, cw0:cw1]
    return 1


def _count(*done):
    return sum(done)


def tile_graph(job, src, dst, plan, n_chunks, job_token, skip=frozenset()):
    """A ``Delayed`` that writes every tile of ``plan`` (and every chunk of images
    ``n_chunks``) not in ``skip`` (``(n_index, row_index, col_index)``) into ``dst``, and
    returns how many it wrote.  ``job_token`` identifies the model and its input."""
    token = tokenize(job_token, str(dst.store), dst.path, plan, n_chunks, sorted(skip))
    name = f"tile-{token}"
    job_key, src_key, dst_key = (f"{k}-{token}" for k in ("tile-model", "tile-src", "tile-dst"))
    dsk = {job_key: job, src_key: src, dst_key: dst}
    keys = []
    starts = np.cumsum((0,) + tuple(n_chunks))
    for q in range(len(n_chunks)):
        n = (int(starts[q]), int(starts[q + 1]))
        for i, (ro, rw, rc) in enumerate(zip(*plan.rows)):
            for j, (co, cw, cc) in enumerate(zip(*plan.cols)):
                if (q, i, j) in skip:
                    continue
                key = (name, q, i, j)
                dsk[key] = (_tile, job_key, src_key, dst_key, n, (ro, rw), (co, cw), (rc, cc))
                keys.append(key)
    final = f"tiles-written-{token}"
    dsk[final] = (_count, *keys)
    return Delayed(final, HighLevelGraph.from_collections(final, dsk, dependencies=()))


def tile_working_set(model, channels, batch, window_hw, src_itemsize, until=None, store_chunks=None):
    """Bytes one tile task holds at its peak: the window read (in the source's dtype, and
    every store chunk it touches, which zarr decodes whole: ``store_chunks`` gives per axis
    ``(chunk length, number of chunks)``), every node output alive at once while the program runs on the
    window (each node's output is freed after its last reader), plus per node a padded copy
    of its inputs and the kernels' scratch (the im2col bands, ``2 * COL_BYTES``).

    Shapes come from running the program lazily on a window-sized placeholder (nothing is
    computed)."""
    outputs = {}
    reference_forward(model, (batch, channels) + tuple(window_hw), until, outputs)
    nbytes = {k: int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for k, v in outputs.items()}
    nodes = [n for n in model.program.nodes if n.name in outputs]
    last = {INPUT: 0}
    for t, node in enumerate(nodes):
        for i in node.inputs:
            last[i] = t
    peak, alive = 0, {INPUT}
    for t, node in enumerate(nodes):
        inputs = sum(nbytes[i] for i in node.inputs)
        held = sum(nbytes[k] for k in alive) + nbytes[node.name]
        peak = max(peak, held + inputs + 2 * COL_BYTES)
        alive.add(node.name)
        alive -= {k for k in alive if last.get(k, len(nodes)) <= t and k != nodes[-1].name}
    read = batch * channels * int(np.prod(window_hw)) * src_itemsize
    if store_chunks is not None:
        # a window of w pixels touches at most (w - 1) // c + 2 chunks of c pixels
        touched = [min(n, (w - 1) // c + 2) for w, (c, n) in zip(window_hw, store_chunks)]
        read += (
            int(np.prod(touched))
            * batch
            * channels
            * int(np.prod([c for c, _ in store_chunks]))
            * src_itemsize
        )
    return read + peak


def plan(model, image_shape, tile, until=None):
    """:func:`~dask_pconv.models.tiling.plan_tiles` for an ``(N, C, H, W)`` image."""
    return plan_tiles(model.program, tuple(image_shape[2:]), tile, until)


def output_of(model, image_shape, until=None):
    """The model's output (node ``until``'s) for an image of ``image_shape``, lazily, on a
    placeholder of one chunk: its shape and dtype, and every layer's checks, for nothing.
    The whole output is checked against the model's input shape (``Model.check_input``)."""
    x = da.zeros(image_shape, dtype=model.dtype, chunks=-1)
    if until is None:
        x = model.check_input(x)
    return Model.features(model, x, until)


def written_tiles(z):
    """``(n, i, j)`` of every chunk of the zarr array ``z`` (chunked ``(n, C, i, j)``, one chunk
    on C) that exists in its store: a zarr store writes a chunk whole (a directory store
    through a temporary file and a rename), so one that exists was written."""
    from zarr.core.sync import sync  # zarr's own bridge from its async store API

    prefix = (z.path + "/") if z.path else ""

    async def keys():
        return {k async for k in z.store.list_prefix(prefix)}

    present = sync(keys())
    grid = [range(len(c)) for c in da.core.normalize_chunks(z.chunks, z.shape)]
    return frozenset(
        (n, i, j)
        for n in grid[0]
        for i in grid[2]
        for j in grid[3]
        if prefix + z.metadata.encode_chunk_key((n, 0, i, j)) in present
    )


#: what a worker's memory grows by beyond the tiles' working sets: the libraries the first
#: tile loads, the allocator's retained pages and distributed's bookkeeping of the tasks
#: (measured: 25-45 MiB on a 2-worker LocalCluster with NumPy kernels, tests/test_store.py)
WORKER_OVERHEAD = 32 * 2**20


def _retained():
    """What glibc's malloc may keep of the memory a worker frees: its trim threshold (distributed
    sets 64 KiB; the clusters :func:`dask_pconv.cluster.connect` starts, 64 MiB)."""
    return int(os.environ.get("MALLOC_TRIM_THRESHOLD_", 0))


def worker_room(client):
    """The fewest bytes any worker of ``client`` has free per thread below the memory
    threshold at which distributed pauses it (or, with pausing off, restarts it), less
    :data:`WORKER_OVERHEAD` and what its allocator may keep of freed memory, or None when no
    worker has a memory limit."""
    fraction = next(
        (f for f in (dask.config.get(f"distributed.worker.memory.{k}") for k in ("pause", "terminate")) if f),
        1.0,
    )
    retained = client.run(_retained, on_error="ignore")
    rooms = [
        (fraction * w["memory_limit"] - w["metrics"]["memory"] - WORKER_OVERHEAD - retained.get(a, 0))
        / w["nthreads"]
        for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
        if w.get("memory_limit")
    ]
    return min(rooms) if rooms else None


def fitting_tile(model, until, image_shape, batch, tile, src_itemsize, room, store_chunks=None):
    """The largest tile, from halving the longer side of ``tile`` (on multiples of the
    network's alignment), whose working set fits ``room``; None if none does."""
    th, tw = tile
    while True:
        p = plan(model, image_shape, (th, tw), until)
        need = tile_working_set(
            model, image_shape[1], batch, p.largest_window(), src_itemsize, until, store_chunks
        )
        if need <= room:
            return (th, tw)
        fh, fw = p.align
        if th >= tw and th > fh:
            th = max(fh, th // 2 // fh * fh)
        elif tw > fw:
            tw = max(fw, tw // 2 // fw * fw)
        elif th > fh:
            th = max(fh, th // 2 // fh * fh)
        else:
            return None


def compute(delayed, model):
    """Run the tile graph on the active scheduler; returns how many tiles it wrote.

    The model is in the graph once, on purpose (recomputable, unlike scattered data): the
    threshold of distributed's large-graph warning is raised by the model's size for this
    call, so the warning still flags anything else that makes the graph large."""
    key = "distributed.admin.large-graph-warning-threshold"
    size = sum(v.nbytes for d in (model.params, model.state) for v in d.values())
    with dask.config.set({key: parse_bytes(dask.config.get(key, "10MB")) + size}):
        (n,) = dask.compute(delayed)
    return n
