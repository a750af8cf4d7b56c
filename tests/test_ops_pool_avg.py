"""avg_pool2d and adaptive_avg_pool2d with their VJPs against a dense reference and PyTorch, with
tiles that ignore the windows (the divisor counts from the true image border)."""

import dask
import dask.array as da
import numpy as np
import optional
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dask_pconv as dp

import standin
from reference import (
    _pool_out,
    adaptive_avg_pool2d_ref,
    adaptive_avg_pool2d_vjp_ref,
    avg_pool2d_ref,
    avg_pool2d_vjp_ref,
)
from standin import StandInArray, blocks_to_host, to_device
from strategies import assert_blocks_have_dtype, assert_close, partitions

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason=optional.TORCH)
SPLITS = ["none", "batch", "channel", "spatial", "mixed"]


@st.composite
def chunkings(draw, shape, split=None):
    """Chunks of ``shape`` (N, C, H, W) for a split drawn from :data:`SPLITS`; spatial chunks of
    size 1 included (smaller than any halo)."""
    N, C, H, W = shape
    split = split or draw(st.sampled_from(SPLITS))
    chunks = [(N,), (C,), (H,), (W,)]
    if split in ("batch", "mixed"):
        chunks[0] = draw(partitions(N))
    if split in ("channel", "mixed"):
        chunks[1] = draw(partitions(C))
    if split in ("spatial", "mixed"):
        chunks[2], chunks[3] = draw(partitions(H, 5)), draw(partitions(W, 5))
    return tuple(chunks)


@st.composite
def avg_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    ceil_mode = draw(st.booleans())
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    s = stride or (kh, kw)
    assume(_pool_out(H, kh, s[0], padding[0], 1, ceil_mode) >= 1)
    assume(_pool_out(W, kw, s[1], padding[1], 1, ceil_mode) >= 1)
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    kw_ = dict(
        stride=stride,
        padding=padding,
        ceil_mode=ceil_mode,
        count_include_pad=draw(st.booleans()),
        divisor_override=draw(st.one_of(st.none(), st.sampled_from([-3, 1, 2, 7]))),
    )
    return x, (kh, kw), kw_, draw(chunkings(x.shape)), dtype, rng


@settings(max_examples=60)
@given(avg_cases())
def test_avg_pool2d_and_vjp_match_reference_in_every_split(case):
    x, kernel, kw, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    ref = avg_pool2d_ref(x, kernel, **kw)
    y = dp.avg_pool2d(xd, kernel, **kw)
    assert y.shape == ref.shape and y.dtype == dtype
    got = y.compute()
    assert_close(got, ref, dtype)
    # each window is summed on its own, in one order: the unsplit result's bits in every split
    whole = dp.avg_pool2d(da.from_array(x, chunks=-1), kernel, **kw).compute()
    np.testing.assert_array_equal(got, whole)
    gy = rng.standard_normal(ref.shape).astype(dtype)
    g_x = dp.avg_pool2d_vjp(xd, gy, kernel, **kw)
    assert g_x.chunks == xd.chunks and g_x.dtype == dtype
    assert_close(g_x.compute(), avg_pool2d_vjp_ref(x, gy, kernel, **kw), dtype)


@needs_torch
@settings(max_examples=60)
@given(avg_cases())
def test_avg_pool2d_and_vjp_match_torch(case):
    """Values and the gradient as ``torch.nn.functional.avg_pool2d`` and autograd, ``ceil_mode``,
    ``count_include_pad`` and ``divisor_override`` included, in every split."""
    x, kernel, kw, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.avg_pool2d(xt, kernel, **kw)
    gy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    assert_close(dp.avg_pool2d(xd, kernel, **kw).compute(), yt.detach().numpy(), dtype)
    assert_close(dp.avg_pool2d_vjp(xd, gy, kernel, **kw).compute(), xt.grad.numpy(), dtype)


def test_divisor_counts_from_the_image_border_not_the_tile_border():
    """Ones average to one everywhere without count_include_pad; with it, only windows that
    reach the true padding are less than one, however the tiles cut the image."""
    x = np.ones((1, 1, 9, 8))
    xd = da.from_array(x, chunks=(1, 1, (1, 4, 2, 2), (3, 1, 4)))
    y = dp.avg_pool2d(xd, 3, 1, 1, count_include_pad=False).compute()
    np.testing.assert_array_equal(y, np.ones((1, 1, 9, 8)))
    y = dp.avg_pool2d(xd, 3, 1, 1).compute()[0, 0]
    np.testing.assert_array_equal(y[1:-1, 1:-1], np.ones((7, 6)))
    assert y[0, 0] == 4 / 9 and y[0, 3] == 6 / 9 and y[4, -1] == 6 / 9
    # ceil_mode: the last column's window runs past the padding (column 9); that never counts
    y = dp.avg_pool2d(xd, 3, 2, 1, ceil_mode=True).compute()[0, 0]
    assert y.shape == (5, 5) and y[2, 4] == 1 / 2 and y[4, 4] == 1 / 3 and y[2, 2] == 1


def test_empty_batch_and_unbatched_input():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 9, 7))
    kw = dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    y = dp.avg_pool2d(da.from_array(x, chunks=(2, 4, 3)), 3, **kw)
    np.testing.assert_allclose(y.compute(), avg_pool2d_ref(x[None], 3, **kw)[0], rtol=1e-12)
    gy = rng.standard_normal(y.shape)
    g = dp.avg_pool2d_vjp(da.from_array(x, chunks=(2, 4, 3)), gy, 3, **kw).compute()
    np.testing.assert_allclose(g, avg_pool2d_vjp_ref(x[None], gy[None], 3, **kw)[0], rtol=1e-12)
    empty = da.zeros((0, 3, 9, 7), chunks=(0, 1, 4, 2))
    y = dp.avg_pool2d(empty, 3, **kw)
    assert y.shape == (0, 3, 5, 4) and y.compute().shape == (0, 3, 5, 4)
    assert dp.avg_pool2d_vjp(empty, np.zeros(y.shape), 3, **kw).compute().shape == (0, 3, 9, 7)
    m = dp.adaptive_avg_pool2d(da.from_array(x, chunks=(2, 4, 3)), 1)
    assert m.shape == (3, 1, 1)
    np.testing.assert_allclose(m.compute(), x.mean(axis=(1, 2), keepdims=True), rtol=1e-12)
    assert dp.adaptive_avg_pool2d(empty, (1, 1)).compute().shape == (0, 3, 1, 1)


def test_avg_pool2d_argument_errors():
    x = da.ones((1, 2, 6, 6), chunks=3)
    with pytest.raises(ValueError, match="at most half of kernel_size"):
        dp.avg_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="larger than the padded input"):
        dp.avg_pool2d(x, 7)
    with pytest.raises(TypeError, match="count_include_pad must be True or False"):
        dp.avg_pool2d(x, 2, count_include_pad=1)
    with pytest.raises(TypeError, match="ceil_mode must be True or False"):
        dp.avg_pool2d(x, 2, ceil_mode="yes")
    with pytest.raises(ValueError, match="divisor_override must not be zero"):
        dp.avg_pool2d(x, 2, divisor_override=0)
    with pytest.raises(TypeError, match="divisor_override must be an int"):
        dp.avg_pool2d(x, 2, divisor_override=2.5)
    with pytest.raises(ValueError, match=r"g_y must have the output shape \(1, 2, 3, 3\)"):
        dp.avg_pool2d_vjp(x, np.ones((1, 2, 2, 2)), 2)
    with pytest.raises(TypeError, match="g_y has dtype float32 but x has dtype float64"):
        dp.avg_pool2d_vjp(x, np.ones((1, 2, 3, 3), np.float32), 2)
    with pytest.raises(TypeError, match="floating dtype"):
        dp.avg_pool2d(da.ones((1, 2, 6, 6), dtype=int), 2)


# -- adaptive_avg_pool2d (output size 1) -------------------------------------------------------
@st.composite
def global_cases(draw, split=None):
    shape = tuple(draw(st.integers(1, n)) for n in (3, 4, 13, 13))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    # magnitudes over many orders: any change in the order of the sums would show in the bits
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, shape))).astype(dtype)
    output_size = draw(st.sampled_from([1, (1, 1), [1, 1], (1, None) if shape[3] == 1 else 1]))
    return x, output_size, draw(chunkings(shape, split)), dtype, rng


@settings(max_examples=60)
@given(global_cases())
def test_adaptive_avg_pool2d_and_vjp_match_reference_in_every_split(case):
    x, size, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    y = dp.adaptive_avg_pool2d(xd, size)
    assert y.shape == x.shape[:2] + (1, 1) and y.dtype == dtype
    assert y.chunks == xd.chunks[:2] + ((1,), (1,))
    got = y.compute()
    assert_close(got, adaptive_avg_pool2d_ref(x), dtype)
    # the same split computes the same bits again (a fresh graph, so nothing is cached)
    np.testing.assert_array_equal(
        dp.adaptive_avg_pool2d(da.from_array(x.copy(), chunks=chunks), 1).compute(), got
    )
    gy = rng.standard_normal(y.shape).astype(dtype)
    g_x = dp.adaptive_avg_pool2d_vjp(xd, gy, size)
    assert g_x.chunks == xd.chunks and g_x.dtype == dtype
    assert_close(g_x.compute(), adaptive_avg_pool2d_vjp_ref(x, gy), dtype)


@settings(max_examples=30)
@given(global_cases(split="none"), st.data())
def test_adaptive_avg_pool2d_batch_and_channel_splits_keep_the_bits(case, data):
    """Each plane is summed on its own: splitting the batch or the channels changes no bit."""
    x, size, _, _, _ = case
    whole = dp.adaptive_avg_pool2d(da.from_array(x, chunks=-1), size).compute()
    chunks = data.draw(st.tuples(partitions(x.shape[0]), partitions(x.shape[1])))
    split = dp.adaptive_avg_pool2d(da.from_array(x, chunks=chunks + x.shape[2:]), size).compute()
    np.testing.assert_array_equal(split, whole)


@needs_torch
@settings(max_examples=40)
@given(global_cases())
def test_adaptive_avg_pool2d_and_vjp_match_torch(case):
    x, size, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.adaptive_avg_pool2d(xt, size)
    gy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    assert_close(dp.adaptive_avg_pool2d(xd, size).compute(), yt.detach().numpy(), dtype)
    assert_close(dp.adaptive_avg_pool2d_vjp(xd, gy, size).compute(), xt.grad.numpy(), dtype)


def test_adaptive_avg_pool2d_errors():
    x = da.ones((2, 3, 4, 4), chunks=2)
    for size in [2, (1, 2), (4, 4), (None, 1)]:
        with pytest.raises(ValueError, match="supports output_size 1 .* only"):
            dp.adaptive_avg_pool2d(x, size)
    for size in [(1,), (1, 1, 1)]:
        with pytest.raises(ValueError, match="an int or a pair"):
            dp.adaptive_avg_pool2d(x, size)
    with pytest.raises(TypeError, match="output_size must hold ints"):
        dp.adaptive_avg_pool2d(x, 1.0)
    with pytest.raises(ValueError, match=r"g_y must have the output shape \(2, 3, 1, 1\)"):
        dp.adaptive_avg_pool2d_vjp(x, np.ones((2, 3, 2, 2)), 1)
    with pytest.raises(ValueError, match=r"x must be 3-D \(C, H, W\) or 4-D"):
        dp.adaptive_avg_pool2d(da.ones((4, 4)), 1)


# -- dtypes of every block and the device (CuPy) code path -------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reported_dtype_is_computed_in_every_block(dtype):
    x = np.random.default_rng(12).standard_normal((3, 4, 9, 8)).astype(dtype)
    for chunks in [(3, 4, 9, 8), (1, 4, 9, 8), (3, 1, 9, 8), (3, 4, 2, 3), (2, 3, 1, 5)]:
        xd = da.from_array(x, chunks=chunks)
        y = dp.avg_pool2d(xd, 3, 2, 1, ceil_mode=True, count_include_pad=False)
        g_x = dp.avg_pool2d_vjp(xd, np.ones(y.shape, dtype), 3, 2, 1, ceil_mode=True, count_include_pad=False)
        m = dp.adaptive_avg_pool2d(xd, 1)
        g_m = dp.adaptive_avg_pool2d_vjp(xd, np.ones(m.shape, dtype), 1)
        assert {a.dtype for a in (y, g_x, m, g_m)} == {np.dtype(dtype)}
        assert_blocks_have_dtype(y, g_x, m, g_m)


def _device(a, chunks):
    x = da.from_array(a, chunks=chunks)
    return x.map_blocks(to_device, meta=standin.meta(a.ndim, a.dtype))


def test_ops_keep_device_blocks():
    """Every kernel runs in the blocks' own namespace (the CuPy stand-in refuses NumPy)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 11, 10))
    xd = _device(x, (2, 3, (4, 4, 3), (3, 7)))
    kw = dict(stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    standin.LOG.clear()
    with dask.config.set(scheduler="synchronous"):
        y = dp.avg_pool2d(xd, 3, **kw)
        m = dp.adaptive_avg_pool2d(xd, 1)
        assert isinstance(y._meta, StandInArray) and isinstance(m._meta, StandInArray)
        assert_close(blocks_to_host(y), avg_pool2d_ref(x, 3, **kw), np.float64)
        assert_close(blocks_to_host(m), adaptive_avg_pool2d_ref(x), np.float64)
        gy, gm = rng.standard_normal(y.shape), rng.standard_normal(m.shape)
        g_x = dp.avg_pool2d_vjp(xd, _device(gy, y.chunks), 3, **kw)
        g_m = dp.adaptive_avg_pool2d_vjp(xd, _device(gm, m.chunks), 1)
        assert_close(blocks_to_host(g_x), avg_pool2d_vjp_ref(x, gy, 3, **kw), np.float64)
        assert_close(blocks_to_host(g_m), adaptive_avg_pool2d_vjp_ref(x, gm), np.float64)
    assert [e for e in standin.LOG if e == "__array__" or e.startswith("mixed")] == []
