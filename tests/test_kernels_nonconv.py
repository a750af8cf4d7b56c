"""The non-convolution block kernels on their own: the branch-free ``where``, the dropout
mask's definition and keep probability, the pooling argmax of the backward, and the BatchNorm
kernels against float64 formulas on data whose mean is far from 0."""

import numpy as np
import pytest

from dask_pconv import kernels
from dask_pconv.kernels import _select, pool
from dask_pconv.kernels import dropout as drop


def _special(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(dtype)
    flat = a.reshape(-1)
    flat[::7] = -0.0
    flat[1::11] = np.nan
    flat[2::13] = np.inf
    flat[3::17] = -np.inf
    return a


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_where_zero_is_where_bit_for_bit(dtype):
    """NaN, infinities and -0.0 where the condition is false give +0, as ``where``'s."""
    if dtype == np.int32:
        a = np.random.default_rng(0).integers(-(2**31), 2**31, (5, 6, 7), dtype=np.int32)
    else:
        a = _special((5, 6, 7), dtype)
    cond = np.random.default_rng(1).random(a.shape) < 0.5
    got = _select.where_zero(cond, a)
    want = np.where(cond, a, a.dtype.type(0))
    assert got.dtype == a.dtype and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(f"u{a.itemsize}"), want.view(f"u{a.itemsize}"))


def _mix_ref(v):
    v ^= v >> 16
    v = (v * 0x7FEB352D) % 2**32
    v ^= v >> 15
    v = (v * 0x846CA68B) % 2**32
    return v ^ (v >> 16)


def _u_ref(key, i):
    """The module docstring's ``u(i)``, in Python integers."""
    lo, hi = i % 2**32, i >> 32
    k_lo, k_hi = key % 2**32, key >> 32
    k0 = k_lo ^ _mix_ref((hi + k_hi) % 2**32)
    return _mix_ref(_mix_ref(lo ^ k0) ^ k_hi)


@pytest.mark.parametrize(
    "shape, location",
    [
        ((7, 9, 11), ((1, 5), (2, 9), (0, 11))),
        ((3, 2**31, 4), ((1, 3), (2**31 - 2, 2**31), (1, 4))),  # 2**34 elements: hi(i) is 1 and 2
    ],
    ids=["small", "2**34 elements"],
)
def test_dropout_numbers_are_the_documented_hash_of_the_flat_index(shape, location):
    key = 0xD1B54A32D192ED03
    u = drop._uniform32(np, key, shape, location)
    strides = [int(np.prod(shape[ax + 1 :])) for ax in range(len(shape))]
    local = np.indices([hi - lo for lo, hi in location]).reshape(len(shape), -1).T
    # each element's flat index in the whole array, in Python integers
    flat = [sum((int(b) + lo) * s for b, (lo, _), s in zip(col, location, strides)) for col in local]
    np.testing.assert_array_equal(u.reshape(-1), [_u_ref(key, i) for i in flat])
    # the narrow path (uint32 indices) is the wide one's case hi(i) = 0
    if int(np.prod(shape)) < 2**32:
        np.testing.assert_array_equal(drop._uniform32(np, key, shape, location, wide=True), u)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.4, 0.5, 0.9])
def test_dropout_keeps_each_element_with_probability_one_minus_ratio(ratio):
    """The kept fraction of 10**6 elements is within 4 sigma of ``1 - ratio``, for keys of
    consecutive steps, and kept elements are scaled by ``1 / (1 - ratio)``."""
    n = 10**6
    x = np.ones((1000, 1000), np.float32)
    sigma = np.sqrt(ratio * (1 - ratio) / n)
    for key in (0, 1, 2**63 + 12345, 0xFFFFFFFFFFFFFFFF):
        y = kernels.dropout_block(x, ratio, key, (2000, 1000), ((1000, 2000), (0, 1000)))
        kept = y != 0
        assert abs(kept.mean() - (1 - ratio)) < 4 * sigma
        np.testing.assert_array_equal(y[kept], np.float32(1 / (1 - ratio)))


def test_dropout_masks_of_neighbouring_keys_and_elements_are_uncorrelated():
    """Masks of consecutive keys agree on ``p**2 + q**2`` of the elements, as independent
    masks do, and so do horizontally neighbouring elements of one mask."""
    x = np.ones((1000, 1000), np.float32)
    loc = ((0, 1000), (0, 1000))
    a = kernels.dropout_block(x, 0.5, 7, x.shape, loc) != 0
    b = kernels.dropout_block(x, 0.5, 8, x.shape, loc) != 0
    sigma = np.sqrt(0.25 / a.size)
    assert abs((a == b).mean() - 0.5) < 4 * sigma
    assert abs((a[:, 1:] == a[:, :-1]).mean() - 0.5) < 4 * sigma


def test_dropout_drops_non_finite_values_to_positive_zero():
    x = _special((4, 50), np.float32)
    y = kernels.dropout_block(x, 0.5, 3, x.shape, ((0, 4), (0, 50)))
    dropped = drop._uniform32(np, 3, x.shape, ((0, 4), (0, 50))) < np.uint32(2**31)
    assert (y[dropped].view(np.uint32) == 0).all()
    np.testing.assert_array_equal(y[~dropped], x[~dropped] * np.float32(2))


@pytest.mark.parametrize(
    "kernel, stride, dilation, origin",
    [((2, 2), (2, 2), (1, 1), (0, 0)), ((3, 3), (2, 1), (1, 2), (-1, -2)), ((3, 2), (1, 1), (2, 1), (-2, 0))],
)
def test_pool_backward_argmax_is_the_forward_argmax(kernel, stride, dilation, origin):
    """Ties, NaN, -inf and windows starting in the padding (-inf): the same tap as
    ``max_pool2d_argmax``'s, which follows PyTorch."""
    rng = np.random.default_rng(2)
    x = rng.integers(0, 3, (2, 3, 13, 12)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    x[rng.random(x.shape) < 0.1] = -np.inf
    x[:, :, : max(0, -origin[0])] = -np.inf  # the padding rows and columns
    x[:, :, :, : max(0, -origin[1])] = -np.inf
    want_best, want = pool._argmax_taps(x, kernel, stride, dilation, origin)
    best, taps = pool._argmax_index(x, kernel, stride, dilation, origin)
    np.testing.assert_array_equal(taps, want)
    np.testing.assert_array_equal(best, want_best)  # NaN where NaN, the same maxima


def _shifted(shape, dtype, shift=300.0):
    rng = np.random.default_rng(4)
    return (
        rng.standard_normal(shape) * (rng.random((1, shape[1]) + (1,) * (len(shape) - 2)) + 0.5) + shift
    ).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(6, 5, 7, 9), (40, 3)])
def test_batch_norm_kernels_on_data_far_from_zero(dtype, shape):
    """Mean 300 std ~1: the two-pass statistics and the centred products stay accurate where
    ``sum(x**2) - n * mean**2`` in float32 would lose every digit."""
    x = _shifted(shape, dtype)
    g = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    axes = (0,) if x.ndim == 2 else (0, 2, 3)
    x64, g64 = x.astype(np.float64), g.astype(np.float64)
    n = x.size // x.shape[1]
    stats = kernels.bn_partial_stats(x)
    mean, var = x64.mean(axis=axes), x64.var(axis=axes)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    np.testing.assert_allclose(stats[1], mean, rtol=tol)
    np.testing.assert_allclose(stats[2] / n, var, rtol=tol if dtype == np.float64 else 1e-5)
    b = (1, -1) + (1,) * (x.ndim - 2)
    xhat = (x64 - mean.reshape(b)) / np.sqrt(var.reshape(b) + 2e-5)
    sums = kernels.bn_backward_partial(x, x, g, stats, 2e-5, False)
    np.testing.assert_allclose(sums[0], g64.sum(axis=axes), rtol=tol, atol=tol * n)
    np.testing.assert_allclose(sums[1], (g64 * xhat).sum(axis=axes), rtol=1e3 * tol, atol=1e2 * tol * n)
    gamma = np.linspace(0.5, 1.5, x.shape[1]).astype(dtype)
    y = kernels.bn_forward(x, stats, gamma, np.zeros_like(gamma), 2e-5, False)
    np.testing.assert_allclose(y, xhat * gamma.reshape(b), atol=1e2 * tol)


@pytest.mark.parametrize("k, s", [((2, 2), (2, 2)), ((3, 3), (2, 2)), ((2, 3), (1, 2))])
def test_pool_taps_kept_from_the_forward_route_the_gradient_as_the_backward_does(k, s):
    """What a fused stage keeps (values and taps) gives the forward's values and the backward's
    gradient, bit for bit."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 9, 11)).astype(np.float32)
    x[0, 0, :2, :2] = 1.5  # ties: the first tap wins, in both
    best, taps = kernels.max_pool2d_forward_taps(x, k, s)
    np.testing.assert_array_equal(best, kernels.max_pool2d_forward(x, k, s))
    gy = rng.standard_normal(best.shape).astype(np.float32)
    want = kernels.max_pool2d_backward(x, gy, k, s)
    np.testing.assert_array_equal(kernels.max_pool2d_scatter(gy, taps, k, s), want)
