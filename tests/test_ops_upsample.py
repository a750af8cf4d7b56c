"""upsample_nearest and its VJP against a dense reference and PyTorch, in every chunking."""

import dask
import dask.array as da
import numpy as np
import optional
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dask_pconv as dp

import standin
from reference import upsample_nearest_ref, upsample_nearest_vjp_ref
from standin import StandInArray, blocks_to_host, to_device
from strategies import assert_blocks_have_dtype, assert_close, partitions

try:
    import torch
except ImportError:
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason=optional.TORCH)


@st.composite
def cases(draw):
    shape = (
        draw(st.integers(1, 2)),
        draw(st.integers(1, 3)),
        draw(st.integers(1, 9)),
        draw(st.integers(1, 9)),
    )
    scale = draw(st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 4), st.integers(1, 4))))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-6, 6, shape))).astype(dtype)
    split = draw(st.sampled_from(["none", "batch", "channel", "spatial", "mixed"]))
    chunks = [(n,) for n in shape]
    if split in ("batch", "mixed"):
        chunks[0] = draw(partitions(shape[0]))
    if split in ("channel", "mixed"):
        chunks[1] = draw(partitions(shape[1]))
    if split in ("spatial", "mixed"):
        chunks[2], chunks[3] = draw(partitions(shape[2], 4)), draw(partitions(shape[3], 4))
    return x, scale, tuple(chunks), dtype, rng


def _pair(s):
    return (s, s) if isinstance(s, int) else s


@settings(max_examples=60)
@given(cases())
def test_upsample_nearest_and_vjp_match_reference_in_every_split(case):
    x, scale, chunks, dtype, rng = case
    sh, sw = _pair(scale)
    xd = da.from_array(x, chunks=chunks)
    y = dp.upsample_nearest(xd, scale)
    assert y.dtype == dtype and y.chunks == chunks[:2] + tuple(
        tuple(c * s for c in cs) for cs, s in zip(chunks[2:], (sh, sw))
    )
    np.testing.assert_array_equal(y.compute(), upsample_nearest_ref(x, scale).astype(dtype))
    gy = rng.standard_normal(y.shape).astype(dtype)
    g_x = dp.upsample_nearest_vjp(xd, gy, scale)
    assert g_x.chunks == xd.chunks and g_x.dtype == dtype
    got = g_x.compute()
    assert_close(got, upsample_nearest_vjp_ref(gy, scale), dtype)
    # each sum is taken in one task in one order: the unsplit result's bits in every split,
    # also with g_y in chunks of its own (it is rechunked to the output's)
    whole = dp.upsample_nearest_vjp(x, gy, scale).compute()
    np.testing.assert_array_equal(got, whole)
    odd = dp.upsample_nearest_vjp(xd, da.from_array(gy, chunks=(1, 1, 3, 2)), scale)
    np.testing.assert_array_equal(odd.compute(), whole)


@needs_torch
@settings(max_examples=60)
@given(cases())
def test_upsample_nearest_and_vjp_match_torch(case):
    x, scale, chunks, dtype, rng = case
    xd = da.from_array(x, chunks=chunks)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.interpolate(xt, scale_factor=scale, mode="nearest")
    gy = rng.standard_normal(tuple(yt.shape)).astype(dtype)
    yt.backward(torch.from_numpy(gy))
    np.testing.assert_array_equal(dp.upsample_nearest(xd, scale).compute(), yt.detach().numpy())
    assert_close(dp.upsample_nearest_vjp(xd, gy, scale).compute(), xt.grad.numpy(), dtype)


def test_float_scale_factors_that_are_integers_are_accepted():
    x = np.arange(12.0).reshape(1, 1, 3, 4)
    np.testing.assert_array_equal(dp.upsample_nearest(x, 2.0).compute(), upsample_nearest_ref(x, 2))
    np.testing.assert_array_equal(dp.upsample_nearest(x, [1, 3]).compute(), upsample_nearest_ref(x, (1, 3)))


def test_upsample_nearest_errors():
    x = da.ones((1, 2, 4, 4), chunks=2)
    for bad in [1.5, (2, 0.5), float("nan"), float("inf"), "2", True]:
        with pytest.raises(ValueError, match="integer scale factors only"):
            dp.upsample_nearest(x, bad)
    with pytest.raises(ValueError, match="at least 1"):
        dp.upsample_nearest(x, (2, 0))
    with pytest.raises(ValueError, match="a number or a pair"):
        dp.upsample_nearest(x, (2, 2, 2))
    with pytest.raises(ValueError, match=r"x must be 4-D \(N, C, H, W\)"):
        dp.upsample_nearest(da.ones((2, 4, 4)), 2)
    with pytest.raises(ValueError, match=r"g_y must have the output shape \(1, 2, 8, 8\)"):
        dp.upsample_nearest_vjp(x, np.ones((1, 2, 4, 4)), 2)
    with pytest.raises(TypeError, match="g_y has dtype float32 but x has dtype float64"):
        dp.upsample_nearest_vjp(x, np.ones((1, 2, 8, 8), np.float32), 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reported_dtype_is_computed_in_every_block(dtype):
    x = da.from_array(
        np.random.default_rng(2).standard_normal((3, 4, 5, 6)).astype(dtype), chunks=(2, 3, 2, 4)
    )
    y = dp.upsample_nearest(x, (2, 3))
    assert_blocks_have_dtype(y, dp.upsample_nearest_vjp(x, da.ones(y.shape, dtype=dtype), (2, 3)))


def test_device_blocks_stay_on_the_device():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 5, 4))
    xd = da.from_array(x, chunks=(1, 2, 3, 3)).map_blocks(to_device, meta=standin.meta(4, x.dtype))
    standin.LOG.clear()
    with dask.config.set(scheduler="synchronous"):
        y = dp.upsample_nearest(xd, (3, 2))
        assert isinstance(y._meta, StandInArray)
        np.testing.assert_array_equal(blocks_to_host(y), upsample_nearest_ref(x, (3, 2)))
        gy = rng.standard_normal(y.shape)
        gyd = da.from_array(gy, chunks=y.chunks).map_blocks(to_device, meta=standin.meta(4, x.dtype))
        assert_close(
            blocks_to_host(dp.upsample_nearest_vjp(xd, gyd, (3, 2))),
            upsample_nearest_vjp_ref(gy, (3, 2)),
            np.float64,
        )
    assert [e for e in standin.LOG if e == "__array__" or e.startswith("mixed")] == []
