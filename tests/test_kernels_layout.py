"""Every kernel's result is a function of its inputs' values alone, bitwise: not of their
memory layout or alignment.

Where a block was computed decides its layout: the worker that made it may hand a kernel a
strided view (a crop, a channel slice), while a copy that crossed to another worker arrives in
a new C-contiguous buffer (distributed's serialisation).  NumPy's reductions (and some BLAS
kernels) round differently by layout, so without :func:`~dask_pconv.kernels.layout_invariant`
a training step's bits depended on which worker ran which task.
"""

import inspect

import numpy as np
import pytest

from dask_pconv import kernels
from dask_pconv.kernels import Padded, canonical, cropped


def _at(a, offset):
    """The values of ``a`` in a new C-ordered buffer starting ``offset`` bytes past a 64-byte
    boundary (an offset that is not a multiple of the item size gives an unaligned array)."""
    buf = np.empty(a.nbytes + 128, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset
    out = buf[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def _strided(a):
    """A non-contiguous view holding ``a``'s values: a crop out of a larger block."""
    big = np.zeros(tuple(n + 3 for n in a.shape), a.dtype)
    view = big[tuple(slice(1, 1 + n) for n in a.shape)]
    view[...] = a
    return view


def _permuted(a):
    """``a``'s values stored with the axes in reverse order of strides (as a transposed block)."""
    return np.ascontiguousarray(a.transpose(tuple(range(a.ndim))[::-1])).transpose(tuple(range(a.ndim))[::-1])


LAYOUTS = {
    "strided view": _strided,
    "F-ordered": np.asfortranarray,
    "permuted": _permuted,
    "unaligned": lambda a: _at(a, 1) if a.dtype.itemsize > 1 else _at(a, 0),
    "offset 4": lambda a: _at(a, 4),
}


def _cases():
    rng = np.random.default_rng(0)
    # values with a wide range of magnitudes, so that any change in summation order shows
    x = (rng.standard_normal((8, 6, 20, 18)) * np.exp(rng.uniform(-8, 8, (8, 6, 20, 18)))).astype(np.float32)
    w = rng.standard_normal((5, 6, 3, 3)).astype(np.float32)
    gy = rng.standard_normal((8, 5, 18, 16)).astype(np.float32)
    stats = kernels.bn_partial_stats(x)
    g6 = (rng.standard_normal(x.shape) * 100).astype(np.float32)
    y = kernels.bn_forward(x, stats, np.ones(6, np.float32), np.zeros(6, np.float32), 2e-5, True)
    sums = kernels.bn_backward_partial(x, y, g6, stats, 2e-5, True)
    gamma = rng.standard_normal(6).astype(np.float32)
    beta = rng.standard_normal(6).astype(np.float32)
    h = (rng.standard_normal((300, 700)) * np.exp(rng.uniform(-6, 6, (300, 700)))).astype(np.float32)
    W = rng.standard_normal((64, 700)).astype(np.float32)
    g2 = rng.standard_normal((300, 64)).astype(np.float32)
    one = dict(stride=(1, 1), dilation=(1, 1), groups=1)
    loc = ((0, 8), (0, 6), (0, 20), (0, 18))
    return {
        "conv2d_forward": (kernels.conv2d_forward, (x, w), one),
        "conv2d_grad_x": (kernels.conv2d_grad_x, (gy, w), dict(one, crop=((1, 19), (2, 17)))),
        "conv2d_grad_w": (kernels.conv2d_grad_w, (x, gy, (3, 3)), one),
        "conv2d_grad_b": (kernels.conv2d_grad_b, (gy,), {}),
        "bn_partial_stats": (kernels.bn_partial_stats, (x,), {}),
        "combine_stats": (kernels.combine_stats, ([stats, stats * 2, stats + 1],), {}),
        "bn_running": (kernels.bn_running, (stats, gamma, np.abs(beta), 0.9, "var"), {}),
        "bn_forward": (kernels.bn_forward, (x, stats, gamma, beta, 2e-5, True), {}),
        "bn_backward_partial": (kernels.bn_backward_partial, (x, y, g6, stats, 2e-5, True), {}),
        "bn_backward": (
            kernels.bn_backward,
            (x, y, g6, stats, sums, gamma, 8 * 20 * 18, 2e-5, True, True),
            {},
        ),
        "dropout_block": (kernels.dropout_block, (x, 0.4, 12345, x.shape, loc), {}),
        "dropout_keep": (kernels.dropout_keep, (x, 0.4, 12345, x.shape, loc), {}),
        "dropout_scale": (kernels.dropout_scale, (x, x > 0.1, 0.4), {}),
        "max_pool2d_forward": (kernels.max_pool2d_forward, (x, (2, 2), (2, 2), (1, 2)), {}),
        "max_pool2d_argmax": (kernels.max_pool2d_argmax, (x, (2, 2), (2, 2), (1, 1), (0, 0), 18), {}),
        "max_pool2d_backward": (kernels.max_pool2d_backward, (x, g6[:, :, :10, :9], (2, 2), (2, 2)), {}),
        "max_pool2d_forward_taps": (kernels.max_pool2d_forward_taps, (x, (2, 2), (2, 2)), {}),
        "max_pool2d_scatter": (
            kernels.max_pool2d_scatter,
            (g6[:, :, :10, :9], (x[:, :, :10, :9] > 0).astype(np.int32) * 3, (2, 2), (2, 2)),
            {},
        ),
        "onehot": (kernels.onehot, (np.arange(12) % 5, 5, np.float32), {}),
        "log_softmax": (kernels.log_softmax, (g2 * 30,), {}),
        "cross_entropy_sum": (
            kernels.cross_entropy_sum,
            (g2 * 30, kernels.onehot(np.arange(300) % 64, 64, np.float32)),
            {},
        ),
        "linear_forward": (kernels.linear_forward, (h, W), {}),
        "linear_grad_x": (kernels.linear_grad_x, (g2, W), {}),
        "linear_grad_w": (kernels.linear_grad_w, (g2, h), {}),
        "avg_pool2d_forward": (
            kernels.avg_pool2d_forward,
            (x, (3, 2), (2, 1), (-1, 0), (19, 18), (1, 1), False),
            {},
        ),
        "avg_pool2d_backward": (
            kernels.avg_pool2d_backward,
            (g6[:, :, :9, :17], (3, 2), (2, 1), (-1, 0), (19, 18), (1, 1), True),
            {},
        ),
        "plane_sums": (kernels.plane_sums, (x,), {}),
        "plane_mean": (kernels.plane_mean, (stats[:2].T.copy() * 1e3, 360, np.float32), {}),
        "plane_mean_backward": (kernels.plane_mean_backward, (g6[:, :, :1, :1], (20, 18), 360), {}),
        "upsample_nearest_forward": (kernels.upsample_nearest_forward, (x, (2, 3)), {}),
        "upsample_nearest_backward": (kernels.upsample_nearest_backward, (g6, (4, 3)), {}),
    }


CASES = _cases()
#: the kernels' helpers, not kernels themselves
NOT_KERNELS = {"Padded", "canonical", "cropped", "layout_invariant", "materialize", "get_namespace"}


def test_every_kernel_is_covered_and_layout_invariant():
    """A kernel added to the package must be decorated and tested here."""
    public = {n for n in kernels.__all__ if n not in NOT_KERNELS}
    assert public == set(CASES)
    for name in public:
        fn = getattr(kernels, name)
        assert inspect.isfunction(fn) and hasattr(fn, "__wrapped__"), f"{name} is not @layout_invariant"


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _relaid(args, layout):
    f = LAYOUTS[layout]
    out = []
    for a in args:
        if isinstance(a, np.ndarray) and a.ndim:
            a = f(a)
        elif isinstance(a, list):
            a = [f(p) for p in a]
        out.append(a)
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CASES)
def test_kernel_result_does_not_depend_on_input_layout(name, layout):
    fn, args, kw = CASES[name]
    ref = _as_tuple(fn(*args, **kw))
    got = _as_tuple(fn(*_relaid(args, layout), **kw))
    for r, g in zip(ref, got):
        assert g.flags.c_contiguous and g.flags.aligned, f"{name} returned a non-canonical block"
        assert g.dtype == r.dtype
        np.testing.assert_array_equal(g, r, err_msg=f"{name} with {layout} inputs")


def test_padded_windows_and_crops_are_canonical():
    x = np.arange(2 * 3 * 5 * 4, dtype=np.float32).reshape(2, 3, 5, 4)
    view = _strided(x)
    p = canonical(Padded(view, (1, 1, 0, 2), 0.0))
    assert p.block.flags.c_contiguous and np.array_equal(p.block, x) and p.pads == (1, 1, 0, 2)
    p2 = Padded(x, (1, 0, 0, 0), 0.0)
    assert canonical(p2) is p2  # already canonical: nothing copied
    assert canonical(x) is x
    assert canonical(3.0) == 3.0 and canonical((1, 2)) == (1, 2)
    u = _at(x, 1)
    assert not u.flags.aligned and canonical(u).flags.aligned


def test_a_cropped_tile_is_a_canonical_copy():
    """The crop of a grad-x window (both kernels' and the op's, ``ops/conv.py`` ``_gx_pair``)
    is a canonical block whatever the window, not a view into it."""
    x = np.arange(2 * 3 * 7 * 6, dtype=np.float64).reshape(2, 3, 7, 6)
    tile = cropped(x, ((1, 5), (2, 6)))
    np.testing.assert_array_equal(tile, x[:, :, 1:5, 2:6])
    assert tile.flags.c_contiguous and tile.flags.aligned and not np.shares_memory(tile, x)
    assert cropped(x, None) is x
    full = cropped(_strided(x), ((0, 7), (0, 6)))
    assert full.flags.c_contiguous and np.array_equal(full, x)
