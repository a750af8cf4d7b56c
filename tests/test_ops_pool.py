"""max_pool2d and its VJP against a dense reference, with tiles that ignore the windows."""

import dask.array as da
import numpy as np
import optional
from hypothesis import assume, given
from hypothesis import strategies as st

import dask_pconv as dp

from reference import max_pool2d_ref, max_pool2d_vjp_ref
from strategies import assert_close, partitions


@st.composite
def pool_cases(draw):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    padding = (draw(st.integers(0, kh // 2)), draw(st.integers(0, kw // 2)))
    H, W = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    s = stride or (kh, kw)
    assume((H + 2 * padding[0] - kh) // s[0] + 1 >= 1 and H + 2 * padding[0] >= kh)
    assume((W + 2 * padding[1] - kw) // s[1] + 1 >= 1 and W + 2 * padding[1] >= kw)
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    chunks = (draw(partitions(N)), draw(partitions(C)), draw(partitions(H, 5)), draw(partitions(W, 5)))
    return x, (kh, kw), stride, padding, chunks, dtype, rng


@given(pool_cases())
def test_max_pool2d_and_vjp_match_reference(case):
    x, kernel, stride, padding, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    y = dp.max_pool2d(xd, kernel, stride, padding)
    ref = max_pool2d_ref(x, kernel, stride, padding)
    assert y.shape == ref.shape and y.dtype == dtype
    np.testing.assert_array_equal(y.compute(), ref.astype(dtype))  # max is exact
    gy = rng.standard_normal(ref.shape).astype(dtype)
    g_x = dp.max_pool2d_vjp(xd, gy, kernel, stride, padding)
    assert g_x.chunks == xd.chunks
    assert_close(g_x.compute(), max_pool2d_vjp_ref(x, gy, kernel, stride, padding), dtype)


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


def test_torch_oracle_pool():
    torch = optional.need_torch()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 17, 14)).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    gy = rng.standard_normal(tuple(yt.shape)).astype(np.float32)
    yt.backward(torch.from_numpy(gy))
    xd = dp.split(x, spatial=(4, 3))
    np.testing.assert_array_equal(dp.max_pool2d(xd, 3, 2, 1).compute(), yt.detach().numpy())
    assert_close(dp.max_pool2d_vjp(xd, gy, 3, 2, 1).compute(), xt.grad.numpy(), np.float32)
