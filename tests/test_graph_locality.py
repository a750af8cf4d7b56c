"""No hidden materialisation: each output tile depends only on the input blocks its window reaches."""

import dask.array as da
import numpy as np
import pytest
from dask.core import get_dependencies

import dask_pconv as dp
from dask_pconv import geometry as geo
from dask_pconv.ops.pool import max_pool2d_vjp


def _input_deps(dsk, key, x_name):
    """Input blocks of ``x_name`` reached from ``key`` through the graph."""
    seen, stack, found = set(), [key], set()
    while stack:
        k = stack.pop()
        if k in seen:
            continue
        seen.add(k)
        if isinstance(k, tuple) and k[0] == x_name:
            found.add(k[1:])
            continue
        stack.extend(get_dependencies(dsk, k))
    return found


def _blocks_reached(bounds, start, stop):
    """Indices of chunks [bounds[i], bounds[i+1]) meeting [start, stop) clipped to the image."""
    lo, hi = max(start, 0), min(stop, bounds[-1])
    return {i for i in range(len(bounds) - 1) if bounds[i] < hi and bounds[i + 1] > lo}


@pytest.mark.parametrize(
    "kw",
    [
        dict(padding=1),
        dict(padding=2, dilation=2),
        dict(stride=2, padding=1),
        dict(padding=0, dilation=3),  # halo 6 > chunk size 4: reaches two neighbours
    ],
)
@pytest.mark.parametrize("op", ["conv2d", "conv2d_gx", "max_pool2d"])
def test_each_tile_depends_only_on_its_window(kw, op):
    x = da.random.random((2, 4, 16, 16), chunks=(1, 2, 4, 4))
    w = np.ones((3, 4, 3, 3))
    if op == "max_pool2d":
        kw = dict(stride=kw.get("stride", 1), padding=1)
        y = dp.max_pool2d(x, 3, **kw)
        target, k, d, p, s = y, 3, 1, 1, kw["stride"]
    else:
        y = dp.conv2d(x, w, **kw)
        k, d, p, s = 3, kw.get("dilation", 1), kw.get("padding", 0), kw.get("stride", 1)
        target = y
        if op == "conv2d_gx":
            g_y = da.ones(y.shape, chunks=y.chunks)
            target = dp.conv2d_vjp(x, w, g_y, **kw)[0]
    dsk = dict(target.__dask_graph__())
    n_all = np.prod(x.numblocks)
    bh = np.cumsum((0,) + x.chunks[2])
    bw = np.cumsum((0,) + x.chunks[3])
    if op == "conv2d_gx":
        # a gx tile gets its gradient from every output tile whose window read it
        oh = np.cumsum((0,) + y.chunks[2])
        ow = np.cumsum((0,) + y.chunks[3])
        for i in range(x.numblocks[2]):
            for j in range(x.numblocks[3]):
                deps = _input_deps(dsk, (target.name, 1, 0, i, j), g_y.name)
                tiles_h = {
                    t
                    for t in range(len(oh) - 1)
                    if i in _blocks_reached(bh, oh[t] * s - p, (oh[t + 1] - 1) * s - p + d * (k - 1) + 1)
                }
                tiles_w = {
                    t
                    for t in range(len(ow) - 1)
                    if j in _blocks_reached(bw, ow[t] * s - p, (ow[t + 1] - 1) * s - p + d * (k - 1) + 1)
                }
                expected = {(1, o, th, tw) for o in range(y.numblocks[1]) for th in tiles_h for tw in tiles_w}
                assert deps == expected
                assert len(deps) < np.prod(y.numblocks)
        return
    oh = np.cumsum((0,) + y.chunks[2])
    ow = np.cumsum((0,) + y.chunks[3])
    for i in range(len(oh) - 1):
        for j in range(len(ow) - 1):
            key = (y.name, 1, 0, i, j)
            deps = _input_deps(dsk, key, x.name)
            rows = _blocks_reached(bh, oh[i] * s - p, (oh[i + 1] - 1) * s - p + d * (k - 1) + 1)
            cols = _blocks_reached(bw, ow[j] * s - p, (ow[j + 1] - 1) * s - p + d * (k - 1) + 1)
            chans = range(x.numblocks[1]) if op == "conv2d" else [0]
            expected = {(1, c, r, q) for c in chans for r in rows for q in cols}
            assert deps == expected
            assert len(deps) < n_all


@pytest.mark.parametrize("op", ["conv2d", "max_pool2d"])
def test_only_window_gradients_that_reach_neighbours_get_a_task(op):
    """A window that reaches one input tile has its gradient computed inside the one tile task
    that reads it; a window that reaches neighbours gets a task of its own (``-gxwin``), read
    by each tile it overlaps.  Both VJPs follow the same rule."""
    x = da.random.random((1, 1, 12, 9), chunks=(1, 1, (5, 7), 9))
    if op == "conv2d":
        w = np.ones((1, 1, 2, 2))
        y = dp.conv2d(x, w, stride=2)
        g_x = dp.conv2d_vjp(x, w, da.ones_like(y), stride=2)[0]
    else:
        y = dp.max_pool2d(x, 2)
        g_x = max_pool2d_vjp(x, da.ones_like(y), 2)
    plan_h, plan_w = (geo.plan_axis(x.chunks[a], 2, 2, (0, 0), 1) for a in (2, 3))
    reach = {
        (0, 0, i, j): len(src_h[2]) * len(src_w[2])
        for i, src_h in enumerate(plan_h.sources)
        for j, src_w in enumerate(plan_w.sources)
    }
    dsk = dict(g_x.__dask_graph__())
    own = {k[1:] for k in dsk if isinstance(k, tuple) and f"{op}-gxwin-" in k[0]}
    assert own == {idx for idx, r in reach.items() if r > 1}
    assert 0 < len(own) < len(reach)
    # every output's gradient arrives once: at the 2x2 taps of its window, or at its maximum
    assert g_x.compute().sum() == (4 if op == "conv2d" else 1) * np.prod(y.shape)
