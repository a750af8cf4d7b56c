"""max_pool2d and its VJP against a dense reference, with tiles that ignore the windows."""

import dask
import dask.array as da
import numpy as np
import optional
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

import dask_pconv as dp

from reference import _pool_argmax, _pool_out, max_pool2d_ref, max_pool2d_vjp_ref
from strategies import assert_blocks_have_dtype, assert_close, partitions

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason=optional.TORCH)


def _values(draw, rng, shape, dtype):
    """Random normal values, or small integers (ties in most windows), with NaN and -inf
    sprinkled in if drawn: the cases where which element is the maximum matters."""
    if draw(st.booleans()):
        x = rng.standard_normal(shape)
    else:
        x = rng.integers(-2, 3, shape).astype(float)
    if draw(st.booleans()):
        x[rng.random(shape) < 0.1] = np.nan
        x[rng.random(shape) < 0.1] = -np.inf
    return x.astype(dtype)


@st.composite
def pool_cases(draw, special=True):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    ceil_mode = draw(st.booleans())
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    s = stride or (kh, kw)
    assume(_pool_out(H, kh, s[0], padding[0], dilation[0], ceil_mode) >= 1)
    assume(_pool_out(W, kw, s[1], padding[1], dilation[1], ceil_mode) >= 1)
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = (
        _values(draw, rng, (N, C, H, W), dtype)
        if special
        else rng.standard_normal((N, C, H, W)).astype(dtype)
    )
    split = draw(st.sampled_from(["none", "batch", "channel", "spatial", "mixed"]))
    chunks = [(N,), (C,), (H,), (W,)]
    if split in ("batch", "mixed"):
        chunks[0] = draw(partitions(N))
    if split in ("channel", "mixed"):
        chunks[1] = draw(partitions(C))
    if split in ("spatial", "mixed"):  # chunks of size 1 included: smaller than any halo
        chunks[2], chunks[3] = draw(partitions(H, 5)), draw(partitions(W, 5))
    kw_ = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    return x, (kh, kw), kw_, tuple(chunks), dtype, rng


@given(pool_cases())
def test_max_pool2d_and_vjp_match_reference(case):
    x, kernel, kw, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    ref, ref_idx = max_pool2d_ref(x, kernel, **kw, return_indices=True)
    y, idx = dp.max_pool2d(xd, kernel, **kw, return_indices=True)
    assert y.shape == idx.shape == ref.shape and y.dtype == dtype and idx.dtype == np.int64
    assert y.chunks == idx.chunks
    y_np, idx_np = dask.compute(y, idx)
    np.testing.assert_array_equal(y_np, ref.astype(dtype))  # max is exact; NaN equals NaN here
    np.testing.assert_array_equal(idx_np, ref_idx)
    np.testing.assert_array_equal(dp.max_pool2d(xd, kernel, **kw).compute(), y_np)
    gy = rng.standard_normal(ref.shape).astype(dtype)
    g_x = dp.max_pool2d_vjp(xd, gy, kernel, **kw)
    assert g_x.chunks == xd.chunks and g_x.dtype == dtype
    assert_close(g_x.compute(), max_pool2d_vjp_ref(x, gy, kernel, **kw), dtype)


@needs_torch
@given(pool_cases())
def test_max_pool2d_indices_and_vjp_match_torch(case):
    """Values and indices bit for bit as ``torch.nn.functional.max_pool2d``, and its gradient:
    ties, NaN, -inf, dilation and ceil_mode included, in every split."""
    x, kernel, kw, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt, it = torch.nn.functional.max_pool2d(xt, kernel, **kw, return_indices=True)
    y, idx = dask.compute(*dp.max_pool2d(xd, kernel, **kw, return_indices=True))
    np.testing.assert_array_equal(y, yt.detach().numpy())
    np.testing.assert_array_equal(idx, it.numpy())
    # a window with no element in the image (dilation wider than the image, with padding) has
    # an index outside the window, where PyTorch sends its gradient; here it passes none on
    assume(_pool_argmax(x, kernel, **kw)[2].all())
    gy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    # the same elements get the same gradients; overlapping windows add them in another order
    assert_close(dp.max_pool2d_vjp(xd, gy, kernel, **kw).compute(), xt.grad.numpy(), dtype)


def test_pool_tiles_not_aligned_with_windows():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 13, 10))
    xd = da.from_array(x, chunks=(1, 2, (3, 1, 5, 4), (1, 3, 3, 3)))
    y = dp.max_pool2d(xd, 2)
    np.testing.assert_array_equal(y.compute(), max_pool2d_ref(x, 2))
    gy = rng.standard_normal(y.shape)
    assert_close(dp.max_pool2d_vjp(xd, gy, 2).compute(), max_pool2d_vjp_ref(x, gy, 2), np.float64)


def test_nan_propagates_and_ties_go_to_the_first_maximum():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 0, 1] = np.nan
    xd = da.from_array(x, chunks=(1, 1, 1, 3))
    y = dp.max_pool2d(xd, 2).compute()
    assert np.isnan(y[0, 0, 0, 0]) and (y[0, 0, 1] == 0).all()
    g = dp.max_pool2d_vjp(xd, np.ones((1, 1, 2, 2)), 2).compute()
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[0, 2] = expected[2, 0] = expected[2, 2] = 1  # NaN, then first zeros
    np.testing.assert_array_equal(g[0, 0], expected)


@needs_torch
def test_torch_oracle_pool():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 17, 14)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    gy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.from_numpy(gy))
    xd = dp.split(x, spatial=(4, 3))
    np.testing.assert_array_equal(dp.max_pool2d(xd, 3, 2, 1).compute(), yt.detach().numpy())
    assert_close(dp.max_pool2d_vjp(xd, gy, 3, 2, 1).compute(), xt.grad.numpy(), np.float32)


# -- what torch.nn.functional.max_pool2d accepts: an empty batch, unbatched input, 1-tuples -----
def _like_torch_cases():
    x4 = np.random.default_rng(9).standard_normal((2, 3, 11, 9))
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1), ceil_mode=True)
    one = dict(stride=(2,), padding=[1], dilation=(2,), ceil_mode=True)  # the same on both axes
    as_ints = dict(stride=2, padding=1, dilation=2, ceil_mode=True)
    return [
        # (name, x, chunks of x, kernel_size, kwargs, kernel_size and kwargs for the reference)
        ("empty batch", np.zeros((0, 3, 11, 9)), None, (3, 2), kw, (3, 2), kw),
        ("empty batch, split", np.zeros((0, 3, 11, 9)), (0, 1, 4, 2), (3, 2), kw, (3, 2), kw),
        ("unbatched", x4[0], None, (3, 2), kw, (3, 2), kw),
        ("unbatched, split", x4[0], (2, 3, 4), (3, 2), kw, (3, 2), kw),
        ("one-element tuples", x4, (1, 2, 5, 4), (3,), one, 3, as_ints),
    ]


def _run_like_torch(x, chunks, kernel, kw, gy):
    xd = x if chunks is None else da.from_array(x, chunks=chunks)
    y, idx = dp.max_pool2d(xd, kernel, **kw, return_indices=True)
    g_x = dp.max_pool2d_vjp(xd, gy, kernel, **kw)
    assert y.shape == idx.shape == gy.shape and g_x.shape == x.shape
    return dask.compute(y, idx, g_x)


def test_empty_batch_unbatched_input_and_one_element_tuples():
    rng = np.random.default_rng(10)
    for name, x, chunks, kernel, kw, ref_kernel, ref_kw in _like_torch_cases():
        x4 = x[None] if x.ndim == 3 else x
        ey, ei = max_pool2d_ref(x4, ref_kernel, **ref_kw, return_indices=True)
        gy = rng.standard_normal(ey.shape)
        ex = max_pool2d_vjp_ref(x4, gy, ref_kernel, **ref_kw)
        if x.ndim == 3:
            ey, ei, ex, gy = ey[0], ei[0], ex[0], gy[0]
        got = _run_like_torch(x, chunks, kernel, kw, gy)
        for a, e in zip(got, (ey, ei, ex)):
            assert a.shape == e.shape and a.dtype == e.dtype, name
        np.testing.assert_array_equal(got[0], ey)
        np.testing.assert_array_equal(got[1], ei)
        if x.size:  # overlapping windows add in another order
            assert_close(got[2], ex, np.float64)


@needs_torch
def test_empty_batch_unbatched_input_and_one_element_tuples_match_torch():
    rng = np.random.default_rng(11)
    for name, x, chunks, kernel, kw, _, _ in _like_torch_cases():
        xt = torch.from_numpy(x.copy()).requires_grad_()
        yt, it = torch.nn.functional.max_pool2d(xt, kernel, **kw, return_indices=True)
        gy = rng.standard_normal(tuple(yt.shape))
        yt.backward(torch.from_numpy(gy))
        got = _run_like_torch(x, chunks, kernel, kw, gy)
        for a, e in zip(got, (yt.detach(), it, xt.grad)):
            assert a.shape == tuple(e.shape), name
        np.testing.assert_array_equal(got[0], yt.detach().numpy())
        np.testing.assert_array_equal(got[1], it.numpy())
        if x.size:
            assert_close(got[2], xt.grad.numpy(), np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reported_dtype_is_computed_in_every_block(dtype):
    x = np.random.default_rng(12).standard_normal((3, 4, 9, 8)).astype(dtype)
    for chunks in [(3, 4, 9, 8), (1, 4, 9, 8), (3, 1, 9, 8), (3, 4, 2, 3), (2, 3, 1, 5)]:
        xd = da.from_array(x, chunks=chunks)
        y, idx = dp.max_pool2d(xd, 3, 2, 1, ceil_mode=True, return_indices=True)
        g_x = dp.max_pool2d_vjp(xd, np.ones(y.shape, dtype), 3, 2, 1, ceil_mode=True)
        assert (y.dtype, idx.dtype, g_x.dtype) == (dtype, np.int64, dtype)
        assert_blocks_have_dtype(y, idx, g_x, dp.max_pool2d(xd, 2))
